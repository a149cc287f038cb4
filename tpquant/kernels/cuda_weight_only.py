"""The weight-only GEMVs for small M in CUDA C++ (cpp/weight_only_gemv.cu), launched through CuPy.

y[M, N] = x[M, K] @ W^T (+ bias) for int8 / int4 per channel and groupwise int4 (zeros or
symmetric, optional pre-quant scale), float16 / bfloat16 x. Four kernels, the .cu file's
header explains the numerics of each:

    fma    (stored layout) codes become paired half-precision values with one mask and one
           fma per pair, and paired FMAs multiply them with x: fine at M = 1, but its FMAs
           grow with M.
    mma    (stored layout) the same dequantization feeding the tensor cores (mma.sync
           m16n8k16, float32 sums): one mma per 16 x 16 block for up to 8 tokens.
    tiles  int8 / int4 per channel or groupwise int4 (no pre-quant scale) pre-packed in
           `tpquant.kernels.tiles`' layouts (what `WeightOnly.pack` and `Groupwise.pack`
           keep): each lane's 16 bytes are its mma A fragments, one or two instructions per
           register; pipelined loads; M up to TILES_MAX_M in one launch.
           `tiles_dequantize` unpacks the layout into x.dtype for cuBLAS at larger M.
    staged int8 / int4 per channel or groupwise int4 on the same tiles, M <= 64: x copied
           into shared memory stages ahead (cp.async) and read there by every warp; K splits
           of a row block run as one thread-block cluster and add their sums through
           distributed shared memory.
           The dispatch takes it at M = 17-64 on the weights of its measured table
           (`staged_config`, staged_tuned.json).

`kernel_for` picks fma or mma by M for the stored layout (thresholds measured, below); the
tiled layout always takes the tiles kernel, its shape chosen by `tiles_plan`: a tuned table
where it has the (device, dtype, mode, M, N, K), else the occupancy rule (`tiles_shape`). The
source compiles at first use (CuPy caches the binaries); kernels run on torch's current stream
(CUDA-graph capturable; allocations, all through torch: the split-K partials, a float32 copy
of a bias, `tiles_dequantize`'s weight).

Shape rules (`supports`, pure): K a multiple of the 16-byte chunk (32 int4 / 16 int8 codes),
group size a multiple of 32 (fma) or of a 4-chunk step, 128 (mma); the tiles take N % 16 and
K % 64 / 32 (`tiles.can_tile`) and groups of a power of two of k-tiles (`tiles.groups_tile`).
Alignment rules (`aligned`): 16-byte aligned, contiguous tensors.
`tpquant.kernels.triton_weight_only` dispatches here (path "cuda").
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tpquant.kernels import pdl
from tpquant.kernels.cupy_launch import (active_clusters, allow_dynamic_shared, launch,
                                         occupancy)
from tpquant.kernels.device import device_name, sm_count
from tpquant.kernels.tiles import TILE_K, code_bits, features, groups_tile

SOURCE = Path(__file__).resolve().parents[2] / "cpp" / "weight_only_gemv.cu"
FMA, MMA = "fma", "mma"
M_TILES = (1, 2, 4, 8, 16)  # the fma kernel's compiled M sizes; M is rounded up to one of them
MMA_TILES = (8, 16, 32)  # the mma kernel's: 1, 2 or 4 tiles of 8 tokens
MAX_M = MMA_TILES[-1]
# M from which the mma kernel runs (where the shape allows it), by `mode`; below it, the fma
# kernel. bench_wo_kernels.py, H200, six Llama shapes, geomean over bf16 at M = 1 / 2:
# int4 per channel fma 2.24 / 1.77, mma 1.75 / 1.67; int8 fma 1.65 / 1.12, mma 1.38 / 1.28;
# groupwise int4 (zeros) fma 1.81 / 1.36, mma 1.52 / 1.47.
MMA_MIN_M = {0: 2, 1: 3, 2: 2, 3: 2}
# The mma kernel's shape by its M tile: (steps whose weight loads a lane issues together,
# 16-row tiles per warp, warps of a block that share those rows and split K). More loads in
# flight while the registers last; two row tiles from 16 tokens on, where each x load and
# pair would otherwise serve one tile's 16 rows only; the block's 4 warps on the same rows,
# so that the rows alone fill the SMs on more shapes without split-K's partials.
MMA_SHAPE = {8: (4, 1, 4), 16: (2, 2, 4), 32: (2, 2, 4)}
WARPS = 4  # WO_WARPS in the .cu
CHUNK_BYTES = 16  # weight bytes a lane reads per row per step
MIN_GROUP = 32  # a chunk (32 int4 codes) must lie in one group
STEP_CHUNKS = 4  # MMA_STEP_CHUNKS in the .cu: the chunks one mma step covers
# Split-K only where the rows alone leave the SMs nearly idle (fewer than WARPS_PER_SM warps
# each): at every Llama shape measured one split was the fastest or within 2% of it (the
# partials' write and the second kernel cost more than the extra warps gain), at most
# MAX_SPLITS splits, each with at least one chunk per lane.
WARPS_PER_SM = 4
MAX_SPLITS = 16
# Split-K of the mma kernel: the split count nearest MMA_WARPS_PER_SM warps per SM, keeping
# the float32 partials' traffic (8 * splits * M bytes per row) within half the weight's.
# bench_wo_kernels.py, H200, six Llama shapes, M = 2 to 16, with a block's 4 warps sharing
# rows: 16 warps per SM beat 24 (int4 1.78 / 1.71 / 1.50 / 1.31x bf16 against 1.73 / 1.67 /
# 1.48 / 1.14x at M = 2 / 4 / 8 / 16). Sweep of 1-16 splits: 7b qkv (23 warps per SM from
# its rows) ran fastest unsplit at M = 2 to 16, 7b o (8 warps per SM) unsplit at M = 2 and 4
# but with 4 splits at M = 16.
MMA_WARPS_PER_SM = 16
_REDUCE_THREADS = 256
_DT = {torch.float16: 0, torch.bfloat16: 1}

_MODULES: dict[tuple, tuple[dict[tuple[str, int], Any], Any]] = {}


@functools.cache
def available() -> bool:
    """Whether CuPy (which compiles and launches the kernel) is installed."""
    return importlib.util.find_spec("cupy") is not None


def mode(bits: int, group: int, has_zeros: bool) -> int:
    """The .cu's MODE: 0 int8 per channel, 1 int4 per channel, 2 groupwise zeros, 3 symmetric."""
    if not group:
        return 0 if bits == 8 else 1
    return 2 if has_zeros else 3


