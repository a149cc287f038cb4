"""Engine build time: one process building every rank in turn against one process per rank.

    python benchmarks/bench_build.py                 # TP 3, fp16 (float32) and int8_wo, 3 repeats
    python benchmarks/bench_build.py --tp 2 --repeats 5 --quant int4_wo

For each scheme, `python -m tpquant.build --tp N` ("sequential", the baseline) and
`launch/mpirun.sh -n N python -m tpquant.build` ("mpirun") are run alternately, `--repeats`
times each, every run into a fresh engine directory (an existing engine would be reused).
Per run: `build_s`, what tpquant.build prints (from opening the checkpoint to config.json,
on rank 0); `wall_s`, the whole command (Python and MPI start-up included); `cpu_s`, the CPU
time of every process it started (user + system): the work, which only beats one process in
wall time where the ranks get cores of their own. Medians are quoted; ratio = mpirun median /
sequential median of the same run (< 1: mpirun is faster). The last engines of the two ways
are compared tensor for tensor (they must be identical). The environment is passed through
as it is (OMP_NUM_THREADS is recorded; the mpirun wrapper divides the cores among the ranks
when it is unset).

Writes benchmarks/results/build_tp{N}.json (--json to change) and, if matplotlib is
installed, a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plotting import pyplot  # benchmarks/, on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = str(ROOT / "launch" / "mpirun.sh")
WAYS = ("sequential", "mpirun")  # the first is the baseline
BUILT = re.compile(r"built \S+ \(.*\) in ([0-9.]+) s")


def command(way: str, tp: int, quant: str, dtype: str, checkpoint: str | None,
            out: Path) -> list[str]:
    args = [sys.executable, "-m", "tpquant.build", "--quant", quant, "--dtype", dtype,
            "--tp", str(tp), "--out", str(out)]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    return args if way == "sequential" else [MPIRUN, "-n", str(tp), *args]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant
    return usage.ru_utime + usage.ru_stime


def run_once(cmd: list[str]) -> dict[str, float]:
    cpu, start = _children_cpu_s(), time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall, cpu = time.perf_counter() - start, _children_cpu_s() - cpu
    found = BUILT.search(result.stdout)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                         f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return {"build_s": float(found.group(1)), "wall_s": wall, "cpu_s": cpu}


def identical_engines(a: Path, b: Path, tp: int) -> bool:
    """Every rank file holds the same tensors (names, dtypes, values) and metadata."""
    import torch
    from safetensors import safe_open

    for r in range(tp):
        with safe_open(str(a / f"rank{r}.engine"), "pt") as x, \
                safe_open(str(b / f"rank{r}.engine"), "pt") as y:
            if set(x.keys()) != set(y.keys()) or x.metadata() != y.metadata():
                return False
            for k in x.keys():
                s, t = x.get_tensor(k), y.get_tensor(k)
                if s.dtype != t.dtype or not torch.equal(s, t):
                    return False
    return True


def measure(tp: int, quant: str, dtype: str, repeats: int, checkpoint: str | None,
            scratch: Path) -> dict:
    runs: dict[str, list[dict[str, float]]] = {w: [] for w in WAYS}
    last: dict[str, Path] = {}
    for i in range(repeats):
        for way in WAYS:  # alternate, so a change in the machine's load hits both
            out = scratch / f"{quant}-{dtype}-{way}-{i}"
            runs[way].append(run_once(command(way, tp, quant, dtype, checkpoint, out)))
            t = runs[way][-1]
            print(f"  {quant} {dtype} {way:10s} run {i + 1}: build {t['build_s']:.1f} s, "
                  f"wall {t['wall_s']:.1f} s, cpu {t['cpu_s']:.1f} s", flush=True)
            if way in last:
                shutil.rmtree(last[way])
            last[way] = out
    medians = {w: {k: statistics.median(r[k] for r in runs[w]) for k in runs[w][0]}
               for w in WAYS}
    base = medians[WAYS[0]]
    return {
        "quant": quant, "dtype": dtype, "runs": runs, "median": medians,
        "ratio_mpirun_over_sequential": {k: medians["mpirun"][k] / base[k] for k in base},
        "identical_engines": identical_engines(last["sequential"], last["mpirun"], tp),
    }


def print_table(tp: int, results: list[dict]) -> None:
    print(f"\nTP {tp}: medians (s); ratio = mpirun / sequential")
    head = f"{'scheme':22s} {'seq build':>10s} {'mpi build':>10s} {'ratio':>6s} " \
           f"{'seq wall':>9s} {'mpi wall':>9s} {'ratio':>6s} {'seq cpu':>8s} {'mpi cpu':>8s}  " \
           "identical"
    print(head)
    print("-" * len(head))
    for r in results:
        m, q = r["median"], r["ratio_mpirun_over_sequential"]
        seq, mpi = m["sequential"], m["mpirun"]
        print(f"{r['quant'] + ' ' + r['dtype']:22s} {seq['build_s']:10.1f} {mpi['build_s']:10.1f} "
              f"{q['build_s']:6.2f} {seq['wall_s']:9.1f} {mpi['wall_s']:9.1f} {q['wall_s']:6.2f} "
              f"{seq['cpu_s']:8.1f} {mpi['cpu_s']:8.1f}  {r['identical_engines']}")


def plot(path: Path, tp: int, results: list[dict]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['quant']}\n{r['dtype']}" for r in results]
    x = range(len(results))
    for j, way in enumerate(WAYS):
        ax.bar([i + (j - 0.5) * 0.38 for i in x], [r["median"][way]["build_s"] for r in results],
               width=0.38, label=way if way == "mpirun" else f"{way} (one process)")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("build time, median (s)")
    ax.set_title(f"tpquant.build at TP {tp}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quant", action="append", metavar="NAME[:DTYPE]",
                   help="scheme and dtype, repeatable (default: fp16:float32 and int8_wo:float32)")
    p.add_argument("--checkpoint", help="default: the built-in SmolLM2-135M-Instruct GGUF")
    p.add_argument("--json", type=Path, help="default: benchmarks/results/build_tp{N}.json")
    args = p.parse_args(argv)
    if args.tp < 1 or args.repeats < 1:
        p.error("--tp and --repeats must be >= 1")
    quants = [(q.partition(":")[0], q.partition(":")[2] or "float32")
              for q in args.quant or ["fp16:float32", "int8_wo:float32"]]
    out = args.json or ROOT / "benchmarks" / "results" / f"build_tp{args.tp}.json"

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(f"TP {args.tp}, {args.repeats} repeats, {os.cpu_count()} CPUs, load average {load}")
    with tempfile.TemporaryDirectory(prefix="bench_build_") as scratch:
        results = [measure(args.tp, q, d, args.repeats, args.checkpoint, Path(scratch))
                   for q, d in quants]
    print_table(args.tp, results)
    report = {
        "benchmark": "bench_build", "tp": args.tp, "repeats": args.repeats,
        "checkpoint": args.checkpoint or "default (SmolLM2-135M-Instruct GGUF)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_at_start": load,
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    plot(out.with_suffix(".png"), args.tp, results)
    if not all(r["identical_engines"] for r in results):
        raise SystemExit("the two ways built different engines")


if __name__ == "__main__":
    main()
