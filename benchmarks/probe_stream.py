"""How fast can a kernel only read an int4 weight? The ceiling of the tiled GEMV, measured.

    python benchmarks/probe_stream.py                 # bench_wo_kernels' 9 shapes
    python benchmarks/probe_stream.py --shapes 7b-o-tp2,70b-gate_up-tp4

For each shape [N, K], on one GPU, in the same run (bench_gemm's time_calls: a CUDA graph of
back-to-back calls, weight copies past twice the L2, median):
    bf16       torch's x @ W.T at M = 1 (the baseline of issue 5's ratios)
    tiles      the tiled int4 GEMV, per channel, M = 1, at the rule's shape
    regs U/KW  a kernel that only reads the tiled weight in the GEMV's pattern (one row tile a
               block of KW warps, turns of U k-tiles, two register sets) and XORs the words
    bulk S/B   the same bytes through a ring of S stages of B bytes in shared memory filled by
               cp.async.bulk (one thread issues a stage; 4 consumer warps read it)
    ring U/KW/S  the GEMV's pattern, each warp copying its rounds with cp.async into S slots of
               shared memory of its own, S - 1 rounds ahead (the read of 44d661d's wo_tiles_ring,
               a GEMV not kept: design note 41)
(benchmarks/probe_stream.cu). Every kernel launches with PDL, as the GEMV does. If a read-only
kernel is not much faster than the GEMV, the GEMV's arithmetic is not what limits it.
Output: table (us, GB/s of the int4 weight, what the time would be as a speed-up over bf16),
$OUT/probe_stream.json.
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
from bench_gemm import copies, copy_bandwidth, time_calls  # noqa: E402
from bench_wo_kernels import SHAPES  # noqa: E402

from tpquant.kernels import cuda_weight_only as cw  # noqa: E402
from tpquant.kernels.cupy_launch import launch  # noqa: E402
from tpquant.kernels.device import sm_count  # noqa: E402
from tpquant.kernels.tiles import tile  # noqa: E402
from tpquant.quantization.schemes import WeightOnly  # noqa: E402

REGS = [(2, 4), (4, 4), (2, 8), (4, 8)]  # (U, KW)
RING = [(2, 4, 3), (2, 8, 3), (4, 8, 3), (2, 8, 4), (4, 8, 4), (2, 8, 6)]  # (U, KW, S)
BULK = [(4, 16384), (8, 8192), (6, 16384), (4, 32768), (12, 8192)]  # (S, B): stages, bytes
CONSUMERS = 4
SMEM_PER_SM = 200 << 10  # dynamic shared memory a probe spends on one SM's blocks


def module() -> dict:
    """The probe's kernels, compiled by NVRTC through CuPy: {name expression: function}."""
    import cupy

    names = [f"stream_regs<{u}, {kw}>" for u, kw in REGS]
    names += [f"stream_bulk<{s}, {b}, {CONSUMERS}>" for s, b in BULK]
    names += [f"stream_ring<{u}, {kw}, {s}>" for u, kw, s in RING]
    source = (Path(__file__).resolve().parent / "probe_stream.cu").read_text()
    mod = cupy.RawModule(code=source, options=("-std=c++17",), name_expressions=names)
    return {name: mod.get_function(name) for name in names}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    sms = sm_count(device)
    copy_bw = copy_bandwidth(device, 5)
    functions = module()
    out = torch.zeros(1 << 16, dtype=torch.int32, device=device)
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    print(f"# {props.name}, {sms} SMs, copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    print(f"{'shape':<16} {'variant':<14} {'us':>7} {'GB/s':>6} {'as x bf16':>9}")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        weight = torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
        stored = WeightOnly(bits=4, dtype=torch.bfloat16, tiles=False).quantize(weight)
        tiled = {"qweight": tile(stored["qweight"], 4), "scale": stored["scale"]}
        sets = copies(tiled, l2)
        bf16_sets = [t["w"] for t in copies({"w": weight}, l2)]
        x = torch.randn(1, k, generator=gen, device=device, dtype=torch.bfloat16)
        wbytes = n * k // 2
        timed = {"bf16": time_calls([lambda w=w: x @ w.t() for w in bf16_sets], args.replays)}

        def gemv(t):
            y = torch.empty(1, n, dtype=x.dtype, device=device)
            cw.tiles_gemv(x, t["qweight"], t["scale"], None, y)
            return y
        timed["tiles"] = time_calls([lambda t=t: gemv(t) for t in sets], args.replays)
        tiles_k = k // 64
        for u, kw in REGS:
            f = functions[f"stream_regs<{u}, {kw}>"]

            def regs(t, f=f, kw=kw):
                launch(f, (n // 16,), (kw * 32,), (np.uint64(t["qweight"].data_ptr()),
                       np.uint64(out.data_ptr()), np.int32(tiles_k)), device, pdl=True)
            timed[f"regs {u}/{kw}"] = time_calls([lambda t=t: regs(t) for t in sets],
                                                 args.replays)
        for u, kw, s in RING:
            f = functions[f"stream_ring<{u}, {kw}, {s}>"]
            smem = kw * s * u * 512
            f.max_dynamic_shared_size_bytes = smem

            def ring(t, f=f, kw=kw, smem=smem):
                launch(f, (n // 16,), (kw * 32,), (np.uint64(t["qweight"].data_ptr()),
                       np.uint64(out.data_ptr()), np.int32(tiles_k)), device, pdl=True,
                       shared_mem=smem)
            timed[f"ring {u}/{kw}/{s}"] = time_calls([lambda t=t: ring(t) for t in sets],
                                                     args.replays)
        for s, b in BULK:
            f = functions[f"stream_bulk<{s}, {b}, {CONSUMERS}>"]
            smem = s * b
            f.max_dynamic_shared_size_bytes = smem
            per_sm = max(1, SMEM_PER_SM // smem)
            chunks = wbytes // b
            blocks = min(sms * per_sm, chunks)
            per = -(-chunks // blocks)

            def bulk(t, f=f, smem=smem, per=per, chunks=chunks):
                launch(f, (-(-chunks // per),), ((CONSUMERS + 1) * 32,),
                       (np.uint64(t["qweight"].data_ptr()), np.uint64(out.data_ptr()),
                        np.int32(chunks), np.int32(per)), device, pdl=True, shared_mem=smem)
            timed[f"bulk {s}/{b // 1024}K"] = time_calls([lambda t=t: bulk(t) for t in sets],
                                                         args.replays)
        for variant, sec in timed.items():
            moved = wbytes * (4 if variant == "bf16" else 1)
            row = dict(shape=name, n=n, k=k, variant=variant, us=sec * 1e6,
                       GBps=moved / sec / 1e9, speedup=timed["bf16"] / sec)
            rows.append(row)
            print(f"{name:<16} {variant:<14} {row['us']:>7.2f} {row['GBps']:>6.0f} "
                  f"{row['speedup']:>9.2f}")
        del sets, bf16_sets
        torch.cuda.empty_cache()
    result = {"device": props.name, "copy_bandwidth_GBps": copy_bw / 1e9, "rows": rows}
    (out_dir / "probe_stream.json").write_text(json.dumps(result, indent=1))
    print("# geomean speed-up over bf16 by variant")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        v = [r["speedup"] for r in rows if r["variant"] == variant]
        print(f"{variant:<14} {float(np.exp(np.mean(np.log(v)))):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
