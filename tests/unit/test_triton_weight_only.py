"""The Triton weight-only kernels, run on CPU tensors in Triton's interpreter, against float64.

Every path (gemv, dot, dequant) of every scheme (int8 / int4 per channel; groupwise int4 with
and without zeros, with a pre-quant scale) on small shapes whose N and K are not multiples of
the block sizes, with split-K on and off and with a bias. The reference is float64 math on the
weight the torch reference dequantizes (tpquant.kernels.weight_only), itself checked in
test_weight_schemes. Outputs are poisoned with NaN first, so an unwritten element fails.

The kernels run from fresh copies of Triton and of tpquant.kernels.triton_weight_only imported
with TRITON_INTERPRET=1 (the `tw` fixture), so that the real modules keep compiled kernels for
CUDA in the same process. Also here: the pure dispatch rules, on the real module.
bfloat16 tolerances are loose because the interpreter truncates float32 -> bfloat16 (the GPU
rounds to nearest; tests/gpu/test_kernels_weight_only.py holds it to the tighter bound).
"""

from __future__ import annotations

import sys
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import triton  # noqa: E402

from tpquant.kernels import triton_weight_only as real  # noqa: E402
from tpquant.kernels import weight_only as ref  # noqa: E402
from tpquant.quantization.schemes import Groupwise, WeightOnly  # noqa: E402

N, K = 72, 192  # neither a multiple of 128; 192 = 3 groups of 64, 6 of 32
SCHEMES = {
    "wo8": WeightOnly(8),
    "wo4": WeightOnly(4),
    "gw64-zeros": Groupwise(group_size=64, zeros=True),
    "gw64-sym": Groupwise(group_size=64, zeros=False),
    "gw32-zeros-pqs": Groupwise(group_size=32, zeros=True, pre_quant_scale=True),
}
# (M, dtype, split_k, BLOCK_K of the explicit config, bias): M = 1, 3, 17; one and two K
# splits (2 splits of 96 or 128 columns; the second of 128 runs past K = 192 and is clamped).
CASES = [
    (1, torch.bfloat16, 2, 32, False),
    (3, torch.float16, 1, 64, True),
    (17, torch.bfloat16, 2, 64, True),
]
GEMV_LARGE_M = ("wo4", "gw64-zeros")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # of max |reference|


_MODULE = "tpquant.kernels.triton_weight_only"


@pytest.fixture(scope="module")
def tw():
    """A fresh interpreted copy of triton_weight_only (triton_interpreter.py)."""
    from triton_interpreter import interpreted  # tests/unit, beside this file

    with interpreted(_MODULE) as (module,):
        interp = sys.modules["triton.runtime.interpreter"]
        assert module._INTERPRETED
        assert isinstance(module._wo_dot_kernel, interp.InterpretedFunction)
        yield module


def _quantized(name: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g).add(0.1)
    scheme = SCHEMES[name]
    if isinstance(scheme, Groupwise) and scheme.pre_quant_scale:
        return scheme.quantize(w, pre_quant_scale=torch.rand(K, generator=g).add(0.5))
    return scheme.quantize(w)


def _reference(name: str, t: dict[str, torch.Tensor], x: torch.Tensor, bias) -> torch.Tensor:
    """float64 (x * pqs) @ W^T + bias from the reference dequantization."""
    scheme = SCHEMES[name]
    xd = x.double()
    if isinstance(scheme, WeightOnly):
        w = ref.dequantize_weight_only(t["qweight"], t["scale"], scheme.bits)
    else:
        w = ref.dequantize_groupwise(
            t["qweight"], t["scales"], t.get("zeros"), scheme.group_size
        )
        if "pre_quant_scale" in t:
            xd = xd * t["pre_quant_scale"].double()
    y = xd @ w.double().t()
    return y if bias is None else y + bias.double()


