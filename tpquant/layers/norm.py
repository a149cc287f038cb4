"""RMSNorm, and the SmoothQuant RMSNorm whose output is int8 for the W8A8 linear after it."""

from __future__ import annotations

import torch
from torch import nn

from tpquant.kernels import w8a8
from tpquant.kernels.norm import add_rms_norm, rms_norm
from tpquant.layers.row import PartialSum


class RmsNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, delta: torch.Tensor | PartialSum | None,
        early_residual: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, norm(s)) with s = x + delta (x when delta is None): the residual add before a
        pre-norm block, fused with the norm, and with a row layer's all-reduce when delta is
        its PartialSum. early_residual: x was written before the kernels of delta's layer (the
        residual stream), so the kernel may read it before its PDL wait
        (`tpquant.kernels.triton_norm.add_rms_norm`)."""
        if delta is None:
            return x, self(x)
        if isinstance(delta, PartialSum):
            if delta.bias is None:
                return delta.comm.all_reduce_add_rms_norm(delta.partial, x, self.weight,
                                                          self.eps, early_residual)
            delta = delta.resolve()
        return add_rms_norm(x, delta, self.weight, self.eps, early_residual=early_residual)


class SmoothQuantRmsNorm(RmsNorm):
    """RMSNorm fused with int8 quantization: per token, or with a static scale.

    The SmoothQuant factor of the layers it feeds is folded into `weight` (g / s), so its
    int8 output goes straight into their W8A8 GEMM (`QuantizedActivation`).
    """

    def __init__(self, hidden: int, eps: float = 1e-6, dtype: torch.dtype = torch.float16,
                 static_scale: torch.Tensor | None = None) -> None:
        super().__init__(hidden, eps, dtype)
        self.register_buffer("static_scale", None if static_scale is None else static_scale.float())

    def forward(self, x: torch.Tensor) -> w8a8.QuantizedActivation:
        q, scale = w8a8.rms_norm_quantize(x, self.weight, self.eps, self.static_scale)
        return w8a8.QuantizedActivation(q, scale)
