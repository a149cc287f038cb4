"""Checkpoint -> this rank's `Llama`: read, lay out heads, fuse, transform, quantize, shard.

The table of checkpoint names lives with the model (`llama.GLOBAL_WEIGHTS`, `LAYER_WEIGHTS`);
this module walks it. Kept apart from the model so the model file reads like the paper.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from tpquant.checkpoint import Checkpoint
from tpquant.collectives import Communicator
from tpquant.models.config import LlamaConfig
from tpquant.models.llama import GLOBAL_WEIGHTS, LAYER_WEIGHTS, Llama, LlamaSchemes
from tpquant.parallel.heads import apply_head_layout
from tpquant.parallel.mapping import Mapping
from tpquant.parallel.shard import pad_to_multiple

QuantOptions = Callable[[str], dict]  # our layer name -> extra options for Scheme.quantize


class WeightTransform(Protocol):
    """Rewrites float weights while loading (SmoothQuant: W * s, and g / s in the norm)."""

    def transform_weight(self, layer_name: str, weight: torch.Tensor) -> torch.Tensor: ...

    def transform_norm(self, norm_name: str, weight: torch.Tensor) -> torch.Tensor: ...


class _NoTransform:
    def transform_weight(self, layer_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def transform_norm(self, norm_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight


def _copy_into(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(value)


def load_llama(
    checkpoint: Checkpoint,
    mapping: Mapping,
    comm: Communicator,
    schemes: LlamaSchemes,
    dtype: torch.dtype = torch.float32,
    max_seq: int = 2048,
    max_batch: int = 1,
    quant_options: QuantOptions | None = None,
    transform: WeightTransform | None = None,
) -> Llama:
    """Build this rank's model from a `tpquant.checkpoint.Checkpoint`.

    Every tensor is read whole (float32), attention weights get the head layout, fused parts
    are concatenated, and each linear quantizes the FULL weight and keeps its own shard
    (`load_full`), so scales equal the single-process ones. A tensor the checkpoint lacks
    raises its MissingTensorError naming it. `quant_options(layer_name)` gives extra
    `Scheme.quantize` options (calibrated act_amax, smoother, pre_quant_scale); layer names
    are "model.layers.{i}.attention.qkv", ..., "lm_head". `transform` (SmoothQuant's
    `SmoothQuantPlan`) rewrites each full, laid-out, fused weight before it is quantized, and
    each RMSNorm weight after the linears it feeds: per layer, weights, then options, then norms.
    """
    config: LlamaConfig = checkpoint.config
    options = quant_options or (lambda name: {})
    tf = transform or _NoTransform()
    model = Llama(config, mapping, comm, schemes, dtype)

    def get(name: str) -> torch.Tensor:
        return checkpoint.get(name).float()

    def get_bias(name: str, present: bool) -> torch.Tensor | None:
        return get(name + ".bias") if present else None

    embed = get(GLOBAL_WEIGHTS["embed.weight"])
    _copy_into(model.embed.weight, embed, GLOBAL_WEIGHTS["embed.weight"])
    _copy_into(model.norm.weight, get(GLOBAL_WEIGHTS["norm.weight"]), GLOBAL_WEIGHTS["norm.weight"])

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        # attention: head layout on the full float q/k/v/o, then fuse q/k/v
        ab = config.attention_bias
        q, k, v = LAYER_WEIGHTS["attention.qkv"]
        (o,) = LAYER_WEIGHTS["attention.o_proj"]
        laid = apply_head_layout(
            model.layout, config.head_dim,
            get(p + q + ".weight"), get(p + k + ".weight"), get(p + v + ".weight"),
            get(p + o + ".weight"),
            get_bias(p + q, ab), get_bias(p + k, ab), get_bias(p + v, ab),
        )
        attn = layer.attention
        qkv_bias = torch.cat([laid["q_b"], laid["k_b"], laid["v_b"]]) if ab else None
        qkv_w = torch.cat([laid["q_w"], laid["k_w"], laid["v_w"]])
        attn.qkv.load_full(
            tf.transform_weight(p + "attention.qkv", qkv_w), qkv_bias,
            **options(p + "attention.qkv"),
        )
        attn.o_proj.load_full(
            tf.transform_weight(p + "attention.o_proj", laid["o_w"]), get_bias(p + o, ab),
            **options(p + "attention.o_proj"),
        )

        # mlp: fuse gate/up
        mb = config.mlp_bias
        gate, up = LAYER_WEIGHTS["mlp.gate_up"]
        (down,) = LAYER_WEIGHTS["mlp.down"]
        gate_up_bias = torch.cat([get(p + gate + ".bias"), get(p + up + ".bias")]) if mb else None
        gate_up_w = torch.cat([get(p + gate + ".weight"), get(p + up + ".weight")])
        layer.mlp.gate_up.load_full(
            tf.transform_weight(p + "mlp.gate_up", gate_up_w), gate_up_bias,
            **options(p + "mlp.gate_up"),
        )
        layer.mlp.down.load_full(
            tf.transform_weight(p + "mlp.down", get(p + down + ".weight")),
            get_bias(p + down, mb), **options(p + "mlp.down"),
        )

        # norms last: a transform may fold the factors of the linears they feed
        for ours in ("attention_norm", "ffn_norm"):
            theirs = p + LAYER_WEIGHTS[ours + ".weight"]
            norm = tf.transform_norm(p + ours, get(theirs))
            _copy_into(layer.get_parameter(ours + ".weight"), norm, theirs)

    head = embed if config.tie_word_embeddings else get(GLOBAL_WEIGHTS["lm_head"])
    head = tf.transform_weight("lm_head", pad_to_multiple(head, 0, mapping.tp_size))
    model.lm_head.load_full(head, **options("lm_head"))
    model.setup_caches(max_batch, max_seq)
    return model.eval()
