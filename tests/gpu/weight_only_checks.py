"""What the weight-only GPU tests share: the tolerance per output dtype, the check against a
float64 reference, and poisoning the caching allocator so an unwritten output stays NaN."""

from __future__ import annotations

import torch

# float16 / bfloat16 outputs round once (2^-11, 2^-8 relative); the dequant path also rounds W.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def check(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what) -> None:
    """max |y - expected| <= TOL[dtype] * max |expected|, every element written."""
    assert y.dtype == dtype and y.shape == expected.shape, what
    assert torch.isfinite(y).all(), f"{what}: an output element was never written"
    err = (y.double() - expected).abs().max().item()
    bound = TOL[dtype] * expected.abs().max().item()
    assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g}"


def poison(shape, dtype, device) -> None:
    """Leave a NaN-filled block of this size in the caching allocator: the next torch.empty of
    the same size (the op's output) reuses it, so an element the kernel misses stays NaN."""
    torch.full(shape, float("nan"), dtype=dtype, device=device)
