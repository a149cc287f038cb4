"""The kernels that read the tiled layouts (cpp/weight_only_gemv.cu: wo_tiles,
wo_tiles_dequant), int8 / int4 per channel and groupwise int4, against float64 references built
from the stored (untiled) layout.

One command (one GPU is enough):
    python3 -m pytest -q tests/gpu/test_kernels_tiles.py

int8 and int4 per channel, float16 and bfloat16, N and K multiples of the tile (16, 64 / 32)
but not of 128,
M from 1 to 300 through the dispatch (the tiled GEMV to M = 64; above, the CUTLASS GEMM on
Hopper with the build tools, else dequantize + cuBLAS) and each path forced (dot untiles
first), every candidate shape of the GEMV, a CUDA-graph capture;
groupwise with and without zeros, groups of 64, 128 and 256 (the kernel folds a group's sums
once per run of its k-tiles) and of 192 (not tiled: the dispatch untiles), M from 1 to 65,
every candidate shape; the staged GEMM (wo_staged) per channel and groupwise, every config.
Outputs are poisoned with NaN first. Tolerance: max |y - ref| <= TOL[dtype] * max |ref|, ref
being float64 math on the weight `tpquant.kernels.weight_only` dequantizes from the stored
layout (the tiles are not involved in the reference).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("cupy", reason="the tiled GEMV is compiled and launched through CuPy")

from tpquant.kernels import cuda_weight_only as cw  # noqa: E402
from tpquant.kernels import cutlass_gemm  # noqa: E402
from tpquant.kernels import weight_only as ref  # noqa: E402
from tpquant.kernels.tiles import tile, tile_int4  # noqa: E402
from tpquant.parallel.mapping import Mapping  # noqa: E402
from tpquant.quantization.schemes import Groupwise, WeightOnly  # noqa: E402

from .weight_only_checks import check, poison  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]
SHAPES = [(208, 320), (960, 576), (4096, 1024)]  # (N, K)
SHAPES_INT8 = [(208, 352), (4096, 1024)]  # int8: K a multiple of 32 only
BITS = [4, 8]
MS = [1, 2, 3, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 300]


@pytest.fixture(scope="module")
def device() -> torch.device:
    dev = Mapping.from_env().device()
    torch.cuda.set_device(dev)
    return dev


def _weights(n: int, k: int, device: torch.device, seed: int,
             bits: int = 4) -> dict[str, torch.Tensor]:
    """Stored per-channel tensors of a random weight, plus its tiles."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.1)
    t = {key: v.to(device) for key, v in WeightOnly(bits).quantize(w).items()}
    t["tiles"] = tile(t["qweight"], bits)
    return t


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    bias = torch.randn(n, generator=g).to(device=device, dtype=dtype)
    return x, bias


def _reference(t: dict[str, torch.Tensor], x: torch.Tensor, bias, bits: int = 4) -> torch.Tensor:
    w = ref.dequantize_weight_only(t["qweight"], t["scale"], bits).double()
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,n,k", [(4, *s) for s in SHAPES] + [(8, *s) for s in SHAPES_INT8])
def test_dispatch_on_tiles(device, bits: int, n: int, k: int, dtype: torch.dtype, m: int) -> None:
    """Through the public op, as WeightOnly.forward calls it, with and without bias."""
    t = _weights(n, k, device, seed=n + k, bits=bits)
    x, bias = _inputs(m, k, n, dtype, device, seed=m)
    for b in (None, bias):
        poison((m, n), dtype, device)
        y = ref.weight_only_matmul(x, t["tiles"], t["scale"], bits, b, tiled=True)
        check(y, _reference(t, x, b, bits), dtype, (bits, n, k, m, b is not None))


def _shape_cases() -> list[tuple[int, tuple[int, int, int, int]]]:
    """(M, kernel shape): every candidate of each M tile, at a full and a partial tile."""
    return [(m, shape) for m in (1, 5, 16, 9, 32, 27, 64, 40)
            for shape in cw.TILES_CANDIDATES[cw.tiles_nt(m)]]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("path", ["cuda", "dot", "dequant", "cutlass", "staged"])
