"""Row-parallel linear: Y = X A + b with A split by rows and X by columns.

    A = [A_1; ...; A_p],  X = [X_1, ..., X_p],  Y = sum_i X_i A_i + b

Rank i holds A_i (its slice of the input features, for every tensor of the scheme) and
receives X_i, the split output of a column layer. The partial products are all-reduced and
the bias, replicated on every rank, is added once after the reduction.

With per-token activation scales (SmoothQuant) each rank quantizes its own slice X_i with
its own per-token scales and dequantizes its partial product before the sum. The sum is
then exact for the quantized slices, and each slice's scale is at least as tight as a
global one would be; it differs from TP 1's global per-token scale by rounding only
(DESIGN s6).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tpquant.collectives import Communicator
from tpquant.layers.linear import ShardedLinear


@dataclasses.dataclass(frozen=True)
class PartialSum:
    """A row layer's output before its all-reduce: the sum of `partial` over `comm`'s ranks,
    plus `bias`. Handed on as the residual stream's delta, it lets the RMSNorm after the layer
    reduce, add and normalize in one kernel (`Communicator.all_reduce_add_rms_norm`)."""

    partial: torch.Tensor
    comm: Communicator
    bias: torch.Tensor | None = None

    def __getitem__(self, index: Any) -> PartialSum:
        """The same rows of the output, still to be reduced (index the leading dims only)."""
        return PartialSum(self.partial[index], self.comm, self.bias)

    def resolve(self) -> torch.Tensor:
        """The layer's output."""
        y = self.comm.all_reduce(self.partial)
        return y if self.bias is None else y + self.bias


class RowLinear(ShardedLinear):
    style = "row"

    def forward(self, x: torch.Tensor, *, reduce: bool = True) -> torch.Tensor | PartialSum:
        """x: [..., in / tp], this rank's slice of the input features. reduce=False returns
        the PartialSum, its all-reduce and bias left to the consumer (the next RMSNorm)."""
        partial = PartialSum(self.local_forward(x, None), self.comm, self.bias)
        return partial.resolve() if reduce else partial

