"""A row layer's all-reduce followed by the residual add and RMSNorm: fused into one custom
kernel against the two kernels it replaces, and against NCCL's all-reduce.

    launch/mpirun.sh -n 2 python benchmarks/bench_allreduce_norm.py

One process per GPU. For each (rows, hidden) in bfloat16 (--dtype), a CUDA graph of `calls`
back-to-back ops is captured and replayed (bench_allreduce.time_per_call: median per op, max
over ranks). Paths, measured in the same run:

- nccl+norm: NCCL all-reduce, then the Triton add + RMSNorm kernel;
- oneshot+norm: the custom one-shot all-reduce, then the same norm kernel (what a decode
  step ran before the fusion, and runs with TPQUANT_ALLREDUCE_NORM=0);
- fused: CustomAllReduce.all_reduce_add_rms_norm, one kernel over the one-shot all-reduce;
- fused push: the same over the push all-reduce (16-bit types up to the push slot; - above).

"picked": whether the layers fuse (`add_norm_pays`; over push where push fits).

A Llama decode step does two of these per layer. Table on rank 0;
$OUT/bench_allreduce_norm_tp{N}.json (OUT defaults to /tmp/out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from bench_allreduce import DTYPES, time_per_call  # benchmarks/, on sys.path as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tpquant.collectives import NcclCommunicator  # noqa: E402
from tpquant.kernels.norm import add_rms_norm  # noqa: E402
from tpquant.parallel.custom_allreduce import (  # noqa: E402
    PUSH_DTYPES,
    CustomAllReduce,
    add_norm_pays,
)
from tpquant.parallel.mapping import Mapping  # noqa: E402

PATHS = ("nccl+norm", "oneshot+norm", "fused", "fused push")
EPS = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--rows", default="1,8,64,512", help="tokens per call, comma-separated")
    p.add_argument("--hidden", default="4096,8192", help="hidden sizes, comma-separated")
    p.add_argument("--calls", type=int, default=32)
    p.add_argument("--replays", type=int, default=30)
    p.add_argument("--layers", type=int, default=32, help="for the per-step saving column")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, n = world.Get_rank(), world.Get_size()
    if n < 2:
        sys.exit("bench_allreduce_norm: run under mpirun with 2 or more ranks, one per GPU")
    device = Mapping.from_env().device()
    torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    nccl = NcclCommunicator(world, device, all_reduce="nccl")
    custom = CustomAllReduce(world, device)
    if not custom.reachable:
        sys.exit(f"bench_allreduce_norm: no custom all-reduce: {custom.unreachable_reason}")

    rows_out = []
    for hidden in [int(h) for h in args.hidden.split(",")]:
        g = torch.Generator(device=device).manual_seed(hidden)
        weight = torch.randn(hidden, generator=g, device=device).to(dtype)
        for rows in [int(r) for r in args.rows.split(",")]:
            # Zeros: in-place all-reduces keep them zero over every replay; the kernels' work
            # does not depend on the values.
            partial = torch.zeros(rows, hidden, dtype=dtype, device=device)
            residual = torch.randn(rows, hidden, generator=g, device=device).to(dtype)
            fns = {
                "nccl+norm": lambda t: add_rms_norm(residual, nccl.all_reduce(t), weight, EPS),
                "oneshot+norm": lambda t: add_rms_norm(
                    residual, custom.all_reduce(t, "oneshot"), weight, EPS),
                "fused": lambda t: custom.all_reduce_add_rms_norm(t, residual, weight, EPS),
                "fused push": lambda t: custom.all_reduce_add_rms_norm(t, residual, weight, EPS,
                                                                       "push"),
            }
            row: dict = {"rows": rows, "hidden": hidden, "bytes": partial.nbytes}
            pushes = dtype in PUSH_DTYPES and partial.nbytes <= custom.push_bytes
            for path in PATHS:
                row[f"{path}_us"] = (None if path == "fused push" and not pushes else
                                     time_per_call(fns[path], partial, args.calls, args.replays,
                                                   world))
            row["fused_over_oneshot_norm"] = row["fused_us"] / row["oneshot+norm_us"]
            row["fused_picked"] = add_norm_pays(rows, partial.nbytes // rows, n, custom.threads,
                                                custom.max_blocks)  # what the layers get
            row["step_saving_us"] = 2 * args.layers * (row["oneshot+norm_us"] - row["fused_us"])
            row["push_over_fused"] = (row["fused push_us"] / row["fused_us"]
                                      if pushes else None)
            rows_out.append(row)
    custom.synchronize()
    nccl.synchronize()

    if rank == 0:
        head = (f"{'rows':>5} {'hidden':>6} {'nccl+norm':>10} {'oneshot+norm':>13} {'fused':>8}"
                f" {'fused push':>10} {'fused/unfused':>14} {'push/fused':>10}"
                f" {'per step (' + str(args.layers) + ' layers)':>22} {'picked':>7}")
        print(f"all-reduce + add + RMSNorm, {n} ranks, {args.dtype}, us per op (median, max over "
              "ranks)")
        print(head)
        for r in rows_out:
            print(f"{r['rows']:>5} {r['hidden']:>6} {r['nccl+norm_us']:>10.2f} "
                  f"{r['oneshot+norm_us']:>13.2f} {r['fused_us']:>8.2f} "
                  f"{_fmt(r['fused push_us']):>10} {r['fused_over_oneshot_norm']:>14.2f} "
                  f"{_fmt(r['push_over_fused']):>10} {r['step_saving_us']:>19.1f} us"
                  f" {'fused' if r['fused_picked'] else 'plain':>7}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"bench_allreduce_norm_tp{n}.json"
        path.write_text(json.dumps({"world_size": n, "dtype": args.dtype, "calls": args.calls,
                                    "replays": args.replays, "rows": rows_out}, indent=1))
        print(f"wrote {path}")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    main()
