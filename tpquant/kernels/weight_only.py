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

int8 / int4 per channel and groupwise int4 may also be held in the tiled layouts of
`tpquant.kernels.tiles` (tiled=True: the same codes reordered for the tiled GEMV); the
reference untiles them.

Fast paths: float16 / bfloat16 x on CUDA goes to the Triton kernels of
`tpquant.kernels.triton_weight_only` (its docstring lists the paths); everything else, and
any call with path="reference" (or $TPQUANT_WO_PATH=reference), runs the reference here.
"""

from __future__ import annotations

import torch

from tpquant.kernels import has_triton
from tpquant.kernels.tiles import check_tileable, untile_codes
from tpquant.quantization.packing import unpack_int4


def dequantize_weight_only(qweight: torch.Tensor, scale: torch.Tensor, bits: int,
                           tiled: bool = False) -> torch.Tensor:
    """Float32 W[out, in] = q * scale[:, None] for per-channel symmetric int8 / int4 (tiled:
    in the layout of `tpquant.kernels.tiles`)."""
    if tiled:
        q = _tiled_codes(qweight, signed=True, bits=bits)
    elif bits == 8:
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
    tiled: bool = False,
) -> torch.Tensor:
    """Float32 effective W[out, in]: ((q - zero) * scale)[:, j], times pre_quant_scale[j] if given.

    With zeros the codes are unsigned 0..15, without them signed -8..7. tiled: qweight in the
    layout of `tpquant.kernels.tiles`.
    """
    q = (_tiled_codes(qweight, signed=zeros is None, bits=4) if tiled
         else unpack_int4(qweight, signed=zeros is None))
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
    *,
    path: str | None = None,
    tiled: bool = False,
) -> torch.Tensor:
    """y[..., out] = x[..., in] @ (q * scale)^T + bias; math in float32, result in x.dtype.

    path: None/"auto" (then $TPQUANT_WO_PATH), "reference", or a Triton kernel path.
    tiled: qweight in the layout of `tpquant.kernels.tiles`.
    """
    if _use_triton(x, path):
        from tpquant.kernels import triton_weight_only

        _check_weight_only(qweight, scale, bits, x.shape[-1], bias, tiled)
        return triton_weight_only.weight_only_matmul(x, qweight, scale, bits, bias, path=path,
                                                     tiled=tiled)
    w = dequantize_weight_only(qweight, scale, bits, tiled)
    return _linear_f32(x, w, bias)


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
    tiled: bool = False,
) -> torch.Tensor:
    """y[..., out] = (x * pqs) @ ((q - zero) * scale)^T + bias; float32 math, result in x.dtype.

    path, tiled: as for `weight_only_matmul`.
    """
    if _use_triton(x, path):
        from tpquant.kernels import triton_weight_only

        _check_groupwise(qweight_packed, scales, zeros, group_size, pre_quant_scale, x, bias,
                         tiled)
        return triton_weight_only.groupwise_matmul(
            x, qweight_packed, scales, zeros, group_size, pre_quant_scale, bias, path=path,
            tiled=tiled,
        )
    w = dequantize_groupwise(qweight_packed, scales, zeros, group_size, tiled=tiled)
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


def _use_triton(x: torch.Tensor, path: str | None) -> bool:
    """Whether a call goes to the Triton kernels: float16/bfloat16 CUDA x, Triton installed,
    and the path (argument, else $TPQUANT_WO_PATH) not "reference"."""
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    if not has_triton():
        return False
    from tpquant.kernels.triton_weight_only import REFERENCE, forced_path

    return forced_path(path) != REFERENCE


def _check_weight_only(
    qweight: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int,
    bias: torch.Tensor | None, tiled: bool = False,
) -> None:
    """The reference's shape rules, checked from shapes only (no device sync)."""
    expected = {8: torch.int8, 4: torch.uint8}
    if bits not in expected:
        raise ValueError(f"weight-only bits must be 8 or 4, got {bits}")
    if qweight.dim() != 2 or qweight.dtype != expected[bits]:
        raise ValueError(
            f"bits={bits} needs a 2-D {expected[bits]} qweight, got {qweight.dtype} "
            f"{tuple(qweight.shape)}"
        )
    if scale.shape != (qweight.shape[0],):
        raise ValueError(f"scale must be [out]={qweight.shape[0]}, got {tuple(scale.shape)}")
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    if tiled:
        check_tileable(qweight.shape[0], k, bits)
    _check_common(in_features, k, qweight.shape[0], bias, qweight.device)


def _tiled_codes(tiled: torch.Tensor, signed: bool, bits: int) -> torch.Tensor:
    """The codes of a tiled weight in k order: int8 as stored; int4 int8 -8..7 (signed) or
    uint8 0..15."""
    codes = untile_codes(tiled, bits)
    if bits == 8:
        return codes
    return (codes.to(torch.int8) ^ 8) - 8 if signed else codes  # signed: sign-extend bit 3


def _check_groupwise(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
    pqs: torch.Tensor | None, x: torch.Tensor, bias: torch.Tensor | None, tiled: bool = False,
) -> None:
    if qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise ValueError(
            f"groupwise needs a packed 2-D uint8 qweight, got {qweight.dtype} {tuple(qweight.shape)}"
        )
    out_features, in_features = qweight.shape[0], 2 * qweight.shape[1]
    if group_size <= 0 or in_features % group_size or scales.shape != (
        in_features // group_size, out_features
    ):
        raise ValueError(
            f"scales must be [in/g, out] = [{in_features}/{group_size}, {out_features}], "
            f"got {tuple(scales.shape)}"
        )
    if zeros is not None and zeros.shape != scales.shape:
        raise ValueError(f"zeros must match scales {tuple(scales.shape)}, got {tuple(zeros.shape)}")
    if pqs is not None:
        _check_pqs(pqs, in_features)
    if tiled:
        check_tileable(out_features, in_features)
    _check_common(x.shape[-1], in_features, out_features, bias, qweight.device)


def _check_common(
    x_features: int, in_features: int, out_features: int, bias: torch.Tensor | None,
    device: torch.device,
) -> None:
    if x_features != in_features:
        raise ValueError(f"x has {x_features} input features, the weight {in_features}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must be [out]={out_features}, got {tuple(bias.shape)}")
    if device.type != "cuda":
        raise ValueError(f"x is on CUDA but the weight is on {device}")
