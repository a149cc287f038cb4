"""Triton kernels for weight-only matmuls: int8 / int4 per channel and groupwise int4.

The layouts are those of the torch references in `tpquant.kernels.weight_only` (no repacking):
qweight int8 [N, K] or packed uint8 [N, K/2] (low nibble = even k), per-channel scale [N],
group scales / zeros [K/g, N], pre_quant_scale [K]. y[M, N] = x[M, K] @ W^T (+ bias).

The paths; `choose_path` picks one from (M, N, K, bits, group) and the thresholds below:

    cuda     the CUDA C++ GEMVs of `tpquant.kernels.cuda_weight_only` (cpp/weight_only_gemv.cu):
             paired half-precision dequantization into FMAs (the smallest M) or
             tensor-core mma (up to M = 32), for small M (needs CuPy).
    gemv     split-K, CUDA-core FMAs in float32; for the smallest M.
    dot      tl.dot with the dequantization fused in the K loop; split-K for small M so that
             enough programs fill the SMs, one pass over K for large M.
    dequant  dequantize W once into x.dtype, then torch's matmul (cuBLAS), for large M.
    cutlass  CUTLASS's Hopper mixed-input GEMM (`tpquant.kernels.cutlass_gemm`), the weight
             dequantized in registers: tiled int8 / int4 above the tiled GEMV's M (needs nvcc
             and CUTLASS headers; else dequant).
    staged   the staged GEMM of `cuda_weight_only` (x through shared memory, K splits in one
             thread-block cluster): tiled int8 / int4 per channel or int4 groupwise at M =
             17-64, on the weights its measured table (`staged_tuned.json`) names.

Numerics. Every stored code is read as an unsigned integer u (int8 q as u = q + 128, signed
int4 as u = nibble ^ 8 = q + 8, unsigned groupwise nibbles as they are), so W = (u - zp) * s
with zp = 128, 8 or the stored zero. u becomes a float without an int->float conversion
instruction (quarter rate or slower on Hopper, too slow to keep up with HBM for int4) by OR-ing
it into the mantissa of a "magic" float: 0x4B000000 | u is 2^23 + u in float32, 0x6400 | u is
1024 + u in float16, 0x4300 | u is 128 + u in bfloat16 (u < 128), all exact.
gemv leaves each code at its bit position p in the word (mantissa u * 2^p under exponent
23 - p is the float 2^(23-p) + u: one AND-OR), subtracts 2^(23-p) + zp (exact for integer zp),
applies group scale and zero with one FMA, accumulates x * w elementwise in float32 and
reduces over K once at the end.
dot interleaves int4 nibbles back into k order (x is read contiguously), or (SPLIT_X, an
autotuning choice) meets the low and high nibbles with x's even and odd columns in two dots,
and feeds the half forms to tl.dot still carrying their offset B (for small M with swapped
operands, W x^T, so that the weight tile is the large operand); each K block subtracts
(B + zp) * sum_k x[m, k] from its product (exact algebra, O(M N) per block instead of O(N K)
per-element subtractions; per-block partials are small, so it cancels only a few bits of
float32), then takes its group scale. Per-channel scales multiply once at the end. A K block
never straddles two groups (BLOCK_K divides g). Split-K programs write float32 partials
[split, M, N] that a second kernel sums in a fixed order (deterministic, no atomics, no
zeroing) and casts to x.dtype with the bias added; one split writes y directly.

CUDA graphs: no host synchronisation and only torch.empty allocations in a call. Autotuning
runs at the first call for each (M bucket, N, K, scheme): warm every shape up (call it once)
before capturing a graph or timing.

Tiled int8 / int4 weights (`tpquant.kernels.tiles`, what `WeightOnly.pack` and
`Groupwise.pack` keep): the tiled CUDA GEMV for small M (the staged GEMM where its table
says), CUTLASS or dequant from the tiles above; see `weight_only_matmul`. `choose_path` is
for untiled weights.

Forcing a path: the `path` argument of the launchers below, or the environment variable
TPQUANT_WO_PATH = auto | reference | cuda | gemv | dot | dequant | cutlass | staged, read at
every call (the benchmark sets it between timings); "reference" is handled by
`tpquant.kernels.weight_only`.

The launchers also take CPU tensors, so that the tests run these same kernels in Triton's
interpreter (TRITON_INTERPRET=1 set before triton is imported; pass `config` and `split_k`,
as the interpreter cannot autotune).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Mapping

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tpquant.kernels import cuda_weight_only, cutlass_gemm, pdl
from tpquant.kernels.device import sm_count
from tpquant.kernels.tiles import groups_tile, untile

PATH_ENV = "TPQUANT_WO_PATH"
CUDA, GEMV, DOT, DEQUANT, CUTLASS = "cuda", "gemv", "dot", "dequant", "cutlass"
STAGED = "staged"  # the staged GEMM on the tiles (per channel or groupwise int4, M <= 64)
REFERENCE, AUTO = "reference", "auto"
KERNEL_PATHS = (CUDA, GEMV, DOT, DEQUANT, CUTLASS, STAGED)

# Dispatch thresholds, from benchmarks/bench_wo_kernels.py on an H200 (every path forced):
# gemv wins only at M = 1 for int4 per channel (1.08-1.31x bf16 vs dot 1.08-1.16x over runs;
# int8 and groupwise: dot 0.98x vs gemv 0.90x),
# dot (swapped operands, split-K) for small M, dequant + cuBLAS from M = 256 (int4 at
# M = 256: 0.54x vs dot 0.31x; at M = 64: dot 0.56x vs 0.47x; the bound by bits below).
# The CUDA GEMVs (bench_wo_kernels.py, H200, six Llama-2-7B/70B shapes, geomean over bf16,
# 2026-11-30): M = 1 the fma kernel, int4 2.24x, int8 1.65x (dot: 1.14x, 0.98x); M = 2-8 the
# tensor-core mma kernel, int4 1.53-1.67x, int8 1.22-1.28x (dot 1.11-1.13x, 0.94-0.96x;
# the fma kernel falls to 0.5x at M = 8); M = 16 mma and dot about even (1.12x / 1.15x int4,
# 1.01x / 0.99x int8 with one row tile per warp; with two, on five of the shapes: 1.25x /
# 1.09x int4, 1.09x / 1.00x int8); M = 32 mma with two row tiles ahead for int4 (0.89x /
# 0.82x), dot for int8 (0.88x against 0.83x).
# From M = 32 dot falls behind bf16 (0.6-0.9x) but stays ahead of dequant + cuBLAS up to
# M = 128 (int8: 0.60x against 0.43x; int4 since its per-channel dots share one accumulator,
# 7b qkv / 70b gate-up at M = 128: 55.9 / 105 us against 68.6 / 151); dequant + cuBLAS
# from there (bench_wo_kernels.py, 2026-11-30: docs/benchmarks.md).
# By bits: M <= this: the CUDA GEMVs (fma, then mma), where they take the shape (untiled).
CUDA_MAX_M = {4: 32, 8: 16}
# The CUTLASS GEMM where it runs (`cutlass_gemm.usable`, tiled weights): M from..to by
# (bits, groupwise, wide weight: `cutlass_gemm.wide`); the tiled GEMV below, dequantize +
# cuBLAS above. bench_cutlass_gemm --tiles sweep, H200, seven Llama-2-7B / 70B shapes, geomean
# over bf16 with `cutlass_gemm.mixed_config`'s tiles (docs/benchmarks.md, thirteenth 2026-11-30
# section; design note 36):
# - per channel, wide: at M = 32 the 32-token tile beats the GEMV (int4 1.37 against 1.09,
#   int8 1.29 against 0.97); to M = 1024 (int4 0.95, int8 0.92 against dequant's 0.79 / 0.76;
#   at 4096 dequant's 0.94 / 0.93 win);
# - per channel, narrow (4096 rows): int4 keeps the GEMV to M = 64 (0.68 against the pingpong
#   tile's 0.63), int8 takes CUTLASS from 33 (0.64 against the GEMV's 0.44); to 1024;
# - groupwise: wide weights from M = 33 to 1024 (256: 0.69 against dequant's 0.53; 1024: 0.81
#   against 0.79); never narrow ones, where dequant + cuBLAS beat every tile (M = 128 0.51
#   against 0.45, 256 0.56 against 0.49).
CUTLASS_M = {
    (4, False, True): (32, 1024), (4, False, False): (65, 1024),
    (8, False, True): (32, 1024), (8, False, False): (33, 1024),
    (4, True, True): (33, 1024), (4, True, False): None,
}
CUTLASS_MIN_M = min(r[0] for r in CUTLASS_M.values() if r)  # below: the checks are skipped
GEMV_MAX_M = 1  # M <= this: gemv
DOT_MAX_M = {4: 128, 8: 128}  # by bits: GEMV_MAX_M < M <= this: dot; above: dequant + cuBLAS
# Split-K: aim for this many programs per SM, with at most MAX_SPLIT_K splits of at least
# MIN_K_PER_SPLIT input features each.
PROGRAMS_PER_SM = 4
MAX_SPLIT_K = 16
MIN_K_PER_SPLIT = 512
# Split-K chunks are multiples of this, hence of every BLOCK_K in the config lists.
K_ALIGN = 1024
# The smallest BLOCK_K: groupwise kernels need a group size that is a multiple of it.
MIN_BLOCK_K = 32
# gemv handles up to this many rows per program (more rows: more programs), and keeps its
# [BLOCK_M, BLOCK_N, BLOCK_K / values per word] float32 accumulator within this many elements.
GEMV_BLOCK_M = 4
GEMV_TILE_ELEMENTS = 8192

_HALF_TYPES = (torch.float16, torch.bfloat16)
# Whether this module's kernels were built for Triton's interpreter (decided at import).
_INTERPRETED = bool(triton.knobs.runtime.interpret)


def choose_path(m: int, k: int, bits: int, group_size: int, cuda: bool = True) -> str:
    """The kernel path for an [m, k] x [N, k]^T product (group_size 0 = per channel) of an
    untiled weight (tiled ones: `_tiled`).

    Pure: a function of the shape and the scheme only, thresholds from the constants above.
    cuda=False leaves the CUDA GEMV out (no CuPy, or tensors it cannot read).
    """
    if cuda and m <= CUDA_MAX_M[bits] and cuda_weight_only.supports(m, k, bits, group_size):
        return CUDA
    if group_size and group_size % MIN_BLOCK_K:
        return DEQUANT  # the fused kernels need whole BLOCK_Ks per group
    if m <= GEMV_MAX_M and bits == 4 and not group_size:
        return GEMV  # elsewhere dot is as fast or faster
    if m <= DOT_MAX_M[bits]:
        return DOT
    return DEQUANT


def cutlass_range(m: int, n: int, bits: int, group_size: int, sm_count: int) -> bool:
    """Whether the automatic choice gives M rows of an [n, K] weight of this scheme to the
    CUTLASS GEMM (pure; `CUTLASS_M`)."""
    bounds = CUTLASS_M.get((bits, bool(group_size), cutlass_gemm.wide(n, sm_count)))
    return bounds is not None and bounds[0] <= m <= bounds[1]


def forced_path(path: str | None = None) -> str:
    """`path` if given, else $TPQUANT_WO_PATH, else "auto"; raises ValueError on an unknown name."""
    chosen = path if path is not None else os.environ.get(PATH_ENV, AUTO) or AUTO
    if chosen not in (AUTO, REFERENCE, *KERNEL_PATHS):
        raise ValueError(
            f"weight-only path must be one of {(AUTO, REFERENCE, *KERNEL_PATHS)}, got {chosen!r}"
            + ("" if path is not None else f" (from ${PATH_ENV})")
        )
    return chosen


def split_k_for(tiles: int, k: int, sm_count: int, k_align: int = K_ALIGN,
                max_splits: int = MAX_SPLIT_K) -> tuple[int, int]:
    """(splits, K per split) so that tiles * splits reaches PROGRAMS_PER_SM * sm_count.

    K per split is a multiple of k_align; splits = cdiv(k, K per split) <= max_splits.
    """
    want = triton.cdiv(PROGRAMS_PER_SM * sm_count, max(tiles, 1))
    want = max(1, min(want, MAX_SPLIT_K, max_splits, k // MIN_K_PER_SPLIT))
    return _split(k, want, k_align)


def partial_split_cap(m: int, k: int, bits: int) -> int:
    """The most K splits whose float32 partials (written, then read: 8 * splits * M * N bytes)
    cost no more traffic than the weight itself (N * K * bits / 8 bytes)."""
    return max(1, k * bits // (64 * m))


def nominal_tile(path: str, m: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) the split-K heuristic assumes for a path at M = m: the largest
    BLOCK_M `_fits` allows for m's bucket, up to 64 (the autotuner may pick others)."""
    if path == GEMV:
        return min(triton.next_power_of_2(m), GEMV_BLOCK_M), 32
    return min(max(16, m_bucket(m)), 64), 64


