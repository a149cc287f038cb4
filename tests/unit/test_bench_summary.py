"""Benchmark tools' pure parts: bench_gemm's summary over the M a run measured (`--ms`), the
issue's M or not; tune_tiles' table merge and layout."""

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


def test_tune_tiles_merges_and_writes_the_shipped_layout() -> None:
    """tune_tiles --merge: a run's entries replace those of the same key and add the rest; the
    shipped table (tpquant/kernels/tiles_tuned.json) is in the layout tune_tiles writes."""
    import json

    import tune_tiles

    def entry(mode: int, m: int, shape: list[int]) -> dict:
        return dict(dtype="bfloat16", mode=mode, m=m, n=4096, k=4096, shape=shape, us=1.0)

    table = {"about": "a",
             "devices": {"GPU X": [entry(1, 4, [1, 4, 1, 2]), entry(1, 1, [1, 8, 1, 4])],
                         "GPU Y": [entry(0, 1, [2, 4, 1, 1])]}}
    out = tune_tiles.merged(table, "GPU X", [entry(1, 4, [2, 2, 2, 1]), entry(2, 32, [2, 4, 1, 1])])
    assert out["about"] == "a" and out["devices"]["GPU Y"] == table["devices"]["GPU Y"]
    assert [(e["mode"], e["m"], e["shape"]) for e in out["devices"]["GPU X"]] == [
        (1, 1, [1, 8, 1, 4]), (1, 4, [2, 2, 2, 1]), (2, 32, [2, 4, 1, 1])]
    assert json.loads(tune_tiles.table_text(out)) == out

    shipped_path = Path(__file__).resolve().parents[2] / "tpquant" / "kernels" / "tiles_tuned.json"
    shipped = json.loads(shipped_path.read_text())
    canonical = shipped
    for device in shipped["devices"]:
        canonical = tune_tiles.merged(canonical, device, [])
    assert shipped_path.read_text() == tune_tiles.table_text(canonical)
