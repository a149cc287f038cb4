"""Triton kernels for W8A8: the int8 GEMM with a fused dequantizing epilogue, and int8
activation quantization (per token or static, with the runtime smoother fused in).

Numerics are those of the torch references in tpquant.kernels.w8a8, op for op:

- GEMM: int8 x int8 products summed in int32 (`tl.dot(..., out_dtype=tl.int32)`, int8 tensor
  cores on Hopper), exact like the reference's float64 product. The epilogue is
  float32(acc) * s_x * s_w + bias in that order, compiled without FMA contraction
  (`enable_fp_fusion=False`), then rounded to nearest-even into the output dtype: the same
  float32 operations as the reference, so the output is the reference's bit for bit.
- Quantization: scale = max(amax, tiny) / 127 and q = round_half_even(x / scale) clamped to
  [-128, 127], with IEEE divisions (`div_rn`; Triton's plain `/` is approximate on fp32) and
  x / smoother also `div_rn`: the int8 codes and scales equal the reference's exactly.

Launchers take any tensors Triton can address: CUDA tensors, or CPU tensors when the module
was imported with TRITON_INTERPRET=1 (the unit tests run every kernel that way). Nothing here
synchronizes with the host or reads device values, so every launch is CUDA-graph capturable.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from tpquant.kernels import pdl
from tpquant.kernels.device import sm_count

# Smallest normal float32 (2^-126): the floor numerics.symmetric_scale clamps amax to.
TINY = tl.constexpr(1.1754943508222875e-38)
# Float types a launcher accepts for activations and outputs.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Offsets are int32 inside the kernels.
_MAX_NUMEL = 2**31 - 1
# SM count assumed where no CUDA device is at hand (the interpreter): an H100/H200.
DEFAULT_SMS = 132


# -- device helpers shared with triton_norm ---------------------------------------------------------


@triton.jit
def round_half_even(v):
    """torch.round's rule (ties to even) from floor alone, so the interpreter runs it too.
    v - floor(v) is exact in float32 for the |v| <= 128 it is used on."""
    f = tl.floor(v)
    d = v - f
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & f_is_odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def quantize_int8(v, scale):
    """int8 codes of float32 v for a float32 scale: clamp(round(v / scale), -128, 127).
    Clamping before rounding gives the same codes (the bounds are integers)."""
    t = tl.math.div_rn(v, scale)
    t = tl.minimum(tl.maximum(t, -128.0), 127.0)
    return round_half_even(t).to(tl.int8)


@triton.jit
def int8_scale(amax):
    """numerics.symmetric_scale for int8: max(amax, tiny) / 127, an IEEE division."""
    return tl.math.div_rn(tl.maximum(amax, TINY), 127.0)


@triton.jit
def row_scale(amax, scale_ptr, row, PER_TOKEN: tl.constexpr):
    """A row's float32 scale. Per token: from its |values| (or their running maxima) `amax`,
    and stored to scale_ptr[row]; static: the one value at scale_ptr (amax unused)."""
    if PER_TOKEN:
        scale = int8_scale(tl.max(amax, axis=0))
        tl.store(scale_ptr + row, scale)
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
    return scale


# -- activation quantization ------------------------------------------------------------------------


@triton.jit
def _load_row(x_row, smoother_ptr, offs, mask, HAS_SMOOTHER: tl.constexpr):
    v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTHER:
        s = tl.load(smoother_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        v = tl.math.div_rn(v, s)
    return v


@triton.jit
def _quantize_rows_kernel(
    x_ptr, smoother_ptr, scale_ptr, q_ptr, K, stride_x, stride_q,
    HAS_SMOOTHER: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    # One program per row. ONE_PASS (the row fits one block): read once and held in registers
    # between the amax and the quantization. Otherwise an amax pass (per token), then the
    # quantize pass, the row re-read from cache, so any K fits.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        v = _load_row(x_row, smoother_ptr, offs, mask, HAS_SMOOTHER)
        scale = row_scale(tl.abs(v), scale_ptr, row, PER_TOKEN)
        tl.store(q_row + offs, quantize_int8(v, scale), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        if PER_TOKEN:
            for k0 in range(0, K, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                v = _load_row(x_row, smoother_ptr, offs, offs < K, HAS_SMOOTHER)
                amax = tl.maximum(amax, tl.abs(v))
        scale = row_scale(amax, scale_ptr, row, PER_TOKEN)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            v = _load_row(x_row, smoother_ptr, offs, mask, HAS_SMOOTHER)
            tl.store(q_row + offs, quantize_int8(v, scale), mask=mask)


def row_block(k: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row kernel over k features: the row in chunks of at most 4096.
    (Chunks of up to 16384 with 16 warps, one trip per pass for a rank's Llama-2-7B
    intermediate size, measured 5-10% slower at M = 1024 / 4096: docs/benchmarks.md.)"""
    block = min(triton.next_power_of_2(max(k, 16)), 4096)
    return block, 4 if block <= 1024 else 8


