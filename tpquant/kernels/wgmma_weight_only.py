"""The weight-only GEMM for many tokens on Hopper (cpp/weight_only_wgmma.cu, `wo_wgmma`): the
tiled int4 / int8 codes converted to x's dtype in shared memory, then wgmma with both operands
there, the conversion of the next k-step running while the tensor cores work on this one.

Per channel only (scale [N], bias [N] float32); weights in `tpquant.kernels.tiles`' layouts.
The source compiles at first use through CuPy's NVRTC for sm_90a (wgmma is an sm_90a
instruction) and launches on torch's current stream (CUDA graphs, PDL) like the tiled GEMV.

A config is (WG, BN, STAGES): WG warpgroups of 64 tokens each (BM = 64 WG tokens a block) and
a warpgroup that copies, BN weight rows a block, STAGES k-steps of 64 features in flight.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpquant.kernels import pdl
from tpquant.kernels.cuda_weight_only import _DT, _float32, _ptr, available as cupy_available
from tpquant.kernels.cupy_launch import allow_dynamic_shared, launch
from tpquant.kernels.tiles import code_bits, features

SOURCE = Path(__file__).resolve().parents[2] / "cpp" / "weight_only_wgmma.cu"
STEP_K = 64  # features of a k-step
CONFIGS = ((2, 256, 4), (2, 128, 4), (1, 256, 4), (1, 128, 4), (2, 256, 3), (1, 128, 6))
_FUNCTIONS: dict[tuple, Any] = {}  # (device index, kernel name): function


@functools.cache
def available(device_index: int) -> bool:
    """Whether the kernel runs here: CuPy, and a compute capability 9.0 GPU (sm_90a)."""
    return cupy_available() and torch.cuda.get_device_capability(device_index) == (9, 0)


def takes(n: int, k: int) -> bool:
    """Whether an [n, k] weight suits the kernel: whole 16-row tiles and 64-feature k-steps."""
    return n > 0 and k > 0 and n % 16 == 0 and k % STEP_K == 0


def shared_bytes(config: tuple[int, int, int], bits: int) -> int:
    """Dynamic shared memory of a block (the .cu's WgLayout): STAGES stages of x (64 WG rows of
    128 bytes) and of codes (BN / 16 row tiles of 512 bytes, two for int8), two converted
    k-steps (BN rows of 128 bytes), two mbarriers a stage, 1 KiB of alignment slack."""
    wg, bn, stages = config
    codes = bn // 16 * (2 if bits == 8 else 1) * 512
    return stages * (64 * wg * 128 + codes + 16) + 2 * bn * 128 + 1024


def gemm(x2: torch.Tensor, tiled: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
         out: torch.Tensor, *, config: tuple[int, int, int]) -> None:
    """out[M, N] = x2[M, K] @ (q * scale[:, None])^T (+ bias) for a tiled int8 / packed int4
    weight per channel; the caller has checked `takes`, the dtypes and 16-byte alignment."""
    m, k = x2.shape
    bits = code_bits(tiled)
    n = tiled.shape[0]
    if not takes(n, features(tiled, bits)) or features(tiled, bits) != k:
        raise ValueError(f"wgmma GEMM takes N % 16 == 0 and K % {STEP_K} == 0 matching x, got "
                         f"N={n}, K={features(tiled, bits)}, x's K={k}")
    wg, bn, stages = config
    name = f"wo_wgmma<{_DT[x2.dtype]}, {0 if bits == 8 else 1}, {wg}, {bn}, {stages}>"
    function = _function(x2.device, name, shared_bytes(config, bits))
    launch(function, (-(-n // bn), -(-m // (64 * wg))), (128 * wg + 128,),
           (_ptr(x2), _ptr(tiled), _ptr(scale), _ptr(_float32(bias)), _ptr(out), np.int32(m),
            np.int32(n), np.int32(k)),
           x2.device, pdl.enabled(x2.device), shared_mem=shared_bytes(config, bits))


def _function(device: torch.device, name: str, shared: int) -> Any:
    """The named kernel, compiled for sm_90a at first use and allowed its shared memory."""
    key = (device.index, name)
    if key not in _FUNCTIONS:
        import cupy

        with cupy.cuda.Device(device.index):
            # CuPy appends its own -arch (sm_90) after these options; NVRTC keeps the first
            module = cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17", "-arch=sm_90a"),
                                    name_expressions=[name])
            function = module.get_function(name)
        allow_dynamic_shared(function, shared, device)
        _FUNCTIONS[key] = function
    return _FUNCTIONS[key]
