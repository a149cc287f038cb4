"""NcclCommunicator against MpiCommunicator on GPUs, and inside a CUDA graph.

Run one rank per GPU:
    mpirun -n 2 python -m pytest --with-mpi tests/gpu/test_nccl.py
Skipped without CUDA or without CuPy's NCCL. Assertions come after the
collectives, so a failing rank never leaves the others waiting.
"""

from __future__ import annotations

import pytest
import torch

from tpquant.collectives import (
    MpiCommunicator,
    NcclCommunicator,
    SingleProcessCommunicator,
    gather_columns,
    make_communicator,
)
from tpquant.parallel.mapping import Mapping

pytestmark = [pytest.mark.mpi, pytest.mark.gpu]

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
nccl = pytest.importorskip("cupy.cuda.nccl", reason="needs CuPy (cupy-cuda12x/13x)")
if not getattr(nccl, "available", False):
    pytest.skip("CuPy was built without NCCL", allow_module_level=True)


def rank_data(seed: int, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s input on the CPU: normal floats, or integers in [-1000, 1000)."""
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.fixture(scope="module")
def mpi() -> MpiCommunicator:
    from mpi4py import MPI

    return MpiCommunicator(MPI.COMM_WORLD)


@pytest.fixture(scope="module")
def device(mpi: MpiCommunicator) -> torch.device:
    mapping = Mapping.from_env()
    # Decided together, so that no rank skips while the others wait in NCCL.
    short = torch.tensor([int(mapping.local_rank >= torch.cuda.device_count())])
    if mpi.all_reduce(short, op="max").item():
        pytest.skip("more ranks on a node than GPUs")
    dev = mapping.device()
    torch.cuda.set_device(dev)
    return dev


@pytest.fixture(scope="module")
def comm(mpi: MpiCommunicator, device: torch.device) -> NcclCommunicator:
    return NcclCommunicator(mpi.mpi_comm, device)


def sum_bound(inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NCCL rounds each partial sum to `dtype`: at most world_size * eps * sum|x|."""
    return inputs.shape[0] * torch.finfo(dtype).eps * inputs.abs().sum(0)


@pytest.mark.parametrize("op", ["sum", "max"])
@pytest.mark.parametrize("shape", [(1,), (4099,), (3, 1000)])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32]
)
def test_all_reduce_matches_mpi(mpi, comm, device, dtype, shape, op) -> None:
    seed = 1 + 10 * len(shape) + shape[-1] % 7
    x = rank_data(seed, comm.rank, shape, dtype)
    want = mpi.all_reduce(x.clone(), op)
    y = x.to(device)
    out = comm.all_reduce(y, op)
    got = y.cpu()  # after the NCCL op on the same stream
    inputs = torch.stack([rank_data(seed, r, shape, dtype).double() for r in range(comm.world_size)])
    assert out is y
    if op == "max" or not dtype.is_floating_point:
        assert torch.equal(got, want)  # max and integer sums are exact
    elif dtype in (torch.float32, torch.float64) and comm.world_size <= 2:
        assert torch.equal(got, want)  # a + b is the same sum in any order
    else:
        err = (got.double() - inputs.sum(0)).abs()
        assert (err <= sum_bound(inputs, dtype)).all(), err.max().item()


def test_all_reduce_non_contiguous(mpi, comm, device) -> None:
    base = rank_data(5, comm.rank, (8, 12), torch.int32).float()  # integer-valued: exact sums
    want = base.clone()
    mpi.all_reduce(want[:, ::3])
    y = base.to(device)
    comm.all_reduce(y[:, ::3])
    assert torch.equal(y.cpu(), want)


@pytest.mark.parametrize("shape", [(1,), (5, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_all_gather_matches_mpi(mpi, comm, device, dtype, shape) -> None:
    x = rank_data(7, comm.rank, shape, dtype)
    want = mpi.all_gather(x)
    got = comm.all_gather(x.to(device)).cpu()
    assert got.shape == (comm.world_size, *shape)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_broadcast_matches_mpi(mpi, comm, device, dtype) -> None:
    for root in range(comm.world_size):
        x = rank_data(9 + root, comm.rank, (3, 257), dtype)
        want = mpi.broadcast(x.clone(), root)
        y = x.to(device)
        comm.broadcast(y, root)
        assert torch.equal(y.cpu(), want)


def test_gather_columns_matches_mpi(mpi, comm, device) -> None:
    x = rank_data(13, comm.rank, (4, 6, 16), torch.bfloat16)
    want = gather_columns(x, mpi)
    assert torch.equal(gather_columns(x.to(device), comm).cpu(), want)


def test_broadcast_object_over_nccl_communicator(comm) -> None:
    root = comm.world_size - 1
    obj = {"rank": comm.rank, "tokens": list(range(comm.rank, 40))}
    assert comm.broadcast_object(obj, root) == {"rank": root, "tokens": list(range(root, 40))}


def test_wrong_device_refused(comm) -> None:
    if comm.world_size == 1:
        pytest.skip("world size 1 returns before looking at the tensor")
    with pytest.raises(ValueError, match="cuda"):
        comm.all_reduce(torch.ones(4))  # CPU tensor: refused before any NCCL call


def test_all_reduce_replayed_in_cuda_graph(comm, device) -> None:
    """Capture copy + all_reduce once, replay 100 times on changing inputs.

    Integer-valued float32 keeps every sum exact, so each replay must give
    exactly sum_r x_r + i * sum_r (r + 1).
    """
    n, rank = comm.world_size, comm.rank
    shape = (3, 4097)
    x0 = rank_data(17, rank, shape, torch.int32).float().to(device)
    inp = x0.clone()
    out = torch.empty_like(x0)
    total = sum(rank_data(17, r, shape, torch.int32).double() for r in range(n))

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up: NCCL connects on first use
        for _ in range(3):
            out.copy_(inp)
            comm.all_reduce(out)
    torch.cuda.current_stream(device).wait_stream(side)
    warm = out.cpu()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(inp)
        comm.all_reduce(out)

    wrong = []
    for i in range(100):
        torch.add(x0, float(i * (rank + 1)), out=inp)
        out.fill_(float("nan"))
        graph.replay()
        if not torch.equal(out.cpu().double(), total + i * n * (n + 1) / 2):
            wrong.append(i)
    assert torch.equal(warm.double(), total)
    assert wrong == [], f"replays with wrong sums: {wrong[:10]}"


def test_make_communicator_picks_nccl(mpi, device) -> None:
    made = make_communicator(Mapping.from_env(), device)
    expected = NcclCommunicator if mpi.world_size > 1 else SingleProcessCommunicator
    assert isinstance(made, expected)
    x = rank_data(19, mpi.rank, (33,), torch.int64)
    got = made.all_reduce(x.to(device)).cpu()
    assert torch.equal(got, mpi.all_reduce(x.clone()))