# Rows up to this many features are read once and held in registers (at most 16 float32
# values a thread). sweep_gemm_variants.py --parts quant (H200, 2026-11-30, with a
# smoother, K = 4096 / 5504 / 7168 / 8192): 1.06-1.74x faster than two passes of 4096-wide
# chunks, geomean 1.51 / 1.60 / 1.56 / 1.46 / 1.21 / 1.15x at M = 1 / 16 / 64 / 256 / 1024 /
# 4096. A 16384-wide block with 16 warps (K = 11008, 14336) won at M <= 64 but lost at M =
# 1024 / 4096 (0.55-0.85x; K = 11008 at M = 256 too, 0.90x).
ONE_PASS_MAX_K = 8192


def row_plan(k: int) -> tuple[int, int, bool]:
    """(BLOCK, num_warps, one pass) for a row kernel over k features (the quantizer here, the
    SmoothQuant RMSNorm in triton_norm): the whole row in one block held in registers, or
    `row_block`'s chunks, re-read by each pass."""
    block = triton.next_power_of_2(max(k, 16))
    if block > ONE_PASS_MAX_K:
        return *row_block(k), False
    if block > 4096:
        return block, 16, True
    return *row_block(k), True  # one chunk of row_block's is the whole row


def as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x [..., K] as a 2-D [rows, K] view (a copy only if the last dim is not contiguous)."""
    if x.dim() == 0:
        raise ValueError(f"{name} must have a feature dimension, got a scalar")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.numel() > _MAX_NUMEL:
        raise ValueError(f"{name} has {x2.numel()} elements, more than int32 offsets address")
    return x2


def check_vector(v: torch.Tensor, n: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """v as a contiguous [n] vector on like's device, or a clear error."""
    if v.numel() != n:
        raise ValueError(f"{name} must have {n} elements, got shape {tuple(v.shape)}")
    if v.device != like.device:
        raise ValueError(f"{name} is on {v.device}, the input on {like.device}")
    return v.reshape(n).contiguous()


def output(
    out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor, name: str
) -> torch.Tensor:
    """`out` checked against what a kernel writes (contiguous, shape, dtype, device), or a new
    tensor. A caller-owned out keeps addresses fixed (CUDA graphs) and lets tests poison it."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    if out.dtype != dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor on {like.device}, got {out.dtype} on "
            f"{out.device}{'' if out.is_contiguous() else ' (not contiguous)'}"
        )
    if out.numel() != math.prod(shape):
        raise ValueError(f"{name} must hold {shape}, got shape {tuple(out.shape)}")
    return out.view(shape)


def check_scalar(s: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    if s.numel() != 1:
        raise ValueError(f"{name} must be one value (static), got shape {tuple(s.shape)}")
    if s.device != like.device:
        raise ValueError(f"{name} is on {s.device}, the input on {like.device}")
    return s.reshape(1).float()


def quantize_rows(
    x: torch.Tensor,
    smoother: torch.Tensor | None = None,
    static_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of x [..., K] (divided by smoother[K] first, if given) and their scale.

    Per token (static_scale None): scale float32 [..., 1] = max_j |x_j / smoother_j| / 127.
    Static: scale = static_scale (one value) as float32 of shape [].
    out / scale_out: optional int8 [..., K] / float32 [..., 1] tensors to write into.
    """
    x2 = as_rows(x, "x")
    rows, k = x2.shape
    if smoother is not None:
        smoother = check_vector(smoother, k, x2, "smoother")
    q = output(out, (rows, k), torch.int8, x2, "out")
    if static_scale is None:
        scale = output(scale_out, (rows,), torch.float32, x2, "scale_out")
    else:
        scale = check_scalar(static_scale, x2, "static_scale")
    if rows:
        block, warps, one_pass = row_plan(k)
        _quantize_rows_kernel[(rows,)](
            x2, x2 if smoother is None else smoother, scale, q, k, x2.stride(0), q.stride(0),
            HAS_SMOOTHER=smoother is not None, PER_TOKEN=static_scale is None, BLOCK=block,
            ONE_PASS=one_pass, num_warps=warps, **pdl.triton_args(x2.device),
        )
    q = q.reshape(x.shape)
    if static_scale is None:
        return q, scale.reshape(*x.shape[:-1], 1)
    return q, scale.reshape(())


