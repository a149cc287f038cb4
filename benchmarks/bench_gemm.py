"""Quantized linears against torch's bf16 matmul on one GPU, at the per-rank shapes of TP.

    python benchmarks/bench_gemm.py              # Llama-2-7B, Llama-3-8B, Llama-2-70B at TP 1, 2, 4
    python benchmarks/bench_gemm.py --quick      # Llama-2-7B at TP 1 and 2, fewer repetitions
    python benchmarks/bench_gemm.py --paths      # also every forced dispatch path of each scheme
    python benchmarks/bench_gemm.py --quick --paths dequant,cutlass --ms 64,256   # some of them

Shapes: per rank, fused q/k/v and gate/up (column-parallel: out / TP), o and down (row-parallel:
in / TP), tokens M in {1, 4, 16, 64, 256, 1024, 4096}. Schemes, each through Scheme.forward on
CUDA with bfloat16 activations, on the tensors a layer keeps (`Scheme.pack`: int4_wo in the
tiled layout, whose forced paths other than cuda and dequant untile it first): int8_wo,
int4_wo, int4_gw (g128, zeros), w8a8_gemm (per-token
x per-channel W8A8 with the input already int8, as after the SmoothQuant RMSNorm) and w8a8
(the same with the per-token activation quantization included), against bf16 = `x @ W.T` in
the same run. Random weights are generated and quantized on the GPU.

Timing: each op is captured R times in a CUDA graph, cycling through enough copies of the
weights that their total is at least twice the L2 cache (every call streams its weights from
HBM); R is as many calls as take about a millisecond (3 to 50; 20 with --quick) as a graph of 3
times them, and at least one per copy. The median over replays, divided by R, is the time per
call. Effective GB/s counts every stored weight tensor plus the activation
read and the output written; TFLOP/s is 2 M N K / time; speed-up is bf16 time / scheme time.
The device copy bandwidth (median of 1 GiB device-to-device copies launched directly, not
from a graph; counting read + write: `copy_bandwidth`) is measured once; the int4 schemes'
GB/s is reported as a percentage of it.

Output: a table on stdout (and $OUT/bench_gemm.txt), $OUT/bench_gemm.json, and
$OUT/bench_gemm.png (speed-up vs M per scheme, geometric mean over shapes) when matplotlib
imports; $OUT defaults to /tmp/out. A failing measurement is reported in the table and the
run goes on. Summary lines evaluate the issue's targets (W8A8 GEMM >= 1.5x bf16 at M >= 1024;
no scheme more than 10% slower than bf16 at any M).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from plotting import pyplot  # benchmarks/, on sys.path when run as a script

from tpquant.kernels import w8a8 as w8a8_kernels
from tpquant.quantization.schemes import Groupwise, SmoothQuant, WeightOnly

DTYPE = torch.bfloat16
MS = (1, 4, 16, 64, 256, 1024, 4096)
TPS = (1, 2, 4)
SCHEMES = ("int8_wo", "int4_wo", "int4_gw", "w8a8_gemm", "w8a8")
INT4_SCHEMES = ("int4_wo", "int4_gw")
TARGET_W8A8_SPEEDUP = 1.5  # at M >= TARGET_W8A8_MIN_M
TARGET_W8A8_MIN_M = 1024
TARGET_MIN_SPEEDUP = 0.9  # no scheme more than 10% slower than bf16
REPLAY_SECONDS = 1e-3  # aim per graph replay
MAX_WEIGHT_COPIES = 64


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int = 128


MODELS = (
    Model("llama2-7b", 4096, 11008, 32, 32),
    Model("llama3-8b", 4096, 14336, 32, 8),
    Model("llama2-70b", 8192, 28672, 64, 8),
)


@dataclass(frozen=True)
class Shape:
    model: str
    tp: int
    layer: str
    n: int  # out features on this rank
    k: int  # in features on this rank


def linear_shapes(model: Model, tp: int) -> list[Shape]:
    """The four linears of one layer as one rank of `tp` holds them."""
    kv_per_rank = max(model.kv_heads // tp, 1)  # KV heads replicate when tp > kv_heads
    qkv = (model.heads // tp + 2 * kv_per_rank) * model.head_dim
    return [
        Shape(model.name, tp, "qkv", qkv, model.hidden),
        Shape(model.name, tp, "o", model.hidden, model.heads * model.head_dim // tp),
        Shape(model.name, tp, "gate_up", 2 * model.inter // tp, model.hidden),
        Shape(model.name, tp, "down", model.hidden, model.inter // tp),
    ]


# -- timing ----------------------------------------------------------------------------------------


def time_graph(calls: list[Callable[[], object]], reps: int, replays: int) -> float:
    """Median seconds per call: `reps` calls (cycling through `calls`) captured in one CUDA
    graph, replayed `replays` times, each replay timed with CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls[:2]:
            fn()  # warm-up: compile / autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            calls[i % len(calls)]()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    return statistics.median(times)


