"""The Triton kernels that load before their PDL wait keep that promise (design note 46),
read from the SASS (griddepcontrol.wait is ACQBULK) that Triton compiles for sm_90, with the
nvdisasm Triton ships; no GPU.

- decode_attention_rope's kernel loads the block of the KV cache it attends to before the
  wait, so that the load overlaps the qkv GEMV before it; decode_attention_triton's split
  kernel, whose cache the kernel before may have just written, waits first.
- The residual add + RMSNorm with early_residual loads the residual row and the weight before
  the wait, the delta (the kernel before's output) after; without it, nothing before.
In all of them no store comes before the wait, and the next kernel is let start after it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tpquant.kernels import triton_norm  # noqa: E402
from tpquant.layers import decode_attention as da  # noqa: E402

# argument types other than int32 (the rest are sizes and strides)
ATTENTION_TYPES = {"Q": "*bf16", "QKV": "*bf16", "K": "*bf16", "V": "*bf16", "KS": "*fp32",
                   "VS": "*fp32", "COS": "*fp32", "SIN": "*fp32", "POS": "*i64", "ACC": "*fp32",
                   "M": "*fp32", "L": "*fp32", "sm_scale": "fp32"}
NORM_TYPES = {"x_ptr": "*bf16", "d_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16",
              "s_ptr": "*bf16", "k_float": "fp32", "eps": "fp32"}
# Llama-2-7B at TP 1, batch 1: one query head per KV head, head_dim 128; hidden size 4096
ATTENTION = dict(G=1, G_PAD=16, HD=128, BLOCK_N=da.BLOCK_N, INT8=False, IEEE=False, PDL=True,
                 stride_pos=1)
NORM = dict(HAS_DELTA=True, BLOCK=4096, PDL=True)


def _sass(kernel, types: dict, consts: dict, tmp: Path, num_warps: int = 4) -> list[str]:
    """The kernel's SASS instructions, compiled as a launch would specialize it (every pointer
    and integer divisible by 16, the positions' stride 1)."""
    names = kernel.arg_names
    consts = {n: v for n, v in consts.items() if n in names}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n][0] in "*i"}
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not nvdisasm.is_file():
        pytest.skip("this Triton wheel ships no nvdisasm")
    cubin = tmp / f"{kernel.__name__}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    out = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", line)]


def _loads_before_wait(sass: list[str]) -> list[str]:
    """The global loads before the wait; and nothing else that may not come first: no store,
    and the next kernel let start (PREEXIT) only after the wait."""
    wait = next(i for i, line in enumerate(sass) if "ACQBULK" in line)
    before = sass[:wait]
    assert not [line for line in before if "STG" in line or "PREEXIT" in line], before
    assert any("PREEXIT" in line for line in sass[wait:])
    return [line for line in before if "LDG" in line]


def _wide(loads: list[str]) -> int:
    return sum("LDG.E.128" in line for line in loads)


def test_rope_kernel_loads_its_cache_block_before_the_wait(tmp_path):
    loads = _loads_before_wait(_sass(da._decode_rope_kernel, ATTENTION_TYPES, ATTENTION,
                                     tmp_path))
    # keys and values of 64 positions x 128 bf16 values, 16 bytes a thread's load, 128 threads
    assert _wide(loads) == 2 * 64 * 128 * 2 // 16 // 128, loads


def test_split_kernel_waits_before_any_load(tmp_path):
    sass = _sass(da._decode_split_kernel, ATTENTION_TYPES, ATTENTION, tmp_path)
    assert _loads_before_wait(sass) == []


def test_norm_loads_residual_and_weight_before_the_wait(tmp_path):
    early = _loads_before_wait(_sass(triton_norm._rms_norm_kernel, NORM_TYPES,
                                     dict(NORM, EARLY=True), tmp_path, num_warps=8))
    # x and w: 4096 bf16 values each, 16 bytes a thread's load, 256 threads
    assert _wide(early) == 2 * 4096 * 2 // 16 // 256, early
    late = _loads_before_wait(_sass(triton_norm._rms_norm_kernel, NORM_TYPES,
                                    dict(NORM, EARLY=False), tmp_path, num_warps=8))
    assert late == [], late
