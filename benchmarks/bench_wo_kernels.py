"""The weight-only kernel paths, each forced, against torch's bf16 matmul on one GPU.

    python benchmarks/bench_wo_kernels.py            # shapes x M x scheme x path, then sweeps
    python benchmarks/bench_wo_kernels.py --no-sweep --budget 200

A micro-benchmark for tuning tpquant.kernels.triton_weight_only (bench_gemm.py measures the
schemes end to end). For each shape [N, K] (Llama-2-7B TP 1/2, Llama-2-70B TP 4) and M: bf16
`x @ W.T`, then int4_wo, int4_gw (g128, zeros) and int8_wo through every path: auto (the
dispatch), cuda (M <= 32; cuda-fma / cuda-mma force one of its two kernels), gemv, dot,
dequant, and for int4 torch's tinygemm (`torch._weight_int4pack_mm`, bfloat16; the weight
converted once to its layout, scale/zero as [K/g, N, 2] bfloat16, per channel as groups of
128 sharing a scale). Each result's max |y - ref| / max |ref| against float32 math on the
torch reference's dequantized weight is reported ("err").
Then sweeps (unless --no-sweep): the CUDA GEMV's split-K at M = 1, 4, 16 (--sweep-paths
cuda, the default: the fma kernel's rows per warp; cuda-mma: the mma kernel), or explicit
Triton gemv / dot configs x split-K (--sweep-paths gemv,dot),
to show what the heuristics leave on the table.

Timing: bench_gemm's time_calls (CUDA graph of R calls cycling through weight copies that
together exceed twice the L2, median over replays). GB/s counts weight + x + y bytes; %copy
is that over the device copy bandwidth (read + write, 1 GiB copies).
Output: table on stdout, $OUT/bench_wo_kernels.json (rewritten after every shape, so a run
cut short keeps what it measured); $OUT defaults to /tmp/out.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import copies, copy_bandwidth, nbytes, time_calls  # noqa: E402

from tpquant.kernels import cuda_weight_only as cw  # noqa: E402
from tpquant.kernels import triton_weight_only as tw  # noqa: E402
from tpquant.kernels import weight_only as ref  # noqa: E402
from tpquant.quantization.schemes import Groupwise, WeightOnly  # noqa: E402

DTYPE = torch.bfloat16
SHAPES = {  # name: (N, K)
    "7b-qkv-tp1": (12288, 4096),
    "7b-o-tp1": (4096, 4096),
    "7b-gate_up-tp1": (22016, 4096),
    "7b-down-tp1": (4096, 11008),
    "7b-qkv-tp2": (6144, 4096),
    "7b-o-tp2": (4096, 2048),
    "7b-gate_up-tp2": (11008, 4096),
    "7b-down-tp2": (4096, 5504),
    "70b-gate_up-tp4": (14336, 8192),
}
MS = (1, 4, 16, 64, 256, 1024)
SCHEMES = {
    "int4_wo": WeightOnly(bits=4, dtype=DTYPE),
    "int4_gw": Groupwise(group_size=128, zeros=True, dtype=DTYPE),
    "int8_wo": WeightOnly(bits=8, dtype=DTYPE),
}
PATHS = ("auto", "cuda", "cuda-fma", "cuda-mma", "gemv", "dot", "dequant", "tinygemm")
TINYGEMM_GROUP = 128


# -- torch's tinygemm int4 kernel, fed from the stored layouts ------------------------------------


def tinygemm_weights(scheme, t: dict[str, torch.Tensor], inner_k_tiles: int = 8):
    """(packed weight, scale-and-zero [K/g, N, 2] bf16, g) for torch._weight_int4pack_mm.

    tinygemm computes W = (u - 8) * scale + zero from unsigned codes u (high nibble = even k).
    Signed per-channel q: u = q + 8, zero 0, the channel scale repeated over groups of 128;
    groupwise (u - z) * s: zero = (8 - z) * s.
    """
    qw = t["qweight"]
    lo, hi = qw & 0xF, qw >> 4
    if isinstance(scheme, WeightOnly):
        lo, hi = lo ^ 8, hi ^ 8
        n, k = qw.shape[0], 2 * qw.shape[1]
        group = TINYGEMM_GROUP
        scale = t["scale"].float()[None, :].expand(k // group, n)
        zero = torch.zeros_like(scale)
    else:
        group = scheme.group_size
        scale = t["scales"].float()
        zero = (8 - t["zeros"].float()) * scale if "zeros" in t else torch.zeros_like(scale)
    packed = ((lo << 4) | hi).contiguous()
    w = torch._convert_weight_to_int4pack(packed, inner_k_tiles)
    sz = torch.stack([scale, zero], dim=-1).to(torch.bfloat16).contiguous()
    return w, sz, group


# -- one measurement --------------------------------------------------------------------------------


def make_calls(scheme_name: str, path: str, x: torch.Tensor, sets: list[dict],
               config: dict | None = None, split_k: int | None = None) -> list[Callable]:
    scheme = SCHEMES[scheme_name]
    if path.startswith("cuda-"):  # cuda-fma / cuda-mma: one CUDA kernel, forced
        return cuda_calls(scheme_name, x, sets, None, split_k, path.removeprefix("cuda-"))
    if path == "tinygemm":
        tiny = [tinygemm_weights(scheme, t) for t in sets]
        return [lambda w=w, sz=sz, g=g: torch._weight_int4pack_mm(x, w, g, sz)
                for w, sz, g in tiny]
    kw = dict(path=None if path == "auto" else path, config=config, split_k=split_k)
    if isinstance(scheme, WeightOnly):
        return [lambda t=t: tw.weight_only_matmul(x, t["qweight"], t["scale"], scheme.bits,
                                                  **kw) for t in sets]
    return [lambda t=t: tw.groupwise_matmul(x, t["qweight"], t["scales"], t.get("zeros"),
                                            scheme.group_size, t.get("pre_quant_scale"), **kw)
            for t in sets]


def cuda_calls(scheme_name: str, x: torch.Tensor, sets: list[dict], rows: int | None,
               split: int | None, kernel: str | None = None) -> list[Callable]:
    """The CUDA GEMV with forced rows per warp (fma), split-K and kernel (None: the
    heuristics')."""
    scheme = SCHEMES[scheme_name]
    n = sets[0]["qweight"].shape[0]
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if isinstance(scheme, WeightOnly):
        args = [(t["qweight"], t["scale"], None, None, scheme.bits, 0) for t in sets]
    else:
        args = [(t["qweight"], t["scales"], t.get("zeros"), t.get("pre_quant_scale"), 4,
                 scheme.group_size) for t in sets]
    def call(a: tuple) -> torch.Tensor:
        cw.gemv(x, *a, None, out, splits=split, rows=rows, kernel=kernel)
        return out

    return [lambda a=a: call(a) for a in args]


def reference(scheme_name: str, t: dict, x: torch.Tensor) -> torch.Tensor:
    scheme = SCHEMES[scheme_name]
    if isinstance(scheme, WeightOnly):
        w = ref.dequantize_weight_only(t["qweight"], t["scale"], scheme.bits)
    else:
        w = ref.dequantize_groupwise(t["qweight"], t["scales"], t.get("zeros"), scheme.group_size)
    return x.float() @ w.t()


def rel_err(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.float() - expected).abs().max() / expected.abs().max()).item()