def chunk_elems(bits: int) -> int:
    return CHUNK_BYTES * 8 // bits


def mma_group(bits: int) -> int:
    """The features of one mma step (4 chunks), which must lie in one group."""
    return STEP_CHUNKS * chunk_elems(bits)


def mma_takes(bits: int, group: int) -> bool:
    """Whether the mma kernel takes this scheme: a step must lie in one group."""
    return group % mma_group(bits) == 0


def kernel_for(m: int, bits: int, group: int, has_zeros: bool = True) -> str:
    """The kernel that runs m rows: mma from MMA_MIN_M where the scheme allows, else fma."""
    if m > M_TILES[-1] or (m >= MMA_MIN_M[mode(bits, group, has_zeros)]
                           and mma_takes(bits, group)):
        return MMA  # (past the fma tiles, `supports` has checked that mma takes the scheme)
    return FMA


def m_tile(m: int, kernel: str = FMA) -> int:
    """The compiled M size of `kernel` that runs m rows (the smallest tile >= m)."""
    tiles = MMA_TILES if kernel == MMA else M_TILES
    for tile in tiles:
        if m <= tile:
            return tile
    raise ValueError(f"the CUDA {kernel} GEMV takes M <= {tiles[-1]}, got {m}")


def rows_per_warp(tile: int) -> int:
    """Output rows per warp of the fma kernel. Measured (sweep of 1, 2, 4 rows): at M = 1,
    2 rows (more warps in flight) beat 4 by 10%; at M = 2 and 4, 4 rows (each x load shared
    by more rows) beat 2 by 7-15%. Tiles of 8 and 16 take 2 to stay in registers."""
    return 2 if tile == 1 or tile >= 8 else 4


