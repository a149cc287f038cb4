"""SmoothQuant W8A8: int8 weights, int8 activations, int32 products (DESIGN s5).

The weight handed to `quantize` is already smoothed (W' = W * s, see
tpquant.quantization.smoothquant); the matching X / s is either folded into the preceding
RMSNorm or, for layers without one (o_proj, down_proj), stored here as `smoother` and
applied at run time. Stored tensors:

    qweight       int8 [out, in]
    weight_scale  float32 [out] per channel, or per part of a fused layer (constant within
                  each part), or a scalar [] for an unfused per-tensor layer
    act_scale     float32 [] static activation scale (static mode only)
    smoother      float32 [in] (only when given)

forward: x -> x / smoother -> int8 (per token, or with act_scale) -> int32 product -> rescale.
All math lives in tpquant.kernels.w8a8 and the scale rules in smoothquant.py; this file wires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tpquant.kernels import w8a8 as kernels
from tpquant.quantization import smoothquant
from tpquant.quantization.mode import QuantMode
from tpquant.quantization.schemes.base import Scheme, Tensors, TensorSpec


@dataclass(frozen=True)
class SmoothQuant(Scheme):
    """W8A8. per_token: dynamic per-token activation scales (else one static scale from
    calibration); per_channel: one weight scale per output row (else per tensor / per part).
    dtype: the model's float type around the layer (activations, bias, outputs)."""

    per_token: bool = True
    per_channel: bool = True
    dtype: torch.dtype = torch.float16

    @property
    def mode(self) -> QuantMode:  # type: ignore[override]
        return QuantMode.use_smooth_quant(self.per_token, self.per_channel)

    def specs(self, tensors: Tensors | None = None) -> dict[str, TensorSpec]:
        """Specs of the stored tensors.

        Given `tensors` (what `quantize` returned), exactly their specs; a vector weight_scale
        (per channel, or per part of a fused per-tensor layer) splits with the rows, a scalar
        one is replicated. Without, every tensor this scheme may store, assuming a per-tensor
        weight_scale is the unfused scalar.
        """
        vector_scale = self.per_channel if tensors is None else tensors["weight_scale"].dim() == 1
        specs = {
            "qweight": TensorSpec(out_dim=0, in_dim=1),
            "weight_scale": TensorSpec(out_dim=0) if vector_scale else TensorSpec(),
            "act_scale": TensorSpec(),
            "smoother": TensorSpec(in_dim=0),
        }
        if self.per_token:
            del specs["act_scale"]
        if tensors is not None:
            specs = {name: spec for name, spec in specs.items() if name in tensors}
        return specs

    def quantize(
        self,
        weight: torch.Tensor,
        *,
        act_amax: torch.Tensor | None = None,
        smoother: torch.Tensor | None = None,
        part_sizes: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Quantize an already smoothed W'[out, in].

        act_amax: abs-max of the smoothed input (scalar or [in]); required for static scaling,
            ignored with per-token scaling.
        smoother: s[in] for layers whose input X is divided by s at run time.
        part_sizes: output sizes of the fused parts (q, k, v or gate, up); per-tensor weight
            scales are then taken per part.
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be [out, in], got {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        w = weight.detach().float()
        weight_scale = smoothquant.weight_scales(w, self.per_channel, part_sizes)
        tensors = {
            "qweight": kernels.quantize_weight(w, weight_scale),
            "weight_scale": weight_scale,
        }
        if not self.per_token:
            if act_amax is None:
                raise ValueError(
                    "SmoothQuant with static activation scaling (per_token=False) needs act_amax, "
                    "the calibrated abs-max of the smoothed layer input"
                )
            if act_amax.dim() > 1 or (act_amax.dim() == 1 and act_amax.shape[0] != in_features):
                raise ValueError(
                    f"act_amax must be a scalar or [{in_features}], got {tuple(act_amax.shape)}"
                )
            tensors["act_scale"] = smoothquant.activation_scale(act_amax)
        if smoother is not None:
            if smoother.shape != (in_features,):
                raise ValueError(
                    f"smoother must be [{in_features}], got {tuple(smoother.shape)}"
                )
            tensors["smoother"] = smoother.detach().float().contiguous()
        return tensors

    def dequantize(self, tensors: Tensors) -> torch.Tensor:
        w = kernels.dequantize_weight(tensors["qweight"], tensors["weight_scale"])
        smoother = tensors.get("smoother")
        return w if smoother is None else w / smoother.float()[None, :]

    def forward(
        self,
        x: torch.Tensor | kernels.QuantizedActivation,
        tensors: Tensors,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x is float (quantized here), or already int8 from the SmoothQuant RMSNorm; the
        output is in x's dtype, or in the scheme's dtype for an int8 input."""
        if isinstance(x, kernels.QuantizedActivation):
            if "smoother" in tensors:
                raise ValueError("an int8 input cannot be smoothed: fold the smoother into the norm")
            return kernels.w8a8_matmul(
                x.q, x.scale, tensors["qweight"], tensors["weight_scale"], bias, out_dtype=self.dtype
            )
        # the smoother's division happens inside the quantization (one fused kernel on GPUs)
        smoother = tensors.get("smoother")
        if self.per_token:
            qx, x_scale = kernels.quantize_per_token(x, smoother)
        else:
            x_scale = tensors["act_scale"]
            qx = kernels.quantize_static(x, x_scale, smoother)
        return kernels.w8a8_matmul(
            qx, x_scale, tensors["qweight"], tensors["weight_scale"], bias, out_dtype=x.dtype
        )