# -- the W8A8 GEMM ----------------------------------------------------------------------------------


class GemmConfig(NamedTuple):
    """Tile shape and pipelining of one GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: bool = False  # operands through TMA tensor descriptors (needs K % 16 == 0)


# Tile shapes by M (tokens). Decode (M <= 16) is a weight-streaming GEMV: the smallest tensor
# core tile on M, and what counts is the weight bytes in flight, so wide K blocks in a deep
# pipeline (benchmarks/bench_w8a8_gemm.py, H200, Llama-2-7B TP 1 and 2 shapes, 12 decode
# tiles: 16 x 64 x 512 in 5 stages 1.46x / 1.52x bf16 at M = 1 / 4, the fastest or within
# 10% of it on every shape, against 0.90x / 1.33x for 16 x 32 x 256 in 4 stages).
# Large M uses the 128 x 256 x 128 tile Hopper's int8 wgmma runs best with, its operands
# fetched by TMA in 4 stages (same benchmark at M = 1024 / 4096: 1.51x / 1.55x bf16 on TP 1
# shapes, against 1.32x for pointer loads in 3 stages).
# Medium M (17-256) is still weight-bound: 64 x 128 tiles leave SMs idle on narrow weights
# (Llama-2-7B o / down: 32 tiles at M <= 64, 0.82-0.99x bf16), so up to SMALL_TILE_MAX_M a
# 64 x 64 x 256 TMA tile in 5 stages takes over wherever its own tiles fit in one wave
# (benchmarks/sweep_gemm_variants.py, H200, 12 Llama-2-7B TP 1 / 2 and 70B TP 4 shapes,
# 2026-11-30, both tiles timed on every shape: this rule 1.43 / 1.51 / 1.40x bf16 at M = 32
# / 64 / 128, the better tile per shape 1.43 / 1.51 / 1.40x, the medium tile alone 1.15 /
# 1.15 / 1.14x; a second wave of small tiles lost to the medium tile, 70B gate_up at M = 32
# 46.4 against 35.6 us; at M = 256 the small tile lost everywhere, 0.96x against 1.20x).
DECODE_MAX_M = 16
SMALL_TILE_MAX_M = 128
MEDIUM_MAX_M = 256
DECODE_CONFIG = GemmConfig(16, 64, 512, 1, 4, 5)
SMALL_TILE_CONFIG = GemmConfig(64, 64, 256, 8, 4, 5, tma=True)
# Shared memory assumed where no CUDA device is at hand: an H100/H200's 227 KiB per block.
DEFAULT_SMEM = 232448
LARGE_CONFIG = GemmConfig(128, 256, 128, 8, 8, 4, tma=True)
LARGE_NARROW_CONFIG = GemmConfig(128, 128, 128, 8, 8, 4, tma=True)
MEDIUM_CONFIG = GemmConfig(64, 128, 128, 8, 4, 4)


# Time of one 128 x 128 tile relative to one 128 x 256 tile, both TMA in 4 stages: 0.5 for
# the area over the narrow tile's lower throughput (bench_w8a8_gemm.py, H200, M = 4096, many
# waves: 1.29x bf16 against 1.57x).
NARROW_TILE_COST = 0.5 * 1.57 / 1.29


def gemm_config(m: int, n: int, k: int, num_sms: int = DEFAULT_SMS,
                smem: int = DEFAULT_SMEM) -> GemmConfig:
    """The tile configuration for an [m, k] x [k, n] int8 GEMM (pure; thresholds above).
    smem: the device's shared memory per block, which bounds the deep pipelines' depth."""
    if m <= DECODE_MAX_M:
        return _fit_stages(DECODE_CONFIG, smem)
    small = SMALL_TILE_CONFIG
    small_tiles = triton.cdiv(m, small.block_m) * triton.cdiv(n, small.block_n)
    if m <= SMALL_TILE_MAX_M and small_tiles <= num_sms:  # one wave
        return _fit_stages(small, smem)
    if m <= MEDIUM_MAX_M:
        return MEDIUM_CONFIG
    # Large M: whichever tile finishes first counting whole waves (one tile per SM): the
    # large tile even at one wave or a little less (4096 x 4096 at M = 1024: 128 tiles, 1.50x
    # bf16 against 1.25x narrow), the narrow one where the large tiles' last wave is mostly
    # idle (6144 x 4096 at M = 1024: 192 large tiles are 2 waves, 384 narrow ones 3).
    def waves(cfg: GemmConfig) -> int:
        return -(-triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n) // num_sms)

    narrow = waves(LARGE_NARROW_CONFIG) * NARROW_TILE_COST
    return LARGE_NARROW_CONFIG if narrow < waves(LARGE_CONFIG) else LARGE_CONFIG


def _fit_stages(cfg: GemmConfig, smem: int) -> GemmConfig:
    """cfg with as many of its pipeline stages (two at least) as `smem` bytes hold."""
    stage = (cfg.block_m + cfg.block_n) * cfg.block_k  # int8 A and B blocks
    return cfg._replace(num_stages=max(2, min(cfg.num_stages, smem // stage)))


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, in grouped order: GROUP_M row-tiles share each column
    tile while it is in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % num_in_group) % group_size, (pid % num_in_group) // group_size


@triton.jit
def _store_tile(acc, c_ptr, sx_ptr, sw_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm,
                X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                EPILOGUE: tl.constexpr):
    """The int32 tile, or (EPILOGUE) float32(acc) * s_x * s_w + bias in the reference's order."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if EPILOGUE:
        y = acc.to(tl.float32)
        if X_PER_TOKEN:
            y = y * tl.load(sx_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
        else:
            y = y * tl.load(sx_ptr)
        if W_PER_CHANNEL:
            y = y * tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        else:
            y = y * tl.load(sw_ptr)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptrs, acc, mask=mask)


