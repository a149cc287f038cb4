"""RMSNorm reference: float32 math whatever the input type, as the fused kernels do."""

from __future__ import annotations

import torch


def rms_norm_f32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in float32."""
    x = x.float()
    inv_rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x * inv_rms * weight.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32 math, returned in x's dtype."""
    return rms_norm_f32(x, weight, eps).to(x.dtype)
