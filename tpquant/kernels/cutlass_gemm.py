"""CUTLASS GEMMs for larger M on Hopper: weight-only (cpp/mixed_input_gemm.cu) and W8A8
(cpp/w8a8_gemm.cu).

Weight-only, CUTLASS's mixed-input GEMM: y[M, N] = x[M, K] @ W^T (+ bias) for bfloat16 /
float16 x and

    int4 per channel   tiled codes (`tpquant.kernels.tiles`), scale [N] as the epilogue's
                       per-row alpha (float32, after the exact float32 sums)
    int4 groupwise     tiled codes, float32 scales [K/g, N] (g a multiple of 64), with zeros
                       [K/g, N] (unsigned codes) or without (signed)
    int8 per channel   tiled codes, scale [N] as alpha

The tensor cores multiply x by the weight dequantized in registers, so the weight is read
once, as int4 / int8, whatever M. The tiled bytes are CUTLASS's shuffled layout of the weight
with K permuted inside each tile (64 int4 / 32 int8 features; design notes 34, 35):
`tiles_order` gives x the same permutation (one copy of x), and the sums are the same products
in another order.

W8A8, CUTLASS's int8 wgmma GEMM (`w8a8_gemm`): y = float32(q_x q_w^T) * s_x * s_w + bias in
the reference epilogue's order (`tpquant.kernels.w8a8`), s_x per token or one value, s_w per
channel or one value, float16 / bfloat16 out.

Building. The source compiles with nvcc at first use, one shared library per instantiation
(`Variant`), into a cache directory ($TPQUANT_CACHE, else ~/.cache/tpquant), keyed by the
source, the flags, the CUTLASS headers' version and nvcc's release; ranks of one job that
share the directory build each library once (a file lock). It needs nvcc (CUDA 12.4+; $CUDA_HOME,
$PATH or /usr/local/cuda) and CUTLASS 4 headers (the `nvidia-cutlass` wheel or $CUTLASS_PATH),
and a compute capability 9.0 device: `available` says whether all are there. One build takes
about 1.5 minutes and 5 GB of RAM.

Calls run on torch's current stream and can be captured in CUDA graphs: the library's host
side only builds the kernel's parameters (TMA descriptors included) and launches; a workspace,
where a shape needs one, comes from torch. Where `pdl.enabled`, the W8A8 GEMM, x's gather
before a weight-only GEMM and the weight-only GEMM on its 64-token tile launch with PDL: each
starts while the kernel before it ends and waits for it before its first load
(cpp/mixed_input_gemm.cu says why that tile only).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tpquant.kernels import pdl, tiles
from tpquant.kernels.device import sm_count

SOURCE = Path(__file__).resolve().parents[2] / "cpp" / "mixed_input_gemm.cu"
W8A8_SOURCE = SOURCE.with_name("w8a8_gemm.cu")
CACHE_ENV = "TPQUANT_CACHE"  # as tpquant.run's --cache-dir
FLAGS = ("-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
         "-DNDEBUG",  # without it a device assert makes ptxas serialize the wgmma (C7510)
         "-O3", "-Xcompiler=-fPIC", "-shared", "-cudart=static")
QUANT_INT4, QUANT_UINT4, QUANT_INT8 = 0, 1, 2  # TPQ_QUANT
CONVERT, SCALE, SCALE_ZERO = 0, 1, 2  # TPQ_MODE
# The weight-only tile by M and the weight's width: `mixed_config`; narrow weights take the
# 128 x 256 tile from LARGE_M. W8A8: from W8A8_WIDE_FROM_M on the 128 x 256 tile, below it
# 128 x 128 (`w8a8_variant`).
LARGE_M = 1024
W8A8_WIDE_FROM_M = 1024
TILE_K = 64  # the smallest K step: groups must hold whole K steps


@dataclass(frozen=True)
class MixedTile:
    """The weight-only GEMM's CTA tile and schedule (the TPQ_TILE_* macros of the .cu):
    `tokens` of x along M, `rows` of the weight, K steps of `k`; stream-K or data-parallel
    tiles; pingpong (two warpgroups on two tiles of 64 or 128 rows) or cooperative (both on
    one 128-row tile); `cluster` CTAs along the weight rows sharing x's tiles by multicast."""

    tokens: int
    streamk: bool = False
    rows: int = 128
    k: int = TILE_K
    pingpong: bool = False
    cluster: int = 1

    def __post_init__(self) -> None:
        if self.pingpong and self.streamk:
            raise ValueError(f"{self}: pingpong tiles are data-parallel")
        if not self.pingpong and self.rows != 128:  # 64 rows for each of two warpgroups
            raise ValueError(f"{self}: cooperative tiles are 128 rows")

    def defines(self) -> tuple[str, ...]:
        return (f"-DTPQ_TILE_TOKENS={self.tokens}", f"-DTPQ_TILE_ROWS={self.rows}",
                f"-DTPQ_TILE_K={self.k}", f"-DTPQ_CLUSTER={self.cluster}") + (
            ("-DTPQ_STREAMK",) if self.streamk else ()) + (
            ("-DTPQ_PINGPONG",) if self.pingpong else ())

    @property
    def label(self) -> str:
        """e.g. "c128x256" (cooperative, 128 rows x 256 tokens), "p64x64", "c128x128k128sk2c"."""
        return (f"{'p' if self.pingpong else 'c'}{self.rows}x{self.tokens}"
                + (f"k{self.k}" if self.k != TILE_K else "") + ("sk" if self.streamk else "")
                + (f"{self.cluster}c" if self.cluster > 1 else ""))


