"""The W8A8 / RMSNorm Triton kernels in Triton's interpreter (CPU tensors) against the torch
references in tpquant.kernels.w8a8 and tpquant.kernels.norm.

Allowed differences, stated once:
- quantization (per token, static, with smoother) and the int32 GEMM: none, bit for bit;
- the GEMM's float output: none for float32 and float16; bfloat16 within one bfloat16 ulp,
  because the interpreter converts float32 to bfloat16 by truncation (compiled Triton rounds
  to nearest even, and the GPU tests ask for equality);
- RMSNorm: its sum of squares runs in another order, so float32 results differ by a few ulps
  (rtol 1e-6) plus one ulp of the output dtype; after it, the fused quantizer's scale is
  within rtol 1e-6 and a code differs by at most one step, only where the reference's
  quotient y / scale lies within 1e-3 of a rounding tie.
Every output is poisoned (NaN, or a sentinel integer) before each call.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tpquant.kernels import norm as norm_ref
from tpquant.kernels import w8a8 as ref

SHAPES_M = (1, 3, 17)
N, K = 72, 96
EPS = 1e-5
SENTINEL = -77  # int8 / int32 poison
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MODULES = ("tpquant.kernels.triton_w8a8", "tpquant.kernels.triton_norm")


@pytest.fixture(scope="module")
def kernels():
    """Fresh interpreted copies of the W8A8 and norm kernel modules (triton_interpreter.py)."""
    pytest.importorskip("triton")
    from triton_interpreter import interpreted  # tests/unit, beside this file

    with interpreted(*_MODULES) as (tw, tn):
        interp = sys.modules["triton.runtime.interpreter"]
        assert isinstance(tw._w8a8_gemm_kernel, interp.InterpretedFunction)
        yield tw, tn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activation(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = _gen(seed)
    x = torch.randn(m, k, generator=g)
    x[:, [3, k // 2]] *= 25.0  # outlier channels, as SmoothQuant sees them
    return x.to(dtype)


def _poisoned(shape, dtype) -> torch.Tensor:
    fill = float("nan") if dtype.is_floating_point else SENTINEL
    return torch.full(shape, fill, dtype=dtype)


def _assert_within_ulp(y: torch.Tensor, ref_y: torch.Tensor, dtype: torch.dtype) -> None:
    # One ulp of `dtype` at v is at most eps * |v|.
    assert not y.isnan().any()
    bound = torch.finfo(dtype).eps * ref_y.double().abs() + torch.finfo(dtype).tiny
    assert ((y.double() - ref_y.double()).abs() <= bound).all()


# -- activation quantization ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", SHAPES_M)
@pytest.mark.parametrize("with_smoother", [False, True])
def test_quantize_per_token_exact(kernels, dtype, m, with_smoother) -> None:
    tw, _ = kernels
    x = _activation(m, K, dtype, seed=m)
    smoother = (0.5 + 4 * torch.rand(K, generator=_gen(7))) if with_smoother else None
    q, scale = _poisoned((m, K), torch.int8), _poisoned((m, 1), torch.float32)
    tw.quantize_rows(x, smoother, out=q, scale_out=scale)
    q_ref, scale_ref = ref.quantize_per_token(x, smoother, path="reference")
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("k,one_pass", [(4100, True), (16390, False)])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_long_rows_and_leading_dims(kernels, k, one_pass, static) -> None:
    # 4100: one 8192-wide block, held in registers between the amax and the codes; 16390
    # (above a rank's whole Llama-2-7B intermediate size): two passes of five 4096-wide trips.
    tw, _ = kernels
    block, _, single = tw.row_plan(k)
    assert single == one_pass and block == (8192 if one_pass else 4096)
    x = _activation(6, k, torch.bfloat16, seed=3).reshape(2, 3, k)
    static_scale = x.float().abs().amax() / 200 if static else None  # some codes clamp
    q, scale = tw.quantize_rows(x, static_scale=static_scale)
    if static:
        q_ref, scale_ref = ref.quantize_static(x, static_scale, path="reference"), static_scale
    else:
        q_ref, scale_ref = ref.quantize_per_token(x, path="reference")
    assert q.shape == (2, 3, k) and scale.shape == scale_ref.shape
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)


def test_row_plan_by_k(kernels) -> None:
    """One pass up to ONE_PASS_MAX_K features (warps growing with the block), then 4096-wide
    chunks in two passes."""
    tw, _ = kernels
    assert tw.row_plan(576) == (1024, 4, True)
    assert tw.row_plan(4096) == (4096, 8, True)
    assert tw.row_plan(5504) == (8192, 16, True)
    assert tw.row_plan(11008) == (4096, 8, False)
    assert tw.row_plan(tw.ONE_PASS_MAX_K + 1) == (4096, 8, False)


@pytest.mark.parametrize("static", [False, True])
def test_rms_norm_quantize_one_pass_equals_chunks(kernels, static) -> None:
    """A row that fits one block is read once (row_plan); forced through the passes that
    re-read it, in one chunk of the same width, the int8 codes (and per-token scales) come out
    bit for bit the same. (In the interpreter; on a GPU the two branches' reductions are the
    same tl.sum over the same block.)"""
    tw, tn = kernels
    k, rows = 3000, 3
    block, _, one_pass = tw.row_plan(k)
    assert one_pass
    x = _activation(rows, k, torch.bfloat16, seed=7)
    w = (0.5 + torch.rand(k, generator=_gen(9))).to(torch.bfloat16)
    static_scale = torch.tensor(0.02) if static else None
    q_one, scale_one = tn.rms_norm_quantize(x, w, EPS, static_scale)
    q = torch.empty(rows, k, dtype=torch.int8)
    scale = torch.empty(rows) if static_scale is None else static_scale.reshape(1)
    tn._rms_norm_quantize_kernel[(rows,)](x, w, q, scale, k, k, k, float(k), EPS,
                                          PER_TOKEN=not static, BLOCK=block, ONE_PASS=False,
                                          PDL=False)
    assert torch.equal(q, q_one)
    if static:
        assert (q_one.abs() >= 127).any()  # the outliers clamp
    else:
        assert torch.equal(scale, scale_one.reshape(scale.shape))


@pytest.mark.parametrize("k", [5000, 16390])
def test_rms_norm_quantize_long_rows(kernels, k) -> None:
    """5000: one 8192-wide block read once; 16390: every pass (squares, amax, codes) takes
    five 4096-wide trips."""
    _, tn = kernels
    x = _activation(2, k, torch.float32, seed=8)
    w = 0.5 + torch.rand(k, generator=_gen(9))
    y_ref = norm_ref.rms_norm_f32(x, w, EPS)
    q, scale = tn.rms_norm_quantize(x, w, EPS)
    q_ref, scale_ref = ref.rms_norm_quantize(x, w, EPS, path="reference")
    _assert_codes_near(q, scale, y_ref, q_ref, scale_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_smoother", [False, True])
def test_quantize_static_exact_with_clamping(kernels, dtype, with_smoother) -> None:
    tw, _ = kernels
    x = _activation(17, K, dtype, seed=5)
    smoother = (0.5 + 4 * torch.rand(K, generator=_gen(8))) if with_smoother else None
    # A scale from a milder batch, so that the outliers clamp at -128 / 127.
    scale = (0.3 * x.float().abs().max() / 127).reshape(())
    q = _poisoned((17, K), torch.int8)
    tw.quantize_rows(x, smoother, scale, out=q)
    q_ref = ref.quantize_static(x, scale, smoother, path="reference")
    assert torch.equal(q, q_ref)
    assert (q_ref == 127).any() and (q_ref == -128).any()


def test_dispatch_forced_triton_equals_reference(kernels) -> None:
    x = _activation(3, K, torch.float16, seed=9)
    q, s = ref.quantize_per_token(x, path="triton")
    q_ref, s_ref = ref.quantize_per_token(x)  # CPU tensors: the reference
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        ref.quantize_per_token(x.to(torch.float64), path="triton")
    with pytest.raises(ValueError, match="path must be one of"):
        ref.quantize_per_token(x, path="cuda")


# -- the GEMM --------------------------------------------------------------------------------------


def _gemm_configs(tw) -> list:
    """Every configuration gemm_config can return (run here on small shapes)."""
    return [
        tw.gemm_config(1, 64, K), tw.gemm_config(1, 64, K, smem=100_000),
        tw.SMALL_TILE_CONFIG, tw.MEDIUM_CONFIG, tw.LARGE_CONFIG, tw.LARGE_NARROW_CONFIG,
        # the TMA kernel: a large tile, and one whose K block leaves a tail at K = 96
        tw.LARGE_CONFIG._replace(tma=True), tw.GemmConfig(16, 32, 64, 1, 4, 2, tma=True),
    ]


def _gemm_operands(m: int, k: int, seed: int):
    g = _gen(seed)
    qx = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    qw = torch.randint(-127, 128, (N, k), generator=g, dtype=torch.int8)
    return qx, qw, g


@pytest.mark.parametrize("k", [K, 256])  # 256: every block_k divides it (the unmasked loop)
def test_gemm_int32_exact_every_config(kernels, k) -> None:
    tw, _ = kernels
    for m in SHAPES_M:
        qx, qw, _ = _gemm_operands(m, k, seed=m + k)
        assert tw._tma_ok(qx, qw)  # the tma configs below do take the TMA kernel
        expected = ref.int8_matmul(qx, qw)
        for cfg in _gemm_configs(tw):
            acc = _poisoned((m, N), torch.int32)
            tw.w8a8_gemm(qx, None, qw, None, out_dtype=torch.int32, config=cfg, out=acc)
            assert torch.equal(acc, expected), cfg


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("per_token,per_channel", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_epilogue_matches_reference(kernels, out_dtype, per_token, per_channel, with_bias):
    tw, _ = kernels
    for m in SHAPES_M:
        qx, qw, g = _gemm_operands(m, K, seed=10 * m)
        x_scale = (torch.rand(m, 1, generator=g) + 0.1) * 0.02
        x_scale = x_scale if per_token else x_scale[0, 0]
        w_scale = (torch.rand(N, generator=g) + 0.1) * 0.01
        w_scale = w_scale if per_channel else w_scale[0]
        bias = torch.randn(N, generator=g).to(out_dtype) if with_bias else None
        expected = ref.w8a8_matmul(qx, x_scale, qw, w_scale, bias, out_dtype, path="reference")
        for cfg in (tw.gemm_config(m, N, K), tw.LARGE_CONFIG, tw.LARGE_CONFIG._replace(tma=True)):
            y = _poisoned((m, N), out_dtype)
            tw.w8a8_gemm(qx, x_scale, qw, w_scale, bias, out_dtype, config=cfg, out=y)
            if out_dtype == torch.bfloat16:
                _assert_within_ulp(y, expected, out_dtype)  # interpreter truncates to bf16
            else:
                assert torch.equal(y, expected), cfg


def test_gemm_leading_dims_and_bad_input(kernels) -> None:
    tw, _ = kernels
    qx, qw, g = _gemm_operands(6, K, seed=4)
    qx3 = qx.reshape(2, 3, K)
    sx = torch.rand(2, 3, 1, generator=g) * 0.01
    sw = torch.rand(N, generator=g) * 0.01
    y = tw.w8a8_gemm(qx3, sx, qw, sw, out_dtype=torch.float32)
    assert y.shape == (2, 3, N)
    assert torch.equal(y, ref.w8a8_matmul(qx3, sx, qw, sw, path="reference"))
    with pytest.raises(ValueError, match="x_scale must have 1 or 6"):
        tw.w8a8_gemm(qx, sx[:1], qw, sw)
    with pytest.raises(ValueError, match="does not match"):
        tw.w8a8_gemm(qx[:, :64], sx, qw, sw)
    with pytest.raises(TypeError, match="int8 operands"):
        tw.w8a8_gemm(qx.float(), sx, qw, sw)
    with pytest.raises(ValueError, match="out must hold"):
        tw.w8a8_gemm(qx, sx, qw, sw, out=torch.empty(6, N + 1))


def test_gemm_path_rule() -> None:
    assert ref.gemm_path(4096, 4096, 4096, on_device=False) == ref.REFERENCE
    assert ref.gemm_path(1, 72, 96, on_device=True) == ref.TRITON
    # torch._int_mm only where cuBLAS takes the shape, and only from the chosen M up.
    assert ref.gemm_path(64, 4096, 4096, True, int_mm_from_m=32) == ref.INT_MM
    assert ref.gemm_path(16, 4096, 4096, True, int_mm_from_m=1) == ref.TRITON
    assert ref.gemm_path(64, 72 + 4, 96, True, int_mm_from_m=32) == ref.TRITON
    assert ref.gemm_path(64, 4096, 4096, True, int_mm_from_m=None) == ref.TRITON


# -- RMSNorm ---------------------------------------------------------------------------------------


def _norm_inputs(m: int, dtype: torch.dtype, seed: int):
    x = _activation(m, K, dtype, seed)
    weight = (0.5 + torch.rand(K, generator=_gen(seed + 1))).to(dtype)
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(kernels, dtype) -> None:
    _, tn = kernels
    for m in SHAPES_M:
        x, w = _norm_inputs(m, dtype, seed=20 + m)
        y = _poisoned((m, K), dtype)
        tn.rms_norm(x, w, EPS, out=y)
        expected = norm_ref.rms_norm(x, w, EPS, path="reference")
        rtol = torch.finfo(dtype).eps + 1e-6
        torch.testing.assert_close(y.double(), expected.double(), rtol=rtol, atol=0)


def _assert_codes_near(q, scale, y_ref, q_ref, scale_ref) -> None:
    """The fused quantizer's allowed difference (module docstring)."""
    torch.testing.assert_close(scale.double(), scale_ref.double(), rtol=1e-6, atol=0)
    quot = y_ref.double() / scale_ref.double()
    near_tie = ((quot - quot.floor()) - 0.5).abs() < 1e-3
    diff = (q.int() - q_ref.int()).abs()
    assert ((diff == 0) | (near_tie & (diff == 1))).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True])
