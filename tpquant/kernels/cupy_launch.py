"""Launching CuPy-compiled CUDA kernels on torch's current stream.

The CUDA sources in cpp/ compile at first use through CuPy's NVRTC (CuPy caches the binaries)
and run on the stream torch is using, so they order with torch's work and can be captured in
CUDA graphs. One place for that rule: the custom all-reduce and the weight-only GEMV use it.
Either may also launch with PDL (tpquant.kernels.pdl), through the driver's cuLaunchKernelEx.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

# CuPy wrappers of torch's streams, one per (device, stream handle); they hold no resources.
_STREAMS: dict[tuple[int, int], Any] = {}


def launch(
    kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, device: torch.device,
    pdl: bool = False, shared_mem: int = 0, cluster: tuple[int, ...] | None = None,
) -> None:
    """kernel<<<grid, block, shared_mem>>>(*args) on torch's current stream of `device`; with
    pdl, as a programmatic dependent launch (tpquant.kernels.pdl: the kernel must wait before
    it reads what the kernel before it writes); with cluster, in thread-block clusters of that
    shape (sm_90). args: numpy scalars (pointers as np.uint64)."""
    import cupy

    current = torch.cuda.current_stream(device)
    if pdl or cluster:  # CuPy's launch takes no launch attributes: the driver's cuLaunchKernelEx
        with cupy.cuda.Device(device.index):
            function = getattr(kernel, "kernel", kernel)  # a RawKernel's loaded Function
            _launch_ex(function.ptr, grid, block, args, current.cuda_stream, shared_mem, pdl,
                       cluster)
        return
    key = (device.index, current.cuda_stream)
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = _wrap(cupy, current, device)
    with cupy.cuda.Device(device.index), stream:
        kernel(grid, block, args, shared_mem=shared_mem)


# -- cuLaunchKernelEx with the programmatic-stream-serialization attribute ------------------------

_CLUSTER_DIMENSION = 4  # CUlaunchAttributeID
_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_CTYPES = {np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.int64): ctypes.c_int64,
           np.dtype(np.int32): ctypes.c_int32, np.dtype(np.float32): ctypes.c_float}


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_driver: Any = None


def _cuda_driver() -> Any:
    global _driver
    if _driver is None:
        _driver = ctypes.CDLL("libcuda.so.1")
        _driver.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                             ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        _driver.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        _driver.cuOccupancyMaxActiveClusters.argtypes = [
            ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.POINTER(_LaunchConfig)]
        _driver.cuOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [
            ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    return _driver


def _check(err: int, what: str) -> None:
    if err:
        name = ctypes.c_char_p()
        _cuda_driver().cuGetErrorName(err, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: {(name.value or b'error').decode()} ({err})")


def occupancy(kernel: Any, threads: int, device: torch.device) -> int:
    """Blocks of `threads` threads of a compiled kernel that one SM holds at once (the driver's
    occupancy calculator: registers, shared memory, warps)."""
    import cupy

    blocks = ctypes.c_int()
    with cupy.cuda.Device(device.index):
        function = getattr(kernel, "kernel", kernel)
        err = _cuda_driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(blocks), function.ptr, threads, 0)
    _check(err, "cuOccupancyMaxActiveBlocksPerMultiprocessor")
    return blocks.value


def active_clusters(kernel: Any, threads: int, shared_mem: int, cluster: tuple[int, ...],
                    device: torch.device) -> int:
    """Clusters of this shape (blocks of `threads` threads and shared_mem bytes of dynamic
    shared memory) that the GPU runs at once: the driver's count, which knows that a cluster's
    blocks must share one GPC."""
    import cupy

    count = ctypes.c_int()
    with cupy.cuda.Device(device.index):
        function = getattr(kernel, "kernel", kernel)
        attrs, n = _attributes(False, cluster)
        config = _LaunchConfig(grid=_dim3(cluster), block=_dim3((threads,)), shared_mem=shared_mem,
                               stream=None, num_attrs=n,
                               attrs=ctypes.cast(attrs, ctypes.POINTER(_LaunchAttribute)))
        err = _cuda_driver().cuOccupancyMaxActiveClusters(ctypes.byref(count), function.ptr,
                                                          ctypes.byref(config))
    _check(err, "cuOccupancyMaxActiveClusters")
    return count.value


_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute


def allow_dynamic_shared(kernel: Any, nbytes: int, device: torch.device) -> None:
    """Lets a compiled kernel launch with nbytes of dynamic shared memory (past 48 KiB the
    driver needs this opt-in, per function)."""
    import cupy

    with cupy.cuda.Device(device.index):
        function = getattr(kernel, "kernel", kernel)
        _check(_cuda_driver().cuFuncSetAttribute(function.ptr, _MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                 nbytes),
               "cuFuncSetAttribute")


def _launch_ex(function: int, grid: tuple[int, ...], block: tuple[int, ...], args: tuple,
               stream: int, shared_mem: int = 0, pdl: bool = True,
               cluster: tuple[int, ...] | None = None) -> None:
    attrs, count = _attributes(pdl, cluster)
    config = _LaunchConfig(grid=_dim3(grid), block=_dim3(block), shared_mem=shared_mem,
                           stream=stream, num_attrs=count,
                           attrs=ctypes.cast(attrs, ctypes.POINTER(_LaunchAttribute)))
    values = kernel_params(args)
    params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    _check(_cuda_driver().cuLaunchKernelEx(ctypes.byref(config), function, params, None),
           "cuLaunchKernelEx")


def _attributes(pdl: bool, cluster: tuple[int, ...] | None) -> tuple[ctypes.Array, int]:
    """The launch attributes (and how many are set): PDL's, then the cluster's shape."""
    attrs = (_LaunchAttribute * 2)()
    count = 0
    if pdl:
        attrs[count].id = _PROGRAMMATIC_STREAM_SERIALIZATION
        attrs[count].value[0] = 1  # programmaticStreamSerializationAllowed
        count += 1
    if cluster:
        attrs[count].id = _CLUSTER_DIMENSION
        attrs[count].value[:3] = list(_dim3(cluster))  # clusterDim x, y, z
        count += 1
    return attrs, count


def kernel_params(args: tuple) -> list:
    """The kernel's arguments as ctypes values of their exact C types (uint64 pointers, int32,
    int64, float32), for cuLaunchKernelEx's array of pointers to them. Only numpy scalars:
    a Python int has no C width to go by."""
    values = []
    for a in args:
        kind = _CTYPES.get(a.dtype) if isinstance(a, np.generic) else None
        if kind is None:
            raise TypeError(f"kernel arguments must be numpy scalars of {list(_CTYPES)}, got {a!r}")
        values.append(kind(a.item()))
    return values


def _dim3(d: tuple[int, ...]) -> ctypes.Array:
    return (ctypes.c_uint * 3)(*(tuple(d) + (1, 1, 1))[:3])


def _wrap(cupy: Any, stream: torch.cuda.Stream, device: torch.device) -> Any:
    """A CuPy stream for torch's `stream`: through the CUDA stream protocol (which torch's
    streams implement) where CuPy has it (14 on), else ExternalStream (deprecated in 14)."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, device.index)