@pytest.mark.parametrize("m", [1, 17, 64])
def test_each_path_forced(device, path: str, m: int, bits: int) -> None:
    """Each path on the tiles: the GEMV (to M = 64), dot (on the untiled weight), dequant, the
    CUTLASS GEMM (where it runs: compute capability 9.0, nvcc and CUTLASS headers), the staged
    GEMM (its default config off the table)."""
    if path == "cutlass" and not cutlass_gemm.available(device.index):
        pytest.skip("the CUTLASS GEMM needs a compute capability 9.0 GPU, nvcc and headers")
    n, k = 960, 576
    t = _weights(n, k, device, seed=13, bits=bits)
    x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=m + 1)
    poison((m, n), torch.bfloat16, device)
    y = ref.weight_only_matmul(x, t["tiles"], t["scale"], bits, bias, path=path, tiled=True)
    check(y, _reference(t, x, bias, bits), torch.bfloat16, (path, m))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m,shape", _shape_cases(), ids=str)
def test_every_kernel_shape(device, m: int, shape: tuple[int, int, int, int], bits: int) -> None:
    n, k = 4096, 1024
    t = _weights(n, k, device, seed=7, bits=bits)
    x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=11)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
    cw.tiles_gemv(x, t["tiles"], t["scale"], bias, out, shape=shape)
    check(out, _reference(t, x, bias, bits), torch.bfloat16, (m, shape))


@pytest.mark.parametrize("m", [1, 16, 40])
def test_int8_float16_every_plan(device, m: int) -> None:
    """float16 int8 (the PRMT path) on every candidate shape of the narrow and wide plans."""
    n, k = 960, 576
    t = _weights(n, k, device, seed=29, bits=8)
    x, bias = _inputs(m, k, n, torch.float16, device, seed=31)
    for shape in cw.TILES_CANDIDATES[cw.tiles_nt(m)]:
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device=device)
        cw.tiles_gemv(x, t["tiles"], t["scale"], bias, out, shape=shape)
        check(out, _reference(t, x, bias, 8), torch.float16, (m, shape))


def test_refuses_a_shape_past_shared_memory(device) -> None:
    t = _weights(208, 320, device, seed=1)
    x, _ = _inputs(27, 320, 208, torch.bfloat16, device, seed=1)
    out = torch.empty(27, 208, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="shared memory"):
        cw.tiles_gemv(x, t["tiles"], t["scale"], None, out, shape=(2, 16, 1, 1))


def test_chosen_shape_is_a_candidate_that_fits(device) -> None:
    for m in (1, 9, 17, 32, 64):
        for n in (208, 4096, 22016):
            nt, *shape = cw.tiles_shape(m, n, device, torch.bfloat16)
            assert nt == cw.tiles_nt(m) and tuple(shape) in cw.TILES_CANDIDATES[nt]
            assert cw.tiles_shared_bytes(nt, *shape[:3]) <= cw.TILES_SHARED_BYTES


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_from_tiles_is_exact(device, dtype: torch.dtype, bits: int) -> None:
    """W = q * scale rounded once to dtype, element for element as torch rounds it."""
    n, k = 208, 320 if bits == 4 else 352
    t = _weights(n, k, device, seed=3, bits=bits)
    poison((n, k), dtype, device)
    w = cw.tiles_dequantize(t["tiles"], t["scale"], dtype)
    expected = ref.dequantize_weight_only(t["qweight"], t["scale"], bits).to(dtype)
    assert torch.equal(w, expected)


@pytest.mark.parametrize("bits", BITS)
def test_long_k(device, bits: int) -> None:
    """K = 11008 (Llama-2-7B down_proj): 172 (int8: 344) k-tiles shared out unevenly among the
    warps."""
    t = _weights(64, 11008, device, seed=5, bits=bits)
    for m in (1, 20, 50):
        x, bias = _inputs(m, 11008, 64, torch.bfloat16, device, seed=m)
        y = ref.weight_only_matmul(x, t["tiles"], t["scale"], bits, bias, tiled=True)
        check(y, _reference(t, x, bias, bits), torch.bfloat16, m)


