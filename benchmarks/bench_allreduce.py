"""All-reduce latency on GPUs: custom one-shot, two-shot and push, automatic, and NCCL.

    launch/mpirun.sh -n 2 python benchmarks/bench_allreduce.py
    launch/mpirun.sh -n 4 python benchmarks/bench_allreduce.py

One process per GPU (by local rank). Message sizes from 1 KiB to 256 MiB by powers of 2, in
bfloat16 (--dtype). For each size and path, a CUDA graph of `calls` back-to-back in-place
all-reduces is captured once and replayed `replays` times in a row (no host synchronization
in between, so the ranks stay in step through the collectives themselves); time per call =
median replay time / calls, max over ranks. Paths:

- nccl: NcclCommunicator(all_reduce="nccl"), the baseline measured in the same run;
- oneshot, twoshot: CustomAllReduce with a --custom-capacity workspace (sizes above it: -);
- push: the same workspace's push kernel (float16 / bfloat16 up to its push slot; -);
- auto: NcclCommunicator(all_reduce="auto"), what the layers get (default workspace), with
  the path it chose.

Also: algorithm bandwidth (bytes / time) and bus bandwidth (x 2(N-1)/N, nccl-tests' rule);
the issue's targets (auto <= 0.5x NCCL from 4 KiB to 512 KiB, never > 1.05x NCCL), and
thresholds for tpquant.parallel.custom_allreduce.THRESHOLDS derived from the measured table.
Table on rank 0; $OUT/bench_allreduce_tp{N}.json (OUT defaults to /tmp/out) and a PNG if
matplotlib imports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from plotting import pyplot  # benchmarks/, on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tpquant.collectives import NcclCommunicator  # noqa: E402
from tpquant.parallel.custom_allreduce import (  # noqa: E402
    ALGORITHMS,
    PUSH_DTYPES,
    CustomAllReduce,
    Thresholds,
    thresholds_for,
)
from tpquant.parallel.mapping import Mapping  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATHS = ("nccl", "oneshot", "twoshot", "push", "auto")
TARGET_RANGE = (4 << 10, 512 << 10)  # auto <= TARGET_RATIO x NCCL for sizes in this range
TARGET_RATIO, NEVER_SLOWER = 0.5, 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--min-bytes", type=int, default=1 << 10)
    p.add_argument("--max-bytes", type=int, default=256 << 20)
    p.add_argument("--custom-capacity", type=int, default=64 << 20,
                   help="workspace of the oneshot/twoshot columns, bytes")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--max-blocks", type=int, default=None,
                   help="thread blocks per custom launch (default: the library's)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    return p.parse_args(argv)


def calls_per_graph(nbytes: int) -> int:
    """Enough calls per replay to hide the graph launch, few enough for the time budget."""
    return 20 if nbytes <= 1 << 20 else 8 if nbytes <= 16 << 20 else 3


def time_per_call(fn: Callable[[torch.Tensor], object], t: torch.Tensor, calls: int,
                  replays: int, mpi_comm) -> float:
    """Microseconds per call: median over back-to-back replays of a graph of `calls`,
    max over ranks."""
    device = t.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the capture: NCCL connects lazily
        fn(t)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(t)
    graph.replay()
    torch.cuda.synchronize(device)
    mpi_comm.Barrier()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
    events[0].record()
    for e in events[1:]:
        graph.replay()
        e.record()
    events[-1].synchronize()
    per_call = [a.elapsed_time(b) * 1e3 / calls for a, b in zip(events, events[1:])]
    mine = np.array([statistics.median(per_call)])
    worst = np.empty(1)
    from mpi4py import MPI

    mpi_comm.Allreduce(mine, worst, op=MPI.MAX)
    del graph
    return float(worst[0])


def suggest_thresholds(rows: list[dict]) -> Thresholds | None:
    """From the table: one-shot while it beats two-shot, custom while it beats NCCL.

    Both are the end of the run of sizes, from the smallest, over which the rule holds, so
    the automatic choice never takes a path at a size where it was measured slower.
    """
    custom = [r for r in rows if r["oneshot_us"] is not None and r["twoshot_us"] is not None]
    if not custom:
        return None
    oneshot_max = 0
    for r in custom:
        if r["oneshot_us"] > r["twoshot_us"]:
            break
        oneshot_max = r["bytes"]
    custom_max = 0
    for r in custom:
        if min(r["oneshot_us"], r["twoshot_us"]) >= r["nccl_us"]:
            break
        custom_max = r["bytes"]
    return Thresholds(oneshot_max_bytes=min(oneshot_max, custom_max), custom_max_bytes=custom_max)


def human(nbytes: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def fmt(us: float | None) -> str:
    return "-" if us is None else f"{us:.1f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, n = world.Get_rank(), world.Get_size()
    if n < 2:
        sys.exit("bench_allreduce: run under mpirun with 2 or more ranks, one per GPU")
    mapping = Mapping.from_env()
    device = mapping.device()
    torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    item = torch.tensor([], dtype=dtype).element_size()
    started = time.monotonic()

    nccl = NcclCommunicator(world, device, all_reduce="nccl")
    auto = NcclCommunicator(world, device, all_reduce="auto")
    blocks = {} if args.max_blocks is None else {"max_blocks": args.max_blocks}
    custom = CustomAllReduce(world, device, capacity_bytes=args.custom_capacity, **blocks)
    if not custom.reachable:
        sys.exit(f"bench_allreduce: the custom all-reduce cannot run: {custom.unreachable_reason}")
    fns = {
        "nccl": nccl.all_reduce,
        "auto": auto.all_reduce,
        **{a: (lambda t, a=a: custom.all_reduce(t, a)) for a in ALGORITHMS},
    }

    rows = []
    size = args.min_bytes
    while size <= args.max_bytes:
        # Zeros: the sums stay zero over every replay; the kernels' work does not depend on values.
        t = torch.zeros(size // item, dtype=dtype, device=device)
        calls = calls_per_graph(size)
        replays = args.replays if size <= 16 << 20 else max(3, args.replays // 4)
        row: dict = {"bytes": size, "calls_per_graph": calls, "replays": replays,
                     "auto_path": auto.algorithm_for(t)}
        for path in PATHS:
            fits = path not in ALGORITHMS or size <= custom.capacity_bytes
            if path == "push":
                fits = dtype in PUSH_DTYPES and size <= custom.push_bytes
            row[f"{path}_us"] = time_per_call(fns[path], t, calls, replays, world) if fits else None
        for path in PATHS:
            us = row[f"{path}_us"]
            algbw = None if us is None else size / (us * 1e-6) / 1e9
            row[f"{path}_algbw_gbs"] = algbw
            row[f"{path}_busbw_gbs"] = None if algbw is None else algbw * 2 * (n - 1) / n
        row["auto_over_nccl"] = row["auto_us"] / row["nccl_us"]
        rows.append(row)
        del t
        size *= 2
    nccl.synchronize()
    auto.synchronize()
    custom.synchronize()

    in_range = [r for r in rows if TARGET_RANGE[0] <= r["bytes"] <= TARGET_RANGE[1]]
    targets = {
        f"auto <= {TARGET_RATIO}x nccl, {human(TARGET_RANGE[0])}..{human(TARGET_RANGE[1])}": all(
            r["auto_over_nccl"] <= TARGET_RATIO for r in in_range
        ),
        f"auto <= {NEVER_SLOWER}x nccl at every size": all(
            r["auto_over_nccl"] <= NEVER_SLOWER for r in rows
        ),
    }
    suggested = suggest_thresholds(rows)
    in_use = thresholds_for(n)
    seconds = time.monotonic() - started
    if rank != 0:
        return

    print(f"all-reduce, {n} x {torch.cuda.get_device_name(device)}, {args.dtype}, "
          "us per call (median of CUDA-graph replays, max over ranks)")
    head = (f"{'size':>9} {'nccl':>9} {'oneshot':>9} {'twoshot':>9} {'push':>9} {'auto':>9} "
            f"{'path':>8} "
            f"{'auto/nccl':>9} {'busbw auto':>10} {'busbw nccl':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{human(r['bytes']):>9} {fmt(r['nccl_us']):>9} {fmt(r['oneshot_us']):>9} "
              f"{fmt(r['twoshot_us']):>9} {fmt(r['push_us']):>9} {fmt(r['auto_us']):>9} "
              f"{r['auto_path']:>8} "
              f"{r['auto_over_nccl']:>9.2f} {r['auto_busbw_gbs']:>10.1f} "
              f"{r['nccl_busbw_gbs']:>10.1f}")
    for name, ok in targets.items():
        print(f"target {name}: {'PASS' if ok else 'FAIL'}")
    print(f"thresholds in use for TP {n}: {in_use}")
    if suggested is not None:
        print(f"suggested THRESHOLDS[{n}] = Thresholds("
              f"oneshot_max_bytes={suggested.oneshot_max_bytes}, "
              f"custom_max_bytes={suggested.custom_max_bytes})  "
              f"# {human(suggested.oneshot_max_bytes)}, {human(suggested.custom_max_bytes)}")
    print(f"({seconds:.0f} s)")

    import cupy
    from cupy.cuda import nccl as cupy_nccl

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "world_size": n,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cupy": cupy.__version__,
        "nccl": cupy_nccl.get_version(),
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "custom_capacity_bytes": custom.capacity_bytes,
        "auto_capacity_bytes": auto.custom.capacity_bytes if auto.custom else 0,
        "rows": rows,
        "targets": targets,
        "thresholds_in_use": vars(in_use),
        "suggested_thresholds": None if suggested is None else vars(suggested),
        "seconds": seconds,
    }
    path = out / f"bench_allreduce_tp{n}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    plot(rows, n, args.dtype, out / f"bench_allreduce_tp{n}.png")


def plot(rows: list[dict], n: int, dtype: str, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in PATHS:
        pts = [(r["bytes"], r[f"{p}_us"]) for r in rows if r[f"{p}_us"] is not None]
        ax.plot([b for b, _ in pts], [u for _, u in pts], marker="o", ms=3, label=p)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("time per all-reduce (us)")
    ax.set_title(f"all-reduce latency, TP {n}, {dtype} (CUDA-graph replays)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
