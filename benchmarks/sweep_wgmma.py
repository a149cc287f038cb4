"""The wgmma weight-only GEMM (wo_wgmma: codes converted in shared memory) against the
weight-only dispatch and torch's bf16 matmul, at 128 tokens and more, on bench_gemm's per-rank
Llama shapes.

    python benchmarks/sweep_wgmma.py                     # int4_wo, int8_wo; M = 128 ... 4096
    python benchmarks/sweep_wgmma.py --ms 256 --schemes int4_wo --quick

For each shape, M and scheme: bf16 (`x @ W.T`), the dispatch (`Scheme.forward` on the packed
tiles: CUTLASS's mixed-input GEMM or dequantize + cuBLAS, as the dispatch has it) and every
config of `wgmma_weight_only.CONFIGS`. Each wgmma output is checked against the dispatch's
(max |diff| <= 1e-2 max |y|, bfloat16); a config that fails is reported and not timed. Timing
is bench_gemm's (`time_calls`: CUDA graphs, weights streamed from HBM).

Output: a table on stdout, the geomean over shapes per M and scheme (dispatch, each config,
the best config per shape, the better of dispatch and best config), $OUT/sweep_wgmma.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench_gemm import DTYPE, MODELS, TPS, copies, linear_shapes, time_calls
from sweep_staged import SCHEMES, TOLERANCE, geomean

from tpquant.kernels import wgmma_weight_only as wg


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    l2_bytes = int(getattr(props, "L2_cache_size", 50 << 20))
    replays = 3 if args.quick else 5
    shapes = {(s.n, s.k): s for model in MODELS for tp in TPS for s in linear_shapes(model, tp)}
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    started = time.perf_counter()
    print(f"# {props.name}; wgmma configs (WG, BN, STAGES): {args.configs}")
    for (n, k), shape in shapes.items():
        if not wg.takes(n, k):
            continue
        weight = torch.randn(n, k, generator=gen, device=device, dtype=DTYPE) * 0.02
        bf16 = [t["w"] for t in copies({"w": weight}, l2_bytes)]
        for name in args.schemes:
            scheme = SCHEMES[name]()
            sets = copies(scheme.pack(scheme.quantize(weight)), l2_bytes)
            for m in args.ms:
                x = torch.randn(m, k, generator=gen, device=device, dtype=DTYPE)
                row = {"model": shape.model, "tp": shape.tp, "layer": shape.layer, "n": n,
                       "k": k, "m": m, "scheme": name, "configs": {}}
                row["bf16_us"] = 1e6 * time_calls([lambda w=w: x @ w.t() for w in bf16], replays)
                row["dispatch_us"] = 1e6 * time_calls(
                    [lambda t=t: scheme.forward(x, t) for t in sets], replays)
                expected = scheme.forward(x, sets[0]).float()
                for config in args.configs:
                    label = ",".join(map(str, config))
                    try:
                        out = torch.full((m, n), float("nan"), dtype=DTYPE, device=device)
                        wg.gemm(x, sets[0]["qweight_tiles"], sets[0]["scale"], None, out,
                                config=config)
                        err = (out.float() - expected).abs().max().item()
                        if not err <= TOLERANCE * expected.abs().max().item():
                            row["configs"][label] = f"wrong: max |diff| {err:.3g}"
                            continue
                        calls = []
                        for t in sets:
                            o = torch.empty(m, n, dtype=DTYPE, device=device)
                            calls.append(lambda t=t, o=o, config=config: wg.gemm(
                                x, t["qweight_tiles"], t["scale"], None, o, config=config))
                        row["configs"][label] = 1e6 * time_calls(calls, replays)
                    except Exception as exc:  # noqa: BLE001 - report, go on
                        row["configs"][label] = f"{type(exc).__name__}: {str(exc)[:160]}"
                        torch.cuda.synchronize()
                timed = {c: v for c, v in row["configs"].items() if isinstance(v, float)}
                if timed:
                    row["best_config"] = min(timed, key=timed.get)
                    row["best_us"] = timed[row["best_config"]]
                rows.append(row)
                print(_line(row), flush=True)
        del weight, bf16
        torch.cuda.empty_cache()
    summary = summarize(rows)
    for line in summary["lines"]:
        print(line)
    settings = {key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items()}
    return {"device": props.name, "torch": torch.__version__, "args": settings,
            "elapsed_s": time.perf_counter() - started, "rows": rows, **summary}


def _line(row: dict) -> str:
    base = row["bf16_us"]
    parts = [f"{row['model']:<11} tp{row['tp']} {row['layer']:<8} {row['n']:>6} {row['k']:>6} "
             f"M={row['m']:<4} {row['scheme']:<8} bf16 {base:8.2f} dispatch "
             f"{row['dispatch_us']:8.2f} ({base / row['dispatch_us']:.2f}x)"]
    for label, v in row["configs"].items():
        parts.append(f"[{label}] " + (f"{v:.2f} ({base / v:.2f}x)" if isinstance(v, float) else v))
    return " | ".join(parts)


def summarize(rows: list[dict]) -> dict:
    """Geomean speed-ups over bf16 per (scheme, M): the dispatch, each config, the best config
    per shape, and the better of the dispatch and the best config."""
    out: dict = {"geomean": {}, "lines": ["# geomean over shapes of bf16 time / time"]}
    for scheme in sorted({r["scheme"] for r in rows}):
        for m in sorted({r["m"] for r in rows}):
            sel = [r for r in rows if r["scheme"] == scheme and r["m"] == m]
            g = {"dispatch": geomean([r["bf16_us"] / r["dispatch_us"] for r in sel])}
            for label in sorted({label for r in sel for label in r["configs"]}):
                vals = [r["bf16_us"] / r["configs"][label] for r in sel
                        if isinstance(r["configs"].get(label), float)]
                if len(vals) == len(sel):
                    g[label] = geomean(vals)
            if all("best_us" in r for r in sel):
                g["best config"] = geomean([r["bf16_us"] / r["best_us"] for r in sel])
                g["better of both"] = geomean(
                    [r["bf16_us"] / min(r["best_us"], r["dispatch_us"]) for r in sel])
            out["geomean"][f"{scheme} M={m}"] = g
            out["lines"].append(f"{scheme} M={m}: " + ", ".join(f"{k} {v:.3f}"
                                                                 for k, v in g.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")],
                        default=[128, 256, 512, 1024, 4096])
    parser.add_argument("--schemes", type=lambda s: s.split(","), default=["int4_wo", "int8_wo"])
    parser.add_argument("--configs", type=lambda s: [tuple(int(v) for v in c.split(","))
                                                     for c in s.split("/")],
                        default=list(wg.CONFIGS), help="WG,BN,STAGES/...")
    parser.add_argument("--quick", action="store_true", help="fewer replays")
    args = parser.parse_args(argv)
    result = run(args)
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_wgmma.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
