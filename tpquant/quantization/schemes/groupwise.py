"""Groupwise INT4 (GPTQ/AWQ style): one scale (and zero) per `group_size` input channels per row.

For output row o and group k (input columns k*g .. k*g+g-1):
    zeros=True:  q in 0..15,  W'[o, j] ~= (q - zeros[k, o]) * scales[k, o]   (float zero points,
                 numerics.asymmetric_params: the range always contains 0)
    zeros=False: q in -8..7,  W'[o, j] ~= q * scales[k, o], scales = amax / 7
A group's scale and zero depend on that group alone, so any slice of whole groups (what the
sharding rules cut) quantizes on its own: the scheme declares no statistics.
where W' = W / pre_quant_scale[None, :] when the scheme has a pre-quant scale (AWQ): the
caller passes p[in] to `quantize`, W / p is quantized, and forward computes
(x * p) @ W'^T, which is x @ W^T again. Without one, W' = W.

Stored: qweight packed uint8 [out, in/2] (low nibble = even column), scales float32 [in/g, out],
zeros float32 [in/g, out], pre_quant_scale float32 [in]. Scales and zeros are [in/g, out]
(not [out, in/g]) as the GEMV kernels read them: one contiguous row of scales per group.
As `WeightOnly` does for int4 per channel, `pack` keeps qweight in the tiled layout of
`tpquant.kernels.tiles` (tensor "qweight_tiles") where `tiles` is set, the scheme has no
pre-quant scale (the tiled GEMV does not multiply x), groups hold whole 64-feature k-tiles and
the rank's shape divides into tiles.
`dtype` is the activation dtype the model runs in; the stored tensors do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpquant.kernels.tiles import groups_tile
from tpquant.kernels.weight_only import dequantize_groupwise, groupwise_matmul
from tpquant.quantization import numerics
from tpquant.quantization.mode import QuantMode
from tpquant.quantization.packing import pack_int4
from tpquant.quantization.schemes.base import Scheme, Tensors, TensorSpec
from tpquant.quantization.schemes.codes import codes, codes_name, tile_codes


@dataclass(frozen=True)
class Groupwise(Scheme):
    group_size: int = 128
    zeros: bool = True
    pre_quant_scale: bool = False
    dtype: torch.dtype = torch.float16
    tiles: bool = True  # `pack` tiles qweight where the scheme and shape allow

    def __post_init__(self) -> None:
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def mode(self) -> QuantMode:
        return QuantMode.use_weight_only(True, per_group=True)

    def specs(self, tensors: Tensors | None = None) -> dict[str, TensorSpec]:
        group = TensorSpec(out_dim=1, in_dim=0, in_per_index=self.group_size)
        specs = {codes_name(tensors): TensorSpec(out_dim=0, in_dim=1, in_per_index=2),
                 "scales": group}
        if self.zeros:
            specs["zeros"] = group
        if self.pre_quant_scale:
            specs["pre_quant_scale"] = TensorSpec(in_dim=0)
        return specs

    def statistic_specs(self) -> dict[str, TensorSpec]:
        # [out, in/g], one value per group: every slice the sharding rules cut holds whole
        # groups, so a slice's statistics are complete on it.
        per_group = TensorSpec(out_dim=0, in_dim=1, in_per_index=self.group_size)
        names = ("group_min", "group_max") if self.zeros else ("group_amax",)
        return {name: per_group for name in names}

    def statistics(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each group's min and max (zeros) or max|W| (no zeros), float32 [out, in/g]."""
        groups = self._groups(weight.float())
        if self.zeros:
            return {"group_min": groups.amin(dim=-1), "group_max": groups.amax(dim=-1)}
        return {"group_amax": groups.abs().amax(dim=-1)}

    def _groups(self, w: torch.Tensor) -> torch.Tensor:
        out_features, in_features = w.shape
        if in_features % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide in_features={in_features}"
            )
        return w.reshape(out_features, in_features // self.group_size, self.group_size)

    def quantize(
        self,
        weight: torch.Tensor,
        *,
        pre_quant_scale: torch.Tensor | None = None,
        statistics: Tensors | None = None,
    ) -> dict[str, torch.Tensor]:
        """statistics: `statistics()` of the weight to take the grid from (GPTQ hands over
        the groups it fitted); by default the weight's own."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        if in_features % 2:
            raise ValueError(
                f"int4 packs two input features per byte: in_features={in_features} must be even"
            )
        w = weight.float()
        tensors: dict[str, torch.Tensor] = {}
        if self.pre_quant_scale:
            p = _pre_quant_scale(pre_quant_scale, in_features, w.device)
            w = w / p  # quantize W / p; forward multiplies x by p
            tensors["pre_quant_scale"] = p
        elif pre_quant_scale is not None:
            raise ValueError(
                "pre_quant_scale was passed but this Groupwise scheme has pre_quant_scale=False"
            )

        groups = self._groups(w)  # [out, in/g, g]
        if pre_quant_scale is not None and statistics is not None:
            raise ValueError("statistics are of the weight divided by pre_quant_scale: "
                             "pass one or the other")
        stats = self.statistics(w) if statistics is None else statistics
        if self.zeros:
            scale, zero = numerics.asymmetric_params(stats["group_min"], stats["group_max"])
            q = numerics.quantize_asymmetric(groups, scale[..., None], zero[..., None])
            tensors["zeros"] = zero.t().contiguous()
        else:
            scale = numerics.symmetric_scale(stats["group_amax"], numerics.INT4_MAX)
            q = numerics.quantize_symmetric(groups, scale[..., None], numerics.INT4_MAX)
        tensors["qweight"] = pack_int4(q.reshape(out_features, in_features))
        tensors["scales"] = scale.t().contiguous()  # [out, in/g] -> [in/g, out]
        return {k: tensors[k] for k in self.specs()}

    def pack(self, tensors: Tensors) -> dict[str, torch.Tensor]:
        """qweight tiled (as "qweight_tiles") where `tiles` is set, there is no pre-quant scale,
        groups hold a power of two of k-tiles (`groups_tile`) and [out, in] divides into
        tiles; tiled tensors stay."""
        return tile_codes(tensors, self.tiles and not self.pre_quant_scale
                          and groups_tile(self.group_size), 4)

    def dequantize(self, tensors: Tensors) -> torch.Tensor:
        q, tiled = codes(tensors)
        return dequantize_groupwise(
            q,
            tensors["scales"],
            tensors["zeros"] if self.zeros else None,
            self.group_size,
            tensors["pre_quant_scale"] if self.pre_quant_scale else None,
            tiled=tiled,
        )

    def forward(
        self, x: torch.Tensor, tensors: Tensors, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, tiled = codes(tensors)
        return groupwise_matmul(
            x,
            q,
            tensors["scales"],
            tensors["zeros"] if self.zeros else None,
            self.group_size,
            tensors["pre_quant_scale"] if self.pre_quant_scale else None,
            bias,
            tiled=tiled,
        )


def _pre_quant_scale(
    p: torch.Tensor | None, in_features: int, device: torch.device
) -> torch.Tensor:
    """The AWQ vector as float32 [in]; ones when none is given. Must be positive and finite."""
    if p is None:
        return torch.ones(in_features, dtype=torch.float32, device=device)
    if p.shape != (in_features,):
        raise ValueError(f"pre_quant_scale must be [in]={in_features}, got {tuple(p.shape)}")
    p = p.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(p).all() and (p > 0).all()):
        raise ValueError("pre_quant_scale must be positive and finite (W is divided by it)")
    return p
