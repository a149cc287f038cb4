"""The weight-only kernels on CUDA (Triton, and the CUDA GEMV) against float64 references built
from the torch oracle.

One command (one GPU is enough; under mpirun every rank runs them on its own GPU):
    python3 -m pytest -q tests/gpu/test_kernels_weight_only.py

Every path (cuda, gemv, dot, dequant) x scheme (int8 / int4 per channel; groupwise int4 with zeros,
symmetric, with a pre-quant scale) x dtype (float16, bfloat16) x M (1, 3, 17, 4096), with N
and K not multiples of 128 where the scheme allows; then the automatic dispatch through the
public ops (autotuned), the "reference" override, float32 x, and a CUDA-graph capture.
Outputs are poisoned with NaN first. Tolerance: max |y - ref| <= TOL[dtype] * max |ref|,
where ref is float64 math on the weight tpquant.kernels.weight_only dequantizes.
"""

from __future__ import annotations

import warnings
import zlib

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton", reason="the fast weight-only kernels are Triton kernels")

from tpquant.kernels import cuda_weight_only as cw  # noqa: E402
from tpquant.kernels import triton_weight_only as tw  # noqa: E402
from tpquant.kernels import weight_only as ref  # noqa: E402
from tpquant.parallel.mapping import Mapping  # noqa: E402
from tpquant.quantization.schemes import Groupwise, WeightOnly  # noqa: E402

from .weight_only_checks import check, poison  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]
SCHEMES = {
    # name: (scheme, N, K); N and K are not multiples of 128 where the group size allows.
    "wo8": (WeightOnly(8), 200, 328),
    "wo4": (WeightOnly(4), 200, 328),
    "gw64-zeros": (Groupwise(group_size=64, zeros=True), 200, 320),
    "gw64-sym": (Groupwise(group_size=64, zeros=False), 200, 320),
    "gw128-zeros-pqs": (Groupwise(group_size=128, zeros=True, pre_quant_scale=True), 200, 384),
}
MS = [1, 3, 17, 4096]
# Explicit kernel configs: every path without waiting for the autotuner on every case.
GEMV_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4}


def _dot_config(m: int) -> dict[str, int]:
    return {"BLOCK_M": 16 if m < 64 else 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}


@pytest.fixture(scope="module")
def device() -> torch.device:
    dev = Mapping.from_env().device()
    torch.cuda.set_device(dev)
    return dev


def _tensors(name: str, device: torch.device, seed: int,
             shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """The scheme's tensors of a random weight [N, K] (SCHEMES' shape unless given)."""
    scheme, n, k = SCHEMES[name]
    n, k = shape or (n, k)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.1)
    if isinstance(scheme, Groupwise) and scheme.pre_quant_scale:
        t = scheme.quantize(w, pre_quant_scale=torch.rand(k, generator=g).add(0.5))
    else:
        t = scheme.quantize(w)
    return {key: v.to(device) for key, v in t.items()}


def _inputs(name: str, m: int, dtype: torch.dtype, device: torch.device, seed: int):
    """x [m, K] and, for bfloat16 only (fewer kernel variants to compile), a bias [N]."""
    _, n, k = SCHEMES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    bias = torch.randn(n, generator=g).to(device) if dtype == torch.bfloat16 else None
    return x, bias


def _seed(*parts) -> int:
    """A seed that is the same in every run (str hashes are salted per process)."""
    return zlib.crc32(repr(parts).encode()) % 10_000


def _reference(name: str, t: dict[str, torch.Tensor], x: torch.Tensor, bias) -> torch.Tensor:
    """float64 (x * pqs) @ W^T + bias, W from the torch reference dequantization."""
    scheme = SCHEMES[name][0]
    xd = x.double()
    if isinstance(scheme, WeightOnly):
        w = ref.dequantize_weight_only(t["qweight"], t["scale"], scheme.bits)
    else:
        w = ref.dequantize_groupwise(t["qweight"], t["scales"], t.get("zeros"), scheme.group_size)
        if "pre_quant_scale" in t:
            xd = xd * t["pre_quant_scale"].double()
    y = xd @ w.double().t()
    return y if bias is None else y + bias.double()


def _launch(name, t, x, bias, **kw) -> torch.Tensor:
    scheme = SCHEMES[name][0]
    if isinstance(scheme, WeightOnly):
        return tw.weight_only_matmul(x, t["qweight"], t["scale"], scheme.bits, bias, **kw)
    return tw.groupwise_matmul(
        x, t["qweight"], t["scales"], t.get("zeros"), scheme.group_size,
        t.get("pre_quant_scale"), bias, **kw,
    )