def time_calls(calls: list[Callable[[], object]], replays: int, max_reps: int = 50) -> float:
    """`time_graph` with as many calls per replay as fill ~REPLAY_SECONDS (3 to max_reps), and
    never fewer than len(calls), so that every weight copy streams. A call's time for that
    comes from a graph of 3: an eager call also times the host's dispatch (100-400 us for a
    Scheme.forward against 2-9 us on the GPU), which left ~6 calls a replay and a share of the
    replay's own launch in every figure (design note 45)."""
    reps = min(max_reps, max(3, math.ceil(REPLAY_SECONDS / time_graph(calls, 3, 1))))
    return time_graph(calls, max(reps, len(calls)), replays)


def event_times(fn: Callable[[], object], reps: int) -> list[float]:
    """Seconds of each of `reps` calls of fn(), launched directly, each timed with CUDA
    events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def copy_bandwidth(device: torch.device, replays: int = 10) -> float:
    """Device copy bandwidth in bytes/s, counting the read and the write (2 x 1 GiB / time):
    the median of `replays` copies launched directly, each timed with CUDA events. Not
    replayed from a CUDA graph: captured, the copy becomes a memcpy node, which ran at 2.7
    TB/s on an H200 where the copy kernel runs at 4.0 (bench_copy.py, docs/benchmarks.md,
    thirteenth session)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(event_times(lambda: dst.copy_(src), max(replays, 5)))
    return 2 * src.numel() / seconds


# -- schemes ---------------------------------------------------------------------------------------


