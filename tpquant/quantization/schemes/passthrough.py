"""Passthrough: the unquantized weight, stored in the model's float dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpquant.quantization.mode import QuantMode
from tpquant.quantization.schemes.base import Scheme, Tensors, TensorSpec


@dataclass(frozen=True)
class Passthrough(Scheme):
    """W[out, in] kept as it is, cast to `dtype` (fp16, bf16 or fp32)."""

    dtype: torch.dtype = torch.float16

    @property
    def mode(self) -> QuantMode:
        return QuantMode(0)

    def specs(self, tensors: Tensors | None = None) -> dict[str, TensorSpec]:
        return {"weight": TensorSpec(out_dim=0, in_dim=1)}

    def statistic_specs(self) -> dict[str, TensorSpec]:
        return {}  # nothing to combine: any slice is stored as it is

    def statistics(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def quantize(
        self, weight: torch.Tensor, *, statistics: Tensors | None = None
    ) -> dict[str, torch.Tensor]:
        if weight.dim() != 2:
            raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
        return {"weight": weight.to(self.dtype)}

    def dequantize(self, tensors: Tensors) -> torch.Tensor:
        return tensors["weight"].float()

    def forward(
        self, x: torch.Tensor, tensors: Tensors, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        w = tensors["weight"]
        if x.dtype == w.dtype:
            b = None if bias is None else bias.to(x.dtype)
            return torch.nn.functional.linear(x, w, b)
        # Mixed dtypes (e.g. fp32 activations in tests): float32 math, so the weight is used
        # exactly as stored instead of being rounded to x's dtype.
        b = None if bias is None else bias.float()
        return torch.nn.functional.linear(x.float(), w.float(), b).to(x.dtype)
