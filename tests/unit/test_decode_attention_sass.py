"""decode_attention_rope's kernel keeps its PDL promise (design note 46): the block of the KV
cache it attends to is loaded before griddepcontrol.wait (SASS ACQBULK), so that the load
overlaps the qkv GEMV before it; decode_attention_triton's split kernel, whose cache the
kernel before may have just written, waits first. Compiled by Triton for sm_90 and read with
the nvdisasm Triton ships; no GPU."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tpquant.layers import decode_attention as da  # noqa: E402

POINTERS = {"Q": "*bf16", "QKV": "*bf16", "K": "*bf16", "V": "*bf16", "KS": "*fp32",
            "VS": "*fp32", "COS": "*fp32", "SIN": "*fp32", "POS": "*i64", "ACC": "*fp32",
            "M": "*fp32", "L": "*fp32"}
# Llama-2-7B at TP 1, batch 1: one query head per KV head, head_dim 128
CONSTANTS = dict(G=1, G_PAD=16, HD=128, BLOCK_N=da.BLOCK_N, INT8=False, IEEE=False, PDL=True,
                 stride_pos=1)


def _sass(kernel, tmp: Path) -> list[str]:
    """The kernel's SASS instructions, compiled as a launch would specialize it (every pointer
    and stride divisible by 16, the positions' stride 1)."""
    names = kernel.arg_names
    consts = {n: v for n, v in CONSTANTS.items() if n in names}
    signature = {n: "constexpr" if n in consts else POINTERS.get(n, "fp32" if n == "sm_scale" else "i32")
                 for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in POINTERS or n.startswith("stride_") and n not in consts}
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not nvdisasm.is_file():
        pytest.skip("this Triton wheel ships no nvdisasm")
    cubin = tmp / f"{kernel.__name__}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    out = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", line)]


def _loads_before_wait(sass: list[str]) -> list[str]:
    wait = next(i for i, line in enumerate(sass) if "ACQBULK" in line)
    return [line for line in sass[:wait] if "LDG" in line]


def test_rope_kernel_loads_its_cache_block_before_the_wait(tmp_path):
    loads = _loads_before_wait(_sass(da._decode_rope_kernel, tmp_path))
    wide = [line for line in loads if "LDG.E.128" in line]
    # keys and values of 64 positions x 128 bf16 values, 16 bytes a thread's load, 128 threads
    assert len(wide) == 2 * 64 * 128 * 2 // 16 // 128, loads


def test_split_kernel_waits_before_any_load(tmp_path):
    assert _loads_before_wait(_sass(da._decode_split_kernel, tmp_path)) == []