@pytest.mark.parametrize("bits", BITS)
def test_scheme_packs_and_runs_tiles(device, bits: int) -> None:
    """WeightOnly.pack tiles a weight that divides into tiles; forward runs on them."""
    scheme = WeightOnly(bits, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    stored = {k_: v.to(device) for k_, v in scheme.quantize(torch.randn(96, 192, generator=g)).items()}
    packed = scheme.pack(stored)
    assert set(packed) == {"qweight_tiles", "scale"}
    x, bias = _inputs(3, 192, 96, torch.bfloat16, device, seed=2)
    y = scheme.forward(x, packed, bias)
    check(y, _reference(stored, x, bias, bits), torch.bfloat16, "scheme")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 17, 40, 100])
def test_cuda_graph_capture_and_replay(device, m: int, bits: int) -> None:
    """Capture the tiled path in a CUDA graph, replay it on new inputs."""
    n, k = 960, 576
    t = _weights(n, k, device, seed=21, bits=bits)
    x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=23)

    def call():
        return ref.weight_only_matmul(x, t["tiles"], t["scale"], bits, bias, tiled=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = call()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = call()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_static, eager)
    for seed in (31, 32):
        fresh, _ = _inputs(m, k, n, torch.bfloat16, device, seed)
        x.copy_(fresh)
        y_static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(y_static, _reference(t, x, bias, bits), torch.bfloat16, ("graph", m, seed))


def test_tiled_gemv_refuses_large_m(device) -> None:
    t = _weights(208, 320, device, seed=1)
    x, _ = _inputs(cw.TILES_MAX_M + 1, 320, 208, torch.bfloat16, device, seed=1)
    out = torch.empty(x.shape[0], 208, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="tiled GEMV takes M"):
        cw.tiles_gemv(x, t["tiles"], t["scale"], None, out)


# ---- groupwise int4 on the tiles -----------------------------------------------------------

GROUPWISE_SHAPES = [(208, 320, 64), (960, 576, 64), (4096, 1024, 128), (256, 1152, 192),
                    (512, 2048, 256)]  # (N, K, group)


