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

import torch

from tpquant.layers.linear import ShardedLinear


class RowLinear(ShardedLinear):
    style = "row"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in / tp], this rank's slice of the input features."""
        y = self.local_forward(x, None)  # partial sum, [..., out]
        if self.mapping.tp_size > 1:
            y = self.comm.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

