"""Experimental GEMM variants against bf16, before any of them joins the kernels.

    python benchmarks/sweep_gemm_variants.py [--ms 64,256,1024,4096] [--shapes 7b,7b-tp2,70b]
                                             [--parts w8a8,persistent,wo8,quant,norm]

w8a8: the int8 GEMM with its fused per-token x per-channel epilogue as the dispatch runs it
("auto"), under medium-M tiles (M <= 256); torch._int_mm (cuBLASLt, raw int32 out, no
epilogue) for reference. persistent (with w8a8): a persistent TMA kernel (one program per SM
walking the tiles; optionally the tile loop flattened). Warp-specialized loops
(`tl.range(..., warp_specialize=True)`, measured in design note 25) are left out: the first
run with them printed nothing in ten minutes and was killed (the cause was not isolated).
wo8: int8 weight-only with the weight converted to bf16 inside a TMA-fed tl.dot, the weight
as the first operand (SWAP: y^T = W x^T, so it can stay in registers) or the second, and
the same kernel on a bf16 weight (the ceiling of the loop without conversion).
quant: per-token quantization (with a smoother) as `quantize_rows` runs it, against the
two-pass kernel with 4096-wide chunks, at each --ms for six K. norm: rms_norm_quantize as
its launcher runs it against its passes over 4096-wide chunks, K = 4096 and 8192.
Median of CUDA-graph replays (bench_gemm.time_calls), bf16 cuBLAS of the same run as the
baseline. Output: a table and $OUT/sweep_gemm_variants.json (quant, norm: $OUT/sweep_quant.json,
$OUT/sweep_norm.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import time_calls  # noqa: E402
from bench_w8a8_gemm import chosen_shapes, random_weights  # noqa: E402

from tpquant.kernels import triton_w8a8 as tw  # noqa: E402
from tpquant.kernels import w8a8  # noqa: E402
from tpquant.kernels.triton_w8a8 import _tile_ids  # noqa: E402

REPLAYS = 5
G = tw.GemmConfig
MEDIUM = {
    "64x128x128 s4 (MEDIUM)": tw.MEDIUM_CONFIG,
    "64x64x128 s4 w4": G(64, 64, 128, 8, 4, 4),
    "64x64x256 s4 w4": G(64, 64, 256, 8, 4, 4),
    "32x64x256 s4 w4": G(32, 64, 256, 8, 4, 4),
    "16x64x512 s5 w4": G(16, 64, 512, 8, 4, 5),
    "64x128x128 s4 tma": G(64, 128, 128, 8, 4, 4, True),
    "64x64x256 s4 tma w4": G(64, 64, 256, 8, 4, 4, True),
    "128x128x128 s4 tma": tw.LARGE_NARROW_CONFIG,
    "128x64x128 s4 tma w4": G(128, 64, 128, 8, 4, 4, True),
    "64x64x256 s3 tma w4": G(64, 64, 256, 8, 4, 3, True),
    "64x64x256 s5 tma w4": G(64, 64, 256, 8, 4, 5, True),
    "64x64x512 s3 tma w4": G(64, 64, 512, 8, 4, 3, True),
    "64x128x256 s3 tma w4": G(64, 128, 256, 8, 4, 3, True),
    "32x64x256 s4 tma w4": G(32, 64, 256, 8, 4, 4, True),
    "128x64x256 s3 tma w4": G(128, 64, 256, 8, 4, 3, True),
    "128x128x128 s4 tma w4": G(128, 128, 128, 8, 4, 4, True),
}


@triton.jit
def _persistent_w8a8(a_desc, b_desc, c_ptr, sx_ptr, sw_ptr, M, N, K, stride_cm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    in_group = GROUP_M * num_pid_n
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN):
        first_m = (tile // in_group) * GROUP_M
        size = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % size
        pid_n = (tile % in_group) // size
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        y = acc.to(tl.float32) * tl.load(sx_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
        y = y * tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], y.to(tl.bfloat16),
                 mask=m_ok[:, None] & n_ok[None, :])


def persistent_w8a8(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                    out: torch.Tensor, bm: int, bn: int, bk: int, warps: int, stages: int,
                    flatten: bool, sms: int) -> torch.Tensor:
    """out = (qx @ qw^T) * sx * sw in bf16: the persistent kernel, one program per SM."""
    m, k = qx.shape
    n = qw.shape[0]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    _persistent_w8a8[(min(sms, tiles),)](
        TensorDescriptor.from_tensor(qx, [bm, bk]), TensorDescriptor.from_tensor(qw, [bn, bk]),
        out, sx, sw, m, n, k, out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        NUM_SMS=sms, FLATTEN=flatten, num_warps=warps, num_stages=stages)
    return out


PERSISTENT = {  # name: (bm, bn, bk, warps, stages, flatten)
    "persistent 128x256x128 s4": (128, 256, 128, 8, 4, False),
    "persistent 128x256x128 s4 flat": (128, 256, 128, 8, 4, True),
    "persistent 128x256x128 s3 flat": (128, 256, 128, 8, 3, True),
    "persistent 128x128x128 s4 flat": (128, 128, 128, 8, 4, True),
}


@triton.jit
def _wo8_kernel(w_desc, x_desc, s_ptr, out_ptr, M, N, K, stride_om,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_N: tl.constexpr, SWAP: tl.constexpr, CONVERT: tl.constexpr):
    # Tiles in grouped order along N (the GEMM's order, axes swapped): GROUP_N weight tiles
    # meet each x tile while it is in L2.
    pid_n, pid_m = _tile_ids(N, M, BLOCK_N, BLOCK_M, GROUP_N)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = w_desc.load([pid_n * BLOCK_N, k0])
        x = x_desc.load([pid_m * BLOCK_M, k0])
        if CONVERT == 0:  # int8 -> bf16 (exact: |q| <= 128 fits bf16's significand)
            wf = w.to(tl.bfloat16)
        elif CONVERT == 1:  # through float32's magic 2^23 + u, no int->float instruction
            u = (w.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint32) | 0x4B000000
            wf = (u.to(tl.float32, bitcast=True) - 8388736.0).to(tl.bfloat16)
        else:  # a bf16 weight: the ceiling
            wf = w
        if SWAP:
            acc = tl.dot(wf, x.T, acc)
        else:
            acc = tl.dot(x, wf.T, acc)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
    if SWAP:
        y = acc * s[:, None]
        ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(ptrs, y.to(tl.bfloat16), mask=n_ok[:, None] & m_ok[None, :])
    else:
        y = acc * s[None, :]
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, y.to(tl.bfloat16), mask=m_ok[:, None] & n_ok[None, :])


def wo8(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, out: torch.Tensor, bn: int, bm: int,
        bk: int, warps: int, stages: int, swap: bool, convert: int) -> torch.Tensor:
    """out = x @ (w * s[:, None])^T in bf16 through `_wo8_kernel` (convert 2: w is bf16)."""
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _wo8_kernel[grid](TensorDescriptor.from_tensor(w, [bn, bk]),
                      TensorDescriptor.from_tensor(x, [bm, bk]), s, out, m, n, k, out.stride(0),
                      BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, GROUP_N=8, SWAP=swap,
                      CONVERT=convert, num_warps=warps, num_stages=stages)
    return out


WO8 = {  # name: (bn, bm, bk, warps, stages, swap)
    "swap 128x128x64 s4": (128, 128, 64, 8, 4, True),
    "swap 128x256x64 s3": (128, 256, 64, 8, 3, True),
    "swap 64x128x64 s4 w4": (64, 128, 64, 4, 4, True),
    "swap 128x64x128 s4 w4": (128, 64, 128, 4, 4, True),
    "swap 64x64x128 s4 w4": (64, 64, 128, 4, 4, True),
    "swap 128x128x128 s3": (128, 128, 128, 8, 3, True),
    "w2nd 128x128x64 s4": (128, 128, 64, 8, 4, False),
    "w2nd 256x128x64 s3": (256, 128, 64, 8, 3, False),
    "w2nd 128x64x128 s4 w4": (128, 64, 128, 4, 4, False),
}


def quant_ab(ms: list[int]) -> list[dict]:
    """Per-token quantization (with a smoother, as o / down run it): the launcher as it
    stands against the two-pass kernel with 4096-wide chunks (the previous rule)."""
    device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for k in (4096, 5504, 7168, 8192, 11008, 14336):
        smoother = torch.rand(k, device=device) + 0.5
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            q = torch.empty(m, k, device=device, dtype=torch.int8)
            sc = torch.empty(m, device=device)
            block, warps = tw.row_block(k)

            def two_pass():
                tw._quantize_rows_kernel[(m,)](x, smoother, sc, q, k, k, k, HAS_SMOOTHER=True,
                                               PER_TOKEN=True, BLOCK=block, ONE_PASS=False,
                                               num_warps=warps, PDL=False)

            new = time_calls([lambda: tw.quantize_rows(x, smoother, out=q, scale_out=sc)],
                             REPLAYS)
            q_new = q.clone()
            old = time_calls([two_pass], REPLAYS)
            same = torch.equal(q, q_new)
            rows.append(dict(k=k, m=m, new_us=new * 1e6, old_us=old * 1e6, same=same))
            print(f"quant K={k:>6} M={m:>5}: one-pass rule {new * 1e6:7.2f} us, two-pass "
                  f"{old * 1e6:7.2f} us, {old / new:5.2f}x, codes equal {same}", flush=True)
    return rows


def norm_ab(ms: list[int]) -> list[dict]:
    """rms_norm_quantize (SmoothQuant's RMSNorm) as its launcher runs it, against its passes
    re-reading the row in 4096-wide chunks. (The residual add + RMSNorm was measured the
    same way at ed70755, read once, and kept its passes: docs/benchmarks.md.)"""
    from tpquant.kernels import triton_norm as tn

    device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for k in (4096, 8192):
        w = torch.rand(k, device=device, dtype=torch.bfloat16) + 0.5
        block, warps = tw.row_block(k)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            q = torch.empty(m, k, device=device, dtype=torch.int8)
            sc = torch.empty(m, device=device)

            def chunks():
                tn._rms_norm_quantize_kernel[(m,)](x, w, q, sc, k, k, k, float(k), 1e-5,
                                                   PER_TOKEN=True, BLOCK=block, ONE_PASS=False,
                                                   num_warps=warps, PDL=False)

            t_new = time_calls([lambda: tn.rms_norm_quantize(x, w, 1e-5, out=q, scale_out=sc)],
                               REPLAYS)
            t_old = time_calls([chunks], REPLAYS)
            rows.append(dict(kernel="rms_norm_quantize", k=k, m=m, new_us=t_new * 1e6,
                             old_us=t_old * 1e6))
            print(f"rms_norm_quantize K={k} M={m:>5}: launcher {t_new * 1e6:6.2f} us, chunks "
                  f"{t_old * 1e6:6.2f} us, {t_old / t_new:5.2f}x", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="64,256,1024,4096")
    p.add_argument("--shapes", default="7b,7b-tp2")
    p.add_argument("--parts", default="w8a8,wo8")
    args = p.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    shapes = chosen_shapes(args.shapes)
    parts = args.parts.split(",")
    if "norm" in parts:
        _write("sweep_norm.json", norm_ab([int(v) for v in args.ms.split(",")]))
    if "quant" in parts:
        quant = quant_ab([int(v) for v in args.ms.split(",")])
        _write("sweep_quant.json", quant)
        print("# geomean two-pass / one-pass rule by M:", {
            m: round(statistics.geometric_mean([r["old_us"] / r["new_us"] for r in quant
                                                if r["m"] == m]), 3)
            for m in sorted({r["m"] for r in quant})})
    if not {"w8a8", "wo8"} & set(parts):
        return 0
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    print(f"{'shape':<22} {'M':>5} {'variant':<36} {'us':>9} {'TOP/s':>7} {'x bf16':>7} {'err':>8}")
    for shape in shapes:
        bf16_sets, q_sets, sw = random_weights(shape, gen, device, l2)
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, shape.k, generator=gen, device=device, dtype=torch.bfloat16)
            qx, sx = w8a8.quantize_per_token(x)
            sx1 = sx.reshape(-1).contiguous()
            out = torch.empty(m, shape.n, device=device, dtype=torch.bfloat16)
            base = time_calls([lambda b=b: x @ b.t() for b in bf16_sets], REPLAYS)
            timed = {"bf16": (base, 0.0)}

            def run(name, make_calls, ref):
                try:
                    calls = make_calls()
                    out.fill_(float("nan"))
                    calls[0]()
                    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    timed[name] = (time_calls(calls, REPLAYS), err)
                    print(f"  {shape.layer} {m} {name}: {timed[name][0] * 1e6:.1f} us "
                          f"{base / timed[name][0]:.2f}x err {err:.1e}", flush=True)
                except Exception as exc:  # noqa: BLE001 - report, go on
                    torch.cuda.synchronize()
                    print(f"# {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")

            if "w8a8" in parts:
                ref = (qx.double() @ q_sets[0].double().t() * sx.double() * sw.double()).float()
                run("w8a8 auto", lambda: [lambda q=q: tw.w8a8_gemm(
                    qx, sx, q, sw, None, torch.bfloat16, out=out) for q in q_sets], ref)
                if m <= tw.MEDIUM_MAX_M:
                    for name, cfg in MEDIUM.items():
                        run("w8a8 " + name, lambda cfg=cfg: [lambda q=q: tw.w8a8_gemm(
                            qx, sx, q, sw, None, torch.bfloat16, config=cfg, out=out)
                            for q in q_sets], ref)
                for name, c in (PERSISTENT if "persistent" in parts else {}).items():
                    run("w8a8 " + name, lambda c=c: [lambda q=q: persistent_w8a8(
                        qx, sx1, q, sw, out, *c, sms) for q in q_sets], ref)
                if m >= 64:
                    i32 = torch.empty(m, shape.n, device=device, dtype=torch.int32)
                    try:
                        timed["torch._int_mm (int32 out)"] = (time_calls([
                            lambda q=q: torch._int_mm(qx, q.t(), out=i32) for q in q_sets],
                            REPLAYS), 0.0)
                    except Exception as exc:  # noqa: BLE001
                        print(f"# _int_mm: {type(exc).__name__}: {str(exc)[:120]}")
            if "wo8" in parts:
                ref = (x.double() @ (q_sets[0].double() * sw.double()[:, None]).t()).float()
                for name, (bn, bm, bk, warps, stages, swap) in WO8.items():
                    for conv in (0, 1):
                        run(f"wo8 {name} c{conv}", lambda a=(bn, bm, bk, warps, stages, swap,
                                                               conv): [
                            lambda q=q: wo8(x, q, sw, out, *a) for q in q_sets], ref)
                ref_b = (x.double() @ bf16_sets[0].double().t()).float()
                for name, (bn, bm, bk, warps, stages, swap) in WO8.items():
                    ones = torch.ones(shape.n, device=device)
                    run(f"bf16-triton {name}", lambda a=(bn, bm, bk, warps, stages, swap, 2): [
                        lambda b=b: wo8(x, b, ones, out, *a) for b in bf16_sets], ref_b)
            for name, (sec, err) in timed.items():
                row = dict(model=shape.model, tp=shape.tp, layer=shape.layer, n=shape.n,
                           k=shape.k, m=m, variant=name, us=sec * 1e6,
                           tops=2 * m * shape.n * shape.k / sec / 1e12, speedup=base / sec,
                           err=err)
                rows.append(row)
                print(f"{shape.model + ' tp' + str(shape.tp) + ' ' + shape.layer:<22} {m:>5} "
                      f"{name:<36} {row['us']:>9.1f} {row['tops']:>7.0f} {row['speedup']:>7.2f}"
                      f" {err:>8.1e}", flush=True)
        bf16_sets = q_sets = []
        torch.cuda.empty_cache()
    by: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        by.setdefault((r["variant"], r["m"]), []).append(r["speedup"])
    print("# geomean speed-up over bf16 across shapes (variants timed on every shape)")
    geo = {f"{v} @ M={m}": statistics.geometric_mean(s) for (v, m), s in by.items()
           if len(s) == len(shapes)}
    for key, val in sorted(geo.items(), key=lambda kv: (int(kv[0].split("M=")[1]), -kv[1])):
        print(f"{key:<56} {val:6.2f}")
    _write("sweep_gemm_variants.json",
           {"device": torch.cuda.get_device_name(device), "rows": rows, "geomean": geo})
    return 0


def _write(name: str, data: object) -> None:
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