def supports(m: int, k: int, bits: int, group: int) -> bool:
    """Whether a kernel takes this shape (pure; alignment is `aligned`'s business)."""
    if not (1 <= m <= MAX_M and k % chunk_elems(bits) == 0 and group % MIN_GROUP == 0):
        return False
    return m <= M_TILES[-1] or mma_takes(bits, group)


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor is contiguous and starts on a 16-byte boundary."""
    return all(t is None or (t.is_contiguous() and t.data_ptr() % 16 == 0) for t in tensors)


def split_k(n: int, k: int, bits: int, tile: int, sm_count: int,
            rows: int | None = None) -> tuple[int, int]:
    """(splits, chunks per split) of the fma kernel for an [N, K] weight: enough warps for
    the SMs."""
    chunks = k // chunk_elems(bits)
    row_warps = -(-n // (rows or rows_per_warp(tile)))
    want = -(-WARPS_PER_SM * sm_count // row_warps)
    splits = max(1, min(want, MAX_SPLITS, chunks // 32))
    per_split = -(-chunks // splits)
    return -(-chunks // per_split), per_split


def mma_split_k(m: int, n: int, k: int, bits: int, sm_count: int) -> tuple[int, int]:
    """(splits, steps per split) of the mma kernel: the count nearest MMA_WARPS_PER_SM warps
    per SM, the partials' traffic within half the weight's, at least one unrolled load round
    per warp of a split."""
    steps = -(-k // mma_group(bits))
    unroll, _, k_warps = MMA_SHAPE[m_tile(m, MMA)]
    row_warps = mma_grid_x(n, m) * WARPS
    want = round(MMA_WARPS_PER_SM * sm_count / row_warps)
    traffic_cap = k * bits // (128 * m)  # 8 * splits * m <= (k * bits / 8) / 2
    splits = max(1, min(want, MAX_SPLITS, traffic_cap, steps // (unroll * k_warps)))
    per_split = -(-steps // splits)
    return -(-steps // per_split), per_split


def mma_grid_x(n: int, m: int) -> int:
    """Blocks of the mma kernel along N: each holds WARPS / k_warps groups of row tiles."""
    _, row_tiles, k_warps = MMA_SHAPE[m_tile(m, MMA)]
    return -(-n // (WARPS // k_warps * 16 * row_tiles))


def gemv(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zeros: torch.Tensor | None,
    pqs: torch.Tensor | None,
    bits: int,
    group: int,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    splits: int | None = None,
    rows: int | None = None,
    kernel: str | None = None,
) -> None:
    """out[M, N] = x2[M, K] @ W^T (+ bias); the caller has checked shapes, `supports` and
    `aligned`. Benchmarks may force: splits (the number of K splits), rows (the fma kernel's
    output rows per warp: 1, 2 or 4), kernel ("fma" or "mma")."""
    m, k = x2.shape
    n = qweight.shape[0]
    kernel = kernel or kernel_for(m, bits, group, zeros is not None)
    if kernel == MMA and not mma_takes(bits, group):
        raise ValueError(f"the mma GEMV needs groups of a multiple of {mma_group(bits)} "
                         f"features, got {group}")
    tile = m_tile(m, kernel)
    functions, reduce = _kernels(x2.device, x2.dtype, mode(bits, group, zeros is not None),
                                 pqs is not None, rows)
    sms = sm_count(x2.device)
    if kernel == MMA:
        units = -(-k // mma_group(bits))  # steps
        grid_x = mma_grid_x(n, m)
    else:
        rows = rows or rows_per_warp(tile)
        units = k // chunk_elems(bits)  # chunks
        grid_x = -(-n // (WARPS * rows))
    if splits is not None:  # forced: as even as whole units allow
        per_split = -(-units // max(1, min(splits, units)))
        splits = -(-units // per_split)
    elif kernel == MMA:
        splits, per_split = mma_split_k(m, n, k, bits, sms)
    else:
        splits, per_split = split_k(n, k, bits, tile, sms, rows)
    bias = _float32(bias)
    partial = (torch.empty((splits, m, n), dtype=torch.float32, device=x2.device)
               if splits > 1 else None)
    target = out if partial is None else partial
    with_pdl = pdl.enabled(x2.device)
    ptr = _ptr
    args = (
        ptr(x2), ptr(qweight), ptr(scale), ptr(zeros), ptr(pqs),
        ptr(bias if partial is None else None), ptr(target),
        np.int32(m), np.int32(n), np.int32(k), np.int32(group or 1), np.int32(per_split),
        np.int32(partial is not None),
    )
    launch(functions[kernel, tile], (grid_x, splits), (WARPS * 32,), args, x2.device, with_pdl)
    if partial is not None:
        blocks = min(-(-m * n // _REDUCE_THREADS), 1024)
        launch(reduce, (blocks,), (_REDUCE_THREADS,),
               (ptr(partial), ptr(bias), ptr(out), np.int32(m), np.int32(n), np.int32(splits)),
               x2.device, with_pdl)


# ---- the tiled kernel (wo_tiles) for int8 / int4 weights in `tiles`' layouts ------------------
# Its M tiles (8-token tiles NT per launch; from TILES_WIDE_NT on, the .cu's "wide" plan) and,
# per NT, the shapes it chooses from: (16-row tiles per row warp, K warps of a row warp, row
# warps of a block sharing x, k-tiles each warp loads per round). `tiles_shape` picks one per
# (M tile, N) from the device's occupancy, as bench_int4_tiles.py's sweeps on an H200 found the
# fastest shapes (7 Llama-2-7B / 70B weights): those whose blocks all fit on the SMs at once,
# with the most k-tile loads in flight across the GPU (then the fuller wave, then the smaller
# unroll); where none fits, the fewest waves, then the fullest (groupwise 70B gate/up at TP 4,
# M <= 8: (2, 8, 1, 2) in 2 waves 85% full, 22.7 us, against (2, 4, 1, 2) in 1.13 waves,
# 25.8 us; design note 40). A warp that loads x as it goes (`tiles_late_x`)
# waits for it every k-tile, so its unroll counts as one. NT = 1 keeps the shapes of the first
# sweep (one row warp: x is small); from NT = 2 on, the candidates are the shapes that came
# within 5% of the best on some weight in the later sweeps (design note 28), where the rule's
# choices came to 1.92 / 1.16x bf16 in geomean at M = 16 / 32 against the best shapes' 1.95 /
# 1.17, and were the best on all 7 weights at M = 40 and 64 (0.90 / 0.78x). Groupwise int4
# (modes 2 / 3; groups of a power of two of k-tiles) takes the per-channel candidates, but
# unrolled at NT = 1 (`pick_tiles_shape`), and, in the wide plan, loads x as it goes (its zeros
# need the sums of x, which take the registers). int8 (mode 0; a k-tile is 32 features, the
# same 512 bytes) takes them too.
TILES_NT = (1, 2, 4, 8)
TILES_WIDE_NT = 8
TILES_CANDIDATES = {
    1: tuple((rt, kw, 1, u) for rt in (1, 2) for kw in (4, 8) for u in (1, 2, 4) if rt * u <= 4),
    2: ((1, 4, 1, 2), (1, 8, 1, 1), (2, 2, 2, 1), (2, 2, 2, 2), (2, 2, 4, 2), (2, 4, 1, 1),
        (2, 4, 2, 1), (2, 8, 1, 2)),
    4: ((1, 1, 4, 2), (1, 2, 2, 1), (1, 4, 1, 1), (1, 4, 1, 2), (1, 4, 2, 2), (2, 2, 2, 1),
        (2, 2, 4, 1), (2, 8, 1, 1)),
    8: ((1, 4, 1, 1), (1, 4, 1, 2), (2, 2, 2, 1), (2, 2, 4, 1), (2, 4, 1, 1), (2, 4, 2, 1)),
}
TILES_MAX_M = 8 * TILES_NT[-1]  # one launch; above: dequantize + cuBLAS (two launches lost)
TILES_SHARED_BYTES = 48 << 10  # a block's static shared memory: its warps' sums
_TILES: dict[tuple, Any] = {}
_TILES_CHOSEN: dict[tuple, tuple[int, int, int, int, int]] = {}


def tiles_shared_bytes(nt: int, rt: int, kw: int, rw: int = 1, grouped: bool = False,
                       q_in_a: bool = False, scale_copy: bool = False) -> int:
    """Shared memory of a wo_tiles block: for each row warp, KW - 1 K warps' C fragments (RT x
    NT) and (per channel, below the wide plan, unless the A registers hold q itself: q_in_a,
    bfloat16 int8) NT x 2 sums of x, floats per lane; and where the channel scales are copied
    ahead (scale_copy, int4 per channel; below the wide plan: TilesPlan::SCALE_COPY) RT x 2
    scales per lane of each row warp's first K warp."""
    narrow = nt < TILES_WIDE_NT
    sums = rt * nt * 4 + (nt * 2 if narrow and not (grouped or q_in_a) else 0)
    scales = rt * 2 if narrow and scale_copy else 0
    return rw * ((kw - 1) * sums + scales) * 32 * 4


