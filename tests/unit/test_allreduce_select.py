"""The pure rules of the custom all-reduce: which path, which mode, which grid, and which
tensors the fused all-reduce + RMSNorm takes.

`choose_all_reduce` is the one place that decides between one-shot, two-shot, push and NCCL;
these tests hold it to the thresholds table, to push's dtypes and size, and to every reason
for falling back to NCCL.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tpquant.parallel.custom_allreduce import (
    ALGORITHMS,
    MAX_RANKS,
    MODE_ENV,
    MODES,
    NORM_ENV,
    NORM_MAX_ROW_BYTES,
    PUSH_MAX_BYTES,
    THRESHOLDS,
    add_norm_fits,
    add_norm_pays,
    add_norm_wanted,
    all_reduce_mode,
    choose_all_reduce,
    launch_blocks,
    thresholds_for,
)

CAPACITY = 64 << 20


def choose(mode: str = "auto", **kw) -> str:
    args = dict(
        nbytes=4096,
        world_size=4,
        dtype=torch.bfloat16,
        op="sum",
        contiguous=True,
        custom_available=True,
        capacity_bytes=CAPACITY,
    )
    args.update(kw)
    return choose_all_reduce(mode, **args)


def test_thresholds_table_is_ordered() -> None:
    for world, t in THRESHOLDS.items():
        assert 2 <= world <= MAX_RANKS
        assert 0 < t.oneshot_max_bytes <= t.custom_max_bytes, world


@pytest.mark.parametrize("world", range(2, MAX_RANKS + 1))
def test_auto_follows_the_thresholds_at_their_edges(world: int) -> None:
    t = thresholds_for(world)
    f32 = dict(world_size=world, dtype=torch.float32)  # no push: the one-shot's own edges
    assert choose(nbytes=1, **f32) == "oneshot"
    assert choose(nbytes=t.oneshot_max_bytes, **f32) == "oneshot"
    above = "twoshot" if t.custom_max_bytes > t.oneshot_max_bytes else "nccl"
    assert choose(nbytes=t.oneshot_max_bytes + 1, **f32) == above
    assert choose(nbytes=t.custom_max_bytes + 1, **f32) == "nccl"


@pytest.mark.parametrize("world", range(2, MAX_RANKS + 1))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_pushes_16_bit_one_shot_sizes_up_to_the_push_slot(world: int, dtype) -> None:
    t = thresholds_for(world)
    edge = min(PUSH_MAX_BYTES, t.oneshot_max_bytes)
    assert choose(nbytes=1, world_size=world, dtype=dtype) == "push"
    assert choose(nbytes=edge, world_size=world, dtype=dtype) == "push"
    above = "oneshot" if edge < t.oneshot_max_bytes else (
        "twoshot" if t.custom_max_bytes > t.oneshot_max_bytes else "nccl")
    assert choose(nbytes=edge + 1, world_size=world, dtype=dtype) == above
    # a smaller push slot (the workspace's own) moves the edge
    assert choose(nbytes=1024, world_size=world, dtype=dtype, push_bytes=1023) == "oneshot"


def test_thresholds_for_untabled_world_sizes_take_the_next_tabled_one() -> None:
    tabled = sorted(THRESHOLDS)
    for world in range(2, MAX_RANKS + 1):
        want = next((w for w in tabled if w >= world), tabled[-1])
        assert thresholds_for(world) == THRESHOLDS[want]


@pytest.mark.parametrize("mode", ["auto", *ALGORITHMS])
@pytest.mark.parametrize(
    "why",
    [
        dict(custom_available=False),
        dict(op="max"),
        dict(dtype=torch.float64),
        dict(dtype=torch.int32),
        dict(contiguous=False),
        dict(nbytes=CAPACITY + 1),
        dict(world_size=MAX_RANKS + 1),
        dict(world_size=1),
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_nccl_whenever_the_custom_kernels_cannot_run(mode: str, why: dict) -> None:
    assert choose(mode, **why) == "nccl"


@pytest.mark.parametrize("mode", ["oneshot", "twoshot"])
@pytest.mark.parametrize("nbytes", [1, 4096, CAPACITY])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forced_algorithm_wins_at_any_size_that_fits(mode: str, nbytes: int, dtype) -> None:
    assert choose(mode, nbytes=nbytes, dtype=dtype) == mode


@pytest.mark.parametrize("nbytes", [1, 4096, PUSH_MAX_BYTES, PUSH_MAX_BYTES + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forced_push_runs_where_it_fits_and_nccl_elsewhere(nbytes: int, dtype) -> None:
    fits = dtype != torch.float32 and nbytes <= PUSH_MAX_BYTES
    assert choose("push", nbytes=nbytes, dtype=dtype) == ("push" if fits else "nccl")


def test_nccl_mode_never_takes_the_custom_kernels() -> None:
    assert choose("nccl", nbytes=16) == "nccl"


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        choose("fast")


def test_mode_precedence_option_then_environment_then_auto() -> None:
    assert all_reduce_mode(None, {}) == "auto"
    assert all_reduce_mode(None, {MODE_ENV: ""}) == "auto"
    assert all_reduce_mode(None, {MODE_ENV: "twoshot"}) == "twoshot"
    assert all_reduce_mode(None, {MODE_ENV: "NCCL"}) == "nccl"
    assert all_reduce_mode("oneshot", {MODE_ENV: "nccl"}) == "oneshot"
    assert {all_reduce_mode(m, {}) for m in MODES} == set(MODES)


def test_bad_modes_name_their_source() -> None:
    with pytest.raises(ValueError, match=f"{MODE_ENV}='ring'"):
        all_reduce_mode(None, {MODE_ENV: "ring"})
    with pytest.raises(ValueError, match="all_reduce='ring'"):
        all_reduce_mode("ring", {})


@given(
    numel=st.integers(1, 1 << 26),
    itemsize=st.sampled_from([2, 4]),
    world=st.integers(2, MAX_RANKS),
    algorithm=st.sampled_from(ALGORITHMS),
    max_blocks=st.integers(1, 64),
)
def test_launch_grid_covers_the_work_within_the_block_limit(
    numel: int, itemsize: int, world: int, algorithm: str, max_blocks: int
) -> None:
    threads = 512
    blocks = launch_blocks(numel, itemsize, world, algorithm, threads, max_blocks)
    assert 1 <= blocks <= max_blocks
    packs = -(-numel * itemsize // 16)  # 16-byte packs, the last one maybe partial
    work = -(-packs // world) if algorithm == "twoshot" else packs
    # No idle block unless the limit is reached; every pack has a thread when it is not.
    assert (blocks - 1) * threads < work or blocks == 1
    assert blocks == max_blocks or blocks * threads >= work


def _norm_operands(rows: int = 3, hidden: int = 64, dtype=torch.bfloat16):
    partial = torch.randn(rows, hidden).to(dtype)
    return partial, torch.randn(rows, hidden).to(dtype), torch.randn(hidden).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_norm_takes_whole_packs_of_one_dtype(dtype) -> None:
    pack = 16 // torch.tensor([], dtype=dtype).element_size()  # elements in 16 bytes
    assert add_norm_fits(*_norm_operands(3, 64, dtype))
    assert add_norm_fits(*_norm_operands(1, pack, dtype))
    assert not add_norm_fits(*_norm_operands(2, pack * 3 // 2, dtype))  # rows of 24 bytes
    assert not add_norm_fits(*_norm_operands(2, 2, dtype))
    longest = NORM_MAX_ROW_BYTES // (16 // pack)
    assert add_norm_fits(*_norm_operands(1, longest, dtype))
    assert not add_norm_fits(*_norm_operands(1, longest + pack, dtype))  # one pack too many


def test_add_norm_refuses_what_its_kernel_cannot_read() -> None:
    p, r, w = _norm_operands()
    assert not add_norm_fits(p, r.float(), w)  # dtypes differ
    assert not add_norm_fits(p, r, w.float())
    assert not add_norm_fits(p.double(), r.double(), w.double())  # float64: no kernel
    assert not add_norm_fits(p, r[:2], w)  # shapes differ
    assert not add_norm_fits(p, r, w[:32])
    wide = torch.randn(3, 128).bfloat16()
    assert not add_norm_fits(wide[:, :64], r, w)  # not contiguous
    flat = torch.randn(3 * 64 + 1).bfloat16()
    assert not add_norm_fits(flat[1:].view(3, 64), r, w)  # 2 bytes past 16-byte alignment
    assert not add_norm_fits(torch.randn(()).bfloat16(), torch.randn(()).bfloat16(), w)


def test_add_norm_environment_switch() -> None:
    assert add_norm_wanted({}) and add_norm_wanted({NORM_ENV: "1"})
    assert not add_norm_wanted({NORM_ENV: "0"})
    with pytest.raises(ValueError, match=NORM_ENV):
        add_norm_wanted({NORM_ENV: "off"})


# (rows, row bytes) -> fused faster, as measured on 2 x H200 in bf16 (bench_allreduce_norm,
# docs/benchmarks.md): 512 threads and at most 64 blocks a launch, as there.
MEASURED_FUSED_WINS = {(1, 8192): True, (8, 8192): True, (64, 8192): True, (512, 8192): False,
                       (1, 16384): False, (8, 16384): False, (64, 16384): True,
                       (512, 16384): False}


def test_add_norm_pays_where_it_was_measured_faster() -> None:
    got = {k: add_norm_pays(*k, world_size=2, threads=512, max_blocks=64)
           for k in MEASURED_FUSED_WINS}
    assert got == MEASURED_FUSED_WINS


@given(rows=st.integers(1, 4096), packs=st.integers(1, 2048), world=st.integers(2, 8))
def test_add_norm_pays_with_a_block_per_row_of_one_pack_a_thread(rows, packs, world) -> None:
    pays = add_norm_pays(rows, 16 * packs, world, threads=512, max_blocks=64)
    if rows > 64:  # a block would take several rows
        assert not pays
    elif packs <= 512:  # one pack a thread: as many blocks as the one-shot's, or more
        assert pays
