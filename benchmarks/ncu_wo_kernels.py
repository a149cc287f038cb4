"""The weight-only GEMVs and torch's bf16 matmul, one launch each, for Nsight Compute.

    ncu --clock-control none --nvtx --nvtx-include "prof/" --section SpeedOfLight ... \
        python benchmarks/ncu_wo_kernels.py [--shape 7b-qkv-tp1] [--cases int4_wo:fma:1,...]

Each case (scheme:kernel:M; scheme bf16 for `x @ W.T`) is warmed up (compiled) outside, then
launched once inside an NVTX range "prof", so ncu profiles exactly the cases' kernels (and the
split-K reduce where there is one). Before each launch the case's label is printed and
flushed, so it heads ncu's report of the kernels that follow. Counters say what time alone
cannot: DRAM throughput against its peak, instructions issued, warps resident, stall reasons.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_wo_kernels import DTYPE, SCHEMES, SHAPES, cuda_calls  # noqa: E402

CASES = ("bf16::1,bf16::16,int4_wo:fma:1,int4_wo:mma:1,int4_wo:mma:8,int4_wo:mma:16,"
         "int8_wo:fma:1,int8_wo:mma:8,int4_gw:fma:1,int4_gw:mma:16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b-qkv-tp1", choices=sorted(SHAPES))
    parser.add_argument("--cases", default=CASES)
    args = parser.parse_args()
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