@dataclass(frozen=True)
class Variant:
    """One instantiation of the .cu: codes, dequantization mode, tile, x's dtype."""

    quant: int
    mode: int
    tile: MixedTile
    fp16: bool = False

    source = SOURCE

    def defines(self) -> tuple[str, ...]:
        return (f"-DTPQ_QUANT={self.quant}", f"-DTPQ_MODE={self.mode}", *self.tile.defines()) + (
            ("-DTPQ_FP16",) if self.fp16 else ())

    @staticmethod
    def bind(library: ctypes.CDLL) -> None:
        p, i = ctypes.c_void_p, ctypes.c_int
        library.tpq_mixed_gemm.argtypes = [i, p, p, p, p, p, p, p, i, i, i, i, p, p, i]
        library.tpq_mixed_gemm.restype = i
        library.tpq_mixed_gemm_workspace.argtypes = [i, i, i, i]
        library.tpq_mixed_gemm_workspace.restype = ctypes.c_size_t


@dataclass(frozen=True)
class W8A8Variant:
    """One instantiation of the W8A8 .cu: N tile, stream-K or data-parallel, out's dtype."""

    tile_n: int = 128
    streamk: bool = False
    fp16: bool = False

    source = W8A8_SOURCE

    def defines(self) -> tuple[str, ...]:
        # -fmad=false: the epilogue's multiply and add round separately, as the reference's
        return (f"-DTPQ_TILE_N={self.tile_n}", "-fmad=false") + (
            ("-DTPQ_STREAMK",) if self.streamk else ()) + (("-DTPQ_FP16",) if self.fp16 else ())

    @staticmethod
    def bind(library: ctypes.CDLL) -> None:
        p, i = ctypes.c_void_p, ctypes.c_int
        library.tpq_w8a8_gemm.argtypes = [i, p, p, p, i, p, i, p, p, i, i, i, p, p, i]
        library.tpq_w8a8_gemm.restype = i
        library.tpq_w8a8_gemm_workspace.argtypes = [i, i, i]
        library.tpq_w8a8_gemm_workspace.restype = ctypes.c_size_t