def _gw_weights(n: int, k: int, group: int, zeros: bool, device: torch.device,
                seed: int) -> dict[str, torch.Tensor]:
    """Stored groupwise tensors of a random weight (as Groupwise.quantize makes them), plus the
    tiles of its codes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.1)
    t = {key: v.to(device) for key, v in Groupwise(group, zeros).quantize(w).items()}
    t["tiles"] = tile_int4(t["qweight"])
    return t


def _gw_reference(t: dict[str, torch.Tensor], group: int, x: torch.Tensor, bias,
                  pqs=None) -> torch.Tensor:
    w = ref.dequantize_groupwise(t["qweight"], t["scales"], t.get("zeros"), group).double()
    xd = x.double() if pqs is None else x.double() * pqs.double()
    y = xd @ w.t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("m", [1, 3, 16, 17, 33, 64, 65])
@pytest.mark.parametrize("zeros", [True, False], ids=["zeros", "symmetric"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,group", GROUPWISE_SHAPES)
def test_groupwise_dispatch_on_tiles(device, n: int, k: int, group: int, dtype: torch.dtype,
                                     zeros: bool, m: int) -> None:
    """Through the public op, as Groupwise.forward calls it, with and without bias."""
    t = _gw_weights(n, k, group, zeros, device, seed=n + group)
    x, bias = _inputs(m, k, n, dtype, device, seed=m)
    for b in (None, bias):
        poison((m, n), dtype, device)
        y = ref.groupwise_matmul(x, t["tiles"], t["scales"], t.get("zeros"), group, None, b,
                                 tiled=True)
        check(y, _gw_reference(t, group, x, b), dtype, (n, k, group, zeros, m, b is not None))


def _gw_shape_cases() -> list[tuple[int, tuple[int, int, int, int]]]:
    """(M, kernel shape): every groupwise candidate of each M tile that fits in shared memory."""
    return [(m, shape) for m in (1, 16, 27, 40, 64)
            for shape in cw.TILES_CANDIDATES[cw.tiles_nt(m)]
            if cw.tiles_shared_bytes(cw.tiles_nt(m), *shape[:3], grouped=True)
            <= cw.TILES_SHARED_BYTES]


@pytest.mark.parametrize("group", [128, 256])
@pytest.mark.parametrize("m,shape", _gw_shape_cases(), ids=str)
def test_groupwise_every_kernel_shape(device, m: int, shape: tuple[int, int, int, int],
                                      group: int) -> None:
    """K = 1280: 20 k-tiles, 10 groups of 2 or 5 of 4, so that the K warps' runs of k-tiles
    start and end inside groups too."""
    n, k = 4096, 1280
    t = _gw_weights(n, k, group, True, device, seed=17)
    x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=19)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
    cw.tiles_gemv(x, t["tiles"], t["scales"], bias, out, zeros=t["zeros"], group=group,
                  shape=shape)
    check(out, _gw_reference(t, group, x, bias), torch.bfloat16, (m, shape))


@pytest.mark.parametrize("zeros", [True, False], ids=["zeros", "symmetric"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_groupwise_dequantize_from_tiles_is_exact(device, dtype: torch.dtype,
                                                  zeros: bool) -> None:
    """W = (u - zero) * scale or q * scale in float32, rounded once to dtype, as torch does."""
    t = _gw_weights(208, 320, 64, zeros, device, seed=23)
    poison((208, 320), dtype, device)
    w = cw.tiles_dequantize(t["tiles"], t["scales"], dtype, zeros=t.get("zeros"), group=64)
    expected = ref.dequantize_groupwise(t["qweight"], t["scales"], t.get("zeros"), 64).to(dtype)
    assert torch.equal(w, expected)


def test_groupwise_tiles_with_a_pre_quant_scale_are_untiled(device) -> None:
    """The tiled GEMV does not multiply x by a pre-quant scale: such a weight runs untiled."""
    n, k, group = 960, 576, 64
    t = _gw_weights(n, k, group, True, device, seed=29)
    x, bias = _inputs(5, k, n, torch.bfloat16, device, seed=31)
    pqs = torch.rand(k, generator=torch.Generator().manual_seed(37)).add(0.5).to(device)
    y = ref.groupwise_matmul(x, t["tiles"], t["scales"], t["zeros"], group, pqs, bias, tiled=True)
    check(y, _gw_reference(t, group, x, bias, pqs), torch.bfloat16, "pqs")


@pytest.mark.parametrize("m", [1, 40])
def test_groupwise_scheme_and_cuda_graph(device, m: int) -> None:
    """Groupwise.pack tiles; forward on the tiles captured in a CUDA graph, replayed on new x."""
    n, k = 960, 576
    scheme = Groupwise(64, zeros=True, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(41)
    stored = {k_: v.to(device) for k_, v in scheme.quantize(torch.randn(n, k, generator=g)).items()}
    packed = scheme.pack(stored)
    assert "qweight_tiles" in packed and "qweight" not in packed
    x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=43)
    eager = scheme.forward(x, packed, bias)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = scheme.forward(x, packed, bias)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_static, eager)
    fresh, _ = _inputs(m, k, n, torch.bfloat16, device, seed=47)
    x.copy_(fresh)
    y_static.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(y_static, _gw_reference(stored, 64, x, bias), torch.bfloat16, ("graph", m))


# ---- the staged GEMM (wo_staged): x through shared memory ---------------------------------------


def _staged_cases() -> list[tuple[int, tuple[int, ...]]]:
    """(M, config): every config of each token-tile count, at a full and a partial tile."""
    return [(m, c) for nt, configs in cw.STAGED_CONFIGS.items() for c in configs
            for m in (8 * nt, 8 * nt - 7)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m,config", _staged_cases(), ids=str)
def test_staged_every_config(device, m: int, config: tuple[int, ...], bits: int) -> None:
    """Every config, unsplit and with K splits (float32 partials), with and without bias."""
    n, k = 4096, 1024
    t = _weights(n, k, device, seed=41, bits=bits)
    x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=43)
    for splits, b in ((1, bias), (3, bias), (None, None)):
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
        cw.staged_gemm(x, t["tiles"], t["scale"], b, out, config=config, splits=splits)
        check(out, _reference(t, x, b, bits), torch.bfloat16, (m, config, splits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(208, 320), (960, 576), (64, 11008)])
def test_staged_odd_shapes(device, n: int, k: int, dtype: torch.dtype, bits: int) -> None:
    """N and K that are not multiples of a block's rows or a stage's k-tiles; a long K split
    unevenly; float16 and bfloat16."""
    if bits == 8 and k % 32:
        pytest.skip("int8 tiles take K % 32 == 0")
    t = _weights(n, k, device, seed=n + k, bits=bits)
    for m in (9, 27, 64):
        for config in (cw.STAGED_CONFIGS[cw.tiles_nt(m)][0], cw.STAGED_CONFIGS[cw.tiles_nt(m)][-1]):
            x, bias = _inputs(m, k, n, dtype, device, seed=m)
            for splits in (1, 5):
                out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
                cw.staged_gemm(x, t["tiles"], t["scale"], bias, out, config=config, splits=splits)
                check(out, _reference(t, x, bias, bits), dtype, (n, k, m, config, splits))


def test_staged_refuses_too_many_tokens(device) -> None:
    t = _weights(208, 320, device, seed=1)
    x, _ = _inputs(17, 320, 208, torch.bfloat16, device, seed=1)
    out = torch.empty(17, 208, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="M <= 16"):
        cw.staged_gemm(x, t["tiles"], t["scale"], None, out, config=cw.STAGED_CONFIGS[2][0])


@pytest.mark.parametrize("splits", [1, 8])
def test_staged_cuda_graph(device, splits: int) -> None:
    """Captured in a CUDA graph (a cluster launch with K splits), replayed on new inputs."""
    n, k, m = 960, 4096, 40
    t = _weights(n, k, device, seed=51)
    x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=53)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
    config = cw.STAGED_CONFIGS[8][0]

    def call():
        cw.staged_gemm(x, t["tiles"], t["scale"], bias, out, config=config, splits=splits)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for seed in (61, 62):
        new, _ = _inputs(m, k, n, torch.bfloat16, device, seed=seed)
        x.copy_(new)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, _reference(t, x, bias), torch.bfloat16, (splits, seed))


@contextlib.contextmanager
def _staged_table(entry: dict, device, tmp_path, monkeypatch):
    """The dispatch reading a staged table of one entry for this GPU (written here); yields the
    list that each staged_gemm call's keyword arguments are appended to."""
    path = tmp_path / "staged.json"
    path.write_text(json.dumps({"devices": {torch.cuda.get_device_name(device): [entry]}}))
    monkeypatch.setenv("TPQUANT_STAGED_TUNED", str(path))
    cw.staged_table.cache_clear()
    calls = []
    real = cw.staged_gemm
    monkeypatch.setattr(cw, "staged_gemm", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    try:
        yield calls
    finally:
        monkeypatch.delenv("TPQUANT_STAGED_TUNED")
        cw.staged_table.cache_clear()


def test_staged_taken_where_the_table_names_the_weight(device, tmp_path, monkeypatch) -> None:
    """The automatic dispatch runs the staged GEMM at M = 33-64 on a weight its table names
    with a config of 8 token tiles, with that config, and not at M = 32 (4 token tiles) or on
    other weights."""
    n, k = 960, 576
    entry = {"dtype": "bfloat16", "mode": 1, "n": n, "k": k, "config": [8, 1, 4, 2, 4, 3]}
    with _staged_table(entry, device, tmp_path, monkeypatch) as calls:
        t = _weights(n, k, device, seed=71)
        other = _weights(208, 320, device, seed=72)
        for m, expect in ((32, []), (33, [(8, 1, 4, 2, 4, 3)]), (64, [(8, 1, 4, 2, 4, 3)])):
            calls.clear()
            x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=m)
            y = ref.weight_only_matmul(x, t["tiles"], t["scale"], 4, bias, tiled=True)
            check(y, _reference(t, x, bias), torch.bfloat16, m)
            assert [c["config"] for c in calls] == expect, m
        calls.clear()
        x, _ = _inputs(64, 320, 208, torch.bfloat16, device, seed=73)
        ref.weight_only_matmul(x, other["tiles"], other["scale"], 4, None, tiled=True)
        assert calls == []


