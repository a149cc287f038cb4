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
`dtype` is the activation dtype the model runs in; the stored tensors do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpquant.kernels.weight_only import dequantize_groupwise, groupwise_matmul
from tpquant.quantization import numerics
from tpquant.quantization.mode import QuantMode
from tpquant.quantization.packing import pack_int4
from tpquant.quantization.schemes.base import Scheme, Tensors, TensorSpec


@dataclass(frozen=True)
class Groupwise(Scheme):
    group_size: int = 128
    zeros: bool = True
    pre_quant_scale: bool = False
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def mode(self) -> QuantMode:
        return QuantMode.use_weight_only(True, per_group=True)

    def specs(self, tensors: Tensors | None = None) -> dict[str, TensorSpec]:
        group = TensorSpec(out_dim=1, in_dim=0, in_per_index=self.group_size)
        specs = {"qweight": TensorSpec(out_dim=0, in_dim=1, in_per_index=2), "scales": group}
        if self.zeros:
            specs["zeros"] = group
        if self.pre_quant_scale:
            specs["pre_quant_scale"] = TensorSpec(in_dim=0)
        return specs

    def statistic_specs(self) -> dict[str, TensorSpec]:
        # Every group lies inside any slice the sharding rules cut (whole rows, or columns
        # in whole groups), and a group's scale depends on that group alone.
        return {}

    def statistics(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def quantize(
        self,
        weight: torch.Tensor,
        *,
        pre_quant_scale: torch.Tensor | None = None,
        statistics: Tensors | None = None,
    ) -> dict[str, torch.Tensor]:
        if weight.dim() != 2:
            raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        g = self.group_size
        if in_features % g:
            raise ValueError(
                f"group size {g} does not divide in_features={in_features}"
            )
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

        groups = w.reshape(out_features, in_features // g, g)  # [out, in/g, g]
        if self.zeros:
            scale, zero = numerics.asymmetric_params(groups.amin(dim=-1), groups.amax(dim=-1))
            q = numerics.quantize_asymmetric(groups, scale[..., None], zero[..., None])
            tensors["zeros"] = zero.t().contiguous()
        else:
            scale = numerics.symmetric_scale(groups.abs().amax(dim=-1), numerics.INT4_MAX)
            q = numerics.quantize_symmetric(groups, scale[..., None], numerics.INT4_MAX)
        tensors["qweight"] = pack_int4(q.reshape(out_features, in_features))
        tensors["scales"] = scale.t().contiguous()  # [out, in/g] -> [in/g, out]
        return {k: tensors[k] for k in self.specs()}

    def dequantize(self, tensors: Tensors) -> torch.Tensor:
        return dequantize_groupwise(
            tensors["qweight"],
            tensors["scales"],
            tensors["zeros"] if self.zeros else None,
            self.group_size,
            tensors["pre_quant_scale"] if self.pre_quant_scale else None,
        )

    def forward(
        self, x: torch.Tensor, tensors: Tensors, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return groupwise_matmul(
            x,
            tensors["qweight"],
            tensors["scales"],
            tensors["zeros"] if self.zeros else None,
            self.group_size,
            tensors["pre_quant_scale"] if self.pre_quant_scale else None,
            bias,
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
