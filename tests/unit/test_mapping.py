"""Mapping: validation, launcher environments, precedence, GPU choice by local rank."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpquant.parallel import mapping as mapping_mod
from tpquant.parallel.mapping import Mapping, launched_by_mpi, mapping_from_environ


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of some process in some job."""
    world = draw(st.integers(1, 512))
    return draw(st.integers(0, world - 1)), world, draw(st.integers(0, 15))


def openmpi_env(rank: int, world: int, local: int) -> dict[str, str]:
    return {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(world),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(local),
    }


def pmi_env(rank: int, world: int, local: int, local_var: str = "MPI_LOCALRANKID") -> dict:
    return {"PMI_RANK": str(rank), "PMI_SIZE": str(world), local_var: str(local)}


def slurm_env(rank: int, world: int, local: int) -> dict[str, str]:
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(local)}


class FakeComm:
    """The two mpi4py communicator methods the mapping reads."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's name)
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size


def fields(m: Mapping) -> tuple[int, int, int, int]:
    return m.rank, m.world_size, m.local_rank, m.tp_size


# --- Mapping itself ---------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(layouts(), st.data())
def test_defaults_and_tp_rank(layout: tuple[int, int, int], data: st.DataObject) -> None:
    rank, world, _ = layout
    m = Mapping(world, rank)
    assert fields(m) == (rank, world, rank, world)
    assert m.tp_rank == rank
    tp = data.draw(st.sampled_from([d for d in range(1, world + 1) if world % d == 0]))
    m = Mapping(world, rank, tp_size=tp)
    assert m.tp_size == tp and m.tp_rank == rank - (rank // tp) * tp


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 0), "world_size"),
        ((2, 2), "rank"),
        ((2, -1), "rank"),
        ((4, 0, 3), "tp_size"),
        ((4, 0, 0), "tp_size"),
        ((4, 0, 4, -1), "local_rank"),
    ],
)
def test_invalid_mapping(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Mapping(*args)


def test_non_int_fields_refused() -> None:
    with pytest.raises(TypeError, match="rank"):
        Mapping(2, "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="world_size"):
        Mapping(2.0, 1)  # type: ignore[arg-type]


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Mapping(2, 1).rank = 0  # type: ignore[misc]


# --- environments ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_each_launcher(layout: tuple[int, int, int]) -> None:
    rank, world, local = layout
    for env in (
        openmpi_env(rank, world, local),
        pmi_env(rank, world, local, "MPI_LOCALRANKID"),
        pmi_env(rank, world, local, "PMI_LOCAL_RANK"),
        slurm_env(rank, world, local),
    ):
        assert fields(mapping_from_environ(env)) == (rank, world, local, world), env


@settings(max_examples=30, deadline=None)
@given(layouts())
def test_missing_local_rank_falls_back_to_rank(layout: tuple[int, int, int]) -> None:
    rank, world, local = layout
    for env, local_var in (
        (openmpi_env(rank, world, local), "OMPI_COMM_WORLD_LOCAL_RANK"),
        (pmi_env(rank, world, local), "MPI_LOCALRANKID"),
        (slurm_env(rank, world, local), "SLURM_LOCALID"),
    ):
        del env[local_var]
        assert fields(mapping_from_environ(env)) == (rank, world, rank, world), env


def test_no_launcher_is_one_process() -> None:
    env = {"PATH": "/usr/bin", "SLURM_JOB_ID": "17", "OMPI_MCA_btl": "self"}
    assert fields(mapping_from_environ(env)) == (0, 1, 0, 1)
    assert fields(mapping_from_environ({})) == (0, 1, 0, 1)


@settings(max_examples=40, deadline=None)
@given(layouts(), layouts(), layouts())
def test_precedence(a: tuple, b: tuple, c: tuple) -> None:
    """Open MPI over PMI over Slurm, whichever values the others hold."""
    env = {**slurm_env(*c), **pmi_env(*b), **openmpi_env(*a)}
    assert fields(mapping_from_environ(env))[:3] == a
    env = {**slurm_env(*c), **pmi_env(*b)}
    assert fields(mapping_from_environ(env))[:3] == b


@pytest.mark.parametrize(
    "env, match",
    [
        ({"OMPI_COMM_WORLD_RANK": "1"}, "OMPI_COMM_WORLD_SIZE"),
        ({"PMI_SIZE": "4"}, "PMI_RANK"),
        ({"SLURM_PROCID": "0"}, "SLURM_NTASKS"),
        ({"PMI_RANK": "x", "PMI_SIZE": "2"}, "PMI_RANK"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1.5"}, "SLURM_LOCALID"),
        ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "rank"),
    ],
)
def test_broken_environment(env: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mapping_from_environ(env)


def test_tp_size_from_caller() -> None:
    env = openmpi_env(5, 8, 1)
    m = mapping_from_environ(env, tp_size=4)
    assert (m.tp_size, m.tp_rank) == (4, 1)
    with pytest.raises(ValueError, match="tp_size"):
        mapping_from_environ(env, tp_size=3)


def test_launched_by_mpi() -> None:
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"):
        assert launched_by_mpi({var: "2"})
    assert not launched_by_mpi(slurm_env(1, 2, 1))
    assert not launched_by_mpi({})


# --- from_env: which source it reads ----------------------------------------


def _no_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise AssertionError("mpi4py consulted without an MPI launcher")

    monkeypatch.setattr(mapping_mod, "_world_comm", fail)


def test_from_env_without_launcher_leaves_mpi_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_mpi(monkeypatch)
    assert fields(Mapping.from_env({})) == (0, 1, 0, 1)
    assert fields(Mapping.from_env(slurm_env(3, 4, 1), tp_size=2)) == (3, 4, 1, 2)


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_mpi(monkeypatch)
    for var in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
                "PMIX_RANK", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in slurm_env(2, 6, 0).items():
        monkeypatch.setenv(var, value)
    assert fields(Mapping.from_env()) == (2, 6, 0, 6)


def test_from_env_prefers_mpi_when_launched(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**openmpi_env(1, 3, 2), "PMIX_RANK": "1"}
    monkeypatch.setattr(mapping_mod, "_world_comm", lambda: FakeComm(1, 3))
    assert fields(Mapping.from_env(env)) == (1, 3, 2, 3)
    # mpi4py missing: the environment alone.
    monkeypatch.setattr(mapping_mod, "_world_comm", lambda: None)
    assert fields(Mapping.from_env(env)) == (1, 3, 2, 3)


def test_from_env_refuses_mpi_that_disagrees_with_launcher() -> None:
    """mpi4py linked to another MPI than mpirun's: every process is a singleton."""
    with pytest.raises(ValueError, match="different MPI"):
        Mapping.from_env(openmpi_env(1, 2, 1), comm=FakeComm(0, 1))


def test_from_env_with_comm_and_no_launcher_vars() -> None:
    assert fields(Mapping.from_env({}, comm=FakeComm(0, 1))) == (0, 1, 0, 1)


# --- device ------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 8])
def test_device_from_local_rank(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    for rank, world, local in ((0, 1, 0), (5, 16, 1), (13, 16, 5), (7, 8, 7)):
        assert Mapping(world, rank, local_rank=local).device() == torch.device("cuda", local % count)


def test_device_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Mapping(4, 3, local_rank=3).device() == torch.device("cpu")
