"""MpiCommunicator and gather_columns under real ranks (mpirun -n 1, 2, 3, 4).

Every rank makes its own data from (seed, rank) and can regenerate any other
rank's, so expected values come from the world size alone. Assertions come
after the collectives, so a failing rank never leaves the others waiting.
"""

from __future__ import annotations

import os

import pytest
import torch

from tpquant.collectives import (
    Communicator,
    MpiCommunicator,
    SingleProcessCommunicator,
    gather_columns,
    make_communicator,
)
from tpquant.parallel.mapping import Mapping, mapping_from_comm

pytestmark = pytest.mark.mpi

SHAPES = [(1,), (7,), (3, 5), (2, 3, 129)]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def rank_data(seed: int, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s input: normal floats, or integers in [-1000, 1000)."""
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=torch.int64).to(dtype)


def all_ranks(comm: Communicator, seed: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Every rank's input, [world, *shape], regenerated locally in float64 (exact)."""
    return torch.stack(
        [rank_data(seed, r, shape, dtype).double() for r in range(comm.world_size)]
    )


def assert_sum_close(got: torch.Tensor, inputs: torch.Tensor) -> None:
    """got vs the float64 sum: one rounding to got's dtype plus float32-accumulation error."""
    ref = inputs.sum(0)
    n = inputs.shape[0]
    eps = torch.finfo(got.dtype).eps
    accum_eps = torch.finfo(torch.float32 if eps > 1e-6 else got.dtype).eps
    bound = eps * ref.abs() + n * accum_eps * inputs.abs().sum(0)
    err = (got.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max().item()} over bound"


def assert_same_on_all_ranks(comm: Communicator, t: torch.Tensor) -> None:
    everyone = comm.all_gather(t)
    for r in range(comm.world_size):
        assert torch.equal(everyone[r], t), f"rank {r} differs from rank {comm.rank}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOATS + [torch.int32])
def test_all_reduce_sum(comm: Communicator, dtype: torch.dtype, shape: tuple) -> None:
    seed = 1 + SHAPES.index(shape)
    t = rank_data(seed, comm.rank, shape, dtype)
    out = comm.all_reduce(t, op="sum")
    assert out is t and t.dtype == dtype and t.shape == shape
    inputs = all_ranks(comm, seed, shape, dtype)
    if dtype.is_floating_point:
        assert_sum_close(t, inputs)
    else:
        assert torch.equal(t, inputs.sum(0).to(dtype))
    assert_same_on_all_ranks(comm, t)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOATS + [torch.int32, torch.int8])
def test_all_reduce_max(comm: Communicator, dtype: torch.dtype, shape: tuple) -> None:
    seed = 11 + SHAPES.index(shape)
    t = rank_data(seed, comm.rank, shape, dtype)
    comm.all_reduce(t, op="max")
    inputs = all_ranks(comm, seed, shape, dtype)
    assert torch.equal(t, inputs.amax(0).to(dtype))  # max is exact


def test_all_reduce_non_contiguous(comm: Communicator) -> None:
    """A strided view is reduced where it lies; the rest of its base is untouched."""
    base = rank_data(21, comm.rank, (6, 10), torch.float32)
    before = base.clone()
    view = base.t()[::2]  # [5, 6], non-contiguous
    assert not view.is_contiguous()
    comm.all_reduce(view)
    inputs = all_ranks(comm, 21, (6, 10), torch.float32)
    assert_sum_close(base.t()[::2], inputs.transpose(1, 2)[:, ::2])
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched.t()[::2] = False
    assert torch.equal(base[untouched], before[untouched])


def test_all_reduce_refuses_bad_op(comm: Communicator) -> None:
    with pytest.raises(ValueError, match="op"):
        comm.all_reduce(torch.ones(3), op="mean")