def _split(k: int, want: int, k_align: int) -> tuple[int, int]:
    per = triton.cdiv(triton.cdiv(k, want), k_align) * k_align
    return triton.cdiv(k, per), per


def m_bucket(m: int) -> int:
    """The autotuning key for M: the next power of two, capped at 4096."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _operand(u, OPERAND: tl.constexpr, OFFSET: tl.constexpr, OUT_TYPE: tl.constexpr):
    """Codes u (uint8) -> floats of value u + OFFSET, without an int->float instruction.

    OPERAND 0: float32 via 2^23 (then cast to OUT_TYPE); 1: float16 1024 + u; 2: bfloat16 128 + u.
    """
    if OPERAND == 1:
        w = (u.to(tl.int16) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    elif OPERAND == 2:
        w = (u.to(tl.int16) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        w = (u.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
        w = (w - (8388608.0 - OFFSET)).to(OUT_TYPE)
    return w


@triton.jit
def _code_float(word, P: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr):
    """The BITS-bit code u at bit P of a uint32 word (P + BITS <= 23) as float32 u + OFFSET.

    One AND-OR, no shift: with mantissa u * 2^P under exponent 23 - P the float is exactly
    2^(23 - P) + u; the subtraction of 2^(23 - P) - OFFSET is exact too (integers < 2^24).
    """
    MASK: tl.constexpr = ((1 << BITS) - 1) << P
    MAGIC: tl.constexpr = (127 + 23 - P) << 23
    f = ((word & MASK) | MAGIC).to(tl.float32, bitcast=True)
    return f - ((1 << (23 - P)) - OFFSET)


@triton.jit
def _tile(M, N, KW_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows (clamped for loads), output rows/columns and first weight column."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    # M tiles of one N tile are neighbours, so their weight tile is read from HBM once.
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid // num_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.minimum(offs_m, M - 1)  # rows past M reread row M-1: loads need no mask
    rn = offs_n % N  # rows past N reread row 0: loads need no mask
    cw_start = tl.program_id(1) * KW_PER_SPLIT
    return offs_m, offs_n, rm, rn, cw_start


@triton.jit
def _group_row(cw0, K, N, rn, PACK: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr):
    """Offsets of this block's scales / zeros [K/g, N]; a block past K (its x is all zero)
    reads the last group's row instead of reading past the end."""
    if EVEN_K:
        g = cw0 * PACK // GROUP
    else:
        g = tl.minimum(cw0 * PACK, K - 1) // GROUP
    return g * N + rn


