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

Quantizing a slice. A tensor-parallel rank holds rows (column style) or columns (row style)
of W. A scheme that declares `statistic_specs()` can quantize such a slice on its own: its
scales depend on the full W only through `statistics(W)`, named maxima over elements of W,
so the statistics of the whole are the elementwise max of the statistics of any slices
that cover it (exact, whatever the order), and

    quantize(W)[slice] == quantize(W[slice], statistics=statistics(W)[slice]).

Each statistic's `TensorSpec` says which axis of W it is indexed by: one indexed by the
axis a slice cuts is already complete on the slice (a per-row maximum of whole rows);
every other one must be combined over all slices. Who combines them (an all-reduce, or one
process reading the full weight) is the loader's business: schemes know nothing of ranks.
The default, `statistic_specs() -> None`, means "quantize needs the full weight".
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
        """Quantize a full-precision weight [out, in] into named tensors.

        A scheme with `statistic_specs()` also takes `statistics=`: those of the full weight
        when `weight` is a slice of it (module docstring); computed from `weight` if omitted.
        """

    def statistic_specs(self) -> dict[str, TensorSpec] | None:
        """Specs of the statistics `quantize` depends on beyond the slice it is given, by name
        ({} for none); None (the default): quantize needs the full weight."""
        return None

    def statistics(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The statistics named by `statistic_specs()` of a weight or a slice of one: maxima,
        so those of slices combine into the full weight's by an elementwise max."""
        raise NotImplementedError(f"{type(self).__name__} quantizes full weights only")

    def pack(self, tensors: Tensors) -> dict[str, torch.Tensor]:
        """One rank's tensors (after sharding) in the layout its kernels read; idempotent.
        `dequantize` and `forward` take either form, `specs` names either (for shape checks:
        packed tensors are never sharded). The default keeps them as they are."""
        return dict(tensors)

    @abstractmethod
    def dequantize(self, tensors: Tensors) -> torch.Tensor:
        """The float32 weight [out, in] that `forward` effectively multiplies by."""

    @abstractmethod
    def forward(
        self, x: torch.Tensor, tensors: Tensors, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y[..., out] = x[..., in] @ W^T + bias, in x's dtype."""
