"""The staged GEMM (wo_staged: x through shared memory) against the weight-only dispatch and
torch's bf16 matmul, at up to 64 tokens, on bench_gemm's per-rank Llama shapes.

    python benchmarks/sweep_staged.py                    # int4_wo, int8_wo, int4_gw; M = 40, 64
    python benchmarks/sweep_staged.py --ms 64 --schemes int4_wo --quick

For each shape, M and scheme: bf16 (`x @ W.T`), the dispatch (`Scheme.forward` on the packed
tiles: the tiled GEMV, or CUTLASS where the dispatch sends it and the build tools are there),
and every config of `cuda_weight_only.STAGED_CONFIGS` for M's token tiles with its default K
splits. Each staged output is checked against the dispatch's first (max |diff| <= 1e-2 max |y|,
bfloat16); a config that fails is reported and not timed. Timing is bench_gemm's
(`time_calls`: CUDA graphs, weights streamed from HBM).

Output: a table on stdout (per shape and M: microseconds and speed-up over bf16 of the
dispatch, of each config and of the best config), the geomean over shapes per M and scheme
(dispatch, each config, the best config per shape, the better of dispatch and best config), and
$OUT/sweep_staged.json ($OUT defaults to /tmp/out). With --table PATH, the weights where one
config beat the dispatch by WIN_MARGIN at every M of the run go into that table (the dispatch's
`cuda_weight_only.staged_table`, which takes an entry at every M of its config's token tiles;
this device's entries for the schemes and token tiles run are replaced). The M of one run
share their token tiles:

    python benchmarks/sweep_staged.py --ms 40,64 --table tpquant/kernels/staged_tuned.json
    python benchmarks/sweep_staged.py --ms 24,32 --table tpquant/kernels/staged_tuned.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from bench_gemm import DTYPE, MODELS, TPS, copies, linear_shapes, time_calls

from tpquant.kernels import cuda_weight_only as cw
from tpquant.quantization.schemes import Groupwise, Scheme, WeightOnly

GROUP = 128  # int4_gw's group size, as bench_gemm's
SCHEMES = {"int4_wo": lambda: WeightOnly(bits=4, dtype=DTYPE),
           "int8_wo": lambda: WeightOnly(bits=8, dtype=DTYPE),
           "int4_gw": lambda: Groupwise(group_size=GROUP, zeros=True, dtype=DTYPE)}
TOLERANCE = 1e-2  # bfloat16: an output rounding, relative to the largest output
WIN_MARGIN = 0.97  # a table entry's config takes at most this share of the dispatch's time
MODES = {"int4_wo": 1, "int8_wo": 0, "int4_gw": 2}  # the .cu's MODE
GROUPS = {"int4_wo": 0, "int8_wo": 0, "int4_gw": GROUP}


def staged_call(scheme: Scheme, t: dict[str, torch.Tensor], x: torch.Tensor, out: torch.Tensor,
                config: tuple[int, ...]) -> None:
    """The staged GEMM on a packed weight of `scheme` (per channel or groupwise)."""
    if isinstance(scheme, Groupwise):
        cw.staged_gemm(x, t["qweight_tiles"], t["scales"], None, out, config=config,
                       zeros=t.get("zeros"), group=scheme.group_size)
    else:
        cw.staged_gemm(x, t["qweight_tiles"], t["scale"], None, out, config=config)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    l2_bytes = int(getattr(props, "L2_cache_size", 50 << 20))
    replays = 3 if args.quick else 5
    shapes = {(s.n, s.k): s for model in MODELS for tp in TPS for s in linear_shapes(model, tp)}
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    started = time.perf_counter()
    print(f"# {props.name}; staged configs (NT, RT, WR, WK, KS, STAGES): {cw.STAGED_CONFIGS}")
    for (n, k), shape in shapes.items():
        weight = torch.randn(n, k, generator=gen, device=device, dtype=DTYPE) * 0.02
        bf16 = [t["w"] for t in copies({"w": weight}, l2_bytes)]
        for name in args.schemes:
            scheme = SCHEMES[name]()
            if GROUPS[name] and k % GROUPS[name]:  # (bench_gemm leaves these out too)
                continue
            sets = copies(scheme.pack(scheme.quantize(weight)), l2_bytes)
            for m in args.ms:
                x = torch.randn(m, k, generator=gen, device=device, dtype=DTYPE)
                row = {"model": shape.model, "tp": shape.tp, "layer": shape.layer, "n": n,
                       "k": k, "m": m, "scheme": name, "staged": {}}
                row["bf16_us"] = 1e6 * time_calls([lambda w=w: x @ w.t() for w in bf16], replays)
                row["dispatch_us"] = 1e6 * time_calls(
                    [lambda t=t: scheme.forward(x, t) for t in sets], replays)
                expected = scheme.forward(x, sets[0]).float()
                for config in cw.STAGED_CONFIGS[max(2, cw.tiles_nt(m))]:
                    label = ",".join(map(str, config))
                    try:
                        out = torch.empty(m, n, dtype=DTYPE, device=device)
                        staged_call(scheme, sets[0], x, out, config)
                        err = (out.float() - expected).abs().max().item()
                        if not err <= TOLERANCE * expected.abs().max().item():
                            row["staged"][label] = f"wrong: max |diff| {err:.3g}"
                            continue
                        calls = []
                        for t in sets:
                            o = torch.empty(m, n, dtype=DTYPE, device=device)
                            calls.append(lambda t=t, o=o, config=config: staged_call(
                                scheme, t, x, o, config))
                        row["staged"][label] = 1e6 * time_calls(calls, replays)
                    except Exception as exc:  # noqa: BLE001 - report, go on
                        row["staged"][label] = f"{type(exc).__name__}: {str(exc)[:160]}"
                        torch.cuda.synchronize()
                timed = {c: v for c, v in row["staged"].items() if isinstance(v, float)}
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
             f"M={row['m']:<3} {row['scheme']:<8} bf16 {base:7.2f} dispatch "
             f"{row['dispatch_us']:7.2f} ({base / row['dispatch_us']:.2f}x)"]
    for label, v in row["staged"].items():
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
            labels = {label for r in sel for label in r["staged"]}
            for label in sorted(labels):
                vals = [r["bf16_us"] / r["staged"][label] for r in sel
                        if isinstance(r["staged"].get(label), float)]
                if len(vals) == len(sel):
                    g[label] = geomean(vals)
            with_best = [r for r in sel if "best_us" in r]
            if len(with_best) == len(sel):
                g["best config"] = geomean([r["bf16_us"] / r["best_us"] for r in sel])
                g["better of both"] = geomean(
                    [r["bf16_us"] / min(r["best_us"], r["dispatch_us"]) for r in sel])
            out["geomean"][f"{scheme} M={m}"] = g
            out["lines"].append(f"{scheme} M={m}: " + ", ".join(f"{k} {v:.3f}"
                                                                 for k, v in g.items()))
    return out


def table_entries(rows: list[dict]) -> list[dict]:
    """One entry per (scheme, n, k) where a config beat the dispatch by WIN_MARGIN at every M
    measured: the config with the smallest sum over M of its time / the dispatch's."""
    entries = []
    for scheme, n, k in sorted({(r["scheme"], r["n"], r["k"]) for r in rows}):
        sel = [r for r in rows if (r["scheme"], r["n"], r["k"]) == (scheme, n, k)]
        ratios: dict[str, float] = {}
        for label in sel[0]["staged"]:
            times = [r["staged"].get(label) for r in sel]
            if all(isinstance(t, float) and t <= WIN_MARGIN * r["dispatch_us"]
                   for t, r in zip(times, sel)):
                ratios[label] = sum(t / r["dispatch_us"] for t, r in zip(times, sel))
        if ratios:
            best = min(ratios, key=ratios.get)
            entry = {"dtype": str(DTYPE).removeprefix("torch."), "mode": MODES[scheme]}
            if GROUPS[scheme]:
                entry["group"] = GROUPS[scheme]
            entries.append({**entry, "n": n, "k": k, "config": [int(v) for v in best.split(",")],
                            "time_vs_dispatch": round(ratios[best] / len(sel), 3)})
    return entries


