"""The Hadamard rotation of down_proj's input: the math against float64, and the model with it
computing the same function as without (float32)."""

from __future__ import annotations

import pytest
import torch

from tpquant.quantization.mode import QuantMode
from tpquant.quantization.rotation import (
    hadamard,
    rotate_activation,
    rotate_weight,
    rotation_block,
)


@pytest.mark.parametrize("b", [1, 2, 8, 64, 128])
def test_hadamard_is_orthogonal_and_symmetric(b: int) -> None:
    h = hadamard(b)
    assert torch.equal(h, h.t())
    assert torch.allclose(h @ h.t(), torch.eye(b, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((b, b), b ** -0.5, dtype=torch.float64))


@pytest.mark.parametrize("b", [0, 3, 96])
def test_hadamard_needs_a_power_of_two(b: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        hadamard(b)


@pytest.mark.parametrize("features, block", [(1536, 128), (512, 128), (384, 128), (2752, 64),
                                             (5504, 128), (96, 32), (7, 1)])
def test_rotation_block_is_the_largest_power_of_two_dividing(features: int, block: int) -> None:
    assert rotation_block(features) == block
    assert features % block == 0


@pytest.mark.parametrize("b", [1, 4, 64])
def test_rotated_weight_and_input_give_the_same_product(b: int) -> None:
    """(x H)(W H)^T = x W^T: float64 reference, float32 rotation of x."""
    g = torch.Generator().manual_seed(b)
    w = torch.randn(24, 192, generator=g, dtype=torch.float64)
    x = torch.randn(5, 192, generator=g)
    y = rotate_activation(x, hadamard(b)).double() @ rotate_weight(w, b).t()
    expected = x.double() @ w.t()
    assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_block_diagonal_rotation_acts_within_slices() -> None:
    """A row-parallel rank's slice rotates on its own: rotating the whole and cutting equals
    cutting and rotating (blocks never cross a slice)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3 * 128, generator=g)
    whole = rotate_weight(w, 128)
    for r in range(3):
        cols = slice(128 * r, 128 * (r + 1))
        assert torch.allclose(rotate_weight(w[:, cols], 128), whole[:, cols], atol=1e-6)


def test_sizes_that_do_not_divide_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        rotate_weight(torch.zeros(2, 96), 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        rotate_activation(torch.zeros(2, 96), hadamard(64))


def test_only_w8a8_modes_rotate() -> None:
    from tpquant.models.llama import default_down_rotation

    assert default_down_rotation(QuantMode.from_name("w8a8_tensor"), 1536, 3) == 128
    assert default_down_rotation(QuantMode.from_name("w8a8_token_channel"), 11008, 4) == 64
    for name in ("fp16", "int8_wo", "int4_gw"):
        assert default_down_rotation(QuantMode.from_name(name), 1536, 1) == 0
    # an odd slice has no block above 1: not rotated rather than a 1 x 1 "rotation"
    assert default_down_rotation(QuantMode.from_name("w8a8_tensor"), 3 * 101, 3) == 0
