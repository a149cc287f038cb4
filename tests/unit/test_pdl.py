"""tpquant.kernels.pdl: when kernels launch with programmatic dependent launch (CPU checks; the
GPU behaviour is tests/gpu/test_pdl_gpu.py)."""

from __future__ import annotations

import torch

from tpquant.kernels import pdl


def test_off_the_gpu_no_pdl() -> None:
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.triton_args(torch.device("cpu")) == {"PDL": False}


def test_on_by_capability_and_switch(monkeypatch) -> None:
    """Hopper (9.0) and later launch with PDL, an Ampere does not; set_enabled(False) (or
    TPQUANT_PDL=0 at import) turns it off everywhere."""
    capability = {0: (9, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability[index])
    monkeypatch.setattr(pdl, "_capable", {})
    monkeypatch.setattr(pdl, "_enabled", True)
    hopper, ampere = torch.device("cuda", 0), torch.device("cuda", 1)
    assert pdl.triton_args(hopper) == {"PDL": True, "launch_pdl": True}
    assert not pdl.enabled(ampere) and pdl.triton_args(ampere) == {"PDL": False}
    pdl.set_enabled(False)
    assert not pdl.enabled(hopper)
    pdl.set_enabled(True)
    assert pdl.enabled(hopper)


def test_launch_structs_match_the_cuda_driver_layout() -> None:
    """cupy_launch's ctypes mirrors of CUlaunchAttribute and CUlaunchConfig (cuda.h, CUDA 12
    and 13): a wrong offset would hand cuLaunchKernelEx garbage without an error here."""
    import ctypes

    from tpquant.kernels import cupy_launch as cl

    assert ctypes.sizeof(cl._LaunchAttribute) == 72  # id, 4 bytes padding, 64-byte union
    assert cl._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(cl._LaunchConfig) == 56
    offsets = {name: getattr(cl._LaunchConfig, name).offset
               for name in ("grid", "block", "shared_mem", "stream", "attrs", "num_attrs")}
    assert offsets == {"grid": 0, "block": 12, "shared_mem": 24, "stream": 32, "attrs": 40,
                       "num_attrs": 48}
    assert list(cl._dim3((5, 2))) == [5, 2, 1]


def test_kernel_params_keep_each_arguments_c_type() -> None:
    import ctypes

    import numpy as np
    import pytest

    from tpquant.kernels import cupy_launch as cl

    args = (np.uint64(2**40 + 3), np.int32(-7), np.int64(2**33), np.float32(0.5))
    values = cl.kernel_params(args)
    assert [type(v) for v in values] == [ctypes.c_uint64, ctypes.c_int32, ctypes.c_int64,
                                         ctypes.c_float]
    assert [v.value for v in values] == [2**40 + 3, -7, 2**33, 0.5]
    with pytest.raises(TypeError, match="numpy scalars"):
        cl.kernel_params((np.int32(1), 5))  # a Python int: which C width?


def test_pdl_launch_passes_grid_block_shared_memory_and_the_attribute(monkeypatch) -> None:
    """_launch_ex hands cuLaunchKernelEx the launch as given: grid, block, dynamic shared memory
    (probe_stream's rings), stream, one programmatic-stream-serialization attribute, and the
    arguments' values (a fake driver records them)."""
    import ctypes

    import numpy as np

    from tpquant.kernels import cupy_launch as cl

    seen = {}

    class FakeDriver:
        def cuLaunchKernelEx(self, config, function, params, extra):  # noqa: N802 - CUDA's name
            c = config._obj
            seen.update(grid=list(c.grid), block=list(c.block), shared_mem=c.shared_mem,
                        stream=c.stream, num_attrs=c.num_attrs, attr=(c.attrs[0].id,
                        c.attrs[0].value[0]), function=function,
                        first=ctypes.cast(params[0], ctypes.POINTER(ctypes.c_uint64))[0],
                        second=ctypes.cast(params[1], ctypes.POINTER(ctypes.c_int32))[0])
            return 0

    monkeypatch.setattr(cl, "_cuda_driver", lambda: FakeDriver())
    cl._launch_ex(1234, (7,), (160,), (np.uint64(2**35 + 1), np.int32(-3)), 99,
                  shared_mem=65536)
    assert seen == dict(grid=[7, 1, 1], block=[160, 1, 1], shared_mem=65536, stream=99,
                        num_attrs=1, attr=(6, 1), function=1234, first=2**35 + 1, second=-3)


def test_cluster_launch_passes_the_cluster_shape(monkeypatch) -> None:
    """A cluster launch (the staged GEMM's K splits) adds CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    (4) with the cluster's x, y, z after the PDL attribute, or alone without PDL."""
    import numpy as np

    from tpquant.kernels import cupy_launch as cl

    seen = []

    class FakeDriver:
        def cuLaunchKernelEx(self, config, function, params, extra):  # noqa: N802 - CUDA's name
            c = config._obj
            seen.append([(c.attrs[i].id, list(c.attrs[i].value[:3])) for i in range(c.num_attrs)])
            return 0

    monkeypatch.setattr(cl, "_cuda_driver", lambda: FakeDriver())
    cl._launch_ex(1, (32, 4), (256,), (np.int32(0),), 0, cluster=(1, 4, 1))
    cl._launch_ex(1, (32, 4), (256,), (np.int32(0),), 0, pdl=False, cluster=(1, 4))
    assert seen == [[(6, [1, 0, 0]), (4, [1, 4, 1])], [(4, [1, 4, 1])]]
