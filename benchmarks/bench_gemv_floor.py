"""What bounds the small-M linears: each call's fixed cost, its streaming rate, and weights in L2.

    python benchmarks/bench_gemv_floor.py                  # M = 1 and 16
    python benchmarks/bench_gemv_floor.py --ms 1,4,16 --ns 4096

1. For bf16 (torch's `x @ W.T`) and each weight-only scheme (int8_wo, int4_wo, int4_gw: the
   layer's own call, `Scheme.forward` on the packed tensors, so the tiled GEMV with its shape
   table), at each M: K is swept at fixed N, timed as bench_gemm times (CUDA graph of
   back-to-back calls, weight copies past twice the L2, median), and a least-squares line
   time = fixed + bytes / rate is fitted over every (N, K). `fixed` is what a call costs beyond
   streaming its weight (launch, the wait for the kernel before, latencies, the last wave);
   `rate` is the streaming rate once the weight is large.
2. The ceiling that line puts on bench_gemm's figure: bf16 and each scheme are timed on
   bench_gemm's shapes (its models at TP 1, 2, 4, per rank; as there, without the one whose K
   int4_gw cannot group), and the geomean of bf16's time over the scheme's fitted time there is
   set beside the measured geomean. A measured geomean near the ceiling is bound by the
   scheme's fixed cost; one far below it, by the kernel's rate at that M.
3. The same weight repeated (it stays in L2) against streamed copies, for weights of at most
   half the L2: if the L2-resident call is not much faster, memory latency is not what bounds
   the kernel.

Output: a table on stdout and $OUT/bench_gemv_floor.json ($OUT defaults to /tmp/out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import (  # noqa: E402
    DTYPE, MODELS, TPS, _geomean, copies, copy_bandwidth, linear_shapes, quantized, time_calls,
)

SCHEMES = ("bf16", "int8_wo", "int4_wo", "int4_gw")
GROUP = 128  # int4_gw's group, as bench_gemm quantizes it
NS = (4096, 12288)
KS = (512, 1024, 2048, 4096, 8192)
L2_SHAPES = ((4096, 4096), (12288, 4096))


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(fixed seconds, bytes per second) of the least-squares line seconds = fixed + bytes / rate
    through (bytes, seconds) points (at least two distinct byte counts; time must grow with
    bytes)."""
    if len({b for b, _ in points}) < 2:
        raise ValueError("fit_line needs points at two or more byte counts")
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    slope = (sum((b - mx) * (t - my) for b, t in points)
             / sum((b - mx) ** 2 for b, _ in points))
    if slope <= 0:
        raise ValueError(f"the time does not grow with the bytes (slope {slope:.3g} s/B)")
    return my - slope * mx, 1 / slope


def weight_bytes(scheme: str, n: int, k: int) -> int:
    """Bytes a call reads of an [n, k] weight as bench_gemm stores it: codes and float32
    scales (int4_gw: a scale and a zero per group of GROUP and row), bf16 two a value."""
    if scheme == "bf16":
        return 2 * n * k
    if scheme == "int8_wo":
        return n * k + 4 * n
    if scheme == "int4_wo":
        return n * k // 2 + 4 * n
    if scheme == "int4_gw":
        return n * k // 2 + 2 * 4 * n * (k // GROUP)
    raise ValueError(f"unknown scheme {scheme!r}")


def ceiling(scheme: str, fit: tuple[float, float],
            bf16_seconds: dict[tuple[int, int], float]) -> float:
    """Geomean over the shapes (N, K) of bf16_seconds of bf16's time over the scheme's time as
    `fit` (fixed seconds, bytes per second) puts it."""
    fixed, rate = fit
    return _geomean([sec / (fixed + weight_bytes(scheme, n, k) / rate)
                     for (n, k), sec in bf16_seconds.items()])


def bench_shapes() -> list[tuple[int, int]]:
    """bench_gemm's distinct (N, K) per rank (its models at TP 1, 2, 4) that every scheme can
    store: bench_gemm leaves out a shape whose K int4_gw cannot group (Llama-2-7B's down at
    TP 4)."""
    shapes = [(s.n, s.k) for m in MODELS for tp in TPS for s in linear_shapes(m, tp)]
    return [(n, k) for n, k in dict.fromkeys(shapes) if k % GROUP == 0]


def weight_sets(weight: torch.Tensor, schemes: Sequence[str],
                l2_bytes: int) -> dict[str, tuple[object, list[dict[str, torch.Tensor]]]]:
    """For each scheme, its layer scheme (None for bf16) and copies of the stored weight past
    twice the L2 (bench_gemm's `quantized` and `copies`)."""
    stored = quantized(weight)
    return {s: (None, copies({"w": weight}, l2_bytes)) if s == "bf16"
            else (stored[s][0], copies(stored[s][1], l2_bytes)) for s in schemes}


