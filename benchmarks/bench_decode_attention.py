"""Decode attention's split-K kernel by its position block, warps and program target (issue 7).

    python benchmarks/bench_decode_attention.py [--batch 1 8 64] [--context 512]

For Llama-2-7B's heads at TP 1 and 2 (32 / 16 heads of 128, one KV head each) and Llama-3-8B's
at TP 1 (32 query heads over 8 KV heads), bf16 cache: a CUDA graph of 32 calls of
`decode_attention_triton`, each over its own cache as the 32 layers of a decode step are (so
nothing is read from L2), replayed 10 times; the median per call, the K / V bytes it reads per
microsecond, and that against the device's copy bandwidth (bench_gemm.copy_bandwidth). Every
(BLOCK_N, TARGET_PROGRAMS, warps) of the sweep, warps either fixed or the module's rule
(`split_warps`, "rule"); the module's values are marked "*".
Table on stdout, JSON in $OUT/bench_decode_attention.json (OUT defaults to /tmp/out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import copy_bandwidth, event_times  # noqa: E402

from tpquant.layers import decode_attention as da  # noqa: E402
from tpquant.layers.kv_cache import KVCache  # noqa: E402

SHAPES = {"7b-tp1": (32, 32), "7b-tp2": (16, 16), "8b-tp1": (32, 8)}  # (heads, KV heads)
HEAD_DIM, LAYERS = 128, 32
SWEEP = dict(BLOCK_N=(32, 64, 128), TARGET_PROGRAMS=(256, 512, 1024))
WARPS = (2, 4, 8, "rule")


def time_config(caches: list[KVCache], q: torch.Tensor, pos: torch.Tensor) -> float:
    """Seconds per call: a graph of one call per cache, replayed."""
    for c in caches[:2]:
        da.decode_attention_triton(q, c, pos)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in caches:
            da.decode_attention_triton(q, c, pos)
    graph.replay()
    return statistics.median(event_times(graph.replay, 10)) / len(caches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--context", type=int, default=512, help="cached positions per row")
    args = p.parse_args()
    device = torch.device("cuda")
    copy = copy_bandwidth(device)
    defaults = {name: getattr(da, name) for name in SWEEP} | {"warps": "rule"}
    rule = da.split_warps
    rows = []
    print(f"{'shape':<8} {'batch':>5} {'BLOCK_N':>7} {'warps':>5} {'target':>6} {'us':>7} "
          f"{'GB/s':>6} {'%copy':>6}")
    for shape, batch in itertools.product(SHAPES, args.batch):
        H, Hkv = SHAPES[shape]
        max_seq = args.context + 64
        caches = [KVCache(batch, max_seq, Hkv, HEAD_DIM, torch.bfloat16, device)
                  for _ in range(LAYERS)]
        for c in caches:
            c.k.normal_()
            c.v.normal_()
        q = torch.randn(batch, H, HEAD_DIM, dtype=torch.bfloat16, device=device)
        pos = torch.full((batch,), args.context - 1, dtype=torch.long, device=device)
        kv_bytes = 2 * batch * args.context * Hkv * HEAD_DIM * 2
        for *values, warps in itertools.product(*SWEEP.values(), WARPS):
            config = dict(zip(SWEEP, values)) | {"warps": warps}
            warps_of = rule if warps == "rule" else lambda max_seq, splits, w=warps: w
            with mock.patch.multiple(da, **dict(zip(SWEEP, values)), split_warps=warps_of):
                seconds = time_config(caches, q, pos)
            gbps = kv_bytes / seconds / 1e9
            mark = "*" if config == defaults else " "
            rows.append(dict(shape=shape, batch=batch, **config, us=seconds * 1e6, GBps=gbps,
                             pct_copy=100 * gbps * 1e9 / copy, default=config == defaults))
            print(f"{shape:<8} {batch:>5} {config['BLOCK_N']:>7} {config['warps']:>5} "
                  f"{config['TARGET_PROGRAMS']:>6} {seconds * 1e6:7.2f} {gbps:6.0f} "
                  f"{100 * gbps * 1e9 / copy:6.1f} {mark}", flush=True)
        del caches
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        key = (r["shape"], r["batch"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print("\nbest per (shape, batch) against the module's values:")
    for (shape, batch), r in best.items():
        d = next(x for x in rows if x["shape"] == shape and x["batch"] == batch and x["default"])
        print(f"  {shape:<8} batch {batch:>3}: {r['us']:6.2f} us at BLOCK_N {r['BLOCK_N']}, "
              f"warps {r['warps']}, {r['TARGET_PROGRAMS']} programs; default {d['us']:6.2f} us")
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_decode_attention.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(device), "copy_bandwidth_GBps": copy / 1e9,
         "context": args.context, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
