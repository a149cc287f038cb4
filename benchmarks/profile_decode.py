"""Where a decode step's time goes: GPU kernel time by kind, against the step as run.

    python benchmarks/profile_decode.py [--schemes bf16 int4_wo] [--batch 1]
    mpirun -n 2 python benchmarks/profile_decode.py ...      (TP 2; rank 0 reports)

A random Llama-2-7B-shaped model as in bench_decode.py (context 512), TP = the number of
ranks. Per scheme:
- graph_ms: one CUDA-graph replay of the decode step (device time, CUDA events, median of 20);
- serial_ms: a loop that waits for each token before the next step (replay, argmax on
  rank 0, broadcast, the host reading the token), median of 3 runs of 32 steps: what the
  host's wait costs;
- loop_ms: bench_decode's step, the runtime's loop (`session.generate`), which queues the
  next step before reading the token;
- kernels: torch.profiler over 5 eager decode steps; each kernel's device time per step,
  summed by kind (the weight-only GEMV, other GEMMs, attention, norms, elementwise, ...).
  kernel_sum_ms / graph_ms says whether the step is its kernels (graph replay has no launch
  gaps to speak of) or something between them. At TP > 1 a rank's eager kernels also hold
  its waits for the others (in the all-reduce kernels and, under programmatic dependent
  launch, in kernels launched early), so the kinds can add up to far more than a step.
Table on stdout, $OUT/profile_decode_tp<N>.json (OUT defaults to /tmp/out).

    [mpirun -n 2] python benchmarks/profile_decode.py --ablate [--schemes ...]

adds, per scheme, the graph replay with kinds of op replaced by stand-ins that launch nothing
(an empty output, or the input passed through): what each kind costs inside the graph, where
programmatic dependent launch overlaps kernels and eager kernel times overstate the short
ones. "all" removes every kind listed, leaving the linear layers (the GEMVs and lm_head) and
the embedding: the GEMVs' own time in the graph. The stand-ins compute nothing right; only
the times mean anything.

    [mpirun -n 2] python benchmarks/profile_decode.py --variants [--schemes ...] [--batches 1 8]

times instead the graph replay of the step as it is against other choices (VARIANTS: decode
attention with RoPE and the KV write in kernels of their own at every batch, or in its kernel
at every batch, its splits cut to one block each; the add + RMSNorm reading the residual after
its wait), each variant captured in turn, three rounds, one model per scheme
($OUT/profile_variants_tp<N>.json).

    [mpirun -n 2] python benchmarks/profile_decode.py --prefill [--schemes ...]

profiles bench_decode's time to first token instead: the prefill of a PROMPT-token prompt
(batch 1, eager) to the last position's argmax on the host, wall milliseconds (median of 3),
then torch.profiler over one: the kernels by kind, and the host's busiest operators
($OUT/profile_prefill_tp<N>.json); with --python, then cProfile over one (rank 0 prints): the
Python functions with the most time of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (  # noqa: E402
    MODELS, PROMPT, _events_ms, group_size_for, random_model, time_decode,
)

from tpquant import collectives  # noqa: E402
from tpquant.collectives import make_communicator  # noqa: E402
from tpquant.engine.graphs import DecodeGraphs  # noqa: E402
from tpquant.kernels import norm as norm_kernels  # noqa: E402
from tpquant.layers import decode_attention  # noqa: E402
from tpquant.layers.kv_cache import KVCache  # noqa: E402
from tpquant.layers.norm import RmsNorm  # noqa: E402
from tpquant.models import llama  # noqa: E402
from tpquant.parallel.mapping import Mapping  # noqa: E402

# kernel-name substrings -> kind (first match wins)
KINDS = (
    ("tpq_add_norm", "all-reduce + add + RMSNorm"),
    ("tpq_", "all-reduce (custom)"),
    ("nccl", "NCCL"),
    ("wo_gemv", "weight-only GEMV (CUDA)"),
    ("wo_tiles_dequant", "weight-only dequant (tiles)"),
    ("wo_tiles", "weight-only GEMV (CUDA, tiled)"),
    ("_wo_", "weight-only (Triton)"),
    ("decode_attention", "decode attention"),
    ("_decode_split", "decode attention"),
    ("_decode_rope", "decode attention"),  # with RoPE and the KV write (decode_attention_rope)
    ("_combine", "decode attention"),
    ("_kv_write", "KV-cache write"),
    ("_silu_mul", "SwiGLU activation"),
    ("_rope", "RoPE"),
    ("gemv", "GEMM/GEMV (cuBLAS)"),
    ("gemm", "GEMM/GEMV (cuBLAS)"),
    ("cutlass", "GEMM/GEMV (cuBLAS)"),
    ("nvjet", "GEMM/GEMV (cuBLAS)"),
    ("rms", "RMSNorm"),
    ("norm", "RMSNorm"),
    ("argmax", "argmax / reduce"),
    ("reduce", "argmax / reduce"),
    ("index", "index / gather / scatter"),
    ("scatter", "index / gather / scatter"),
    ("gather", "index / gather / scatter"),
    ("copy", "copy / cast"),
    ("cat", "copy / cast"),
    ("elementwise", "elementwise"),
    ("vectorized", "elementwise"),
)


def _empty_like_half(gu: torch.Tensor) -> torch.Tensor:
    return gu.new_empty(*gu.shape[:-1], gu.shape[-1] // 2)


# --ablate: each kind of op and a stand-in that launches no kernel (module attribute, value)
ABLATIONS = {
    "swiglu": [(llama, "silu_mul", _empty_like_half)],
    "rope": [(llama, "apply_rope", lambda x, cos, sin: x)],
    "kv_write": [(KVCache, "write", lambda self, pos, k, v: None)],
    # (where fuses_rope, RoPE and the KV write run in decode_attention_rope's kernel)
    "attention": [(llama, "decode_attention", lambda q, cache, pos: q.new_empty(q.shape)),
                  (llama, "decode_attention_rope", lambda qkv, cos, sin, cache, pos, h:
                   qkv.new_empty(qkv.shape[0], h, cache.k.shape[3]))],
    # the residual add + RMSNorm, and at TP > 1 the all-reduce fused with it
    "add_norm": [(RmsNorm, "add_forward", lambda self, x, delta, early_residual=False: (x, x))],
}


# --variants: the step as it is; with decode attention's RoPE and KV write kernels kept apart
# at every batch, or fused at every batch (splits of one block each, however many); with the
# add + RMSNorm reading the residual after its PDL wait (TP 1: the communicator's add + norm)
VARIANTS = {
    "as is": [],
    "RoPE and KV write unfused": [(llama, "fuses_rope", lambda cache, batch: False)],
    "RoPE fused, one-block splits": [
        (decode_attention, "num_splits", lambda batch, kv_heads, max_seq: -(-max_seq // 64))],
    "residual after the wait": [
        (collectives, "add_rms_norm", lambda x, d, w, eps, **kw: norm_kernels.add_rms_norm(
            x, d, w, eps))],
}


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for key, kind in KINDS if key in low), "other")


@torch.no_grad()
def time_serial_loop(graphs: DecodeGraphs, comm, token: torch.Tensor, pos: torch.Tensor,
                     steps: int = 32, runs: int = 3) -> float:
    """Milliseconds per step of a loop that reads each token on the host before it queues
    the next step (the runtime's loop before it overlapped the two)."""
    def run() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            logits = graphs.step(token, pos)
            if comm.rank == 0:
                token.copy_(logits.argmax(-1))
            comm.broadcast(token, root=0)
            token.tolist()
        return (time.perf_counter() - t) * 1e3 / steps

    run()
    return statistics.median(run() for _ in range(runs))


@torch.no_grad()
def profile_scheme(scheme: str, batch: int, mapping: Mapping, comm, device,
                   ablate: bool = False) -> dict:
    config = MODELS["llama2-7b"]
    model = random_model(config, scheme, mapping, comm, device, group_size_for(config, 1))
    model.setup_caches(batch, PROMPT + 64)
    graphs = DecodeGraphs(model)
    graphs.prepare(batch)
    token = torch.zeros(batch, dtype=torch.long, device=device)
    pos = torch.full((batch,), PROMPT, dtype=torch.long, device=device)
    graphs.step(token, pos)
    replay = graphs._graphs[graphs.rows_for(batch)].graph.replay
    graph_ms = statistics.median(_events_ms(replay, 20))
    serial_ms = time_serial_loop(graphs, comm, token, pos)
    loop_ms = time_decode(model, comm, batch, graphs)
    del graphs, replay
    torch.cuda.empty_cache()
    ablated = ablation_ms(model, batch, token, pos) if ablate else {}

    steps = 5
    for _ in range(2):
        model.decode_step(token, pos)  # eager warm-up
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model.decode_step(token, pos)
        torch.cuda.synchronize(device)
    kinds, top = kernel_kinds(prof, steps)
    del model
    torch.cuda.empty_cache()
    return dict(
        scheme=scheme, batch=batch, graph_ms=graph_ms, serial_ms=serial_ms, loop_ms=loop_ms,
        graph_ms_without=ablated,
        kernel_sum_ms=sum(v["ms"] for v in kinds.values()),
        kernels_per_step=sum(v["launches"] for v in kinds.values()), kinds=kinds, top=top,
    )


@torch.no_grad()
def replay_ms_with(model, batch: int, token: torch.Tensor, pos: torch.Tensor,
                   patches: list[tuple[object, str, object]]) -> float:
    """Graph replay ms of the decode step captured with `patches` applied (median of 20)."""
    with ExitStack() as stack:
        for owner, attr, value in patches:
            stack.enter_context(mock.patch.object(owner, attr, value))
        graphs = DecodeGraphs(model)
        graphs.prepare(batch)
        graphs.step(token, pos)
        ms = statistics.median(_events_ms(graphs._graphs[graphs.rows_for(batch)].graph.replay, 20))
    del graphs
    torch.cuda.empty_cache()
    return ms


def ablation_ms(model, batch: int, token: torch.Tensor, pos: torch.Tensor) -> dict[str, float]:
    """Graph replay ms of the decode step with each kind of op in ABLATIONS left out, then
    with all of them left out (see the module docstring)."""
    out = {name: replay_ms_with(model, batch, token, pos, patches)
           for name, patches in ABLATIONS.items()}
    out["all"] = replay_ms_with(model, batch, token, pos, sum(ABLATIONS.values(), []))
    return out


@torch.no_grad()
def compare_variants(scheme: str, batches: list[int], mapping: Mapping, comm, device,
                     rounds: int = 3) -> list[dict]:
    """Graph replay ms of each of VARIANTS, captured in turn, `rounds` times, per batch size."""
    config = MODELS["llama2-7b"]
    model = random_model(config, scheme, mapping, comm, device, group_size_for(config, 1))
    out = []
    for batch in batches:
        model.setup_caches(batch, PROMPT + 64)
        token = torch.zeros(batch, dtype=torch.long, device=device)
        pos = torch.full((batch,), PROMPT, dtype=torch.long, device=device)
        ms: dict[str, list[float]] = defaultdict(list)
        for _ in range(rounds):
            for name, patches in VARIANTS.items():
                ms[name].append(replay_ms_with(model, batch, token, pos, patches))
        out.append(dict(scheme=scheme, batch=batch, graph_ms=dict(ms),
                        median_ms={name: statistics.median(v) for name, v in ms.items()}))
    del model
    torch.cuda.empty_cache()
    return out


def kernel_kinds(prof, runs: int) -> tuple[dict, list]:
    """Device milliseconds per run by kind, and the top kernels, from a torch.profiler run."""
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            by_name[e.name][0] += us / 1e3 / runs
            by_name[e.name][1] += 1
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, (ms, count) in by_name.items():
        kinds[kind_of(name)][0] += ms
        kinds[kind_of(name)][1] += count / runs
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:12]
    return ({k: {"ms": ms, "launches": n} for k, (ms, n) in sorted(kinds.items(),
                                                                   key=lambda kv: -kv[1][0])},
            [{"name": n[:120], "ms": ms, "launches": c / runs} for n, (ms, c) in top])