def _public(name, t, x, bias, **kw) -> torch.Tensor:
    """Through tpquant.kernels.weight_only, as Scheme.forward calls it."""
    scheme = SCHEMES[name][0]
    if isinstance(scheme, WeightOnly):
        return ref.weight_only_matmul(x, t["qweight"], t["scale"], scheme.bits, bias, **kw)
    return ref.groupwise_matmul(
        x, t["qweight"], t["scales"], t.get("zeros"), scheme.group_size,
        t.get("pre_quant_scale"), bias, **kw,
    )


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["gemv", "dot", "dequant"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_each_path(device, name: str, path: str, dtype: torch.dtype, m: int) -> None:
    seed = _seed(name, path, dtype, m)
    t = _tensors(name, device, seed)
    x, bias = _inputs(name, m, dtype, device, seed + 1)
    config = {"gemv": GEMV_CONFIG, "dot": _dot_config(m), "dequant": None}[path]
    out = torch.full((m, SCHEMES[name][1]), float("nan"), dtype=dtype, device=device)
    y = _launch(name, t, x, bias, path=path, config=config, out=out)
    check(y, _reference(name, t, x, bias), dtype, (name, path, m))


@pytest.mark.parametrize("variant", ["SWAP", "SPLIT_X", "SWAP+SPLIT_X"])
@pytest.mark.parametrize("m", [3, 17, 64, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SCHEMES))
def test_dot_variants(device, name: str, dtype: torch.dtype, m: int, variant: str) -> None:
    """dot with swapped operands and/or x split into even and odd columns (int4)."""
    seed = _seed(name, variant, dtype, m)
    t = _tensors(name, device, seed)
    x, bias = _inputs(name, m, dtype, device, seed + 1)
    config = dict(_dot_config(m), **{flag: True for flag in variant.split("+")})
    out = torch.full((m, SCHEMES[name][1]), float("nan"), dtype=dtype, device=device)
    y = _launch(name, t, x, bias, path="dot", config=config, out=out)
    check(y, _reference(name, t, x, bias), dtype, (name, variant, m))


def _tunable(name: str) -> list[int]:
    """Indices of the DOT_CONFIGS the autotuner keeps for a scheme at M = 2 BLOCK_M - 1
    (the autotuner's own pruning rule, `tw._fits`, with a split-K chunk every BLOCK_K divides)."""
    scheme = SCHEMES[name][0]
    group, bits = getattr(scheme, "group_size", 0), getattr(scheme, "bits", 4)
    return [i for i, c in enumerate(tw.DOT_CONFIGS)
            if tw._fits(c.kwargs, None, tw.m_bucket(2 * c.kwargs["BLOCK_M"] - 1), group,
                        tw.K_ALIGN, 32 // bits, bits)]


@pytest.mark.parametrize("name,index", [
    (name, i) for name in ("wo8", "wo4", "gw128-zeros-pqs") for i in _tunable(name)
])
def test_every_autotuned_dot_config(device, name: str, index: int) -> None:
    """Each config the autotuner may pick, at an M of its bucket (bfloat16): a config that
    computes wrongly would otherwise only show when it wins the tuning."""
    cfg = tw.DOT_CONFIGS[index]
    meta = dict(cfg.kwargs)
    m = 2 * meta["BLOCK_M"] - 1
    seed = _seed(name, index)
    t = _tensors(name, device, seed)
    x, bias = _inputs(name, m, torch.bfloat16, device, seed + 1)
    config = dict(meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    y = _launch(name, t, x, bias, path="dot", config=config)
    check(y, _reference(name, t, x, bias), torch.bfloat16, (name, meta, m))


# The CUDA GEMV takes K in whole 16-byte chunks (32 int4 / 16 int8 codes); N = 203 leaves a
# partial group of output rows.
CUDA_K = {"wo8": 336, "wo4": 352, "gw64-zeros": 320, "gw64-sym": 320, "gw128-zeros-pqs": 384}
CUDA_N = 203


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SCHEMES))
def test_cuda_path(device, name: str, dtype: torch.dtype, m: int, splits: int) -> None:
    """The CUDA GEMV (cpp/weight_only_gemv.cu): every scheme, M tile and a split-K of 3."""
    pytest.importorskip("cupy", reason="the CUDA GEMV is compiled and launched through CuPy")
    k, seed = CUDA_K[name], _seed("cuda", name, dtype, m, splits)
    t = _tensors(name, device, seed, (CUDA_N, k))
    g = torch.Generator().manual_seed(seed + 1)
    # Activations of a few hundred, as in real layers, and a bias in bfloat16 runs.
    x = (torch.randn(m, k, generator=g) * 100).to(device=device, dtype=dtype)
    bias = torch.randn(CUDA_N, generator=g).to(device) if dtype == torch.bfloat16 else None
    out = torch.full((m, CUDA_N), float("nan"), dtype=dtype, device=device)
    y = _launch(name, t, x, bias, path="cuda", split_k=splits, out=out)
    check(y, _reference(name, t, x, bias), dtype, ("cuda", name, m, splits))


def _bits_group(name: str) -> tuple[int, int]:
    """(bits, group size; 0 = per channel) of a SCHEMES entry."""
    scheme = SCHEMES[name][0]
    return getattr(scheme, "bits", 4), getattr(scheme, "group_size", 0)


def _forced_cases() -> list[tuple[str, str, int]]:
    """(scheme, kernel, M) for each M tile of each kernel that takes the scheme."""
    cases = []
    for name in SCHEMES:
        cases += [(name, "fma", m) for m in (1, 2, 3, 8, 9, 16)]
        if cw.mma_takes(*_bits_group(name)):
            cases += [(name, "mma", m) for m in (1, 2, 3, 8, 9, 16, 17, 24, 32)]
    return cases


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,kernel,m", _forced_cases())
def test_cuda_kernels_forced(device, name: str, kernel: str, m: int, dtype: torch.dtype,
                             splits: int) -> None:
    """Each CUDA GEMV kernel at every M tile it has (the mma kernel: 1, 2 and 4 tiles of 8
    tokens, M not a multiple of 8), N = 203 (a partial 16-row warp), K with a partial last
    step, split-K of 3."""
    pytest.importorskip("cupy", reason="the CUDA GEMV is compiled and launched through CuPy")
    scheme = SCHEMES[name][0]
    bits, group = _bits_group(name)
    k, seed = CUDA_K[name], _seed("cuda-forced", name, dtype, kernel, m, splits)
    t = _tensors(name, device, seed, (CUDA_N, k))
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(m, k, generator=g) * 100).to(device=device, dtype=dtype)
    bias = torch.randn(CUDA_N, generator=g).to(device) if dtype == torch.bfloat16 else None
    out = torch.full((m, CUDA_N), float("nan"), dtype=dtype, device=device)
    if isinstance(scheme, WeightOnly):
        args = (t["qweight"], t["scale"], None, None, bits, 0)
    else:
        args = (t["qweight"], t["scales"], t.get("zeros"), t.get("pre_quant_scale"), 4, group)
    cw.gemv(x, *args, bias, out, splits=splits, kernel=kernel)
    check(out, _reference(name, t, x, bias), dtype, ("cuda", kernel, name, m, splits))


@pytest.mark.parametrize("kernel,m", [("fma", 1), ("mma", 8)])
def test_cuda_split_k_is_deterministic(device, kernel: str, m: int) -> None:
    """Split-K's partials summed in split order: bitwise the same over repeated launches,
    and right."""
    pytest.importorskip("cupy", reason="the CUDA GEMV is compiled and launched through CuPy")
    n, k, seed = 4096, 4096, _seed("cuda-split", kernel, m)
    t = _tensors("wo4", device, seed, (n, k))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=torch.bfloat16)
    outs = [torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
            for _ in range(20)]
    for out in outs:
        cw.gemv(x, t["qweight"], t["scale"], None, None, 4, 0, None, out, splits=7,
                kernel=kernel)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    check(outs[0], _reference("wo4", t, x, None), torch.bfloat16, ("cuda split", kernel))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,m", [
    (name, m) for name in SCHEMES for m in (1, 2, 4, 8, 16, 32)
    if cw.supports(m, 4096, *_bits_group(name))
])
def test_cuda_path_long_k(device, name: str, dtype: torch.dtype, m: int) -> None:
    """K = 4096: every lane sums several chunks (int4: 4, int8: 8) before the lanes meet,
    with the kernel, rows per warp and split-K the dispatch chooses."""
    pytest.importorskip("cupy", reason="the CUDA GEMV is compiled and launched through CuPy")
    n, k, seed = 96, 4096, _seed("cuda-long", name, dtype, m)
    t = _tensors(name, device, seed, (n, k))
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(m, k, generator=g) + 1).to(device=device, dtype=dtype)  # a mean, as after SiLU
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    y = _launch(name, t, x, None, path="cuda", out=out)
    check(y, _reference(name, t, x, None), dtype, ("cuda long K", name, m))


