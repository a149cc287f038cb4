"""Passthrough, weight-only and groupwise INT4 schemes against float64 references.

Every reference here is written plainly in float64 from the stored tensors (unpacking
through `unpack_int4`, which test_packing checks on its own), not through the kernels.
"""

from __future__ import annotations

import pytest
import torch

from tpquant.quantization.mode import QuantMode
from tpquant.quantization.packing import unpack_int4
from tpquant.quantization.schemes import (
    SmoothQuant,
    Groupwise,
    Passthrough,
    Scheme,
    WeightOnly,
    scheme_for_mode,
)

OUT, IN = 40, 384  # 384 is a multiple of 32, 64, 128 and of 48
EPS32 = torch.finfo(torch.float32).eps

SCHEMES = [
    Passthrough(torch.float16),
    Passthrough(torch.bfloat16),
    Passthrough(torch.float32),
    WeightOnly(8),
    WeightOnly(4),
    *(
        Groupwise(group_size=g, zeros=z, pre_quant_scale=p)
        for g in (32, 64, 128, 48)
        for z in (True, False)
        for p in (False, True)
    ),
]


def _id(s: Scheme) -> str:
    if isinstance(s, Passthrough):
        return f"passthrough-{str(s.dtype).split('.')[-1]}"
    if isinstance(s, WeightOnly):
        return f"wo{s.bits}"
    return f"gw{s.group_size}{'-zeros' if s.zeros else '-sym'}{'-pqs' if s.pre_quant_scale else ''}"