def _run(tw, name, t, x, bias, path, config, split_k):
    """The launcher's result, written into an output first filled with NaN."""
    scheme = SCHEMES[name]
    out = torch.full((x.numel() // K, N), float("nan"), dtype=x.dtype)
    kw = dict(path=path, config=config, split_k=split_k, out=out)
    if isinstance(scheme, WeightOnly):
        y = tw.weight_only_matmul(x, t["qweight"], t["scale"], scheme.bits, bias, **kw)
    else:
        y = tw.groupwise_matmul(
            x, t["qweight"], t["scales"], t.get("zeros"), scheme.group_size,
            t.get("pre_quant_scale"), bias, **kw,
        )
    assert y.data_ptr() == out.data_ptr()
    return y


# gemv at M = 17 is slow in the interpreter: two schemes cover its M tiles.
KERNEL_CASES = [
    pytest.param(name, path, case, id=f"{name}-{path}-M{CASES[case][0]}")
    for name in SCHEMES
    for path in ("gemv", "dot", "dequant")
    for case in range(len(CASES))
    if not (path == "gemv" and CASES[case][0] > 3 and name not in GEMV_LARGE_M)
]


@pytest.mark.parametrize("name, path, case", KERNEL_CASES)
def test_kernel_matches_float64(tw, name: str, path: str, case: int) -> None:
    m, dtype, split_k, block_k, with_bias = CASES[case]
    t = _quantized(name, seed=zlib.crc32(f"{name}{case}".encode()) % 1000)
    g = torch.Generator().manual_seed(case)
    x = torch.randn(m, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g) if with_bias else None
    group = getattr(SCHEMES[name], "group_size", block_k)
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": min(block_k, group)}  # BLOCK_K | g
    y = _run(tw, name, t, x, bias, path, config, split_k)

    expected = _reference(name, t, x, bias)
    assert y.dtype == dtype and y.shape == (m, N)
    assert torch.isfinite(y).all(), "an output element was never written"
    err = (y.double() - expected).abs().max().item()
    # bfloat16: the interpreter truncates float32 -> bfloat16 (the GPU rounds), hence 1e-2.
    assert err <= TOL[dtype] * expected.abs().max().item() + 1e-6, (name, path, m, err)


@pytest.mark.parametrize("flags", [("SWAP",), ("SPLIT_X",), ("SWAP", "SPLIT_X")], ids="+".join)
@pytest.mark.parametrize("case", [0, 2])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_dot_variants_match_float64(tw, name: str, case: int, flags: tuple[str, ...]) -> None:
    """The dot kernel's variants on the same cases: SWAP (y^T = W x^T, the small-M form) and
    SPLIT_X (int4: x's even and odd columns against the low and high nibbles; int8 ignores
    it)."""
    m, dtype, split_k, block_k, with_bias = CASES[case]
    t = _quantized(name, seed=zlib.crc32(f"{flags}{name}{case}".encode()) % 1000)
    g = torch.Generator().manual_seed(case + 10)
    x = torch.randn(m, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g) if with_bias else None
    group = getattr(SCHEMES[name], "group_size", block_k)
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": min(block_k, group)}
    config.update({flag: True for flag in flags})
    y = _run(tw, name, t, x, bias, "dot", config, split_k)
    expected = _reference(name, t, x, bias)
    assert torch.isfinite(y).all(), "an output element was never written"
    err = (y.double() - expected).abs().max().item()
    assert err <= TOL[dtype] * expected.abs().max().item() + 1e-6, (name, m, err)


def test_leading_dims_and_uneven_block(tw) -> None:
    """x [2, 3, K]; BLOCK_K = 128 does not divide K = 192 (the clamped, masked K tail)."""
    t = _quantized("wo4", seed=7)
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}
    for path in ("gemv", "dot"):
        y = _run(tw, "wo4", t, x, None, path, config, 2)
        expected = _reference("wo4", t, x.reshape(6, K), None).reshape(2, 3, N)
        err = (y.double() - expected).abs().max().item()
        assert y.shape == (2, 3, N)
        assert err <= TOL[torch.float16] * expected.abs().max().item(), (path, err)


def test_group_size_not_multiple_of_min_block_goes_to_dequant(tw) -> None:
    """g = 48: choose_path sends it to dequant; forcing a fused path is a clear error."""
    scheme = Groupwise(group_size=48, zeros=True)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(5))
    t = scheme.quantize(w)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(6)).to(torch.float16)
    assert tw.choose_path(3, K, 4, 48) == tw.DEQUANT
    y = tw.groupwise_matmul(x, t["qweight"], t["scales"], t["zeros"], 48, None)
    expected = x.double() @ scheme.dequantize(t).double().t()
    assert (y.double() - expected).abs().max() <= 2e-3 * expected.abs().max()
    with pytest.raises(ValueError, match="multiple of 32"):
        tw.groupwise_matmul(x, t["qweight"], t["scales"], t["zeros"], 48, None, path="dot")


# ---- dispatch rules (pure functions of the real module) ------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3, 16, 17, 32, 33, 64, 65, 128, 129, 1024, 4096])
@pytest.mark.parametrize("cuda", [True, False])
def test_choose_path_follows_thresholds(m: int, cuda: bool) -> None:
    """Untiled weights: the CUDA GEMV up to CUDA_MAX_M when it may be used; else gemv only for
    per-channel int4 (bits 4, group 0); dot, then dequant, by M (never CUTLASS, which reads
    tiles)."""
    for bits, group in ((4, 0), (8, 0), (4, 128)):
        got = real.choose_path(m, 4096, bits, group, cuda=cuda)
        if cuda and m <= real.CUDA_MAX_M[bits]:
            assert got == real.CUDA
        elif m <= real.GEMV_MAX_M and (bits, group) == (4, 0):
            assert got == real.GEMV
        elif m <= real.DOT_MAX_M[bits]:
            assert got == real.DOT
        else:
            assert got == real.DEQUANT
    assert real.choose_path(m, 4096, 4, 48) == real.DEQUANT