def best_config(path: str) -> str:
    kernel = {"gemv": tw._gemv_tuned, "dot": tw._dot_tuned}.get(path)
    cfg = getattr(kernel, "best_config", None)
    return "" if cfg is None else str(cfg)


# -- the run ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    copy_bw = copy_bandwidth(device, 5)
    started = time.perf_counter()
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": props.name, "copy_bandwidth_GBps": copy_bw / 1e9, "rows": [],
              "sweeps": [], "constants": {"GEMV_MAX_M": tw.GEMV_MAX_M, "DOT_MAX_M": tw.DOT_MAX_M}}
    print(f"# {props.name}, copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    head = (f"{'shape':<16} {'N':>6} {'K':>6} {'M':>5} {'variant':<20} {'us':>8} {'GB/s':>6} "
            f"{'x bf16':>6} {'%copy':>6} {'err':>8}  config")
    print(head)
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = [s for s in args.shapes.split(",")]
    ms = [int(m) for m in args.ms.split(",")]

    def save() -> None:
        (out_dir / "bench_wo_kernels.json").write_text(json.dumps(result, indent=1))

    for shape_name in shapes:
        if time.perf_counter() - started > args.budget:
            print(f"# budget of {args.budget} s spent: skipping {shape_name} on")
            break
        n, k = SHAPES[shape_name]
        weight = torch.randn(n, k, generator=gen, device=device, dtype=DTYPE) * 0.02
        bf16_sets = [t["w"] for t in copies({"w": weight}, l2)]
        qsets = {name: copies(s.quantize(weight), l2) for name, s in SCHEMES.items()}
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=device, dtype=DTYPE)
            base = time_calls([lambda w=w: x @ w.t() for w in bf16_sets], args.replays)
            rows = [("bf16", base, 2 * n * k, 0.0, "")]
            for scheme_name, sets in qsets.items():
                expected = reference(scheme_name, sets[0], x)
                for path in args.paths.split(","):
                    if path == "tinygemm" and scheme_name == "int8_wo":
                        continue
                    if path in ("gemv", "cuda-fma") and m > cw.M_TILES[-1] or (
                            path in ("cuda", "cuda-mma") and m > cw.MAX_M):
                        continue  # CUDA-core FMAs: hopeless past a few rows
                    if path == "cuda-mma" and not cw.mma_takes(
                            getattr(SCHEMES[scheme_name], "bits", 4),
                            getattr(SCHEMES[scheme_name], "group_size", 0)):
                        continue
                    label = f"{scheme_name}[{path}]"
                    try:
                        calls = make_calls(scheme_name, path, x, sets)
                        err = rel_err(calls[0](), expected)
                        sec = time_calls(calls, args.replays)
                        rows.append((label, sec, nbytes(sets[0]), err, best_config(path)))
                    except Exception as exc:  # noqa: BLE001 - report, go on
                        torch.cuda.synchronize()
                        print(f"# {shape_name} M={m} {label}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:150]}")
            for label, sec, wbytes, err, cfg in rows:
                total = wbytes + 2 * m * k + 2 * m * n
                row = dict(shape=shape_name, n=n, k=k, m=m, variant=label, us=sec * 1e6,
                           gbps=total / sec / 1e9, speedup=base / sec,
                           pct_copy=100 * total / sec / copy_bw, err=err, config=cfg)
                result["rows"].append(row)
                print(f"{shape_name:<16} {n:>6} {k:>6} {m:>5} {label:<20} {sec * 1e6:>8.1f} "
                      f"{row['gbps']:>6.0f} {row['speedup']:>6.2f} {row['pct_copy']:>6.1f} "
                      f"{err:>8.1e}  {cfg}")
        save()
        del bf16_sets, qsets
        torch.cuda.empty_cache()

    if args.sweep:
        sweep(args, result, gen, l2, copy_bw, started)
        summarize_cuda_sweep(result)
    summarize(result)
    save()
    return result


