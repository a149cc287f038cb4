"""tpquant.kernels.prefetch: which bytes the L2 prefetch asks for, and when it runs (CPU checks;
the GPU side is tests/gpu/test_pdl_gpu.py, whose chains must keep their bits with it)."""

from __future__ import annotations

import pytest
import torch

from tpquant.kernels import prefetch


def _ranges(nbytes: int, blocks: int, stripe: int, take: int) -> list[tuple[int, int]]:
    """[start, end) of each block's prefetch, as cpp/prefetch_l2.cu computes it."""
    out = []
    for b in range(blocks):
        start = b * stripe
        n = min(take, nbytes - start) & ~15
        if n > 0:
            out.append((start, start + n))
    return out


@pytest.mark.parametrize("nbytes", [16, 1000, 4096 * 2048, 11008 * 4096 // 2, 50_331_664])
@pytest.mark.parametrize("budget", [16, 1 << 20, 16 << 20, 50_331_664, 1 << 40])
@pytest.mark.parametrize("stripes", [1, 7, 132])
def test_plan_stays_inside_the_tensor_and_the_budget(nbytes, budget, stripes) -> None:
    blocks, stripe, take = prefetch.prefetch_plan(nbytes, budget, stripes)
    assert 1 <= blocks <= stripes and stripe % 16 == 0 and take % 16 == 0
    ranges = _ranges(nbytes, blocks, stripe, take)
    assert len(ranges) == blocks, "a block with nothing to fetch"
    assert all(s % 16 == 0 and 0 <= s < e <= nbytes for s, e in ranges)
    assert all(e <= s2 for (_, e), (s2, _) in zip(ranges, ranges[1:])), "ranges overlap"
    fetched = sum(e - s for s, e in ranges)
    assert fetched <= max(budget, 16 * blocks)  # at least one unit a block
    assert [s for s, _ in ranges] == [b * stripe for b in range(blocks)]  # each stripe's start
    if budget >= blocks * stripe:  # everything that fills whole 16-byte units
        assert ranges == [(s, min(s + stripe, nbytes // 16 * 16)) for s, _ in ranges]
        assert ranges[-1][1] == nbytes // 16 * 16


def test_plan_nothing_to_fetch() -> None:
    assert prefetch.prefetch_plan(15, 1 << 20, 132) == (0, 0, 0)
    assert prefetch.prefetch_plan(1 << 20, 0, 132) == (0, 0, 0)


def test_off_the_gpu_and_for_large_gemms(monkeypatch) -> None:
    """Nothing launches for CPU tensors or above PREFETCH_MAX_ROWS rows, or with the budget 0;
    prefetch_for never touches a CUDA kernel there."""
    def fail(*args, **kwargs):
        raise AssertionError("launched")

    monkeypatch.setattr(prefetch, "prefetch_l2", fail)
    w = {"qweight": torch.zeros(64, 64, dtype=torch.int8), "scale": torch.ones(64)}
    prefetch.prefetch_for(torch.zeros(1, 64), w)
    assert not prefetch.wanted(torch.device("cpu"), 1)
    monkeypatch.setattr(prefetch.pdl, "enabled", lambda device: True)
    monkeypatch.setattr(prefetch, "_built", lambda: True)
    cuda = torch.device("cuda", 0)
    assert prefetch.wanted(cuda, prefetch.PREFETCH_MAX_ROWS)
    assert not prefetch.wanted(cuda, prefetch.PREFETCH_MAX_ROWS + 1)
    monkeypatch.setattr(prefetch, "PREFETCH_BYTES", 0)
    assert not prefetch.wanted(cuda, 1)


def test_prefetch_for_takes_the_largest_tensor(monkeypatch) -> None:
    """The layer's weight (its largest tensor), for a tensor input or a quantized activation's."""
    got = []
    monkeypatch.setattr(prefetch, "wanted", lambda device, rows: rows <= 4)
    monkeypatch.setattr(prefetch, "prefetch_l2", got.append)
    w = {"scale": torch.ones(300), "qweight_tiles": torch.zeros(64, 32, dtype=torch.uint8)}

    class Quantized:
        q = torch.zeros(2, 2, 64, dtype=torch.int8)

    prefetch.prefetch_for(torch.zeros(4, 64), w)
    prefetch.prefetch_for(Quantized(), w)
    prefetch.prefetch_for(torch.zeros(5, 64), w)  # 5 rows: not wanted
    assert [t is w["qweight_tiles"] for t in got] == [True, True]
