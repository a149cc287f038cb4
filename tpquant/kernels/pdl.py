"""Programmatic dependent launch (PDL): the decode step's kernels overlap their neighbours.

On Hopper and later, a kernel launched with PDL may start while the kernel before it in the
stream is still running. Every kernel of ours launched that way keeps one rule: before it
reads memory that the kernel before it may write, or writes anything, it waits for that kernel
to finish (`griddepcontrol.wait`; Triton's `gdc_wait`), and right after that wait it lets the
next kernel start (`launch_dependents`). A kernel starts only once the one before has passed
its own wait, so whatever was written two kernels back or earlier is complete, and may be read
before the wait: weights (the tiled GEMV's first weights, and int8's channel scales: a fence
keeps ptxas from moving the wait above them, note 44), the KV cache below a row's new position
(`decode_attention_rope`) and the residual stream (`triton_norm.add_rms_norm`'s
early_residual; note 46). What overlaps is the launch of each kernel, its blocks' start and
those loads with the end of the one before: a decode step runs ~300 short kernels back to
back (Llama-2-7B int4, one H200: 2.30 -> 2.09 ms a step; docs/design-notes.md, note 24).
Kernels without PDL (cuBLAS, NCCL, torch's) start after the kernel before them has finished,
as always, and so does a PDL kernel after them. CUTLASS's W8A8 GEMM and its weight-only GEMM
on the 64-token tile (cpp/mixed_input_gemm.cu says why only there) keep the rule too: their
producer warps wait before their first load, and their consumers let the next kernel start
after their last main loop.

`TPQUANT_PDL=0` in the environment, or `set_enabled(False)`, turns it off (benchmarks compare).
"""

from __future__ import annotations

import os

import torch

_enabled = os.environ.get("TPQUANT_PDL", "1") != "0"
_capable: dict[int, bool] = {}  # device index -> compute capability >= 9.0


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL."""
    if not _enabled or device.type != "cuda":
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _capable[index]


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = flag


def triton_args(device: torch.device) -> dict:
    """The keyword arguments of a Triton launch: the kernel's PDL constexpr and, with PDL,
    Triton's launch option. A kernel taking PDL runs

        if PDL:  # (module docstring of tpquant.kernels.pdl)
            gdc_wait()
            gdc_launch_dependents()

    (from triton.language.extra.cuda) before any store and before any load of what the kernel
    just before may write; only the loads the module docstring allows come earlier."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}
