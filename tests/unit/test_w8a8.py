"""SmoothQuant W8A8 scheme and its reference kernels against float64 fake quantization.

The reference below is the textbook formula in float64: q = clamp(round_half_even(v / s),
-128, 127), integer product, times s_x times s_w, plus bias. Scales are stored in float32 by
contract, so the reference rounds each scale to float32 once; everything else is float64.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tpquant.kernels.w8a8 import (
    int8_matmul,
    quantize_per_token,
    quantize_static,
    rms_norm_quantize,
    w8a8_matmul,
)
from tpquant.kernels.norm import rms_norm
from tpquant.quantization.schemes.w8a8 import SmoothQuant

IN, OUT = 64, 48
EPS = 1e-5
MODES = list(itertools.product([True, False], [True, False]))  # (per_token, per_channel)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A float64 scale as stored: rounded to float32 once."""
    return t.float().double()


def _ref_q(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(v / scale).clamp(-128, 127)  # torch.round: half to even


def _ref_weight_scale(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    w = w.double()
    return _f32(w.abs().amax(1) / 127 if per_channel else w.abs().max() / 127)


def _ref_forward(x, w, *, per_token, w_scale, act_amax=None, smoother=None, bias=None):
    """Float64 fake-quant W8A8: w_scale [out] or [] (float64), x [..., in]."""
    xs = x.double() if smoother is None else x.double() / smoother.double()
    if per_token:
        sx = _f32(xs.abs().amax(-1, keepdim=True) / 127)
    else:
        sx = _f32(act_amax.double().max() / 127)
    qx = _ref_q(xs, sx)
    sw = w_scale if w_scale.dim() == 0 else w_scale[:, None]
    qw = _ref_q(w.double(), sw)
    y = (qx @ qw.T) * sx * w_scale
    return y if bias is None else y + bias.double()


def _assert_q_close(q: torch.Tensor, v: torch.Tensor, scale: torch.Tensor) -> None:
    """q equals the float64 reference, except within 1e-3 of a rounding tie (where float32
    and float64 division may land on either side), and there by at most one step."""
    quot = v.double() / scale.double()
    ref = _ref_q(v.double(), scale.double())
    diff = (q.double() - ref).abs()
    near_tie = ((quot - quot.floor()) - 0.5).abs() < 1e-3
    assert q.dtype == torch.int8
    assert ((diff == 0) | (near_tie & (diff <= 1))).all()


def _data(seed: int):
    g = _gen(seed)
    x = torch.randn(2, 5, IN, generator=g)
    x[..., [4, 30]] *= 20.0  # outlier channels
    w = torch.randn(OUT, IN, generator=g) * (0.5 + torch.rand(OUT, 1, generator=g))
    bias = torch.randn(OUT, generator=g)
    smoother = 0.5 + torch.rand(IN, generator=g) * 4
    return x, w, bias, smoother


def _assert_rel(y: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(
        y.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item()
    )


# -- the scheme's forward --------------------------------------------------------------------------


@pytest.mark.parametrize("per_token,per_channel", MODES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_smoother", [False, True])
def test_forward_matches_fake_quant(per_token, per_channel, with_bias, with_smoother) -> None:
    x, w, bias, smoother = _data(10)
    smoother = smoother if with_smoother else None
    bias = bias if with_bias else None
    xs = x.double() if smoother is None else x.double() / smoother.double()
    # Calibrate on a milder batch so static mode also exercises the clamp at -128 / 127.
    act_amax = (0.7 * xs).abs().reshape(-1, IN).amax(0).float()

    scheme = SmoothQuant(per_token=per_token, per_channel=per_channel)
    t = scheme.quantize(w, act_amax=act_amax, smoother=smoother)
    assert set(t) == {"qweight", "weight_scale"} | (
        set() if per_token else {"act_scale"}
    ) | (set() if smoother is None else {"smoother"})
    assert set(scheme.specs(t)) == set(t)
    assert t["qweight"].dtype == torch.int8 and t["weight_scale"].dtype == torch.float32

    w_scale = _ref_weight_scale(w, per_channel)
    torch.testing.assert_close(t["weight_scale"].double(), w_scale, rtol=0, atol=0)
    ref = _ref_forward(
        x, w, per_token=per_token, w_scale=w_scale, act_amax=act_amax, smoother=smoother, bias=bias
    )
    y = scheme.forward(x, t, bias)
    assert y.shape == (2, 5, OUT) and y.dtype == x.dtype
    _assert_rel(y, ref, 1e-5)


@pytest.mark.parametrize("per_token", [True, False])
def test_fused_parts_get_their_own_scales(per_token) -> None:
    g = _gen(11)
    sizes = [32, 8, 8]  # q, k, v with different magnitudes
    w = torch.cat([torch.randn(n, IN, generator=g) * m for n, m in zip(sizes, (1.0, 3.0, 0.2))])
    x = torch.randn(7, IN, generator=g)
    act_amax = x.abs().amax(0)
    scheme = SmoothQuant(per_token=per_token, per_channel=False)
    t = scheme.quantize(w, act_amax=act_amax, part_sizes=sizes)

    ws = t["weight_scale"]
    assert ws.shape == (OUT,)
    assert scheme.specs(t)["weight_scale"].out_dim == 0  # shards with the rows
    ref_parts = [_f32(p.double().abs().max() / 127) for p in w.split(sizes)]
    assert len({r.item() for r in ref_parts}) == 3  # the parts' scales differ
    for part, ref in zip(ws.split(sizes), ref_parts):
        torch.testing.assert_close(part.double(), ref.expand(part.shape), rtol=0, atol=0)

    w_scale = torch.cat([r.expand(n) for r, n in zip(ref_parts, sizes)])
    ref = _ref_forward(x, w, per_token=per_token, w_scale=w_scale, act_amax=act_amax)
    _assert_rel(scheme.forward(x, t), ref, 1e-5)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("with_smoother", [False, True])
def test_dequantize_within_half_step(per_channel, with_smoother) -> None:
    _, w, _, smoother = _data(12)
    smoother = smoother if with_smoother else None
    scheme = SmoothQuant(per_token=True, per_channel=per_channel)
    t = scheme.quantize(w, smoother=smoother)
    deq = scheme.dequantize(t)
    assert deq.shape == (OUT, IN) and deq.dtype == torch.float32

    sw = _ref_weight_scale(w, per_channel)
    half_step = (sw[:, None] if per_channel else sw).expand(OUT, IN) / 2
    target = w.double()
    if smoother is not None:
        target = target / smoother.double()
        half_step = half_step / smoother.double()
    assert ((deq.double() - target).abs() <= half_step * (1 + 1e-5)).all()


def test_static_without_act_amax_raises() -> None:
    w = torch.randn(OUT, IN, generator=_gen(13))
    with pytest.raises(ValueError, match="act_amax"):
        SmoothQuant(per_token=False, per_channel=True).quantize(w)
    with pytest.raises(ValueError, match="act_amax"):
        SmoothQuant(per_token=False).quantize(w, act_amax=torch.ones(IN + 1))
    # Per-token scaling ignores act_amax and stores no activation scale.
    t = SmoothQuant(per_token=True).quantize(w, act_amax=torch.ones(IN))
    assert "act_scale" not in t


def test_mode_and_specs() -> None:
    for per_token, per_channel in MODES:
        s = SmoothQuant(per_token=per_token, per_channel=per_channel)
        assert s.mode.has_act_and_weight_quant()
        assert s.mode.has_per_token_dynamic_scaling() == per_token
        assert s.mode.has_per_channel_scaling() == per_channel
        specs = s.specs()
        assert specs["qweight"].out_dim == 0 and specs["qweight"].in_dim == 1
        assert specs["smoother"].in_dim == 0 and specs["smoother"].out_dim is None
        assert ("act_scale" in specs) != per_token
        assert (specs["weight_scale"].out_dim == 0) == per_channel


@pytest.mark.parametrize("per_token,per_channel", MODES)
def test_accuracy_against_float(per_token, per_channel) -> None:
    """W8A8 on Gaussian data is within 2% (relative Frobenius error) of float x @ W^T."""
    g = _gen(14)
    x = torch.randn(16, 256, generator=g)
    w = torch.randn(128, 256, generator=g) / 16
    scheme = SmoothQuant(per_token=per_token, per_channel=per_channel)
    t = scheme.quantize(w, act_amax=x.abs().amax(0))
    ref = x.double() @ w.double().T
    err = ((scheme.forward(x, t).double() - ref).norm() / ref.norm()).item()
    assert err < 0.02


def test_half_precision_input() -> None:
    x, w, bias, smoother = _data(15)
    scheme = SmoothQuant()
    t = scheme.quantize(w, smoother=smoother)
    y16 = scheme.forward(x.half(), t, bias.half())
    assert y16.dtype == torch.float16
    ref = _ref_forward(
        x.half(), w, per_token=True, w_scale=_ref_weight_scale(w, True), smoother=smoother,
        bias=bias.half(),
    )
    _assert_rel(y16, ref, 2e-3)  # only the final rounding to float16


# -- the kernels ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_per_token(dtype) -> None:
    g = _gen(20)
    x = (torch.randn(3, 9, IN, generator=g) * torch.rand(3, 9, 1, generator=g) * 10).to(dtype)
    x[1, 2] = 0  # an all-zero token quantizes to zeros
    q, scale = quantize_per_token(x)
    assert scale.shape == (3, 9, 1) and scale.dtype == torch.float32
    ref_scale = x.double().abs().amax(-1, keepdim=True) / 127
    live = ref_scale > 0
    torch.testing.assert_close(scale.double()[live], ref_scale[live], rtol=1e-7, atol=0)
    assert (scale > 0).all()
    _assert_q_close(q, x.double(), scale.double())
    assert (q[1, 2] == 0).all()
    assert (q.abs().amax(-1)[live.squeeze(-1)] == 127).all()  # each token's max hits the grid end


def test_quantize_static_clamps() -> None:
    g = _gen(21)
    x = torch.randn(11, IN, generator=g) * 3
    scale = x.abs().max() / 2 / 127  # half the range: the outer values clamp
    q = quantize_static(x, scale)
    _assert_q_close(q, x.double(), scale.double())
    assert (q == 127).any() and (q == -128).any()


def test_int8_matmul_exact() -> None:
    g = _gen(22)
    k = 4096
    qx = torch.randint(-128, 128, (2, 3, k), generator=g, dtype=torch.int8)
    qw = torch.randint(-128, 128, (17, k), generator=g, dtype=torch.int8)
    qx[0, 0] = -128  # the largest products, all of one sign
    qw[0] = -128
    # Large odd partial sums beyond 2^24: exact in int32/float64, not in a float32 accumulator.
    qx[1] = torch.randint(101, 128, (3, k), generator=g, dtype=torch.int8) | 1
    qw[1:9] = torch.randint(101, 128, (8, k), generator=g, dtype=torch.int8) | 1
    acc = int8_matmul(qx, qw)
    assert acc.dtype == torch.int32 and acc.shape == (2, 3, 17)
    ref = qx.long() @ qw.long().T
    assert ref[0, 0, 0] == 128 * 128 * k
    assert torch.equal(acc.long(), ref)
    with pytest.raises(TypeError):
        int8_matmul(qx.float(), qw)


def test_w8a8_matmul_rescale() -> None:
    g = _gen(23)
    qx = torch.randint(-128, 128, (6, IN), generator=g, dtype=torch.int8)
    qw = torch.randint(-128, 128, (OUT, IN), generator=g, dtype=torch.int8)
    acc = qx.double() @ qw.double().T
    bias = torch.randn(OUT, generator=g)
    for sx in (torch.rand(6, 1, generator=g), torch.rand((), generator=g)):
        for sw in (torch.rand(OUT, generator=g), torch.rand((), generator=g)):
            y = w8a8_matmul(qx, sx, qw, sw, bias, out_dtype=torch.float32)
            _assert_rel(y, acc * sx.double() * sw.double() + bias.double(), 1e-6)
    assert w8a8_matmul(qx, sx, qw, sw, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def _ref_rms(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * gamma.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(dtype) -> None:
    g = _gen(24)
    x = (torch.randn(4, 7, IN, generator=g) * 3).to(dtype)
    gamma = 1 + 0.2 * torch.randn(IN, generator=g)
    y = rms_norm(x, gamma.to(dtype), EPS)
    assert y.dtype == dtype
    rtol = 1e-6 if dtype == torch.float32 else 1e-3
    _assert_rel(y, _ref_rms(x, gamma.to(dtype)), rtol)


def test_rms_norm_quantize() -> None:
    g = _gen(25)
    x = torch.randn(5, 3, IN, generator=g) * 2
    x[..., 9] *= 30  # an outlier channel, folded away by gamma / s below
    gamma = (1 + 0.2 * torch.randn(IN, generator=g)) / (1 + torch.rand(IN, generator=g) * 5)
    ref = _ref_rms(x, gamma)

    q, scale = rms_norm_quantize(x, gamma, EPS)
    assert scale.shape == (5, 3, 1)
    ref_scale = ref.abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-5, atol=0)
    _assert_q_close(q, ref, ref_scale)

    static = (ref.abs().max() * 0.6 / 127).float()  # clamps the largest values
    q_s, scale_s = rms_norm_quantize(x, gamma, EPS, static_scale=static)
    assert torch.equal(scale_s, static)
    _assert_q_close(q_s, ref, static.double())
    assert (q_s.abs() >= 127).any()
