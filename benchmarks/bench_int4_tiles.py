"""The tiled GEMV (pre-packed weight, `tpquant.kernels.tiles`; int4 per channel, int8 with
--bits 8, groupwise int4 with zeros with --group G) against the dispatch on the stored layout
and torch's bf16 matmul, on one GPU.

    python benchmarks/bench_int4_tiles.py                 # 7 shapes x M = 1..64, shape sweep
    python benchmarks/bench_int4_tiles.py --ms 1,4 --no-sweep --bits 8
    python benchmarks/bench_int4_tiles.py --ms 1,4,16 --group 128

For each shape [N, K] (bench_wo_kernels' Llama-2-7B / 70B shapes) and M: bf16 `x @ W.T`, the
scheme on the stored layout through the dispatch (`auto`: the CUDA fma / mma GEMVs, Triton,
dequantize + cuBLAS), the same on the tiled layout (the tiled GEMV to M = 64 at the shape
`tiles_plan` chooses: the tuned table's, else the rule's; CUTLASS or dequantize-from-tiles +
cuBLAS above), and (unless --no-sweep, M <= 64) the tiled GEMV at every candidate shape (row
tiles, K warps, row warps, unroll), with the blocks an SM holds of each. Each result's max
|y - ref| / max |ref| against float32 math on the dequantized weight ("err"); a tiled result
over ERR_BOUND fails the run.
Timing: bench_gemm's time_calls (CUDA graph, weight copies past twice the L2, median).
Output: table, per-M geomeans over bf16, $OUT/bench_int4_tiles.json (int8:
bench_int8_tiles.json, groupwise: bench_int4_gw_tiles.json; $OUT defaults to /tmp/out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import _geomean, copies, copy_bandwidth, nbytes, time_calls  # noqa: E402
from bench_wo_kernels import SHAPES  # noqa: E402

from tpquant.kernels import cuda_weight_only as cw  # noqa: E402
from tpquant.kernels.tiles import tile  # noqa: E402
from tpquant.kernels.weight_only import (  # noqa: E402
    dequantize_groupwise, dequantize_weight_only, groupwise_matmul, weight_only_matmul,
)
from tpquant.quantization.schemes import Groupwise, WeightOnly  # noqa: E402

DTYPE = torch.bfloat16
ERR_BOUND = 1e-2  # bf16 output: a few roundings of 2^-9
def candidates(m: int, device: torch.device, mode: int) -> list[tuple[int, int, int, int]]:
    """The tiled GEMV's candidate shapes (row tiles, K warps, row warps, unroll) that
    `tiles_shape` chooses from at M = m."""
    return list(cw.tiles_resident(cw.tiles_nt(m), device, DTYPE, mode))


def matmul(x, t, bits, group, tiled=False):
    """The public op on weight tensors t (per channel: qweight, scale; groupwise: qweight,
    scales, zeros)."""
    if group:
        return groupwise_matmul(x, t["qweight"], t["scales"], t["zeros"], group, None,
                                tiled=tiled)
    return weight_only_matmul(x, t["qweight"], t["scale"], bits, tiled=tiled)


def tiles_call(x, sets, bits, group, shape=None):
    """Calls on each copy of the tiled weight: the public op (shape None: the dispatch, which
    dequantizes past the GEMV's M), or the GEMV at a forced shape."""
    def make(t):
        def call():
            if shape is None:
                return matmul(x, t, bits, group, tiled=True)
            out = torch.empty(x.shape[0], t["qweight"].shape[0], dtype=x.dtype, device=x.device)
            if group:
                cw.tiles_gemv(x, t["qweight"], t["scales"], None, out, zeros=t["zeros"],
                              group=group, shape=shape)
            else:
                cw.tiles_gemv(x, t["qweight"], t["scale"], None, out, shape=shape)
            return out
        return call
    return [make(t) for t in sets]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default="1,2,4,8,16,32,64")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--group", type=int, default=0, help="groupwise int4 with zeros, group G")
    args = ap.parse_args()
    bits, group = args.bits, args.group
    if group and bits != 4:
        ap.error("--group is int4")
    mode = cw.mode(bits, group, bool(group))
    json_name = f"bench_int{bits}{'_gw' if group else ''}_tiles.json"
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    copy_bw = copy_bandwidth(device, 5)
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    result = {"device": props.name, "copy_bandwidth_GBps": copy_bw / 1e9, "rows": []}
    print(f"# {props.name}, copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    print(f"{'shape':<16} {'M':>3} {'bf16 us':>8} {'auto us':>8} {'x':>5} {'tiles us':>8} "
          f"{'x':>5} {'%copy':>6} {'err':>8}  best shape")
    failed = False
    scheme = (Groupwise(group_size=group, dtype=DTYPE, tiles=False) if group
              else WeightOnly(bits=bits, dtype=DTYPE, tiles=False))
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        weight = torch.randn(n, k, generator=gen, device=device, dtype=DTYPE) * 0.02
        stored = scheme.quantize(weight)
        bf16_sets = [t["w"] for t in copies({"w": weight}, l2)]
        stored_sets = copies(stored, l2)
        tiled_sets = copies({**stored, "qweight": tile(stored["qweight"], bits)}, l2)
        w_ref = (dequantize_groupwise(stored["qweight"], stored["scales"], stored["zeros"], group)
                 if group else dequantize_weight_only(stored["qweight"], stored["scale"], bits))
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, generator=gen, device=device, dtype=DTYPE)
            ref = x.float() @ w_ref.t()
            bf16 = time_calls([lambda w=w: x @ w.t() for w in bf16_sets], args.replays)
            auto = time_calls([lambda t=t: matmul(x, t, bits, group) for t in stored_sets],
                              args.replays)
            shapes = [None] + (candidates(m, device, mode) if args.sweep and m <= cw.TILES_MAX_M
                               else [])
            timed = []
            for shape in shapes:
                try:
                    calls = tiles_call(x, tiled_sets, bits, group, shape)
                    y = calls[0]().float()
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    sec = time_calls(calls, args.replays)
                except Exception as exc:  # noqa: BLE001 - report, go on
                    torch.cuda.synchronize()
                    print(f"# {name} M={m} {shape}: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                failed |= not err <= ERR_BOUND
                timed.append((sec, shape, err))
                resident = (cw.tiles_resident(cw.tiles_nt(m), device, DTYPE, mode)[shape]
                            if shape else None)
                result["rows"].append(dict(shape=name, n=n, k=k, m=m, variant="tiles",
                                           tiles_shape=shape, resident=resident,
                                           us=sec * 1e6, err=err, speedup=bf16 / sec))
            result["rows"].append(dict(shape=name, n=n, k=k, m=m, variant="bf16", us=bf16 * 1e6))
            result["rows"].append(dict(shape=name, n=n, k=k, m=m, variant="auto", us=auto * 1e6,
                                       speedup=bf16 / auto))
            default = timed[0] if timed and timed[0][1] is None else None
            chosen = (cw.tiles_plan(m, n, k, device, DTYPE, mode)[1:] if m <= cw.TILES_MAX_M
                      else "the dispatch")
            best = min(timed, key=lambda row: row[0]) if timed else None
            wbytes = nbytes(tiled_sets[0])
            for label, row in (("default", default), ("best", best)):
                if row is None:
                    continue
                sec, shape, err = row
                pct = 100 * (wbytes + 2 * m * (n + k)) / sec / copy_bw
                print(f"{name:<16} {m:>3} {bf16 * 1e6:>8.1f} {auto * 1e6:>8.1f} "
                      f"{bf16 / auto:>5.2f} {sec * 1e6:>8.1f} {bf16 / sec:>5.2f} {pct:>6.1f} "
                      f"{err:>8.1e}  {label} {shape or chosen}")
            (out_dir / json_name).write_text(json.dumps(result, indent=1))
        del bf16_sets, stored_sets, tiled_sets
        torch.cuda.empty_cache()

    print("# geomean over bf16 by M: auto / tiles default / tiles best")
    summary = {}
    for m in sorted({r["m"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["m"] == m]
        auto = [r["speedup"] for r in rows if r["variant"] == "auto"]
        default = [r["speedup"] for r in rows if r["variant"] == "tiles" and r["tiles_shape"] is None]
        best = {}
        for r in rows:
            if r["variant"] == "tiles":
                best[r["shape"]] = max(best.get(r["shape"], 0), r["speedup"])
        g = [_geomean(v) for v in (auto, default, list(best.values()))]
        summary[m] = g
        print(f"M={m:>3}  {g[0]:.2f} / {g[1]:.2f} / {g[2]:.2f}")
    result["summary"] = summary
    (out_dir / json_name).write_text(json.dumps(result, indent=1))
    print("ERRORS OVER BOUND" if failed else "# all errors within bound")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
