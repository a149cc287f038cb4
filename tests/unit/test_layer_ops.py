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


def test_familiar_names_build_the_generic_layers_with_their_scheme():
    from tpquant.collectives import SingleProcessCommunicator
    from tpquant.layers import ColumnLinear, RowLinear
    from tpquant.layers import named
    from tpquant.parallel.mapping import Mapping
    from tpquant.quantization.schemes import Groupwise, WeightOnly

    m, c = Mapping(1, 0), SingleProcessCommunicator()
    cases = [
        (named.SmoothQuantColumnLinear(64, 32, m, c, per_token=False), ColumnLinear,
         SmoothQuant(False, True)),
        (named.SmoothQuantRowLinear(64, 32, m, c, per_channel=False), RowLinear,
         SmoothQuant(True, False)),
        (named.WeightOnlyQuantColumnLinear(64, 32, m, c, bits=4), ColumnLinear, WeightOnly(4)),
        (named.WeightOnlyQuantRowLinear(64, 32, m, c), RowLinear, WeightOnly(8)),
        (named.WeightOnlyGroupwiseQuantColumnLinear(64, 32, m, c, group_size=32), ColumnLinear,
         Groupwise(32)),
        (named.WeightOnlyGroupwiseQuantRowLinear(64, 32, m, c, group_size=16, zeros=False,
                                                 pre_quant_scale=True), RowLinear,
         Groupwise(16, False, True)),
    ]
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(8))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9)).half()
    for layer, cls, scheme in cases:
        assert type(layer) is cls and layer.scheme == scheme
        opts = {"act_amax": x.float().abs().amax(0)} if isinstance(scheme, SmoothQuant) else {}
        y = layer.load_full(w, **opts)(x)
        want = x.double() @ scheme.dequantize(layer.tensors).double().T
        assert (y.double() - want).abs().max() <= 0.05 * want.abs().max()  # fp16 + activation quant