def write_table(path: Path, device: str, entries: list[dict], modes: set[int], nt: int) -> None:
    """Merges entries into the table at path: this device's entries of these modes and `nt`
    token tiles replaced."""
    table = json.loads(path.read_text()) if path.is_file() else {}
    table.setdefault("about", "benchmarks/sweep_staged.py --table: weights (n, k) on which the "
                     "staged GEMM beat the weight-only dispatch at M = 17-32 (a config of 4 "
                     "token tiles) or 33-64 (8), and its config (NT, RT, WR, WK, KS, STAGES); "
                     "time_vs_dispatch is its mean time ratio")
    kept = [e for e in table.get("devices", {}).get(device, [])
            if e["mode"] not in modes or e["config"][0] != nt]
    table.setdefault("devices", {})[device] = sorted(
        kept + entries, key=lambda e: (e["dtype"], e["config"][0], e["mode"], e.get("group", 0),
                                       e["n"], e["k"]))
    path.write_text(json.dumps(table, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=[40, 64])
    parser.add_argument("--schemes", type=lambda s: s.split(","), default=list(SCHEMES))
    parser.add_argument("--quick", action="store_true", help="fewer replays")
    parser.add_argument("--table", type=Path, help="merge the winning configs into this table")
    parser.add_argument("--from-json", type=Path, help="take the rows of an earlier run's JSON "
                        "instead of measuring (with --table)")
    args = parser.parse_args(argv)
    if args.table and len({cw.tiles_nt(m) for m in args.ms}) > 1:
        parser.error(f"--table: the M of one run share their token tiles, got {args.ms}")
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        result = run(args)
    if args.table:
        entries = table_entries(result["rows"])
        write_table(args.table, result["device"], entries,
                    {MODES[s] for s in {r["scheme"] for r in result["rows"]}},
                    cw.tiles_nt(result["rows"][0]["m"]))
        print(f"# {len(entries)} entries for {result['device']} into {args.table}")
        if args.from_json:
            return 0
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_staged.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
