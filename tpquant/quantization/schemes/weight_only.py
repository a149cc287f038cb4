"""Weight-only int8 / int4, symmetric per output channel: W ~= q * scale[:, None].

scale[out] = max_j |W[out, j]| / qmax (qmax 127 for int8, 7 for int4), from
numerics.symmetric_scale. The row maxima are the scheme's one statistic ("amax", indexed by
output feature), so a slice of rows quantizes on its own and a slice of columns needs only
the maxima of the full rows (base module docstring). Scales are stored in float32 whatever
`dtype` is: they are tiny ([out]) and float16 would add up to 2^-11 relative error to every
weight of a row.
`dtype` is the activation dtype the model runs in; the stored tensors do not depend on it.

Weights are kept in the tiled layout of `tpquant.kernels.tiles` (the order the tiled GEMV
reads, tensor "qweight_tiles" instead of "qweight") where `tiles` is set and the rank's shape
divides into tiles (`pack`; the rules in `codes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpquant.kernels.weight_only import dequantize_weight_only, weight_only_matmul
from tpquant.quantization import numerics
from tpquant.quantization.mode import QuantMode
from tpquant.quantization.packing import pack_int4
from tpquant.quantization.schemes.base import Scheme, Tensors, TensorSpec
from tpquant.quantization.schemes.codes import codes, codes_name, tile_codes


@dataclass(frozen=True)
class WeightOnly(Scheme):
    """qweight: int8 [out, in] (bits=8) or int4 packed uint8 [out, in/2] (bits=4), or (`pack`)
    qweight_tiles: the same bytes tiled; scale: float32 [out]."""

    bits: int = 8
    dtype: torch.dtype = torch.float16
    tiles: bool = True  # `pack` tiles qweight where the shape allows

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ValueError(f"WeightOnly bits must be 8 or 4, got {self.bits}")

    @property
    def mode(self) -> QuantMode:
        return QuantMode.use_weight_only(self.bits == 4)

    @property
    def qmax(self) -> int:
        return numerics.INT8_MAX if self.bits == 8 else numerics.INT4_MAX

    def specs(self, tensors: Tensors | None = None) -> dict[str, TensorSpec]:
        # A tiled tensor's in_dim is its shape only: tiles are made after sharding, and a
        # tile does not split along K (nothing shards or unshards "qweight_tiles").
        return {
            codes_name(tensors): TensorSpec(out_dim=0, in_dim=1, in_per_index=2 if self.bits == 4 else 1),
            "scale": TensorSpec(out_dim=0),
        }

    def statistic_specs(self) -> dict[str, TensorSpec]:
        return {"amax": TensorSpec(out_dim=0)}

    def statistics(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """amax[out] = max_j |W[out, j]| (over the columns given)."""
        _check_2d(weight)
        return {"amax": weight.float().abs().amax(dim=1)}

    def quantize(
        self, weight: torch.Tensor, *, statistics: Tensors | None = None
    ) -> dict[str, torch.Tensor]:
        _check_2d(weight)
        if self.bits == 4 and weight.shape[1] % 2:
            raise ValueError(
                f"int4 packs two input features per byte: in_features={weight.shape[1]} must be even"
            )
        w = weight.float()
        amax = (self.statistics(w) if statistics is None else statistics)["amax"]
        if amax.shape != (w.shape[0],):
            raise ValueError(f"statistics amax must be [out]={w.shape[0]}, got {tuple(amax.shape)}")
        scale = numerics.symmetric_scale(amax, self.qmax)  # [out]
        q = numerics.quantize_symmetric(w, scale[:, None], self.qmax)  # int8 [out, in]
        return {"qweight": pack_int4(q) if self.bits == 4 else q, "scale": scale}

    def pack(self, tensors: Tensors) -> dict[str, torch.Tensor]:
        """With `tiles`: qweight tiled (as "qweight_tiles") if [out, in] divides into tiles;
        already tiled tensors stay as they are."""
        return tile_codes(tensors, self.tiles, self.bits)

    def dequantize(self, tensors: Tensors) -> torch.Tensor:
        q, tiled = codes(tensors)
        return dequantize_weight_only(q, tensors["scale"], self.bits, tiled)

    def forward(
        self, x: torch.Tensor, tensors: Tensors, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, tiled = codes(tensors)
        return weight_only_matmul(x, q, tensors["scale"], self.bits, bias, tiled=tiled)


def _check_2d(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
