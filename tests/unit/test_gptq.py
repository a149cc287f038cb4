"""GPTQ (tpquant.quantization.gptq) against round-to-nearest and float64 references.

- With H = I no column says anything about another: GPTQ must store exactly what
  round-to-nearest (the scheme's own quantize) stores, in either column order.
- On correlated inputs its output error ||X W^T - X Q^T|| (float64) is well below RTN's.
- Q lies on the grid its statistics describe: the scheme stores it with no further rounding
  (dequantize(quantize(Q, statistics)) == Q to float32 rounding).
- Rows are independent (a column-parallel slice of rows gives the same rows), columns that
  calibration never saw (H[j, j] = 0) neither break it nor correct anything.
- The plan passes through layers it has no Hessian or grid for, and refuses AWQ scales.
- relayout_hessians puts padded heads' columns of o_proj at zero, the rest where they move.
"""

from __future__ import annotations

import pytest
import torch

from tpquant.engine.build import relayout_hessians
from tpquant.models.config import LlamaConfig
from tpquant.parallel.heads import apply_head_layout, plan_heads
from tpquant.quantization.gptq import GptqPlan, gptq, grid_for, hessian_update
from tpquant.quantization.schemes import Groupwise, Passthrough, SmoothQuant, WeightOnly

OUT, IN = 48, 256
SCHEMES = {
    "int8": WeightOnly(bits=8),
    "int4": WeightOnly(bits=4),
    "gw64-zeros": Groupwise(group_size=64, zeros=True),
    "gw32-sym": Groupwise(group_size=32, zeros=False),
}
schemes = pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=list(SCHEMES))


def weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(OUT, IN, generator=g) * torch.exp(torch.randn(OUT, 1, generator=g))