# Measured choices for the tiled kernel (benchmarks/tune_tiles.py): for a device, dtype, mode,
# M, N and K, the fastest of the rule's candidates, each timed on that device (design note 41).
# The rule takes everything the table lacks. TPQUANT_TILES_TUNED names another table, or "off"
# for none (the rule alone, to compare).
TUNED_PATH = Path(__file__).resolve().with_name("tiles_tuned.json")


@functools.cache
def tuned_table(path: Path | None = None) -> dict[tuple, tuple[int, int, int, int]]:
    """{(device name, dtype name, mode, m, n, k): (row tiles, K warps, row warps, unroll)}
    from a table's JSON (plain data): `path`, else TPQUANT_TILES_TUNED's, else TUNED_PATH;
    empty for "off" or a missing file."""
    return {(device, e["dtype"], e["mode"], e["m"], e["n"], e["k"]): tuple(e["shape"])
            for device, e in _measured(path, "TPQUANT_TILES_TUNED", TUNED_PATH)}


def _measured(path: Path | None, env: str, default: Path) -> list[tuple[str, dict]]:
    """(device name, entry) of a measured table's JSON (plain data): `path`, else $env's
    setting, else `default`; none for "off" or a missing file."""
    if path is None:
        setting = os.environ.get(env, str(default))
        if setting == "off":
            return []
        path = Path(setting)
    if not path.is_file():
        return []
    return [(device, e) for device, entries in json.loads(path.read_text())["devices"].items()
            for e in entries]


