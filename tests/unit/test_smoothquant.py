"""SmoothQuant tooling: smoothing invariance, RMSNorm folding, outlier reduction, ActStats, scales.

Every check is against float64 torch math written here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpquant.kernels.norm import rms_norm
from tpquant.quantization.calibrate import ActStats, collect
from tpquant.quantization.smoothquant import (
    activation_scale,
    fold_into_rms_norm,
    output_rescale,
    smooth_weight,
    smoothing_factors,
    weight_input_amax,
    weight_scales,
)

IN, OUT, TOKENS = 64, 48, 32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _outlier_acts(g: torch.Generator, tokens: int = TOKENS, dtype=torch.float64) -> torch.Tensor:
    """Gaussian activations with a few channels 50x larger (the LLM outlier pattern)."""
    x = torch.randn(tokens, IN, generator=g, dtype=torch.float64)
    x[:, [3, 17, 40]] *= 50.0
    return x.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -- (a) smoothing leaves the product unchanged -----------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_smoothing_invariance(alpha: float) -> None:
    g = _gen(1)
    x = _outlier_acts(g)
    w = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    w[:, 5] *= 30.0  # a weight outlier column too
    s = smoothing_factors(x.abs().amax(0), weight_input_amax(w), alpha).double()
    assert torch.isfinite(s).all() and (s > 0).all()

    y_ref = x @ w.T
    y = (x / s) @ smooth_weight(w, s).T
    assert smooth_weight(w, s).dtype == torch.float64
    assert _rel(y, y_ref) < 1e-10


def test_smoothing_factors_formula_and_zero_guard() -> None:
    g = _gen(2)
    act = torch.rand(IN, generator=g, dtype=torch.float64) * 10
    wam = torch.rand(IN, generator=g, dtype=torch.float64) * 2
    act[7] = 0.0  # a dead activation channel
    wam[9] = 0.0  # an all-zero weight column
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = smoothing_factors(act, wam, alpha)
        ref = act.clamp_min(1e-5) ** alpha / wam.clamp_min(1e-5) ** (1 - alpha)
        torch.testing.assert_close(s.double(), ref, rtol=1e-6, atol=0)
        assert torch.isfinite(s).all() and (s > 0).all()
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(act, wam, 1.5)


def test_weight_input_amax_over_fused_weights() -> None:
    g = _gen(3)
    q, k, v = (torch.randn(n, IN, generator=g) * (i + 1) for i, n in enumerate((32, 16, 16)))
    ref = torch.cat([q, k, v]).double().abs().amax(dim=0)
    torch.testing.assert_close(weight_input_amax(q, k, v).double(), ref, rtol=0, atol=0)
    with pytest.raises(ValueError):
        weight_input_amax(q, torch.randn(4, IN + 1))


# -- (b) folding s into the RMSNorm weight ------------------------------------------------------


def test_fold_into_rms_norm() -> None:
    g = _gen(4)
    eps = 1e-6
    x = _outlier_acts(g, dtype=torch.float32)
    gamma = (1 + 0.1 * torch.randn(IN, generator=g)).float()
    w = torch.randn(OUT, IN, generator=g).float()
    normed = rms_norm(x, gamma, eps)
    s = smoothing_factors(normed.abs().amax(0), weight_input_amax(w), 0.5)

    x64, g64, w64 = x.double(), gamma.double(), w.double()
    ref = (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * g64) @ w64.T

    y = rms_norm(x, fold_into_rms_norm(gamma, s), eps) @ smooth_weight(w, s).T
    assert y.dtype == torch.float32
    assert _rel(y, ref) < 1e-6


# -- (c) smoothing actually reduces outliers ---------------------------------------------------


def test_smoothing_reduces_activation_outliers() -> None:
    g = _gen(5)
    x = _outlier_acts(g, tokens=256)
    w = torch.randn(OUT, IN, generator=g, dtype=torch.float64)

    def outlier_ratio(t: torch.Tensor) -> float:
        amax = t.abs().amax(0)
        return (amax.max() / amax.median()).item()

    s = smoothing_factors(x.abs().amax(0), weight_input_amax(w), 0.5).double()
    before, after = outlier_ratio(x), outlier_ratio(x / s)
    # Outliers are 50x; alpha = 0.5 takes a square root of that ratio (roughly 7x remains).
    assert before > 30
    assert after < before / 3


# -- (d) ActStats --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_actstats_batches_then_merge_equal_full_amax(dtype: torch.dtype) -> None:
    g = _gen(6)
    batches = [_outlier_acts(g, tokens=n).to(dtype).reshape(n // 4, 4, IN) for n in (8, 12, 4, 16)]
    a = ActStats.empty(IN)
    for b in batches[:2]:
        a.update(b)
    b_stats = ActStats.empty(IN)
    for b in batches[2:]:
        b_stats.update(b)

    full = torch.cat([b.reshape(-1, IN) for b in batches]).double().abs().amax(0)
    merged = a.merge(b_stats)
    assert merged.amax.dtype == torch.float32
    assert torch.equal(merged.amax.double(), full)
    assert torch.equal(b_stats.merge(a).amax, merged.amax)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=5),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_actstats_merge_order_free(sizes: list[int], seed: int) -> None:
    g = _gen(seed)
    chunks = [torch.randn(n, 8, generator=g) * torch.rand(8, generator=g) * 10 for n in sizes]
    parts = [ActStats.empty(8).update(c) for c in chunks]
    fwd, rev = ActStats.empty(8), ActStats.empty(8)
    for p in parts:
        fwd = fwd.merge(p)
    for p in reversed(parts):
        rev = p.merge(rev)
    ref = torch.cat([torch.zeros(1, 8), *chunks]).double().abs().amax(0)
    assert torch.equal(fwd.amax.double(), ref)
    assert torch.equal(rev.amax, fwd.amax)


def test_collect_by_name() -> None:
    g = _gen(7)
    xs = [torch.randn(5, IN, generator=g) for _ in range(3)]
    ys = [torch.randn(2, 3, 16, generator=g) for _ in range(2)]
    stats = collect([("a", xs[0]), ("b", ys[0]), ("a", xs[1]), ("b", ys[1]), ("a", xs[2])])
    assert set(stats) == {"a", "b"}
    assert torch.equal(stats["a"].amax.double(), torch.cat(xs).double().abs().amax(0))
    assert torch.equal(
        stats["b"].amax.double(), torch.cat(ys).reshape(-1, 16).double().abs().amax(0)
    )
    with pytest.raises(ValueError):
        stats["a"].update(torch.randn(2, IN + 1))


# -- (e) scales -------------------------------------------------------------------------------


def test_weight_scales_per_tensor_channel_part() -> None:
    g = _gen(8)
    w = torch.randn(OUT, IN, generator=g) * torch.rand(OUT, 1, generator=g) * 4
    w64 = w.double()

    per_channel = weight_scales(w, per_channel=True)
    assert per_channel.shape == (OUT,) and per_channel.dtype == torch.float32
    torch.testing.assert_close(per_channel.double(), w64.abs().amax(1) / 127, rtol=1e-7, atol=0)

    per_tensor = weight_scales(w, per_channel=False)
    assert per_tensor.shape == () and per_tensor.dtype == torch.float32
    torch.testing.assert_close(per_tensor.double(), w64.abs().max() / 127, rtol=1e-7, atol=0)

    sizes = [24, 12, 12]
    per_part = weight_scales(w, per_channel=False, part_sizes=sizes)
    assert per_part.shape == (OUT,)
    ref = torch.cat([p.abs().max().expand(n) / 127 for p, n in zip(w64.split(sizes), sizes)])
    torch.testing.assert_close(per_part.double(), ref, rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="part_sizes"):
        weight_scales(w, per_channel=False, part_sizes=[24, 12])


def test_activation_scale_and_output_rescale() -> None:
    g = _gen(9)
    amax = torch.rand(IN, generator=g) * 20
    sx = activation_scale(amax)
    assert sx.shape == ()
    torch.testing.assert_close(sx.double(), amax.double().max() / 127, rtol=1e-7, atol=0)
    torch.testing.assert_close(activation_scale(amax.max()), sx, rtol=0, atol=0)

    sw_vec = torch.rand(OUT, generator=g)
    sw_scalar = torch.rand((), generator=g)
    sx_tok = torch.rand(TOKENS, 1, generator=g)
    cases = [(sx, sw_vec, (OUT,)), (sx, sw_scalar, ()), (sx_tok, sw_vec, (TOKENS, OUT)),
             (sx_tok, sw_scalar, (TOKENS, 1))]
    for a, w, shape in cases:
        r = output_rescale(a, w)
        assert r.shape == shape and r.dtype == torch.float32
        torch.testing.assert_close(r.double(), a.double() * w.double(), rtol=1e-7, atol=0)
