"""The greedy choice that ends a decode step's CUDA graph (`sampling.greedy_advance`): the
Triton kernel in Triton's interpreter and the torch path, each against torch.argmax (the
same index exactly, ties to the first) and pos + 1 clamped at `last` (exactly)."""

from __future__ import annotations

import pytest
import torch

from tpquant.engine.sampling import greedy_advance


@pytest.fixture(scope="module")
def kernel():
    pytest.importorskip("triton")
    from triton_interpreter import interpreted  # tests/unit, beside this file

    with interpreted("tpquant.kernels.triton_greedy") as (module,):
        yield module.greedy_advance


def _case(B: int, V: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * 4).to(dtype)
    top = logits.float().max().item() + 1
    # ties: row 0's largest value twice in one block, row 1's in the last block and again
    # in the first (the first one wins, as torch.argmax's)
    logits[0, [V // 3, V // 3 + 1]] = top
    if B > 1:
        logits[1, [V - 1, 2]] = top
    pos = torch.randint(0, 50, (B,), generator=g)
    pos[0] = 49  # at `last`: stays
    return logits, pos


def _check(advance, logits: torch.Tensor, pos: torch.Tensor) -> None:
    tokens = torch.full((logits.shape[0],), -7, dtype=torch.long)  # poisoned
    got_pos = pos.clone()
    advance(logits, tokens, got_pos, 49)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.equal(got_pos, (pos + 1).clamp(max=49))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("B,V", [(1, 100), (3, 8193), (4, 32000)])
def test_greedy_kernel_is_argmax(kernel, dtype, B, V):
    _check(kernel, *_case(B, V, dtype, seed=V + B))


def test_greedy_kernel_reads_strided_rows(kernel):
    """A view of the first V columns of a padded vocabulary, as decode_step returns."""
    padded, pos = _case(3, 1040, torch.bfloat16, seed=3)
    padded[:, 1000:] = 100.0  # padding columns must not be chosen
    logits = padded[:, :1000]
    tokens = torch.full((3,), -7, dtype=torch.long)
    kernel(logits, tokens, pos.clone(), 49)
    assert torch.equal(tokens, logits.argmax(-1))


def test_torch_path():
    _check(greedy_advance, *_case(3, 500, torch.float32, seed=1))


def test_kernel_bad_input(kernel):
    logits, pos = _case(2, 64, torch.float32, seed=2)
    with pytest.raises(ValueError, match="int64"):
        kernel(logits, torch.zeros(2, dtype=torch.int32), pos, 49)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(logits.t().contiguous().t(), torch.zeros(2, dtype=torch.long), pos, 49)
