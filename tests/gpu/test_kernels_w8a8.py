"""W8A8 and RMSNorm fast paths on CUDA against the torch references on the same GPU.

    python -m pytest -q tests/gpu/test_kernels_w8a8.py       (also run by tests/gpu/run_on_device.sh)

Allowed differences (see tests/unit/test_triton_w8a8.py for the reasons):
- per-token / static quantization (with or without smoother): none, codes and scales;
- GEMM, Triton, torch._int_mm and (on Hopper with nvcc and CUTLASS headers) CUTLASS paths:
  none, int32 product and float16/bfloat16 output (the Triton and CUTLASS epilogues run the
  reference's float32 ops in its order, without FMA);
- RMSNorm: rtol = eps(dtype) + 1e-6; fused RMSNorm + quantize: scale rtol 1e-6, a code off by
  one only within 1e-3 of a rounding tie of the reference's y / scale.
Inputs are fresh random numbers with outlier channels; every output is poisoned first: the
launchers' `out=` tensors are filled with NaN / a sentinel, and before a dispatch call (which
allocates) the caching allocator is handed a freed, poisoned block of the output's size.
"""

from __future__ import annotations

import pytest
import torch

from tpquant.kernels import cutlass_gemm
from tpquant.kernels import norm as norm_ops
from tpquant.kernels import w8a8
from tpquant.parallel.mapping import Mapping

pytestmark = [pytest.mark.gpu]

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
triton_w8a8 = pytest.importorskip("tpquant.kernels.triton_w8a8", reason="needs Triton")
from tpquant.kernels import triton_norm  # noqa: E402  (after the skip)

DTYPES = (torch.float16, torch.bfloat16)
MS = (1, 3, 17, 4096)
K = 4000  # not a multiple of 128 (a multiple of 8, so torch._int_mm takes it too)
NS = (1000, 4232)  # 4232: wide enough for the 32-wide decode tile
EPS = 1e-5
SENTINEL = -77