def test_rms_norm_quantize(kernels, dtype, static) -> None:
    _, tn = kernels
    for m in SHAPES_M:
        x, w = _norm_inputs(m, dtype, seed=30 + m)
        y_ref = norm_ref.rms_norm_f32(x, w, EPS)
        static_scale = (0.5 * y_ref.abs().max() / 127).reshape(()) if static else None
        q, scale = _poisoned((m, K), torch.int8), _poisoned((m, 1), torch.float32)
        q, scale = tn.rms_norm_quantize(x, w, EPS, static_scale, out=q, scale_out=scale)
        q_ref, scale_ref = ref.rms_norm_quantize(x, w, EPS, static_scale, path="reference")
        assert scale.shape == scale_ref.shape
        _assert_codes_near(q, scale.expand(m, 1), y_ref, q_ref, scale_ref.expand(m, 1))


def test_gemm_config_by_shape(kernels) -> None:
    """Decode tile up to M = 16; to 128 the small tile where its tiles fit in one wave; the
    medium tile up to 256; then the large or narrow TMA tile, whichever takes less time in
    whole waves."""
    tw, _ = kernels
    assert tw.gemm_config(8, 4096, 4096, 132) == tw.DECODE_CONFIG
    # A device with less shared memory gets as many decode stages as fit (A100: 163 KiB).
    assert tw.gemm_config(1, 4096, 4096, 108, smem=166912).num_stages == 4
    assert tw.gemm_config(17, 4096, 4096, 132) == tw.SMALL_TILE_CONFIG  # 64 small tiles
    assert tw.gemm_config(128, 4096, 11008, 132) == tw.SMALL_TILE_CONFIG  # 128
    assert tw.gemm_config(64, 8448, 4096, 132) == tw.SMALL_TILE_CONFIG  # 132: one full wave
    assert tw.gemm_config(64, 8449, 4096, 132) == tw.MEDIUM_CONFIG  # 133: a second wave
    assert tw.gemm_config(32, 12288, 4096, 132) == tw.MEDIUM_CONFIG  # 192
    assert tw.gemm_config(128, 8192, 4096, 132) == tw.MEDIUM_CONFIG  # 256
    assert tw.gemm_config(64, 4096, 4096, 108, smem=166912).num_stages == 5  # 160 KiB fits
    assert tw.gemm_config(64, 4096, 4096, 132, smem=100_000).num_stages == 3
    assert tw.gemm_config(129, 4096, 4096, 132) == tw.MEDIUM_CONFIG
    assert tw.gemm_config(200, 4096, 4096, 132) == tw.MEDIUM_CONFIG
    assert tw.gemm_config(1024, 4096, 4096, 132) == tw.LARGE_CONFIG  # 128 tiles: 1 wave
    assert tw.gemm_config(512, 2048, 4096, 132) == tw.LARGE_NARROW_CONFIG  # 32 tiles
    # 192 large tiles: 2 waves, the second under half full; 384 narrow tiles: 3 cheaper waves.
    assert tw.gemm_config(1024, 6144, 4096, 132) == tw.LARGE_NARROW_CONFIG
    for n in (11008, 12288, 22016):  # the large tiles' last wave is mostly busy
        assert tw.gemm_config(1024, n, 4096, 132) == tw.LARGE_CONFIG
    assert tw.LARGE_CONFIG.tma and tw.LARGE_NARROW_CONFIG.tma


def test_gemm_path_takes_cutlass_from_its_m() -> None:
    big = ref.CUTLASS_FROM_M
    assert ref.gemm_path(big, 4096, 4096, True, cutlass=True) == ref.CUTLASS
    assert ref.gemm_path(big - 1, 4096, 4096, True, cutlass=True) == ref.TRITON
    assert ref.gemm_path(big, 4096, 4096, True, cutlass=False) == ref.TRITON
    assert ref.gemm_path(big, 4096, 4096, False, cutlass=True) == ref.REFERENCE