schemes = pytest.mark.parametrize("scheme", SCHEMES, ids=_id)
quantized = pytest.mark.parametrize(
    "scheme", [s for s in SCHEMES if not isinstance(s, Passthrough)], ids=_id
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_weight(seed: int) -> torch.Tensor:
    """Rows of very different magnitudes, with a few outliers, as in real checkpoints."""
    g = _gen(seed)
    w = torch.randn(OUT, IN, generator=g) * torch.exp(torch.randn(OUT, 1, generator=g))
    idx = torch.randint(0, OUT * IN, (20,), generator=g)
    w.view(-1)[idx] *= 8
    return w


def make_pqs(seed: int) -> torch.Tensor:
    return torch.exp(0.5 * torch.randn(IN, generator=_gen(seed)))  # positive, ~[0.2, 5]


def quantize(scheme: Scheme, w: torch.Tensor, seed: int = 7) -> dict[str, torch.Tensor]:
    if isinstance(scheme, Groupwise) and scheme.pre_quant_scale:
        return scheme.quantize(w, pre_quant_scale=make_pqs(seed))
    return scheme.quantize(w)


def _per_column(group_tensor: torch.Tensor, g: int) -> torch.Tensor:
    """[in/g, out] -> float64 [out, in], one value per weight."""
    return group_tensor.double().t().repeat_interleave(g, dim=1)


def ref_dequantize(scheme: Scheme, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float64 effective weight from the stored tensors."""
    if isinstance(scheme, Passthrough):
        return t["weight"].double()
    if isinstance(scheme, WeightOnly):
        q = t["qweight"] if scheme.bits == 8 else unpack_int4(t["qweight"], signed=True)
        return q.double() * t["scale"].double()[:, None]
    g = scheme.group_size
    q = unpack_int4(t["qweight"], signed=not scheme.zeros).double()
    if scheme.zeros:
        q = q - _per_column(t["zeros"], g)
    w = q * _per_column(t["scales"], g)
    if scheme.pre_quant_scale:
        w = w * t["pre_quant_scale"].double()[None, :]
    return w


def step_in_w(scheme: Scheme, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float64 [out, in]: one quantization step of each weight, in W's units (times p[j])."""
    if isinstance(scheme, WeightOnly):
        return t["scale"].double()[:, None].expand(OUT, IN)
    step = _per_column(t["scales"], scheme.group_size)
    if scheme.pre_quant_scale:
        step = step * t["pre_quant_scale"].double()[None, :]
    return step


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


# -- (a) quantize -> dequantize ---------------------------------------------------------------


@schemes
def test_dequantize_within_half_step(scheme):
    w = make_weight(1)
    w64 = w.double()
    t = quantize(scheme, w)
    deq = ref_dequantize(scheme, t)

    # The scheme's own float32 dequantize agrees with the float64 one up to float32 rounding.
    mine = scheme.dequantize(t)
    assert mine.dtype == torch.float32 and mine.shape == (OUT, IN)
    assert torch.all((mine.double() - deq).abs() <= 4 * EPS32 * deq.abs() + 1e-30)

    if isinstance(scheme, Passthrough):
        # Only the cast to dtype: half an ulp (subnormals: half their spacing).
        fi = torch.finfo(scheme.dtype)
        bound = fi.eps / 2 * w64.abs() + fi.tiny * fi.eps
        assert torch.all((deq - w64).abs() <= bound)
        return

    # Slack for float32 arithmetic: 1e-5 of a step (x / s + z and (q - z) * s are float32,
    # |q - z| <= 15 or 127) plus 4 ulps of |W| (the division by p and the multiplication back).
    step = step_in_w(scheme, t)
    bound = step / 2 + 1e-5 * step + 4 * EPS32 * w64.abs()
    assert torch.all((deq - w64).abs() <= bound), float(((deq - w64).abs() / bound).max())


@quantized
def test_scales_follow_the_documented_rule(scheme):
    """The half-step bound is only meaningful if the step is the tight one: check the scales."""
    w = make_weight(2)
    t = quantize(scheme, w, seed=3)
    w64 = w.double()
    if isinstance(scheme, WeightOnly):
        qmax = 127 if scheme.bits == 8 else 7
        expected = w64.abs().amax(dim=1) / qmax
        torch.testing.assert_close(t["scale"].double(), expected, rtol=1e-6, atol=0)
        return
    if scheme.pre_quant_scale:
        w64 = w64 / make_pqs(3).double()[None, :]
        torch.testing.assert_close(t["pre_quant_scale"], make_pqs(3), rtol=0, atol=0)
    groups = w64.reshape(OUT, IN // scheme.group_size, scheme.group_size)
    if scheme.zeros:
        lo = groups.amin(-1).clamp(max=0)
        hi = groups.amax(-1).clamp(min=0)
        scale = (hi - lo) / 15
        torch.testing.assert_close(t["scales"].double(), scale.t(), rtol=1e-6, atol=0)
        torch.testing.assert_close(t["zeros"].double(), (-lo / scale).t(), rtol=0, atol=1e-5)
    else:
        scale = groups.abs().amax(-1) / 7
        torch.testing.assert_close(t["scales"].double(), scale.t(), rtol=1e-6, atol=0)


# -- (b), (c) forward -----------------------------------------------------------------------------


@schemes
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_forward_float32_matches_dequantized_matmul(scheme, with_bias):
    w = make_weight(4)
    t = quantize(scheme, w)
    g = _gen(5)
    x = torch.randn(2, 3, IN, generator=g)
    bias = torch.randn(OUT, generator=g) if with_bias else None
    y = scheme.forward(x, t, bias)
    assert y.shape == (2, 3, OUT) and y.dtype == torch.float32
    ref = x.double() @ ref_dequantize(scheme, t).t()
    if bias is not None:
        ref = ref + bias.double()
    assert rel_err(y, ref) <= 1e-5


@schemes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_half_precision(scheme, dtype):
    """Tolerance: relative (Frobenius) error <= eps(dtype): the float32 result is rounded to
    dtype once (<= eps/2 per element); Passthrough with matching dtypes runs torch's own
    half-precision linear."""
    w = make_weight(6)
    t = quantize(scheme, w)
    g = _gen(8)
    x = torch.randn(5, IN, generator=g).to(dtype)
    bias = torch.randn(OUT, generator=g).to(dtype)
    y = scheme.forward(x, t, bias)
    assert y.shape == (5, OUT) and y.dtype == dtype
    ref = x.double() @ ref_dequantize(scheme, t).t() + bias.double()
    assert rel_err(y, ref) <= torch.finfo(dtype).eps


# -- (d) layout against specs() ---------------------------------------------------------------------


@schemes
def test_tensors_match_specs(scheme):
    t = quantize(scheme, make_weight(9))
    specs = scheme.specs()
    assert set(t) == set(specs)
    for name, spec in specs.items():
        x = t[name]
        dims = [d for d in (spec.out_dim, spec.in_dim) if d is not None]
        assert x.dim() == len(dims), name
        if spec.out_dim is not None:
            assert x.shape[spec.out_dim] == OUT, name
        if spec.in_dim is not None:
            assert x.shape[spec.in_dim] * spec.in_per_index == IN, name
    if isinstance(scheme, Passthrough):
        assert t["weight"].dtype == scheme.dtype
    elif isinstance(scheme, WeightOnly):
        assert t["qweight"].dtype == (torch.int8 if scheme.bits == 8 else torch.uint8)
        assert t["scale"].dtype == torch.float32
    else:
        assert t["qweight"].dtype == torch.uint8
        assert specs["scales"].in_per_index == scheme.group_size
        for name in ("scales", "zeros", "pre_quant_scale"):
            if name in t:
                assert t[name].dtype == torch.float32, name


# -- (e) zero rows and zero groups -------------------------------------------------------------------


@schemes
def test_zero_rows_and_groups_are_exact(scheme):
    w = make_weight(10)
    g = scheme.group_size if isinstance(scheme, Groupwise) else 32
    w[3] = 0
    w[5, g : 2 * g] = 0
    t = quantize(scheme, w)
    for name, x in t.items():
        if x.is_floating_point():
            assert torch.isfinite(x).all(), name
    deq = scheme.dequantize(t)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[3], torch.zeros(IN))
    assert torch.equal(deq[5, g : 2 * g], torch.zeros(g))
    y = scheme.forward(torch.randn(4, IN, generator=_gen(11)), t)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 3], torch.zeros(4))


