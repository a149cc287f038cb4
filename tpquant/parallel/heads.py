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


def _heads(t: torch.Tensor, n: int, head_dim: int, name: str) -> torch.Tensor:
    """[n * head_dim, ...] -> [n, head_dim, ...], checking the size."""
    if t.shape[0] != n * head_dim:
        raise ValueError(
            f"{name} has {t.shape[0]} rows along its head dim, expected {n} heads x "
            f"head_dim {head_dim} = {n * head_dim}"
        )
    return t.reshape(n, head_dim, *t.shape[1:])


def _expand(
    t: torch.Tensor, n: int, head_dim: int, repeat: int, total: int, name: str
) -> torch.Tensor:
    """Repeat each of n heads `repeat` times consecutively, then zero-pad to `total` heads."""
    h = _heads(t, n, head_dim, name)
    if repeat == 1 and total == n:
        return t
    h = h.repeat_interleave(repeat, dim=0)
    if total > h.shape[0]:
        h = torch.cat([h, h.new_zeros(total - h.shape[0], *h.shape[1:])], dim=0)
    return h.reshape(total * head_dim, *t.shape[1:])


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
    nh, nkv, total_q, total_kv = (
        layout.n_heads, layout.n_kv_heads, layout.padded_n_heads, layout.padded_n_kv_heads,
    )
    if o_w.shape[-1] != nh * head_dim:
        raise ValueError(
            f"o_w has {o_w.shape[-1]} input columns, expected n_heads {nh} x head_dim {head_dim}"
        )
    if total_q != nh:
        # o_proj's input columns are laid out like q's output rows: pad through the transpose
        o_w = _expand(o_w.t(), nh, head_dim, 1, total_q, "o_w").t().contiguous()
    out = {
        "q_w": _expand(q_w, nh, head_dim, 1, total_q, "q_w"),
        "k_w": _expand(k_w, nkv, head_dim, layout.kv_repeat, total_kv, "k_w"),
        "v_w": _expand(v_w, nkv, head_dim, layout.kv_repeat, total_kv, "v_w"),
        "o_w": o_w,
    }
    for name, b, n, repeat, total in (
        ("q_b", q_b, nh, 1, total_q),
        ("k_b", k_b, nkv, layout.kv_repeat, total_kv),
        ("v_b", v_b, nkv, layout.kv_repeat, total_kv),
    ):
        if b is not None:
            out[name] = _expand(b, n, head_dim, repeat, total, name)
    return out
