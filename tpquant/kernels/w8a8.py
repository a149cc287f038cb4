"""W8A8 (SmoothQuant) reference ops: int8 activations times int8 weights, int32 accumulation.

    y[t, o] = (q_x[t, :] . q_w[o, :]) * s_x[t] * s_w[o] + bias[o]

q_x = round(x / s_x) with s_x either per token (s_x[t] = max_j |x_tj| / 127, computed here at
run time) or one static scalar from calibration; s_w per output channel [out] or one scalar.
The integer dot product is exact; every rescale is float32 math, as in the CUDA epilogue.

The torch code here runs on CPU and CUDA and is the oracle the fast GPU kernels are tested
against. Scale and round/clamp rules come from `tpquant.quantization.numerics` only.

Fast paths (Triton, tpquant.kernels.triton_w8a8 / triton_norm): each public op takes
`path=None` (choose: CUDA tensors in float16/bfloat16/float32 take the fast path, everything
else the reference) or forces one of PATHS; `w8a8_matmul` also has "int_mm" (cuBLAS int8
through torch._int_mm, then this file's epilogue) and "cutlass" (CUTLASS's int8 wgmma GEMM
with this file's epilogue fused, `tpquant.kernels.cutlass_gemm`; Hopper, nvcc and CUTLASS
headers), which the automatic choice takes from CUTLASS_FROM_M. What the fast paths return
equals the reference bit for bit, except after an RMSNorm (a few float32 ulps; see
triton_norm).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tpquant.kernels.norm import rms_norm_f32
from tpquant.quantization.numerics import INT8_MAX, quantize_symmetric, symmetric_scale

REFERENCE, TRITON, INT_MM, CUTLASS = "reference", "triton", "int_mm", "cutlass"
PATHS = (REFERENCE, TRITON)
GEMM_PATHS = (REFERENCE, TRITON, INT_MM, CUTLASS)
_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# torch._int_mm (cuBLAS) accepts M > 16 and K, N multiples of 8 only.
INT_MM_MIN_M = 17
INT_MM_ALIGN = 8
# From this M up the automatic choice takes torch._int_mm instead of the fused Triton GEMM;
# None: never. Its int32 output makes a round trip through memory that the fused epilogue
# avoids; not yet measured: set it from `python benchmarks/bench_gemm.py --paths` on the GPU.
INT_MM_FROM_M: int | None = None
# From this M up the automatic choice takes the CUTLASS GEMM where it runs (`_cutlass_ok`).
# bench_cutlass_gemm, H200, seven Llama-2-7B / 70B shapes, geomean over bf16, Triton against
# CUTLASS: M = 128 1.45 / 1.16x, 256 1.16 / 1.30x, 1024 1.52 / 1.82x, 4096 1.53 / 1.89x.
CUTLASS_FROM_M = 256

# int8 x int8 products are at most 128 * 128 = 2^14 in magnitude, so an int32 accumulator holds
# any K up to 2^31 / 2^14 = 2^17 without overflow (float64 would stay exact far beyond that).
MAX_K = 1 << 17


class QuantizedActivation(NamedTuple):
    """int8 activations and their scale ([..., 1] per token, or [] static), as the fused
    RMSNorm + quantize produces them; a W8A8 linear takes them without quantizing again."""

    q: torch.Tensor
    scale: torch.Tensor


def quantize_per_token(
    x: torch.Tensor, smoother: torch.Tensor | None = None, *, path: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: (q int8 [..., in], scale float32 [..., 1]).

    scale = max_j |x_j| / 127 over each token's last dimension; an all-zero token gets the
    smallest positive scale (numerics.symmetric_scale) and quantizes to zeros. With a
    smoother[in], x / smoother is quantized (the division fused into the fast kernel).
    """
    if choose_path(path, x, smoother) == TRITON:
        return _triton().quantize_rows(x, smoother)
    if smoother is not None:
        x = smooth_activation(x, smoother)
    amax = x.detach().abs().amax(dim=-1, keepdim=True)
    scale = symmetric_scale(amax, INT8_MAX)
    return quantize_symmetric(x, scale, INT8_MAX), scale


def quantize_static(
    x: torch.Tensor,
    scale: torch.Tensor,
    smoother: torch.Tensor | None = None,
    *,
    path: str | None = None,
) -> torch.Tensor:
    """Quantize with a given scale (a scalar, or anything broadcasting against x) to int8;
    with a smoother[in], x / smoother. The fast path takes a one-value scale."""
    fast_ok = scale.numel() == 1
    if choose_path(path, x, smoother, scale, fast_ok=fast_ok, why="a one-value scale") == TRITON:
        return _triton().quantize_rows(x, smoother, scale)[0]
    if smoother is not None:
        x = smooth_activation(x, smoother)
    return quantize_symmetric(x, scale, INT8_MAX)