# -- (f) errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 2, 3, 16])
def test_weight_only_refuses_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        WeightOnly(bits)


def test_groupwise_refuses_group_not_dividing_in_features():
    w = make_weight(12)[:, :256]
    with pytest.raises(ValueError, match=r"group size 48.*in_features=256"):
        Groupwise(group_size=48).quantize(w)
    with pytest.raises(ValueError, match="group_size"):
        Groupwise(group_size=0)


def test_groupwise_refuses_pre_quant_scale_it_does_not_store():
    with pytest.raises(ValueError, match="pre_quant_scale"):
        Groupwise(pre_quant_scale=False).quantize(make_weight(13), pre_quant_scale=make_pqs(13))


def test_groupwise_refuses_bad_pre_quant_scale():
    scheme = Groupwise(pre_quant_scale=True)
    p = make_pqs(14)
    with pytest.raises(ValueError, match="pre_quant_scale"):
        scheme.quantize(make_weight(14), pre_quant_scale=p[:-2])
    p[7] = 0
    with pytest.raises(ValueError, match="positive"):
        scheme.quantize(make_weight(14), pre_quant_scale=p)


def test_groupwise_pre_quant_scale_defaults_to_ones():
    w = make_weight(15)
    with_ones = Groupwise(pre_quant_scale=True).quantize(w)
    plain = Groupwise(pre_quant_scale=False).quantize(w)
    assert torch.equal(with_ones["pre_quant_scale"], torch.ones(IN))
    for name in plain:
        assert torch.equal(with_ones[name], plain[name]), name


# -- (g) scheme_for_mode ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "+int8kv", "+fp8kv"])
@pytest.mark.parametrize(
    "name,cls,attrs",
    [
        ("fp16", Passthrough, {}),
        ("bf16", Passthrough, {}),
        ("int8_wo", WeightOnly, {"bits": 8}),
        ("int4_wo", WeightOnly, {"bits": 4}),
        ("int4_gw", Groupwise, {"group_size": 64, "zeros": False, "pre_quant_scale": True}),
    ],
)
def test_scheme_for_mode_weight_only_names(name, cls, attrs, suffix):
    mode = QuantMode.from_name(name + suffix)
    scheme = scheme_for_mode(mode, group_size=64, dtype=torch.bfloat16, zeros=False,
                             pre_quant_scale=True)
    assert type(scheme) is cls
    assert scheme.dtype == torch.bfloat16
    for k, v in attrs.items():
        assert getattr(scheme, k) == v, k
    assert scheme.mode == QuantMode.from_name(name)


@pytest.mark.parametrize(
    "mode",
    [QuantMode.FP8_QDQ, QuantMode.INT8_WEIGHTS | QuantMode.PER_GROUP,
     QuantMode.INT4_WEIGHTS | QuantMode.INT8_WEIGHTS],
    ids=["fp8qdq", "int8-per-group", "int4-and-int8"],
)
def test_scheme_for_mode_refuses_unknown_modes(mode):
    with pytest.raises(ValueError, match="QuantMode"):
        scheme_for_mode(mode)


@pytest.mark.parametrize("name", ["w8a8_tensor", "w8a8_channel", "w8a8_token",
                                  "w8a8_token_channel"])
def test_scheme_for_mode_smoothquant(name):
    mode = QuantMode.from_name(name)
    scheme = scheme_for_mode(mode)
    assert isinstance(scheme, SmoothQuant)
    assert scheme.per_token == mode.has_per_token_dynamic_scaling()
    assert scheme.per_channel == mode.has_per_channel_scaling()