SWEEP_GEMV = [  # BLOCK_N, BLOCK_K, warps, stages
    (bn, bk, w, st) for bn in (16, 32, 64, 128) for bk in (256, 512, 1024) for w in (4, 8)
    for st in (2,) if bn * bk <= 65536
]
SWEEP_DOT = [  # BLOCK_N, BLOCK_K, warps, stages, swap
    (bn, bk, w, st, sw) for bn in (32, 64, 128) for bk in (128, 256, 512) for w in (4, 8)
    for st in (3, 4) for sw in (True,)
]
SPLITS = (1, 2, 4, 8, 16)
CUDA_ROWS = (1, 2, 4)


def sweep(args, result, gen, l2, copy_bw, started) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    print("# sweeps: explicit configs (us, x bf16)")
    for shape_name in args.sweep_shapes.split(","):
        n, k = SHAPES[shape_name]
        weight = torch.randn(n, k, generator=gen, device=device, dtype=DTYPE) * 0.02
        bf16_sets = [t["w"] for t in copies({"w": weight}, l2)]
        for scheme_name in args.sweep_schemes.split(","):
            sets = copies(SCHEMES[scheme_name].quantize(weight), l2)
            for m in [int(v) for v in args.sweep_ms.split(",")]:
                if time.perf_counter() - started > args.budget + args.sweep_budget:
                    print("# sweep budget spent")
                    return
                x = torch.randn(m, k, generator=gen, device=device, dtype=DTYPE)
                base = time_calls([lambda w=w: x @ w.t() for w in bf16_sets], args.replays)
                expected = reference(scheme_name, sets[0], x)
                paths = args.sweep_paths.split(",")
                tries = [("cuda", rows) for rows in CUDA_ROWS
                         if "cuda" in paths and m <= cw.M_TILES[-1]]
                if "cuda-mma" in paths and m <= cw.MAX_M:
                    tries.append(("cuda-mma", None))
                if "gemv" in paths and m <= 1:
                    tries += [("gemv", dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st))
                              for bn, bk, w, st in SWEEP_GEMV]
                if "dot" in paths:
                    tries += [("dot", dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=w,
                                           num_stages=st, SWAP=sw))
                              for bn, bk, w, st, sw in SWEEP_DOT]
                found = []
                for path, cfg in tries:
                    for split in ((None, *SPLITS) if path.startswith("cuda") else SPLITS):
                        try:
                            if path == "cuda":
                                calls = cuda_calls(scheme_name, x, sets, cfg, split, "fma")
                            elif path == "cuda-mma":
                                calls = cuda_calls(scheme_name, x, sets, None, split, "mma")
                            else:
                                calls = make_calls(scheme_name, path, x, sets, cfg, split)
                            err = rel_err(calls[0](), expected)
                            sec = time_calls(calls, 3)
                        except Exception as exc:  # noqa: BLE001
                            torch.cuda.synchronize()
                            print(f"# sweep {path} {cfg} {split}: {type(exc).__name__}")
                            continue
                        total = nbytes(sets[0]) + 2 * m * (k + n)
                        found.append(dict(shape=shape_name, scheme=scheme_name, m=m, path=path,
                                          config=cfg, split=split, us=sec * 1e6,
                                          speedup=base / sec, err=err,
                                          pct_copy=100 * total / sec / copy_bw))
                found.sort(key=lambda r: r["us"])
                result["sweeps"] += found
                for r in found[:4]:
                    print(f"{shape_name:<16} {scheme_name:<8} M={m:<3} {r['path']:<5} "
                          f"split={r['split']} {r['us']:8.1f} us {r['speedup']:5.2f}x "
                          f"{r['pct_copy']:5.1f}% err {r['err']:.1e}  {r['config']}")
        del bf16_sets
        torch.cuda.empty_cache()


