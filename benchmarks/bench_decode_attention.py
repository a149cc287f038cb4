"""Decode attention's split-K kernel by its position block, warps and program target (issue 7).

    python benchmarks/bench_decode_attention.py [--batch 1 8 64] [--context 512]

For Llama-2-7B's heads at TP 1 and 2 (32 / 16 heads of 128, one KV head each) and Llama-3-8B's
at TP 1 (32 query heads over 8 KV heads), bf16 cache: a CUDA graph of 32 calls of
`decode_attention_triton`, each over its own cache as the 32 layers of a decode step are (so
nothing is read from L2), replayed 10 times; the median per call, the K / V bytes it reads per
microsecond, and that against the device's copy bandwidth (bench_gemm.copy_bandwidth). Every
TARGET_PROGRAMS x (positions a step, warps) of the sweep, the latter fixed or the module's
rule (`split_config`, "rule"); the module's choice is marked "*".
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import copy_bandwidth, event_times  # noqa: E402

from tpquant.layers import decode_attention as da  # noqa: E402
from tpquant.layers.kv_cache import KVCache  # noqa: E402

SHAPES = {"7b-tp1": (32, 32), "7b-tp2": (16, 16), "8b-tp1": (32, 8)}  # (heads, KV heads)
HEAD_DIM, LAYERS = 128, 32
TARGETS = (256, 512, 1024)
CONFIGS = (*((b, w) for b in (32, 64, 128) for w in (2, 4, 8)), "rule")  # (BLOCK_N, warps)


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
    default_target, rule = da.TARGET_PROGRAMS, da.split_config
    rows = []
    print(f"{'shape':<8} {'batch':>5} {'config':>7} {'target':>6} {'us':>7} "
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
        for target, config in itertools.product(TARGETS, CONFIGS):
            da.TARGET_PROGRAMS = target
            da.split_config = rule if config == "rule" else lambda max_seq, splits, c=config: c
            label = config if config == "rule" else f"{config[0]}/{config[1]}"
            seconds = time_config(caches, q, pos)
            gbps = kv_bytes / seconds / 1e9
            default = config == "rule" and target == default_target
            rows.append(dict(shape=shape, batch=batch, config=label, target_programs=target,
                             us=seconds * 1e6, GBps=gbps, pct_copy=100 * gbps * 1e9 / copy,
                             default=default))
            print(f"{shape:<8} {batch:>5} {label:>7} {target:>6} {seconds * 1e6:7.2f} "
                  f"{gbps:6.0f} {100 * gbps * 1e9 / copy:6.1f} {'*' if default else ''}",
                  flush=True)
        da.TARGET_PROGRAMS, da.split_config = default_target, rule
        del caches
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        key = (r["shape"], r["batch"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print("\nbest per (shape, batch) against the module's choice:")
    for (shape, batch), r in best.items():
        d = next(x for x in rows if x["shape"] == shape and x["batch"] == batch and x["default"])
        print(f"  {shape:<8} batch {batch:>3}: {r['us']:6.2f} us at {r['config']} (positions a "
              f"step / warps), {r['target_programs']} programs; the module's {d['us']:6.2f} us")
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_decode_attention.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(device), "copy_bandwidth_GBps": copy / 1e9,
         "context": args.context, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
