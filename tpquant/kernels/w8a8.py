"""W8A8 (SmoothQuant) reference ops: int8 activations times int8 weights, int32 accumulation.

    y[t, o] = (q_x[t, :] . q_w[o, :]) * s_x[t] * s_w[o] + bias[o]

q_x = round(x / s_x) with s_x either per token (s_x[t] = max_j |x_tj| / 127, computed here at
run time) or one static scalar from calibration; s_w per output channel [out] or one scalar.
The integer dot product is exact; every rescale is float32 math, as in the CUDA epilogue.

Pure torch, CPU and CUDA: these are the oracles the fast GPU kernels are tested against.
Scale and round/clamp rules come from `tpquant.quantization.numerics` only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tpquant.kernels.norm import rms_norm_f32
from tpquant.quantization.numerics import INT8_MAX, quantize_symmetric, symmetric_scale

# int8 x int8 products are at most 128 * 128 = 2^14 in magnitude, so an int32 accumulator holds
# any K up to 2^31 / 2^14 = 2^17 without overflow (float64 would stay exact far beyond that).
MAX_K = 1 << 17


class QuantizedActivation(NamedTuple):
    """int8 activations and their scale ([..., 1] per token, or [] static), as the fused
    RMSNorm + quantize produces them; a W8A8 linear takes them without quantizing again."""

    q: torch.Tensor
    scale: torch.Tensor


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: (q int8 [..., in], scale float32 [..., 1]).

    scale = max_j |x_j| / 127 over each token's last dimension; an all-zero token gets the
    smallest positive scale (numerics.symmetric_scale) and quantizes to zeros.
    """
    amax = x.detach().abs().amax(dim=-1, keepdim=True)
    scale = symmetric_scale(amax, INT8_MAX)
    return quantize_symmetric(x, scale, INT8_MAX), scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize with a given scale (a scalar, or anything broadcasting against x) to int8."""
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
) -> torch.Tensor:
    """y = (q_x @ q_w^T) * s_x * s_w + bias, rescaled in float32, returned in `out_dtype`.

    qx int8 [..., in]; x_scale float32 [..., 1] (per token) or [] (static);
    qweight int8 [out, in]; weight_scale float32 [out] (per channel) or [];
    bias [out] in any float dtype.
    """
    acc = int8_matmul(qx, qweight).float()
    y = acc * x_scale.float() * weight_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def rms_norm_quantize(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    static_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SmoothQuant RMSNorm: normalize, then quantize to int8 without a float round trip.

    The normalized float32 values are quantized directly (as the fused kernel does, with no
    rounding to x's dtype in between). Returns (q int8 [..., hidden], scale): the per-token
    scale float32 [..., 1] when `static_scale` is None, else `static_scale` as float32.
    The SmoothQuant factor is already folded into `weight` (weight = g / s).
    """
    y = rms_norm_f32(x, weight, eps)
    if static_scale is None:
        return quantize_per_token(y)
    scale = static_scale.float()
    return quantize_static(y, scale), scale


def _per_row(weight_scale: torch.Tensor) -> torch.Tensor:
    # A [out] scale multiplies rows of [out, in]; a scalar broadcasts as is.
    return weight_scale[:, None] if weight_scale.dim() == 1 else weight_scale