@torch.no_grad()
def profile_prefill(scheme: str, mapping: Mapping, comm, device, python: bool = False) -> dict:
    """bench_decode's time to first token, then where it goes (see the module docstring)."""
    config = MODELS["llama2-7b"]
    model = random_model(config, scheme, mapping, comm, device, group_size_for(config, 1))
    model.setup_caches(1, PROMPT + 64)
    tokens = torch.randint(0, config.vocab_size, (1, PROMPT), device=device)
    last = torch.tensor([PROMPT - 1], device=device)

    def once() -> float:
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        model(tokens, 0, logits_at=last).argmax(-1).tolist()
        return (time.perf_counter() - t) * 1e3

    once()
    wall_ms = statistics.median(once() for _ in range(3))
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        once()
    kinds, top = kernel_kinds(prof, 1)
    if python:  # every rank runs the prefill (it is collective); rank 0 prints
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(once)
        if mapping.rank == 0:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    host = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                  key=lambda e: -e.self_cpu_time_total)[:10]
    model = None  # free its weights before the next scheme
    torch.cuda.empty_cache()
    return dict(scheme=scheme, wall_ms=wall_ms, kernel_sum_ms=sum(v["ms"] for v in kinds.values()),
                kinds=kinds, top=top,
                host=[{"name": e.key[:80], "self_ms": e.self_cpu_time_total / 1e3,
                       "calls": e.count} for e in host])


