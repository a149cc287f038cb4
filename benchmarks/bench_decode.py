"""Decode speed of tensor-parallel quantized Llama shapes on GPUs, against a bandwidth floor.

    for n in 1 2 4; do mpirun -n $n python benchmarks/bench_decode.py [--quick]; done
    python benchmarks/bench_decode.py --schemes int4_wo --batches 64 --no-hf   # an A/B run
    python benchmarks/bench_decode.py --merge        # table + PNG from every bench_decode_tp*.json

One process per GPU, TP = world size. Models have random weights in the shapes of Llama-2-7B,
Llama-3-8B and Llama-2-70B (70B at TP 4 only, int4/int8 weight-only: its bf16 weights do not
fit one GPU and 70B would not fit the time budget at TP 2). Each rank creates its own shards
directly, on its GPU: a random float shard of each linear in the rank's shard shape, quantized
there by the scheme; no rank ever holds a full model.

Per (model, scheme), on every rank in lockstep:
- ttft_ms: prefill of a 512-token prompt (batch 1) to the first token's logits and argmax,
  through a prefill graph (`PrefillGraphs`, captured before the timing); ttft_eager_ms: the
  same prefill launched eagerly.
- decode at batch 1, 8, 64: the runtime's generation loop (`session.generate`: CUDA-graph
  replay of the decode step, argmax on rank 0, broadcast of the tokens, the host reading
  them while the next step runs) after a 512-token prompt per row, so at context 512-544;
  a 4-step warm-up run, then step_ms = the median of 3 runs of 32 steps / 32.
- floor_ms = weight bytes a step reads on this rank / measured copy bandwidth
             + 2 x layers x measured all-reduce latency (a [batch, hidden] bf16 all-reduce,
             CUDA-graph replay); efficiency = floor_ms / step_ms. The floor ignores the KV
  cache (kv_read_mb is reported beside it: at batch 64 it dominates for Llama-2-7B).
- memory: weight bytes per rank (max over ranks) against total / TP, and peak allocated.
Baseline in the same run (TP 1, rank 0): Hugging Face transformers bf16 `generate` on a random
LlamaForCausalLM, batch 1: ttft = generate(1 new token), decode = 32 tokens' extra time.

Writes $OUT/bench_decode_tp{N}.json (OUT defaults to /tmp/out); --merge prints the combined
table, checks the issue's targets and writes $OUT/bench_decode.json and bench_decode.png
(if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench_gemm import copy_bandwidth, event_times  # benchmarks/: on sys.path as a script
from plotting import pyplot

from tpquant.collectives import Communicator, make_communicator
from tpquant.engine.graphs import BUCKETS, DecodeGraphs, PrefillGraphs
from tpquant.engine.sampling import SamplingParams
from tpquant.engine.session import generate
from tpquant.layers.linear import ShardedLinear
from tpquant.models.config import LlamaConfig
from tpquant.models.llama import Llama, LlamaSchemes, default_down_rotation, rope_inv_freq
from tpquant.parallel.mapping import Mapping
from tpquant.quantization.mode import QuantMode
from tpquant.quantization.rotation import hadamard

BF16 = torch.bfloat16
PROMPT = 512
DECODE_STEPS, WARMUP_STEPS, RUNS = 32, 4, 3
MODELS = {
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5),
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5,
                             rope_theta=500000.0, max_position_embeddings=8192),
    "llama2-70b": LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8, rms_norm_eps=1e-5),
}
SCHEMES = ("bf16", "int8_wo", "int4_wo", "int4_gw", "w8a8_token")
BATCHES = (1, 8, 64)


@dataclass(frozen=True)
class Plan:
    models: tuple[str, ...]
    schemes: tuple[str, ...]
    batches: tuple[int, ...]
    hf_baseline: bool = True  # Hugging Face's generate at TP 1 (~20 s of device time a run)

    def schemes_for(self, model: str, tp: int) -> tuple[str, ...]:
        if model == "llama2-70b":  # bf16 70B does not fit one GPU, and TP 4 only fits the budget
            return tuple(s for s in self.schemes if s in ("int4_wo", "int8_wo")) if tp == 4 else ()
        return self.schemes


FULL = Plan(tuple(MODELS), SCHEMES, BATCHES)
QUICK = Plan(("llama2-7b",), ("bf16", "int8_wo", "int4_wo"), (1, 8))


# -- measurements ---------------------------------------------------------------------------


def _events_ms(fn, reps: int) -> list[float]:
    """Per-call milliseconds of fn() measured with CUDA events, one run each."""
    return [1e3 * t for t in event_times(fn, reps)]


def all_reduce_latency(comm: Communicator, device: torch.device, hidden: int, batch: int,
                       reps: int = 50) -> float:
    """Seconds per all-reduce of a [batch, hidden] bf16 tensor, replayed from a CUDA graph of
    `reps` all-reduces (as the decode graph issues them). 0 at TP 1."""
    if comm.world_size == 1:
        return 0.0
    x = torch.ones(batch, hidden, dtype=BF16, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            comm.all_reduce(x)  # warm: first calls connect
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            comm.all_reduce(x)
    graph.replay()
    ms = statistics.median(_events_ms(graph.replay, 5))
    return ms / 1e3 / reps


# -- a random model built shard by shard on the GPU -----------------------------------------


def group_size_for(config: LlamaConfig, tp: int) -> int:
    """The largest of 128 / 64 dividing every row-parallel layer's input slice."""
    for g in (128, 64, 32):
        if (config.intermediate_size // tp) % g == 0 and (config.num_heads * config.head_dim // tp) % g == 0:
            return g
    raise ValueError(f"no group size divides the row-parallel inputs at TP {tp}")


@torch.no_grad()
def random_model(config: LlamaConfig, scheme: str, mapping: Mapping, comm: Communicator,
                 device: torch.device, group_size: int, seed: int = 0) -> Llama:
    """This rank's model with random weights, every linear quantized from a random float shard
    in this rank's shard shape, on the GPU."""
    # as tpquant.build makes them: W8A8 modes rotate down_proj's input (its cost included)
    rotation = default_down_rotation(QuantMode.from_name(scheme), config.intermediate_size,
                                     mapping.tp_size)
    schemes = LlamaSchemes.from_name(scheme, BF16, group_size, down_rotation=rotation)
    with torch.device("meta"):  # no host copy of the embedding or norms
        model = Llama(config, mapping, comm, schemes, BF16)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed * 1000 + mapping.rank)
    model.embed.weight.normal_(0, 1, generator=g)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    model.inv_freq.copy_(inv_freq)  # to_empty left it (and the Hadamard blocks) uninitialized
    for layer in model.layers:
        if layer.mlp.down_rotation:
            layer.mlp.down_hadamard.copy_(hadamard(layer.mlp.down_rotation))
    tp = mapping.tp_size
    for module in model.modules():
        if not isinstance(module, ShardedLinear):
            continue
        out_f, in_f = module.out_features, module.in_features
        shape = (out_f // tp, in_f) if module.style == "column" else (out_f, in_f // tp)
        w = torch.randn(shape, generator=g, device=device) / in_f**0.5
        module.load_shards(module.scheme.quantize(w))
        del w
    torch.cuda.empty_cache()
    return model.eval()


def weight_bytes(model: Llama) -> tuple[int, int]:
    """(all weight bytes on this rank, bytes one decode step reads: all but the embedding)."""
    total = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                if "kv_cache" not in n and "rope" not in n and n != "inv_freq")
    embed = model.embed.weight.numel() * model.embed.weight.element_size()
    return total, total - embed


