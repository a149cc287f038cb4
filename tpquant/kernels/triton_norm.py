"""Triton kernels for RMSNorm, alone, after a residual add, and fused with int8 quantization
(the SmoothQuant RMSNorm).

Math as in tpquant.kernels.norm.rms_norm_f32, in float32: inv_rms = 1 / sqrt(mean(x^2) + eps)
(correctly rounded sqrt and division), y = x * inv_rms * weight. The sum of squares runs in a
different order than torch's, so y may differ from the reference by a few float32 ulps; the
fused quantizer then rounds y with the reference's exact rules (triton_w8a8.quantize_int8), so
an int8 code can differ by one step only where y / scale is within those ulps of a rounding
tie, and the per-token scale by the same few ulps.

The residual form (`add_rms_norm`) writes s = x + delta rounded to x's dtype, exactly as torch's
add, and normalizes that rounded s: the same numbers as an add followed by `rms_norm`, in one
kernel instead of two (a decode step has two per layer).

The SmoothQuant RMSNorm reads a row of up to triton_w8a8.ONE_PASS_MAX_K features once and
normalizes it in registers (triton_w8a8.row_plan); longer rows, and the plain and residual
RMSNorm, re-read the row from cache in each pass, in chunks of up to 4096, except the residual
RMSNorm of a decode step asked to read its residual early (`reads_once_early`): its row, of up
to 4096 features, is read once, residual and weight before the PDL wait.

Launchers take CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; no host sync, so every
launch is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tpquant.kernels import pdl
from tpquant.kernels.triton_w8a8 import (
    as_rows,
    check_scalar,
    check_vector,
    output,
    quantize_int8,
    row_block,
    row_plan,
    row_scale,
)


@triton.jit
def _row(x_row, d_row, offs, mask, HAS_DELTA: tl.constexpr):
    """x (+ delta, rounded to x's dtype as torch's add rounds) at offs, as float32."""
    v = tl.load(x_row + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        v = _add(v, tl.load(d_row + offs, mask=mask, other=0.0))
    return v.to(tl.float32)


@triton.jit
def _add(x, d):
    """x + d rounded to x's dtype, as torch's add rounds."""
    return (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)


@triton.jit
def _inv_rms(x_row, d_row, s_row, K, k_float, eps, HAS_DELTA: tl.constexpr,
             BLOCK: tl.constexpr):
    """1 / rms of the row; with a delta, the rounded sums are also stored to s_row."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = _row(x_row, d_row, offs, offs < K, HAS_DELTA)
        if HAS_DELTA:
            tl.store(s_row + offs, v.to(s_row.dtype.element_ty), mask=offs < K)
        acc += v * v
    return _inv_rms_of(tl.sum(acc, axis=0), k_float, eps)


@triton.jit
def _inv_rms_of(sum_sq, k_float, eps):
    """1 / sqrt(sum_sq / k + eps), every step correctly rounded."""
    return tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(sum_sq, k_float) + eps))


@triton.jit
def _normed(x_row, d_row, w_ptr, offs, mask, inv_rms, HAS_DELTA: tl.constexpr):
    return _weighted(_row(x_row, d_row, offs, mask, HAS_DELTA), w_ptr, offs, mask, inv_rms)


@triton.jit
def _weighted(v, w_ptr, offs, mask, inv_rms):
    """The normalized row: v * inv_rms * weight, in that order (the reference's)."""
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return v * inv_rms * w


