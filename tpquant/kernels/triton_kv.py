"""Writing new keys and values into a float KV cache in one Triton kernel (`KVCache.write`).

In torch a write is several kernels per layer: the flat row index (rows * max_seq + pos, three
small kernels) and one `index_copy_` each for k and v. Here program (b, t) reads pos[b, t] on
the device and copies that token's k and v (Hkv * hd values each) to cache row
b * max_seq + pos[b, t]: one launch, no host sync (CUDA-graph safe), values converted to the
cache's dtype as `index_copy_` after `.to` would.

Layout: caches contiguous [max_batch, max_seq, Hkv, hd]; k, v [B, T, Hkv, hd] with each token's
heads contiguous (slices of the qkv / RoPE outputs are), any batch and token strides; pos [B, T]
integer, any strides. The INT8 cache (scales per token and head) keeps the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tpquant.kernels import pdl

_BLOCK = 1024


@triton.jit
def _kv_write_kernel(K, V, POS, KC, VC, T, max_seq, row,
                     stride_kb, stride_kt, stride_vb, stride_vt, stride_pb, stride_pt,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    tok = tl.program_id(0)
    b, t = tok // T, tok % T
    p = tl.load(POS + b * stride_pb + t * stride_pt).to(tl.int64)
    dst = (b.to(tl.int64) * max_seq + p) * row
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row
    k = tl.load(K + b.to(tl.int64) * stride_kb + t * stride_kt + offs, mask=mask)
    v = tl.load(V + b.to(tl.int64) * stride_vb + t * stride_vt + offs, mask=mask)
    tl.store(KC + dst + offs, k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + dst + offs, v.to(VC.dtype.element_ty), mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k, v [B, T, Hkv, hd] of rows 0..B-1 at positions pos [B, T] (device values,
    0 <= pos < max_seq: the caller's rule, not checked without a sync)."""
    B, T = pos.shape
    MB, S, Hkv, hd = k_cache.shape
    if (v_cache.shape != k_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or k.shape != (B, T, Hkv, hd) or v.shape != k.shape or B > MB):
        raise ValueError(
            f"KV write: caches {tuple(k_cache.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"pos {tuple(pos.shape)} do not fit"
        )
    k, v = (x if x.stride(3) == 1 and x.stride(2) == hd else x.contiguous() for x in (k, v))
    row = Hkv * hd
    if B * T and row:
        _kv_write_kernel[(B * T, triton.cdiv(row, _BLOCK))](
            k, v, pos, k_cache, v_cache, T, S, row,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), pos.stride(0), pos.stride(1),
            BLOCK=_BLOCK, num_warps=4, **pdl.triton_args(k.device),
        )