def tiles_plan(m: int, n: int, k: int, device: torch.device, dtype: torch.dtype,
               mode_: int = 1) -> tuple[int, int, int, int, int]:
    """(NT, row tiles, K warps, row warps, unroll) of the tiled kernel for an [m, k] x [n, k]
    product: the tuned table's entry for this device, else `tiles_shape`'s."""
    tuned = tuned_table().get((device_name(device), str(dtype).removeprefix("torch."), mode_,
                                m, n, k))
    if tuned is not None:
        return (tiles_nt(m), *tuned)
    return tiles_shape(m, n, device, dtype, mode_)


def tiles_nt(m: int) -> int:
    """The 8-token tiles of the launch that runs m <= TILES_MAX_M rows."""
    return next(t for t in TILES_NT if 8 * t >= m)


def tiles_late_x(nt: int, rt: int, u: int, grouped: bool = False) -> bool:
    """Whether the kernel loads x as each k-tile is multiplied rather than a round ahead (the
    .cu's TilesPlan: the wide plan groupwise, or per channel past one row tile unrolled once)."""
    return nt >= TILES_WIDE_NT and (grouped or rt * u > 1)


def pick_tiles_shape(n: int, nt: int, sm_count: int,
                     resident: dict[tuple[int, int, int, int], int],
                     grouped: bool = False) -> tuple[int, int, int, int]:
    """The rule above (pure): `resident` gives, for each candidate shape (row tiles, K warps,
    row warps, unroll) for NT token tiles that fits in shared memory, the blocks one SM holds
    at once (at least one); `grouped`: groupwise weights."""
    if grouped and nt == 1:
        # A warp of unroll 1 takes every KW-th k-tile, each of them a run that pays a fold of
        # its group's sums; unrolled, a group of 128 folds once (design note 39): 2.36 -> 2.45x
        # bf16 at M = 1 in geomean. From 2 token tiles on, most best shapes have unroll 1.
        resident = {c: r for c, r in resident.items() if c[3] > 1} or resident

    def score(shape: tuple[int, int, int, int]) -> tuple:
        rt, kw, rw, u = shape
        blocks = -(-n // (16 * rt * rw))
        capacity = resident[shape] * sm_count
        depth = 1 if tiles_late_x(nt, rt, u, grouped) else u
        if blocks <= capacity:
            return (1, blocks * kw * rw * rt * depth, blocks / capacity, -u)
        waves = -(-blocks // capacity)  # a last wave runs as long as a full one
        return (0, -waves, blocks / (waves * capacity), -u)
    return max(resident, key=score)


def tiles_shape(m: int, n: int, device: torch.device, dtype: torch.dtype,
                mode_: int = 1) -> tuple[int, int, int, int, int]:
    """(NT, row tiles, K warps, row warps, unroll) of the tiled kernel for m <= TILES_MAX_M rows
    of an [n, K] weight on `device` (mode: the .cu's MODE), chosen by `pick_tiles_shape` once
    per (device, dtype, mode, NT, n)."""
    nt = tiles_nt(m)
    key = (device.index, dtype, mode_, nt, n)
    if key not in _TILES_CHOSEN:
        resident = tiles_resident(nt, device, dtype, mode_)
        _TILES_CHOSEN[key] = (nt, *pick_tiles_shape(n, nt, sm_count(device), resident,
                                                    grouped=_grouped(mode_)))
    return _TILES_CHOSEN[key]


@functools.cache
def tiles_resident(nt: int, device: torch.device, dtype: torch.dtype,
                   mode_: int = 1) -> dict[tuple[int, int, int, int], int]:
    """{shape: blocks an SM holds} of NT's candidates that fit in shared memory, compile
    without spills (a compiler's choice; any, if none does) and fit on an SM at all."""
    shapes = [c for c in TILES_CANDIDATES[nt]
              if tiles_shared_bytes(nt, *c[:3], **_sums(mode_, dtype)) <= TILES_SHARED_BYTES]
    functions = _tiles_functions(device, dtype, [_tiles_name(mode_, nt, *c) for c in shapes])
    resident = {c: occupancy(f, c[1] * c[2] * 32, device) for c, f in zip(shapes, functions)}
    unspilled = {c: r for (c, r), f in zip(resident.items(), functions)
                 if r > 0 and f.local_size_bytes == 0}
    return unspilled or {c: r for c, r in resident.items() if r > 0}


def _grouped(mode_: int) -> bool:
    return mode_ >= 2


def _sums(mode_: int, dtype: torch.dtype) -> dict[str, bool]:
    """`tiles_shared_bytes`' flags for a mode and dtype (the .cu's TilesQ and TilesPlan)."""
    return dict(grouped=_grouped(mode_), q_in_a=mode_ == 0 and dtype == torch.bfloat16,
                scale_copy=mode_ == 1)


def _tiles_name(mode_: int, nt: int, rt: int, kw: int, rw: int, u: int) -> str:
    return f"wo_tiles<{{dt}}, {mode_}, {nt}, {rt}, {kw}, {rw}, {u}>"


def tiles_gemv(x2: torch.Tensor, tiled: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None, out: torch.Tensor, *,
               zeros: torch.Tensor | None = None, group: int = 0,
               shape: tuple[int, int, int, int] | None = None) -> None:
    """out[M, N] = x2[M, K] @ W^T (+ bias) for W in a tiled layout (`tpquant.kernels.tiles`;
    int8 or packed int4, told by its dtype): per channel (group 0, scale [N]), or int4
    groupwise (scales [K/g, N], zeros [K/g, N] or None for signed codes; no pre-quant scale),
    M <= TILES_MAX_M. The caller has checked shapes and `aligned`.
    Benchmarks may force `shape` (row tiles, K warps, row warps, unroll)."""
    m, k = x2.shape
    n = tiled.shape[0]
    if m > TILES_MAX_M:
        raise ValueError(f"the tiled GEMV takes M <= {TILES_MAX_M}, got {m}")
    if not groups_tile(group):  # the kernel finds a k-tile's group by a shift
        raise ValueError(f"the tiled GEMV takes groups of 64 x 2^i features, got {group}")
    mode_ = mode(code_bits(tiled), group, zeros is not None)
    if shape is None:
        nt, rt, kw, rw, u = tiles_plan(m, n, k, x2.device, x2.dtype, mode_)
    else:
        nt, (rt, kw, rw, u) = tiles_nt(m), shape
        if tiles_shared_bytes(nt, rt, kw, rw, **_sums(mode_, x2.dtype)) > TILES_SHARED_BYTES:
            raise ValueError(f"tiled GEMV shape {shape} at M = {m} needs more than "
                             f"{TILES_SHARED_BYTES} bytes of shared memory")
    function = _tiles_functions(x2.device, x2.dtype, [_tiles_name(mode_, nt, rt, kw, rw, u)])[0]
    args = (_ptr(x2), _ptr(tiled), _ptr(scale), _ptr(zeros), _ptr(_float32(bias)), _ptr(out),
            np.int32(m), np.int32(n), np.int32(k), np.int32(group or 1))
    launch(function, (-(-n // (16 * rt * rw)),), (kw * rw * 32,), args, x2.device,
           pdl.enabled(x2.device))


# ---- the staged GEMM (wo_staged) up to 64 tokens: x through shared memory ----------------------
# A config is (NT token tiles, RT row tiles a warp, WR row warps, WK K warps, KS k-tiles a stage,
# STAGES buffers); int4 / int8 per channel or groupwise int4 on the tiles. K splits fill the SMs
# where the weight's rows alone do not: the splits of a row block run as one thread-block
# cluster and add up their sums through distributed shared memory (at most 8 blocks: the
# portable cluster size).
# The first config of each NT is its default (the best in geomean at M = 40 / 64 on an H200);
# the automatic dispatch takes the kernel only for weights in the measured table below.
STAGED_CONFIGS = {
    2: ((2, 2, 4, 2, 4, 3), (2, 2, 4, 1, 2, 4), (2, 2, 2, 2, 4, 3), (2, 1, 4, 2, 4, 3)),
    4: ((4, 2, 4, 2, 4, 3), (4, 2, 4, 1, 2, 4), (4, 2, 2, 2, 4, 3), (4, 1, 4, 2, 4, 3)),
    8: ((8, 2, 4, 2, 4, 3), (8, 2, 4, 1, 2, 4), (8, 2, 2, 2, 4, 3), (8, 1, 4, 2, 4, 3),
        (8, 1, 8, 1, 2, 4)),
}
STAGED_MIN_M = 17  # below, the tiled GEMV wins on every weight measured (sweep_staged.py)
# Weights where the staged GEMM beat the dispatch's kernel (tiled GEMV or CUTLASS) at M = 24
# and 32 (a config of 4 token tiles, taken at M = 17-32) or 40 and 64 (8 tiles, M = 33-64)
# (benchmarks/sweep_staged.py --table): {(device, dtype, mode, group, NT, n, k): config}.
# TPQUANT_STAGED_TUNED names another table, or "off" for none.
STAGED_TUNED_PATH = Path(__file__).resolve().with_name("staged_tuned.json")
STAGED_MAX_SPLITS = 8
_STAGED_LAUNCHES: dict[tuple, tuple] = {}  # (device, dtype, mode, config, n, k, splits): launch


@functools.cache
def staged_table(path: Path | None = None) -> dict[tuple, tuple[int, ...]]:
    """{(device name, dtype name, mode, group, NT, n, k): config} from a table's JSON (plain
    data; group 0 per channel, NT the config's token tiles): `path`, else
    TPQUANT_STAGED_TUNED's, else STAGED_TUNED_PATH; empty for "off" or a missing file."""
    return {(device, e["dtype"], e["mode"], e.get("group", 0), e["config"][0], e["n"], e["k"]):
            tuple(e["config"])
            for device, e in _measured(path, "TPQUANT_STAGED_TUNED", STAGED_TUNED_PATH)}


def staged_config(m: int, n: int, k: int, device: torch.device, dtype: torch.dtype,
                  mode_: int, group: int = 0) -> tuple[int, ...] | None:
    """The staged GEMM's config where the automatic dispatch should run it: M from
    STAGED_MIN_M to 64 on a weight (and group size) the table holds for this device, dtype and
    M's token tiles; else None."""
    if not STAGED_MIN_M <= m <= 8 * TILES_NT[-1]:
        return None
    return staged_table().get((device_name(device), str(dtype).removeprefix("torch."), mode_,
                               group, tiles_nt(m), n, k))


def staged_default(m: int) -> tuple[int, ...]:
    """The default config for m <= 64 tokens (a forced call off the table)."""
    return STAGED_CONFIGS[max(2, tiles_nt(m))][0]


def staged_shared_bytes(config: tuple[int, ...], bits: int) -> int:
    """Dynamic shared memory of a wo_staged block: STAGES stages of x (8 NT tokens x KS k-tiles,
    rows padded as the .cu's StagedPlan pads them), or, if larger, the K warps' sums or the
    block's float32 sums [8 NT, 16 RT WR] that the cluster adds up."""
    nt, rt, wr, wk, ks, stages = config
    tk = TILE_K[bits]
    row = ks * tk * 2 + (16 if tk == 64 else 64)
    k_warps = wr * (wk - 1) * rt * nt * 4 * 32 * 4
    block = 8 * nt * 16 * rt * wr * 4
    return max(stages * 8 * nt * row, k_warps, block)


def staged_splits(n: int, k: int, bits: int, config: tuple[int, ...], sms: int,
                  clusters: Callable[[int], int] | None = None) -> int:
    """K splits for an [n, k] weight (pure): about one block an SM, each split at least two
    stages, at most STAGED_MAX_SPLITS, and (given `clusters`: splits -> clusters of that size
    the GPU runs at once) the most splits whose clusters all run in one wave. A cluster's
    blocks must share a GPC, so fewer clusters of 4 than a quarter of the SMs may fit: 32
    clusters of 4 that need two waves ran 7B's o / down at M = 64 1.45x / 1.65x slower."""
    nt, rt, wr, wk, ks, stages = config
    blocks = -(-(n // 16) // (rt * wr))
    k_stages = -(-(k // TILE_K[bits]) // ks)
    splits = max(1, min(STAGED_MAX_SPLITS, round(sms / blocks), k_stages // 2))
    while clusters is not None and splits > 1 and clusters(splits) < blocks:
        splits -= 1
    return splits


def staged_gemm(x2: torch.Tensor, tiled: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, out: torch.Tensor, *,
                config: tuple[int, ...], splits: int | None = None,
                zeros: torch.Tensor | None = None, group: int = 0) -> None:
    """out[M, N] = x2[M, K] @ W^T (+ bias) for W in a tiled layout (int8 or packed int4) per
    channel (group 0, scale [N]) or int4 groupwise (scales [K/g, N], zeros [K/g, N] or None
    for signed codes; groups of 64 x 2^i features), M <= 8 NT of `config`; the caller has
    checked shapes and `aligned`."""
    m, k = x2.shape
    n = tiled.shape[0]
    if m > 8 * config[0]:
        raise ValueError(f"staged config {config} takes M <= {8 * config[0]}, got {m}")
    if not groups_tile(group):  # the kernel finds a k-tile's group by a shift
        raise ValueError(f"the staged GEMM takes groups of 64 x 2^i features, got {group}")
    bits = code_bits(tiled)
    if (group or zeros is not None) and not (group and bits == 4):
        raise ValueError(f"zeros come with groups, and groups with int4 codes: got {bits}-bit "
                         f"codes, group {group}, zeros {zeros is not None}")
    mode_ = mode(bits, group, zeros is not None)
    key = (x2.device.index, x2.dtype, mode_, config, n, k, splits)
    if key not in _STAGED_LAUNCHES:
        _STAGED_LAUNCHES[key] = _staged_launch(x2.device, *key[1:])
    function, grid, block, shared, per_split = _STAGED_LAUNCHES[key]
    launch(function, grid, block,
           (_ptr(x2), _ptr(tiled), _ptr(scale), _ptr(zeros), _ptr(_float32(bias)), _ptr(out),
            np.int32(m), np.int32(n), np.int32(k), np.int32(per_split), np.int32(group or 1)),
           x2.device, pdl.enabled(x2.device), shared_mem=shared,
           cluster=(1, grid[1], 1) if grid[1] > 1 else None)


def _staged_launch(device: torch.device, dtype: torch.dtype, mode_: int, config: tuple[int, ...],
                   n: int, k: int, splits: int | None) -> tuple:
    """(kernel, grid, block, dynamic shared bytes, stages per split) of one staged GEMM shape,
    worked out once: the kernel compiled and allowed its shared memory, the K splits (forced,
    else `staged_splits` with the driver's cluster counts; one below sm_90, which has no
    clusters)."""
    nt, rt, wr, wk, ks, stages = config
    bits = 8 if mode_ == 0 else 4
    name = f"wo_staged<{{dt}}, {mode_}, {nt}, {rt}, {wr}, {wk}, {ks}, {stages}>"
    function = _tiles_functions(device, dtype, [name])[0]
    shared = staged_shared_bytes(config, bits)
    if shared > (48 << 10):  # past 48 KiB the driver needs an opt-in
        allow_dynamic_shared(function, shared, device)
    threads = wr * wk * 32
    k_stages = -(-(k // TILE_K[bits]) // ks)
    if torch.cuda.get_device_capability(device)[0] < 9:
        splits = 1
    elif splits is None:
        splits = staged_splits(n, k, bits, config, sm_count(device), lambda size: active_clusters(
            function, threads, shared, (1, size, 1), device))
    splits = min(splits, STAGED_MAX_SPLITS, k_stages)
    per_split = -(-k_stages // splits)
    grid = (-(-(n // 16) // (rt * wr)), -(-k_stages // per_split))
    return function, grid, (threads,), shared, per_split


def tiles_dequantize(tiled: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, *,
                     zeros: torch.Tensor | None = None, group: int = 0) -> torch.Tensor:
    """W[N, K] in dtype (float16 / bfloat16) from a tiled layout (int8 or packed int4): q *
    scale[:, None] per channel, (u - zero) * scale or q * scale of each group groupwise."""
    bits = code_bits(tiled)
    n, k = tiled.shape[0], features(tiled, bits)
    w = torch.empty((n, k), dtype=dtype, device=tiled.device)
    name = f"wo_tiles_dequant<{{dt}}, {mode(bits, group, zeros is not None)}>"
    function = _tiles_functions(tiled.device, dtype, [name])[0]
    launch(function, (n // 16, -(-k // (4 * TILE_K[bits]))), (128,),  # 4 warps, a k-tile each
           (_ptr(tiled), _ptr(scale), _ptr(zeros), _ptr(w), np.int32(n), np.int32(k),
            np.int32(group or 1)), tiled.device, pdl.enabled(tiled.device))
    return w


def _tiles_functions(device: torch.device, dtype: torch.dtype, names: list[str]) -> list[Any]:
    """The named tiled-layout kernels ({dt}: the dtype's code), compiling missing ones together."""
    keys = [(device.index, name.format(dt=_DT[dtype])) for name in names]
    missing = sorted({key for key in keys if key not in _TILES})
    if missing:
        import cupy

        with cupy.cuda.Device(device.index):
            module = cupy.RawModule(code=_source(), options=("-std=c++17",),
                                    name_expressions=[name for _, name in missing])
            for key in missing:
                _TILES[key] = module.get_function(key[1])
    return [_TILES[key] for key in keys]


def _source() -> str:
    if not SOURCE.is_file():
        raise FileNotFoundError(
            f"{SOURCE} not found: tpquant's CUDA sources come with a source checkout "
            "(pip install -e .)"
        )
    return SOURCE.read_text()


def _float32(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as the kernels add it: in float32, before the output's rounding."""
    return bias if bias is None or bias.dtype == torch.float32 else bias.float()


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _kernels(device: torch.device, dtype: torch.dtype, mode_: int, pqs: bool,
             rows: int | None = None):
    """({(kernel, M tile): function}, split-K reduce kernel) of one module, compiled at first
    use."""
    key = (device.index, _DT[dtype], mode_, pqs, rows)
    if key not in _MODULES:
        import cupy

        dt, flag = _DT[dtype], str(pqs).lower()
        names = {(FMA, t): f"wo_gemv<{dt}, {mode_}, {flag}, {t}, {rows or rows_per_warp(t)}>"
                 for t in M_TILES}
        names.update({(MMA, t): f"wo_mma<{dt}, {mode_}, {flag}, {t // 8}, {u}, {r}, {kw}>"
                      for t, (u, r, kw) in MMA_SHAPE.items()})
        reduce_name = f"wo_reduce<{dt}>"
        with cupy.cuda.Device(device.index):
            module = cupy.RawModule(
                code=_source(), options=("-std=c++17",),
                name_expressions=[*names.values(), reduce_name],
            )
            functions = {key_: module.get_function(name) for key_, name in names.items()}
            _MODULES[key] = (functions, module.get_function(reduce_name))
    return _MODULES[key]