@triton.jit
def _add_norm_once(x_row, d_row, w_ptr, y_row, s_row, K, k_float, eps, BLOCK: tl.constexpr,
                   PDL: tl.constexpr):
    """The residual add + RMSNorm of a row in one block, read once: the residual and the
    weight, which the kernel before did not write (`reads_once_early`), before the PDL wait,
    the delta (its output) after. The same sums as the passes; the sum of squares may add up
    in another order."""
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    s = _add(x, tl.load(d_row + offs, mask=mask, other=0.0))
    tl.store(s_row + offs, s, mask=mask)
    v = s.to(tl.float32)
    inv_rms = _inv_rms_of(tl.sum(v * v, axis=0), k_float, eps)
    tl.store(y_row + offs, (v * inv_rms * w).to(y_row.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr, d_ptr, w_ptr, y_ptr, s_ptr, K, stride_x, stride_d, stride_y, k_float, eps,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    d_row = d_ptr + row * stride_d
    if EARLY:
        _add_norm_once(x_row, d_row, w_ptr, y_ptr + row * stride_y, s_ptr + row * stride_y, K,
                       k_float, eps, BLOCK, PDL)
    else:
        if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
            gdc_wait()
            gdc_launch_dependents()
        # With a delta the second pass recomputes x + delta (same rounding) rather than
        # reading back s, which other threads of the program may have written.
        inv_rms = _inv_rms(x_row, d_row, s_ptr + row * stride_y, K, k_float, eps, HAS_DELTA,
                           BLOCK)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            y = _normed(x_row, d_row, w_ptr, offs, mask, inv_rms, HAS_DELTA)
            tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_quantize_kernel(
    x_ptr, w_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, k_float, eps,
    PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if ONE_PASS:  # the row in one block, read once and normalized in registers
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        v = _row(x_row, x_row, offs, mask, False)
        y = _weighted(v, w_ptr, offs, mask, _inv_rms_of(tl.sum(v * v, axis=0), k_float, eps))
        scale = row_scale(tl.abs(y), scale_ptr, row, PER_TOKEN)
        tl.store(q_ptr + row * stride_q + offs, quantize_int8(y, scale), mask=mask)
    else:
        # Passes over the row (re-read from cache): sum of squares, amax of y (per token),
        # codes.
        inv_rms = _inv_rms(x_row, x_row, x_row, K, k_float, eps, False, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        if PER_TOKEN:
            for k0 in range(0, K, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                amax = tl.maximum(amax, tl.abs(_normed(x_row, x_row, w_ptr, offs, offs < K,
                                                       inv_rms, False)))
        scale = row_scale(amax, scale_ptr, row, PER_TOKEN)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            y = _normed(x_row, x_row, w_ptr, offs, mask, inv_rms, False)
            tl.store(q_ptr + row * stride_q + offs, quantize_int8(y, scale), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of x [..., K] with weight [K]: float32 math, returned in x's dtype
    (written into `out` if given)."""
    x2 = as_rows(x, "x")
    rows, k = x2.shape
    w = check_vector(weight, k, x2, "weight")
    y = output(out, (rows, k), x.dtype, x2, "out")
    _launch_norm(x2, None, w, y, None, eps)
    return y.reshape(x.shape)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, *,
    early_residual: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, RMSNorm(s)) with s = x + delta in x's dtype; x, delta [..., K] of one shape.

    early_residual: x and weight were written before the kernel that runs just before this one
    (x is the residual stream, delta the output of the layer just run), so under PDL the kernel
    may read them before its wait, while that kernel still runs (where `reads_once_early`)."""
    if delta.shape != x.shape or delta.dtype != x.dtype:
        raise ValueError(
            f"delta must match x: got {delta.dtype} {tuple(delta.shape)} for x {x.dtype} "
            f"{tuple(x.shape)}"
        )
    x2, d2 = as_rows(x, "x"), as_rows(delta, "delta")
    rows, k = x2.shape
    w = check_vector(weight, k, x2, "weight")
    s, y = (torch.empty((rows, k), dtype=x.dtype, device=x.device) for _ in range(2))
    # a copy made above is the kernel just before: then x2 or w may not be read early
    early_residual = (early_residual and x2.data_ptr() == x.data_ptr()
                      and w.data_ptr() == weight.data_ptr())
    _launch_norm(x2, d2, w, y, s, eps, early_residual)
    return s.reshape(x.shape), y.reshape(x.shape)


# The decode step's batches (its CUDA-graph buckets), where reading the residual early was
# measured (design note 46); a prefill keeps the passes.
DECODE_ROWS = 64


def reads_once_early(early_residual: bool, has_delta: bool, rows: int, k: int) -> bool:
    """Whether the residual add + RMSNorm reads its rows once, residual and weight before the
    PDL wait: asked for, with a delta to wait for, a decode step's rows, each in one block."""
    return early_residual and has_delta and rows <= DECODE_ROWS and k <= row_block(k)[0]


def _launch_norm(x2: torch.Tensor, d2: torch.Tensor | None, w: torch.Tensor, y: torch.Tensor,
                 s: torch.Tensor | None, eps: float, early_residual: bool = False) -> None:
    rows, k = x2.shape
    if rows:
        # Re-read in passes even when the row fits one block, unless the residual can load
        # before the wait (design note 46): read once, the residual RMSNorm alone was no
        # faster at M = 1 (sweep_gemm_variants.py --parts norm, H200: 3.5 against 3.2 us at
        # K = 8192) and mixed above (0.86-1.28x).
        block, warps = row_block(k)
        _rms_norm_kernel[(rows,)](
            x2, x2 if d2 is None else d2, w, y, y if s is None else s, k, x2.stride(0),
            x2.stride(0) if d2 is None else d2.stride(0), y.stride(0), float(k), float(eps),
            HAS_DELTA=d2 is not None, BLOCK=block,
            EARLY=reads_once_early(early_residual, d2 is not None, rows, k),
            num_warps=warps, **pdl.triton_args(x2.device),
        )


def rms_norm_quantize(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    static_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm straight into int8: (q int8 [..., K], scale).

    scale: float32 [..., 1] per token when static_scale is None, else static_scale as a
    float32 scalar []. No float copy of the normalized x is written. out / scale_out:
    optional int8 [..., K] / float32 [..., 1] tensors to write into.
    """
    x2 = as_rows(x, "x")
    rows, k = x2.shape
    w = check_vector(weight, k, x2, "weight")
    q = output(out, (rows, k), torch.int8, x2, "out")
    if static_scale is None:
        scale = output(scale_out, (rows,), torch.float32, x2, "scale_out")
    else:
        scale = check_scalar(static_scale, x2, "static_scale")
    if rows:
        block, warps, one_pass = row_plan(k)
        _rms_norm_quantize_kernel[(rows,)](
            x2, w, q, scale, k, x2.stride(0), q.stride(0), float(k), float(eps),
            PER_TOKEN=static_scale is None, BLOCK=block, ONE_PASS=one_pass, num_warps=warps,
            **pdl.triton_args(x2.device),
        )
    q = q.reshape(x.shape)
    if static_scale is None:
        return q, scale.reshape(*x.shape[:-1], 1)
    return q, scale.reshape(())
