"""The ops around the linears: activation quantizers and the SmoothQuant RMSNorm, against
float64 formulas written here; and the fused int8 path into a W8A8 linear equal to the
unfused float path."""

from __future__ import annotations

import pytest
import torch

from tpquant.kernels.w8a8 import QuantizedActivation
from tpquant.layers.norm import RmsNorm, SmoothQuantRmsNorm
from tpquant.layers.quantize import QuantizePerToken, QuantizeTensor
from tpquant.quantization.schemes import SmoothQuant

EPS = 1e-6


def _x(seed: int, shape=(5, 96)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 7] *= 30  # outlier channel
    return x


def _q64(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.double() / scale.double()).clamp(-128, 127)


def _rms64(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * g.double()


def test_quantize_per_token_matches_formula():
    x = _x(0)
    out = QuantizePerToken()(x)
    scale = x.double().abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(out.scale.double(), scale, rtol=1e-7, atol=0)
    assert out.q.dtype == torch.int8
    assert (out.q.double() - _q64(x, scale)).abs().max() <= 1  # ties may round either way
    assert (out.q.double() * out.scale.double() - x.double()).abs().max() <= scale.max() / 2 * (1 + 1e-6)


def test_quantize_tensor_matches_formula():
    x = _x(1)
    scale = torch.tensor(0.05)
    out = QuantizeTensor(scale)(x)
    assert torch.equal(out.q.double(), _q64(x, scale))  # clamps the outliers at +-127/-128


@pytest.mark.parametrize("static", [False, True])
def test_smoothquant_rms_norm_matches_formula(static):
    x, g = _x(2), torch.rand(96, generator=torch.Generator().manual_seed(3)) + 0.5
    y64 = _rms64(x, g)
    scale = torch.tensor(float(y64.abs().max() / 127)) if static else None
    norm = SmoothQuantRmsNorm(96, EPS, torch.float32, static_scale=scale)
    norm.weight.data.copy_(g)
    out = norm(x)
    want_scale = scale.double() if static else y64.abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(out.scale.double().expand_as(want_scale), want_scale, rtol=1e-6, atol=0)
    assert (out.q.double() - _q64(y64, want_scale)).abs().max() <= 1


def test_rms_norm_matches_formula():
    x, g = _x(4), torch.rand(96) + 0.5
    norm = RmsNorm(96, EPS, torch.float32)
    norm.weight.data.copy_(g)
    torch.testing.assert_close(norm(x).double(), _rms64(x, g), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_token", [True, False])
def test_fused_int8_path_equals_float_path(per_token):
    """norm -> int8 -> W8A8 GEMM gives what norm (float) -> W8A8 linear (quantizing) gives."""
    x, g = _x(5), torch.rand(96) + 0.5
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(6)) / 10
    scheme = SmoothQuant(per_token=per_token, per_channel=True, dtype=torch.float32)
    y_norm = _rms64(x, g).float()
    t = scheme.quantize(w, act_amax=y_norm.abs().amax(0))
    static = None if per_token else t["act_scale"]
    norm = SmoothQuantRmsNorm(96, EPS, torch.float32, static_scale=static)
    norm.weight.data.copy_(g)

    fused = scheme.forward(norm(x), t)
    unfused = scheme.forward(_plain_norm(x, g), t)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="smoother"):
        scheme.forward(QuantizedActivation(*norm(x)), {**t, "smoother": torch.ones(96)})


def _plain_norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    norm = RmsNorm(96, EPS, torch.float32)
    norm.weight.data.copy_(g)
    return norm(x)
