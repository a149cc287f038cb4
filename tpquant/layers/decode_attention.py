"""Attention of one new token per row over the KV cache, with fixed shapes (CUDA-graph safe).

    q [B, H, hd] (this rank's query heads), cache [max_batch, max_seq, Hkv, hd], positions [B]
    -> out [B, H, hd];  row b's query is at positions[b] and attends to cache positions
    0 .. positions[b] (its own key included), query head h to KV head h // (H / Hkv).

Shapes never depend on the positions (a device tensor), so one decode step captures once per
batch size and replays at every position. The kernel reads the step's positions as they are
(no `positions + 1` kernel per layer).

Two implementations, chosen by device:
- `decode_attention_reference`: masked SDPA over the whole max_seq cache, in torch. The CPU
  path and the test oracle.
- `decode_attention_triton`: split-K ("flash-decoding"). Program (b, kv head, split) reads only
  its share of positions 0 .. positions[b], for every query head of the group at once (one
  tl.dot, the group padded to 16 rows), keeping a running max and sum; a second kernel then
  combines the splits with their log-sum-exp weights. An INT8 cache is dequantized in registers with the
  same per-(position, head) scales as `KVCache.read`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tpquant.kernels import pdl
from tpquant.layers.kv_cache import KVCache

try:  # Triton is optional: CPU installs may lack it, and the reference serves them
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def decode_attention(q: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
    """The Triton kernel on CUDA tensors, the torch reference otherwise."""
    if q.is_cuda and triton is not None:
        return decode_attention_triton(q, cache, positions)
    return decode_attention_reference(q, cache, positions)


def decode_attention_reference(
    q: torch.Tensor, cache: KVCache, positions: torch.Tensor
) -> torch.Tensor:
    """Masked SDPA over all max_seq positions; q's dtype in, q's dtype out."""
    B, H, hd = _check(q, cache, positions)
    k, v = cache.read(B, cache.max_seq)  # [B, S, Hkv, hd]
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, S, hd]
    group = H // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    seen = torch.arange(cache.max_seq, device=q.device) <= positions[:, None]  # [B, S]
    y = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=seen[:, None, None])
    return y[:, :, 0]  # [B, H, hd]


def _check(q: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> tuple[int, int, int]:
    B, H, hd = q.shape
    Hkv = cache.k.shape[2]
    if hd != cache.k.shape[3] or H % Hkv or B > cache.max_batch or positions.shape != (B,):
        raise ValueError(
            f"decode attention: q {tuple(q.shape)}, cache {tuple(cache.k.shape)}, "
            f"positions {tuple(positions.shape)} do not fit together"
        )
    return B, H, hd


# Cache positions per inner step: 64 took Llama-2-7B's split kernel from 0.190 to 0.158 ms a
# decode step against 32 (H200, int4, docs/benchmarks.md 2026-11-30; 128: 0.177 ms).
BLOCK_N = 64
TARGET_PROGRAMS = 512  # enough programs to fill an H100/H200 (132 SMs) a few times over
_MIN_ROWS = 16  # tl.dot needs at least 16 rows: query groups are padded up to this
# A split that spans this many blocks of the cache or more runs on 2 warps, fewer on 4.
MANY_BLOCKS = 4


def num_splits(batch: int, kv_heads: int, max_seq: int) -> int:
    """Splits of the sequence per (row, KV head): enough programs to fill the GPU, none
    shorter than one block."""
    want = -(-TARGET_PROGRAMS // (batch * kv_heads))
    return max(1, min(want, -(-max_seq // BLOCK_N)))


def split_warps(max_seq: int, splits: int) -> int:
    """Warps of a split program: 2 where a split spans MANY_BLOCKS blocks of the cache or
    more, 4 below. Measured on an H200, Llama-2-7B's decode step replayed from its CUDA graph
    against every split on 4 warps (profile_decode.py --variants; design note 38): batch 8 at
    TP 1 (5 blocks a split) 1.6-3.1% faster and batch 64 (9 blocks) 3.7-5.8%; on 2 warps
    everywhere, batch 1 (one block) would be up to 1.4% slower and batch 8 at TP 2 (3 blocks)
    2.8-4.8%. The kernel alone (bench_decode_attention.py) can disagree: it put steps of 32
    positions on 2 warps 23-30% ahead for splits of 2-4 blocks, and the step ran 1.7-3.6%
    slower with them. The step decides."""
    positions = -(-max_seq // splits)  # the most a split attends to
    blocks = -(-positions // BLOCK_N)
    return 2 if blocks >= MANY_BLOCKS else 4


def decode_attention_triton(
    q: torch.Tensor, cache: KVCache, positions: torch.Tensor
) -> torch.Tensor:
    """Split-K decode attention (see the module docstring); q's dtype in and out."""
    if triton is None:
        raise RuntimeError("decode_attention_triton needs Triton")
    B, H, hd = _check(q, cache, positions)
    Hkv = cache.k.shape[2]
    group = H // Hkv
    if hd & (hd - 1) or hd < 16:
        raise ValueError(f"decode_attention_triton needs a power-of-two head_dim >= 16, got {hd}")
    splits = num_splits(B, Hkv, cache.max_seq)
    if q.stride(-1) != 1:
        q = q.contiguous()  # rows and heads may be strided (q is a slice of the RoPE output)
    acc = torch.empty(B, H, splits, hd, device=q.device, dtype=torch.float32)
    m = torch.empty(B, H, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    k_scale = cache.k_scale if cache.int8 else cache.k  # unused when not INT8
    v_scale = cache.v_scale if cache.int8 else cache.v
    _decode_split_kernel[(B, Hkv, splits)](
        q, cache.k, cache.v, k_scale, v_scale, positions, acc, m, l,
        q.stride(0), q.stride(1), positions.stride(0),
        cache.k.stride(0), cache.k.stride(1), cache.k.stride(2),
        k_scale.stride(0), k_scale.stride(1),
        1.0 / math.sqrt(hd), splits,
        G=group, G_PAD=max(_MIN_ROWS, triton.next_power_of_2(group)), HD=hd, BLOCK_N=BLOCK_N,
        INT8=cache.int8, IEEE=q.dtype == torch.float32,
        num_warps=split_warps(cache.max_seq, splits),
        **pdl.triton_args(q.device),
    )
    out = torch.empty(B, H, hd, device=q.device, dtype=q.dtype)
    _combine_kernel[(B * H,)](acc, m, l, out, splits, HD=hd,
                              SPLITS_PAD=triton.next_power_of_2(splits),
                              **pdl.triton_args(q.device))
    return out


if triton is not None:

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, KS, VS, POS, ACC, M, L,
        stride_qb, stride_qh, stride_pos,
        stride_kb, stride_ks, stride_kh,
        stride_sb, stride_ss,
        sm_scale, n_splits,
        G: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr,
        INT8: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
            gdc_wait()
            gdc_launch_dependents()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(POS + b * stride_pos).to(tl.int32) + 1  # positions 0 .. pos
        # this split's positions: an equal share of the row's length, in whole blocks
        chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, length)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HD)
        n = tl.arange(0, BLOCK_N)
        heads = kvh * G + g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=(g < G)[:, None], other=0.0)  # [G_PAD, HD]
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HD], tl.float32)
        base = b * stride_kb + kvh * stride_kh
        s0 = start
        while s0 < end:  # a while loop: Triton's interpreter cannot take a loaded bound in range()
            pos = s0 + n
            valid = pos < end
            offs = base + pos[:, None] * stride_ks + d[None, :]
            k = tl.load(K + offs, mask=valid[:, None], other=0)
            v = tl.load(V + offs, mask=valid[:, None], other=0)
            if INT8:
                soffs = b * stride_sb + pos * stride_ss + kvh
                ks = tl.load(KS + soffs, mask=valid, other=0.0)
                vs = tl.load(VS + soffs, mask=valid, other=0.0)
                k = (k.to(tl.float32) * ks[:, None]).to(q.dtype)
                v = (v.to(tl.float32) * vs[:, None]).to(q.dtype)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * sm_scale, float("-inf"))  # [G_PAD, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
            s0 += BLOCK_N

        keep = g < G
        row = (b * (tl.num_programs(1) * G) + heads) * n_splits + split  # [B, H, splits] index
        tl.store(M + row, m_i, mask=keep)
        tl.store(L + row, l_i, mask=keep)
        tl.store(ACC + row[:, None] * HD + d[None, :], acc, mask=keep[:, None])

    @triton.jit
    def _combine_kernel(ACC, M, L, OUT, n_splits, HD: tl.constexpr, SPLITS_PAD: tl.constexpr,
                        PDL: tl.constexpr):
        """One (row, head): the splits weighted by exp(m_s - max m), one launch instead of
        torch's seven. A split that saw no position has m = -inf and weight 0 (split 0 always
        sees position 0, so the max is finite)."""
        if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
            gdc_wait()
            gdc_launch_dependents()
        bh = tl.program_id(0)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HD)
        valid = s < n_splits
        m = tl.load(M + bh * n_splits + s, mask=valid, other=float("-inf"))
        l = tl.load(L + bh * n_splits + s, mask=valid, other=0.0)
        w = tl.where(valid, tl.exp(m - tl.max(m, 0)), 0.0)
        acc = tl.load(ACC + (bh * n_splits + s)[:, None] * HD + d[None, :],
                      mask=valid[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(OUT + bh * HD + d, out.to(OUT.dtype.element_ty))
