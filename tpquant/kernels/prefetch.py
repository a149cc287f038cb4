"""L2 prefetch of a decode step's weights, beside the kernel before each GEMV (cpp/prefetch_l2.cu).

A decode-sized GEMV reads its weight once, from DRAM, and the kernel before it leaves DRAM
idle: at TP > 1 the all-reduce fused with the residual add and RMSNorm waits microseconds on
its peers (docs/design-notes.md, note 38). `prefetch_l2(w)`, launched just before the GEMV with
programmatic dependent launch, starts beside that kernel and has each of its blocks' TMA
fetch the first bytes of one stripe of w into L2; the GEMV then finds them there. It waits
for the kernel before it like every PDL kernel, after its prefetch, so nothing is read early.

`ShardedLinear.local_forward` calls `prefetch_for` before every linear. Off unless the GEMM is
decode-sized (at most PREFETCH_MAX_ROWS rows), PDL is on (Hopper and later) and CuPy is
there; PREFETCH_BYTES = 0 turns it off.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpquant.kernels import pdl
from tpquant.kernels.cupy_launch import launch

SOURCE = Path(__file__).resolve().parents[2] / "cpp" / "prefetch_l2.cu"
PREFETCH_BYTES = 16 << 20  # per weight, at most: what DRAM moves in ~4 us, under half the L2
PREFETCH_MAX_ROWS = 64  # decode batches; larger GEMMs are not bound by their weight's bytes
_UNIT = 16  # cp.async.bulk works in 16-byte units from 16-byte aligned addresses
_KERNELS: dict[int, Any] = {}


def prefetch_plan(nbytes: int, budget: int, stripes: int) -> tuple[int, int, int]:
    """(blocks, stripe, take) for prefetching at most `budget` of `nbytes` bytes (pure): the
    tensor cut into `stripes` stripes of `stripe` bytes (16-byte units, the last one shorter),
    block b taking the first `take` bytes of stripe b. Stripes rather than the tensor's first
    bytes, since the GEMV's blocks each read their own rows from the start: every block finds
    its first bytes in L2. (0, 0, 0) when there is nothing to fetch."""
    units = nbytes // _UNIT
    if units == 0 or budget < _UNIT or stripes < 1:
        return 0, 0, 0
    stripe = -(-units // stripes)  # units a stripe
    blocks = -(-units // stripe)
    take = min(stripe, max(1, budget // _UNIT // blocks))
    return blocks, stripe * _UNIT, take * _UNIT


def prefetch_for(x: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Prefetch the largest of a linear layer's `tensors` (its weight) into L2 if the GEMM
    that follows is decode-sized: `x` its input (a tensor, or anything holding one as `.q`)."""
    x = getattr(x, "q", x)
    if not isinstance(x, torch.Tensor) or not wanted(x.device, x.numel() // max(1, x.shape[-1])):
        return
    prefetch_l2(max(tensors.values(), key=lambda t: t.numel() * t.element_size()))


def wanted(device: torch.device, rows: int) -> bool:
    """Whether a GEMM of `rows` rows on `device` gets its weight prefetched."""
    return PREFETCH_BYTES > 0 and rows <= PREFETCH_MAX_ROWS and pdl.enabled(device) and _built()


@functools.cache
def _built() -> bool:
    """CuPy to compile with, and the source (a source checkout)."""
    return importlib.util.find_spec("cupy") is not None and SOURCE.is_file()


def prefetch_l2(t: torch.Tensor, budget: int | None = None) -> None:
    """Start bringing up to `budget` (default PREFETCH_BYTES) bytes of contiguous CUDA tensor
    `t` into L2, in stripes (`prefetch_plan`), as a PDL launch on torch's current stream.
    Changes nothing in memory; a tensor not 16-byte aligned is left alone."""
    if not t.is_cuda or not t.is_contiguous() or t.data_ptr() % _UNIT:
        return
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count
    blocks, stripe, take = prefetch_plan(t.numel() * t.element_size(),
                                         PREFETCH_BYTES if budget is None else budget, sms)
    if blocks == 0:
        return
    args = (np.uint64(t.data_ptr()), np.int64(t.numel() * t.element_size()), np.int64(stripe),
            np.int64(take))
    launch(_kernel(t.device), (blocks,), (32,), args, t.device, pdl=True)


def _kernel(device: torch.device) -> Any:
    if device.index not in _KERNELS:
        import cupy

        with cupy.cuda.Device(device.index):
            module = cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17",))
            _KERNELS[device.index] = module.get_function("tpq_prefetch_l2")
    return _KERNELS[device.index]
