"""Sharding rules (DESIGN s6): cut for every rank, put back together, compare exactly.

The expected pieces are computed in the test by plain indexing (rows r*n:(r+1)*n of each
part), not by the functions under test; matmul checks use float64 with tolerance 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpquant.collectives import SingleProcessCommunicator
from tpquant.layers.column import ColumnLinear
from tpquant.layers.row import RowLinear
from tpquant.parallel.mapping import Mapping
from tpquant.parallel.shard import (
    check_divisible,
    gather_shards,
    pad_to_multiple,
    shard_tensor,
    shard_tensors,
    split,
    split_dim,
    split_fused,
    unshard_tensors,
    vocab_shard,
)
from tpquant.quantization.schemes import Passthrough, Scheme, WeightOnly
from tpquant.quantization.schemes.base import TensorSpec

TPS = (1, 2, 3, 4)
OUT, IN, G = 36, 96, 8  # divisible by every tp in TPS, also in/2 and in/g


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layout_tensors(gen: torch.Generator) -> tuple[dict, dict]:
    """One tensor of every kind the schemes store, with its spec."""
    t = {
        "weight": torch.randn(OUT, IN, generator=gen),
        "qweight": torch.randint(0, 256, (OUT, IN // 2), generator=gen, dtype=torch.uint8),
        "scale": torch.rand(OUT, generator=gen) + 0.1,
        "group_scale": torch.rand(IN // G, OUT, generator=gen) + 0.1,
        "zero": torch.rand(IN // G, OUT, generator=gen) * 15,
        "pre_quant_scale": torch.rand(IN, generator=gen) + 0.5,
        "act_scale": torch.rand((), generator=gen) + 0.1,
        "bias": torch.randn(OUT, generator=gen),
    }
    s = {
        "weight": TensorSpec(out_dim=0, in_dim=1),
        "qweight": TensorSpec(out_dim=0, in_dim=1, in_per_index=2),
        "scale": TensorSpec(out_dim=0),
        "group_scale": TensorSpec(out_dim=1, in_dim=0, in_per_index=G),
        "zero": TensorSpec(out_dim=1, in_dim=0, in_per_index=G),
        "pre_quant_scale": TensorSpec(in_dim=0),
        "act_scale": TensorSpec(),
        "bias": TensorSpec(out_dim=0),
    }
    return t, s


def _expected_piece(t: torch.Tensor, dim: int | None, rank: int, tp: int) -> torch.Tensor:
    if dim is None:
        return t
    n = t.shape[dim] // tp
    idx = torch.arange(rank * n, (rank + 1) * n)
    return t.index_select(dim, idx)


# ---------------------------------------------------------------- (a) every spec, both styles


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("style", ["column", "row"])
def test_every_spec_shards_and_gathers_back(tp: int, style: str) -> None:
    tensors, specs = _layout_tensors(_gen(tp))
    shards = [shard_tensors(tensors, specs, style, r, tp) for r in range(tp)]
    for name, t in tensors.items():
        dim = specs[name].out_dim if style == "column" else specs[name].in_dim
        for r in range(tp):
            piece = shards[r][name]
            assert torch.equal(piece, _expected_piece(t, dim, r, tp)), (name, r)
            if dim is None:
                assert piece is t  # replicated: the same object, no copy
            elif tp > 1:
                assert piece.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    full = unshard_tensors(shards, specs, style)
    assert full.keys() == tensors.keys()
    for name, t in tensors.items():
        assert full[name].dtype == t.dtype and torch.equal(full[name], t), name


def test_expected_sharding_table() -> None:
    """DESIGN s6's table, row by row, at tp 2."""
    tensors, specs = _layout_tensors(_gen(1))
    col = shard_tensors(tensors, specs, "column", 1, 2)
    row = shard_tensors(tensors, specs, "row", 1, 2)
    shapes = {k: (tuple(col[k].shape), tuple(row[k].shape)) for k in tensors}
    assert shapes == {
        "weight": ((OUT // 2, IN), (OUT, IN // 2)),
        "qweight": ((OUT // 2, IN // 2), (OUT, IN // 4)),
        "scale": ((OUT // 2,), (OUT,)),
        "group_scale": ((IN // G, OUT // 2), (IN // G // 2, OUT)),
        "zero": ((IN // G, OUT // 2), (IN // G // 2, OUT)),
        "pre_quant_scale": ((IN,), (IN // 2,)),
        "act_scale": ((), ()),
        "bias": ((OUT // 2,), (OUT,)),
    }


def test_gather_rejects_differing_replicas() -> None:
    a = torch.randn(OUT, generator=_gen(2))
    b = a.clone()
    b[3] += 1e-6
    with pytest.raises(ValueError, match="rank 1"):
        gather_shards([a, b], TensorSpec(out_dim=0), "row", name="bias")
    assert gather_shards([a, a.clone()], TensorSpec(out_dim=0), "row") is a


# ---------------------------------------------------------------- (b) fused q/k/v and gate/up


FUSED = {
    "qkv": (48, 24, 24),  # e.g. 4 q heads, 2 kv heads of head_dim 12
    "gate_up": (36, 36),
}


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("fused", sorted(FUSED))
def test_fused_split_per_part(tp: int, fused: str) -> None:
    parts = FUSED[fused]
    gen = _gen(10 + tp)
    out = sum(parts)
    tensors = {
        "weight": torch.randn(out, IN, generator=gen),
        "qweight": torch.randint(0, 256, (out, IN // 2), generator=gen, dtype=torch.uint8),
        "scale": torch.rand(out, generator=gen),
        "group_scale": torch.rand(IN // G, out, generator=gen),
        "pre_quant_scale": torch.rand(IN, generator=gen),
        "act_scale": torch.rand((), generator=gen),
        "bias": torch.randn(out, generator=gen),
    }
    _, all_specs = _layout_tensors(gen)
    specs = {k: all_specs[k] for k in tensors}
    shards = [shard_tensors(tensors, specs, "column", r, tp, part_sizes=parts) for r in range(tp)]
    for name, t in tensors.items():
        dim = specs[name].out_dim
        for r in range(tp):
            if dim is None:
                assert shards[r][name] is t
                continue
            # independent: slice each part on its own, then concatenate
            offsets = [sum(parts[:i]) for i in range(len(parts))]
            expected = torch.cat(
                [
                    t.index_select(dim, torch.arange(o + r * (p // tp), o + (r + 1) * (p // tp)))
                    for o, p in zip(offsets, parts)
                ],
                dim=dim,
            )
            assert torch.equal(shards[r][name], expected), (name, r)
    full = unshard_tensors(shards, specs, "column", part_sizes=parts)
    for name, t in tensors.items():
        assert torch.equal(full[name], t), name


@settings(max_examples=60, deadline=None)
@given(
    tp=st.integers(1, 6),
    units=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    cols=st.integers(1, 5),
    dim=st.integers(0, 1),
    seed=st.integers(0, 2**16),
)
def test_split_fused_round_trip_property(tp, units, cols, dim, seed) -> None:
    parts = [u * tp for u in units]
    t = torch.randn(sum(parts), cols, generator=_gen(seed))
    if dim == 1:
        t = t.t()
    pieces = [split_fused(t, dim, parts, r, tp) for r in range(tp)]
    spec = TensorSpec(out_dim=dim)
    assert torch.equal(gather_shards(pieces, spec, "column", part_sizes=parts), t)


# ---------------------------------------------------------------- (c) the block-matrix math


@pytest.mark.parametrize("tp", TPS)
def test_column_and_row_matmul(tp: int) -> None:
    gen = _gen(20 + tp)
    w = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    b = torch.randn(OUT, generator=gen, dtype=torch.float64)
    x = torch.randn(5, IN, generator=gen, dtype=torch.float64)
    ref = x @ w.t() + b
    wspec, bspec = TensorSpec(out_dim=0, in_dim=1), TensorSpec(out_dim=0)

    # column: Y = X [A_1 ... A_p] + [b_1 ... b_p], outputs concatenated
    y_col = torch.cat(
        [
            x @ shard_tensor(w, wspec, "column", r, tp).t()
            + shard_tensor(b, bspec, "column", r, tp)
            for r in range(tp)
        ],
        dim=-1,
    )
    # row: Y = sum_r X_r A_r + b, the input split like the weight's columns, bias added once
    x_spec = TensorSpec(in_dim=1)
    y_row = sum(
        shard_tensor(x, x_spec, "row", r, tp) @ shard_tensor(w, wspec, "row", r, tp).t()
        for r in range(tp)
    ) + shard_tensor(b, bspec, "row", 0, tp)
    torch.testing.assert_close(y_col, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(y_row, ref, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- (d) errors and vocab padding


def _divisors(n: int) -> str:
    """Divisors of n up to 64, the largest TP size the messages list."""
    return ", ".join(str(d) for d in range(1, min(n, 64) + 1) if n % d == 0)


def test_split_not_divisible_names_sizes() -> None:
    t = torch.randn(10, 3, generator=_gen(30))
    with pytest.raises(ValueError) as e:
        split(t, 0, 0, 4)
    msg = str(e.value)
    assert "10" in msg and "tp=4" in msg and f"TP sizes that work: {_divisors(10)}" in msg
    with pytest.raises(ValueError, match="weight") as e:
        shard_tensor(t, TensorSpec(out_dim=0, in_dim=1), "column", 0, 4, name="weight")
    assert _divisors(10) in str(e.value)


def test_check_divisible() -> None:
    assert check_divisible("intermediate_size", 1536, 4) == 384
    with pytest.raises(ValueError) as e:
        check_divisible("intermediate_size", 1542, 4)
    msg = str(e.value)
    assert "intermediate_size = 1542" in msg and "tp=4" in msg
    assert msg.endswith(f"TP sizes that work: {_divisors(1542)}")  # 1542 = 2 * 3 * 257


@pytest.mark.parametrize("kind", ["group_scale", "qweight"])
def test_group_size_must_divide_rank_in_features(kind: str) -> None:
    gen = _gen(31)
    if kind == "group_scale":
        g, in_features, tp = 128, 384, 2  # 192 features per rank: not a multiple of 128
        t = torch.rand(in_features // g, OUT, generator=gen)
        spec = TensorSpec(out_dim=1, in_dim=0, in_per_index=g)
    else:
        g, in_features, tp = 2, 6, 4  # packed int4: 1.5 features per rank
        t = torch.randint(0, 256, (OUT, in_features // g), generator=gen, dtype=torch.uint8)
        spec = TensorSpec(out_dim=0, in_dim=1, in_per_index=g)
    with pytest.raises(ValueError) as e:
        shard_tensor(t, spec, "row", 0, tp, name=kind)
    msg = str(e.value)
    assert kind in msg and f"in_features={in_features}" in msg and f"tp={tp}" in msg
    assert f"factor {g}" in msg
    assert f"TP sizes that work: {_divisors(in_features // g)}" in msg
    # column style never cuts the input features, so the same tensor shards fine
    assert shard_tensor(t, spec, "column", 0, 3 if kind == "group_scale" else 4).numel() > 0


def test_part_sizes_errors() -> None:
    t = torch.randn(20, 4, generator=_gen(32))
    spec = TensorSpec(out_dim=0, in_dim=1)
    with pytest.raises(ValueError, match="column"):
        shard_tensor(t, spec, "row", 0, 2, part_sizes=(10, 10))
    with pytest.raises(ValueError, match="column"):
        gather_shards([t, t], spec, "row", part_sizes=(10, 10))
    with pytest.raises(ValueError, match="do not add up"):
        shard_tensor(t, spec, "column", 0, 2, part_sizes=(10, 8))
    with pytest.raises(ValueError) as e:
        shard_tensor(t, spec, "column", 0, 4, part_sizes=(8, 6, 6), name="qkv")
    msg = str(e.value)
    assert "qkv" in msg and "part 1" in msg and "size 6" in msg and _divisors(6) in msg


def test_bad_rank_tp_style() -> None:
    t = torch.randn(4, generator=_gen(33))
    with pytest.raises(ValueError, match="rank"):
        split(t, 0, 2, 2)
    with pytest.raises(ValueError, match="tp"):
        split(t, 0, 0, 0)
    with pytest.raises(ValueError, match="style"):
        shard_tensor(t, TensorSpec(out_dim=0), "diagonal", 0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no TensorSpec"):
        shard_tensors({"w": t}, {}, "column", 0, 2)


def test_pad_to_multiple() -> None:
    t = torch.randn(3, 10, generator=_gen(34))
    p = pad_to_multiple(t, 1, 4)
    assert p.shape == (3, 12) and torch.equal(p[:, :10], t) and not p[:, 10:].any()
    assert pad_to_multiple(t, 1, 5) is t


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("vocab", [49152, 50, 49])
def test_vocab_padding_round_trip(tp: int, vocab: int) -> None:
    gen = _gen(40 + tp)
    hidden = 8
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    x = torch.randn(3, hidden, generator=gen, dtype=torch.float64)
    results = [vocab_shard(w, r, tp) for r in range(tp)]
    padded = results[0][1]
    assert all(p == padded for _, p in results)
    assert padded % tp == 0 and vocab <= padded < vocab + tp
    full = gather_shards([s for s, _ in results], TensorSpec(out_dim=0), "column")
    assert full.shape == (padded, hidden)
    assert torch.equal(full[:vocab], w) and not full[vocab:].any()
    # logits gathered from the shards, padding dropped, equal the unsharded logits
    logits = torch.cat([x @ s.t() for s, _ in results], dim=-1)[:, :vocab]
    torch.testing.assert_close(logits, x @ w.t(), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- (h) quantizing one slice

SLICE_SCHEMES = {
    "fp32": Passthrough(torch.float32),
    "fp16": Passthrough(torch.float16),
    "int8_wo": WeightOnly(8, torch.float32),
    "int4_wo": WeightOnly(4, torch.float32),
}
_W = TensorSpec(out_dim=0, in_dim=1)


def _sliced_weights(style: str, tp: int, parts) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """W with row scales over 6 orders of magnitude and a zero row, and every rank's slice."""
    w = torch.randn(OUT, IN, generator=_gen(11)) * torch.logspace(-3, 3, OUT)[:, None]
    w[5] = 0
    return w, [shard_tensor(w, _W, style, r, tp, parts) for r in range(tp)]


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("style", ["column", "row"])
@pytest.mark.parametrize("name", sorted(SLICE_SCHEMES))
def test_quantizing_a_slice_equals_slicing_the_quantized(name: str, style: str, tp: int) -> None:
    """shard(quantize(W)) == quantize(W's slice, statistics of W), exactly, where the
    statistics the slice cuts come from the slice and every other one is the elementwise max
    of all ranks' statistics of their slices (what an all_reduce(max) gives)."""
    scheme = SLICE_SCHEMES[name]
    parts = (12, 12, 12) if style == "column" else None  # a fused q/k/v-like column layer
    w, slices = _sliced_weights(style, tp, parts)
    full = scheme.quantize(w)
    specs = scheme.statistic_specs()
    local = [scheme.statistics(s) for s in slices]
    for r in range(tp):
        stats = {
            k: local[r][k] if split_dim(spec, style) is not None
            else torch.stack([s[k] for s in local]).amax(dim=0)
            for k, spec in specs.items()
        }
        got = scheme.quantize(slices[r], statistics=stats)
        want = shard_tensors(full, scheme.specs(full), style, r, tp, parts)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (r, k)
    if style == "row" and tp > 1 and specs:  # the combining is needed: a slice alone is wrong
        alone = scheme.quantize(slices[0])
        want = shard_tensors(full, scheme.specs(full), style, 0, tp)
        assert not all(torch.equal(alone[k], want[k]) for k in want)


def test_split_dim_is_the_sharding_rule() -> None:
    t, specs = _layout_tensors(_gen(12))
    for style in ("column", "row"):
        for name, spec in specs.items():
            dim = split_dim(spec, style)
            replicated = shard_tensor(t[name], spec, style, 1, 2) is t[name]
            assert (dim is None) == replicated, (style, name)
    with pytest.raises(ValueError, match="style"):
        split_dim(_W, "diagonal")


def test_load_shard_checks_its_input() -> None:
    comm, w = SingleProcessCommunicator(), torch.randn(OUT, IN, generator=_gen(13))

    class FullOnly(Passthrough):  # the Scheme default: quantize needs the full weight
        statistic_specs = Scheme.statistic_specs
        statistics = Scheme.statistics

    layer = ColumnLinear(IN, OUT, FullOnly(torch.float32), Mapping(2, 0), comm)
    assert FullOnly(torch.float32).statistic_specs() is None
    with pytest.raises(NotImplementedError, match="full weights only"):
        FullOnly(torch.float32).statistics(w)
    with pytest.raises(ValueError, match="full weights only: use load_full"):
        layer.load_shard(w[: OUT // 2])
    row = RowLinear(IN, OUT, WeightOnly(8, torch.float32), Mapping(3, 1), comm)
    with pytest.raises(ValueError, match=r"weight slice shape \(36, 96\) != \(36, 32\)"):
        row.load_shard(w)
    with pytest.raises(ValueError, match="amax must be"):
        row.load_shard(w[:, 32:64], statistics={"amax": torch.ones(OUT - 1)})