# -- timing one configuration ---------------------------------------------------------------


@torch.no_grad()
def time_prefill(model: Llama, device: torch.device) -> tuple[float, float]:
    """Milliseconds from a PROMPT-token prompt (batch 1) to its first token's argmax on the
    host, median of 3: through a prefill graph (captured first: `PrefillGraphs`), and eager."""
    tokens = torch.randint(0, model.config.vocab_size, (1, PROMPT), device=device)
    last = torch.tensor([PROMPT - 1], device=device)
    prefill = PrefillGraphs(model)

    def ms(run) -> float:
        run()
        times = []
        for _ in range(3):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            run()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    graphed = ms(lambda: prefill.run(tokens, last + 1).argmax(-1).tolist())
    eager = ms(lambda: model(tokens, 0, logits_at=last).argmax(-1).tolist())
    return graphed, eager


@torch.no_grad()
def time_decode(model: Llama, comm: Communicator, batch: int,
                graphs: DecodeGraphs | None = None) -> float:
    """Milliseconds per decode step of the runtime's own loop (`session.generate`, greedy,
    no stop tokens) from `batch` prompts of PROMPT tokens: decode_s of a run of DECODE_STEPS
    steps / DECODE_STEPS, median of RUNS runs after a warm-up run."""
    graphs = graphs or DecodeGraphs(model)
    prompts = [[1] * PROMPT] * batch

    def run(steps: int) -> float:  # steps graph replays after the prefill's token
        g = generate(model, comm, prompts, steps + 1, SamplingParams(), graphs=graphs, stop_ids=())
        return g.decode_s * 1e3 / steps

    run(WARMUP_STEPS)
    return statistics.median(run(DECODE_STEPS) for _ in range(RUNS))


