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

`decode_attention_rope` takes the step further back, to the qkv projection's output: its split
kernel rotates q and the new key (the same float32 math as `tpquant.models.llama.apply_rope`),
stores the new key and value at the row's position (what `KVCache.write` does) and attends to
them from registers. It serves shapes whose splits are one block of the cache each (a decode
step of few rows: batch 1 at Llama-2-7B's shapes; `fuses_rope`), where it reads its whole
block of the cache before the PDL wait, while the qkv GEMV before it still runs: no kernel of
the step writes those positions. Design note 46 has
the measurements behind that rule (the fused kernel lost where splits loop over blocks).
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


def fuses_rope(cache: KVCache, batch: int) -> bool:
    """Whether `decode_attention_rope` serves a decode step of `batch` rows over this cache: a
    float cache on CUDA (with Triton) whose splits span one block each, with PDL on (without
    its early loads the fused kernel lost to the four it replaces: design note 46)."""
    if triton is None or not cache.k.is_cuda or cache.int8 or not pdl.enabled(cache.k.device):
        return False
    return one_block(cache.max_seq, num_splits(batch, cache.k.shape[2], cache.max_seq))


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


def one_block(max_seq: int, splits: int) -> bool:
    """Whether each split attends to at most one block of positions."""
    return -(-max_seq // splits) <= BLOCK_N


def decode_attention_triton(
    q: torch.Tensor, cache: KVCache, positions: torch.Tensor
) -> torch.Tensor:
    """Split-K decode attention (see the module docstring); q's dtype in and out."""
    B, H, hd = _check(q, cache, positions)
    splits, group, g_pad = _plan(B, H, cache)
    if q.stride(-1) != 1:
        q = q.contiguous()  # rows and heads may be strided (q is a slice of the RoPE output)
    acc, m, l = _split_buffers(B, H, splits, hd, q.device)
    k_scale = cache.k_scale if cache.int8 else cache.k  # unused when not INT8
    v_scale = cache.v_scale if cache.int8 else cache.v
    _decode_split_kernel[(B, cache.k.shape[2], splits)](
        q, cache.k, cache.v, k_scale, v_scale, positions, acc, m, l,
        q.stride(0), q.stride(1), positions.stride(0),
        cache.k.stride(0), cache.k.stride(1), cache.k.stride(2),
        k_scale.stride(0), k_scale.stride(1),
        1.0 / math.sqrt(hd), splits,
        G=group, G_PAD=g_pad, HD=hd, BLOCK_N=BLOCK_N,
        INT8=cache.int8, IEEE=q.dtype == torch.float32,
        num_warps=split_warps(cache.max_seq, splits),
        **pdl.triton_args(q.device),
    )
    return _combine(acc, m, l, q.dtype)


def decode_attention_rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache,
    positions: torch.Tensor,
    n_heads: int,
) -> torch.Tensor:
    """RoPE, the KV-cache write and decode attention in one split kernel (and the combine).

    qkv [B, (H + 2 Hkv) * hd] (this rank's [q | k | v] heads, each head's values contiguous),
    cos / sin [B, hd / 2] (float32, at each row's position), H = n_heads: q and the new key
    rotated, the new key and value stored at positions[b] of the float cache, q attending to
    positions 0 .. positions[b] -> [B, H, hd] in qkv's dtype. Splits must span one block each
    (`fuses_rope` says where they do). Under PDL the kernel reads `positions` and the cache
    below them before its wait: the kernel just before (the qkv GEMV) must write neither.
    """
    B = positions.shape[0]
    Hkv, hd = cache.k.shape[2], cache.k.shape[3]
    width = (n_heads + 2 * Hkv) * hd
    if (qkv.shape != (B, width) or qkv.stride(1) != 1 or cos.shape != (B, hd // 2)
            or sin.shape != cos.shape or n_heads % Hkv or cache.int8):
        raise ValueError(
            f"decode attention with RoPE: qkv {tuple(qkv.shape)} (want [{B}, {width}] for "
            f"{n_heads} query heads), cos/sin {tuple(cos.shape)}, cache {tuple(cache.k.shape)}"
            f"{' int8 (float caches only)' if cache.int8 else ''}"
        )
    _check(qkv[:, : n_heads * hd].view(B, n_heads, hd), cache, positions)
    splits, group, g_pad = _plan(B, n_heads, cache)
    if not one_block(cache.max_seq, splits):
        raise ValueError(
            f"decode_attention_rope: batch {B} over {cache.max_seq} positions splits into "
            f"{splits} of more than {BLOCK_N} positions (see fuses_rope)"
        )
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    acc, m, l = _split_buffers(B, n_heads, splits, hd, qkv.device)
    _decode_rope_kernel[(B, Hkv, splits)](
        qkv, cos, sin, cache.k, cache.v, positions, acc, m, l,
        qkv.stride(0), positions.stride(0),
        cache.k.stride(0), cache.k.stride(1), cache.k.stride(2),
        1.0 / math.sqrt(hd), splits,
        G=group, G_PAD=g_pad, HD=hd, BLOCK_N=BLOCK_N, IEEE=qkv.dtype == torch.float32,
        num_warps=split_warps(cache.max_seq, splits),
        **pdl.triton_args(qkv.device),
    )
    return _combine(acc, m, l, qkv.dtype)


def _plan(B: int, H: int, cache: KVCache) -> tuple[int, int, int]:
    """(splits, query heads per KV head, that group padded for tl.dot)."""
    if triton is None:
        raise RuntimeError("decode attention's Triton kernels need Triton")
    Hkv, hd = cache.k.shape[2], cache.k.shape[3]
    if hd & (hd - 1) or hd < 16:
        raise ValueError(
            f"decode attention's Triton kernels need a power-of-two head_dim >= 16, got {hd}")
    group = H // Hkv
    return num_splits(B, Hkv, cache.max_seq), group, max(_MIN_ROWS, triton.next_power_of_2(group))


def _split_buffers(B: int, H: int, splits: int, hd: int, device: torch.device):
    """Each split's float32 sums, running max and sum of weights: acc [B, H, splits, hd], m, l."""
    acc = torch.empty(B, H, splits, hd, device=device, dtype=torch.float32)
    m = torch.empty(B, H, splits, device=device, dtype=torch.float32)
    return acc, m, torch.empty_like(m)


def _combine(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """The splits' results combined (`_combine_kernel`) -> [B, H, hd] in `dtype`."""
    B, H, splits, hd = acc.shape
    out = torch.empty(B, H, hd, device=acc.device, dtype=dtype)
    _combine_kernel[(B * H,)](acc, m, l, out, splits, HD=hd,
                              SPLITS_PAD=triton.next_power_of_2(splits),
                              **pdl.triton_args(acc.device))
    return out


if triton is not None:

    @triton.jit
    def _attend(q, k, v, valid, m_i, l_i, acc, sm_scale, IEEE: tl.constexpr):
        """One block of keys and values [BLOCK_N, HD] (positions where `valid`) into the
        running max m_i, sum l_i and weighted sum acc of q's rows (online softmax)."""
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
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _attend_one(q, k, v, m_i, l_i, acc, sm_scale):
        """`_attend` for one position, its key and value [HD] from registers (float32 math)."""
        s = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1) * sm_scale
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        return m_new, l_i * alpha + p, acc * alpha[:, None] + p[:, None] * v.to(tl.float32)[None, :]

    @triton.jit
    def _store_split(ACC, M, L, m_i, l_i, acc, b, kvh, split, n_splits,
                     G: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr):
        """A split's results for the group's query heads, at [B, H, splits] (acc: [.., HD])."""
        g = tl.arange(0, G_PAD)
        keep = g < G
        row = (b * (tl.num_programs(1) * G) + kvh * G + g) * n_splits + split
        tl.store(M + row, m_i, mask=keep)
        tl.store(L + row, l_i, mask=keep)
        tl.store(ACC + row[:, None] * HD + tl.arange(0, HD)[None, :], acc, mask=keep[:, None])

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
            m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, sm_scale, IEEE)
            s0 += BLOCK_N
        _store_split(ACC, M, L, m_i, l_i, acc, b, kvh, split, n_splits, G, G_PAD, HD)

    @triton.jit
    def _rotate(x, partner, cos, sin, first_half):
        """RoPE ("rotate halves": pair i is (x[i], x[i + hd/2])) in float32, given each value's
        partner in its pair: x c - x' s in the first half, x c + x' s in the second."""
        x, partner = x.to(tl.float32), partner.to(tl.float32)
        return tl.where(first_half, x * cos - partner * sin, x * cos + partner * sin)

    @triton.jit
    def _decode_rope_kernel(
        QKV, COS, SIN, K, V, POS, ACC, M, L,
        stride_qkv, stride_pos,
        stride_kb, stride_ks, stride_kh,
        sm_scale, n_splits,
        G: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr, PDL: tl.constexpr,
    ):
        """_decode_split_kernel for splits of one block, from the qkv row (module docstring)."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        n_kv = tl.num_programs(1)
        n_heads = n_kv * G
        # Before the wait, only what no kernel of this step writes (tpquant.kernels.pdl): the
        # positions (copied in before the step) and the cache below the new position (earlier
        # steps'), which this split reads while the qkv GEMV before it runs.
        new = tl.load(POS + b * stride_pos).to(tl.int32)  # the query's position
        # one block a split (decode_attention_rope's rule): d523690's equal shares of the
        # row's length, in whole blocks, are then these
        start = split * BLOCK_N
        n = tl.arange(0, BLOCK_N)
        d = tl.arange(0, HD)
        cached = start + n < new  # the new position comes last, from registers
        base = b * stride_kb + kvh * stride_kh
        offs = base + (start + n)[:, None] * stride_ks + d[None, :]
        k = tl.load(K + offs, mask=cached[:, None], other=0)
        v = tl.load(V + offs, mask=cached[:, None], other=0)
        if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
            gdc_wait()
            gdc_launch_dependents()

        HALF: tl.constexpr = HD // 2
        first_half = d < HALF
        partner = tl.where(first_half, d + HALF, d - HALF)
        cos = tl.load(COS + b * HALF + d % HALF)
        sin = tl.load(SIN + b * HALF + d % HALF)
        g = tl.arange(0, G_PAD)
        row = QKV + b * stride_qkv
        q_ptrs = row + (kvh * G + g)[:, None] * HD
        q = _rotate(tl.load(q_ptrs + d[None, :], mask=(g < G)[:, None], other=0.0),
                    tl.load(q_ptrs + partner[None, :], mask=(g < G)[:, None], other=0.0),
                    cos[None, :], sin[None, :], first_half[None, :]).to(QKV.dtype.element_ty)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HD], tl.float32)
        if start < new:  # cached positions (a max of -inf everywhere would make NaNs)
            m_i, l_i, acc = _attend(q, k, v, cached, m_i, l_i, acc, sm_scale, IEEE)
        if new // BLOCK_N == split:  # this split holds the new position
            k_row = row + (n_heads + kvh) * HD
            # RoPE's output is in the model's dtype; the cache's may differ
            k_new = _rotate(tl.load(k_row + d), tl.load(k_row + partner), cos, sin, first_half)
            k_new = k_new.to(QKV.dtype.element_ty).to(K.dtype.element_ty)
            v_new = tl.load(row + (n_heads + n_kv + kvh) * HD + d).to(K.dtype.element_ty)
            tl.store(K + base + new * stride_ks + d, k_new)
            tl.store(V + base + new * stride_ks + d, v_new)
            m_i, l_i, acc = _attend_one(q, k_new, v_new, m_i, l_i, acc, sm_scale)
        _store_split(ACC, M, L, m_i, l_i, acc, b, kvh, split, n_splits, G, G_PAD, HD)

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
