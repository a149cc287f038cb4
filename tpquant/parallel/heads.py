"""Attention-head layout for tensor parallelism (DESIGN s6).

Each rank owns whole query heads and the KV heads they read. Three layouts, picked by
`plan_heads` in this order:

  split         n_heads % tp == 0 and n_kv % tp == 0: every rank gets n_heads/tp query
                heads and n_kv/tp KV heads; GQA groups stay intact.
  replicate_kv  n_heads % tp == 0 and tp % n_kv == 0 (more ranks than KV heads): each KV
                head is repeated tp/n_kv times consecutively, one copy per rank. The query
                heads of rank r (a contiguous block inside one GQA group) then find their
                own KV head at local index 0.
  pad           anything else (SmolLM2: 9 query / 3 KV heads at tp 2 or 4): KV heads are
                expanded to one per query head (plain multi-head attention), then query and
                KV heads are padded with zero heads up to the next multiple of tp.

`apply_head_layout` rewrites the FULL float q/k/v/o weights (before quantization) so that the
usual column split of q/k/v (per part, see `qkv_part_sizes`) and row split of o_proj realise
the layout. Repeating a KV head for several query heads leaves attention unchanged. A padded
head has q = 0 (zero weights and bias), so its scores are all 0 and its softmax is uniform;
its values are 0 (zero v weights), so its output is 0; and its o_proj input columns are 0,
so it adds exactly 0 to the output. The padded model computes the same function; the price
is a larger KV cache (`kv_cache_overhead`, reported at build time).

One rule places the heads: `rank_head_sources` says which original head lies behind each
of a rank's local heads (None for a zero head). A loader reads just those heads' rows of
q/k/v and columns of o_proj and assembles them with `take_heads`; the full laid-out weights
(`lay_out_heads`, `apply_head_layout`) are every rank's heads in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["split", "replicate_kv", "pad"]


@dataclass(frozen=True)
class HeadLayout:
    """How attention heads are laid out over `tp` ranks.

    n_heads, n_kv_heads: the model's original counts.
    padded_n_heads: query heads after zero padding (a multiple of tp).
    padded_n_kv_heads: KV heads after repetition / expansion / padding, summed over ranks.
    heads_per_rank, kv_heads_per_rank: what each rank holds (and caches).
    kv_repeat: copies made of each original KV head (1 for "split").
    """

    n_heads: int
    n_kv_heads: int
    tp: int
    kind: Kind
    padded_n_heads: int
    padded_n_kv_heads: int
    heads_per_rank: int
    kv_heads_per_rank: int
    kv_repeat: int

    @property
    def q_per_kv(self) -> int:
        """Query heads per KV head inside one rank (the local GQA group size)."""
        return self.heads_per_rank // self.kv_heads_per_rank

    @property
    def n_pad_heads(self) -> int:
        """Zero query heads appended (also the number of zero KV heads)."""
        return self.padded_n_heads - self.n_heads


def plan_heads(n_heads: int, n_kv_heads: int, tp: int) -> HeadLayout:
    """Choose the head layout for `tp` ranks (rules in the module docstring)."""
    if n_heads < 1 or n_kv_heads < 1 or tp < 1:
        raise ValueError(
            f"n_heads, n_kv_heads and tp must be >= 1, got {n_heads}, {n_kv_heads}, {tp}"
        )
    if n_heads % n_kv_heads:
        raise ValueError(
            f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads} (GQA groups)"
        )
    if n_heads % tp == 0 and n_kv_heads % tp == 0:
        return HeadLayout(
            n_heads, n_kv_heads, tp, "split", n_heads, n_kv_heads,
            n_heads // tp, n_kv_heads // tp, 1,
        )
    if n_heads % tp == 0 and tp % n_kv_heads == 0:
        return HeadLayout(
            n_heads, n_kv_heads, tp, "replicate_kv", n_heads, tp,
            n_heads // tp, 1, tp // n_kv_heads,
        )
    padded = -(-n_heads // tp) * tp
    return HeadLayout(
        n_heads, n_kv_heads, tp, "pad", padded, padded,
        padded // tp, padded // tp, n_heads // n_kv_heads,
    )


def qkv_part_sizes(layout: HeadLayout, head_dim: int) -> tuple[int, int, int]:
    """Output features of q, k, v in the laid-out (full) weights: part_sizes for a fused qkv."""
    return (
        layout.padded_n_heads * head_dim,
        layout.padded_n_kv_heads * head_dim,
        layout.padded_n_kv_heads * head_dim,
    )


def kv_cache_overhead(layout: HeadLayout, original_n_kv: int | None = None) -> float:
    """KV cache over all ranks relative to the unsharded model's (1.0 = no overhead)."""
    n_kv = layout.n_kv_heads if original_n_kv is None else original_n_kv
    return layout.tp * layout.kv_heads_per_rank / n_kv