def print_kernels(r: dict) -> None:
    for kind, v in r["kinds"].items():
        print(f"  {kind:<28} {v['ms']:7.3f} ms  {v['launches']:6.0f} launches")
    for t in r["top"][:6]:
        print(f"    {t['ms']:7.3f} ms  x{t['launches']:<5.0f} {t['name'][:90]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", nargs="+", default=["bf16", "int4_wo"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill", action="store_true", help="profile the time to first token")
    p.add_argument("--python", action="store_true", help="--prefill: and its Python (cProfile)")
    p.add_argument("--ablate", action="store_true",
                   help="and the graph replay without each kind of op (see the docstring)")
    p.add_argument("--variants", action="store_true",
                   help="the graph replay as it is against VARIANTS (see the docstring)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="--variants' batches")
    args = p.parse_args()
    mapping = Mapping.from_env()
    device = mapping.device()
    if device.type != "cuda":
        sys.exit("profile_decode runs on GPUs")
    torch.cuda.set_device(device)
    comm = make_communicator(mapping, device)
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if args.variants:
        for scheme in args.schemes:
            results += compare_variants(scheme, args.batches, mapping, comm, device)
            if mapping.rank != 0:
                continue
            for r in results[-len(args.batches):]:
                base = r["median_ms"]["as is"]
                print(f"# llama2-7b TP {mapping.tp_size} {scheme} batch {r['batch']}: graph "
                      f"replay ms, rounds in turn; median, and against 'as is'")
                for name, times in r["graph_ms"].items():
                    med = r["median_ms"][name]
                    print(f"  {name:<24} {' '.join(f'{t:6.3f}' for t in times)}   {med:6.3f}"
                          f"  {med / base:5.3f}x")
            (out / f"profile_variants_tp{mapping.tp_size}.json").write_text(json.dumps(
                {"device": torch.cuda.get_device_name(device), "tp": mapping.tp_size,
                 "results": results}, indent=1))
        return
    if args.prefill:
        for scheme in args.schemes:
            r = profile_prefill(scheme, mapping, comm, device, args.python)
            results.append(r)
            if mapping.rank != 0:
                continue
            print(f"# llama2-7b TP {mapping.tp_size} {scheme} prefill of {PROMPT} tokens: "
                  f"{r['wall_ms']:.1f} ms wall, kernels {r['kernel_sum_ms']:.1f} ms")
            print_kernels(r)
            for h in r["host"][:8]:
                print(f"  host {h['self_ms']:7.2f} ms  x{h['calls']:<5} {h['name']}")
            (out / f"profile_prefill_tp{mapping.tp_size}.json").write_text(json.dumps(
                {"device": torch.cuda.get_device_name(device), "tp": mapping.tp_size,
                 "results": results}, indent=1))
        return
    for scheme in args.schemes:
        r = profile_scheme(scheme, args.batch, mapping, comm, device, args.ablate)
        results.append(r)
        if mapping.rank != 0:
            continue
        print(f"# llama2-7b TP {mapping.tp_size} {scheme} batch {args.batch}: graph replay {r['graph_ms']:.2f} ms, "
              f"serial loop {r['serial_ms']:.2f} ms, loop step {r['loop_ms']:.2f} ms, kernels (eager, per step) "
              f"{r['kernel_sum_ms']:.2f} ms in {r['kernels_per_step']:.0f} launches")
        print_kernels(r)
        for name, ms in r["graph_ms_without"].items():
            print(f"  graph without {name:<10} {ms:6.3f} ms  ({r['graph_ms'] - ms:+.3f} ms)")
        (out / f"profile_decode_tp{mapping.tp_size}.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(device), "tp": mapping.tp_size,
             "results": results}, indent=1))


if __name__ == "__main__":
    main()
