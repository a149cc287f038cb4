"""Checkpoint -> this rank's `Llama`: read, lay out heads, fuse, transform, quantize, shard.

The table of checkpoint names lives with the model (`llama.GLOBAL_WEIGHTS`, `LAYER_WEIGHTS`);
this module walks it. Kept apart from the model so the model file reads like the paper.

Each linear is loaded one of two ways, with identical results (tests/mpi/test_build.py):

* sliced, wherever it applies: only this rank's rows (column-parallel: q/k/v of its heads,
  gate/up, its vocabulary rows of lm_head) or columns (row-parallel: o_proj of its heads,
  down) are read from the checkpoint (`Checkpoint.get_slice`; a GGUF dequantizes only the
  blocks it reads), and the slice is quantized with the scheme's statistics of the FULL
  weight (`Scheme.statistics`: for weight-only int8/int4 the row maxima). Statistics that
  the slice cuts are complete on it (a row's maximum over whole rows); the others come
  from a `WeightStatistics`:
    - `AllReduceStatistics`: every rank of the TP group loads its own shard at once
      (mpirun): all_reduce(max) of each rank's statistics of its slice;
    - `FullWeightStatistics`: one process loads the ranks one after another: computed
      once from the full weight, kept for the other ranks.
  Max is exact, so both give the full-weight scales bit for bit.
* full: whole tensors are read, heads laid out, parts fused, the `transform` applied, the
  full weight quantized and this rank's shard kept (`ShardedLinear.load_full`). Used for
  schemes that need the full weight (`Scheme.statistic_specs() is None`), and whenever a
  `transform` (SmoothQuant) or `quant_options` are given: their vectors are laid out for
  the full weight.

The embedding is replicated on every rank (the model's choice), so it is read whole; a tied
lm_head takes its rows from it.
"""

from __future__ import annotations

from typing import Callable, Literal, Protocol

import torch

from tpquant.checkpoint import Checkpoint
from tpquant.collectives import Communicator
from tpquant.layers.linear import ShardedLinear
from tpquant.models.config import LlamaConfig
from tpquant.models.llama import GLOBAL_WEIGHTS, LAYER_WEIGHTS, Llama, LlamaSchemes
from tpquant.parallel.heads import head_span, lay_out_heads, rank_head_sources, take_heads
from tpquant.parallel.mapping import Mapping
from tpquant.parallel.shard import pad_to_multiple, split_dim
from tpquant.quantization.rotation import rotate_weight

QuantOptions = Callable[[str], dict]  # our layer name -> extra options for Scheme.quantize
Tensors = dict[str, torch.Tensor]
WeightAndBias = tuple[torch.Tensor, "torch.Tensor | None"]


class WeightTransform(Protocol):
    """Rewrites float weights while loading (SmoothQuant: W * s, and g / s in the norm)."""

    def transform_weight(self, layer_name: str, weight: torch.Tensor) -> torch.Tensor: ...

    def transform_norm(self, norm_name: str, weight: torch.Tensor) -> torch.Tensor: ...


# -- statistics of the full weight, for quantizing a slice --------------------------------


class WeightStatistics(Protocol):
    """Completes the statistics of one rank's weight slice into those of the full weight."""

    def combine(
        self, layer_name: str, linear: ShardedLinear, local: Tensors,
        full: Callable[[], Tensors],
    ) -> Tensors:
        """local: the scheme's statistics of this rank's slice; full(): those of the full
        weight (reads it). Returns the statistics `ShardedLinear.load_shard` takes."""
        ...


def _needs_combining(linear: ShardedLinear) -> list[str]:
    """Names of the linear's statistics that its slice does not hold whole, in a fixed order
    (every rank combines them in the same order)."""
    specs = linear.scheme.statistic_specs() or {}
    if linear.mapping.tp_size == 1:
        return []  # the slice is the whole weight
    return sorted(n for n, spec in specs.items() if split_dim(spec, linear.style) is None)


