"""What every quantization scheme provides, and how each of its tensors lies against W[out, in].

A scheme turns one full-precision weight W[out, in] into named tensors (`quantize`), turns
them back into the effective float weight (`dequantize`, for tests), and computes
y = x @ W^T + bias from them (`forward`, a torch reference that runs on CPU and CUDA and is
the oracle for the GPU kernels).

Each named tensor declares, through a `TensorSpec`, which of its dimensions runs along W's
output features and which along its input features. Sharding reads only these specs, so a
new scheme gets column and row parallelism without touching the parallel code (DESIGN s6):
column-parallel splits every tensor along its `out_dim` and replicates tensors without one;
row-parallel splits along `in_dim` and replicates the rest.

The contract the tests check for every scheme:
    forward(x, t) ~= x @ dequantize(t)^T + bias,
where `dequantize` folds in every input-side vector the scheme stores (pre-quant scale,
smoother), and differs from forward only by activation quantization, if the scheme has it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping

import torch

from tpquant.quantization.mode import QuantMode

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """Where W's two axes sit in one stored tensor.

    out_dim: the dimension indexed by output feature, or None (replicated under column TP).
    in_dim: the dimension indexed by input feature, or None (replicated under row TP).
    in_per_index: input features per index along in_dim: 1 for a plain weight, 2 for int4
        packed two to a byte, the group size for group scales. A row split needs every
        rank's in_features to be a multiple of it.
    """

    out_dim: int | None = None
    in_dim: int | None = None
    in_per_index: int = 1


class Scheme(ABC):
    """One kind of quantized weight. Schemes are small frozen dataclasses of their options."""

    #: the QuantMode this scheme implements
    mode: QuantMode
    #: the model's float type around the layer: activations, bias and outputs
    dtype: torch.dtype

    @abstractmethod
    def specs(self, tensors: Tensors | None = None) -> dict[str, TensorSpec]:
        """A spec for every tensor `quantize` returns, by name.

        Given the tensors, the specs of exactly those (a scheme whose layout depends on an
        option, e.g. a scalar or per-part weight scale, reads it from them).
        """

    @abstractmethod
    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize a full-precision weight [out, in] into named tensors."""

    @abstractmethod
    def dequantize(self, tensors: Tensors) -> torch.Tensor:
        """The float32 weight [out, in] that `forward` effectively multiplies by."""

    @abstractmethod
    def forward(
        self, x: torch.Tensor, tensors: Tensors, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y[..., out] = x[..., in] @ W^T + bias, in x's dtype."""
