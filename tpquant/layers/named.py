"""The familiar layer names (TensorRT-LLM's), as thin constructors that only pick the scheme.

All the tensor-parallel logic lives in `ColumnLinear` and `RowLinear`; these exist so that
code written against the familiar names reads the same here.
"""

from __future__ import annotations

import torch

from tpquant.layers.column import ColumnLinear
from tpquant.layers.row import RowLinear
from tpquant.quantization.schemes import Groupwise, SmoothQuant, WeightOnly


def SmoothQuantColumnLinear(in_features: int, out_features: int, mapping, comm, *, per_token: bool = True,
                            per_channel: bool = True, dtype: torch.dtype = torch.float16, **layer) -> ColumnLinear:
    scheme = SmoothQuant(per_token, per_channel, dtype)
    return ColumnLinear(in_features, out_features, scheme, mapping, comm, **layer)


def SmoothQuantRowLinear(in_features: int, out_features: int, mapping, comm, *, per_token: bool = True,
                         per_channel: bool = True, dtype: torch.dtype = torch.float16, **layer) -> RowLinear:
    scheme = SmoothQuant(per_token, per_channel, dtype)
    return RowLinear(in_features, out_features, scheme, mapping, comm, **layer)


def WeightOnlyQuantColumnLinear(in_features: int, out_features: int, mapping, comm, *, bits: int = 8,
                                dtype: torch.dtype = torch.float16, **layer) -> ColumnLinear:
    return ColumnLinear(in_features, out_features, WeightOnly(bits, dtype), mapping, comm, **layer)


def WeightOnlyQuantRowLinear(in_features: int, out_features: int, mapping, comm, *, bits: int = 8,
                             dtype: torch.dtype = torch.float16, **layer) -> RowLinear:
    return RowLinear(in_features, out_features, WeightOnly(bits, dtype), mapping, comm, **layer)


def WeightOnlyGroupwiseQuantColumnLinear(in_features: int, out_features: int, mapping, comm, *,
                                         group_size: int = 128, zeros: bool = True,
                                         pre_quant_scale: bool = False,
                                         dtype: torch.dtype = torch.float16, **layer) -> ColumnLinear:
    scheme = Groupwise(group_size, zeros, pre_quant_scale, dtype)
    return ColumnLinear(in_features, out_features, scheme, mapping, comm, **layer)


def WeightOnlyGroupwiseQuantRowLinear(in_features: int, out_features: int, mapping, comm, *,
                                      group_size: int = 128, zeros: bool = True,
                                      pre_quant_scale: bool = False,
                                      dtype: torch.dtype = torch.float16, **layer) -> RowLinear:
    scheme = Groupwise(group_size, zeros, pre_quant_scale, dtype)
    return RowLinear(in_features, out_features, scheme, mapping, comm, **layer)