@triton.jit
def _w8a8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, K,
    stride_am, stride_bn, stride_cm,
    X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    # C[M, N] = A[M, K] @ B[N, K]^T; A and B have unit stride along K (B is the weight as
    # stored, [out, in] row-major, which is the K-major layout int8 wgmma wants).
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows / columns past the edge read a valid row (modulo) and are masked at the store,
    # which keeps the main loop's loads unmasked along M and N.
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + (offs_n % N)[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _store_tile(acc, c_ptr, sx_ptr, sw_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm,
                X_PER_TOKEN, W_PER_CHANNEL, HAS_BIAS, EPILOGUE)


@triton.jit
def _w8a8_gemm_tma_kernel(
    a_desc, b_desc, c_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, K, stride_cm,
    X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    # The same product with both operands fetched by the TMA unit (Hopper) through tensor
    # descriptors: no address arithmetic or masks in the loop (blocks past an edge read as
    # zeros), which leaves the warps to the int8 wgmma.
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k0])
        b = b_desc.load([pid_n * BLOCK_N, k0])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _store_tile(acc, c_ptr, sx_ptr, sw_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm,
                X_PER_TOKEN, W_PER_CHANNEL, HAS_BIAS, EPILOGUE)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return sm_count(device)


def _smem(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMEM
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", DEFAULT_SMEM)


def _int8_operands(qx: torch.Tensor, qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if qx.dtype != torch.int8 or qweight.dtype != torch.int8:
        raise TypeError(f"the W8A8 GEMM needs int8 operands, got {qx.dtype} and {qweight.dtype}")
    if qweight.dim() != 2 or qx.dim() == 0 or qx.shape[-1] != qweight.shape[1]:
        raise ValueError(
            f"the W8A8 GEMM: q_x {tuple(qx.shape)} does not match q_w [out, in] {tuple(qweight.shape)}"
        )
    if qx.device != qweight.device:
        raise ValueError(f"q_x is on {qx.device}, q_w on {qweight.device}")
    a = qx.reshape(-1, qx.shape[-1])
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    if max(a.numel(), b.numel(), a.shape[0] * b.shape[0]) > _MAX_NUMEL:
        raise ValueError("the W8A8 GEMM: an operand or the output exceeds int32 offsets")
    return a, b


def w8a8_gemm(
    qx: torch.Tensor,
    x_scale: torch.Tensor | None,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[..., N] = (q_x[..., K] @ q_w[N, K]^T) * s_x * s_w + bias in one kernel.

    x_scale: [..., 1] per token or one value (static); weight_scale: [N] or one value;
    bias: [N], any float dtype; out_dtype: float16, bfloat16 or float32, or torch.int32 for
    the raw int32 product (scales and bias must then be None). config: tiles, else
    gemm_config's choice. out: an optional [..., N] out_dtype tensor to write into.
    """
    a, b = _int8_operands(qx, qweight)
    m, k = a.shape
    n = b.shape[0]
    raw = out_dtype == torch.int32
    if raw:
        if x_scale is not None or weight_scale is not None or bias is not None:
            raise ValueError("out_dtype=torch.int32 returns the raw product: pass no scales or bias")
        sx = sw = a  # unused by the kernel
    else:
        if out_dtype not in FLOAT_DTYPES:
            raise TypeError(f"out_dtype must be float16, bfloat16, float32 or int32, got {out_dtype}")
        if x_scale is None or weight_scale is None:
            raise ValueError("a float output needs x_scale and weight_scale")
        sx = _scale_vector(x_scale, m, a, "x_scale")
        sw = _scale_vector(weight_scale, n, a, "weight_scale")
    if bias is not None:
        bias = check_vector(bias, n, a, "bias")
    c = output(out, (m, n), out_dtype, a, "out")
    if m and n:
        cfg = config or gemm_config(m, n, k, _num_sms(a.device), _smem(a.device))
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        meta = dict(
            X_PER_TOKEN=not raw and sx.numel() == m and m > 1,
            W_PER_CHANNEL=not raw and sw.numel() == n and n > 1,
            HAS_BIAS=bias is not None, EPILOGUE=not raw,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
            **pdl.triton_args(a.device),
        )
        if cfg.tma and _tma_ok(a, b):
            _w8a8_gemm_tma_kernel[grid](
                TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k]),
                TensorDescriptor.from_tensor(b, [cfg.block_n, cfg.block_k]),
                c, sx, sw, a if bias is None else bias, m, n, k, c.stride(0), **meta,
            )
        else:
            _w8a8_gemm_kernel[grid](
                a, b, c, sx, sw, a if bias is None else bias, m, n, k,
                a.stride(0), b.stride(0), c.stride(0), EVEN_K=k % cfg.block_k == 0, **meta,
            )
    return c.reshape(*qx.shape[:-1], n)


def _tma_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether TMA descriptors can address both operands: 16-byte aligned bases and rows."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in (a, b))


def _scale_vector(s: torch.Tensor, n: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float32 scale of n values (per row / column) or of one value (per tensor)."""
    if s.numel() not in (1, n):
        raise ValueError(f"{name} must have 1 or {n} elements, got shape {tuple(s.shape)}")
    if s.device != like.device:
        raise ValueError(f"{name} is on {s.device}, the operands on {like.device}")
    return s.reshape(-1).float().contiguous()
