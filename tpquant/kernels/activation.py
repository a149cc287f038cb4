"""SwiGLU's activation, silu(gate) * up, on the fused gate|up output of a column layer.

The Triton kernel (tpquant.kernels.triton_activation) on CUDA tensors in float16/bfloat16/
float32, torch otherwise; `path` forces one ("reference" or "triton").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate_up: torch.Tensor, *, path: str | None = None) -> torch.Tensor:
    """gate_up [..., 2I] (gate first, as `MLP.gate_up` lays it out) -> silu(gate) * up [..., I]."""
    from tpquant.kernels.w8a8 import TRITON, choose_path

    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate|up must have an even number of features, got {gate_up.shape[-1]}")
    if choose_path(path, gate_up) == TRITON:
        from tpquant.kernels import triton_activation

        return triton_activation.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