def test_staged_path_refuses_a_pre_quant_scale(device) -> None:
    """The staged GEMM does not multiply x by a pre-quant scale: forced, it refuses one."""
    t = _gw_weights(208, 256, 128, True, device, seed=81)
    x, _ = _inputs(40, 256, 208, torch.bfloat16, device, seed=82)
    pqs = torch.rand(256, generator=torch.Generator().manual_seed(83)).add(0.5).to(device)
    with pytest.raises(ValueError, match="path 'staged'"):
        ref.groupwise_matmul(x, t["tiles"], t["scales"], t["zeros"], 128, pqs, None,
                             path="staged", tiled=True)


@pytest.fixture(scope="module")
def staged_groupwise_kernels(device) -> None:
    """Every groupwise instantiation the tests below launch, compiled in one module (one
    compile instead of one per config)."""
    names = [f"wo_staged<{{dt}}, {mode_}, {', '.join(map(str, c))}>" for mode_ in (2, 3)
             for configs in cw.STAGED_CONFIGS.values() for c in configs]
    cw._tiles_functions(device, torch.bfloat16, names)


@pytest.mark.parametrize("zeros", [True, False], ids=["zeros", "symmetric"])
@pytest.mark.parametrize("m,config", _staged_cases(), ids=str)
def test_staged_groupwise_every_config(device, staged_groupwise_kernels, m: int,
                                       config: tuple[int, ...], zeros: bool) -> None:
    """Groupwise int4, every config: groups of 1, 2 and 4 k-tiles (K = 1280: 20 k-tiles, so
    groups of 4 straddle the stages of a 4-tile stage's K warps and the splits), unsplit, with
    3 K splits and the rule's, with and without bias."""
    n, k = 4096, 1280
    x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=85)
    for group in (64, 128, 256):
        t = _gw_weights(n, k, group, zeros, device, seed=group)
        for splits, b in ((1, bias), (3, bias), (None, None)):
            out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
            cw.staged_gemm(x, t["tiles"], t["scales"], b, out, config=config, splits=splits,
                           zeros=t.get("zeros"), group=group)
            check(out, _gw_reference(t, group, x, b), torch.bfloat16, (m, config, group, splits))