@pytest.fixture(scope="module")
def device() -> torch.device:
    # Under mpirun each rank takes its own GPU (local rank), as the runtime does.
    dev = torch.device("cuda", Mapping.from_env().local_rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activation(m, k, dtype, seed, device):
    x = torch.randn(m, k, generator=_gen(seed))
    x[:, [5, k // 3]] *= 30.0  # outlier channels
    return x.to(device=device, dtype=dtype)


def _poisoned(shape, dtype, device):
    fill = float("nan") if dtype.is_floating_point else SENTINEL
    return torch.full(shape, fill, dtype=dtype, device=device)


def _poison_allocator(shape, dtype, device) -> None:
    """Leave a poisoned free block of this size in the caching allocator for the next
    allocation (the dispatch functions allocate their outputs)."""
    block = _poisoned(shape, dtype, device)
    del block


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


# -- quantization ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("with_smoother", [False, True])
def test_quantize_per_token(device, dtype, m, with_smoother) -> None:
    x = _activation(m, K, dtype, m, device)
    smoother = (0.5 + 4 * torch.rand(K, generator=_gen(1))).to(device) if with_smoother else None
    expected = w8a8.quantize_per_token(x, smoother, path="reference")
    q, s = _poisoned((m, K), torch.int8, device), _poisoned((m, 1), torch.float32, device)
    triton_w8a8.quantize_rows(x, smoother, out=q, scale_out=s)
    _poison_allocator((m, K), torch.int8, device)
    auto = w8a8.quantize_per_token(x, smoother)
    torch.cuda.synchronize()
    assert _same(q, expected[0]) and _same(s, expected[1])
    assert _same(auto[0], expected[0]) and _same(auto[1], expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("with_smoother", [False, True])
def test_quantize_static(device, dtype, m, with_smoother) -> None:
    x = _activation(m, K, dtype, 100 + m, device)
    smoother = (0.5 + 4 * torch.rand(K, generator=_gen(2))).to(device) if with_smoother else None
    smoothed = x.float() if smoother is None else x.float() / smoother
    scale = (0.3 * smoothed.abs().max() / 127).reshape(())  # outliers clamp
    expected = w8a8.quantize_static(x, scale, smoother, path="reference")
    q = _poisoned((m, K), torch.int8, device)
    triton_w8a8.quantize_rows(x, smoother, scale, out=q)
    _poison_allocator((m, K), torch.int8, device)
    auto = w8a8.quantize_static(x, scale, smoother)
    torch.cuda.synchronize()
    assert _same(q, expected) and _same(auto, expected)
    assert (expected == 127).any()


@pytest.mark.parametrize("k", [5504, 8192, 11008, 16390])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_kernels_on_long_rows(device, dtype, k) -> None:
    """Rows read once in one 8192-wide block (5504: Llama-2-7B's intermediate size at TP 2;
    8192), then a rank's whole Llama-2-7B intermediate size and longer in several 4096-wide
    blocks: per-token quantization exact; the fused RMSNorm + quantize within its allowed
    difference."""
    x = _activation(33, k, dtype, k, device)
    smoother = (0.5 + 4 * torch.rand(k, generator=_gen(3))).to(device)
    q, s = triton_w8a8.quantize_rows(x, smoother)
    q_ref, s_ref = w8a8.quantize_per_token(x, smoother, path="reference")
    w = (0.5 + torch.rand(k, generator=_gen(4))).to(device=device, dtype=dtype)
    qn, sn = triton_norm.rms_norm_quantize(x, w, EPS)
    qn_ref, sn_ref = w8a8.rms_norm_quantize(x, w, EPS, path="reference")
    torch.cuda.synchronize()
    assert _same(q, q_ref) and _same(s, s_ref)
    _assert_codes_near(qn, sn, norm_ops.rms_norm_f32(x, w, EPS), qn_ref, sn_ref)


# -- GEMM ------------------------------------------------------------------------------------------


def _gemm_case(m, n, dtype, per_token, per_channel, with_bias, seed, device):
    g = _gen(seed)
    qx = torch.randint(-128, 128, (m, K), generator=g, dtype=torch.int8).to(device)
    qw = torch.randint(-127, 128, (n, K), generator=g, dtype=torch.int8).to(device)
    sx = (torch.rand(m, 1, generator=g) + 0.1) * 1e-3
    sw = (torch.rand(n, generator=g) + 0.1) * 1e-3
    sx = (sx if per_token else sx[0, 0]).to(device)
    sw = (sw if per_channel else sw[0]).to(device)
    bias = torch.randn(n, generator=g).to(device=device, dtype=dtype) if with_bias else None
    return qx, qw, sx, sw, bias


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n", NS)
def test_gemm_int32_product_exact(device, m, n) -> None:
    qx, qw, *_ = _gemm_case(m, n, torch.float16, True, True, False, m + n, device)
    expected = w8a8.int8_matmul(qx, qw)
    acc = _poisoned((m, n), torch.int32, device)
    triton_w8a8.w8a8_gemm(qx, None, qw, None, out_dtype=torch.int32, out=acc)
    torch.cuda.synchronize()
    assert _same(acc, expected)


TILE_CONFIGS = [  # TMA tiles, and the medium pointer tile that the dispatch takes at M = 129-256
    # (K = 4000: the last K block is partly past the edge)
    triton_w8a8.GemmConfig(128, 256, 128, 8, 8, 3, True),
    triton_w8a8.GemmConfig(128, 128, 128, 8, 4, 5, True),
    triton_w8a8.GemmConfig(64, 128, 128, 8, 4, 4, True),
    triton_w8a8.SMALL_TILE_CONFIG,
    triton_w8a8.MEDIUM_CONFIG,
]


@pytest.mark.parametrize("cfg", TILE_CONFIGS,
                         ids=lambda c: f"{c.block_m}x{c.block_n}x{c.block_k}{'-tma' * c.tma}")
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_tiles(device, cfg, m, dtype) -> None:
    """Each tile, through TMA descriptors where it asks for them: int32 product exact,
    epilogue equal to the reference."""
    n = NS[1]
    qx, qw, sx, sw, bias = _gemm_case(m, n, dtype, True, True, True, 11 * m, device)
    assert triton_w8a8._tma_ok(qx, qw)
    acc = _poisoned((m, n), torch.int32, device)
    triton_w8a8.w8a8_gemm(qx, None, qw, None, out_dtype=torch.int32, config=cfg, out=acc)
    y = _poisoned((m, n), dtype, device)
    triton_w8a8.w8a8_gemm(qx, sx, qw, sw, bias, dtype, config=cfg, out=y)
    torch.cuda.synchronize()
    assert _same(acc, w8a8.int8_matmul(qx, qw))
    assert _same(y, w8a8.w8a8_matmul(qx, sx, qw, sw, bias, dtype, path="reference"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("per_token,per_channel", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_paths_match_reference(device, dtype, m, per_token, per_channel, with_bias) -> None:
    n = NS[0]
    qx, qw, sx, sw, bias = _gemm_case(m, n, dtype, per_token, per_channel, with_bias, 7 * m, device)
    expected = w8a8.w8a8_matmul(qx, sx, qw, sw, bias, dtype, path="reference")
    y = _poisoned((m, n), dtype, device)
    triton_w8a8.w8a8_gemm(qx, sx, qw, sw, bias, dtype, out=y)
    results = {"triton (out=)": y}
    paths = [None, "triton"] + (["int_mm"] if w8a8.int_mm_supported(m, n, K) else [])
    paths += ["cutlass"] if cutlass_gemm.available(device.index) else []
    for path in paths:
        _poison_allocator((m, n), dtype, device)
        results[str(path)] = w8a8.w8a8_matmul(qx, sx, qw, sw, bias, dtype, path=path)
    torch.cuda.synchronize()
    assert not expected.isnan().any()
    differing = [name for name, r in results.items() if not _same(r, expected)]
    assert not differing, f"paths differing from the reference: {differing}"


# -- RMSNorm ---------------------------------------------------------------------------------------


def _norm_inputs(m, dtype, seed, device):
    x = _activation(m, K, dtype, seed, device)
    w = (0.5 + torch.rand(K, generator=_gen(seed + 1))).to(device=device, dtype=dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_rms_norm(device, dtype, m) -> None:
    x, w = _norm_inputs(m, dtype, 200 + m, device)
    expected = norm_ops.rms_norm(x, w, EPS, path="reference")
    y = _poisoned((m, K), dtype, device)
    triton_norm.rms_norm(x, w, EPS, out=y)
    _poison_allocator((m, K), dtype, device)
    auto = norm_ops.rms_norm(x, w, EPS)
    torch.cuda.synchronize()
    rtol = torch.finfo(dtype).eps + 1e-6
    for got in (y, auto):
        torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=0)


def _assert_codes_near(q, scale, y_ref, q_ref, scale_ref) -> None:
    torch.testing.assert_close(scale.double(), scale_ref.double(), rtol=1e-6, atol=0)
    quot = y_ref.double() / scale_ref.double()
    near_tie = ((quot - quot.floor()) - 0.5).abs() < 1e-3
    diff = (q.int() - q_ref.int()).abs()
    assert ((diff == 0) | (near_tie & (diff == 1))).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("static", [False, True])
def test_rms_norm_quantize(device, dtype, m, static) -> None:
    x, w = _norm_inputs(m, dtype, 300 + m, device)
    y_ref = norm_ops.rms_norm_f32(x, w, EPS)
    static_scale = (0.5 * y_ref.abs().max() / 127).reshape(()) if static else None
    q_ref, s_ref = w8a8.rms_norm_quantize(x, w, EPS, static_scale, path="reference")
    q, s = _poisoned((m, K), torch.int8, device), _poisoned((m, 1), torch.float32, device)
    q, s = triton_norm.rms_norm_quantize(x, w, EPS, static_scale, out=q, scale_out=s)
    _poison_allocator((m, K), torch.int8, device)
    q_auto, s_auto = w8a8.rms_norm_quantize(x, w, EPS, static_scale)
    torch.cuda.synchronize()
    for got_q, got_s in ((q, s), (q_auto, s_auto)):
        assert got_s.shape == s_ref.shape
        _assert_codes_near(got_q, got_s.expand(m, 1), y_ref, q_ref, s_ref.expand(m, 1))


# -- CUDA graphs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 17])
def test_cuda_graph_capture_and_replay(device, m) -> None:
    """A SmoothQuant block (norm+quantize -> GEMM; smoothed per-token quantize -> GEMM; static
    quantize -> GEMM; RMSNorm) captured once, replayed on new inputs, equals eager references."""
    dtype = torch.bfloat16
    n = NS[0]
    x, w = _norm_inputs(m, dtype, 400, device)
    qw = torch.randint(-127, 128, (n, K), generator=_gen(401), dtype=torch.int8).to(device)
    sw = ((torch.rand(n, generator=_gen(402)) + 0.1) * 1e-3).to(device)
    bias = torch.randn(n, generator=_gen(403)).to(device=device, dtype=dtype)
    smoother = (0.5 + 4 * torch.rand(K, generator=_gen(404))).to(device)
    static = torch.tensor(0.05, device=device)

    def block(inp: torch.Tensor):
        qn, sn = w8a8.rms_norm_quantize(inp, w, EPS)
        y1 = w8a8.w8a8_matmul(qn, sn, qw, sw, bias, dtype)
        qs, ss = w8a8.quantize_per_token(inp, smoother)
        y2 = w8a8.w8a8_matmul(qs, ss, qw, sw, None, dtype)
        y3 = w8a8.w8a8_matmul(w8a8.quantize_static(inp, static), static, qw, sw, bias, dtype)
        return y1, y2, y3, norm_ops.rms_norm(inp, w, EPS)

    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        block(static_x)  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = block(static_x)

    results = []
    for seed in (500, 501):
        new_x, _ = _norm_inputs(m, dtype, seed, device)
        static_x.copy_(new_x)
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        results.append(([o.clone() for o in outs], block(new_x), new_x))
    torch.cuda.synchronize()
    for (replayed, eager, new_x) in results:
        for got, want in zip(replayed, eager):
            assert not got.isnan().any()
            assert _same(got, want)  # same kernels, same inputs: identical
        # and the eager fast path is the reference's: norm+quantize -> GEMM within its rule
        q_ref, s_ref = w8a8.rms_norm_quantize(new_x, w, EPS, path="reference")
        ref_y1 = w8a8.w8a8_matmul(q_ref, s_ref, qw, sw, bias, dtype, path="reference")
        # (one code step near a tie moves an output by at most 127 * s_x * s_w)
        atol = 2e-2 * ref_y1.float().abs().max().item()
        torch.testing.assert_close(replayed[0].float(), ref_y1.float(), rtol=2e-2, atol=atol)