@triton.jit
def _store(acc, out_ptr, b_ptr, offs_m, offs_n, rn, M, N, stride_split,
           HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr):
    """The tile: float32 partials of split program_id(1), or + bias in out's dtype."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if WRITE_PARTIAL:
        tl.store(out_ptrs + tl.program_id(1) * stride_split, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M_BUCKET"])  # an autotuning key only; unused in the body
def _wo_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, p_ptr, b_ptr, out_ptr,
    M, N, K, KW_PER_SPLIT, M_BUCKET,
    stride_xm, stride_wn, stride_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_PQS: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, ZP: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """gemv: y tile [BLOCK_M, BLOCK_N] over one K split, CUDA-core FMAs in float32.

    The weight is read as 32-bit words (the launcher checks the alignment; stride_wn counts
    words): value i of a word (PER = 8 nibbles or 4 bytes, little-endian, so
    k = PER * word + i) meets x[:, PER * word + i]. Signed codes become q + zp for the whole
    word with one XOR; each value then becomes a float with one AND-OR (`_code_float`; the top
    values of a word from one shift of it). Products accumulate elementwise in a
    [BLOCK_M, BLOCK_N, BLOCK_K / PER] float32 tile, reduced over K once at the end (no
    cross-thread reduction in the loop). Groupwise: times the group scale, minus zero * scale
    (one FMA).
    """
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    PACK: tl.constexpr = 2 if BITS == 4 else 1
    PER: tl.constexpr = 32 // BITS  # values per word
    WW: tl.constexpr = BLOCK_K // PER  # words per block
    # signed codes ^ FLIP = q + zp, for every value of a word at once
    FLIP: tl.constexpr = 0 if HAS_ZEROS else (0x88888888 if BITS == 4 else 0x80808080)
    HI: tl.constexpr = 12 if BITS == 4 else 16  # values at bit >= 20 (16) are read from word >> HI
    OFFSET: tl.constexpr = 0 if HAS_ZEROS else -ZP
    offs_m, offs_n, rm, rn, cw_start = _tile(M, N, KW_PER_SPLIT, BLOCK_M, BLOCK_N)
    k_start = cw_start * PACK
    offs_ww = tl.max_contiguous(tl.arange(0, WW), WW)
    words = w_ptr.to(tl.pointer_type(tl.uint32), bitcast=True)  # unsigned: logical shifts
    # stride_wn counts words here (the launcher divides), so that its divisibility is known
    w_ptrs = words + rn.to(tl.int64)[:, None] * stride_wn + (k_start // PER + offs_ww)[None, :]
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k_start + offs_ww * PER)[None, :]
    p_ptrs = p_ptr + k_start + offs_ww * PER

    acc = tl.zeros((BLOCK_M, BLOCK_N, WW), dtype=tl.float32)
    for k0 in range(k_start, k_start + KW_PER_SPLIT * PACK, BLOCK_K):
        if EVEN_K:
            wv = tl.load(w_ptrs)
        else:
            valid = (k0 // PER + offs_ww) < K // PER
            wv = tl.load(w_ptrs, mask=valid[None, :], other=0)
        if FLIP != 0:
            wv = wv ^ FLIP
        wv_hi = wv >> HI
        if GROUP > 0:
            g_row = _group_row(k0, K, N, rn, 1, GROUP, EVEN_K)
            s = tl.load(s_ptr + g_row).to(tl.float32)[:, None]
            if HAS_ZEROS:
                zs = tl.load(z_ptr + g_row).to(tl.float32)[:, None] * s
        for i in tl.static_range(PER):
            if BITS * i + BITS <= 23:  # the value fits below the float32 exponent as it is
                w = _code_float(wv, BITS * i, BITS, OFFSET)
            else:
                w = _code_float(wv_hi, BITS * i - HI, BITS, OFFSET)
            if GROUP > 0:
                if HAS_ZEROS:
                    w = w * s - zs
                else:
                    w = w * s
            if EVEN_K:
                xv = tl.load(x_ptrs + i).to(tl.float32)
                if HAS_PQS:
                    xv *= tl.load(p_ptrs + i).to(tl.float32)[None, :]
            else:
                xv = tl.load(x_ptrs + i, mask=valid[None, :], other=0.0).to(tl.float32)
                if HAS_PQS:
                    xv *= tl.load(p_ptrs + i, mask=valid, other=0.0).to(tl.float32)[None, :]
            acc += xv[:, None, :] * w[None, :, :]
        w_ptrs += WW
        x_ptrs += BLOCK_K
        p_ptrs += BLOCK_K

    y = tl.sum(acc, axis=2)
    if GROUP == 0:
        y *= tl.load(s_ptr + rn).to(tl.float32)[None, :]
    _store(y, out_ptr, b_ptr, offs_m, offs_n, rn, M, N, stride_split, HAS_BIAS, WRITE_PARTIAL)


@triton.jit
def _dot(w, xv, acc, SWAP: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + x w^T as [BLOCK_M, BLOCK_N], or (SWAP) acc + w x^T as [BLOCK_N, BLOCK_M], in
    float32."""
    if DOT_F32:  # only under the interpreter, whose tl.dot mishandles bfloat16
        if SWAP:
            part = tl.dot(w.to(tl.float32), tl.trans(xv.to(tl.float32)), acc,
                          input_precision="ieee")
        else:
            part = tl.dot(xv.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                          input_precision="ieee")
    elif SWAP:
        part = tl.dot(w, tl.trans(xv), acc)
    else:
        part = tl.dot(xv, tl.trans(w), acc)
    return part


