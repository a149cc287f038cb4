"""The weight-only GEMVs and torch's bf16 matmul, one launch each, for Nsight Compute.

    ncu --clock-control none --nvtx --nvtx-include "prof/" --section SpeedOfLight ... \
        python benchmarks/ncu_wo_kernels.py [--shape 7b-qkv-tp1] [--cases int4_wo:fma:1,...]
    python benchmarks/ncu_wo_kernels.py --summarize LOG...  # ncu reports (or .gz): table, JSON

(tests/gpu/run_on_device.sh's ncu_wo stage runs the first with the sections and metrics the
summary reads.)
Each case (scheme:kernel:M; scheme bf16 for `x @ W.T`; kernel tiles/RT.KW.RW.U for int4 per
channel: the tiled GEMV at that shape) is warmed up (compiled) outside, then
launched once inside an NVTX range "prof", so ncu profiles exactly the cases' kernels (and the
split-K reduce where there is one). Before each launch the case's label is printed and
flushed, so it heads ncu's report of the kernels that follow. Counters say what time alone
cannot: DRAM throughput against its peak, instructions issued, warps resident, stall reasons.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int4_tiles import tiles_call  # noqa: E402
from bench_wo_kernels import DTYPE, SCHEMES, SHAPES, cuda_calls  # noqa: E402

from tpquant.kernels.tiles import tile  # noqa: E402

CASES = ("bf16::1,bf16::16,int4_wo:fma:1,int4_wo:mma:1,int4_wo:mma:8,int4_wo:mma:16,"
         "int8_wo:fma:1,int8_wo:mma:8,int4_gw:fma:1,int4_gw:mma:16")


# ncu's report lines the summary keeps: (line start, key); values are the line's last word.
FIELDS = (("Duration", "us"), ("DRAM Throughput", "dram_pct"), ("Registers Per Thread", "regs"),
          ("Achieved Active Warps Per SM", "warps"),
          ("Theoretical Active Warps per SM", "warps_max"),
          ("Issued Warp Per Scheduler", "issue"),
          ("Warp Cycles Per Issued Instruction", "cycles_per_issue"), ("Grid Size", "grid"))
STALL = re.compile(
    r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio\s+\S+\s+([\d.]+)")


def summarize(path: Path) -> list[dict]:
    """One row per profiled kernel: its case, the FIELDS, instructions, DRAM bytes read and
    the three largest stall reasons (cycles per issued instruction)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        text = f.read().splitlines()
    cases, case = [], None  # the case of each profiled kernel, in profiling order
    for line in text:
        if line.startswith("### case"):
            case = line.split()[-1]
        elif line.startswith("==PROF== Profiling"):
            cases.append(case)
    rows: list[dict] = []
    for line in text:
        head = re.match(r"  (\S[^(]*)", line)
        if head and re.search(r"\(\d+, \d+, \d+\)x\(", line):
            rows.append(dict(case=cases[len(rows)], kernel=head.group(1).strip(), stalls={}))
            continue
        if not rows:
            continue
        row, body = rows[-1], line.strip()
        for start, key in FIELDS:
            if body.startswith(start + " "):
                row[key] = float(body.split()[-1].replace(",", ""))
        if body.startswith("smsp__inst_executed.sum "):
            row["warp_instructions"] = int(body.split()[-1].replace(",", ""))
        if body.startswith("dram__bytes_read.sum "):
            unit, value = body.split()[-2:]
            row["dram_read_MB"] = float(value.replace(",", "")) * {"Kbyte": 1e-3, "Mbyte": 1,
                                                                   "Gbyte": 1e3}.get(unit, 1e-6)
        stall = STALL.match(body)
        if stall:
            row["stalls"][stall.group(1)] = float(stall.group(2))
    for row in rows:
        top = sorted(row.pop("stalls").items(), key=lambda kv: -kv[1])[:3]
        row["top_stalls"] = {k: v for k, v in top}
    return rows


def print_summary(logs: list[str]) -> None:
    result = {}
    for log in logs:
        rows = summarize(Path(log))
        result[Path(log).name.split(".")[0]] = rows
        print(f"# {log}")
        print(f"{'case':<16} {'kernel':<28} {'us':>6} {'DRAM%':>6} {'regs':>4} {'warps':>9} "
              f"{'issue':>5} {'Minst':>6}  top stalls (cycles per issued instruction)")
        for r in rows:
            stalls = " ".join(f"{k}={v:.1f}" for k, v in r["top_stalls"].items())
            print(f"{r['case']:<16} {r['kernel'][:28]:<28} {r.get('us', 0):>6.1f} "
                  f"{r.get('dram_pct', 0):>6.1f} {r.get('regs', 0):>4.0f} "
                  f"{r.get('warps', 0):>4.1f}/{r.get('warps_max', 0):<4.0f} "
                  f"{r.get('issue', 0):>5.2f} "
                  f"{r.get('warp_instructions', 0) / 1e6:>6.2f}  {stalls}")
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ncu_wo_kernels.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b-qkv-tp1", choices=sorted(SHAPES))
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--summarize", nargs="+", metavar="LOG",
                        help="print and save ($OUT/ncu_wo_kernels.json) the ncu reports' summary")
    args = parser.parse_args()
    if args.summarize:
        print_summary(args.summarize)
        return
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(0)
    n, k = SHAPES[args.shape]
    weight = torch.randn(n, k, generator=gen, device=device, dtype=DTYPE) * 0.02
    quantized = {name: scheme.quantize(weight) for name, scheme in SCHEMES.items()}
    for case in args.cases.split(","):
        scheme_name, kernel, m = case.split(":")
        x = torch.randn(int(m), k, generator=gen, device=device, dtype=DTYPE)
        if scheme_name == "bf16":
            call = lambda: x @ weight.t()  # noqa: E731
        elif kernel.startswith("tiles/"):
            t = quantized["int4_wo"]
            shape = tuple(int(v) for v in kernel.split("/")[1].split("."))  # tiles/RT.KW.RW.U
            call = tiles_call(x, [{**t, "qweight": tile(t["qweight"], 4)}], 4, 0, shape)[0]
        else:
            call = cuda_calls(scheme_name, x, [quantized[scheme_name]], None, None, kernel)[0]
        call()
        torch.cuda.synchronize()
        print(f"### case {args.shape} N={n} K={k} {case}", flush=True)
        torch.cuda.nvtx.range_push("prof")
        call()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