def variant_for(bits: int, group: int, has_zeros: bool, dtype: torch.dtype,
                tile: MixedTile) -> Variant:
    """The instantiation for a scheme (pure): per channel converts and scales in the epilogue;
    groupwise dequantizes with its scales (and zeros) in the main loop."""
    if bits == 8:
        if group:
            raise ValueError("int8 weight-only is per channel")
        quant, mode = QUANT_INT8, CONVERT
    elif not group:
        quant, mode = QUANT_INT4, CONVERT
    else:
        quant, mode = (QUANT_UINT4, SCALE_ZERO) if has_zeros else (QUANT_INT4, SCALE)
    return Variant(quant, mode, tile, dtype == torch.float16)


def takes(n: int, k: int, bits: int, group: int) -> bool:
    """Whether the GEMM takes this shape and scheme (pure; the weight must also be tiled,
    which `tiles.can_tile` says): 16-byte rows of x, W and out, groups of whole K steps,
    int8 per channel only."""
    return (bits in (4, 8) and n % 8 == 0 and k % TILE_K == 0
            and (not group or (bits == 4 and group % TILE_K == 0)))


def usable(m: int, n: int, bits: int, group: int, has_zeros: bool, dtype: torch.dtype,
           device: torch.device) -> bool:
    """Whether the automatic dispatch may send this call here: the device and tools are
    `available` and the instantiation builds (a failed build warns once and is not retried;
    forcing the path raises its error instead)."""
    if dtype not in (torch.float16, torch.bfloat16) or not available(device.index):
        return False
    tile = mixed_config(m, wide(n, sm_count(device)), bool(group))
    return loads(variant_for(bits, group, has_zeros, dtype, tile))


def loads(variant: Variant | W8A8Variant) -> bool:
    """Whether `variant`'s library builds (at its first use) and loads; a failure warns once
    and is not retried."""
    if variant in _FAILED:
        return False
    try:
        _library(variant)
    except (RuntimeError, OSError) as error:
        _FAILED.add(variant)
        warnings.warn(f"the CUTLASS GEMM is not used for {variant}: {error}", stacklevel=3)
        return False
    return True


