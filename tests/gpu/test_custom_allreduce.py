"""Custom IPC all-reduce on GPUs: against NCCL and a float64 reference, bitwise equal on all
ranks, 10,000 calls in a row (and 3,000 with push among them), 1,000 CUDA-graph replays,
negative zeros through push, and a rank that stops.

Run one rank per GPU, at any world size from 2 to 8 (skipped at 1):
    launch/mpirun.sh -n 2 python -m pytest --with-mpi tests/gpu/test_custom_allreduce.py
    launch/mpirun.sh -n 4 python -m pytest --with-mpi tests/gpu/test_custom_allreduce.py
Assertions come after the collectives, so a failing rank never leaves the others waiting.
The test of a rank that stops runs last, on a workspace of its own.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from tpquant.collectives import MpiCommunicator, NcclCommunicator
from tpquant.parallel.custom_allreduce import (
    ALGORITHMS,
    DTYPES,
    MODE_ENV,
    NORM_ENV,
    NORM_MAX_ROW_BYTES,
    PUSH_DTYPES,
    CustomAllReduce,
    CustomAllReduceError,
    thresholds_for,
)
from tpquant.parallel.mapping import Mapping

pytestmark = [pytest.mark.mpi, pytest.mark.gpu]

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
nccl = pytest.importorskip("cupy.cuda.nccl", reason="needs CuPy (cupy-cuda12x/13x)")
if not getattr(nccl, "available", False):
    pytest.skip("CuPy was built without NCCL", allow_module_level=True)

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def mpi() -> MpiCommunicator:
    from mpi4py import MPI

    return MpiCommunicator(MPI.COMM_WORLD)


@pytest.fixture(scope="module")
def device(mpi: MpiCommunicator) -> torch.device:
    if not 2 <= mpi.world_size <= 8:
        pytest.skip("the custom all-reduce runs on 2 to 8 ranks")
    mapping = Mapping.from_env()
    # Decided together, so that no rank skips while the others wait.
    short = torch.tensor([int(mapping.local_rank >= torch.cuda.device_count())])
    if mpi.all_reduce(short, op="max").item():
        pytest.skip("more ranks on a node than GPUs")
    dev = mapping.device()
    torch.cuda.set_device(dev)
    return dev


@pytest.fixture(scope="module")
def custom(mpi: MpiCommunicator, device: torch.device) -> CustomAllReduce:
    made = CustomAllReduce(mpi.mpi_comm, device)
    assert made.reachable, f"peers should reach each other here: {made.unreachable_reason}"
    return made


@pytest.fixture(scope="module")
def ref(mpi: MpiCommunicator, device: torch.device) -> NcclCommunicator:
    """Plain NCCL: the reference, and the carrier of the checks' all_gather."""
    return NcclCommunicator(mpi.mpi_comm, device, all_reduce="nccl")


def rank_input(n: int, dtype: torch.dtype, seed: int, rank: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed * 1009 + rank)
    return torch.randn(n, generator=g, device=device, dtype=torch.float32).to(dtype)


