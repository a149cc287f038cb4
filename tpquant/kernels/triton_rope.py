"""RoPE in one Triton kernel: `tpquant.models.llama.apply_rope` on CUDA tensors.

In torch, rotating q and k takes ~20 small kernels per layer (casts, chunks, four products,
a sum, a difference, a cat, a cast back, for each of q and k); at batch 1 a decode step is
mostly such launches (benchmarks/profile_decode.py). Here one program rotates BLOCK_H heads of
one token: the same float32 math as the reference (pair i is (x[i], x[i + hd/2])), the result
in x's dtype. q and k go through together: they are adjacent in the fused qkv output.

Layout: x [B, T, NH, hd] whose rows (b, t) are evenly strided and whose heads are contiguous
(a slice of the qkv output, or anything contiguous); cos / sin float32 [B, T, hd/2]. Other
layouts are made contiguous first; tensors past 2^31 elements (32-bit offsets) take torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tpquant.kernels import pdl

_MAX_BLOCK_H = 16


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, n_heads, stride_xr, stride_or,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                 PDL: tl.constexpr):
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0)  # token (b, t)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF_PAD)
    dm = d < HALF
    mask = (h < n_heads)[:, None] & dm[None, :]
    offs = h[:, None] * (2 * HALF) + d[None, :]
    x1 = tl.load(X + row * stride_xr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + row * stride_xr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(COS + row * HALF + d, mask=dm, other=0.0)[None, :]
    s = tl.load(SIN + row * HALF + d, mask=dm, other=0.0)[None, :]
    out = OUT + row * stride_or + offs
    tl.store(out, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=mask)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, NH, hd] rotated by cos / sin [B, T, hd/2]: a new contiguous tensor, x's dtype."""
    B, T, NH, hd = x.shape
    half = hd // 2
    if hd % 2 or cos.shape != (B, T, half) or sin.shape != cos.shape:
        raise ValueError(f"RoPE: x {tuple(x.shape)} and cos/sin {tuple(cos.shape)} do not fit")
    # token (b, t) sits at row b * T + t, `row_stride` apart: the batch and token strides must
    # nest (with one token per row, the batch stride alone)
    row_stride = x.stride(0) if T == 1 else x.stride(1)
    nested = T == 1 or B == 1 or x.stride(0) == T * x.stride(1)
    if not (nested and x.stride(2) == hd and x.stride(3) == 1):
        x = x.contiguous()
        row_stride = NH * hd
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty(B, T, NH, hd, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if B * T * max(row_stride, NH * hd) >= 2**31:  # the kernel's offsets are 32-bit
        from tpquant.models.llama import apply_rope_reference

        return apply_rope_reference(x, cos, sin)
    block_h = min(triton.next_power_of_2(NH), _MAX_BLOCK_H)
    _rope_kernel[(B * T, triton.cdiv(NH, block_h))](
        x, cos, sin, out, NH, row_stride, NH * hd,
        HALF=half, HALF_PAD=triton.next_power_of_2(half), BLOCK_H=block_h,
        **pdl.triton_args(x.device),
    )
    return out
