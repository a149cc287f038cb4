"""RoPE in one Triton kernel: `tpquant.models.llama.apply_rope` on CUDA tensors, and the same
kernel storing the new keys and values in the KV cache (`rope_write_kv`).

In torch, rotating q and k takes ~20 small kernels per layer (casts, chunks, four products,
a sum, a difference, a cat, a cast back, for each of q and k); at batch 1 a decode step is
mostly such launches (benchmarks/profile_decode.py). Here one program rotates BLOCK_H heads of
one token: the same float32 math as the reference (pair i is (x[i], x[i + hd/2])), the result
in x's dtype. q and k go through together: they are adjacent in the fused qkv output.

`rope_write_kv` takes the whole fused row (q, k and v heads) and also stores the rotated k and
the unrotated v at the token's cache position, as `KVCache.write` would after `apply_rope`
(the k values rounded to x's dtype first, then to the cache's): one launch per layer instead
of two (`tpquant.kernels.triton_kv`), and k read once.

Layout: x [B, T, NH, hd] whose rows (b, t) are evenly strided and whose heads are contiguous
(a slice of the qkv output, or anything contiguous); cos / sin float32 [B, T, hd/2]; a cache
contiguous [max_batch, max_seq, Hkv, hd]. Other layouts of x are made contiguous first;
tensors past 2^31 elements (32-bit offsets) take torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tpquant.kernels import pdl

_MAX_BLOCK_H = 16


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, KC, VC, POS, n_heads, n_rot, n_q, T, max_seq,
                 stride_xr, stride_or, stride_pb, stride_pt,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                 CACHE: tl.constexpr, PDL: tl.constexpr):
    """Heads 0 .. n_rot - 1 of row (b, t) rotated into OUT; with CACHE, heads n_q .. n_rot - 1
    (rotated k) and n_rot .. n_heads - 1 (v, as they are) also stored at the row's position
    in KC / VC. Without CACHE, n_rot = n_heads."""
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0)  # token (b, t)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF_PAD)
    dm = d < HALF
    mask = (h < n_heads)[:, None] & dm[None, :]
    offs = h[:, None] * (2 * HALF) + d[None, :]
    x1 = tl.load(X + row * stride_xr + offs, mask=mask, other=0.0)
    x2 = tl.load(X + row * stride_xr + offs + HALF, mask=mask, other=0.0)
    c = tl.load(COS + row * HALF + d, mask=dm, other=0.0)[None, :]
    s = tl.load(SIN + row * HALF + d, mask=dm, other=0.0)[None, :]
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    r1 = (a * c - b * s).to(OUT.dtype.element_ty)
    r2 = (b * c + a * s).to(OUT.dtype.element_ty)
    rotated = mask & (h < n_rot)[:, None]
    out = OUT + row * stride_or + offs
    tl.store(out, r1, mask=rotated)
    tl.store(out + HALF, r2, mask=rotated)
    if CACHE:
        p = tl.load(POS + (row // T) * stride_pb + (row % T) * stride_pt).to(tl.int64)
        hd = 2 * HALF
        dst = ((row // T).to(tl.int64) * max_seq + p) * ((n_heads - n_rot) * hd)
        is_k = rotated & (h >= n_q)[:, None]
        k_at = KC + dst + (h - n_q)[:, None] * hd + d[None, :]
        tl.store(k_at, r1.to(KC.dtype.element_ty), mask=is_k)
        tl.store(k_at + HALF, r2.to(KC.dtype.element_ty), mask=is_k)
        is_v = mask & (h >= n_rot)[:, None]
        v_at = VC + dst + (h - n_rot)[:, None] * hd + d[None, :]
        tl.store(v_at, x1.to(VC.dtype.element_ty), mask=is_v)
        tl.store(v_at + HALF, x2.to(VC.dtype.element_ty), mask=is_v)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, NH, hd] rotated by cos / sin [B, T, hd/2]: a new contiguous tensor, x's dtype."""
    return _launch(x, cos, sin, None)


def rope_write_kv(qkv: torch.Tensor, n_q: int, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """qkv [B, T, n_q + 2 Hkv, hd]: its q and k heads rotated, [B, T, n_q + Hkv, hd] (a new
    tensor), and rotated k and v stored in the caches [max_batch, max_seq, Hkv, hd] at
    positions pos [B, T] of rows 0 .. B - 1 (device values, 0 <= pos < max_seq: the caller's
    rule, not checked without a sync)."""
    B, T, NH, hd = qkv.shape
    MB, S, Hkv, _ = k_cache.shape
    if (v_cache.shape != k_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or NH != n_q + 2 * Hkv or k_cache.shape[3] != hd or pos.shape != (B, T) or B > MB):
        raise ValueError(
            f"RoPE + KV write: qkv {tuple(qkv.shape)} with {n_q} query heads, caches "
            f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}, pos {tuple(pos.shape)} do not fit"
        )
    return _launch(qkv, cos, sin, (n_q, k_cache, v_cache, pos))


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
    B, T, NH, hd = x.shape
    half = hd // 2
    if hd % 2 or cos.shape != (B, T, half) or sin.shape != cos.shape:
        raise ValueError(f"RoPE: x {tuple(x.shape)} and cos/sin {tuple(cos.shape)} do not fit")
    n_rot = NH if cache is None else NH - cache[1].shape[2]  # the q and k heads
    # token (b, t) sits at row b * T + t, `row_stride` apart: the batch and token strides must
    # nest (with one token per row, the batch stride alone)
    row_stride = x.stride(0) if T == 1 else x.stride(1)
    nested = T == 1 or B == 1 or x.stride(0) == T * x.stride(1)
    if not (nested and x.stride(2) == hd and x.stride(3) == 1):
        x = x.contiguous()
        row_stride = NH * hd
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty(B, T, n_rot, hd, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if B * T * max(row_stride, NH * hd) >= 2**31:  # the kernel's offsets into x are 32-bit
        from tpquant.models.llama import apply_rope_reference

        out = apply_rope_reference(x[:, :, :n_rot], cos, sin)
        if cache is not None:  # the KV write's own kernel
            from tpquant.kernels.triton_kv import write_kv

            n_q, k_cache, v_cache, pos = cache
            write_kv(k_cache, v_cache, pos, out[:, :, n_q:], x[:, :, n_rot:])
        return out
    # without a cache, its pointers are x's and cos's (never stored to or read)
    n_q, k_cache, v_cache, pos = cache if cache is not None else (NH, x, x, cos)
    block_h = min(triton.next_power_of_2(NH), _MAX_BLOCK_H)
    _rope_kernel[(B * T, triton.cdiv(NH, block_h))](
        x, cos, sin, out, k_cache, v_cache, pos, NH, n_rot, n_q, T, k_cache.shape[1],
        row_stride, n_rot * hd, pos.stride(0), pos.stride(1),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), BLOCK_H=block_h,
        CACHE=cache is not None, **pdl.triton_args(x.device),
    )
    return out