@triton.jit(do_not_specialize=["M_BUCKET"])  # an autotuning key only; unused in the body
def _wo_dot_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, p_ptr, b_ptr, out_ptr,
    M, N, K, KW_PER_SPLIT, M_BUCKET,
    stride_xm, stride_wn, stride_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_PQS: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, ZP: tl.constexpr,
    OPERAND: tl.constexpr, OFFSET: tl.constexpr, DOT_F32: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP: tl.constexpr = False, SPLIT_X: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """dot: y tile [BLOCK_M, BLOCK_N] over one K split with tl.dot on dequantized weights.

    The weight operand is u + OFFSET in x's dtype (see `_operand`); int4 nibbles are either
    interleaved back into k order, or (SPLIT_X) kept apart and met by x's even and odd
    columns in two dots. Per channel the dots accumulate into one float32 tile (so the
    tensor cores can work on the next block while this one is dequantized) and (OFFSET + zp)
    * sum_k x is subtracted once at the end; groupwise, each block's product starts from
    zero and takes its zero and scale. SWAP computes y^T = W x^T instead (the weight is the
    first tl.dot operand, the tiny x^T the second), for small M.
    """
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    X_TYPE: tl.constexpr = x_ptr.dtype.element_ty
    PACK: tl.constexpr = 2 if BITS == 4 else 1
    KW: tl.constexpr = BLOCK_K // PACK
    CORR: tl.constexpr = OFFSET + ZP  # per-block factor of sum_k x (schemes without zeros)
    offs_m, offs_n, rm, rn, cw_start = _tile(M, N, KW_PER_SPLIT, BLOCK_M, BLOCK_N)
    offs_w = tl.max_contiguous(tl.arange(0, KW), KW)
    offs_k = tl.max_contiguous(tl.arange(0, BLOCK_K), BLOCK_K)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (cw_start + offs_w)[None, :]
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (cw_start * PACK + offs_k)[None, :]
    p_ptrs = p_ptr + cw_start * PACK + offs_k

    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum_all = tl.zeros((BLOCK_M,), dtype=tl.float32)  # per channel: sum_k x of the split
    for cw0 in range(cw_start, cw_start + KW_PER_SPLIT, KW):
        if EVEN_K:
            wb = tl.load(w_ptrs)
            xv = tl.load(x_ptrs)
            if HAS_PQS:
                xv = xv.to(tl.float32) * tl.load(p_ptrs).to(tl.float32)[None, :]
        else:
            valid = (cw0 + offs_w) < K // PACK
            wb = tl.load(w_ptrs, mask=valid[None, :], other=0)
            valid_k = (cw0 * PACK + offs_k) < K
            xv = tl.load(x_ptrs, mask=valid_k[None, :], other=0.0)
            if HAS_PQS:
                pv = tl.load(p_ptrs, mask=valid_k, other=0.0)
                xv = xv.to(tl.float32) * pv.to(tl.float32)[None, :]
        xv = xv.to(X_TYPE)
        if GROUP == 0:
            part = acc
        else:
            part = tl.zeros_like(acc)
        if BITS == 8:
            u = wb.to(tl.uint8, bitcast=True) ^ 0x80  # q + 128
            part = _dot(_operand(u, OPERAND, OFFSET, X_TYPE), xv, part, SWAP, DOT_F32)
        else:
            if not HAS_ZEROS:
                wb = wb ^ 0x88  # both signed nibbles -> q + 8
            if SPLIT_X:
                # even k (low nibbles) and odd k (high) as two dots against x's even and odd
                # columns: the small x tile is split instead of the weight tile interleaved
                x_even, x_odd = tl.split(tl.reshape(xv, (BLOCK_M, KW, 2)))
                part = _dot(_operand(wb & 0xF, OPERAND, OFFSET, X_TYPE), x_even, part, SWAP,
                            DOT_F32)
                part = _dot(_operand(wb >> 4, OPERAND, OFFSET, X_TYPE), x_odd, part, SWAP,
                            DOT_F32)
            else:
                u = tl.interleave(wb & 0xF, wb >> 4)  # [BLOCK_N, BLOCK_K]: k = 2j (low), 2j + 1
                part = _dot(_operand(u, OPERAND, OFFSET, X_TYPE), xv, part, SWAP, DOT_F32)

        # part = sum_k x (u + OFFSET); the block's value is sum_k x (u - zp).
        if HAS_ZEROS or CORR != 0:
            xsum = tl.sum(xv.to(tl.float32), axis=1)
        else:
            xsum = xsum_all  # (unused: no offset to take out)
        if GROUP == 0:
            acc = part
            if CORR != 0:
                xsum_all += xsum
        else:
            acc += _group_part(part, xsum, z_ptr, s_ptr, cw0, K, N, rn, PACK, GROUP, EVEN_K,
                               HAS_ZEROS, OFFSET, CORR, SWAP)
        w_ptrs += KW
        x_ptrs += BLOCK_K
        p_ptrs += BLOCK_K

    if GROUP == 0:
        if CORR != 0:
            acc -= _per_m(xsum_all, SWAP) * CORR
        acc *= _per_n(tl.load(s_ptr + rn).to(tl.float32), SWAP)
    if SWAP:
        y = tl.trans(acc)
    else:
        y = acc
    _store(y, out_ptr, b_ptr, offs_m, offs_n, rn, M, N, stride_split, HAS_BIAS, WRITE_PARTIAL)