def summarize_cuda_sweep(result: dict) -> None:
    """Per M and rows per warp of the CUDA GEMV: geomean speed-up over shapes and schemes,
    with the heuristic's split ("auto") and with the best split of each case."""
    cases: dict[tuple, dict] = {}
    for r in result["sweeps"]:
        if not r["path"].startswith("cuda"):
            continue
        key = (r["m"], f"fma rows={r['config']}" if r["path"] == "cuda" else "mma")
        case = cases.setdefault(key, {})
        slot = case.setdefault((r["shape"], r["scheme"]), {})
        slot[r["split"]] = r["speedup"]
    if not cases:
        return
    print("# CUDA GEMV, fma rows per warp or mma: geomean x bf16 over shapes x schemes "
          "(auto split | best)")
    table = []
    for (m, rows), case in sorted(cases.items()):
        auto = [v[None] for v in case.values() if None in v]
        best = [max(v.values()) for v in case.values()]
        row = dict(m=m, rows=rows, auto=statistics.geometric_mean(auto) if auto else None,
                   best=statistics.geometric_mean(best), cases=len(best))
        table.append(row)
        print(f"M={m:<3} {rows:<10}  auto {row['auto'] or 0:5.2f}  "
              f"best {row['best']:5.2f}  ({len(best)} cases)")
    result["cuda_rows"] = table


def summarize(result: dict) -> None:
    """Geometric mean speed-up over shapes, per variant and M."""
    by: dict[tuple[str, int], list[float]] = {}
    for r in result["rows"]:
        by.setdefault((r["variant"], r["m"]), []).append(r["speedup"])
    variants = sorted({v for v, _ in by})
    ms = sorted({m for _, m in by})
    print("# geomean speed-up over bf16 (shapes measured)")
    print(f"{'variant':<20} " + " ".join(f"{m:>6}" for m in ms))
    summary = {}
    for v in variants:
        vals = [statistics.geometric_mean(by[(v, m)]) if (v, m) in by else float("nan")
                for m in ms]
        summary[v] = dict(zip(ms, vals))
        print(f"{v:<20} " + " ".join(f"{x:>6.2f}" for x in vals))
    result["geomean"] = {v: {str(m): x for m, x in d.items()} for v, d in summary.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="7b-qkv-tp1,7b-o-tp1,7b-down-tp2")
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated, among " + ",".join(PATHS))
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--budget", type=float, default=150, help="seconds for the main table")
    p.add_argument("--no-sweep", dest="sweep", action="store_false")
    p.add_argument("--sweep-shapes", default="7b-qkv-tp1,7b-down-tp2")
    p.add_argument("--sweep-schemes", default="int4_wo,int8_wo,int4_gw")
    p.add_argument("--sweep-paths", default="cuda",
                   help="cuda, cuda-mma, gemv, dot (comma-separated)")
    p.add_argument("--sweep-ms", default="1,4,16")
    p.add_argument("--sweep-budget", type=float, default=80)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_wo_kernels needs a CUDA device")
    run(args)


if __name__ == "__main__":
    main()