@pytest.mark.parametrize("tiles", [1, 7, 64, 132, 1000, 100000])
@pytest.mark.parametrize("k", [192, 2752, 4096, 11008, 28672])
def test_split_k_covers_k_and_fills_the_gpu(tiles: int, k: int) -> None:
    sms = 132
    splits, per = real.split_k_for(tiles, k, sms, 512)
    assert per % 512 == 0
    assert (splits - 1) * per < k <= splits * per  # every split has work, all of K is covered
    assert 1 <= splits <= real.MAX_SPLIT_K
    if splits > 1:
        assert per >= real.MIN_K_PER_SPLIT
    # More splits only when the tiles alone leave SMs idle.
    if tiles >= real.PROGRAMS_PER_SM * sms:
        assert splits == 1


def test_forced_path_reads_argument_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(real.PATH_ENV, raising=False)
    assert real.forced_path() == real.AUTO
    monkeypatch.setenv(real.PATH_ENV, "dot")
    assert real.forced_path() == "dot"
    assert real.forced_path("gemv") == "gemv"
    monkeypatch.setenv(real.PATH_ENV, "fastest")
    with pytest.raises(ValueError, match=real.PATH_ENV):
        real.forced_path()


def test_cpu_calls_stay_on_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the public ops are the reference whatever path is asked for."""
    monkeypatch.setenv(real.PATH_ENV, "dot")
    t = _quantized("wo8", seed=1)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(2))
    y = ref.weight_only_matmul(x, t["qweight"], t["scale"], 8)
    expected = x.double() @ ref.dequantize_weight_only(t["qweight"], t["scale"], 8).double().t()
    assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_m_bucket_is_a_power_of_two_at_least_m() -> None:
    for m in (1, 3, 16, 17, 4095, 4096):
        b = real.m_bucket(m)
        assert b >= m and b & (b - 1) == 0 and b < 2 * m + 1
    assert triton.next_power_of_2(5000) > real.m_bucket(5000) == 4096


@pytest.mark.parametrize("m", [1, 4, 16, 64, 256, 1024])
@pytest.mark.parametrize("bits", [4, 8])
def test_split_k_partials_cost_at_most_the_weight(m: int, bits: int) -> None:
    """With the cap, the float32 partials (written and read back) never move more bytes than
    the weight, unless one split (no partials at all) is all that is left."""
    n, k, sms = 4096, 11008, 132
    bm, bn = real.nominal_tile(real.DOT, m)
    assert 16 <= bm <= 64 and bm >= min(m, 16)
    splits, _ = real.split_k_for(-(-m // bm) * -(-n // bn), k, sms, 1024,
                                 real.partial_split_cap(m, k, bits))
    assert splits == 1 or 8 * splits * m * n <= n * k * bits / 8


@pytest.mark.parametrize("m,int8,int4", [
    (31, False, False), (32, False, False), (33, True, False), (64, True, False),
    (65, True, True), (1024, True, True), (1025, False, False), (4096, False, False)])
def test_cutlass_range_on_narrow_weights(m: int, int8: bool, int4: bool) -> None:
    """A 4096-row weight on 132 SMs: int8 from M = 33, int4 from 65, both to 1024; groupwise
    never (dequantize + cuBLAS beat every tile there)."""
    assert real.cutlass_range(m, 4096, 8, 0, 132) == int8
    assert real.cutlass_range(m, 4096, 4, 0, 132) == int4
    assert real.cutlass_range(m, 4096, 4, 128, 132) is False


@pytest.mark.parametrize("m,per_channel,grouped", [
    (31, False, False), (32, True, False), (33, True, True), (1024, True, True),
    (1025, False, False)])
def test_cutlass_range_on_wide_weights(m: int, per_channel: bool, grouped: bool) -> None:
    """Weights whose 128-row tiles fill half of 132 SMs (8448 rows and more): per channel from
    M = 32, groupwise from 33, to 1024."""
    for n in (8448, 22016):
        assert real.cutlass_range(m, n, 8, 0, 132) == per_channel
        assert real.cutlass_range(m, n, 4, 0, 132) == per_channel
        assert real.cutlass_range(m, n, 4, 128, 132) == grouped
    assert real.cutlass_range(32, 8320, 4, 0, 132) is False  # 65 tiles: narrow
