"""Block-diagonal Hadamard rotation of a linear layer's input (QuaRot's online rotation).

For an orthogonal H, y = x W^T = (x H)(W H)^T: the weight is rotated once while loading and
the activation at run time, and the float model computes the same function. With
H = blockdiag(H_b, ..., H_b), H_b the Sylvester Hadamard matrix of order b divided by sqrt(b)
(symmetric and orthogonal), each output channel of the rotation mixes b input channels with
weights +-1/sqrt(b): a few huge channels (down_proj's input on the attention-sink token,
thousands of times the rest) are spread over b channels and shrink by sqrt(b). That is what a
single static per-tensor activation scale needs (SmoothQuant alone leaves them: 1.41x the
float perplexity on SmolLM2, 1.10x with the rotation; docs/design-notes.md, note 14).

Tensor parallelism: a row-parallel layer's input is split in contiguous slices of in/tp
features; when b divides in/tp no block crosses a slice, so every rank rotates its own slice
and the weight's columns of it: no communication, and the same blocks at any TP that keeps
b | in/tp (`rotation_block` picks b from the slice width).
"""

from __future__ import annotations

import math

import torch

MAX_BLOCK = 128  # spreading over more channels gained nothing on SmolLM2 (64: 1.112, 128: 1.105, 256: 1.108)


def hadamard(b: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order b (a power of two) / sqrt(b): float64 [b, b]."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"a Hadamard block must be a power of two, got {b}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(b)


def rotation_block(features: int, max_block: int = MAX_BLOCK) -> int:
    """The largest power of two <= max_block that divides `features` (a rank's slice width)."""
    if features < 1:
        raise ValueError(f"features must be >= 1, got {features}")
    return min(features & -features, max_block)  # lowest set bit: the largest power-of-2 divisor


def rotate_weight(weight: torch.Tensor, b: int) -> torch.Tensor:
    """W[out, in] -> W H (H = blockdiag of hadamard(b)), in float64, returned in W's dtype."""
    out_features, in_features = weight.shape
    _check_divides(b, in_features)
    w = weight.double().reshape(out_features, in_features // b, b) @ hadamard(b)
    return w.reshape(out_features, in_features).to(weight.dtype)


def rotate_activation(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x[..., n] -> x H for H = blockdiag(h, ...), h [b, b] in x's dtype: one matmul (float32
    accumulation on GPUs), no casts. Every entry of h is +-1/sqrt(b), so rounding h to x's
    dtype scales the whole rotation by one factor within 2^-9 of 1 (1e-4 at b = 128)."""
    b = h.shape[0]
    _check_divides(b, x.shape[-1])
    return (x.unflatten(-1, (x.shape[-1] // b, b)) @ h.to(x.dtype)).flatten(-2)


def _check_divides(b: int, n: int) -> None:
    if n % b:
        raise ValueError(f"a Hadamard rotation in blocks of {b} needs a multiple of {b} "
                         f"features, got {n}")