def time_sets(x: torch.Tensor, scheme: object, sets: list[dict[str, torch.Tensor]],
              replays: int) -> float:
    """Median seconds a call, cycling through every copy (bench_gemm's timing)."""
    if scheme is None:
        calls = [lambda w=t["w"]: x @ w.t() for t in sets]
    else:
        calls = [lambda t=t: scheme.forward(x, t) for t in sets]
    return time_calls(calls, replays)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=_ints, default=[1, 16])
    ap.add_argument("--ns", type=_ints, default=list(NS))
    ap.add_argument("--ks", type=_ints, default=list(KS))
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args(argv)
    schemes = args.schemes.split(",")
    if "bf16" not in schemes or any(s not in SCHEMES for s in schemes):
        ap.error(f"--schemes: bf16 and any of {SCHEMES}")
    ms, ns, ks = args.ms, args.ns, args.ks
    if len(set(ns)) * len(set(ks)) < 2:
        ap.error("--ns / --ks: the fit needs two or more weight sizes")
    if any(k % GROUP for k in ks):
        ap.error(f"--ks: multiples of {GROUP} (bench_gemm quantizes int4_gw in groups of it)")
    if not torch.cuda.is_available():
        print("bench_gemv_floor.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    copy_bw = copy_bandwidth(device)
    print(f"# {props.name}, L2 {l2 >> 20} MiB, copy bandwidth {copy_bw / 1e9:.0f} GB/s")

    sweep, l2_rows = [], []
    for n in ns:
        for k in ks:
            weight = torch.randn(n, k, generator=gen, device=device, dtype=DTYPE) * 0.02
            sets = weight_sets(weight, schemes, l2)
            for m in ms:
                x = torch.randn(m, k, generator=gen, device=device, dtype=DTYPE)
                for s in schemes:
                    scheme, copies_ = sets[s]
                    sec = time_sets(x, scheme, copies_, args.replays)
                    sweep.append(dict(scheme=s, m=m, n=n, k=k, bytes=weight_bytes(s, n, k),
                                      us=sec * 1e6))
                    print(f"{s:<8} M {m:>3} N {n:>6} K {k:>6} {sec * 1e6:9.2f} us", flush=True)
                    if (n, k) in L2_SHAPES and weight_bytes(s, n, k) <= l2 // 2:
                        hot = time_sets(x, scheme, copies_[:1], args.replays)
                        l2_rows.append(dict(scheme=s, m=m, n=n, k=k, streamed_us=sec * 1e6,
                                            l2_us=hot * 1e6))
            del weight, sets
            torch.cuda.empty_cache()

    # every scheme on bench_gemm's shapes, as bench_gemm times them
    bench = {m: {s: {} for s in schemes} for m in ms}
    for n, k in bench_shapes():
        weight = torch.randn(n, k, generator=gen, device=device, dtype=DTYPE) * 0.02
        sets = weight_sets(weight, schemes, l2)
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=device, dtype=DTYPE)
            for s in schemes:
                bench[m][s][(n, k)] = time_sets(x, *sets[s], args.replays)
        del weight, sets
        torch.cuda.empty_cache()
    result = dict(device=props.name, l2_bytes=l2, copy_bandwidth=copy_bw, sweep=sweep, l2=l2_rows,
                  shapes_us={m: {s: [dict(n=n, k=k, us=t * 1e6) for (n, k), t in v.items()]
                                 for s, v in by.items()} for m, by in bench.items()})
    path = out_dir / "bench_gemv_floor.json"
    path.write_text(json.dumps(result, indent=1))  # the timings, before anything is fitted

    fits = []
    print(f"\n{'scheme':<8} {'M':>3} {'fixed us':>9} {'TB/s':>6} {'% copy':>7} {'ceiling':>8} "
          f"{'measured':>9}   (x bf16, geomean of {len(bench_shapes())} shapes)")
    for m in ms:
        for s in schemes:
            fixed, rate = fit_line([(r["bytes"], r["us"] / 1e6) for r in sweep
                                    if r["scheme"] == s and r["m"] == m])
            b16 = bench[m]["bf16"]
            top = None if s == "bf16" else ceiling(s, (fixed, rate), b16)
            got = None if s == "bf16" else _geomean([b16[nk] / t for nk, t in bench[m][s].items()])
            fits.append(dict(scheme=s, m=m, fixed_us=fixed * 1e6, rate_tbs=rate / 1e12,
                             ceiling=top, measured=got))
            print(f"{s:<8} {m:>3} {fixed * 1e6:>9.2f} {rate / 1e12:>6.2f} "
                  f"{100 * rate / copy_bw:>6.0f}% " + (f"{top:>7.2f}x {got:>8.2f}x" if top else ""))
    print("\n# weights in L2 (the same weight repeated) against streamed copies:")
    for r in l2_rows:
        print(f"{r['scheme']:<8} M {r['m']:>3} N {r['n']:>6} K {r['k']:>6}: streamed "
              f"{r['streamed_us']:.2f} us, in L2 {r['l2_us']:.2f} us "
              f"({r['streamed_us'] / r['l2_us']:.2f}x)")
    path.write_text(json.dumps(dict(result, fits=fits), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
