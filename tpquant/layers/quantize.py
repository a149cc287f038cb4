"""Activation quantizers as modules: per-token dynamic, or static with a calibrated scale."""

from __future__ import annotations

import torch
from torch import nn

from tpquant.kernels import w8a8


class QuantizePerToken(nn.Module):
    """x -> int8 with one scale per token (max |x_t| / 127), computed at run time."""

    def forward(self, x: torch.Tensor) -> w8a8.QuantizedActivation:
        return w8a8.QuantizedActivation(*w8a8.quantize_per_token(x))


class QuantizeTensor(nn.Module):
    """x -> int8 with one static scale from calibration."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(()))

    def forward(self, x: torch.Tensor) -> w8a8.QuantizedActivation:
        return w8a8.QuantizedActivation(w8a8.quantize_static(x, self.scale), self.scale)