class AllReduceStatistics:
    """Every rank of the TP group loads its own shard at the same time: all_reduce(max).

    Every rank must load the same layers in the same order (load_llama does)."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm

    def combine(
        self, layer_name: str, linear: ShardedLinear, local: Tensors,
        full: Callable[[], Tensors],
    ) -> Tensors:
        tp = linear.mapping.tp_size
        if self.comm.world_size != tp:
            raise ValueError(
                f"{layer_name}: combining statistics of tp={tp} shards over a communicator "
                f"of {self.comm.world_size} ranks; use FullWeightStatistics in one process"
            )
        out = dict(local)
        for name in _needs_combining(linear):
            out[name] = self.comm.all_reduce(local[name].contiguous().clone(), op="max")
        return out


class FullWeightStatistics:
    """One process loading the ranks of one model one after another: the statistics a slice
    lacks are computed from the full weight once per layer and kept for the next ranks."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Tensors] = {}

    def combine(
        self, layer_name: str, linear: ShardedLinear, local: Tensors,
        full: Callable[[], Tensors],
    ) -> Tensors:
        names = _needs_combining(linear)
        if not names:
            return local
        key = (layer_name, linear.scheme, linear.mapping.tp_size)
        if key not in self._cache:
            whole = full()
            self._cache[key] = {name: whole[name] for name in names}
        return {**local, **self._cache[key]}


def default_statistics(mapping: Mapping, comm: Communicator) -> WeightStatistics:
    """All-reduce when `comm` is the TP group of `mapping`, the full weight otherwise."""
    if comm.world_size == mapping.tp_size and comm.rank == mapping.tp_rank:
        return AllReduceStatistics(comm)
    return FullWeightStatistics()


# -- one linear ---------------------------------------------------------------------------


