"""bench_gemm's summary over the M a run measured (`--ms`), the issue's M or not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_gemm  # noqa: E402


def _rows() -> list[dict]:
    """Speed-ups of two shapes at M = 1, 32 (not one of bench_gemm.MS) and 4096."""
    rows = []
    for m, speedups in {1: (2.0, 3.0), 32: (1.2, 0.5), 4096: (0.95, 1.05)}.items():
        for layer, sp in zip(("qkv", "down"), speedups):
            base = dict(model="llama2-7b", tp=1, layer=layer, m=m)
            rows.append(dict(base, scheme="bf16", seconds=1e-5))
            rows.append(dict(base, scheme="int4_wo", seconds=1e-5 / sp, speedup=sp,
                             pct_copy=50.0 * sp))
    return rows


def test_summary_keeps_every_measured_m() -> None:
    assert 32 not in bench_gemm.MS
    result = bench_gemm.summarize(_rows())
    geo = result["geomean_speedup"]["int4_wo"]
    # float64 geomeans of the two shapes, tolerance 1e-12 relative
    assert geo == pytest.approx({1: (2.0 * 3.0) ** 0.5, 32: (1.2 * 0.5) ** 0.5,
                                 4096: (0.95 * 1.05) ** 0.5}, rel=1e-12)
    assert result["int4_pct_of_copy_median"]["int4_wo"][32] == pytest.approx(50.0 * 0.85)
    slow = next(t for t in result["targets"] if t["target"].startswith("int4_wo never"))
    assert slow["failing_m"] == [32] and slow["at_m"] == 32 and slow["passed"] is False
    header = next(line for line in bench_gemm.print_summary(
        dict(result, copy_bandwidth_GBps=4000.0, elapsed_s=1.0)) if line.startswith("scheme"))
    assert header.split()[1:] == ["1", "32", "4096"]