def tiles_order(x2: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """x[M, K] with K permuted as CUTLASS reads the tiled `bits`-bit weight (design notes 34,
    35).

    Inside each tile of TK = 64 (int4) / 32 (int8) features, the tile's feature f = TK/4 t +
    4 s + 2 c + h (`tiles`: lane column t, k16 step s, register pair c, pair half h) sits
    where CUTLASS's shuffled layout holds its k' = 16 s + 8 c + 2 t + h; so x'[k'] = x[f]. On
    CUDA one Triton gather (in place of torch's copy of a permuted view, which moves runs of 2
    elements); elsewhere torch."""
    m, k = x2.shape
    tk = tiles.TILE_K[bits]
    if x2.is_cuda and x2.stride(1) == 1:
        out = torch.empty((m, k), dtype=x2.dtype, device=x2.device)
        grid = (triton.cdiv(m, _ORDER_BLOCK_M), triton.cdiv(k, _ORDER_BLOCK_K))
        _tiles_order_kernel[grid](x2, out, m, k, x2.stride(0), TK=tk, BLOCK_M=_ORDER_BLOCK_M,
                                  BLOCK_K=_ORDER_BLOCK_K, num_warps=4, **pdl.triton_args(x2.device))
        return out
    by_bits = x2.reshape(m, k // tk, 4, tk // 16, 2, 2)  # (T, t, s, c, h)
    return by_bits.permute(0, 1, 3, 4, 2, 5).reshape(m, k)  # (T, s, c, t, h)


_ORDER_BLOCK_M, _ORDER_BLOCK_K = 16, 256


@triton.jit
def _tiles_order_kernel(x_ptr, y_ptr, M, K, stride_x, TK: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the GEMM launch
        gdc_wait()
        gdc_launch_dependents()
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kc = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # k', CUTLASS's order
    j = kc % TK
    f = kc - j + (TK // 4) * ((j >> 1) & 3) + 4 * (j >> 4) + 2 * ((j >> 3) & 1) + (j & 1)
    mask = (rm[:, None] < M) & (kc[None, :] < K)
    v = tl.load(x_ptr + rm[:, None] * stride_x + f[None, :], mask=mask)
    tl.store(y_ptr + rm[:, None] * K + kc[None, :], v, mask=mask)


def gemm(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
         zeros: torch.Tensor | None, bits: int, group: int, bias: torch.Tensor | None,
         out: torch.Tensor, tile: MixedTile | None = None) -> None:
    """out[M, N] = x2[M, K] @ W^T (+ bias), W int8 / int4 in the tiled layout. The caller has
    checked shapes and `takes`; scale / zeros are float32 and contiguous. The bias is added in
    float32, before the output's rounding."""
    m, k = x2.shape
    n = qweight.shape[0]
    tile = tile or mixed_config(m, wide(n, sm_count(x2.device)), bool(group))
    variant = variant_for(bits, group, zeros is not None, x2.dtype, tile)
    library = _library(variant)
    x2 = tiles_order(x2, bits)  # (a fresh, aligned copy: TMA reads 16-byte aligned rows)
    if variant.mode == CONVERT:
        scales, zero_terms, alpha = None, None, scale
    else:  # w = u * s + z with z = -zero * s: CUTLASS adds its zeros after the scale
        scales, alpha = scale, None
        zero_terms = None if zeros is None else -(zeros * scale)
    if bias is not None:
        bias = bias.float().contiguous()
    group_arg = group or k
    size = library.tpq_mixed_gemm_workspace(m, n, k, group_arg)
    workspace = torch.empty(size, dtype=torch.uint8, device=x2.device) if size else None
    stream = torch.cuda.current_stream(x2.device).cuda_stream
    status = library.tpq_mixed_gemm(
        x2.device.index, _ptr(x2), _ptr(qweight), _ptr(scales), _ptr(zero_terms), _ptr(alpha),
        _ptr(bias), _ptr(out), m, n, k, group_arg, _ptr(workspace), stream,
        int(pdl.enabled(x2.device)))
    if status:
        raise RuntimeError(f"CUTLASS mixed-input GEMM {variant} failed on M={m}, N={n}, K={k}, "
                           f"group={group}: {_status_text(status)}")


def wide(n: int, sm_count: int) -> bool:
    """Whether a weight of n rows is wide: its 128-row tiles alone fill half the SMs or more
    (Llama's fused qkv and gate / up; its 4096-row o and down are narrow)."""
    return 2 * -(-n // 128) >= sm_count


def mixed_config(m: int, wide_weight: bool, groupwise: bool = False) -> MixedTile:
    """The weight-only GEMM's tile for M tokens (pure; bench_cutlass_gemm --tiles sweep on
    H200, design note 36).

    Per channel, wide weights: to M = 128 the cooperative 128-row tile that holds M (32 tokens
    stream-K, 64, 128 stream-K); above, 64 x 256 pingpong, one warpgroup's dequantization
    under the other's tensor-core work. Narrow weights: 64-row pingpong tiles, twice as many
    row tiles for the SMs as 128-row ones: 64 tokens to M = 128, 128 tokens below LARGE_M,
    then 128 x 256 cooperative. Groupwise (which the dispatch gives wide weights only): the
    cooperative tiles, 64 tokens, 128 stream-K, 256 (its float32 dequantization is the
    bottleneck; pingpong lost)."""
    if groupwise:
        return (MixedTile(64) if m <= 64 else MixedTile(128, streamk=True) if m <= 128
                else MixedTile(256))
    if wide_weight:
        if m <= 32:
            return MixedTile(32, streamk=True)
        if m <= 64:
            return MixedTile(64)
        if m <= 128:
            return MixedTile(128, streamk=True)
        return MixedTile(256, rows=64, pingpong=True)
    if m <= 128:
        return MixedTile(64, rows=64, pingpong=True)
    return MixedTile(128, rows=64, pingpong=True) if m < LARGE_M else MixedTile(256)


def w8a8_takes(n: int, k: int, out_dtype: torch.dtype) -> bool:
    """Whether the W8A8 GEMM takes this shape (pure): 16-byte rows of q_x, q_w and out."""
    return out_dtype in (torch.float16, torch.bfloat16) and k % 16 == 0 and n % 8 == 0


def w8a8_variant(m: int, out_dtype: torch.dtype) -> W8A8Variant:
    """The W8A8 instantiation for M tokens (pure): 128 x 128 tiles, 128 x 256 from
    W8A8_WIDE_FROM_M; data-parallel (stream-K was slower at every M measured: design note 34)."""
    return W8A8Variant(256 if m >= W8A8_WIDE_FROM_M else 128, False, out_dtype == torch.float16)


def w8a8_gemm(qx: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor,
              weight_scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
              variant: W8A8Variant | None = None) -> None:
    """out[M, N] = float32(q_x q_w^T) * s_x * s_w + bias (float32 steps, as the reference).
    q_x int8 [M, K] and q_w int8 [N, K] contiguous; x_scale float32 [M] / [M, 1] or one value,
    weight_scale float32 [N] or one value; the caller has checked `w8a8_takes`."""
    m, k = qx.shape
    n = qweight.shape[0]
    variant = variant or w8a8_variant(m, out.dtype)
    library = _library(variant)
    if qx.data_ptr() % 16:  # TMA reads 16-byte aligned rows
        qx = qx.clone()
    x_scale = x_scale.float().reshape(-1).contiguous()
    weight_scale = weight_scale.float().reshape(-1).contiguous()
    if bias is not None:
        bias = bias.float().contiguous()
    size = library.tpq_w8a8_gemm_workspace(m, n, k)
    workspace = torch.empty(size, dtype=torch.uint8, device=qx.device) if size else None
    stream = torch.cuda.current_stream(qx.device).cuda_stream
    status = library.tpq_w8a8_gemm(
        qx.device.index, _ptr(qx), _ptr(qweight), _ptr(x_scale), int(x_scale.numel() > 1),
        _ptr(weight_scale), int(weight_scale.numel() > 1), _ptr(bias), _ptr(out), m, n, k,
        _ptr(workspace), stream, int(pdl.enabled(qx.device)))
    if status:
        raise RuntimeError(f"CUTLASS W8A8 GEMM {variant} failed on M={m}, N={n}, K={k}: "
                           f"{_status_text(status)}")


# ---- building and loading -----------------------------------------------------------------------

@functools.cache
def available(device_index: int = 0) -> bool:
    """Whether the GEMM can run here: nvcc, CUTLASS headers, a compute capability 9.0 device."""
    if not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return False  # sm_90a code runs on Hopper only
    return _nvcc() is not None and _cutlass_include() is not None


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for candidate in ([str(Path(home) / "bin" / "nvcc")] if home else []) + [
            shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _cutlass_include() -> Path | None:
    """CUTLASS's include directory: $CUTLASS_PATH/include, else the nvidia-cutlass wheel's."""
    roots = []
    if os.environ.get("CUTLASS_PATH"):
        roots.append(Path(os.environ["CUTLASS_PATH"]))
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(list(spec.submodule_search_locations)[0]) / "source")
    for root in roots:
        if (root / "include" / "cutlass" / "version.h").is_file():
            return root / "include"
    return None


@functools.cache
def _nvcc_release(nvcc: str) -> str:
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", text)
    return found.group(1) if found else text


def _cutlass_version(include: Path) -> str:
    text = (include / "cutlass" / "version.h").read_text()
    parts = [re.search(rf"#define CUTLASS_{p} (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(p.group(1) if p else "?" for p in parts)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tpquant")


def library_path(variant: Variant | W8A8Variant) -> Path:
    """Where `variant`'s shared library lives in the cache (its name holds the build's key)."""
    nvcc, include = _nvcc(), _cutlass_include()
    if nvcc is None or include is None:
        raise RuntimeError("the CUTLASS GEMM needs nvcc and CUTLASS headers "
                           "(pip install nvidia-cutlass, or set $CUTLASS_PATH)")
    key = hashlib.sha256("\n".join([
        variant.source.read_text(), *FLAGS, *variant.defines(), _cutlass_version(include),
        _nvcc_release(nvcc)]).encode()).hexdigest()[:16]
    return cache_dir() / "cutlass" / f"{variant.source.stem}_{key}.so"


def build(variant: Variant | W8A8Variant) -> Path:
    """Compiles `variant` into the cache unless it is there; returns its path. One process
    builds, others wait on the lock and then find it."""
    path = library_path(variant)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return path
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            target = Path(tmp) / path.name
            include = _cutlass_include()
            command = [_nvcc(), *FLAGS, *variant.defines(), f"-I{include}",
                       f"-I{include.parent / 'tools' / 'util' / 'include'}",  # packed_stride.hpp
                       str(variant.source), "-o", str(target)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"nvcc failed building {variant}:\n{' '.join(command)}\n"
                                   f"{result.stderr[-4000:]}")
            os.replace(target, path)  # atomic: readers see the whole file or none
    return path


_LIBRARIES: dict[Variant, ctypes.CDLL] = {}
_FAILED: set[Variant | W8A8Variant] = set()


def _library(variant: Variant | W8A8Variant) -> ctypes.CDLL:
    if variant not in _LIBRARIES:
        library = ctypes.CDLL(str(build(variant)))
        variant.bind(library)
        _LIBRARIES[variant] = library
    return _LIBRARIES[variant]


def _status_text(status: int) -> str:
    if status >= 2000:
        return f"CUDA error {status - 2000}"
    return f"cutlass::Status {status - 1000}"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def all_variants() -> list[Variant | W8A8Variant]:
    """Every instantiation the dispatch can ask for (`mixed_config` where the dispatch's
    `cutlass_range` sends calls; `w8a8_variant`)."""
    from tpquant.kernels.triton_weight_only import cutlass_range

    schemes = ((QUANT_INT4, CONVERT, 4, 0), (QUANT_UINT4, SCALE_ZERO, 4, TILE_K),
               (QUANT_INT4, SCALE, 4, TILE_K), (QUANT_INT8, CONVERT, 8, 0))
    sms, rows = 132, {True: 128 * 132, False: 128}  # a wide and a narrow weight
    ms = (32, 33, 64, 65, 128, 129, LARGE_M - 1, LARGE_M)  # each side of every bound
    mixed = list(dict.fromkeys(
        Variant(quant, mode, mixed_config(m, is_wide, bool(group)), fp16)
        for fp16 in (False, True) for quant, mode, bits, group in schemes
        for is_wide in (True, False) for m in ms
        if cutlass_range(m, rows[is_wide], bits, group, sms)))
    dtypes = (torch.bfloat16, torch.float16)
    return mixed + list(dict.fromkeys(w8a8_variant(m, d) for d in dtypes
                                      for m in (1, W8A8_WIDE_FROM_M)))


def main(argv: list[str] | None = None) -> int:
    """Builds every instantiation into the cache ahead of the first call (optional: a call
    builds what it needs): python -m tpquant.kernels.cutlass_gemm [--jobs N]."""
    import argparse
    from concurrent.futures import ThreadPoolExecutor

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="nvcc processes at once (~5 GB each)")
    args = parser.parse_args(argv)
    print(f"nvcc {_nvcc()}, CUTLASS headers {_cutlass_include()}, cache {cache_dir()}")
    variants = all_variants()
    present = [v for v in variants if library_path(v).is_file()]
    print(f"{len(present)} of {len(variants)} libraries already built")

    def one(variant: Variant | W8A8Variant) -> str:
        try:
            return f"{variant}: {build(variant).name}"
        except RuntimeError as error:
            return f"{variant}: FAILED {str(error)[-2000:]}"

    failed = 0
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for line in pool.map(one, [v for v in variants if v not in present]):
            failed += "FAILED" in line
            print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