@pytest.mark.parametrize("zeros", [True, False], ids=["zeros", "symmetric"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,group", [(208, 320, 64), (960, 576, 64), (64, 11008, 128)])
def test_staged_groupwise_odd_shapes(device, n: int, k: int, group: int, dtype: torch.dtype,
                                     zeros: bool) -> None:
    """Groupwise with N and K off a block's rows and a stage's k-tiles, a long K split
    unevenly, float16 and bfloat16."""
    t = _gw_weights(n, k, group, zeros, device, seed=n + k)
    for m in (9, 27, 64):
        x, bias = _inputs(m, k, n, dtype, device, seed=m)
        for config in (cw.STAGED_CONFIGS[cw.tiles_nt(m)][0], cw.STAGED_CONFIGS[cw.tiles_nt(m)][-1]):
            for splits in (1, 5):
                out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
                cw.staged_gemm(x, t["tiles"], t["scales"], bias, out, config=config,
                               splits=splits, zeros=t.get("zeros"), group=group)
                check(out, _gw_reference(t, group, x, bias), dtype, (n, k, m, config, splits))


def test_staged_groupwise_taken_where_the_table_names_the_weight(device, tmp_path,
                                                                 monkeypatch) -> None:
    """A groupwise table entry names its group size, and one of 4 token tiles M = 17-32: the
    dispatch takes the staged GEMM for that weight and group at M = 24 (forced too), and not
    for the same weight in other groups."""
    n, k = 960, 1024
    entry = {"dtype": "bfloat16", "mode": 2, "group": 128, "n": n, "k": k,
             "config": [4, 1, 4, 2, 4, 3]}
    with _staged_table(entry, device, tmp_path, monkeypatch) as calls:
        for group, path_, expect in ((128, None, [((4, 1, 4, 2, 4, 3), 128)]), (64, None, []),
                                     (256, "staged", [(cw.STAGED_CONFIGS[4][0], 256)])):
            t = _gw_weights(n, k, group, True, device, seed=group + 1)
            calls.clear()
            x, bias = _inputs(24, k, n, torch.bfloat16, device, seed=group)
            y = ref.groupwise_matmul(x, t["tiles"], t["scales"], t["zeros"], group, None, bias,
                                     path=path_, tiled=True)
            check(y, _gw_reference(t, group, x, bias), torch.bfloat16, group)
            assert [(c["config"], c["group"]) for c in calls] == expect, group