def correlated_inputs(tokens: int = 1024, seed: int = 1) -> torch.Tensor:
    """Inputs whose channels are strongly correlated (64 directions carry most of the
    energy) and of very different scales, as a transformer layer's are."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(64, IN, generator=g)
    scales = torch.exp(torch.randn(IN, generator=g))
    x = torch.randn(tokens, 64, generator=g) @ directions + 0.1 * torch.randn(tokens, IN, generator=g)
    return x * scales


def stored(scheme, w: torch.Tensor, statistics=None) -> torch.Tensor:
    """What the scheme effectively multiplies by after storing w, float64."""
    tensors = scheme.quantize(w) if statistics is None else scheme.quantize(w, statistics=statistics)
    return scheme.dequantize(tensors).double()


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    x = x.double()
    return float((x @ w.double().t() - x @ q.double().t()).norm())


@schemes
@pytest.mark.parametrize("act_order", [True, False])
def test_identity_hessian_is_round_to_nearest(scheme, act_order):
    w = weight()
    q, stats = gptq(w, torch.eye(IN, dtype=torch.float64), grid_for(scheme), act_order=act_order)
    assert torch.equal(stored(scheme, q, stats), stored(scheme, w))


@schemes
@pytest.mark.parametrize("act_order", [True, False])
def test_output_error_well_below_round_to_nearest(scheme, act_order):
    w, x = weight(), correlated_inputs()
    q, stats = gptq(w, hessian_update(None, x), grid_for(scheme), act_order=act_order)
    gptq_error = output_error(x, w, stored(scheme, q, stats))
    rtn_error = output_error(x, w, stored(scheme, w))
    assert gptq_error < 0.7 * rtn_error, (gptq_error, rtn_error)


@schemes
@pytest.mark.parametrize("act_order", [True, False])
def test_result_lies_on_the_grid_its_statistics_describe(scheme, act_order):
    w, x = weight(2), correlated_inputs(seed=3)
    q, stats = gptq(w, hessian_update(None, x), grid_for(scheme), act_order=act_order)
    assert q.dtype == torch.float32 and q.shape == w.shape
    again = stored(scheme, q, stats)
    assert torch.allclose(again, q.double(), rtol=1e-6, atol=1e-6 * float(q.abs().max()))


@schemes
def test_rows_are_independent(scheme):
    w, h = weight(4), hessian_update(None, correlated_inputs(seed=5))
    grid = grid_for(scheme)
    full, _ = gptq(w, h, grid)
    part, _ = gptq(w[10:30], h, grid)
    assert torch.equal(part, full[10:30])


def test_act_order_groups_keep_the_grids_of_the_original_weights():
    scheme = SCHEMES["gw64-zeros"]
    w, x = weight(10), correlated_inputs(seed=11)
    _, stats = gptq(w, hessian_update(None, x), grid_for(scheme), act_order=True)
    assert all(torch.equal(stats[k], v) for k, v in scheme.statistics(w).items())


def test_columns_never_seen_are_rounded_as_they_are():
    scheme = SCHEMES["int8"]
    w, x = weight(6), correlated_inputs(seed=7)
    x[:, 100:116] = 0  # a padded head: its inputs are always zero
    q, stats = gptq(w, hessian_update(None, x), grid_for(scheme))
    assert torch.isfinite(q).all()
    # those columns influence nothing, so any rounding of them is as good: GPTQ still beats
    # RTN on the output, and the columns themselves are on the grid
    assert output_error(x, w, stored(scheme, q, stats)) < output_error(x, w, stored(scheme, w))


def test_bad_arguments_are_refused():
    grid = grid_for(SCHEMES["int8"])
    with pytest.raises(ValueError, match="hessian"):
        gptq(weight(), torch.eye(IN - 1, dtype=torch.float64), grid)
    with pytest.raises(ValueError, match="damp"):
        gptq(weight(), torch.eye(IN, dtype=torch.float64), grid, damp=0.0)
    with pytest.raises(ValueError, match="does not divide"):
        gptq(weight()[:, :250], torch.eye(250, dtype=torch.float64),
             grid_for(Groupwise(group_size=64)))
    with pytest.raises(ValueError, match="pre-quant scale"):
        grid_for(Groupwise(group_size=64, pre_quant_scale=True))


def test_plan_rounds_only_what_it_can():
    w, h = weight(8), hessian_update(None, correlated_inputs(seed=9))
    scheme_of = {"a": SCHEMES["int4"], "float": Passthrough(torch.float32),
                 "w8a8": SmoothQuant(), "no_hessian": SCHEMES["int4"]}.__getitem__
    plan = GptqPlan({"a": h, "float": h, "w8a8": h}, scheme_of)
    for name in ("float", "w8a8", "no_hessian"):
        assert plan.transform_weight(name, w) is w and plan.quant_options(name) == {}
    q = plan.transform_weight("a", w)
    expected, stats = gptq(w, h, grid_for(SCHEMES["int4"]))
    assert torch.equal(q, expected)
    assert torch.equal(plan.quant_options("a")["statistics"]["amax"], stats["amax"])
    assert plan.transform_weight("a", w) is q  # kept for the next rank built from w
    assert plan.transform_norm("x.ffn_norm", w) is w


def test_relayout_hessians_moves_columns_as_the_weight_moves():
    # 9 query heads of 4 at TP 2: padded to 10 heads, so o_proj's input grows from 36 to 40.
    # H must be in the layout of the o_proj weight GPTQ rounds: entry (i, j) of the new H is
    # that of the old columns that the weight's new columns i and j come from (0 for padding).
    config = LlamaConfig(vocab_size=10, hidden_size=36, intermediate_size=8, num_layers=1,
                         num_heads=9, num_kv_heads=3, head_dim=4)
    hd, nh, nkv = 4, 9, 3
    g = torch.Generator().manual_seed(0)
    h = hessian_update(None, torch.randn(64, nh * hd, generator=g))
    other = hessian_update(None, torch.randn(64, 36, generator=g))
    o_name, down = "model.layers.0.attention.o_proj", "model.layers.0.mlp.down"
    out = relayout_hessians({o_name: h, down: other}, config, 2)
    assert torch.equal(out[down], other)  # only o_proj's input depends on the head layout

    # where each weight column goes: lay out an o_proj whose column j holds j + 1
    o_w = torch.arange(1.0, nh * hd + 1)[None, :].expand(36, -1)
    laid = apply_head_layout(plan_heads(nh, nkv, 2), hd, torch.zeros(nh * hd, 36),
                             torch.zeros(nkv * hd, 36), torch.zeros(nkv * hd, 36), o_w)["o_w"]
    src = laid[0].long() - 1
    assert out[o_name].shape == (40, 40) and int((src < 0).sum()) == hd
    expected = torch.zeros(40, 40, dtype=h.dtype)
    for i in range(40):
        for j in range(40):
            if src[i] >= 0 and src[j] >= 0:
                expected[i, j] = h[src[i], src[j]]
    assert torch.equal(out[o_name], expected)