@triton.jit
def _group_part(part, xsum, z_ptr, s_ptr, cw0, K, N, rn, PACK: tl.constexpr,
                GROUP: tl.constexpr, EVEN_K: tl.constexpr, HAS_ZEROS: tl.constexpr,
                OFFSET: tl.constexpr, CORR: tl.constexpr, SWAP: tl.constexpr):
    """A groupwise block's sum_k x (u + OFFSET) -> sum_k x (u - zero) times its group scale
    (symmetric: zero = zp, CORR = OFFSET + zp)."""
    g_row = _group_row(cw0, K, N, rn, PACK, GROUP, EVEN_K)
    if HAS_ZEROS:
        zero = tl.load(z_ptr + g_row).to(tl.float32) + OFFSET
        part -= _per_m(xsum, SWAP) * _per_n(zero, SWAP)
    elif CORR != 0:
        part -= _per_m(xsum, SWAP) * CORR
    return part * _per_n(tl.load(s_ptr + g_row).to(tl.float32), SWAP)


@triton.jit
def _per_m(v, SWAP: tl.constexpr):
    """A vector over the tile's rows of x, broadcast along N (the tile is [N, M] when SWAP)."""
    if SWAP:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _per_n(v, SWAP: tl.constexpr):
    """A vector over the tile's weight rows (outputs), broadcast along M."""
    if SWAP:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


def _even_k(a: Mapping) -> bool:
    """Every split's K range lies inside K (then no block needs masks)."""
    return a["K"] % (a["KW_PER_SPLIT"] * (2 if a["BITS"] == 4 else 1)) == 0


_gemv_even = triton.heuristics({"EVEN_K": _even_k})(_wo_gemv_kernel)
_dot_even = triton.heuristics({"EVEN_K": _even_k})(_wo_dot_kernel)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, b_ptr, out_ptr, MN, N, SPLITS, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[i] = sum_s ws[s, i] (s in order) + bias[i % N], cast to out's dtype."""
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, z_ptr, p_ptr, out_ptr, N, K, stride_wn,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_PQS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """out[n, k] = (u - zp) * s (* pqs[k]) in out's dtype, for a [BLOCK_N, BLOCK_K] tile."""
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    PACK: tl.constexpr = 2 if BITS == 4 else 1
    KW: tl.constexpr = BLOCK_K // PACK
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cw = tl.program_id(1) * KW + tl.arange(0, KW)
    mask_n = offs_n < N
    mask_w = mask_n[:, None] & (cw < K // PACK)[None, :]
    wb = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + cw[None, :], mask=mask_w,
                 other=0)
    if BITS == 8:
        w = _operand(wb.to(tl.uint8, bitcast=True) ^ 0x80, 0, -128, tl.float32)
    else:
        if not HAS_ZEROS:
            wb = wb ^ 0x88
        lo = _operand(wb & 0xF, 0, 0 if HAS_ZEROS else -8, tl.float32)
        hi = _operand(wb >> 4, 0, 0 if HAS_ZEROS else -8, tl.float32)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # interleave: k = 2j, 2j + 1
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    if GROUP > 0:
        sz = (offs_k // GROUP)[None, :] * N + offs_n[:, None]
        if HAS_ZEROS:
            w -= tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        w *= tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    else:
        w *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if HAS_PQS:
        w *= tl.load(p_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Autotuning: a modest list per path, pruned to what fits the call (M bucket, group size).


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, swap: bool = False,
         split_x: bool = False) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    if swap:
        meta["SWAP"] = True
    if split_x:
        meta["SPLIT_X"] = True
    return triton.Config(meta, num_warps=warps, num_stages=stages)


GEMV_CONFIGS = [  # BLOCK_M comes from the call; small BLOCK_K for small groups
    _cfg(1, 16, 1024, 4, 2),
    _cfg(1, 32, 512, 4, 2),
    _cfg(1, 32, 1024, 8, 2),
    _cfg(1, 64, 512, 8, 2),
    _cfg(1, 64, 128, 4, 3),
    _cfg(1, 128, 128, 8, 3),
    _cfg(1, 64, 64, 4, 3),
    _cfg(1, 128, 32, 4, 3),
]

# SPLIT_X configs (int4 only; pruned for int8) let the autotuner choose per shape between
# interleaving the weight tile and splitting the x tile.
DOT_CONFIGS = [
    # small M (split-K decode / short prefill)
    _cfg(16, 32, 256, 4, 3),
    _cfg(16, 64, 128, 4, 4),
    _cfg(16, 64, 256, 4, 3),
    _cfg(16, 128, 128, 4, 3),
    _cfg(16, 64, 64, 4, 4),
    _cfg(16, 64, 32, 4, 4),
    _cfg(16, 64, 128, 4, 4, swap=True),
    _cfg(16, 64, 256, 4, 3, swap=True),
    _cfg(16, 128, 128, 4, 3, swap=True),
    _cfg(16, 128, 256, 8, 3, swap=True),
    _cfg(16, 64, 256, 4, 3, swap=True, split_x=True),
    _cfg(16, 128, 128, 4, 3, swap=True, split_x=True),
    _cfg(16, 128, 256, 8, 3, swap=True, split_x=True),
    # medium M
    _cfg(32, 64, 128, 4, 4),
    _cfg(64, 64, 128, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 128, 128, 8, 3),
    _cfg(32, 128, 128, 4, 4, swap=True),
    _cfg(64, 128, 128, 8, 3, swap=True),
    _cfg(32, 128, 128, 4, 4, swap=True, split_x=True),
    _cfg(64, 128, 128, 8, 3, swap=True, split_x=True),
    _cfg(64, 128, 128, 8, 3, split_x=True),
    # large M
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 128, 8, 3),
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 64, 64, 4, 4),
    _cfg(128, 128, 64, 8, 3, split_x=True),
    _cfg(128, 256, 64, 8, 3, split_x=True),
    _cfg(128, 128, 128, 8, 3, swap=True, split_x=True),
]