class _LinearLoader:
    """Loads one linear sliced or full (module docstring), from two readers of its weight:
    full() -> (W, bias) of the whole layer, shard() -> (this rank's slice, its bias)."""

    def __init__(
        self, options: QuantOptions, transform: WeightTransform | None,
        statistics: WeightStatistics,
    ) -> None:
        self.options, self.transform, self.statistics = options, transform, statistics

    def __call__(
        self, linear: ShardedLinear, name: str, full: Callable[[], WeightAndBias],
        shard: Callable[[], WeightAndBias],
    ) -> None:
        scheme = linear.scheme
        if self.transform is not None or scheme.statistic_specs() is None:
            w, b = full()
            if self.transform is not None:  # before options: they depend on it
                w = self.transform.transform_weight(name, w)
            linear.load_full(w, b, **self.options(name))
            return
        options = self.options(name)
        if options:
            linear.load_full(*full(), **options)
            return
        w, b = shard()
        local = scheme.statistics(w)
        stats = self.statistics.combine(name, linear, local, lambda: scheme.statistics(full()[0]))
        linear.load_shard(w, b, stats)


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
    statistics: WeightStatistics | None = None,
) -> Llama:
    """Build this rank's model from a `tpquant.checkpoint.Checkpoint`.

    Each linear is read sliced or full (module docstring); tensors are float32 while loading.
    A tensor the checkpoint lacks raises its MissingTensorError naming it.
    `quant_options(layer_name)` gives extra `Scheme.quantize` options (calibrated act_amax,
    smoother, pre_quant_scale); layer names are "model.layers.{i}.attention.qkv", ...,
    "lm_head". `transform` (SmoothQuant's `SmoothQuantPlan`) rewrites each full, laid-out,
    fused weight before it is quantized, and each RMSNorm weight after the linears it feeds:
    per layer, weights, then options, then norms. `statistics` completes the statistics of
    sliced weights; by default `default_statistics(mapping, comm)`, which all-reduces over
    `comm` when it is the TP group: then every rank of it must call load_llama together.
    With `schemes.down_rotation`, down_proj's weight columns are rotated as read (before any
    transform), matching the model's rotation of its input.
    """
    config: LlamaConfig = checkpoint.config
    model = Llama(config, mapping, comm, schemes, dtype)
    load = _LinearLoader(
        quant_options or (lambda name: {}), transform,
        statistics if statistics is not None else default_statistics(mapping, comm),
    )
    rank, tp, hd = mapping.tp_rank, mapping.tp_size, config.head_dim
    q_heads, kv_heads = rank_head_sources(model.layout, rank)

    def get(name: str) -> torch.Tensor:
        return checkpoint.get(name).float()

    def get_bias(name: str, present: bool) -> torch.Tensor | None:
        return get(name + ".bias") if present else None

    def heads(name: str, sources: tuple[int | None, ...], dim: int = 0) -> torch.Tensor:
        """This rank's heads (rows of q/k/v, columns of o_proj), reading only those."""
        lo, hi = head_span(sources)
        return take_heads(checkpoint.get_slice(name, dim, lo * hd, hi * hd).float(),
                          lo, sources, hd, dim)

    def all_heads(name: str, kind: Literal["q", "kv"], dim: int = 0) -> torch.Tensor:
        """The whole tensor, its heads laid out for every rank (the full path)."""
        return lay_out_heads(get(name), model.layout, kind, hd, dim, name)

    def part(name: str, dim: int) -> torch.Tensor:
        """This rank's 1/tp of a tensor along dim (the model checked divisibility)."""
        n = checkpoint.shape(name)[dim] // tp
        return checkpoint.get_slice(name, dim, rank * n, (rank + 1) * n).float()

    embed = get(GLOBAL_WEIGHTS["embed.weight"])
    _copy_into(model.embed.weight, embed, GLOBAL_WEIGHTS["embed.weight"])
    _copy_into(model.norm.weight, get(GLOBAL_WEIGHTS["norm.weight"]), GLOBAL_WEIGHTS["norm.weight"])

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.attention, layer.mlp

        # attention: this rank's heads of q/k/v (fused) and of o_proj's input columns
        ab = config.attention_bias
        q, k, v = (p + n for n in LAYER_WEIGHTS["attention.qkv"])
        (o,) = (p + n for n in LAYER_WEIGHTS["attention.o_proj"])

        def qkv_full() -> WeightAndBias:
            def whole(suffix: str) -> torch.Tensor:
                return torch.cat([all_heads(q + suffix, "q"), all_heads(k + suffix, "kv"),
                                  all_heads(v + suffix, "kv")])

            return whole(".weight"), whole(".bias") if ab else None

        def qkv_shard() -> WeightAndBias:
            def cut(suffix: str) -> torch.Tensor:
                return torch.cat([heads(q + suffix, q_heads), heads(k + suffix, kv_heads),
                                  heads(v + suffix, kv_heads)])

            return cut(".weight"), cut(".bias") if ab else None

        load(attn.qkv, p + "attention.qkv", qkv_full, qkv_shard)
        load(attn.o_proj, p + "attention.o_proj",
             lambda: (all_heads(o + ".weight", "q", dim=1), get_bias(o, ab)),
             lambda: (heads(o + ".weight", q_heads, dim=1), get_bias(o, ab)))

        # mlp: gate/up fused, each split by rows; down split by columns, which are rotated
        # when its input is (blocks within each rank's columns: the slice rotates alike)
        mb = config.mlp_bias
        gate, up = (p + n for n in LAYER_WEIGHTS["mlp.gate_up"])
        (down,) = (p + n for n in LAYER_WEIGHTS["mlp.down"])

        def rotated(w: torch.Tensor) -> torch.Tensor:
            return rotate_weight(w, mlp.down_rotation) if mlp.down_rotation else w

        load(mlp.gate_up, p + "mlp.gate_up",
             lambda: (torch.cat([get(gate + ".weight"), get(up + ".weight")]),
                      torch.cat([get(gate + ".bias"), get(up + ".bias")]) if mb else None),
             lambda: (torch.cat([part(gate + ".weight", 0), part(up + ".weight", 0)]),
                      torch.cat([part(gate + ".bias", 0), part(up + ".bias", 0)]) if mb else None))
        load(mlp.down, p + "mlp.down",
             lambda: (rotated(get(down + ".weight")), get_bias(down, mb)),
             lambda: (rotated(part(down + ".weight", 1)), get_bias(down, mb)))

        # norms last: a transform may fold the factors of the linears they feed
        for ours in ("attention_norm", "ffn_norm"):
            theirs = p + LAYER_WEIGHTS[ours + ".weight"]
            value = get(theirs)
            if transform is not None:
                value = transform.transform_norm(p + ours, value)
            _copy_into(layer.get_parameter(ours + ".weight"), value, theirs)

    # lm_head: vocabulary rows, padded with zero rows to a multiple of tp
    head_name = GLOBAL_WEIGHTS["lm_head"]
    tied = config.tie_word_embeddings

    def head_full() -> WeightAndBias:
        return pad_to_multiple(embed if tied else get(head_name), 0, tp), None

    def head_shard() -> WeightAndBias:
        n = model.padded_vocab // tp
        lo, hi = min(rank * n, config.vocab_size), min((rank + 1) * n, config.vocab_size)
        rows = embed[lo:hi] if tied else checkpoint.get_slice(head_name, 0, lo, hi).float()
        return torch.cat([rows, rows.new_zeros(n - (hi - lo), rows.shape[1])]), None

    load(model.lm_head, "lm_head", head_full, head_shard)
    model.setup_caches(max_batch, max_seq)
    return model.eval()
