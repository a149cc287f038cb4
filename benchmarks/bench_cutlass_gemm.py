"""The CUTLASS GEMMs (`tpquant.kernels.cutlass_gemm`), each variant, against torch's bf16 matmul
and the paths the dispatch took before them, on one Hopper GPU.

    python benchmarks/bench_cutlass_gemm.py
    python benchmarks/bench_cutlass_gemm.py --shapes 7b-o-tp2 --ms 64,256 --schemes int4_wo,w8a8

For each shape [N, K] (bench_wo_kernels' Llama-2-7B / 70B shapes), M and scheme, next to bf16
`x @ W.T`:
    int4_wo, int4_gw (g128, zeros), int8_wo on the tiles: the dequant path (the weight
        dequantized into bf16, then cuBLAS: what the dispatch took above the small-M kernels),
        at M <= 64 the tiled GEMV ("cuda"), the mixed-input GEMM on each tile of --tiles
        (`MixedTile.label`: "c128x128sk" is cooperative, 128 weight rows x 128 tokens,
        stream-K; "rule" is the one `mixed_config` picks), the dispatch ("auto");
    w8a8 (per token x per channel, x already quantized): the Triton GEMM, the CUTLASS GEMM
        at each N tile ("n128", "n256"), the dispatch.
Each result's max |y - ref| / max |ref| against float32 math on the dequantized weight
("err"); over ERR_BOUND fails the run. Summary lines: per scheme and M, the geomean over shapes
of each column's speed-up over bf16.
Timing: bench_gemm's time_calls (CUDA graph, weight copies past twice the L2, median).
Output: table, $OUT/bench_cutlass_gemm.json, rewritten after every shape ($OUT defaults to
/tmp/out).

    python benchmarks/bench_cutlass_gemm.py --tiles sweep --build-only --jobs 2

builds the weight-only libraries of --tiles and --schemes (bf16) into the cache
($TPQUANT_CACHE) and stops: no GPU needed, so the sweep's libraries can be built ahead and
carried to one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import _geomean, copies, time_calls  # noqa: E402
from bench_wo_kernels import SHAPES  # noqa: E402

from tpquant.kernels import cutlass_gemm, w8a8  # noqa: E402
from tpquant.kernels import triton_weight_only as tw  # noqa: E402
from tpquant.kernels.cuda_weight_only import TILES_MAX_M  # noqa: E402
from tpquant.quantization.schemes import Groupwise, SmoothQuant, WeightOnly  # noqa: E402

DTYPE = torch.bfloat16
ERR_BOUND = 1e-2  # bf16 output: a few roundings of 2^-9
SCHEMES = {
    "int4_wo": WeightOnly(bits=4, dtype=DTYPE),
    "int4_gw": Groupwise(group_size=128, zeros=True, dtype=DTYPE),
    "int8_wo": WeightOnly(bits=8, dtype=DTYPE),
}
W8A8_SCHEME = SmoothQuant(per_channel=True, per_token=True, dtype=DTYPE)
W8A8_VARIANTS = [cutlass_gemm.W8A8Variant(n) for n in (128, 256)]
T = cutlass_gemm.MixedTile
# --tiles sweep: the thirteenth session's (design note 36): cooperative and pingpong (64 / 128
# rows), K steps of 128, x multicast to 2 CTAs, 32 tokens. --tiles rule: `rule_tiles`.
TILES = {
    "sweep": [T(64), T(128, streamk=True), T(256), T(32, streamk=True),
              T(64, rows=64, pingpong=True), T(128, rows=64, pingpong=True),
              T(256, rows=64, pingpong=True), T(128, rows=128, pingpong=True),
              T(128, streamk=True, k=128), T(256, k=128),
              T(128, streamk=True, cluster=2), T(256, cluster=2)],
}


def scheme_args(scheme) -> tuple[int, int, bool]:
    """(bits, group size, zeros) of a weight-only scheme."""
    return (getattr(scheme, "bits", 4), getattr(scheme, "group_size", 0),
            getattr(scheme, "zeros", False))


def tiles_for(scheme, which: str) -> list[cutlass_gemm.MixedTile]:
    """The tiles of --tiles for a scheme: "rule", those `mixed_config` gives it (the ones
    `python -m tpquant.kernels.cutlass_gemm` builds); "sweep", all of TILES["sweep"]."""
    if which == "sweep":
        return TILES["sweep"]
    probe = cutlass_gemm.variant_for(*scheme_args(scheme), DTYPE, T(64))
    return list(dict.fromkeys(v.tile for v in cutlass_gemm.all_variants()
                              if isinstance(v, cutlass_gemm.Variant) and not v.fp16
                              and (v.quant, v.mode) == (probe.quant, probe.mode)))


def op(scheme, t: dict[str, torch.Tensor], x: torch.Tensor, path: str | None) -> torch.Tensor:
    """The public weight-only op on the tensors a layer keeps (`Scheme.pack`), path forced."""
    codes = t.get("qweight_tiles", t.get("qweight"))
    tiled = "qweight_tiles" in t
    if isinstance(scheme, WeightOnly):
        return tw.weight_only_matmul(x, codes, t["scale"], scheme.bits, path=path, tiled=tiled)
    return tw.groupwise_matmul(x, codes, t["scales"], t.get("zeros"), scheme.group_size, None,
                               path=path, tiled=tiled)


def tile_call(scheme, t: dict[str, torch.Tensor], x: torch.Tensor, tile: cutlass_gemm.MixedTile):
    codes = t.get("qweight_tiles", t.get("qweight"))
    bits, group, _ = scheme_args(scheme)
    scale = t["scale"] if isinstance(scheme, WeightOnly) else t["scales"]
    out = torch.empty(x.shape[0], codes.shape[0], dtype=x.dtype, device=x.device)

    def call() -> torch.Tensor:
        cutlass_gemm.gemm(x, codes, scale, t.get("zeros"), bits, group, None, out, tile)
        return out
    return call


def w8a8_calls(t: dict[str, torch.Tensor], qx: torch.Tensor, sx: torch.Tensor,
               sets: list[dict[str, torch.Tensor]]) -> dict[str, list]:
    """The W8A8 GEMM's columns: the Triton GEMM, each CUTLASS variant, the dispatch."""
    def forced(path):
        return [lambda t=t: w8a8.w8a8_matmul(qx, sx, t["qweight"], t["weight_scale"], None,
                                             DTYPE, path=path) for t in sets]

    def variant(v):
        out = torch.empty(qx.shape[0], sets[0]["qweight"].shape[0], dtype=DTYPE,
                          device=qx.device)

        def call(t):
            cutlass_gemm.w8a8_gemm(qx, sx, t["qweight"], t["weight_scale"], None, out, v)
            return out
        return [lambda t=t: call(t) for t in sets]

    calls = {"triton": forced("triton")}
    for v in W8A8_VARIANTS:
        calls[f"n{v.tile_n}{'sk' if v.streamk else ''}"] = variant(v)
    calls["auto"] = forced(None)
    return calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="7b-qkv-tp1,7b-o-tp1,7b-gate_up-tp1,7b-down-tp1,"
                                        "7b-o-tp2,7b-down-tp2,70b-gate_up-tp4")
    p.add_argument("--ms", default="32,64,128,256,1024,4096")
    p.add_argument("--schemes", default=",".join([*SCHEMES, "w8a8"]))
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--tiles", choices=["rule", "sweep"], default="rule")
    p.add_argument("--build-only", action="store_true", help="build the libraries, then stop")
    p.add_argument("--jobs", type=int, default=2, help="nvcc processes with --build-only")
    args = p.parse_args()
    if args.build_only:
        return build_only(args)
    device = torch.device("cuda", torch.cuda.current_device())
    if not cutlass_gemm.available(device.index):
        print("needs a compute capability 9.0 GPU, nvcc and CUTLASS headers", file=sys.stderr)
        return 2
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    ms = [int(m) for m in args.ms.split(",")]
    rows, failed = [], False
    gen = torch.Generator(device=device).manual_seed(0)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        weight = torch.randn(n, k, generator=gen, device=device, dtype=DTYPE) * 0.02
        bf16_sets = [t["w"] for t in copies({"w": weight}, l2)]
        for scheme_name in args.schemes.split(","):
            scheme = W8A8_SCHEME if scheme_name == "w8a8" else SCHEMES[scheme_name]
            quantized = scheme.quantize(weight)
            sets = copies(scheme.pack(quantized), l2)
            w_ref = scheme.dequantize(quantized).float()
            for m in ms:
                x = torch.randn(m, k, generator=gen, device=device, dtype=DTYPE)
                calls = {"bf16": [lambda w=w: x @ w.t() for w in bf16_sets]}
                if scheme_name == "w8a8":
                    qx, sx = w8a8.quantize_per_token(x)
                    expected = (qx.float() * sx) @ w_ref.t()
                    calls.update(w8a8_calls(quantized, qx, sx, sets))
                    rule = "auto"
                else:
                    expected = x.float() @ w_ref.t()
                    calls["dequant"] = [lambda t=t: op(scheme, t, x, "dequant") for t in sets]
                    if m <= TILES_MAX_M:  # the small-M kernel
                        calls["cuda"] = [lambda t=t: op(scheme, t, x, "cuda") for t in sets]
                    for tile in tiles_for(scheme, args.tiles):
                        calls[tile.label] = [tile_call(scheme, t, x, tile) for t in sets]
                    calls["auto"] = [lambda t=t: op(scheme, t, x, None) for t in sets]
                    is_wide = cutlass_gemm.wide(n, sms)
                    groupwise = bool(scheme_args(scheme)[1])
                    rule = cutlass_gemm.mixed_config(m, is_wide, groupwise).label
                times, errs = {}, {}
                for column, fns in calls.items():
                    try:
                        y = fns[0]()
                        errs[column] = ((y.float() - expected).abs().max()
                                        / expected.abs().max()).item()
                        times[column] = time_calls(fns, args.replays)
                    except Exception as exc:  # noqa: BLE001 - report, go on
                        print(f"# {name} {scheme_name} M={m} {column}: {exc!r}"[:300])
                        torch.cuda.synchronize()
                worst = max((e for c, e in errs.items() if c != "bf16"), default=0.0)
                failed |= worst > ERR_BOUND
                speedup = {c: times["bf16"] / s for c, s in times.items() if "bf16" in times}
                rows.append({"shape": name, "n": n, "k": k, "scheme": scheme_name, "m": m,
                             "us": {c: s * 1e6 for c, s in times.items()}, "speedup": speedup,
                             "rule": rule, "err": errs})
                print(f"{name:<16} {scheme_name:<8} {m:>5}  "
                      + "  ".join(f"{c} {times[c] * 1e6:.1f} ({speedup.get(c, 0):.2f}x)"
                                  for c in times) + f"  err {worst:.1e}", flush=True)
        write(args, device, rows, {})  # a run cut short keeps what it measured
    summary = {}
    for scheme_name in args.schemes.split(","):
        for m in ms:
            at = [r for r in rows if r["scheme"] == scheme_name and r["m"] == m]
            if not at:
                continue
            columns = sorted({c for r in at for c in r["speedup"]} - {"bf16"})
            entry = {c: _geomean([r["speedup"][c] for r in at if c in r["speedup"]])
                     for c in columns}
            entry["rule"] = _geomean([r["speedup"][r["rule"]] for r in at
                                      if r["rule"] in r["speedup"]])
            summary[f"{scheme_name} M={m}"] = entry
            print(f"# geomean x bf16 {scheme_name} M={m}: "
                  + ", ".join(f"{c} {v:.2f}" for c, v in entry.items()))
    print(f"wrote {write(args, device, rows, summary)}")
    return 1 if failed else 0


def build_only(args: argparse.Namespace) -> int:
    """Builds each weight-only (scheme, tile) library of the run into the cache."""
    from concurrent.futures import ThreadPoolExecutor

    variants = [cutlass_gemm.variant_for(*scheme_args(SCHEMES[name]), DTYPE, tile)
                for name in args.schemes.split(",") if name in SCHEMES
                for tile in tiles_for(SCHEMES[name], args.tiles)]

    def one(variant: cutlass_gemm.Variant) -> bool:
        try:
            print(f"{variant}: {cutlass_gemm.build(variant).name}", flush=True)
            return True
        except RuntimeError as error:
            print(f"{variant}: FAILED {str(error)[-1500:]}", flush=True)
            return False

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        built = list(pool.map(one, variants))
    print(f"{sum(built)} of {len(built)} built in {cutlass_gemm.cache_dir()}")
    return 0 if all(built) else 1


def write(args: argparse.Namespace, device: torch.device, rows: list, summary: dict) -> Path:
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_cutlass_gemm.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "args": vars(args),
                                "rows": rows, "summary": summary}, indent=1))
    return path


if __name__ == "__main__":
    sys.exit(main())
