"""Collectives over the ranks of one tensor-parallel group.

`Communicator` is the one interface layers use; two backends implement it:

- `NcclCommunicator` (GPU): CuPy's NCCL binding on torch CUDA tensors, by
  pointer, on torch's current stream. The NCCL unique id is made on rank 0
  and broadcast over MPI. Its all_reduce takes the custom IPC all-reduce
  (`tpquant.parallel.custom_allreduce`) where that is faster, by
  `choose_all_reduce`; ``all_reduce=`` or ``$TPQUANT_ALLREDUCE`` forces a path.
- `MpiCommunicator` (CPU): mpi4py's buffer methods on the tensors' memory.
  What CI runs; a real backend, not a mock.

`SingleProcessCommunicator` serves world size 1 without touching MPI.

Common rules (implemented once, in `Communicator`):

- At world size 1 every tensor collective is a no-op that returns its input
  (`all_gather` returns ``t.unsqueeze(0)``, a view of the input).
- `all_reduce` and `broadcast` work in place on `t` and return `t`. A
  non-contiguous `t` is copied to a contiguous buffer, reduced there and copied
  back. `all_gather` returns a new ``[world_size, *t.shape]`` tensor, rank r's
  piece at index r.
- Ops are ``"sum"`` and ``"max"``.
- `broadcast_object` carries small JSON values (dict, list, str, int, float,
  bool, None) as JSON bytes: nothing is unpickled. Tuples come back as lists
  and dict keys as strings, at every world size (the round trip is done at
  world size 1 too, so code cannot depend on a world-1 shortcut).
- `barrier` is a host-side MPI barrier; it does not wait for queued GPU work.
- `check` raises if an earlier asynchronous collective failed (a custom
  all-reduce that timed out waiting for a rank); `synchronize` waits for this
  rank's queued GPU work, then checks. Both are no-ops on the CPU.
- `all_reduce_add_rms_norm` is a row layer's all-reduce followed by the
  residual add and RMSNorm of the block after it: all_reduce, then
  `tpquant.kernels.norm.add_rms_norm`, except where `NcclCommunicator` runs
  the three as one custom kernel (`fuses_norm`; ``$TPQUANT_ALLREDUCE_NORM=0``
  turns that off, for benchmarks).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch

from tpquant.kernels.norm import add_rms_norm
from tpquant.parallel import custom_allreduce
from tpquant.parallel.custom_allreduce import (
    CustomAllReduce,
    add_norm_fits,
    add_norm_pays,
    add_norm_wanted,
    all_reduce_mode,
    choose_all_reduce,
)
from tpquant.parallel.mapping import Mapping

_OPS = ("sum", "max")

# ncclDataType_t / ncclRedOp_t values from nccl.h (a stable ABI); older CuPy
# lacks NCCL_BFLOAT16, so the table does not depend on CuPy's constants.
_NCCL_DTYPES = {
    torch.int8: 0,
    torch.uint8: 1,
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
}
_NCCL_UINT8 = 1
_NCCL_OPS = {"sum": 0, "max": 2}

# dtypes MPI reduces directly through their numpy view. float16/bfloat16 are
# summed in float32 and rounded once at the end (bfloat16 has no numpy dtype,
# and this keeps half-precision sums accurate).
_MPI_REDUCE_DTYPES = (
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
)


class Communicator:
    """Collectives over `world_size` ranks; this process is `rank`.

    Backends implement the underscored hooks, which are only called with
    world_size > 1, non-empty contiguous tensors and checked arguments.
    """

    rank: int
    world_size: int

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `t` over all ranks with `op` ("sum" or "max"), in place; returns `t`."""
        if op not in _OPS:
            raise ValueError(f"op must be one of {_OPS}, got {op!r}")
        if self.world_size == 1 or t.numel() == 0:
            return t
        buf = t if t.is_contiguous() else t.contiguous()
        self._all_reduce(buf, op)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_reduce_add_rms_norm(
        self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
        early_residual: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, RMSNorm(s)) with s = residual + the sum of `partial` over all ranks: a row
        layer's all-reduce, the residual add and the next norm. `partial` may be overwritten.
        early_residual: see `tpquant.kernels.triton_norm.add_rms_norm`."""
        return add_rms_norm(residual, self.all_reduce(partial), weight, eps,
                            early_residual=early_residual)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` stacked on a new leading dim: ``[world_size, *t.shape]``."""
        if self.world_size == 1:
            return t.unsqueeze(0)
        out = torch.empty((self.world_size, *t.shape), dtype=t.dtype, device=t.device)
        if t.numel() > 0:
            self._all_gather(t.contiguous(), out)
        return out

    def broadcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Copy rank `root`'s `t` into every rank's `t`, in place; returns `t`."""
        self._check_root(root)
        if self.world_size == 1 or t.numel() == 0:
            return t
        buf = t if t.is_contiguous() else t.contiguous()
        self._broadcast(buf, root)
        if buf is not t:
            t.copy_(buf)
        return t

    def broadcast_object(self, obj: Any = None, root: int = 0) -> Any:
        """Rank `root`'s JSON-serializable `obj` on every rank (others pass anything).

        If `obj` does not serialize, `root` raises TypeError/ValueError and the
        other ranks RuntimeError, instead of leaving them waiting.
        """
        self._check_root(root)
        data, error = None, None
        if self.rank == root:
            try:
                data = json.dumps(obj, allow_nan=False).encode()
            except (TypeError, ValueError) as e:
                error = e
        data = self._broadcast_bytes(data, root)
        if error is not None:
            raise error
        if data is None:
            raise RuntimeError(f"broadcast_object: rank {root} could not serialize its object")
        return json.loads(data)

    def barrier(self) -> None:
        """Return once every rank has called barrier (host side only)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise if an earlier asynchronous collective failed; nothing to check here."""

    def synchronize(self) -> None:
        """Wait for this rank's queued collectives, then `check`; nothing queued here."""
        self.check()

    def _check_root(self, root: int) -> None:
        if not 0 <= root < self.world_size:
            raise ValueError(f"root must be in [0, {self.world_size}), got {root}")

    # Backend hooks.
    def _all_reduce(self, buf: torch.Tensor, op: str) -> None:
        raise NotImplementedError

    def _all_gather(self, src: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError

    def _broadcast(self, buf: torch.Tensor, root: int) -> None:
        raise NotImplementedError

    def _broadcast_bytes(self, data: bytes | None, root: int) -> bytes | None:
        """Root's `data` on every rank; None from root means "failed", on every rank."""
        raise NotImplementedError


class SingleProcessCommunicator(Communicator):
    """World size 1: every collective is a no-op; needs no MPI."""

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1

    def barrier(self) -> None:
        pass

    def _broadcast_bytes(self, data: bytes | None, root: int) -> bytes | None:
        return data


def _mpi_broadcast_bytes(mpi_comm: Any, data: bytes | None, root: int) -> bytes | None:
    """Length, then payload, with the uppercase (buffer) Bcast: no pickle on the wire."""
    import numpy as np

    is_root = mpi_comm.Get_rank() == root
    size = np.array([-1 if data is None else len(data)] if is_root else [0], dtype=np.int64)
    mpi_comm.Bcast(size, root=root)
    if size[0] < 0:
        return None
    buf = np.frombuffer(data, dtype=np.uint8).copy() if is_root else np.empty(size[0], np.uint8)
    mpi_comm.Bcast(buf, root=root)
    return buf.tobytes()


def _numpy_view(t: torch.Tensor) -> Any:
    """Flat numpy array sharing `t`'s memory (t contiguous, on the CPU)."""
    return t.detach().reshape(-1).numpy()


def _bytes_view(t: torch.Tensor) -> Any:
    """Flat uint8 numpy view of `t`'s memory: moves any dtype, bfloat16 included."""
    return _numpy_view(t.detach().reshape(-1).view(torch.uint8))


class MpiCommunicator(Communicator):
    """CPU collectives with mpi4py's buffer methods (Allreduce/Allgather/Bcast).

    Tensors must be on the CPU. all_gather and broadcast move raw bytes, so any
    dtype works. all_reduce takes float32/64 and int8/16/32/64 and uint8
    directly; float16 and bfloat16 are reduced in float32 and rounded once.
    """

    def __init__(self, mpi_comm: Any) -> None:
        from mpi4py import MPI

        self.mpi_comm = mpi_comm
        self.rank, self.world_size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self._mpi_ops = {"sum": MPI.SUM, "max": MPI.MAX}
        self._in_place = MPI.IN_PLACE

    def barrier(self) -> None:
        self.mpi_comm.Barrier()

    def _all_reduce(self, buf: torch.Tensor, op: str) -> None:
        _require_cpu(buf)
        if buf.dtype in (torch.float16, torch.bfloat16):
            acc = buf.float()
            self.mpi_comm.Allreduce(self._in_place, _numpy_view(acc), op=self._mpi_ops[op])
            buf.copy_(acc)
        elif buf.dtype in _MPI_REDUCE_DTYPES:
            self.mpi_comm.Allreduce(self._in_place, _numpy_view(buf), op=self._mpi_ops[op])
        else:
            raise TypeError(f"MpiCommunicator.all_reduce does not support {buf.dtype}")

    def _all_gather(self, src: torch.Tensor, out: torch.Tensor) -> None:
        _require_cpu(src)
        self.mpi_comm.Allgather(_bytes_view(src), _bytes_view(out))

    def _broadcast(self, buf: torch.Tensor, root: int) -> None:
        _require_cpu(buf)
        self.mpi_comm.Bcast(_bytes_view(buf), root=root)

    def _broadcast_bytes(self, data: bytes | None, root: int) -> bytes | None:
        return _mpi_broadcast_bytes(self.mpi_comm, data, root)


def _require_cpu(t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"MpiCommunicator needs CPU tensors, got one on {t.device}")


class NcclCommunicator(Communicator):
    """GPU collectives through CuPy's NCCL binding, on torch CUDA tensors.

    Each op is enqueued on ``torch.cuda.current_stream(device)`` by pointer,
    with no host synchronization; all_reduce and broadcast of contiguous
    tensors allocate nothing, so they can be captured in a CUDA graph (warm an
    op up once outside the capture: NCCL connects lazily on first use).
    all_gather allocates its output from torch's caching allocator.

    all_reduce dtypes: float32/16/64, bfloat16, int8, uint8, int32, int64.
    NCCL rounds half-precision partial sums at each step, so fp16/bf16 results
    can differ from MpiCommunicator's by a few ulps at world size > 2.
    all_gather and broadcast move raw bytes (any dtype).

    all_reduce sums of float32/float16/bfloat16 go through the custom IPC
    all-reduce (`custom`, fp32 accumulation in rank order, bitwise equal on all
    ranks) where `algorithm_for` says so: `all_reduce` ("auto", "nccl",
    "oneshot", "twoshot", "push"; default ``$TPQUANT_ALLREDUCE``, else "auto") and the
    message size decide. Without peer access between the GPUs it is NCCL.

    mpi_comm (mpi4py) carries the NCCL id, broadcast_object and barrier.
    """

    def __init__(
        self, mpi_comm: Any, device: torch.device | str, all_reduce: str | None = None
    ) -> None:
        from cupy.cuda import nccl  # lazy: CuPy is only needed on GPUs

        self.mpi_comm = mpi_comm
        self.rank, self.world_size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self.all_reduce_mode = all_reduce_mode(all_reduce, os.environ)
        self.add_norm = add_norm_wanted(os.environ)
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"NcclCommunicator needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        # The 128-byte id is bytes in CuPy >= 14 and a tuple of C chars (signed
        # or not, by platform) before: JSON carries either exactly, tagged.
        msg = None
        if self.rank == 0:
            uid = nccl.get_unique_id()
            msg = {"bytes": isinstance(uid, bytes), "id": list(uid)}
        msg = self.broadcast_object(msg, root=0)
        uid = bytes(msg["id"]) if msg["bytes"] else tuple(msg["id"])
        with torch.cuda.device(device):
            self._nccl = nccl.NcclCommunicator(self.world_size, uid, self.rank)
        self.custom: CustomAllReduce | None = None
        wanted = self.all_reduce_mode != "nccl"
        if wanted and 2 <= self.world_size <= custom_allreduce.MAX_RANKS:
            try:
                custom = CustomAllReduce(mpi_comm, device)
            except RuntimeError as e:  # raised on every rank alike (agreed over MPI)
                if self.all_reduce_mode != "auto":
                    raise
                warnings.warn(f"custom all-reduce unavailable, using NCCL: {e}", stacklevel=2)
                return
            if custom.reachable:
                self.custom = custom
            elif self.all_reduce_mode != "auto":
                warnings.warn(
                    f"all-reduce mode {self.all_reduce_mode!r}: the custom all-reduce cannot "
                    f"run ({custom.unreachable_reason}); using NCCL",
                    stacklevel=2,
                )

    def barrier(self) -> None:
        self.mpi_comm.Barrier()

    def check(self) -> None:
        if self.custom is not None:
            self.custom.check()

    def synchronize(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()
        self.check()

    def algorithm_for(self, t: torch.Tensor, op: str = "sum") -> str:
        """"oneshot", "twoshot", "push" or "nccl": the path all_reduce takes for `t` and `op`."""
        custom = self.custom
        return choose_all_reduce(
            self.all_reduce_mode,
            nbytes=t.numel() * t.element_size(),
            world_size=self.world_size,
            dtype=t.dtype,
            op=op,
            contiguous=t.is_contiguous(),
            custom_available=custom is not None,
            capacity_bytes=custom.capacity_bytes if custom is not None else 0,
            push_bytes=custom.push_bytes if custom is not None else 0,
        )

    def fuses_norm(self, partial: torch.Tensor, residual: torch.Tensor,
                   weight: torch.Tensor) -> bool:
        """Whether all_reduce_add_rms_norm runs as one custom kernel (`_fused_norm_path`)."""
        return self._fused_norm_path(partial, residual, weight) is not None

    def _fused_norm_path(self, partial: torch.Tensor, residual: torch.Tensor,
                         weight: torch.Tensor) -> str | None:
        """The all-reduce of the fused kernel, or None: where all_reduce would take the
        one-shot or push kernel, the tensors fit it (`add_norm_fits`) and it is the faster
        (`add_norm_pays`: decode batches)."""
        if not self.add_norm:
            return None
        algorithm = self.algorithm_for(partial)
        if algorithm not in ("oneshot", "push") or not add_norm_fits(partial, residual, weight):
            return None
        row_bytes = partial.shape[-1] * partial.element_size()
        pays = add_norm_pays(partial.numel() // partial.shape[-1], row_bytes, self.world_size,
                             self.custom.threads, self.custom.max_blocks)
        return algorithm if pays else None

    def all_reduce_add_rms_norm(
        self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
        early_residual: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        algorithm = self._fused_norm_path(partial, residual, weight)
        if algorithm is not None:  # the custom kernel checks the device
            return self.custom.all_reduce_add_rms_norm(partial, residual, weight, eps, algorithm)
        return super().all_reduce_add_rms_norm(partial, residual, weight, eps, early_residual)

    def _stream(self, t: torch.Tensor) -> int:
        if t.device != self.device:
            raise ValueError(f"NcclCommunicator is on {self.device}, the tensor on {t.device}")
        return torch.cuda.current_stream(self.device).cuda_stream

    def _all_reduce(self, buf: torch.Tensor, op: str) -> None:
        stream = self._stream(buf)
        # A custom all-reduce that timed out means a rank is gone: NCCL would hang on it.
        self.check()
        algorithm = self.algorithm_for(buf, op)
        if algorithm != "nccl":
            self.custom.all_reduce(buf, algorithm)
            return
        dtype = _NCCL_DTYPES.get(buf.dtype)
        if dtype is None:
            raise TypeError(f"NcclCommunicator.all_reduce does not support {buf.dtype}")
        ptr = buf.data_ptr()
        self._nccl.allReduce(ptr, ptr, buf.numel(), dtype, _NCCL_OPS[op], stream)

    def _all_gather(self, src: torch.Tensor, out: torch.Tensor) -> None:
        nbytes = src.numel() * src.element_size()
        stream = self._stream(src)
        self._nccl.allGather(src.data_ptr(), out.data_ptr(), nbytes, _NCCL_UINT8, stream)

    def _broadcast(self, buf: torch.Tensor, root: int) -> None:
        nbytes = buf.numel() * buf.element_size()
        self._nccl.bcast(buf.data_ptr(), nbytes, _NCCL_UINT8, root, self._stream(buf))

    def _broadcast_bytes(self, data: bytes | None, root: int) -> bytes | None:
        return _mpi_broadcast_bytes(self.mpi_comm, data, root)


def make_communicator(
    mapping: Mapping, device: torch.device | str, all_reduce: str | None = None
) -> Communicator:
    """The communicator of this rank's tensor-parallel group.

    tp_size 1: SingleProcessCommunicator (no MPI). Otherwise the group is
    ``mapping.tp_size`` consecutive ranks of mpi4py's COMM_WORLD: NCCL on a
    CUDA `device` (which becomes the current CUDA device), MPI on the CPU.
    `all_reduce` ("auto", "nccl", "oneshot", "twoshot", "push"; default
    ``$TPQUANT_ALLREDUCE``, else "auto") picks the GPU all-reduce path; the
    CPU backend has one path and only checks the value.
    """
    if all_reduce is not None:
        all_reduce_mode(all_reduce, {})  # a bad value is an error on every backend
    if mapping.tp_size == 1:
        return SingleProcessCommunicator()
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() != mapping.world_size or world.Get_rank() != mapping.rank:
        raise ValueError(
            f"MPI's COMM_WORLD is rank {world.Get_rank()} of {world.Get_size()}, the mapping "
            f"says rank {mapping.rank} of {mapping.world_size}: launch with mpirun -n "
            f"{mapping.world_size}"
        )
    group = world
    if mapping.tp_size != mapping.world_size:
        group = world.Split(color=mapping.rank // mapping.tp_size, key=mapping.tp_rank)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return NcclCommunicator(group, device, all_reduce)
    return MpiCommunicator(group)


def gather_columns(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Join the column-parallel pieces ``[..., out/N]`` of all ranks into ``[..., out]``.

    Rank r holds columns ``[r*out/N, (r+1)*out/N)``. all_gather stacks the
    pieces as ``[N, ..., out/N]``; moving N next to the last dim gives
    ``[..., N, out/N]``, whose reshape is the columns in their original order.
    Returns `x` itself at world size 1.
    """
    if comm.world_size == 1:
        return x
    pieces = comm.all_gather(x)  # [N, ..., out/N]
    return pieces.movedim(0, -2).reshape(*x.shape[:-1], -1)  # [..., N*out/N]
