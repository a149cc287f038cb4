"""Weight-only quantized matmuls: torch references (CPU and CUDA), the oracle for fast kernels.

Layouts (W is [out, in]; packed int4 is two values per byte along `in`, low nibble = even
index, see tpquant.quantization.packing):

    per channel:  qweight int8 [out, in] (bits=8) or packed uint8 [out, in/2] (bits=4),
                  scale float [out];            W = q * scale[:, None]
    groupwise:    qweight packed uint8 [out, in/2], scales float [in/g, out],
                  zeros float [in/g, out] or None (then q is signed symmetric int4),
                  pre_quant_scale float [in] or None;
                  y = (x * pqs) @ ((q - zero) * scale)^T

All math is float32 whatever x's dtype; the result is cast back to x.dtype. Row-parallel
shards pass through unchanged: sizes are read from the tensors, not from a config.
"""

from __future__ import annotations

import torch

from tpquant.quantization.packing import unpack_int4


def dequantize_weight_only(qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Float32 W[out, in] = q * scale[:, None] for per-channel symmetric int8 / int4."""
    if bits == 8:
        q = qweight
    elif bits == 4:
        q = unpack_int4(qweight, signed=True)
    else:
        raise ValueError(f"weight-only bits must be 8 or 4, got {bits}")
    if scale.shape != (q.shape[0],):
        raise ValueError(f"scale must be [out]={q.shape[0]}, got {tuple(scale.shape)}")
    return q.float() * scale.float()[:, None]


def dequantize_groupwise(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    pre_quant_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 effective W[out, in]: ((q - zero) * scale)[:, j], times pre_quant_scale[j] if given.

    With zeros the codes are unsigned 0..15, without them signed -8..7.
    """
    q = unpack_int4(qweight, signed=zeros is None)
    out_features, in_features = q.shape
    if scales.shape != (in_features // group_size, out_features) or in_features % group_size:
        raise ValueError(
            f"scales must be [in/g, out] = [{in_features}/{group_size}, {out_features}], "
            f"got {tuple(scales.shape)}"
        )
    # [in/g, out] -> [out, in]: one scale per input column of its group.
    s = scales.float().t().repeat_interleave(group_size, dim=1)
    w = q.float()
    if zeros is not None:
        if zeros.shape != scales.shape:
            raise ValueError(f"zeros must match scales {tuple(scales.shape)}, got {tuple(zeros.shape)}")
        w = w - zeros.float().t().repeat_interleave(group_size, dim=1)
    w = w * s
    if pre_quant_scale is not None:
        w = w * _check_pqs(pre_quant_scale, in_features)
    return w


def weight_only_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[..., out] = x[..., in] @ (q * scale)^T + bias; math in float32, result in x.dtype."""
    w = dequantize_weight_only(qweight, scale, bits)
    return _linear_f32(x, w, bias)


def groupwise_matmul(
    x: torch.Tensor,
    qweight_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    pre_quant_scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[..., out] = (x * pqs) @ ((q - zero) * scale)^T + bias; float32 math, result in x.dtype."""
    w = dequantize_groupwise(qweight_packed, scales, zeros, group_size)
    xf = x.float()
    if pre_quant_scale is not None:
        # Scale the activation, as the fused kernels do, rather than folding pqs into W.
        xf = xf * _check_pqs(pre_quant_scale, w.shape[1])
    return _linear_f32(xf, w, bias).to(x.dtype)


def _linear_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {w.shape[1]}")
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def _check_pqs(pqs: torch.Tensor, in_features: int) -> torch.Tensor:
    if pqs.shape != (in_features,):
        raise ValueError(f"pre_quant_scale must be [in]={in_features}, got {tuple(pqs.shape)}")
    return pqs.float()
