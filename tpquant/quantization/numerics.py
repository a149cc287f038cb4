"""The integer grids every scheme shares: symmetric int8/int4 and asymmetric uint4.

One place for the scale rule (amax / qmax, never zero) and the round-and-clamp, so that
weight-only, groupwise and SmoothQuant all quantize the same way and the tests can state
one bound: |dequantize(quantize(x)) - x| <= scale / 2 for every x inside the range.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
INT4_MAX = 7  # symmetric int4 uses [-7, 7] so that +-amax both land on the grid
INT4_MIN = -8  # stored range; -8 only appears through clamping of rounding noise
UINT4_MAX = 15

# A scale of zero (an all-zero row, group or padded head) would divide by zero; any positive
# scale represents zeros exactly, so clamp amax to the smallest normal float32 first.
_TINY = torch.finfo(torch.float32).tiny


def symmetric_scale(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Scale mapping [-amax, amax] onto [-qmax, qmax]; float32, never zero."""
    amax = amax.float().clamp_min(_TINY)
    # Divide by a tensor, not a Python int: CUDA turns `t / int` into a multiply by the
    # reciprocal, 1 ulp off the CPU result, and engines built on either should be identical.
    return amax / torch.full_like(amax, qmax)


def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """round(x / scale) clamped to [-qmax - 1, qmax], as int8. `scale` broadcasts against x."""
    q = torch.round(x.float() / scale.float())
    return q.clamp(-qmax - 1, qmax).to(torch.int8)


def asymmetric_params(
    xmin: torch.Tensor, xmax: torch.Tensor, qmax: int = UINT4_MAX
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) mapping [min(xmin, 0), max(xmax, 0)] onto [0, qmax].

    The zero point is kept in float (not rounded): then x / scale + zero spans exactly
    [0, qmax] and every value is within scale / 2 after rounding. The range always holds 0,
    so zero padding stays exactly zero.
    """
    lo = xmin.float().clamp_max(0)
    hi = xmax.float().clamp_min(0)
    span = (hi - lo).clamp_min(_TINY)
    scale = span / torch.full_like(span, qmax)  # see symmetric_scale
    zero = -lo / scale
    return scale, zero


def quantize_asymmetric(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int = UINT4_MAX
) -> torch.Tensor:
    """round(x / scale + zero) clamped to [0, qmax], as uint8."""
    q = torch.round(x.float() / scale.float() + zero.float())
    return q.clamp(0, qmax).to(torch.uint8)