def quantized(weight: torch.Tensor) -> dict[str, tuple[object, dict[str, torch.Tensor]]]:
    """Each scheme and its tensors for one bf16 weight [N, K], quantized on the GPU."""
    out: dict[str, tuple[object, dict[str, torch.Tensor]]] = {}
    makers = {
        "int8_wo": lambda: WeightOnly(bits=8, dtype=DTYPE),
        "int4_wo": lambda: WeightOnly(bits=4, dtype=DTYPE),
        "int4_gw": lambda: Groupwise(group_size=128, zeros=True, dtype=DTYPE),
        "w8a8": lambda: SmoothQuant(per_token=True, per_channel=True, dtype=DTYPE),
    }
    for name, make in makers.items():
        scheme = make()
        out[name] = (scheme, scheme.pack(scheme.quantize(weight)))  # as a layer keeps them
    out["w8a8_gemm"] = out["w8a8"]
    return out


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def copies(tensors: dict[str, torch.Tensor], l2_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Enough copies of the weights that cycling through them never finds one in L2."""
    count = min(MAX_WEIGHT_COPIES, max(1, math.ceil(2 * l2_bytes / max(nbytes(tensors), 1))))
    return [tensors] + [{k: v.clone() for k, v in tensors.items()} for _ in range(count - 1)]


@dataclass(frozen=True)
class Variant:
    """One timed implementation: a scheme, and a forced path or None (automatic dispatch)."""

    scheme: str
    path: str | None = None

    @property
    def label(self) -> str:
        return self.scheme if self.path is None else f"{self.scheme}[{self.path}]"


def variants(paths: str | None) -> list[Variant]:
    """bf16 and every scheme through its dispatch; with paths ("all" or a comma-separated
    list of weight-only path names), also those paths forced (all: the W8A8 GEMM's too)."""
    out = [Variant("bf16")] + [Variant(s) for s in SCHEMES]
    if not paths:
        return out
    try:
        from tpquant.kernels import triton_weight_only

        wo_paths = ("reference", *triton_weight_only.KERNEL_PATHS)
    except Exception as exc:  # noqa: BLE001 - report and time what exists
        print(f"# weight-only paths unavailable ({exc!r}); timing them through dispatch only")
        wo_paths = ()
    if paths != "all":
        wo_paths = tuple(p for p in paths.split(",") if p in wo_paths)
    for scheme in ("int8_wo", "int4_wo", "int4_gw"):
        out += [Variant(scheme, p) for p in wo_paths]
    if paths == "all":
        out += [Variant("w8a8_gemm", p) for p in (w8a8_kernels.TRITON, w8a8_kernels.INT_MM)]
    return out


def make_call(
    variant: Variant,
    x: torch.Tensor,
    qx: w8a8_kernels.QuantizedActivation,
    weights: list | None,
    bf16: list[torch.Tensor],
) -> list[Callable[[], object]]:
    """One zero-argument call per weight copy."""
    if variant.scheme == "bf16":
        return [lambda w=w: x @ w.t() for w in bf16]
    scheme, _ = weights[0]
    tensor_sets = [t for _, t in weights]
    if variant.scheme == "w8a8_gemm":
        if variant.path is None:
            return [lambda t=t: scheme.forward(qx, t) for t in tensor_sets]
        return [
            lambda t=t: w8a8_kernels.w8a8_matmul(
                qx.q, qx.scale, t["qweight"], t["weight_scale"], None, DTYPE, path=variant.path
            )
            for t in tensor_sets
        ]
    return [lambda t=t: scheme.forward(x, t) for t in tensor_sets]


# -- the run ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    l2_bytes = int(getattr(props, "L2_cache_size", 50 << 20))
    replays = 3 if args.quick else 5
    max_reps = 20 if args.quick else 50
    started = time.perf_counter()
    copy_bw = copy_bandwidth(device, replays)
    print(f"# {props.name}, L2 {l2_bytes >> 20} MiB, copy bandwidth {copy_bw / 1e9:.0f} GB/s "
          "(read + write)")

    models = MODELS[:1] if args.quick else MODELS
    tps = (1, 2) if args.quick else TPS
    shapes = [s for m in models for tp in tps for s in linear_shapes(m, tp)]
    rows: list[dict] = []
    header = (f"{'model':<11} {'tp':>2} {'layer':<8} {'N':>6} {'K':>6} {'M':>5} {'scheme':<22} "
              f"{'us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'x bf16':>7} {'%copy':>6}")
    lines = [header]
    print(header)
    env_path = os.environ.get("TPQUANT_WO_PATH")
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        weight = torch.randn(shape.n, shape.k, generator=gen, device=device, dtype=DTYPE) * 0.02
        try:
            schemes = quantized(weight)
        except Exception as exc:  # noqa: BLE001
            print(f"# {shape}: quantization failed: {exc!r}")
            continue
        bf16_copies = [t["w"] for t in copies({"w": weight}, l2_bytes)]
        weight_sets = {
            name: [(scheme, t) for t in copies(tensors, l2_bytes)]
            for name, (scheme, tensors) in schemes.items()
        }
        for m in args.ms:
            x = torch.randn(m, shape.k, generator=gen, device=device, dtype=DTYPE)
            qx = w8a8_kernels.QuantizedActivation(*w8a8_kernels.quantize_per_token(x))
            bf16_seconds = None
            for variant in variants(args.paths):
                if variant.path == w8a8_kernels.INT_MM and not w8a8_kernels.int_mm_supported(
                    m, shape.n, shape.k
                ):
                    continue  # cuBLAS int8 does not take this shape
                row = {**asdict(shape), "m": m, "scheme": variant.label}
                try:
                    if variant.scheme.endswith("_wo") or variant.scheme == "int4_gw":
                        _set_wo_path(variant.path, env_path)
                    wsets = None if variant.scheme == "bf16" else weight_sets[variant.scheme]
                    calls = make_call(variant, x, qx, wsets, bf16_copies)
                    seconds = time_calls(calls, replays, max_reps)
                    w_bytes = 2 * shape.n * shape.k if wsets is None else nbytes(wsets[0][1])
                    x_bytes = m * shape.k * (1 if variant.scheme == "w8a8_gemm" else 2)
                    total = w_bytes + x_bytes + 2 * m * shape.n
                    row.update(seconds=seconds, gbps=total / seconds / 1e9,
                               tflops=2 * m * shape.n * shape.k / seconds / 1e12)
                    if variant.scheme == "bf16":
                        bf16_seconds = seconds
                    if bf16_seconds:
                        row["speedup"] = bf16_seconds / seconds
                    if variant.scheme in INT4_SCHEMES:
                        row["pct_copy"] = 100 * total / seconds / copy_bw
                except Exception as exc:  # noqa: BLE001 - report, go on
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    torch.cuda.synchronize()
                finally:
                    _set_wo_path(None, env_path)
                rows.append(row)
                line = _format(row)
                lines.append(line)
                print(line, flush=True)
            del x, qx
        del weight, schemes, bf16_copies, weight_sets
        torch.cuda.empty_cache()

    elapsed = time.perf_counter() - started
    summary = summarize(rows)
    result = {
        "device": props.name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "l2_bytes": l2_bytes,
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "dtype": str(DTYPE),
        "args": vars(args),
        "elapsed_s": elapsed,
        "rows": rows,
        **summary,
    }
    return {"result": result, "lines": lines}


def _set_wo_path(path: str | None, previous: str | None) -> None:
    # The weight-only kernels read their forced path from the environment at every call.
    if path is not None:
        os.environ["TPQUANT_WO_PATH"] = path
    elif previous is None:
        os.environ.pop("TPQUANT_WO_PATH", None)
    else:
        os.environ["TPQUANT_WO_PATH"] = previous


def _format(row: dict) -> str:
    head = (f"{row['model']:<11} {row['tp']:>2} {row['layer']:<8} {row['n']:>6} {row['k']:>6} "
            f"{row['m']:>5} {row['scheme']:<22} ")
    if "error" in row:
        return head + "ERROR " + row["error"]
    speed = f"{row['speedup']:7.2f}" if "speedup" in row else f"{'-':>7}"
    pct = f"{row['pct_copy']:6.1f}" if "pct_copy" in row else f"{'':>6}"
    return head + (f"{row['seconds'] * 1e6:9.1f} {row['gbps']:7.0f} {row['tflops']:8.1f} "
                   f"{speed} {pct}")


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(rows: list[dict]) -> dict:
    """Geomean speed-up per (scheme, M) over shapes, and the issue targets, pass or fail."""
    labels = sorted({r["scheme"] for r in rows if r["scheme"] != "bf16"})
    ms = sorted({r["m"] for r in rows})  # the run's M (--ms), not only the issue's
    geo: dict[str, dict[int, float]] = {}
    worst: dict[str, dict[int, dict]] = {}
    for label in labels:
        geo[label], worst[label] = {}, {}
        for m in ms:
            ok = [r for r in rows if r["scheme"] == label and r["m"] == m and "speedup" in r]
            if ok:
                geo[label][m] = _geomean([r["speedup"] for r in ok])
                w = min(ok, key=lambda r: r["speedup"])
                worst[label][m] = {k: w[k] for k in ("model", "tp", "layer", "speedup")}
    errors = sum("error" in r for r in rows)
    targets = []
    for label in ("w8a8_gemm", "w8a8"):
        for m in (m for m in ms if m >= TARGET_W8A8_MIN_M):
            g = geo.get(label, {}).get(m)
            if g is None:
                continue
            targets.append({
                "target": f"{label} >= {TARGET_W8A8_SPEEDUP}x bf16 at M={m} (geomean over shapes)",
                "value": g, "worst": worst[label][m],
                # the target is on the GEMM; with quantization it is reported
                "passed": g >= TARGET_W8A8_SPEEDUP if label == "w8a8_gemm" else None,
            })
    for label in (s for s in SCHEMES if s in geo):
        slow = {m: g for m, g in geo[label].items() if g < TARGET_MIN_SPEEDUP}
        lowest_m = min(geo[label], key=geo[label].get) if geo[label] else None
        targets.append({
            "target": f"{label} never slower than {TARGET_MIN_SPEEDUP}x bf16 (geomean per M)",
            "value": geo[label].get(lowest_m) if lowest_m else None, "at_m": lowest_m,
            "failing_m": sorted(slow), "passed": not slow and bool(geo[label]),
        })
    int4_copy = {
        s: {m: statistics.median([r["pct_copy"] for r in rows
                                  if r["scheme"] == s and r["m"] == m and "pct_copy" in r])
            for m in ms if any(r["scheme"] == s and r["m"] == m and "pct_copy" in r for r in rows)}
        for s in INT4_SCHEMES
    }
    return {"geomean_speedup": geo, "worst_speedup": worst, "targets": targets,
            "int4_pct_of_copy_median": int4_copy, "errors": errors}


def print_summary(result: dict) -> list[str]:
    geo = result["geomean_speedup"]
    ms = sorted({m for per_m in geo.values() for m in per_m})
    lines = ["", "geomean speed-up over bf16, per M:",
             f"{'scheme':<22}" + "".join(f"{m:>8}" for m in ms)]
    for label, per_m in geo.items():
        lines.append(f"{label:<22}" + "".join(
            f"{per_m[m]:8.2f}" if m in per_m else f"{'-':>8}" for m in ms))
    lines.append("int4 median % of copy bandwidth, per M:")
    for s, per_m in result["int4_pct_of_copy_median"].items():
        lines.append(f"{s:<22}" + "".join(
            f"{per_m[m]:8.1f}" if m in per_m else f"{'-':>8}" for m in ms))
    lines.append(f"copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s; "
                 f"{result['errors']} failed measurements; {result['elapsed_s']:.0f} s")
    for t in result["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "INFO"}[t["passed"]]
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}x"
        extra = (f" worst {t['worst']['model']} tp{t['worst']['tp']} {t['worst']['layer']} "
                 f"{t['worst']['speedup']:.2f}x") if "worst" in t else (
                 f" lowest at M={t['at_m']}; failing M: {t['failing_m'] or 'none'}")
        lines.append(f"{verdict} {t['target']}: {value}{extra}")
    for line in lines:
        print(line)
    return lines


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, per_m in result["geomean_speedup"].items():
        if "[" in label:
            continue
        ms = sorted(per_m)
        ax.plot(ms, [per_m[m] for m in ms], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(TARGET_MIN_SPEEDUP, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens M")
    ax.set_ylabel("speed-up over bf16 (geomean over shapes)")
    ax.set_title(f"{result['device']}: quantized linears vs torch bf16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Llama-2-7B, TP 1 and 2, fewer reps")
    parser.add_argument("--paths", nargs="?", const="all", default=None,
                        help="also time forced paths: all, or weight-only paths such as "
                             "dequant,cutlass")
    parser.add_argument("--ms", type=lambda v: tuple(int(m) for m in v.split(",")), default=MS,
                        help="comma-separated token counts (default: %(default)s)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gemm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    done = run(args)
    result = done["result"]
    lines = done["lines"] + print_summary(result)
    (out / "bench_gemm.txt").write_text("\n".join(lines) + "\n")
    (out / "bench_gemm.json").write_text(json.dumps(result, indent=1, default=str))
    png = out / "bench_gemm.png"
    print(f"wrote {out / 'bench_gemm.json'}" + (f", {png}" if plot(result, png) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
