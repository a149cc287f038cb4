"""RMSNorm reference: float32 math whatever the input type, as the fused kernels do.

`rms_norm` and `add_rms_norm` take the Triton kernel (tpquant.kernels.triton_norm) on CUDA
tensors in float16/bfloat16/float32, the reference otherwise; `path` forces one ("reference" or
"triton").
"""

from __future__ import annotations

import torch


def rms_norm_f32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in float32."""
    x = x.float()
    inv_rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x * inv_rms * weight.float()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, path: str | None = None
) -> torch.Tensor:
    """RMSNorm in float32 math, returned in x's dtype."""
    # w8a8 imports this module for rms_norm_f32, so its path rule is imported here, late.
    from tpquant.kernels.w8a8 import TRITON, choose_path

    if choose_path(path, x, weight) == TRITON:
        from tpquant.kernels import triton_norm

        return triton_norm.rms_norm(x, weight, eps)
    return rms_norm_f32(x, weight, eps).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, *,
    path: str | None = None, early_residual: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, RMSNorm(s)) with s = x + delta in x's dtype: a residual add and the next norm, one
    kernel on CUDA. early_residual: see `triton_norm.add_rms_norm`."""
    from tpquant.kernels.w8a8 import TRITON, choose_path

    if choose_path(path, x, delta, weight) == TRITON:
        from tpquant.kernels import triton_norm

        return triton_norm.add_rms_norm(x, delta, weight, eps, early_residual=early_residual)
    s = x + delta
    return s, rms_norm_f32(s, weight, eps).to(x.dtype)
