"""Column-parallel linear: Y = X A + b with A split by columns, A = [A_1, ..., A_p].

Rank i holds A_i (its slice of the output features, for every tensor of the scheme) and
b_i, and computes Y_i = X A_i + b_i. With `gather_output` the pieces are all-gathered back
into [..., out] in the original column order (`gather_columns`, the one implementation of
that rule); without it the output stays split, ready for a row-parallel layer (the MLP
pattern: no communication between the two).
"""

from __future__ import annotations

from typing import Sequence

import torch

from tpquant.collectives import Communicator, gather_columns
from tpquant.layers.linear import ShardedLinear
from tpquant.parallel.mapping import Mapping
from tpquant.quantization.schemes.base import Scheme


class ColumnLinear(ShardedLinear):
    style = "column"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: Scheme,
        mapping: Mapping,
        comm: Communicator,
        bias: bool = False,
        gather_output: bool = True,
        part_sizes: Sequence[int] | None = None,
    ) -> None:
        """`part_sizes`: output sizes of fused parts (q, k, v or gate, up), each split on its own."""
        super().__init__(in_features, out_features, scheme, mapping, comm, bias, part_sizes)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_forward(x, self.bias)  # [..., out / tp]
        if self.gather_output and self.mapping.tp_size > 1:
            if self.part_sizes:
                raise ValueError("gather_output of a fused layer would interleave its parts")
            y = gather_columns(y, self.comm)  # [..., out]
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gather_output={self.gather_output}"

