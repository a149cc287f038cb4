"""Column and row layers under real MPI ranks equal the single-process layer, for every scheme.

Every rank draws the same full weight and input from one seed, builds its sharded layer and
an unsharded one (tp 1) of the same scheme, and compares. Expected values depend only on
rank and world size, so the file passes under `mpirun -n 1/2/3/4`.

Each test runs on two backends: CPU tensors over MPI, and CUDA tensors over NCCL (skipped
without CUDA). On GPUs: `mpirun -n 2 python -m pytest --with-mpi tests/mpi/test_layers.py`.
"""

from __future__ import annotations

import pytest
import torch

from tpquant.collectives import MpiCommunicator, NcclCommunicator, SingleProcessCommunicator
from tpquant.kernels.tiles import can_tile
from tpquant.layers import ColumnLinear, RowLinear
from tpquant.layers.norm import RmsNorm
from tpquant.parallel.mapping import Mapping
from tpquant.quantization.schemes import Groupwise, Passthrough, SmoothQuant, WeightOnly

MPI = pytest.importorskip("mpi4py.MPI")

IN, OUT, TOKENS = 384, 192, 7  # IN / tp stays a multiple of the group size 32 for tp 1..4
F32 = torch.float32
SCHEMES = {
    "fp32": Passthrough(F32),
    "int8_wo": WeightOnly(8, F32),
    "int4_wo": WeightOnly(4, F32),
    "int4_gw_zeros": Groupwise(32, True, False, F32),
    "int4_gw_sym_pqs": Groupwise(32, False, True, F32),
    "int4_gw_zeros_pqs": Groupwise(16, True, True, F32),
    "w8a8_tensor": SmoothQuant(False, False, F32),
    "w8a8_channel": SmoothQuant(False, True, F32),
    "w8a8_token": SmoothQuant(True, False, F32),
    "w8a8_token_channel": SmoothQuant(True, True, F32),
}
REL = 1e-5  # float32 inputs; only the summation order differs from tp 1


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def world(request):
    """(mapping, communicator, device) of the ranks running this test."""
    comm = MPI.COMM_WORLD
    mapping = Mapping(comm.Get_size(), comm.Get_rank())
    if request.param == "cpu":
        return mapping, MpiCommunicator(comm), torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = mapping.device()
    return mapping, NcclCommunicator(comm, device), device


def _single():
    return Mapping(1, 0), SingleProcessCommunicator()


def _run(layer, x, device):
    """Forward on `device` (the layer was built on the CPU, as an engine build does)."""
    return layer.to(device)(x.to(device)).cpu()


