"""Quantization schemes: one per kind of quantized weight, all behind the `Scheme` contract."""

from __future__ import annotations

import torch

from tpquant.quantization.mode import QuantMode
from tpquant.quantization.schemes.base import Scheme, TensorSpec
from tpquant.quantization.schemes.groupwise import Groupwise
from tpquant.quantization.schemes.passthrough import Passthrough
from tpquant.quantization.schemes.w8a8 import SmoothQuant
from tpquant.quantization.schemes.weight_only import WeightOnly

__all__ = [
    "Scheme", "TensorSpec", "Passthrough", "WeightOnly", "Groupwise", "SmoothQuant", "scheme_for_mode",
]

# KV-cache flags say how attention caches are stored; they do not change how linears'
# weights are quantized, so the weight scheme ignores them.
_KV_CACHE = QuantMode.INT8_KV_CACHE | QuantMode.FP8_KV_CACHE
_SMOOTHQUANT_FLAGS = (
    QuantMode.INT8_WEIGHTS | QuantMode.ACTIVATIONS | QuantMode.PER_TOKEN | QuantMode.PER_CHANNEL
)


def scheme_for_mode(
    mode: QuantMode,
    *,
    group_size: int = 128,
    dtype: torch.dtype = torch.float16,
    zeros: bool = True,
    pre_quant_scale: bool = False,
) -> Scheme:
    """The scheme that quantizes linear weights for `mode`; ValueError for a mode without one.

    group_size, zeros and pre_quant_scale apply to groupwise int4 only.
    """
    base = QuantMode(mode & ~_KV_CACHE & QuantMode.VALID_FLAGS)
    if base == QuantMode(0):
        return Passthrough(dtype=dtype)
    if base == QuantMode.use_weight_only():
        return WeightOnly(bits=8, dtype=dtype)
    if base == QuantMode.use_weight_only(use_int4_weights=True):
        return WeightOnly(bits=4, dtype=dtype)
    if base == QuantMode.use_weight_only(use_int4_weights=True, per_group=True):
        return Groupwise(
            group_size=group_size, zeros=zeros, pre_quant_scale=pre_quant_scale, dtype=dtype
        )
    if base.has_act_and_weight_quant() and not (base & ~_SMOOTHQUANT_FLAGS):
        return SmoothQuant(
            per_token=base.has_per_token_dynamic_scaling(),
            per_channel=base.has_per_channel_scaling(),
            dtype=dtype,
        )
    raise ValueError(f"no weight scheme for QuantMode {mode!r} ({int(mode):#x})")
