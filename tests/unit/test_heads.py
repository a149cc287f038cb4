"""Head layouts (DESIGN s6): split, replicated KV heads, expanded and zero-padded heads.

For every case, a float64 causal GQA attention with RoPE is computed once on the original
weights and once per rank on that rank's heads of the laid-out weights (sharded with the
generic column/row rules); the per-rank o_proj partial outputs, summed, must equal the
unsharded output within 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch

from tpquant.parallel.heads import (
    apply_head_layout,
    head_span,
    kv_cache_overhead,
    plan_heads,
    qkv_part_sizes,
    rank_head_sources,
    take_heads,
)
from tpquant.parallel.shard import shard_tensor, split_fused
from tpquant.quantization.schemes.base import TensorSpec

# (n_heads, n_kv, tp) -> (kind, padded heads, padded kv heads, heads/rank, kv/rank, kv_repeat)
CASES = {
    # SmolLM2-135M: 9 query heads, 3 KV heads
    (9, 3, 1): ("split", 9, 3, 9, 3, 1),
    (9, 3, 2): ("pad", 10, 10, 5, 5, 3),
    (9, 3, 3): ("split", 9, 3, 3, 1, 1),
    (9, 3, 4): ("pad", 12, 12, 3, 3, 3),
    (9, 3, 9): ("replicate_kv", 9, 9, 1, 1, 3),
    # Llama-3-8B-like: 32 query heads, 8 KV heads
    (32, 8, 1): ("split", 32, 8, 32, 8, 1),
    (32, 8, 2): ("split", 32, 8, 16, 4, 1),
    (32, 8, 4): ("split", 32, 8, 8, 2, 1),
    (32, 8, 8): ("split", 32, 8, 4, 1, 1),
    (32, 8, 16): ("replicate_kv", 32, 16, 2, 1, 2),
    (32, 32, 4): ("split", 32, 32, 8, 8, 1),
    (12, 3, 4): ("pad", 12, 12, 3, 3, 4),
    (8, 1, 2): ("replicate_kv", 8, 2, 4, 1, 2),
}

ATOL = 1e-10


def _dims(n_heads: int) -> tuple[int, int]:
    """(hidden, head_dim): SmolLM2-135M's real sizes for 9 heads, small ones otherwise."""
    return (576, 64) if n_heads == 9 else (48, 8)