def _fits(cfg: Mapping[str, int], gemv_block_m: int | None, m_bucket_: int, group: int,
          k_per_split: int, per: int, bits: int = 4) -> bool:
    """Whether a config suits the call: its BLOCK_K divides the group and the split-K chunk;
    SPLIT_X only for int4; gemv: its [BLOCK_M, BLOCK_N, BLOCK_K / per] accumulator stays
    within GEMV_TILE_ELEMENTS; dot: its BLOCK_M is at most the M bucket (16 at least) and at
    least half of it (up to 64)."""
    bk, bm = cfg["BLOCK_K"], cfg["BLOCK_M"]
    if k_per_split % bk or (group and group % bk) or (cfg.get("SPLIT_X") and bits != 4):
        return False
    if gemv_block_m is not None:
        return gemv_block_m * cfg["BLOCK_N"] * (bk // per) <= GEMV_TILE_ELEMENTS
    return bm <= max(16, m_bucket_) and bm >= min(64, max(16, m_bucket_ // 2))


def _prune(configs, named_args, **kwargs):
    kps = named_args["KW_PER_SPLIT"] * (2 if kwargs["BITS"] == 4 else 1)
    gemv_block_m = kwargs.get("BLOCK_M")  # gemv passes BLOCK_M itself
    per = 32 // kwargs["BITS"]  # gemv: values per 32-bit word
    fits = [
        c for c in configs
        if _fits(c.kwargs, gemv_block_m, named_args["M_BUCKET"], kwargs["GROUP"], kps, per,
                 kwargs["BITS"])
    ]
    if gemv_block_m is None:
        return fits
    return [  # BLOCK_M is the call's, not the config's
        triton.Config({k: v for k, v in c.kwargs.items() if k != "BLOCK_M"},
                      num_warps=c.num_warps, num_stages=c.num_stages)
        for c in fits
    ]


_KEY = ["M_BUCKET", "N", "K", "KW_PER_SPLIT", "BITS", "GROUP", "HAS_ZEROS", "HAS_PQS",
        "HAS_BIAS", "WRITE_PARTIAL"]
_gemv_tuned = triton.autotune(
    GEMV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune}
)(_gemv_even)
_dot_tuned = triton.autotune(
    DOT_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune}
)(_dot_even)

_DEQUANT_BLOCK_N, _DEQUANT_BLOCK_K = 16, 256
_REDUCE_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True)
class _Weights:
    """The stored tensors of one weight, as the kernels read them."""

    qweight: torch.Tensor  # int8 [N, K] or uint8 [N, K/2]
    scale: torch.Tensor  # [N] per channel, [K/g, N] groupwise
    zeros: torch.Tensor | None  # [K/g, N] or None
    pqs: torch.Tensor | None  # [K] or None
    bits: int
    group: int  # 0 = per channel
    tiled: bool = False  # in `tiles`' layout

    @property
    def n(self) -> int:
        return self.qweight.shape[0]

    @property
    def k(self) -> int:
        return self.qweight.shape[1] * (2 if self.bits == 4 else 1)


def weight_only_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    *,
    path: str | None = None,
    config: Mapping[str, int] | None = None,
    split_k: int | None = None,
    out: torch.Tensor | None = None,
    tiled: bool = False,
) -> torch.Tensor:
    """y[..., N] = x[..., K] @ (q * scale[:, None])^T + bias, in x.dtype (float16 / bfloat16).

    path: "cuda", "gemv", "dot", "dequant", "cutlass", "staged", or None/"auto" (then
    $TPQUANT_WO_PATH, then choose_path).
    tiled: qweight in the layout of `tpquant.kernels.tiles`: auto takes the staged GEMM where
    `cuda_weight_only.staged_config` names this weight, else the tiled CUTLASS GEMM in its
    `cutlass_range` (where `cutlass_gemm.usable`), else the tiled CUDA GEMV to its TILES_MAX_M
    (one launch) and dequant from the tiles above; cuda and staged (to TILES_MAX_M), cutlass
    and dequant may be forced; gemv and dot, and auto without CuPy, untile it first.
    config: BLOCK_M/BLOCK_N/BLOCK_K (+ num_warps, num_stages) instead of autotuning;
    split_k: the number of K splits instead of the heuristic (gemv and dot);
    out: a contiguous [M, N] x.dtype tensor to write (M = x.numel() / K) instead of a new one.
    Shapes are checked by the caller (tpquant.kernels.weight_only).
    """
    weights = _Weights(_contiguous(qweight), _contiguous(scale), None, None, bits, 0, tiled)
    return _matmul(x, weights, bias, path, config, split_k, out)


def groupwise_matmul(
    x: torch.Tensor,
    qweight_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    pre_quant_scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    *,
    path: str | None = None,
    config: Mapping[str, int] | None = None,
    split_k: int | None = None,
    out: torch.Tensor | None = None,
    tiled: bool = False,
) -> torch.Tensor:
    """y[..., N] = (x * pqs) @ ((q - zero) * scale)^T + bias, in x.dtype; arguments as above
    (the tiled kernels take groups of whole k-tiles and no pqs: other weights are untiled)."""
    weights = _Weights(
        _contiguous(qweight_packed),
        _contiguous(scales),
        None if zeros is None else _contiguous(zeros),
        None if pre_quant_scale is None else _contiguous(pre_quant_scale),
        4,
        group_size,
        tiled,
    )
    return _matmul(x, weights, bias, path, config, split_k, out)