def _data(in_features: int, out_features: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    b = torch.randn(out_features, generator=g)
    x = torch.randn(TOKENS, in_features, generator=g)
    x[:, 3] *= 20  # an outlier channel, as real activations have
    calib = torch.randn(64, in_features, generator=g)
    calib[:, 3] *= 20
    return w, b, x, calib


def _quant_options(scheme, in_features: int, calib: torch.Tensor, smoother: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    if isinstance(scheme, SmoothQuant):
        opts = {"act_amax": calib.abs().amax(0)}
        if smoother:  # a layer with no preceding norm: x / s at run time
            opts["smoother"] = torch.rand(in_features, generator=g) + 0.5
            opts["act_amax"] = (calib / opts["smoother"]).abs().amax(0)
        return opts
    if isinstance(scheme, Groupwise) and scheme.pre_quant_scale:
        return {"pre_quant_scale": torch.rand(in_features, generator=g) + 0.5}
    return {}


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> None:
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"max abs error {err:.3g} vs scale {want.abs().max():.3g}"


def _slice(n: int, rank: int, tp: int) -> slice:
    return slice(rank * n // tp, (rank + 1) * n // tp)


@pytest.mark.mpi
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "nogather"])
@pytest.mark.parametrize("name", SCHEMES)
def test_column_equals_single_process(world, name, gather, bias):
    scheme = SCHEMES[name]
    mapping, comm, device = world
    w, b, x, calib = _data(IN, OUT)
    opts = _quant_options(scheme, IN, calib, smoother=False)
    b = b if bias else None

    layer = ColumnLinear(IN, OUT, scheme, mapping, comm, bias=bias, gather_output=gather)
    ref = _run(ColumnLinear(IN, OUT, scheme, *_single(), bias=bias).load_full(w, b, **opts), x, device)
    got = _run(layer.load_full(w, b, **opts), x, device)
    want = ref if gather else ref[:, _slice(OUT, mapping.rank, mapping.tp_size)]
    assert got.shape == want.shape
    _close(got, want)


@pytest.mark.mpi
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name", SCHEMES)
def test_row_equals_single_process(world, name, bias):
    scheme = SCHEMES[name]
    mapping, comm, device = world
    w, b, x, calib = _data(IN, OUT, seed=2)
    opts = _quant_options(scheme, IN, calib, smoother=True)
    b = b if bias else None
    x_local = x[:, _slice(IN, mapping.rank, mapping.tp_size)]

    got = _run(RowLinear(IN, OUT, scheme, mapping, comm, bias=bias).load_full(w, b, **opts), x_local, device)
    if isinstance(scheme, SmoothQuant) and scheme.per_token:
        # Each rank quantizes its own slice per token (DESIGN s6): the oracle is the float64
        # fake-quant sum over slices. Per-slice scales are at least as tight as tp 1's global
        # ones, so the error against the unquantized-activation product is no larger.
        want = _row_per_token_reference(scheme, w, b, x, opts, mapping.tp_size)
        _close(got, want)
        ref = _run(RowLinear(IN, OUT, scheme, *_single(), bias=bias).load_full(w, b, **opts), x, device)
        exact = x.double() @ scheme.dequantize(scheme.quantize(w, **opts)).double().T
        exact = exact if b is None else exact + b.double()
        err_tp, err_1 = (got.double() - exact).norm(), (ref.double() - exact).norm()
        assert err_tp <= 1.25 * err_1, (err_tp.item(), err_1.item())
    else:
        ref = _run(RowLinear(IN, OUT, scheme, *_single(), bias=bias).load_full(w, b, **opts), x, device)
        _close(got, ref)


@pytest.mark.mpi
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name", ["fp32", "int4_wo", "w8a8_channel"])
def test_row_into_the_next_norm_equals_single_process(world, name, bias):
    """A row layer's PartialSum into the next RMSNorm's residual add: its all-reduce, the add
    and the norm (one custom kernel on GPUs without a bias) equal the single-process layer
    followed by add and norm, and s equals the float64 sum."""
    scheme = SCHEMES[name]
    mapping, comm, device = world
    w, b, x, calib = _data(IN, OUT, seed=5)
    opts = _quant_options(scheme, IN, calib, smoother=True)
    b = b if bias else None
    g = torch.Generator().manual_seed(6)
    residual = torch.randn(TOKENS, OUT, generator=g)
    norm = RmsNorm(OUT, 1e-5, F32)
    norm.weight.copy_(1 + 0.3 * torch.randn(OUT, generator=g))
    norm = norm.to(device)
    x_local = x[:, _slice(IN, mapping.rank, mapping.tp_size)]

    def run(layer, inputs, c):
        partial = layer.load_full(w, b, **opts).to(device)(inputs.to(device), reduce=False)
        fused = (isinstance(c, NcclCommunicator) and partial.bias is None  # else resolved
                 and c.fuses_norm(partial.partial, residual.to(device), norm.weight))
        s, normed = norm.add_forward(residual.to(device), partial)
        return s.cpu(), normed.cpu(), fused

    s, normed, fused = run(RowLinear(IN, OUT, scheme, mapping, comm, bias=bias), x_local, comm)
    s1, normed1, _ = run(RowLinear(IN, OUT, scheme, *_single(), bias=bias), x, _single()[1])
    exact = x.double() @ scheme.dequantize(scheme.quantize(w, **opts)).double().T
    exact = residual.double() + (exact if b is None else exact + b.double())
    assert fused == (device.type == "cuda" and mapping.tp_size > 1 and not bias)
    _close(s, s1)
    _close(normed, normed1)
    if not isinstance(scheme, SmoothQuant):  # W8A8 quantizes x too: s1 is its reference
        _close(s, exact)


def _row_per_token_reference(scheme, w, b, x, opts, tp):
    t = scheme.quantize(w, **opts)
    xs = x.double() / opts["smoother"].double()
    qw, sw = t["qweight"].double(), t["weight_scale"].double()
    y = torch.zeros(x.shape[0], OUT, dtype=torch.float64)
    for r in range(tp):
        sl = _slice(IN, r, tp)
        xr = xs[:, sl]
        sx = xr.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
        qx = torch.round(xr / sx).clamp(-128, 127)
        y += (qx @ qw[:, sl].T) * sx * sw
    return y if b is None else y + b.double()


@pytest.mark.mpi
@pytest.mark.parametrize("name", [n for n in SCHEMES if not n.startswith("w8a8_token")])
def test_mlp_pair_equals_unsharded_pair(world, name):
    """column (no gather) -> silu -> row: the MLP pattern, one all-reduce in all."""
    scheme = SCHEMES[name]
    mapping, comm, device = world
    hidden, inter = OUT, IN
    w1, b1, x, calib1 = _data(hidden, inter, seed=3)
    w2, b2, _, _ = _data(inter, hidden, seed=4)
    opts1 = _quant_options(scheme, hidden, calib1, smoother=False)
    calib2 = torch.nn.functional.silu(calib1 @ w1.T + b1)
    opts2 = _quant_options(scheme, inter, calib2, smoother=False)

    def pair(m, c):
        up = ColumnLinear(hidden, inter, scheme, m, c, bias=True, gather_output=False).load_full(w1, b1, **opts1)
        down = RowLinear(inter, hidden, scheme, m, c, bias=True).load_full(w2, b2, **opts2)
        up, down = up.to(device), down.to(device)
        return down(torch.nn.functional.silu(up(x.to(device)))).cpu()

    _close(pair(mapping, comm), pair(*_single()), rel=1e-4 if name.startswith("w8a8") else REL)


# Which tensors DESIGN s6 replicates, by style; everything else is split 1/tp.
_REPLICATED = {
    "column": {"act_scale", "pre_quant_scale", "smoother"},
    "row": {"act_scale", "weight_scale", "scale"},
}


@pytest.mark.mpi
@pytest.mark.parametrize("style", ["column", "row"])
@pytest.mark.parametrize("name", SCHEMES)
def test_per_rank_bytes_are_full_over_tp(world, name, style):
    scheme = SCHEMES[name]
    mapping, comm, device = world
    w, _, _, calib = _data(IN, OUT)
    opts = _quant_options(scheme, IN, calib, smoother=style == "row")
    full = scheme.quantize(w, **opts)
    cls = ColumnLinear if style == "column" else RowLinear
    layer = cls(IN, OUT, scheme, mapping, comm).load_full(w, **opts).to(device)
    # by the stored tensors' names (a tiled tensor has the bytes of the "qweight" it tiles)
    kept = {{"qweight_tiles": "qweight"}.get(n, n): t for n, t in layer.tensors.items()}
    for tname, t in kept.items():
        replicated = tname in _REPLICATED[style] or full[tname].dim() == 0
        expected = full[tname].nbytes if replicated else full[tname].nbytes // mapping.tp_size
        assert t.nbytes == expected, (tname, t.shape, full[tname].shape)
        assert t.untyped_storage().nbytes() == t.nbytes, f"{tname} keeps more memory than its shard"
    # and the pieces of the split tensors add up to the whole across ranks
    local = sum(t.nbytes for n, t in kept.items() if n not in _REPLICATED[style] and full[n].dim())
    total = comm.all_reduce(torch.tensor([local], dtype=torch.int64, device=device)).item()
    assert total == sum(t.nbytes for n, t in full.items() if n not in _REPLICATED[style] and t.dim())


@pytest.mark.mpi
@pytest.mark.parametrize("tokens", [1, 5, 40, 100])
@pytest.mark.parametrize("style", ["column", "row"])
@pytest.mark.parametrize("kind", ["per_channel", "groupwise", "int8"])
def test_tiled_layers_in_bfloat16(world, kind, style, tokens):
    """int4 per channel, groupwise (zeros) and int8 in bfloat16: the layers keep tiled weights
    (`WeightOnly.pack`, `Groupwise.pack`), which on CUDA run the tiled GEMV (M <= 64) or
    dequantize from the tiles (above); the rank's output equals float64 math on the full
    weight's dequantized codes, and the single-process layer's, to bfloat16's bound (1e-2 of
    the largest output: outputs and, row-parallel, partial sums round to bfloat16). Groups of
    64 (whole k-tiles), or 32 where a row-parallel shard holds no whole groups of 64 (TP 4:
    then the rank keeps the stored layout)."""
    mapping, comm, device = world
    tp = mapping.tp_size
    bits = 8 if kind == "int8" else 4
    if kind != "groupwise":
        scheme, group = WeightOnly(bits, torch.bfloat16), 0
    else:
        group = 64 if style == "column" or (IN // tp) % 64 == 0 else 32
        scheme = Groupwise(group, True, False, torch.bfloat16)
    w, b, _, _ = _data(IN, OUT, seed=3)
    x = torch.randn(tokens, IN, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    exact = x.double() @ scheme.dequantize(scheme.quantize(w)).double().T + b.double()
    rank, tp = mapping.rank, mapping.tp_size
    if style == "column":
        layer = ColumnLinear(IN, OUT, scheme, mapping, comm, bias=True, gather_output=False)
        single = ColumnLinear(IN, OUT, scheme, *_single(), bias=True)
        x_rank, cols = x, _slice(OUT, rank, tp)
    else:
        layer = RowLinear(IN, OUT, scheme, mapping, comm, bias=True)
        single = RowLinear(IN, OUT, scheme, *_single(), bias=True)
        x_rank, cols = x[:, _slice(IN, rank, tp)], slice(None)
    layer.load_full(w, b)
    local = (OUT // tp, IN) if style == "column" else (OUT, IN // tp)
    # all but row TP 4's 96 features (int4 per channel: not a multiple of 64; groupwise: groups
    # of 32); int8 tiles every shard (96 = 3 x 32)
    assert ("qweight_tiles" in layer.tensors) == (can_tile(*local, bits) and group % 64 == 0)
    got = _run(layer, x_rank, device)
    _close(got, exact[:, cols], rel=1e-2)
    _close(got, _run(single.load_full(w, b), x, device)[:, cols], rel=1e-2)