def _rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE on x[T, heads, head_dim] at positions 0..T-1."""
    t, _, d = x.shape
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, d/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _attention(x, q_w, k_w, v_w, o_w, q_b, k_b, v_b, n_heads, n_kv, head_dim):
    """Plain causal GQA attention: query head h reads KV head h // (n_heads / n_kv)."""
    t = x.shape[0]
    q = _rope((x @ q_w.t() + q_b).view(t, n_heads, head_dim))
    k = _rope((x @ k_w.t() + k_b).view(t, n_kv, head_dim))
    v = (x @ v_w.t() + v_b).view(t, n_kv, head_dim)
    group = n_heads // n_kv
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    heads = []
    for h in range(n_heads):
        kv = h // group
        scores = q[:, h] @ k[:, kv].t() / math.sqrt(head_dim)
        scores = scores.masked_fill(~causal, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
    return torch.cat(heads, dim=-1) @ o_w.t()


def _weights(n_heads: int, n_kv: int, seed: int) -> tuple[dict, torch.Tensor]:
    hidden, hd = _dims(n_heads)
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(shape[-1])

    w = {
        "q_w": r(n_heads * hd, hidden),
        "k_w": r(n_kv * hd, hidden),
        "v_w": r(n_kv * hd, hidden),
        "o_w": r(hidden, n_heads * hd),
        "q_b": r(n_heads * hd),
        "k_b": r(n_kv * hd),
        "v_b": r(n_kv * hd),
    }
    x = torch.randn(7, hidden, generator=g, dtype=torch.float64)
    return w, x


def _rank_weights(laid: dict, layout, hd: int, rank: int) -> dict:
    """Rank's q/k/v/o through the generic rules: fused qkv column split per part, o row split."""
    parts = qkv_part_sizes(layout, hd)
    qkv = torch.cat([laid["q_w"], laid["k_w"], laid["v_w"]])
    qkv_b = torch.cat([laid["q_b"], laid["k_b"], laid["v_b"]])
    tp = layout.tp
    local = [p // tp for p in parts]
    q_w, k_w, v_w = split_fused(qkv, 0, parts, rank, tp).split(local)
    q_b, k_b, v_b = split_fused(qkv_b, 0, parts, rank, tp).split(local)
    o_w = shard_tensor(laid["o_w"], TensorSpec(out_dim=0, in_dim=1), "row", rank, tp)
    return dict(q_w=q_w, k_w=k_w, v_w=v_w, o_w=o_w, q_b=q_b, k_b=k_b, v_b=v_b)


@pytest.mark.parametrize("case", sorted(CASES), ids=lambda c: "h{}_kv{}_tp{}".format(*c))
def test_plan_and_attention_identity(case: tuple[int, int, int]) -> None:
    nh, nkv, tp = case
    kind, pnh, pnkv, hpr, kvpr, rep = CASES[case]
    layout = plan_heads(nh, nkv, tp)
    assert (layout.kind, layout.padded_n_heads, layout.padded_n_kv_heads) == (kind, pnh, pnkv)
    assert (layout.heads_per_rank, layout.kv_heads_per_rank, layout.kv_repeat) == (hpr, kvpr, rep)
    assert layout.padded_n_heads == tp * hpr and layout.padded_n_kv_heads == tp * kvpr

    hidden, hd = _dims(nh)
    w, x = _weights(nh, nkv, seed=nh * 100 + nkv * 10 + tp)
    ref = _attention(x, **w, n_heads=nh, n_kv=nkv, head_dim=hd)

    laid = apply_head_layout(layout, hd, **w)
    assert laid["q_w"].shape == (pnh * hd, hidden) and laid["o_w"].shape == (hidden, pnh * hd)
    assert laid["k_w"].shape == laid["v_w"].shape == (pnkv * hd, hidden)
    if kind == "split":
        assert all(laid[k] is w[k] for k in w)  # nothing to rewrite

    total = torch.zeros_like(ref)
    kv_rows = 0
    for rank in range(tp):
        rw = _rank_weights(laid, layout, hd, rank)
        n_q, n_k = rw["q_w"].shape[0] // hd, rw["k_w"].shape[0] // hd
        assert (n_q, n_k) == (hpr, kvpr)
        kv_rows += rw["k_w"].shape[0]
        total += _attention(x, **rw, n_heads=n_q, n_kv=n_k, head_dim=hd)
        _check_head_mapping(w, rw, nh, nkv, hd, rank)
    torch.testing.assert_close(total, ref, rtol=0, atol=ATOL)
    # KV cache over all ranks relative to the original
    assert kv_cache_overhead(layout, nkv) == pytest.approx(kv_rows / w["k_w"].shape[0])


def _check_head_mapping(w: dict, rw: dict, nh: int, nkv: int, hd: int, rank: int) -> None:
    """Each real local query head reads the original KV head of its GQA group; pads are zero."""
    hpr, kvpr = rw["q_w"].shape[0] // hd, rw["k_w"].shape[0] // hd
    local_group, orig_group = hpr // kvpr, nh // nkv

    def head(t, i):
        return t[i * hd : (i + 1) * hd]

    for j in range(hpr):
        h = rank * hpr + j  # global query head
        local_kv = j // local_group
        if h < nh:
            assert torch.equal(head(rw["q_w"], j), head(w["q_w"], h))
            assert torch.equal(head(rw["o_w"].t(), j), head(w["o_w"].t(), h))
            for name in ("k_w", "v_w", "k_b", "v_b"):
                assert torch.equal(head(rw[name], local_kv), head(w[name], h // orig_group)), name
        else:  # a padding head: zero q, k, v (and biases) and zero o_proj columns
            for name in ("q_w", "q_b"):
                assert not head(rw[name], j).any()
            for name in ("k_w", "v_w", "k_b", "v_b"):
                assert not head(rw[name], local_kv).any()
            assert not head(rw["o_w"].t(), j).any()


@pytest.mark.parametrize("case", sorted(CASES), ids=lambda c: "h{}_kv{}_tp{}".format(*c))
def test_rank_heads_read_alone_equal_the_laid_out_shard(case: tuple[int, int, int]) -> None:
    """What a loader reads for one rank (`rank_head_sources`: only the original heads it
    keeps, as rows of q/k/v and columns of o_proj) equals that rank's shard of the full
    laid-out weights, exactly."""
    nh, nkv, tp = case
    layout = plan_heads(nh, nkv, tp)
    hd = _dims(nh)[1]
    w, _ = _weights(nh, nkv, seed=3)
    laid = apply_head_layout(layout, hd, **w)
    for rank in range(tp):
        want = _rank_weights(laid, layout, hd, rank)
        q_src, kv_src = rank_head_sources(layout, rank)
        assert (len(q_src), len(kv_src)) == (layout.heads_per_rank, layout.kv_heads_per_rank)
        for name, src, dim in (("q_w", q_src, 0), ("q_b", q_src, 0), ("k_w", kv_src, 0),
                               ("k_b", kv_src, 0), ("v_w", kv_src, 0), ("v_b", kv_src, 0),
                               ("o_w", q_src, 1)):
            lo, hi = head_span(src)
            read = w[name].narrow(dim, lo * hd, (hi - lo) * hd)  # only these heads are read
            got = take_heads(read, lo, src, hd, dim)
            assert got.shape == want[name].shape and torch.equal(got, want[name]), (rank, name)
    with pytest.raises(ValueError, match="rank must be in"):
        rank_head_sources(layout, tp)


def test_replicate_kv_consecutive_copies() -> None:
    """(8 heads, 1 KV head) at tp 2 and (32, 8) at tp 16: KV head i is copied to ranks i*rep.."""
    for nh, nkv, tp in ((8, 1, 2), (32, 8, 16), (9, 3, 9)):
        layout = plan_heads(nh, nkv, tp)
        hd = _dims(nh)[1]
        w, _ = _weights(nh, nkv, seed=1)
        laid = apply_head_layout(layout, hd, **w)
        rep = tp // nkv
        for r in range(tp):
            assert torch.equal(
                laid["k_w"][r * hd : (r + 1) * hd], w["k_w"][(r // rep) * hd : (r // rep + 1) * hd]
            )


def test_kv_cache_overhead_values() -> None:
    assert kv_cache_overhead(plan_heads(32, 8, 4), 8) == 1.0
    assert kv_cache_overhead(plan_heads(9, 3, 2), 3) == pytest.approx(10 / 3)
    assert kv_cache_overhead(plan_heads(32, 8, 16)) == pytest.approx(2.0)


def test_errors() -> None:
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        plan_heads(9, 2, 3)
    with pytest.raises(ValueError, match=">= 1"):
        plan_heads(8, 0, 2)
    with pytest.raises(ValueError, match=">= 1"):
        plan_heads(8, 2, 0)
    layout = plan_heads(9, 3, 2)
    w, _ = _weights(9, 3, seed=2)
    with pytest.raises(ValueError, match="k_w"):
        apply_head_layout(layout, 64, **{**w, "k_w": w["k_w"][:-1]})
    with pytest.raises(ValueError, match="o_w"):
        apply_head_layout(layout, 32, **w)