def kv_read_bytes(config: LlamaConfig, model: Llama, batch: int) -> int:
    hd, kv = config.head_dim, model.layout.kv_heads_per_rank
    return 2 * config.num_layers * batch * (PROMPT + 1) * kv * hd * 2


def bench_config(name: str, scheme: str, plan: Plan, mapping: Mapping, comm: Communicator,
                 device: torch.device, bw: float, ar: dict[int, float]) -> dict:
    config = MODELS[name]
    tp = mapping.tp_size
    gs = group_size_for(config, tp)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    model = random_model(config, scheme, mapping, comm, device, gs)
    model.setup_caches(max(plan.batches), PROMPT + DECODE_STEPS + 8)
    build_s = time.time() - t0
    total, read = weight_bytes(model)
    all_ranks = comm.all_gather(torch.tensor([total], device=device)).flatten().tolist()
    row = {
        "model": name, "scheme": scheme, "tp": tp, "group_size": gs if scheme == "int4_gw" else None,
        "build_s": round(build_s, 1), "weight_bytes_rank_max": max(all_ranks),
        "weight_bytes_total": sum(all_ranks), "weight_bytes_read_per_step": read,
        "kv_cache_bytes": model.kv_cache_bytes(), "decode": {},
    }
    row["ttft_ms"], row["ttft_eager_ms"] = time_prefill(model, device)
    row["weight_vs_total_over_tp"] = row["weight_bytes_rank_max"] / (row["weight_bytes_total"] / tp)
    for batch in plan.batches:
        step = time_decode(model, comm, batch)
        floor = read / bw * 1e3 + 2 * config.num_layers * ar[batch] * 1e3
        row["decode"][str(batch)] = {
            "step_ms": step, "tokens_per_s": batch / step * 1e3, "floor_ms": floor,
            "efficiency": floor / step, "kv_read_mb": kv_read_bytes(config, model, batch) / 1e6,
        }
    row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return row