def test_cuda_gemv_runs_on_torchs_current_stream(device) -> None:
    """tpquant.kernels.cupy_launch: on a side stream the GEMV waits for the torch work queued
    before it there (x written after a 20 ms sleep, no synchronisation in between; on any
    other stream it would read the NaNs x held before), and CuPy is not asked for anything it
    has deprecated."""
    pytest.importorskip("cupy", reason="the CUDA GEMV is compiled and launched through CuPy")
    n, k, seed = 4096, 4096, _seed("cuda-stream")
    t = _tensors("wo4", device, seed, (n, k))
    g = torch.Generator().manual_seed(seed + 1)
    fresh = torch.randn(1, k, generator=g).to(device=device, dtype=torch.bfloat16)
    x = torch.full_like(fresh, float("nan"))
    out = torch.empty(1, n, dtype=torch.bfloat16, device=device)
    cw.gemv(fresh, t["qweight"], t["scale"], None, None, 4, 0, None, out)  # compile first
    out.fill_(float("nan"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(40_000_000)  # ~20 ms at H200 clocks
            x.copy_(fresh)
            cw.gemv(x, t["qweight"], t["scale"], None, None, 4, 0, None, out)
    torch.cuda.synchronize()
    check(out, _reference("wo4", t, fresh, None), torch.bfloat16, ("cuda stream",))


def test_cuda_path_refuses_what_it_cannot_take(device) -> None:
    t = _tensors("wo4", device, 3)  # K = 328: not whole 32-code chunks
    x, _ = _inputs("wo4", 2, torch.float16, device, 4)
    with pytest.raises(ValueError, match="path 'cuda' takes"):
        _launch("wo4", t, x, None, path="cuda")


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("path", ["gemv", "dot"])
def test_split_k_and_tail(device, path: str, split_k: int) -> None:
    """K = 2752 (Llama-7B down_proj at TP 4: not a multiple of 128) in 1 or 3 splits."""
    scheme = WeightOnly(4)
    g = torch.Generator().manual_seed(split_k)
    w = torch.randn(96, 2752, generator=g)
    t = {k: v.to(device) for k, v in scheme.quantize(w).items()}
    x = torch.randn(5, 2752, generator=g).to(device=device, dtype=torch.bfloat16)
    config = GEMV_CONFIG if path == "gemv" else _dot_config(5)
    out = torch.full((5, 96), float("nan"), dtype=torch.bfloat16, device=device)
    y = tw.weight_only_matmul(
        x, t["qweight"], t["scale"], 4, path=path, config=config, split_k=split_k, out=out
    )
    expected = x.double() @ scheme.dequantize(t).double().t()
    check(y, expected, torch.bfloat16, (path, split_k))


@pytest.mark.parametrize("m", [1, 17, 4096])
@pytest.mark.parametrize("name", ["wo8", "wo4", "gw128-zeros-pqs"])
def test_automatic_dispatch(device, monkeypatch, name: str, m: int) -> None:
    """The public ops on CUDA pick a path by choose_path and autotune; a Llama-like K."""
    monkeypatch.delenv(tw.PATH_ENV, raising=False)
    scheme = SCHEMES[name][0]
    n, k = 1000, 4096
    g = torch.Generator().manual_seed(m)
    w = torch.randn(n, k, generator=g)
    if isinstance(scheme, Groupwise):
        p = torch.rand(k, generator=g).add(0.5)
        t = scheme.quantize(w, pre_quant_scale=p)
    else:
        t = scheme.quantize(w)
    t = {key: v.to(device) for key, v in t.items()}
    x = torch.randn(m, k, generator=g).to(device=device, dtype=torch.bfloat16)
    bias = torch.randn(n, generator=g).to(device)
    poison((m, n), torch.bfloat16, device)
    y = _public(name, t, x, bias)
    check(y, _reference(name, t, x, bias), torch.bfloat16, (name, m))


def test_reference_override_and_float32(device, monkeypatch) -> None:
    """TPQUANT_WO_PATH=reference and float32 x both run the torch reference on CUDA."""
    t = _tensors("wo4", device, 11)
    x, bias = _inputs("wo4", 3, torch.float16, device, 12)
    w = ref.dequantize_weight_only(t["qweight"], t["scale"], 4)
    monkeypatch.setenv(tw.PATH_ENV, "reference")
    assert torch.equal(_public("wo4", t, x, bias), ref._linear_f32(x, w, bias))
    monkeypatch.delenv(tw.PATH_ENV)
    x32 = x.float()
    assert torch.equal(_public("wo4", t, x32, bias), ref._linear_f32(x32, w, bias))


@pytest.mark.parametrize("m", [1, 17])
def test_cuda_graph_capture_and_replay(device, monkeypatch, m: int) -> None:
    """Warm up (autotune), capture the fast path in a CUDA graph, replay on new inputs."""
    monkeypatch.delenv(tw.PATH_ENV, raising=False)
    name = "gw128-zeros-pqs"
    t = _tensors(name, device, 21)
    x, bias = _inputs(name, m, torch.bfloat16, device, 23)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            _public(name, t, x, bias)
    torch.cuda.current_stream().wait_stream(stream)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = _public(name, t, x, bias)
    results = []
    for seed in (31, 32):
        fresh, _ = _inputs(name, m, torch.bfloat16, device, seed)
        x.copy_(fresh)
        y_static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        results.append((y_static.clone(), _reference(name, t, x, bias)))
    for y, expected in results:
        check(y, expected, torch.bfloat16, ("graph", m))
