"""SmoothQuant: move activation outliers into the weights, then quantize both to int8 (DESIGN s5).

For a linear layer y = X @ W^T with input channels j, pick per channel

    s_j = max|X_:j|^alpha / max|W_:j|^(1 - alpha)        (alpha = 0.5 by default)

and use X' = X / s, W' = W * s (scaling W's columns). Then X' @ W'^T = X @ W^T exactly, while
X' has its outlier channels divided down and W' absorbs them, so both quantize well.
Several weights reading the same input (q, k, v; gate, up) share one s, with max|W_:j| taken
over all of them. The division of X is folded into the preceding RMSNorm weight
(g' = g / s) for q/k/v and gate/up; o_proj and down_proj keep s as a runtime "smoother".

Scales (one rule each, used by the SmoothQuant scheme):
    weight, per channel:  s_w[o] = max_j |W'_oj| / 127
    weight, per tensor:   s_w = max |W'| / 127, one per part of a fused q/k/v or gate/up
    activation, static:   s_x = max |X'| / 127 from calibration (per token: at run time)
    epilogue:             y = (q_x @ q_w^T) * s_x * s_w

Pure functions on torch tensors; nothing here knows of ranks or files.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tpquant.quantization.numerics import INT8_MAX, symmetric_scale

# Channels whose activations or weights are all zero would give s = 0 or infinity. Clamping
# both maxima to this floor first (the value of the SmoothQuant reference code) keeps s finite
# and positive; such a channel contributes zero either way, so the exact floor does not matter.
AMAX_FLOOR = 1e-5


def weight_input_amax(*weights: torch.Tensor) -> torch.Tensor:
    """Per-input-channel max|W_:j|, float32 [in], over weights [out_i, in] sharing one input."""
    if not weights:
        raise ValueError("weight_input_amax needs at least one weight")
    in_features = {w.shape[-1] for w in weights}
    if len(in_features) != 1 or any(w.dim() != 2 for w in weights):
        shapes = [tuple(w.shape) for w in weights]
        raise ValueError(f"weights sharing an input must all be [out_i, in]; got {shapes}")
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


def smoothing_factors(
    act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """s_j = act_amax_j^alpha / weight_amax_j^(1 - alpha), float32 [in], always finite and > 0.

    act_amax: max|X_:j| from calibration (ActStats.amax); weight_amax: weight_input_amax(...).
    alpha = 0 puts all of the difficulty on the weights' side (s = 1 / max|W|), alpha = 1 all on
    the activations' (s = max|X|). Both maxima are clamped to AMAX_FLOOR first.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if act_amax.shape != weight_amax.shape or act_amax.dim() != 1:
        raise ValueError(
            f"act_amax {tuple(act_amax.shape)} and weight_amax {tuple(weight_amax.shape)} "
            "must both be [in]"
        )
    a = act_amax.float().clamp_min(AMAX_FLOOR)
    w = weight_amax.float().clamp_min(AMAX_FLOOR)
    return a.pow(alpha) / w.pow(1.0 - alpha)


def smooth_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W' = W * s[None, :] (columns scaled), in at least float32."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(dtype) * s.to(dtype)[None, :]