@torch.no_grad()
def hf_baseline(name: str, device: torch.device) -> dict:
    """transformers bf16 generate, batch 1, random LlamaForCausalLM of the same shape."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    c = MODELS[name]
    hf_config = HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=4096,  # RoPE's theta does not change the speed: left default
    )
    torch.set_default_dtype(BF16)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    x = torch.randint(0, c.vocab_size, (1, PROMPT), device=device)

    def gen(n: int) -> float:
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0)
        torch.cuda.synchronize(device)
        return (time.perf_counter() - t) * 1e3

    gen(2)
    ttft = statistics.median(gen(1) for _ in range(3))
    full = statistics.median(gen(DECODE_STEPS + 1) for _ in range(2))
    step = (full - ttft) / DECODE_STEPS
    hf = None  # free its weights before the next model
    gc.collect()
    torch.cuda.empty_cache()
    return {"model": name, "ttft_ms": ttft, "step_ms": step, "tokens_per_s": 1e3 / step}


# -- the run on each rank ---------------------------------------------------------------------


def run(plan: Plan, out: Path) -> None:
    mapping = Mapping.from_env()
    device = mapping.device()
    if device.type != "cuda":
        raise SystemExit("bench_decode needs GPUs (one rank per GPU)")
    torch.cuda.set_device(device)
    comm = make_communicator(mapping, device)
    tp = mapping.tp_size
    say = (lambda *a: print(*a, flush=True)) if mapping.rank == 0 else (lambda *a: None)

    bw = copy_bandwidth(device)
    torch.cuda.empty_cache()
    hidden = {MODELS[m].hidden_size for m in plan.models}
    ar = {(h, b): all_reduce_latency(comm, device, h, b) for h in hidden for b in plan.batches}
    say(f"TP {tp}: copy bandwidth {bw / 1e9:.0f} GB/s; all-reduce latency (us) "
        + ", ".join(f"{h}x{b}: {s * 1e6:.1f}" for (h, b), s in ar.items()))
    rows = []
    for name in plan.models:
        h = MODELS[name].hidden_size
        for scheme in plan.schemes_for(name, tp):
            t = time.time()
            row = bench_config(name, scheme, plan, mapping, comm, device, bw,
                               {b: ar[(h, b)] for b in plan.batches})
            rows.append(row)
            say(f"  {name} {scheme}: ttft {row['ttft_ms']:.1f} ms "
                f"(eager {row['ttft_eager_ms']:.1f}), " + ", ".join(
                f"b{b} {d['tokens_per_s']:.0f} tok/s (eff {d['efficiency']:.2f})"
                for b, d in row["decode"].items()) + f"  [{time.time() - t:.0f} s]")
    baseline = []
    if tp == 1 and plan.hf_baseline:
        for name in plan.models:
            if name != "llama2-70b":
                baseline.append(hf_baseline(name, device))
                say(f"  HF transformers {name}: ttft {baseline[-1]['ttft_ms']:.1f} ms, "
                    f"{baseline[-1]['tokens_per_s']:.1f} tok/s")
    if mapping.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        result = {
            "tp": tp, "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "copy_bandwidth_Bps": bw,
            "all_reduce_latency_s": {f"{h}x{b}": s for (h, b), s in ar.items()},
            "prompt": PROMPT, "decode_steps": DECODE_STEPS, "runs": RUNS,
            "configs": rows, "hf_baseline": baseline,
        }
        path = out / f"bench_decode_tp{tp}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        say(f"wrote {path}")


# -- merging the TP runs ----------------------------------------------------------------------

TARGETS = "H200, Llama-2-7B shape, batch 1"


def _tps(results: dict[int, dict], model: str, scheme: str, tp: int, batch: str = "1"):
    for row in results.get(tp, {}).get("configs", []):
        if row["model"] == model and row["scheme"] == scheme and batch in row["decode"]:
            return row["decode"][batch]["tokens_per_s"]
    return None


def check_targets(results: dict[int, dict]) -> list[tuple[str, float | None, float, bool | None]]:
    """The issue's targets: (what, measured, bound, met); None where not measured."""
    m = "llama2-7b"
    hf = next((b["tokens_per_s"] for b in results.get(1, {}).get("hf_baseline", [])
               if b["model"] == m), None)

    def ratio(a, b):
        return a / b if a is not None and b else None

    checks = [
        ("TP2 int4_wo / TP2 bf16", ratio(_tps(results, m, "int4_wo", 2), _tps(results, m, "bf16", 2)), 2.5),
        ("TP2 int8_wo / TP2 bf16", ratio(_tps(results, m, "int8_wo", 2), _tps(results, m, "bf16", 2)), 1.6),
        ("bf16 TP2 / TP1", ratio(_tps(results, m, "bf16", 2), _tps(results, m, "bf16", 1)), 1.7),
        ("bf16 TP4 / TP1", ratio(_tps(results, m, "bf16", 4), _tps(results, m, "bf16", 1)), 2.8),
        ("bf16 TP1 / HF transformers", ratio(_tps(results, m, "bf16", 1), hf), 4.0),
    ]
    for tp, r in results.items():
        for row in r["configs"]:
            if row["model"] == m and row["scheme"] in ("bf16", "int4_wo") and "1" in row["decode"]:
                bound = 0.7 if row["scheme"] == "bf16" else 0.6
                checks.append((f"efficiency {row['scheme']} TP{tp}", row["decode"]["1"]["efficiency"], bound))
            if row["model"] == m:
                checks.append((f"weights/rank vs total/TP {row['scheme']} TP{tp} (<=)",
                               row["weight_vs_total_over_tp"], 1.05))
    out = []
    for what, value, bound in checks:
        upper = "(<=)" in what
        met = None if value is None else (value <= bound if upper else value >= bound)
        out.append((what, value, bound, met))
    return out