def quantize_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Quantize W[out, in] with a per-row scale [out] or one scalar [] to int8 [out, in]."""
    return quantize_symmetric(weight, _per_row(weight_scale), INT8_MAX)


def dequantize_weight(qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """float32 q * s_w for a per-row [out] or scalar [] weight scale."""
    return qweight.float() * _per_row(weight_scale.float())


def smooth_activation(x: torch.Tensor, smoother: torch.Tensor | None) -> torch.Tensor:
    """x / smoother[in] in float32 (the runtime SmoothQuant division for o_proj / down_proj).

    Without a smoother, x is returned as float32 unchanged.
    """
    x = x.float()
    return x if smoother is None else x / smoother.float()


def int8_matmul(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """Exact integer product q_x[..., K] @ q_w[N, K]^T, returned as int32 [..., N].

    Computed as a float64 matmul, which is exact here (every partial sum is an integer below
    K * 2^14 <= 2^31 < 2^53) and, unlike integer matmul, runs on CUDA as well as CPU. The
    result is returned as int32, the accumulator type of the real kernels; K is capped at
    MAX_K so that it cannot overflow.
    """
    if qx.dtype != torch.int8 or qw.dtype != torch.int8:
        raise TypeError(f"int8_matmul needs int8 operands, got {qx.dtype} and {qw.dtype}")
    k = qx.shape[-1]
    if qw.dim() != 2 or qw.shape[1] != k:
        raise ValueError(f"int8_matmul: q_x [..., {k}] does not match q_w {tuple(qw.shape)}")
    if k > MAX_K:
        raise ValueError(f"int8_matmul: K = {k} exceeds {MAX_K}, an int32 accumulator overflows")
    acc = qx.double() @ qw.double().t()
    return acc.to(torch.int32)


def w8a8_matmul(
    qx: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    path: str | None = None,
) -> torch.Tensor:
    """y = (q_x @ q_w^T) * s_x * s_w + bias, rescaled in float32, returned in `out_dtype`.

    qx int8 [..., in]; x_scale float32 [..., 1] (per token) or [] (static);
    qweight int8 [out, in]; weight_scale float32 [out] (per channel) or [];
    bias [out] in any float dtype. path: None (gemm_path's choice) or one of GEMM_PATHS.
    """
    m = qx.numel() // max(qx.shape[-1], 1) if qx.dim() else 0
    n, k = qweight.shape if qweight.dim() == 2 else (0, 0)
    fast_ok = (
        qx.dtype == torch.int8 and qweight.dtype == torch.int8 and out_dtype in _FAST_DTYPES
        and x_scale.numel() in (1, m) and weight_scale.numel() in (1, n)
    )
    tensors = (qx, qweight, x_scale, weight_scale) + (() if bias is None else (bias,))
    on_device = fast_ok and all(t.is_cuda for t in tensors) and m > 0
    if path is None:
        path = gemm_path(m, n, k, on_device, cutlass=on_device and m >= CUTLASS_FROM_M
                         and _cutlass_ok(m, n, k, out_dtype, qx.device))
    elif path not in GEMM_PATHS:
        raise ValueError(f"w8a8_matmul path must be one of {GEMM_PATHS} or None, got {path!r}")
    elif path != REFERENCE and not fast_ok:
        raise ValueError(
            f"w8a8_matmul path {path!r} needs int8 operands, a float16/bfloat16/float32 output "
            f"and per-token/one-value x_scale, per-channel/one-value weight_scale"
        )
    elif path == CUTLASS and not (on_device and _cutlass_ok(m, n, k, out_dtype, qx.device)):
        raise ValueError(
            "w8a8_matmul path 'cutlass' needs CUDA tensors, a float16/bfloat16 output, K a "
            "multiple of 16 and N of 8, on a compute capability 9.0 GPU with nvcc and CUTLASS "
            f"headers; got N={n}, K={k}, {out_dtype}"
        )
    if path == TRITON:
        return _triton().w8a8_gemm(qx, x_scale, qweight, weight_scale, bias, out_dtype)
    if path == CUTLASS:
        from tpquant.kernels import cutlass_gemm

        out = torch.empty(m, n, dtype=out_dtype, device=qx.device)
        cutlass_gemm.w8a8_gemm(qx.reshape(m, k).contiguous(), x_scale, qweight.contiguous(),
                               weight_scale, bias, out)
        return out.reshape(*qx.shape[:-1], n)
    if path == INT_MM:
        if not int_mm_supported(m, n, k):
            raise ValueError(
                f"torch._int_mm needs M > 16 and K, N multiples of 8; got M={m}, N={n}, K={k}"
            )
        acc = torch._int_mm(qx.reshape(m, k), qweight.t()).reshape(*qx.shape[:-1], n)
    else:
        acc = int8_matmul(qx, qweight)
    return _epilogue(acc, x_scale, weight_scale, bias, out_dtype)


def _epilogue(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    # float32(acc) * s_x * s_w + bias: the order the fused kernel's epilogue keeps.
    y = acc.float() * x_scale.float() * weight_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int_mm_supported(m: int, n: int, k: int) -> bool:
    """Whether torch._int_mm (cuBLAS int8) takes an [m, k] x [k, n] product."""
    return m >= INT_MM_MIN_M and n % INT_MM_ALIGN == 0 and k % INT_MM_ALIGN == 0


def gemm_path(
    m: int, n: int, k: int, on_device: bool, int_mm_from_m: int | None = INT_MM_FROM_M,
    cutlass: bool = False,
) -> str:
    """The W8A8 GEMM implementation for an [m, k] x [k, n] product (pure).

    on_device: the operands are CUDA tensors the fast kernels take; cutlass: the CUTLASS GEMM
    runs here and takes them. CUTLASS from CUTLASS_FROM_M; else the fused Triton GEMM,
    unless int_mm_from_m is set and torch._int_mm takes the shape from that M up.
    """
    if not on_device:
        return REFERENCE
    if cutlass and m >= CUTLASS_FROM_M:
        return CUTLASS
    if int_mm_from_m is not None and m >= int_mm_from_m and int_mm_supported(m, n, k):
        return INT_MM
    return TRITON


def _cutlass_ok(m: int, n: int, k: int, out_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the CUTLASS GEMM runs here and takes the shape: its instantiation for M builds
    (at first use) and loads; a failed build warns once, and the automatic choice keeps Triton."""
    from tpquant.kernels import cutlass_gemm

    return (cutlass_gemm.w8a8_takes(n, k, out_dtype)
            and cutlass_gemm.available(device.index)
            and cutlass_gemm.loads(cutlass_gemm.w8a8_variant(m, out_dtype)))


def rms_norm_quantize(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    static_scale: torch.Tensor | None = None,
    *,
    path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SmoothQuant RMSNorm: normalize, then quantize to int8 without a float round trip.

    The normalized float32 values are quantized directly (as the fused kernel does, with no
    rounding to x's dtype in between). Returns (q int8 [..., hidden], scale): the per-token
    scale float32 [..., 1] when `static_scale` is None, else `static_scale` as float32.
    The SmoothQuant factor is already folded into `weight` (weight = g / s).
    """
    fast_ok = static_scale is None or static_scale.numel() == 1
    extra = (weight,) if static_scale is None else (weight, static_scale)
    if choose_path(path, x, *extra, fast_ok=fast_ok, why="a one-value static scale") == TRITON:
        from tpquant.kernels import triton_norm

        return triton_norm.rms_norm_quantize(x, weight, eps, static_scale)
    y = rms_norm_f32(x, weight, eps)
    if static_scale is None:
        return quantize_per_token(y, path=REFERENCE)
    scale = static_scale.float()
    return quantize_static(y, scale, path=REFERENCE), scale


def choose_path(
    path: str | None,
    x: torch.Tensor,
    *others: torch.Tensor | None,
    fast_ok: bool = True,
    why: str = "",
) -> str:
    """The path of an elementwise/row op on x (others: the tensors it also reads).

    None: TRITON for CUDA tensors with x in float16/bfloat16/float32, else REFERENCE.
    A forced path is checked: TRITON on anything else raises, naming what is wrong.
    """
    tensors = [t for t in (x, *others) if t is not None]
    if path is None:
        ok = fast_ok and x.dtype in _FAST_DTYPES and x.numel() > 0
        return TRITON if ok and all(t.is_cuda for t in tensors) else REFERENCE
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    if path == TRITON and not (fast_ok and x.dtype in _FAST_DTYPES):
        raise ValueError(
            "the Triton path needs float16/bfloat16/float32 input" + (f" and {why}" if why else "")
            + f"; got {x.dtype}"
        )
    return path


def _triton():
    # Imported on first use: CPU-only runs never load Triton.
    from tpquant.kernels import triton_w8a8

    return triton_w8a8


def _per_row(weight_scale: torch.Tensor) -> torch.Tensor:
    # A [out] scale multiplies rows of [out, in]; a scalar broadcasts as is.
    return weight_scale[:, None] if weight_scale.dim() == 1 else weight_scale