@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (2, 1, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_all_gather(comm: Communicator, dtype: torch.dtype, shape: tuple) -> None:
    def data(rank: int) -> torch.Tensor:
        if dtype == torch.bool:
            return rank_data(31, rank, shape, torch.float32) > 0
        return rank_data(31, rank, shape, dtype)

    got = comm.all_gather(data(comm.rank))
    assert got.shape == (comm.world_size, *shape) and got.dtype == dtype
    for r in range(comm.world_size):
        assert torch.equal(got[r], data(r))


def test_all_gather_non_contiguous(comm: Communicator) -> None:
    t = rank_data(41, comm.rank, (8, 6), torch.float16)
    got = comm.all_gather(t[:, 1::2])
    for r in range(comm.world_size):
        assert torch.equal(got[r], rank_data(41, r, (8, 6), torch.float16)[:, 1::2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_broadcast_from_every_root(comm: Communicator, dtype: torch.dtype) -> None:
    for root in range(comm.world_size):
        t = rank_data(51 + root, comm.rank, (4, 33), dtype)
        out = comm.broadcast(t, root=root)
        assert out is t
        assert torch.equal(t, rank_data(51 + root, root, (4, 33), dtype))


def test_broadcast_non_contiguous(comm: Communicator) -> None:
    root = comm.world_size - 1
    base = rank_data(61, comm.rank, (5, 8), torch.float32)
    before = base.clone()
    comm.broadcast(base[:, ::4], root=root)
    assert torch.equal(base[:, ::4], rank_data(61, root, (5, 8), torch.float32)[:, ::4])
    keep = [c for c in range(8) if c % 4]
    assert torch.equal(base[:, keep], before[:, keep])


def test_bad_root_refused(comm: Communicator) -> None:
    for root in (-1, comm.world_size):
        with pytest.raises(ValueError, match="root"):
            comm.broadcast(torch.zeros(2), root=root)
        with pytest.raises(ValueError, match="root"):
            comm.broadcast_object("x", root=root)


def small_object(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, 50000, (int(torch.randint(1, 40, (1,), generator=g)),),
                                generator=g).tolist(),
        "prompt": "naïve café ✓ " + str(seed),
        "temperature": float(torch.rand(1, generator=g)),
        "stop": None,
        "nested": {"ok": True, "sizes": [1, 2, 3]},
    }


def test_broadcast_object(comm: Communicator) -> None:
    for root in range(comm.world_size):
        mine = small_object(100 * root + comm.rank)
        got = comm.broadcast_object(mine if comm.rank == root else None, root=root)
        assert got == small_object(100 * root + root)


def test_broadcast_object_round_trips_as_json(comm: Communicator) -> None:
    """Tuples come back as lists and int keys as strings, on every world size."""
    got = comm.broadcast_object({1: (2, 3)} if comm.rank == 0 else None)
    assert got == {"1": [2, 3]}


def test_broadcast_object_unserializable_raises_everywhere(comm: Communicator) -> None:
    root = comm.world_size - 1
    expected = TypeError if comm.rank == root else RuntimeError
    with pytest.raises(expected):
        comm.broadcast_object({"t": torch.ones(1)}, root=root)
    comm.barrier()
    # The communicator still works afterwards.
    assert comm.broadcast_object([comm.rank], root=root) == [root]


@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
@pytest.mark.parametrize("cols", [1, 4])
def test_gather_columns(comm: Communicator, lead: tuple, cols: int) -> None:
    """Each rank's [..., cols] piece; the result is every piece side by side, rank order."""
    seed = 71 + cols
    x = rank_data(seed, comm.rank, (*lead, cols), torch.float32)
    got = gather_columns(x, comm)
    full = torch.cat(
        [rank_data(seed, r, (*lead, cols), torch.float32) for r in range(comm.world_size)], -1
    )
    assert got.shape == (*lead, comm.world_size * cols)
    assert torch.equal(got, full)


def test_gather_columns_of_a_sharded_matrix(comm: Communicator) -> None:
    """Column slices of one shared [tokens, out] matrix come back as that matrix."""
    n = comm.world_size
    full = rank_data(81, 0, (6, 5 * n), torch.bfloat16)  # same on every rank
    piece = full[:, comm.rank * 5 : (comm.rank + 1) * 5]  # non-contiguous slice
    assert torch.equal(gather_columns(piece, comm), full)


def test_world_size_one_is_a_no_op() -> None:
    single = SingleProcessCommunicator()
    t = rank_data(91, 0, (3, 4), torch.float32)
    assert single.all_reduce(t) is t
    assert single.broadcast(t) is t
    assert gather_columns(t, single) is t
    assert torch.equal(single.all_gather(t), t[None])
    assert single.broadcast_object({"a": (1,)}) == {"a": [1]}


def test_mapping_agrees_with_mpi(comm: Communicator) -> None:
    from mpi4py import MPI

    m = Mapping.from_env()
    assert (m.rank, m.world_size) == (comm.rank, comm.world_size)
    assert m.local_rank == int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", comm.rank))
    # Without launcher variables the local rank comes from the node's ranks:
    # on one node, a permutation of 0..N-1.
    local = mapping_from_comm(MPI.COMM_WORLD, {}).local_rank
    got = comm.all_gather(torch.tensor(local))
    assert sorted(got.tolist()) == list(range(comm.world_size))


def test_make_communicator_on_cpu(comm: Communicator) -> None:
    m = Mapping.from_env()
    made = make_communicator(m, torch.device("cpu"))
    assert (made.rank, made.world_size) == (comm.rank, comm.world_size)
    assert isinstance(made, MpiCommunicator if comm.world_size > 1 else SingleProcessCommunicator)
    t = rank_data(95, comm.rank, (9,), torch.float64)
    assert_sum_close(made.all_reduce(t), all_ranks(comm, 95, (9,), torch.float64))
    # tp_size 1: every rank is its own group.
    alone = make_communicator(Mapping(m.world_size, m.rank, 1, m.local_rank), "cpu")
    assert isinstance(alone, SingleProcessCommunicator)