def merge(out: Path) -> int:
    results = {}
    for f in sorted(out.glob("bench_decode_tp*.json")):
        r = json.loads(f.read_text())
        results[r["tp"]] = r
    if not results:
        print(f"no bench_decode_tp*.json under {out}", file=sys.stderr)
        return 1
    print(f"decode at context {PROMPT}, tokens/s (efficiency = bandwidth floor / step time); "
          f"{next(iter(results.values()))['device']}")
    print(f"{'model':<11} {'scheme':<11} {'tp':>2} {'ttft ms':>8} {'b1 tok/s':>9} {'eff':>5} "
          f"{'b8 tok/s':>9} {'eff':>5} {'b64 tok/s':>10} {'eff':>5} {'GB/rank':>8} {'peak GB':>8}")
    for tp, r in sorted(results.items()):
        for row in r["configs"]:
            cells = []
            for b in ("1", "8", "64"):
                d = row["decode"].get(b)
                cells += [f"{d['tokens_per_s']:.0f}" if d else "-", f"{d['efficiency']:.2f}" if d else "-"]
            print(f"{row['model']:<11} {row['scheme']:<11} {tp:>2} {row['ttft_ms']:>8.1f} "
                  f"{cells[0]:>9} {cells[1]:>5} {cells[2]:>9} {cells[3]:>5} {cells[4]:>10} {cells[5]:>5} "
                  f"{row['weight_bytes_rank_max'] / 1e9:>8.2f} {row['peak_allocated_bytes'] / 1e9:>8.2f}")
        for b in r.get("hf_baseline", []):
            print(f"{b['model']:<11} {'HF bf16':<11} {tp:>2} {b['ttft_ms']:>8.1f} {b['tokens_per_s']:>9.1f}")
    checks = check_targets(results)
    print(f"\ntargets ({TARGETS}):")
    for what, value, bound, met in checks:
        shown = "-" if value is None else f"{value:.2f}"
        print(f"  {what:<45} {shown:>6}  bound {bound:<5} {'-' if met is None else 'met' if met else 'NOT met'}")
    (out / "bench_decode.json").write_text(json.dumps({
        "results": {str(k): v for k, v in results.items()},
        "targets": [dict(what=w, value=v, bound=b, met=m) for w, v, b, m in checks],
    }, indent=2) + "\n")
    plot(results, out / "bench_decode.png")
    return 0


def plot(results: dict[int, dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    models = sorted({row["model"] for r in results.values() for row in r["configs"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for tp, r in sorted(results.items()):
            rows = [row for row in r["configs"] if row["model"] == model and "1" in row["decode"]]
            xs = [f"{row['scheme']}" for row in rows]
            ax.plot(xs, [row["decode"]["1"]["tokens_per_s"] for row in rows], "o-", label=f"TP {tp}")
            for b in r.get("hf_baseline", []):
                if b["model"] == model:
                    ax.axhline(b["tokens_per_s"], ls="--", c="gray", label="HF bf16 TP 1")
        ax.set_title(f"{model}, batch 1, decode tokens/s")
        ax.set_ylabel("tokens/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Llama-2-7B shape, bf16/int8_wo/int4_wo, batch 1 and 8")
    p.add_argument("--merge", action="store_true", help="combine the bench_decode_tp*.json files")
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="a subset of the models")
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, help="a subset of the schemes")
    p.add_argument("--batches", nargs="+", type=int, choices=BUCKETS,
                   help="decode batch sizes, graph buckets (default 1 8 64; --quick 1 8)")
    p.add_argument("--no-hf", action="store_true",
                   help="skip the Hugging Face baseline (A/B runs of this code against itself)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.out)
    plan = QUICK if args.quick else FULL
    plan = Plan(tuple(args.models or plan.models), tuple(args.schemes or plan.schemes),
                tuple(sorted(set(args.batches or plan.batches))), not args.no_hf)
    run(plan, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