def lay_out_heads(
    t: torch.Tensor,
    layout: HeadLayout,
    kind: Literal["q", "kv"],
    head_dim: int,
    dim: int = 0,
    name: str = "tensor",
) -> torch.Tensor:
    """A whole tensor with its query ("q") or KV ("kv") heads along `dim` laid out for
    `layout`: every rank's heads (`rank_head_sources`), in rank order. t itself for "split"."""
    n = layout.n_heads if kind == "q" else layout.n_kv_heads
    if t.shape[dim] != n * head_dim:
        raise ValueError(
            f"{name} has {t.shape[dim]} entries along its head dim {dim}, expected {n} heads x "
            f"head_dim {head_dim} = {n * head_dim}"
        )
    if layout.kind == "split":
        return t
    which = 0 if kind == "q" else 1
    ranks = (rank_head_sources(layout, r)[which] for r in range(layout.tp))
    return torch.cat([take_heads(t, 0, sources, head_dim, dim) for sources in ranks], dim=dim)


def apply_head_layout(
    layout: HeadLayout,
    head_dim: int,
    q_w: torch.Tensor,  # [n_heads * head_dim, hidden]
    k_w: torch.Tensor,  # [n_kv * head_dim, hidden]
    v_w: torch.Tensor,  # [n_kv * head_dim, hidden]
    o_w: torch.Tensor,  # [hidden, n_heads * head_dim]
    q_b: torch.Tensor | None = None,
    k_b: torch.Tensor | None = None,
    v_b: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Rewrite full float attention weights for `layout`.

    Returns q_w, k_w, v_w, o_w, plus q_b, k_b, v_b for the biases given.

    KV heads (and biases) are repeated `kv_repeat` times each, consecutively; zero query and
    KV heads are appended and o_proj gets matching zero INPUT columns. Afterwards a plain
    per-part column split of q/k/v (`qkv_part_sizes`) and a row split of o_proj give every
    rank its heads. For "split" the inputs are returned unchanged.
    """
    if o_w.shape[-1] != layout.n_heads * head_dim:
        raise ValueError(
            f"o_w has {o_w.shape[-1]} input columns, expected n_heads {layout.n_heads} x "
            f"head_dim {head_dim}"
        )
    given = {"q_w": (q_w, "q", 0), "k_w": (k_w, "kv", 0), "v_w": (v_w, "kv", 0),
             "o_w": (o_w, "q", 1), "q_b": (q_b, "q", 0), "k_b": (k_b, "kv", 0),
             "v_b": (v_b, "kv", 0)}
    return {
        name: lay_out_heads(t, layout, kind, head_dim, dim, name)  # type: ignore[arg-type]
        for name, (t, kind, dim) in given.items() if t is not None
    }


def rank_head_sources(
    layout: HeadLayout, rank: int
) -> tuple[tuple[int | None, ...], tuple[int | None, ...]]:
    """(query, KV) original head index behind each of rank's local heads; None for a zero head.

    Laid-out query head g is original head g (zero beyond n_heads); laid-out KV head g is
    original head g // kv_repeat (zero beyond n_kv_heads * kv_repeat), as `apply_head_layout`
    builds them; rank r keeps laid-out heads [r * per_rank, (r + 1) * per_rank).
    """
    if not 0 <= rank < layout.tp:
        raise ValueError(f"rank must be in [0, {layout.tp}), got {rank}")
    q0, kv0 = rank * layout.heads_per_rank, rank * layout.kv_heads_per_rank
    kv_real = layout.n_kv_heads * layout.kv_repeat
    q = tuple(g if g < layout.n_heads else None for g in range(q0, q0 + layout.heads_per_rank))
    kv = tuple(
        g // layout.kv_repeat if g < kv_real else None
        for g in range(kv0, kv0 + layout.kv_heads_per_rank)
    )
    return q, kv


def head_span(sources: tuple[int | None, ...]) -> tuple[int, int]:
    """[lo, hi): the original heads `sources` reads (lo == hi when all are zero heads)."""
    real = [s for s in sources if s is not None]
    return (min(real), max(real) + 1) if real else (0, 0)


def take_heads(
    block: torch.Tensor, lo: int, sources: tuple[int | None, ...], head_dim: int, dim: int = 0
) -> torch.Tensor:
    """Local heads along `dim` from `block`, which holds original heads [lo, hi) along dim
    (hi from `head_span`): head s is block's (s - lo)-th, a None is a zero head."""
    shape = list(block.shape)
    shape[dim] = head_dim
    pieces = [
        block.new_zeros(shape) if s is None else block.narrow(dim, (s - lo) * head_dim, head_dim)
        for s in sources
    ]
    return torch.cat(pieces, dim=dim)
