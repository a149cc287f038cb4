"""Tunes the tiled GEMV's shape per weight: times every candidate on this GPU, writes the table
`tpquant.kernels.cuda_weight_only.tiles_plan` reads (tpquant/kernels/tiles_tuned.json).

    python benchmarks/tune_tiles.py                       # bench_gemm's shapes, M = 1
    python benchmarks/tune_tiles.py --models llama2-7b --schemes int4_wo --ms 1,4

For each per-rank linear of bench_gemm's models at TP 1, 2 and 4 (distinct [N, K]), each scheme
(int4 per channel, int4 groupwise with zeros, group 128, int8 per channel) and each M: each
of the occupancy rule's candidates (the rule's shape, `tiles_shape`, is one of them), with bf16
x, timed as bench_gemm times (CUDA graph, weight copies past twice the L2, median). The fastest
is checked against float32 math on the dequantized weight (max |y - ref| / max |ref| <=
ERR_BOUND, else the run fails) and becomes the table's entry. The table is for decode-sized M:
a shape that wins alone has been seen to lose inside a decode step (design note 41), so check a
new table with bench_decode against TPQUANT_TILES_TUNED=off.
Output: a table (rule and best, us; the best's shape), $OUT/tiles_tuned.json (the table's
format, one entry a line: copy it over tpquant/kernels/tiles_tuned.json to use it; with
--merge TABLE, TABLE's entries with this run's replacing those of the same device, dtype, mode,
M, N and K) and $OUT/tune_tiles.json (every timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import MODELS, _geomean, copies, linear_shapes, time_calls  # noqa: E402
from bench_int4_tiles import ERR_BOUND, tiles_call  # noqa: E402

from tpquant.kernels import cuda_weight_only as cw  # noqa: E402
from tpquant.kernels.device import device_name  # noqa: E402
from tpquant.kernels.tiles import tile  # noqa: E402
from tpquant.kernels.weight_only import dequantize_groupwise, dequantize_weight_only  # noqa: E402
from tpquant.quantization.schemes import Groupwise, WeightOnly  # noqa: E402

DTYPE = torch.bfloat16
GROUP = 128
SCHEMES = {"int4_wo": (4, 0), "int4_gw": (4, GROUP), "int8_wo": (8, 0)}  # (bits, group)


def merged(table: dict, device: str, entries: list[dict]) -> dict:
    """`table` (the shipped JSON's form) with `entries` for `device`, each replacing the entry of
    the same dtype, mode, M, N and K; entries in (dtype, mode, N, K, M) order."""
    key = lambda e: (e["dtype"], e["mode"], e["n"], e["k"], e["m"])  # noqa: E731
    devices = dict(table.get("devices", {}))
    by_key = {key(e): e for e in devices.get(device, [])} | {key(e): e for e in entries}
    devices[device] = [by_key[k] for k in sorted(by_key)]
    return {**table, "devices": devices}


def table_text(table: dict) -> str:
    """The table as tpquant/kernels/tiles_tuned.json holds it: one entry a line."""
    lines = ["{" + f'"about": {json.dumps(table.get("about", ""))},', ' "devices": {']
    for i, (device, entries) in enumerate(table["devices"].items()):
        lines.append(f"  {json.dumps(device)}: [")
        lines += [f"   {json.dumps(e)}," for e in entries]
        if entries:
            lines[-1] = lines[-1][:-1]
        lines.append("  ]" + ("," if i < len(table["devices"]) - 1 else ""))
    return "\n".join(lines + [" }", "}"]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(m.name for m in MODELS))
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--ms", default="1")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--merge", type=Path, help="a table to merge this run's entries into")
    args = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    name = device_name(device)  # the table's key, as tiles_plan reads it
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    models = [m for m in MODELS if m.name in args.models.split(",")]
    weights = dict.fromkeys((s.n, s.k) for m in models for tp in (1, 2, 4)
                            for s in linear_shapes(m, tp))
    ms = [int(v) for v in args.ms.split(",")]
    base = (json.loads(args.merge.read_text()) if args.merge
            else {"about": "tiled GEMV shapes measured by benchmarks/tune_tiles.py"})
    entries, rows, failed = [], [], False
    print(f"# {name}")
    print(f"{'scheme':<8} {'N':>6} {'K':>6} {'M':>3} {'rule us':>8} {'best us':>8} {'gain':>6} "
          f"{'err':>8}  best (row tiles, K warps, row warps, unroll)")
    for scheme_name in args.schemes.split(","):
        bits, group = SCHEMES[scheme_name]
        mode = cw.mode(bits, group, bool(group))
        scheme = (Groupwise(group_size=group, dtype=DTYPE, tiles=False) if group
                  else WeightOnly(bits=bits, dtype=DTYPE, tiles=False))
        for n, k in weights:
            if group and k % group:
                continue  # no whole groups (Llama-2-7B's down at TP 4: K = 2752)
            weight = torch.randn(n, k, generator=gen, device=device, dtype=DTYPE) * 0.02
            stored = scheme.quantize(weight)
            sets = copies({**stored, "qweight": tile(stored["qweight"], bits)}, l2)
            w_ref = (dequantize_groupwise(stored["qweight"], stored["scales"], stored["zeros"],
                                          group) if group
                     else dequantize_weight_only(stored["qweight"], stored["scale"], bits))
            for m in ms:
                x = torch.randn(m, k, generator=gen, device=device, dtype=DTYPE)
                nt = cw.tiles_nt(m)
                chosen = cw.tiles_shape(m, n, device, DTYPE, mode)[1:]  # the rule, not the table
                timed = [(time_calls(tiles_call(x, sets, bits, group, c), args.replays), c)
                         for c in cw.tiles_resident(nt, device, DTYPE, mode)]
                rule = dict((c, t) for t, c in timed)[chosen]  # the rule picks a candidate
                sec, shape = min(timed)
                y = tiles_call(x, sets[:1], bits, group, shape)[0]().float()
                ref = x.float() @ w_ref.t()
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                failed |= not err <= ERR_BOUND
                entries.append(dict(dtype="bfloat16", mode=mode, m=m, n=n, k=k,
                                    shape=list(shape), us=round(sec * 1e6, 2),
                                    rule_us=round(rule * 1e6, 2)))
                rows += [dict(scheme=scheme_name, n=n, k=k, m=m, shape=c, us=t * 1e6)
                         for t, c in timed]
                print(f"{scheme_name:<8} {n:>6} {k:>6} {m:>3} {rule * 1e6:>8.2f} {sec * 1e6:>8.2f} "
                      f"{rule / sec:>6.3f} {err:>8.1e}  {shape}", flush=True)
                (out_dir / "tiles_tuned.json").write_text(table_text(merged(base, name, entries)))
                (out_dir / "tune_tiles.json").write_text(json.dumps(rows))
            del sets
            torch.cuda.empty_cache()
    for scheme_name in args.schemes.split(","):
        mode = cw.mode(*SCHEMES[scheme_name], bool(SCHEMES[scheme_name][1]))
        gains = [e["rule_us"] / e["us"] for e in entries if e["mode"] == mode]
        if gains:
            print(f"# {scheme_name}: the tuned shapes {_geomean(gains):.3f}x as fast as the rule's "
                  f"(geomean of {len(gains)})")
    print("ERRORS OVER BOUND" if failed else "# all errors within bound")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
