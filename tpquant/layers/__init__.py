"""Tensor-parallel layers: column/row linears for every scheme, norms, activation quantizers."""

from tpquant.layers.column import ColumnLinear
from tpquant.layers.row import RowLinear

__all__ = ["ColumnLinear", "RowLinear"]