def _matmul(
    x: torch.Tensor,
    wt: _Weights,
    bias: torch.Tensor | None,
    path: str | None,
    config: Mapping[str, int] | None,
    split_k: int | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    if x.dtype not in _HALF_TYPES:
        raise TypeError(f"the Triton weight-only kernels take float16/bfloat16 x, got {x.dtype}")
    n, k = wt.n, wt.k
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous [{m}, {n}] {x.dtype} tensor, got {out.dtype} "
            f"{tuple(out.shape)}"
        )
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    chosen = forced_path(path)
    cuda_ok = _cuda_takes(x2, wt, bias)
    # Below CUTLASS_MIN_M only a forced call can reach CUTLASS: skip its checks there.
    cutlass_ok = ((chosen == CUTLASS or m >= CUTLASS_MIN_M)
                  and _cutlass_takes(x2, wt, bias, out))
    if chosen == CUTLASS and not cutlass_ok:
        raise ValueError(
            "path 'cutlass' takes tiled int8 / int4 (per channel, or int4 groups of a multiple "
            f"of {cutlass_gemm.TILE_K}, no pre-quant scale), N a multiple of 8, "
            f"K of {cutlass_gemm.TILE_K}, float32 scales, 16-byte aligned CUDA tensors, on a "
            "compute capability 9.0 device with nvcc and CUTLASS headers; "
            f"got bits={wt.bits}, tiled={wt.tiled}, group={wt.group}, N={n}, K={k}"
        )
    if chosen == STAGED and not (wt.tiled and cuda_ok and groups_tile(wt.group)
                                 and wt.pqs is None and m <= cuda_weight_only.TILES_MAX_M):
        raise ValueError(
            "path 'staged' takes tiled int8 / int4 per channel or int4 groups of 64 x 2^i "
            f"features (no pre-quant scale), M <= {cuda_weight_only.TILES_MAX_M}, float32 "
            "scales and 16-byte aligned CUDA tensors (and CuPy); got "
            f"tiled={wt.tiled}, group={wt.group}, pre-quant scale={wt.pqs is not None}, M={m}"
        )
    if wt.tiled:
        tiles_ok = cuda_ok and wt.pqs is None and groups_tile(wt.group)
        if chosen in (CUTLASS, STAGED) or (tiles_ok and chosen in (AUTO, REFERENCE, CUDA,
                                                                   DEQUANT)):
            _tiled(x2, wt, None if bias is None else _contiguous(bias), out, chosen, cutlass_ok)
            return out.reshape(*x.shape[:-1], n)
        wt = replace(wt, qweight=untile(wt.qweight, wt.bits), tiled=False)  # the others read
    if chosen in (AUTO, REFERENCE):  # REFERENCE is the caller's business; here it means auto
        chosen = choose_path(m, k, wt.bits, wt.group, cuda=cuda_ok)
    if chosen == CUDA:
        if not (cuda_ok and cuda_weight_only.supports(m, k, wt.bits, wt.group)):
            raise ValueError(
                f"path 'cuda' takes M <= {cuda_weight_only.MAX_M}, K a multiple of "
                f"{cuda_weight_only.chunk_elems(wt.bits)}, groups a multiple of "
                f"{cuda_weight_only.MIN_GROUP} (of {cuda_weight_only.mma_group(wt.bits)}"
                f" past M = {cuda_weight_only.M_TILES[-1]}), float32 scales and 16-byte "
                f"aligned CUDA tensors (and CuPy); got M={m}, K={k}, group={wt.group}"
            )
        if bias is not None:
            bias = _contiguous(bias)
        cuda_weight_only.gemv(x2, wt.qweight, wt.scale, wt.zeros, wt.pqs, wt.bits, wt.group,
                              bias, out, splits=split_k)
        return out.reshape(*x.shape[:-1], n)
    if chosen == GEMV and not _word_aligned(wt.qweight):
        if forced_path(path) == GEMV:
            raise ValueError(
                "path 'gemv' reads the weight as 32-bit words: its rows need a multiple of 4 "
                f"bytes and a 4-byte aligned start, got stride {wt.qweight.stride(0)}"
            )
        chosen = DOT
    if chosen != DEQUANT and wt.group % MIN_BLOCK_K:
        raise ValueError(
            f"path {chosen!r} needs a group size that is a multiple of {MIN_BLOCK_K}, "
            f"got {wt.group}; use 'dequant'"
        )
    if bias is not None:
        bias = _contiguous(bias)
    if chosen == DEQUANT:
        _dequant_linear(x2, wt, bias, out)
    else:
        _fused(x2, wt, bias, out, chosen == DOT, config, split_k)
    return out.reshape(*x.shape[:-1], n)


def _fused(
    x2: torch.Tensor,
    wt: _Weights,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    use_dot: bool,
    config: Mapping[str, int] | None,
    split_k: int | None,
) -> None:
    m, n, k = x2.shape[0], wt.n, wt.k
    name = DOT if use_dot else GEMV
    gemv_block_m = None if use_dot else min(triton.next_power_of_2(m), GEMV_BLOCK_M)
    if config is not None:
        align = config["BLOCK_K"]
        if wt.group and wt.group % align:
            raise ValueError(f"BLOCK_K={align} must divide the group size {wt.group}")
    else:
        align = min(K_ALIGN, wt.group) if wt.group else K_ALIGN
    if split_k is not None:
        splits, per_split = _split(k, split_k, align)
    elif x2.is_cuda:
        bm, bn = nominal_tile(name, m)
        sms = sm_count(x2.device)
        splits, per_split = split_k_for(triton.cdiv(m, bm) * triton.cdiv(n, bn), k, sms, align,
                                        partial_split_cap(m, k, wt.bits))
    else:
        splits, per_split = 1, triton.cdiv(k, align) * align

    signed = wt.bits == 8 or wt.zeros is None
    zp = (128 if wt.bits == 8 else 8) if signed else 0
    write_partial = splits > 1
    target = (
        torch.empty((splits, m, n), dtype=torch.float32, device=x2.device)
        if write_partial
        else out
    )
    dummy = wt.scale  # stands in for absent optional pointers; never read
    args = (
        x2, wt.qweight, wt.scale,
        dummy if wt.zeros is None else wt.zeros,
        dummy if wt.pqs is None else wt.pqs,
        dummy if bias is None else bias,
        target,
        m, n, k, per_split // (2 if wt.bits == 4 else 1), m_bucket(m),
        x2.stride(0), wt.qweight.stride(0) // (1 if use_dot else 4), m * n,
    )
    meta = dict(
        BITS=wt.bits, GROUP=wt.group, HAS_ZEROS=wt.zeros is not None,
        HAS_PQS=wt.pqs is not None, HAS_BIAS=bias is not None, WRITE_PARTIAL=write_partial,
        ZP=zp, **pdl.triton_args(x2.device),
    )
    if use_dot:
        operand, offset = _operand_kind(x2.dtype, wt.bits)
        meta.update(OPERAND=operand, OFFSET=offset, DOT_F32=_INTERPRETED)
    else:
        meta["BLOCK_M"] = gemv_block_m
    if config is not None:
        cfg = {key: v for key, v in config.items() if use_dot or key != "BLOCK_M"}
        block_m = cfg["BLOCK_M"] if use_dot else gemv_block_m
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, cfg["BLOCK_N"]), splits)
        (_dot_even if use_dot else _gemv_even)[grid](*args, **meta, **cfg)
    else:
        kernel = _dot_tuned if use_dot else _gemv_tuned

        def grid(meta_: Mapping[str, int]) -> tuple[int, int]:
            return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]), splits)

        kernel[grid](*args, **meta)
    if write_partial:
        _splitk_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
            target, dummy if bias is None else bias, out, m * n, n, splits,
            HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK, num_warps=4,
            **pdl.triton_args(x2.device),
        )


