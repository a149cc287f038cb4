"""The W8A8 GEMM's tile configurations by M (decode, medium and large tiles), against bf16.

    python benchmarks/bench_w8a8_gemm.py [--ms 1,4,64,1024,4096] [--shapes 7b,7b-tp2,70b]

A micro-benchmark for tpquant.kernels.triton_w8a8.gemm_config (bench_gemm.py measures the
schemes end to end). For each Llama linear shape (Llama-2-7B at TP 1 and / or 2, Llama-2-70B
at TP 4) and M: torch's bf16 matmul, then the int8 GEMM with its fused per-token x
per-channel epilogue (bf16 out) as the dispatch configures it ("auto") and under each
candidate config: for M > 256 pointer loads or TMA descriptors, for M <= 16 decode tiles
(and "auto" on the same tokens given twice, 2 M rows), in between the medium and small
tiles; the per-token activation quantization alone; and the chosen config with the
quantization included.
Median of CUDA-graph replays (bench_gemm.time_calls), the same run's bf16 as the baseline.
Output: a table on stdout and $OUT/bench_w8a8_gemm.json ($OUT defaults to /tmp/out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import MODELS, Shape, copies, linear_shapes, time_calls  # noqa: E402

from tpquant.kernels import triton_w8a8 as tw  # noqa: E402
from tpquant.kernels import w8a8  # noqa: E402

G = tw.GemmConfig
REPLAYS = 5  # CUDA-graph replays per median
CANDIDATES = {  # name: config (block_m, block_n, block_k, group_m, warps, stages, tma)
    "ptr 128x256x128 s3": G(128, 256, 128, 8, 8, 3),
    "ptr 128x128x128 s4": G(128, 128, 128, 8, 8, 4),
    "tma 128x256x128 s3": G(128, 256, 128, 8, 8, 3, True),
    "tma 128x256x128 s4 (LARGE_CONFIG)": tw.LARGE_CONFIG,
    "tma 128x128x128 s4 (LARGE_NARROW)": tw.LARGE_NARROW_CONFIG,
    "tma 128x128x128 s5 w4": G(128, 128, 128, 8, 4, 5, True),
    "tma 256x128x128 s3": G(256, 128, 128, 8, 8, 3, True),
    "tma 128x256x64 s5": G(128, 256, 64, 8, 8, 5, True),
}

# Medium M (16 < M <= 256): the two tiles gemm_config chooses between.
MEDIUM_CANDIDATES = {
    "64x128x128 s4 (MEDIUM)": tw.MEDIUM_CONFIG,
    "tma 64x64x256 s5 (SMALL_TILE)": tw.SMALL_TILE_CONFIG,
}

# Decode tiles (M <= 16): BLOCK_M 16, BLOCK_N x BLOCK_K, 4 warps, stages.
DECODE_CANDIDATES = {
    f"decode 16x{bn}x{bk} s{st}": G(16, bn, bk, 1, 4, st)
    for bn in (16, 32, 64) for bk in (256, 512) for st in (3, 5)
}


def chosen_shapes(names: str) -> list[Shape]:
    """The linear shapes of the comma-separated sets among 7b (Llama-2-7B at TP 1), 7b-tp2 and
    70b (Llama-2-70B at TP 4)."""
    chosen = names.split(",")
    shapes = linear_shapes(MODELS[0], 1) if "7b" in chosen else []
    if "7b-tp2" in chosen:
        shapes += linear_shapes(MODELS[0], 2)
    if "70b" in chosen:
        shapes += linear_shapes(MODELS[2], 4)
    return shapes


def random_weights(shape: Shape, gen: torch.Generator, device: torch.device, l2: int
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(copies of a random bf16 weight, copies of a random int8 one, per-channel scales) of
    one shape: enough copies that cycling through them never finds one in L2."""
    w = torch.randn(shape.n, shape.k, generator=gen, device=device, dtype=torch.bfloat16)
    qw = torch.randint(-127, 128, (shape.n, shape.k), generator=gen, device=device,
                       dtype=torch.int8)
    sw = torch.rand(shape.n, generator=gen, device=device) * 1e-3
    return ([t["w"] for t in copies({"w": w}, l2)], [t["w"] for t in copies({"w": qw}, l2)],
            sw)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="1024,4096")
    p.add_argument("--shapes", default="7b", help="any of 7b, 7b-tp2, 70b (comma-separated)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_w8a8_gemm needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    shapes = chosen_shapes(args.shapes)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    print(f"{'shape':<22} {'M':>5} {'variant':<30} {'us':>9} {'TOP/s':>7} {'x bf16':>7}")
    for shape in shapes:
        bf16_sets, q_sets, sw = random_weights(shape, gen, device, l2)
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, shape.k, generator=gen, device=device, dtype=torch.bfloat16)
            qx, sx = w8a8.quantize_per_token(x)
            base = time_calls([lambda b=b: x @ b.t() for b in bf16_sets], REPLAYS)
            timed = {"bf16": base}
            # Large M: every candidate tile; medium M: the medium and small tiles; decode M:
            # the decode tiles, and the dispatch's tile on the same tokens given twice (M =
            # 2 m: is small M itself slow?).
            candidates = (CANDIDATES if m > tw.MEDIUM_MAX_M
                          else DECODE_CANDIDATES if m <= tw.DECODE_MAX_M else MEDIUM_CANDIDATES)
            if m <= tw.DECODE_MAX_M:
                qx2, sx2 = qx.repeat(2, 1), sx.repeat(2, 1)
                timed["auto, the rows twice"] = time_calls([
                    lambda q=q: tw.w8a8_gemm(qx2, sx2, q, sw, None, torch.bfloat16)
                    for q in q_sets], REPLAYS)
            timed["auto"] = time_calls([
                lambda q=q: tw.w8a8_gemm(qx, sx, q, sw, None, torch.bfloat16) for q in q_sets],
                REPLAYS)
            for name, cfg in candidates.items():
                try:
                    timed[name] = time_calls([
                        lambda q=q, cfg=cfg: tw.w8a8_gemm(qx, sx, q, sw, None, torch.bfloat16,
                                                          config=cfg) for q in q_sets], REPLAYS)
                except Exception as exc:  # noqa: BLE001 - report, go on
                    torch.cuda.synchronize()
                    print(f"# {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            timed["per-token quantization only"] = time_calls(
                [lambda: w8a8.quantize_per_token(x)] * len(q_sets), REPLAYS)
            timed["auto + per-token quantization"] = time_calls([
                lambda q=q: tw.w8a8_gemm(*w8a8.quantize_per_token(x), q, sw, None, torch.bfloat16)
                for q in q_sets], REPLAYS)
            for name, sec in timed.items():
                row = dict(model=shape.model, tp=shape.tp, layer=shape.layer, n=shape.n,
                           k=shape.k, m=m, variant=name, us=sec * 1e6,
                           tops=2 * m * shape.n * shape.k / sec / 1e12, speedup=base / sec)
                rows.append(row)
                print(f"{shape.model + ' tp' + str(shape.tp) + ' ' + shape.layer:<22} {m:>5} "
                      f"{name:<30} {row['us']:>9.1f} {row['tops']:>7.0f} {row['speedup']:>7.2f}")
        del bf16_sets, q_sets
        torch.cuda.empty_cache()
    by: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        by.setdefault((r["variant"], r["m"]), []).append(r["speedup"])
    print("# geomean speed-up over bf16 across shapes")
    geo = {f"{v} @ M={m}": statistics.geometric_mean(s) for (v, m), s in by.items()}
    for key, val in geo.items():
        print(f"{key:<48} {val:6.2f}")
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_w8a8_gemm.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(device), "rows": rows, "geomean": geo}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
