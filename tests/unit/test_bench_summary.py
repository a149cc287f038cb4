"""Benchmark tools' pure parts: bench_gemm's summary over the M a run measured (`--ms`), the
issue's M or not; tune_tiles' table merge and layout; bench_gemv_floor's line fit, byte counts
and ceiling."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_gemm  # noqa: E402
import bench_gemv_floor  # noqa: E402


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


def test_gemv_floor_fit_matches_numpy_least_squares() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([2.0**20 * k for k in (1, 2, 4, 8, 16, 1, 4, 16)], dtype=torch.float64)
    seconds = 2.8e-6 + sizes / 4.0e12 + 1e-7 * torch.randn(8, generator=gen, dtype=torch.float64)
    fixed, rate = bench_gemv_floor.fit_line(list(zip(sizes.tolist(), seconds.tolist())))
    slope, intercept = np.polyfit(sizes.numpy(), seconds.numpy(), 1)  # float64 reference
    assert fixed == pytest.approx(intercept, rel=1e-9)
    assert rate == pytest.approx(1 / slope, rel=1e-9)
    with pytest.raises(ValueError, match="two or more"):
        bench_gemv_floor.fit_line([(1.0, 2.0), (1.0, 3.0)])
    with pytest.raises(ValueError, match="does not grow"):
        bench_gemv_floor.fit_line([(1.0, 3.0), (2.0, 2.0)])


@pytest.mark.parametrize("argv", [["--ks", "4096,100"], ["--ns", "4096", "--ks", "4096"],
                                  ["--ms", "1,"], ["--schemes", "int4_wo"]])
def test_gemv_floor_rejects_bad_arguments_before_any_gpu_work(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_gemv_floor.main(argv)
    assert exit_.value.code == 2  # argparse's usage error, on a machine with or without a GPU


@pytest.mark.parametrize("n,k", [(64, 256), (48, 384)])
def test_gemv_floor_bytes_are_the_stored_tensors(n: int, k: int) -> None:
    weight = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
    stored = bench_gemm.quantized(weight)  # as bench_gemm and the layers store them (CPU)
    for scheme in ("int8_wo", "int4_wo", "int4_gw"):
        assert bench_gemv_floor.weight_bytes(scheme, n, k) == bench_gemm.nbytes(stored[scheme][1])
    assert bench_gemv_floor.weight_bytes("bf16", n, k) == weight.numel() * weight.element_size()


def test_gemv_floor_ceiling_is_the_geomean_over_the_fitted_times() -> None:
    fit = (3.0e-6, 4.0e12)
    bf16 = {(4096, 4096): 14e-6, (4096, 1024): 5e-6, (57344, 8192): 250e-6}
    scale_bytes = {"int4_wo": lambda n, k: 4 * n, "int4_gw": lambda n, k: 8 * n * k // 128}
    for scheme, scales in scale_bytes.items():
        ratios = torch.tensor([t / (3.0e-6 + (n * k / 2 + scales(n, k)) / 4.0e12)
                               for (n, k), t in bf16.items()], dtype=torch.float64)
        expected = ratios.log().mean().exp().item()  # float64 geomean, tolerance 1e-12 relative
        assert bench_gemv_floor.ceiling(scheme, fit, bf16) == pytest.approx(expected, rel=1e-12)


def test_gemv_floor_shapes_are_bench_gemms_that_group() -> None:
    shapes = bench_gemv_floor.bench_shapes()
    every = {(s.n, s.k) for m in bench_gemm.MODELS for tp in bench_gemm.TPS
             for s in bench_gemm.linear_shapes(m, tp)}
    assert set(shapes) == {(n, k) for n, k in every if k % 128 == 0}
    assert len(set(shapes)) == len(shapes)
    assert (4096, 2752) in every and (4096, 2752) not in shapes  # Llama-2-7B's down at TP 4
