"""The tiled GEMV's compiled code keeps its PDL promise (design notes 44, 45): the first round
of weights (and, per channel below 8 token tiles, the channel scales: int8's loads, int4's
copies to shared memory) is issued before griddepcontrol.wait, and x, which the kernel before
writes, only after it. ptxas once moved the wait to the kernel's top; this reads the SASS that
nvcc's ptxas makes of a few instantiations
(the product compiles the same source with NVRTC, whose ptxas comes with the same toolkit).
Needs nvcc 12.8+ (the fence's PTX ISA 8.6) and cuobjdump (CUDA's, or the copy Triton ships);
no GPU."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tpquant.kernels import cuda_weight_only, cutlass_gemm

# (DT, MODE, NT, RT, KW, RW, U): int4 per channel, groupwise, int8 (bfloat16 at 1, 2 and 8
# token tiles, float16 at 4)
SHAPES = [(1, 1, 1, 1, 8, 1, 4), (1, 2, 1, 1, 4, 1, 2), (1, 0, 1, 2, 4, 1, 2),
          (1, 0, 2, 2, 2, 2, 1), (1, 0, 8, 2, 2, 2, 1), (0, 0, 4, 1, 4, 1, 2)]
ARGS = ("const unsigned short*, const uint4*, const float*, const float*, const float*, "
        "unsigned short*, int, int, int, int")


def _cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump")]
    nvcc = cutlass_gemm._nvcc()
    if nvcc:
        candidates.append(str(Path(nvcc).parent / "cuobjdump"))
    try:
        import triton.backends.nvidia as nv  # its wheel carries CUDA's binary tools
        candidates.append(str(Path(nv.__file__).parent / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).is_file()), None)


def _sass(tmp_path: Path) -> dict[tuple[int, ...], list[str]]:
    """Each SHAPES instantiation's SASS opcodes (LDG.E.NA.128.CONSTANT, ...), in order."""
    nvcc, cuobjdump = cutlass_gemm._nvcc(), _cuobjdump()
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump")
    release = tuple(int(v) for v in cutlass_gemm._nvcc_release(nvcc).split("."))
    if release < (12, 8):
        pytest.skip(f"needs nvcc 12.8+ (the fence's PTX ISA 8.6), found {release}")
    src = tmp_path / "tiles.cu"
    src.write_text(f'#include "{cuda_weight_only.SOURCE}"\n' + "".join(
        f"template __global__ void wo_tiles<{','.join(map(str, s))}>({ARGS});\n" for s in SHAPES))
    cubin = tmp_path / "tiles.cubin"
    built = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-O3", "-cubin", "-o",
                            str(cubin), str(src)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    text = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True,
                          text=True).stdout
    out = {}
    for part in text.split("Function : ")[1:]:
        args = re.match(r"_Z8wo_tilesILi(\d)ELi(\d)ELi(\d)ELi(\d)ELi(\d)ELi(\d)ELi(\d)E", part)
        if args:
            out[tuple(int(a) for a in args.groups())] = re.findall(
                r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", part)
    assert set(out) == set(SHAPES)
    return out


def test_first_weights_and_early_scales_load_before_the_wait(tmp_path: Path) -> None:
    for shape, code in _sass(tmp_path).items():
        dt, mode, nt, rt, kw, rw, u = shape
        waits = [i for i, op in enumerate(code) if op == "ACQBULK"]  # griddepcontrol.wait
        assert len(waits) == 1, shape
        before = [op for op in code[:waits[0]] if op.startswith(("LDG", "LD."))]
        weights = [op for op in before if ".NA." in op]  # L1::no_allocate: the weights
        loaded = [op for op in before if op.startswith("LDG") and ".NA." not in op
                  and ".128" not in op and ".64" not in op]  # 32-bit, read-only (LDG, LDGSTS)
        copied = [op for op in loaded if op.startswith("LDGSTS")]  # cp.async to shared memory
        assert len(weights) == u * rt, (shape, before)  # the whole first round
        early = mode <= 1 and nt <= 4  # TilesPlan::EARLY_SCALE; int4 copies (SCALE_COPY)
        assert len(loaded) == (2 * rt if early else 0), (shape, before)
        assert len(copied) == (len(loaded) if mode == 1 else 0), (shape, before)
        assert len(before) == len(weights) + len(loaded), (shape, before)  # no load of x