def fold_into_rms_norm(norm_weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """g' = g / s: the RMSNorm then emits X / s. In at least float32; the caller casts."""
    dtype = torch.promote_types(norm_weight.dtype, torch.float32)
    return norm_weight.to(dtype) / s.to(dtype)


def weight_scales(
    weight: torch.Tensor, per_channel: bool, part_sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """int8 scales of an (already smoothed) W'[out, in], float32.

    per_channel: [out], max over each row / 127.
    per tensor: a scalar [], or with `part_sizes` (a fused q/k/v or gate/up, sizes summing to
    out) one scale per part, repeated over that part's rows to [out] so it shards by rows.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got {tuple(weight.shape)}")
    absw = weight.detach().abs()
    if per_channel:
        return symmetric_scale(absw.amax(dim=1), INT8_MAX)
    if part_sizes is None:
        return symmetric_scale(absw.amax(), INT8_MAX)
    sizes = list(part_sizes)
    if sum(sizes) != weight.shape[0] or any(n <= 0 for n in sizes):
        raise ValueError(
            f"part_sizes {sizes} must be positive and sum to out_features = {weight.shape[0]}"
        )
    parts = absw.split(sizes, dim=0)
    return torch.cat(
        [symmetric_scale(p.amax(), INT8_MAX).expand(n) for p, n in zip(parts, sizes)]
    )


def activation_scale(act_amax: torch.Tensor) -> torch.Tensor:
    """Static per-tensor activation scale max|X'| / 127, float32 scalar [].

    act_amax: the calibrated abs-max of the smoothed input, a scalar or per channel [in].
    """
    return symmetric_scale(act_amax.detach().float().amax(), INT8_MAX)


def output_rescale(act_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The epilogue factor s_x * s_w: shapes broadcast ([] or [tokens, 1] times [] or [out])."""
    return act_scale.float() * weight_scale.float()


# -- a model's smoothing, in one place ------------------------------------------------------

# Llama layers that SmoothQuant smooths, by the suffix of their name: where X / s goes.
# Folded layers hand s to the RMSNorm before them (its name suffix); the others keep it as a
# runtime smoother. lm_head is never smoothed (it stays float).
FOLDED_INTO_NORM = {"attention.qkv": "attention_norm", "mlp.gate_up": "ffn_norm"}
RUNTIME_SMOOTHER = ("attention.o_proj", "mlp.down")


class SmoothQuantPlan:
    """The smoothing of one model from its calibrated statistics (DESIGN s5).

    act_amax: layer name -> max|X_:j| of the layer's FLOAT input, full width in the model's
    layout (what `calibrate` returns). Used by load_llama's three hooks, in this order per
    layer: `transform_weight` (W' = W * s; computes s from the full, laid-out weight and
    remembers it), `quant_options` (act_amax of the smoothed input act_amax / s, and the
    runtime smoother for o_proj / down), and `transform_norm` (g' = g / s for the norm that
    feeds qkv or gate_up). A layer not smoothed passes through unchanged, with no options.
    """

    def __init__(self, act_amax: dict[str, torch.Tensor], alpha: float = 0.5) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.act_amax = {name: a.detach().float().cpu() for name, a in act_amax.items()}
        self.alpha = alpha
        self.factors: dict[str, torch.Tensor] = {}  # layer name -> s [in], once its weight is seen

    @staticmethod
    def smooths(layer_name: str) -> bool:
        return layer_name.endswith(tuple(FOLDED_INTO_NORM)) or layer_name.endswith(RUNTIME_SMOOTHER)

    def transform_weight(self, layer_name: str, weight: torch.Tensor) -> torch.Tensor:
        """W' = W * s for a smoothed layer (fused q/k/v or gate/up share one s), else W."""
        if not self.smooths(layer_name):
            return weight
        if layer_name not in self.act_amax:
            raise KeyError(f"no calibration statistics for {layer_name}")
        act = self.act_amax[layer_name]
        if act.shape != (weight.shape[1],):
            raise ValueError(
                f"{layer_name}: statistics for {act.shape[0]} input channels, weight has "
                f"{weight.shape[1]} (calibrate a model with the same head layout)"
            )
        s = smoothing_factors(act, weight_input_amax(weight), self.alpha)
        self.factors[layer_name] = s
        return smooth_weight(weight, s)

    def _factor(self, layer_name: str) -> torch.Tensor:
        if layer_name not in self.factors:
            raise RuntimeError(f"{layer_name}: transform_weight must run before its options/norm")
        return self.factors[layer_name]

    def quant_options(self, layer_name: str) -> dict:
        """Scheme.quantize options: act_amax of X' = X / s, and the smoother where it stays."""
        if not self.smooths(layer_name):
            return {}
        s = self._factor(layer_name)
        options = {"act_amax": self.act_amax[layer_name] / s}
        if layer_name.endswith(RUNTIME_SMOOTHER):
            options["smoother"] = s
        return options

    def transform_norm(self, norm_name: str, weight: torch.Tensor) -> torch.Tensor:
        """g' = g / s for "model.layers.{i}.attention_norm" / ".ffn_norm", else g unchanged."""
        for layer, norm in FOLDED_INTO_NORM.items():
            if norm_name.endswith("." + norm):
                consumer = norm_name[: -len(norm)] + layer
                return fold_into_rms_norm(weight, self._factor(consumer))
        return weight