def same_on_all_ranks(ref: NcclCommunicator, t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: every rank's `t` is bitwise equal to this rank's."""
    everyone = ref.all_gather(t.view(torch.uint8) if t.dtype != torch.uint8 else t)
    return (everyone == everyone[ref.rank]).all()


def check_sum(ref: NcclCommunicator, x: torch.Tensor, got: torch.Tensor) -> dict[str, object]:
    """Reference numbers for `got` = custom sum of every rank's `x` (collective; no asserts).

    exact: the float64 sum (NCCL in float64). scale: sum over ranks of |x|. Bounds:
    - against exact: fp32 accumulation in rank order (N - 1 roundings of at most
      eps32/2 * scale each) and one rounding to the dtype: eps * |exact| + N * eps32 * scale;
    - against NCCL in the same dtype (which rounds each partial sum in the dtype), the stated
      tolerance: N * eps(dtype) * scale (fp32: <= 1e-6 of scale at N <= 8; bf16 ~1.6e-2 at 2).
    """
    n_ranks = ref.world_size
    eps = torch.finfo(x.dtype).eps
    nccl_sum = ref.all_reduce(x.clone())
    exact = ref.all_reduce(x.double())
    scale = ref.all_reduce(x.double().abs())
    same = same_on_all_ranks(ref, got)
    err = (got.double() - exact).abs()
    err_nccl = (got.double() - nccl_sum.double()).abs()
    return {
        "same_on_all_ranks": bool(same.item()),
        "within_exact": bool((err <= eps * exact.abs() + n_ranks * EPS32 * scale).all().item()),
        "within_nccl": bool((err_nccl <= n_ranks * eps * scale).all().item()),
        "max_err": err.max().item() if err.numel() else 0.0,
    }


def sizes_for(dtype: torch.dtype, capacity: int) -> list[int]:
    """Element counts: 1, odd and small counts, 4 KB, odd counts past it, up to capacity."""
    item = torch.tensor([], dtype=dtype).element_size()
    kb = 1024 // item
    sizes = [1, 2, 3, 7, 9, 31, 257, 1023, 4 * kb, 4 * kb + 3, 64 * kb + 5, 1024 * kb - 1]
    return [n for n in sizes if n * item < capacity] + [capacity // item]


# every (algorithm, dtype) the kernels take: push moves 16-bit types only
RUNS = [(a, d) for a in ALGORITHMS for d in DTYPES if a != "push" or d in PUSH_DTYPES]


def test_peers_reach_each_other(custom) -> None:
    assert custom.reachable and custom.unreachable_reason is None


@pytest.mark.parametrize("algorithm,dtype", RUNS, ids=str)
def test_matches_nccl_and_float64_at_every_size(custom, ref, device, dtype, algorithm) -> None:
    results = {}
    cap = custom.push_bytes if algorithm == "push" else custom.capacity_bytes
    for i, n in enumerate(sizes_for(dtype, cap)):
        x = rank_input(n, dtype, seed=i, rank=custom.rank, device=device)
        got = x.clone()
        out = custom.all_reduce(got, algorithm)
        results[n] = (out is got, check_sum(ref, x, got))
    custom.synchronize()
    for n, (in_place, r) in results.items():
        assert in_place, n
        assert r["same_on_all_ranks"], f"{n} elements: ranks differ"
        assert r["within_exact"], f"{n} elements: error {r['max_err']} over the bound"
        assert r["within_nccl"], f"{n} elements: further from NCCL than the tolerance"


@pytest.mark.parametrize("algorithm,dtype", RUNS, ids=str)
def test_unaligned_tensors(custom, ref, device, dtype, algorithm) -> None:
    """A view one element into its storage is not 16-byte aligned: the element-wise path."""
    results = {}
    for n in (1, 5, 4099, 65_541):
        x = rank_input(n, dtype, seed=n, rank=custom.rank, device=device)
        base = torch.full((n + 1,), 7.0, dtype=dtype, device=device)
        view = base[1:]
        view.copy_(x)
        custom.all_reduce(view, algorithm)
        results[n] = (base[0].item() == 7.0, check_sum(ref, x, view))
    custom.synchronize()
    for n, (untouched, r) in results.items():
        assert untouched, f"{n}: the element before the view was written"
        assert r["same_on_all_ranks"] and r["within_exact"] and r["within_nccl"], (n, r)


def test_refuses_what_it_cannot_do(custom, device) -> None:
    with pytest.raises(TypeError, match="float64"):
        custom.all_reduce(torch.ones(4, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        custom.all_reduce(torch.ones(4, 4, device=device)[:, 0])
    with pytest.raises(ValueError, match="exceed"):
        custom.all_reduce(torch.ones(custom.capacity_bytes // 4 + 1, device=device))
    with pytest.raises(ValueError, match="algorithm"):
        custom.all_reduce(torch.ones(4, device=device), "ring")
    with pytest.raises(ValueError, match="cuda"):
        custom.all_reduce(torch.ones(4))
    with pytest.raises(ValueError, match="push all-reduce takes"):
        custom.all_reduce(torch.ones(4, device=device), "push")  # float32
    with pytest.raises(ValueError, match="push all-reduce takes"):
        custom.all_reduce(torch.ones(custom.push_bytes // 2 + 1, dtype=torch.bfloat16,
                                     device=device), "push")


@pytest.mark.parametrize("dtype", PUSH_DTYPES, ids=str)
def test_push_carries_negative_zeros(custom, ref, device, dtype) -> None:
    """-0 is the push buffers' "nothing here": pushed inputs full of -0 (every rank's at some
    elements, only one rank's at others) sum like any other zero, and the calls after them,
    which reuse those slots, are right too."""
    results = []
    for i, n in enumerate((5, 4096, 100_003)):
        x = rank_input(n, dtype, seed=200 + i, rank=custom.rank, device=device)
        x[::3] = -0.0  # all ranks: the sum is a zero
        x[custom.rank + 1 :: 7] = -0.0  # one rank's at some, several ranks' at others
        for _ in range(3):  # three calls: both push buffers, and one of them twice
            got = custom.all_reduce(x.clone(), "push")
            results.append((n, check_sum(ref, x, got), bool((got[::3] == 0).all())))
    custom.synchronize()
    for n, r, zeros in results:
        assert zeros, f"{n}: a sum of zeros is not zero"
        assert r["same_on_all_ranks"] and r["within_exact"] and r["within_nccl"], (n, r)


def expected_integers(n: int, n_ranks: int, step: int) -> torch.Tensor:
    """Sum over ranks r of (arange(n) % 7 + r + 1 + step): small integers, exact in bf16."""
    return n_ranks * (torch.arange(n) % 7) + n_ranks * (n_ranks + 1) // 2 + n_ranks * step


def integer_input(t: torch.Tensor, rank: int, step: int) -> None:
    n = t.numel()
    t.copy_(torch.arange(n, device=t.device) % 7 + rank + 1 + step)


def test_ten_thousand_calls_in_a_row(custom, ref, device) -> None:
    """Sizes of 1, a few and many blocks, alternating algorithms; every result is checked
    on the device (no host synchronization in the loop), the last ones also on the host."""
    rank, n_ranks = custom.rank, custom.world_size
    sizes = [1, 3001, 300_007]
    bufs = [torch.empty(n, device=device) for n in sizes]
    wants = [expected_integers(n, n_ranks, 0).to(device, torch.float32) for n in sizes]
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    calls = 10_000
    for i in range(calls):
        j, step = i % len(sizes), (i // 7) % 9
        integer_input(bufs[j], rank, step)
        custom.all_reduce(bufs[j], ALGORITHMS[(i // len(sizes)) % 2])
        wrong += (bufs[j] != wants[j] + n_ranks * step).sum()
    last = [((calls - 1 - k) // 7) % 9 for k in range(len(sizes))]  # steps of the last calls
    same = same_on_all_ranks(ref, torch.cat(bufs))
    custom.synchronize()
    assert wrong.item() == 0, f"{wrong.item()} wrong elements over {calls} calls"
    for k in range(len(sizes)):
        j = (calls - 1 - k) % len(sizes)
        assert torch.equal(bufs[j].cpu(), wants[j].cpu() + n_ranks * last[k]), sizes[j]
    assert same.item()


def test_push_among_other_calls(custom, ref, device) -> None:
    """3,000 bfloat16 calls, push in turn with one-shot and two-shot, at sizes of one and of
    many blocks: push's buffers stay right however the calls in between use the workspace."""
    rank, n_ranks = custom.rank, custom.world_size
    sizes = [1, 3001, 100_003]
    bufs = [torch.empty(n, dtype=torch.bfloat16, device=device) for n in sizes]
    wants = [expected_integers(n, n_ranks, 0).to(device, torch.bfloat16) for n in sizes]
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    order = ["push", "push", "oneshot", "push", "twoshot"]
    for i in range(3000):
        j, step = i % len(sizes), (i // 5) % 9
        integer_input(bufs[j], rank, step)
        custom.all_reduce(bufs[j], order[i % len(order)])
        wrong += (bufs[j] != wants[j] + n_ranks * step).sum()
    same = same_on_all_ranks(ref, torch.cat(bufs))
    custom.synchronize()
    assert wrong.item() == 0, f"{wrong.item()} wrong elements over 3000 calls"
    assert same.item()


def captured_graph(run, device) -> torch.cuda.CUDAGraph:
    """`run` once on a side stream (first calls outside the capture), then captured."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


def test_cuda_graph_replayed_a_thousand_times(custom, ref, device) -> None:
    """Five all-reduces captured once (one-shot fp32, two-shot bf16, one-shot fp16, push bf16
    and fp16), replayed on changing inputs, then an eager call: the step counter lives on the
    device."""
    rank, n_ranks = custom.rank, custom.world_size
    specs = [(4099, torch.float32, "oneshot"), (300_001, torch.bfloat16, "twoshot"),
             (77, torch.float16, "oneshot"), (4096, torch.bfloat16, "push"),
             (131_075, torch.float16, "push")]
    inps = [torch.empty(n, dtype=dt, device=device) for n, dt, _ in specs]
    outs = [torch.empty_like(t) for t in inps]
    wants = [expected_integers(n, n_ranks, 0).to(device, dt) for n, dt, _ in specs]

    def step_inputs(step: int) -> None:
        for t in inps:
            integer_input(t, rank, step)

    def run() -> None:
        for inp, out, (_, _, algo) in zip(inps, outs, specs):
            out.copy_(inp)
            custom.all_reduce(out, algo)

    step_inputs(0)
    graph = captured_graph(run, device)

    wrong = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(1000):
        step = i % 9
        step_inputs(step)
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        for out, want in zip(outs, wants):
            wrong += (out != want + n_ranks * step).sum()
    step_inputs(3)
    run()  # eager, after the replays
    eager_ok = all(bool((o == w + 3 * n_ranks).all()) for o, w in zip(outs, wants))
    same = same_on_all_ranks(ref, torch.cat([o.view(torch.uint8) for o in outs]))
    custom.synchronize()
    assert wrong.item() == 0, f"{wrong.item()} wrong elements over 1000 replays"
    assert eager_ok
    assert same.item()


def test_communicator_auto_picks_by_size(mpi, ref, device) -> None:
    comm = NcclCommunicator(mpi.mpi_comm, device, all_reduce="auto")
    assert comm.custom is not None
    limits = thresholds_for(comm.world_size)
    small = rank_input(2048, torch.bfloat16, seed=41, rank=comm.rank, device=device)
    cap = comm.custom.capacity_bytes
    picks = {
        "small": comm.algorithm_for(small),
        "small_f32": comm.algorithm_for(small.float()),
        "oneshot_edge": comm.algorithm_for(torch.empty(limits.oneshot_max_bytes // 2,
                                                       dtype=torch.bfloat16, device=device)),
        "over_capacity": comm.algorithm_for(torch.empty(cap // 4 + 1, device=device)),
        "max": comm.algorithm_for(small, "max"),
        "int": comm.algorithm_for(torch.ones(8, dtype=torch.int32, device=device)),
    }
    got = comm.all_reduce(small.clone())
    r = check_sum(ref, small, got)
    comm.synchronize()
    edge = ("nccl" if limits.oneshot_max_bytes > cap else
            "push" if limits.oneshot_max_bytes <= comm.custom.push_bytes else "oneshot")
    assert picks == {"small": "push", "small_f32": "oneshot", "oneshot_edge": edge,
                     "over_capacity": "nccl", "max": "nccl", "int": "nccl"}
    assert r["same_on_all_ranks"] and r["within_exact"] and r["within_nccl"], r


@pytest.mark.parametrize("forced", ["twoshot", "nccl"])
def test_environment_variable_forces_a_path(mpi, ref, device, monkeypatch, forced) -> None:
    monkeypatch.setenv(MODE_ENV, forced)
    comm = NcclCommunicator(mpi.mpi_comm, device)
    x = rank_input(1000, torch.float32, seed=43, rank=comm.rank, device=device)
    pick = comm.algorithm_for(x)
    r = check_sum(ref, x, comm.all_reduce(x.clone()))
    comm.synchronize()
    assert comm.all_reduce_mode == forced
    assert pick == forced
    assert (comm.custom is None) == (forced == "nccl")
    assert r["same_on_all_ranks"] and r["within_exact"] and r["within_nccl"], r


# -- the fused all-reduce + residual add + RMSNorm ------------------------------------------

# (rows, hidden): 130 rows are more than a launch's 64 blocks, so blocks take several rows;
# rows of 1 to 4 packs per thread (8192 float32 / 16384 bfloat16 elements: the longest)
NORM_SHAPES = [(1, 4096), (3, 576), (1, 8192), (8, 8), (64, 4096), (130, 1024), (2, 6144)]
NORM_EPS = 1e-5


def norm_operands(rows: int, hidden: int, dtype: torch.dtype, seed: int, rank: int, device):
    """This rank's partial sums; the residual and norm weight, the same on every rank."""
    partial = rank_input(rows * hidden, dtype, seed, rank, device).view(rows, hidden)
    g = torch.Generator(device=device).manual_seed(seed)
    residual = torch.randn(rows, hidden, generator=g, device=device).to(dtype)
    weight = (1 + 0.3 * torch.randn(hidden, generator=g, device=device)).to(dtype)
    return partial, residual, weight


def check_add_norm(custom, ref, partial, residual, weight, s, normed) -> dict[str, object]:
    """The fused kernel's `s`, `normed` against the float64 reference and against the unfused
    path (one-shot all-reduce, then the Triton add + norm). Collective; no asserts.

    Bounds, e = the dtype's machine epsilon, N ranks, scale = sum over ranks of |partial|:
    - s: the all-reduce's bound on d (check_sum) and one rounding of residual + d:
      |s - s64| <= e * (|r| + |d64|) + N * eps32 * scale; bitwise equal to the unfused s.
    - normed: s's error and two roundings, through the norm:
      |normed - n64| <= 2 * e * ((|r| + |d64|) * inv_rms64 * |w| + |n64|); against the
      unfused norm (the same s, its sum of squares in another order) one rounding step,
      2 * e * |n|, for float16 / bfloat16, and 1e-5 * |n| for float32.
    """
    from tpquant.kernels.norm import add_rms_norm

    d64 = ref.all_reduce(partial.double())
    scale = ref.all_reduce(partial.double().abs())
    r64, w64 = residual.double(), weight.double()
    s64 = r64 + d64
    inv64 = torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    n64 = s64 * inv64 * w64
    s_ref, n_ref = add_rms_norm(residual, custom.all_reduce(partial.clone(), "oneshot"), weight,
                                NORM_EPS)
    e = torch.finfo(partial.dtype).eps
    n_rel = 1e-5 if partial.dtype == torch.float32 else 2 * e
    spread = r64.abs() + d64.abs()
    return {
        "same_on_all_ranks": bool(same_on_all_ranks(ref, torch.cat([s, normed])).item()),
        "s_bitwise_unfused": bool(torch.equal(s, s_ref)),
        "s_within": bool(((s.double() - s64).abs()
                          <= e * spread + ref.world_size * EPS32 * scale).all()),
        "normed_within": bool(((normed.double() - n64).abs()
                               <= 2 * e * (spread * inv64 * w64.abs() + n64.abs())).all()),
        "normed_near_unfused": bool(((normed.double() - n_ref.double()).abs()
                                     <= n_rel * n_ref.double().abs()).all()),
        "max_err": (normed.double() - n64).abs().max().item(),
    }


@pytest.mark.parametrize("algorithm,dtype", [r for r in RUNS if r[0] != "twoshot"], ids=str)
def test_add_norm_matches_unfused_and_float64(custom, ref, device, dtype, algorithm) -> None:
    results = {}
    longest = NORM_MAX_ROW_BYTES // torch.tensor([], dtype=dtype).element_size()
    for i, (rows, hidden) in enumerate(NORM_SHAPES + [(1, longest)]):
        partial, residual, weight = norm_operands(rows, hidden, dtype, 50 + i, custom.rank,
                                                  device)
        kept = partial.clone()
        s, normed = custom.all_reduce_add_rms_norm(partial, residual, weight, NORM_EPS,
                                                   algorithm)
        r = check_add_norm(custom, ref, kept, residual, weight, s, normed)
        results[(rows, hidden)] = (torch.equal(partial, kept), r)
    custom.synchronize()
    for shape, (untouched, r) in results.items():
        assert untouched, f"{shape}: the partial sums were overwritten"
        assert all(v for k, v in r.items() if k != "max_err"), (shape, r)


def test_add_norm_in_a_cuda_graph(custom, ref, device) -> None:
    """Four fused calls (one-shot and push) and a plain all-reduce among them captured once,
    replayed 200 times on changing inputs: every replay equals the eager result of the same
    inputs."""
    ops = [norm_operands(rows, hidden, dtype, 60 + k, custom.rank, device)
           for k, (rows, hidden, dtype) in enumerate([(1, 4096, torch.bfloat16),
                                                      (8, 576, torch.float16)] * 2)]
    algos = ["oneshot", "oneshot", "push", "push"]
    plain = torch.empty(1000, device=device)
    outs = []

    def run() -> None:
        outs.clear()
        for (partial, residual, weight), algo in zip(ops, algos):
            outs.extend(custom.all_reduce_add_rms_norm(partial, residual, weight, NORM_EPS,
                                                       algo))
        integer_input(plain, custom.rank, 0)
        custom.all_reduce(plain, "oneshot")

    def new_inputs(step: int) -> None:
        for k, (partial, residual, _) in enumerate(ops):
            partial.copy_(rank_input(partial.numel(), partial.dtype, 70 + step, custom.rank,
                                     device).view_as(partial))
            residual.mul_(-1 if (step + k) % 2 else 1)

    graph = captured_graph(run, device)
    captured = list(outs)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    for step in range(200):
        new_inputs(step)
        for t in captured:
            t.fill_(float("nan"))
        graph.replay()
        replayed = [t.clone() for t in captured]
        run()  # eager, same inputs
        wrong += sum((a != b).sum() for a, b in zip(replayed, outs))
    want_plain = expected_integers(1000, custom.world_size, 0).to(device, torch.float32)
    plain_ok = torch.equal(plain, want_plain)
    custom.synchronize()
    assert wrong.item() == 0, f"{wrong.item()} elements of replays differ from eager"
    assert plain_ok


def test_communicator_fuses_the_norm_where_it_fits(mpi, ref, device, monkeypatch) -> None:
    comm = NcclCommunicator(mpi.mpi_comm, device)
    partial, residual, weight = norm_operands(2, 4096, torch.bfloat16, 80, comm.rank, device)
    odd = norm_operands(2, 4100, torch.bfloat16, 81, comm.rank, device)  # rows of 8200 bytes
    many = norm_operands(comm.custom.max_blocks + 1, 512, torch.bfloat16, 82, comm.rank, device)
    picks = {"fits": comm.fuses_norm(partial, residual, weight), "odd": comm.fuses_norm(*odd),
             "more_rows_than_blocks": comm.fuses_norm(*many)}
    results = {}
    for name, (p, r, w) in {"fits": (partial, residual, weight), "odd": odd}.items():
        kept = p.clone()
        s, normed = comm.all_reduce_add_rms_norm(p, r, w, NORM_EPS)
        results[name] = check_add_norm(comm.custom, ref, kept, r, w, s, normed)
    monkeypatch.setenv(NORM_ENV, "0")
    off = NcclCommunicator(mpi.mpi_comm, device)
    picks["off"] = off.fuses_norm(partial, residual, weight)
    comm.synchronize()
    assert picks == {"fits": True, "odd": False, "more_rows_than_blocks": False, "off": False}
    for name, r in results.items():
        assert all(v for k, v in r.items() if k != "max_err"), (name, r)


def test_add_norm_refuses_what_it_cannot_do(custom, device) -> None:
    p, r, w = norm_operands(2, 64, torch.bfloat16, 90, custom.rank, device)
    with pytest.raises(ValueError, match="16-byte aligned"):
        custom.all_reduce_add_rms_norm(p, r.float(), w, NORM_EPS)
    shifted = torch.empty(p.numel() + 8, dtype=p.dtype, device=device)[1 : p.numel() + 1]
    with pytest.raises(ValueError, match="16-byte aligned"):  # contiguous, 2 bytes off
        custom.all_reduce_add_rms_norm(shifted.view_as(p), r, w, NORM_EPS)
    long = norm_operands(1, NORM_MAX_ROW_BYTES // 2 + 8, torch.bfloat16, 91, custom.rank, device)
    with pytest.raises(ValueError, match="16-byte aligned"):  # a row over the longest
        custom.all_reduce_add_rms_norm(*long, NORM_EPS)
    with pytest.raises(ValueError, match="push all-reduce takes"):
        custom.all_reduce_add_rms_norm(p.float(), r.float(), w.float(), NORM_EPS, "push")
    with pytest.raises(ValueError, match="'oneshot' or 'push'"):
        custom.all_reduce_add_rms_norm(p, r, w, NORM_EPS, "twoshot")


# Keep this test last: the workspace it breaks is its own, but a rank sits out a collective.
@pytest.mark.parametrize("algorithm", ["oneshot", "push"])
def test_a_rank_that_stops_makes_the_others_raise_in_time(mpi, device, algorithm) -> None:
    timeout = 1.0
    short = CustomAllReduce(mpi.mpi_comm, device, capacity_bytes=1 << 16, timeout_s=timeout)
    idle = short.world_size - 1
    t = torch.ones(1000, device=device, dtype=torch.bfloat16)
    waited, named, sticky, idle_clean = -1.0, [], False, True
    if short.rank != idle:
        start = time.monotonic()
        short.all_reduce(t, algorithm)
        try:
            short.synchronize()
        except CustomAllReduceError as e:
            waited, named = time.monotonic() - start, e.peers
        try:
            short.all_reduce(t)  # refused before launching: the workspace is broken
        except CustomAllReduceError:
            sticky = True
    else:
        try:
            short.check()
        except CustomAllReduceError:
            idle_clean = False
    mine = np.array([waited, float(named == [idle]), float(sticky), float(idle_clean)])
    every = np.empty((short.world_size, 4))
    mpi.mpi_comm.Allgather(mine, every)
    short.close()
    for r, (waited_r, named_r, sticky_r, clean_r) in enumerate(every):
        if r == idle:
            assert clean_r, "the rank that sat out saw an error"
            continue
        assert timeout * 0.9 <= waited_r <= timeout + 10, f"rank {r} raised after {waited_r} s"
        assert named_r, f"rank {r} did not name rank {idle}"
        assert sticky_r, f"rank {r} launched again on a broken workspace"