def _operand_kind(dtype: torch.dtype, bits: int) -> tuple[int, int]:
    """(OPERAND, OFFSET) of `_operand` for the dot path: how codes become x.dtype operands.

    float16: 1024 + u; bfloat16 int4: 128 + u. bfloat16 int8 goes through float32 as the exact
    q = u - 128 (OFFSET -128): 256 codes do not fit bfloat16's 8-bit significand at one exponent.
    """
    if dtype == torch.float16:
        return 1, 1024
    if bits == 4:
        return 2, 128
    return 0, -128


def _tiled(x2: torch.Tensor, wt: _Weights, bias: torch.Tensor | None, out: torch.Tensor,
           chosen: str, cutlass_ok: bool) -> None:
    """A tiled weight: the staged GEMM where its measured table names this weight (M =
    17-64); else the CUTLASS GEMM on the tiles where it runs and `cutlass_range` gives it the
    call; else the tiled GEMV up to its M, dequantized from the tiles into x.dtype and one
    torch matmul above."""
    m = x2.shape[0]
    staged = None
    if chosen in (STAGED, AUTO, REFERENCE):
        staged = cuda_weight_only.staged_config(
            m, wt.n, wt.k, x2.device, x2.dtype,
            cuda_weight_only.mode(wt.bits, wt.group, wt.zeros is not None), wt.group)
        if chosen == STAGED:
            staged = staged or cuda_weight_only.staged_default(m)
    if staged is not None:
        cuda_weight_only.staged_gemm(x2, wt.qweight, wt.scale, bias, out, config=staged,
                                     zeros=wt.zeros, group=wt.group)
        return
    if chosen in (AUTO, REFERENCE):
        if (cutlass_ok and cutlass_range(m, wt.n, wt.bits, wt.group, sm_count(x2.device))
                and _cutlass_usable(x2, wt)):
            chosen = CUTLASS
        elif m <= cuda_weight_only.TILES_MAX_M:
            chosen = CUDA
        else:
            chosen = DEQUANT
    if chosen == CUDA:
        cuda_weight_only.tiles_gemv(x2, wt.qweight, wt.scale, bias, out, zeros=wt.zeros,
                                    group=wt.group)
    elif chosen == CUTLASS:
        cutlass_gemm.gemm(x2, wt.qweight, wt.scale, wt.zeros, wt.bits, wt.group, bias, out)
    else:
        w = cuda_weight_only.tiles_dequantize(wt.qweight, wt.scale, x2.dtype, zeros=wt.zeros,
                                              group=wt.group)
        _mm(x2, w, bias, out)


def _dequant_linear(
    x2: torch.Tensor, wt: _Weights, bias: torch.Tensor | None, out: torch.Tensor
) -> None:
    """Dequantize W (pqs folded into its columns) into x.dtype, then one torch matmul."""
    n, k = wt.n, wt.k
    w = torch.empty((n, k), dtype=x2.dtype, device=x2.device)
    dummy = wt.scale
    grid = (triton.cdiv(n, _DEQUANT_BLOCK_N), triton.cdiv(k, _DEQUANT_BLOCK_K))
    _dequant_kernel[grid](
        wt.qweight, wt.scale,
        dummy if wt.zeros is None else wt.zeros,
        dummy if wt.pqs is None else wt.pqs,
        w, n, k, wt.qweight.stride(0),
        BITS=wt.bits, GROUP=wt.group, HAS_ZEROS=wt.zeros is not None, HAS_PQS=wt.pqs is not None,
        BLOCK_N=_DEQUANT_BLOCK_N, BLOCK_K=_DEQUANT_BLOCK_K, num_warps=4,
        **pdl.triton_args(x2.device),
    )
    _mm(x2, w, bias, out)


def _mm(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = x2 @ w^T (+ bias), cuBLAS in x.dtype."""
    if bias is None:
        torch.mm(x2, w.t(), out=out)
    else:
        torch.addmm(bias.to(x2.dtype), x2, w.t(), out=out)


def _cuda_takes(x2: torch.Tensor, wt: _Weights, bias: torch.Tensor | None) -> bool:
    """Whether the CUDA GEMV can read these tensors (shape rules aside): CuPy present,
    CUDA tensors, float32 scales / zeros / pqs, 16-byte aligned and contiguous."""
    floats = [t for t in (wt.scale, wt.zeros, wt.pqs) if t is not None]
    return (
        x2.is_cuda
        and cuda_weight_only.available()
        and all(t.dtype == torch.float32 for t in floats)
        and cuda_weight_only.aligned(x2, wt.qweight, wt.pqs)
        and all(t.is_contiguous() for t in floats)
        and (bias is None or bias.is_cuda)
    )


def _cutlass_takes(x2: torch.Tensor, wt: _Weights, bias: torch.Tensor | None,
                   out: torch.Tensor) -> bool:
    """Whether the CUTLASS GEMM can read these tensors: tiled int8 / int4, its shape rules, no
    pre-quant scale, float32 scales / zeros, 16-byte aligned weight and output (x it gathers
    into the tiles' K order), a Hopper GPU with the build tools (`cutlass_gemm.available`)."""
    floats = [t for t in (wt.scale, wt.zeros) if t is not None]
    return (x2.is_cuda and wt.tiled and wt.pqs is None
            and cutlass_gemm.takes(wt.n, wt.k, wt.bits, wt.group)
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in floats)
            and cuda_weight_only.aligned(wt.qweight, out) and (bias is None or bias.is_cuda)
            and cutlass_gemm.available(x2.device.index))


def _cutlass_usable(x2: torch.Tensor, wt: _Weights) -> bool:
    return cutlass_gemm.usable(x2.shape[0], wt.n, wt.bits, wt.group, wt.zeros is not None,
                               x2.dtype, x2.device)


def _word_aligned(qweight: torch.Tensor) -> bool:
    """Whether every row of a (contiguous) 1-byte weight starts on a 4-byte boundary."""
    return qweight.stride(0) % 4 == 0 and qweight.data_ptr() % 4 == 0


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()
