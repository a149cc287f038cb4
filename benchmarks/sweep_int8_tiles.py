"""bfloat16 int8 in the tiled GEMV: two nibble mmas a step against q through float32 and one
mma (`TILES_INT8_EXACT_NT` in cpp/weight_only_gemv.cu), by token tiles, on one GPU.

    python benchmarks/sweep_int8_tiles.py --ms 1,4,16,32,64

The source is compiled once per threshold in --exact (from that many 8-token tiles on, q
through float32), and each M runs every candidate shape of its token tiles
(`cuda_weight_only.TILES_CANDIDATES`) on bench_wo_kernels' Llama-2-7B / 70B shapes; a shape's
best time counts. Each result's max |y - ref| / max |ref| against float32 math on the
dequantized weight must stay within ERR_BOUND.
Output: a table (per M and threshold, the geomean over shapes of the best shape's speed-up
over bf16), $OUT/sweep_int8_tiles.json ($OUT defaults to /tmp/out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import _geomean, copies, time_calls  # noqa: E402
from bench_wo_kernels import SHAPES  # noqa: E402

from tpquant.kernels import cuda_weight_only as cw  # noqa: E402
from tpquant.kernels.cupy_launch import launch  # noqa: E402
from tpquant.kernels.tiles import tile  # noqa: E402
from tpquant.kernels.weight_only import dequantize_weight_only  # noqa: E402
from tpquant.quantization.schemes import WeightOnly  # noqa: E402

DTYPE = torch.bfloat16
ERR_BOUND = 1e-2


def compile_all(exact: int, device: torch.device) -> dict[tuple, object]:
    """{(NT, shape): function} of the int8 bfloat16 tiled GEMV with the threshold `exact`."""
    import cupy

    names = {(nt, c): f"wo_tiles<1, 0, {nt}, {c[0]}, {c[1]}, {c[2]}, {c[3]}>"
             for nt in cw.TILES_NT for c in cw.TILES_CANDIDATES[nt]
             if cw.tiles_shared_bytes(nt, *c[:3]) <= cw.TILES_SHARED_BYTES}
    with cupy.cuda.Device(device.index):
        module = cupy.RawModule(code=cw.SOURCE.read_text(),
                                options=("-std=c++17", f"-DTILES_INT8_EXACT_NT={exact}"),
                                name_expressions=list(names.values()))
        return {key: module.get_function(name) for key, name in names.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default="1,4,16,32,64")
    ap.add_argument("--exact", default="1,2,4,8", help="thresholds (token tiles) to compare")
    ap.add_argument("--replays", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    thresholds = [int(v) for v in args.exact.split(",")]
    functions = {e: compile_all(e, device) for e in thresholds}
    gen = torch.Generator(device=device).manual_seed(0)
    rows, failed = [], False
    scheme = WeightOnly(bits=8, dtype=DTYPE)
    print(f"# {props.name}; best shape's us per threshold (q through float32 from NT tiles on)")
    print(f"{'shape':<16} {'M':>3} {'bf16':>7} " + " ".join(f"{'e' + str(e):>7}" for e in thresholds))
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        weight = torch.randn(n, k, generator=gen, device=device, dtype=DTYPE) * 0.02
        stored = scheme.quantize(weight)
        w_ref = dequantize_weight_only(stored["qweight"], stored["scale"], 8)
        bf16_sets = [t["w"] for t in copies({"w": weight}, l2)]
        sets = copies({"q": tile(stored["qweight"], 8), "scale": stored["scale"]}, l2)
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, generator=gen, device=device, dtype=DTYPE)
            ref = x.float() @ w_ref.t()
            bf16 = time_calls([lambda w=w: x @ w.t() for w in bf16_sets], args.replays)
            nt = cw.tiles_nt(m)
            best = {}
            for e in thresholds:
                for (nt_, shape), fn in functions[e].items():
                    if nt_ != nt:
                        continue
                    rt, kw, rw, _ = shape
                    out = torch.empty(m, n, dtype=DTYPE, device=device)

                    def call(t, fn=fn, rt=rt, kw=kw, rw=rw, out=out):
                        launch(fn, (-(-n // (16 * rt * rw)),), (kw * rw * 32,),
                               (np.uint64(x.data_ptr()), np.uint64(t["q"].data_ptr()),
                                np.uint64(t["scale"].data_ptr()), np.uint64(0), np.uint64(0),
                                np.uint64(out.data_ptr()), np.int32(m), np.int32(n),
                                np.int32(k), np.int32(1)), device)
                        return out
                    y = call(sets[0]).float()
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    failed |= not err <= ERR_BOUND
                    sec = time_calls([lambda t=t, call=call: call(t) for t in sets], args.replays)
                    best[e] = min(best.get(e, 1.0), sec)
                    rows.append(dict(shape=name, m=m, exact=e, tiles_shape=shape, us=sec * 1e6,
                                     err=err, speedup=bf16 / sec))
            print(f"{name:<16} {m:>3} {bf16 * 1e6:>7.1f} "
                  + " ".join(f"{best[e] * 1e6:>7.1f}" for e in thresholds))
            rows.append(dict(shape=name, m=m, variant="bf16", us=bf16 * 1e6))
            (out_dir / "sweep_int8_tiles.json").write_text(json.dumps(rows, indent=1))
        del bf16_sets, sets
        torch.cuda.empty_cache()
    print("# geomean over shapes of the best shape's speed-up over bf16, per threshold")
    for m in sorted({r["m"] for r in rows}):
        line = []
        for e in thresholds:
            best = {}
            for r in rows:
                if r["m"] == m and r.get("exact") == e:
                    best[r["shape"]] = max(best.get(r["shape"], 0.0), r["speedup"])
            line.append(f"e{e} {_geomean(list(best.values())):.2f}")
        print(f"M={m:>3}  " + "  ".join(line))
    print("ERRORS OVER BOUND" if failed else "# all errors within bound")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
