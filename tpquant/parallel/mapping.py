"""Where this process sits in the job: rank, world size, TP size and local rank.

One `Mapping` is built once at start-up (`Mapping.from_env()`) and passed to
every layer; nothing here is module state.

Sources, in order of precedence:

1. mpi4py's ``COMM_WORLD``, when the environment shows an MPI launcher
   (`launched_by_mpi`) and mpi4py imports. Its rank and size are the ones the
   communicator will use, so they win. mpi4py is *not* imported otherwise: a
   plain single process never initializes MPI through this module.
2. ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}`` (Open MPI's mpirun).
3. ``PMI_RANK``/``PMI_SIZE`` (MPICH, Intel MPI, srun --mpi=pmi2); local rank
   from ``MPI_LOCALRANKID`` or ``PMI_LOCAL_RANK``, else the rank.
4. ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (srun).
5. Otherwise one process: rank 0 of 1, local rank 0.

The local rank (position among the processes of one node) picks the GPU; the
global rank never does: on several nodes, or with one visible GPU per process,
it is not a device ordinal.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
from typing import Any

import torch

Environ = collections.abc.Mapping  # Mapping[str, str]; the name `Mapping` is ours

# Variables only an MPI launcher sets; their presence means COMM_WORLD spans the job.
_MPI_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


@dataclasses.dataclass(frozen=True)
class Mapping:
    """Rank layout of one process. Only tensor parallelism for now.

    world_size: processes in the job.  rank: this process, 0 <= rank < world_size.
    tp_size: ranks in one tensor-parallel group (default: world_size); consecutive
    ranks form a group, so tp_rank = rank % tp_size.
    local_rank: position on this node (default: rank, i.e. a single node).
    """

    world_size: int
    rank: int
    tp_size: int | None = None
    local_rank: int | None = None

    def __post_init__(self) -> None:
        # Frozen: fill the defaults through object.__setattr__.
        if self.tp_size is None:
            object.__setattr__(self, "tp_size", self.world_size)
        if self.local_rank is None:
            object.__setattr__(self, "local_rank", self.rank)
        for name in ("world_size", "rank", "tp_size", "local_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Mapping.{name} must be an int, got {value!r}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.tp_size < 1 or self.world_size % self.tp_size != 0:
            raise ValueError(
                f"tp_size={self.tp_size} must be >= 1 and divide world_size={self.world_size}"
            )
        if self.local_rank < 0:
            raise ValueError(f"local_rank must be >= 0, got {self.local_rank}")

    @property
    def tp_rank(self) -> int:
        """Rank inside this process's tensor-parallel group."""
        return self.rank % self.tp_size

    def device(self) -> torch.device:
        """This rank's GPU, ``cuda:(local_rank % device_count)``, or the CPU without CUDA."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    @classmethod
    def from_env(
        cls,
        env: Environ[str, str] | None = None,
        comm: Any = None,
        tp_size: int | None = None,
    ) -> Mapping:
        """The mapping of this process; see the module docstring for the sources.

        env: the environment to read (default ``os.environ``).
        comm: an mpi4py world communicator to use instead of looking for one.
        tp_size: default world_size.
        """
        env = os.environ if env is None else env
        if comm is None and launched_by_mpi(env):
            comm = _world_comm()
        if comm is not None:
            return mapping_from_comm(comm, env, tp_size)
        return mapping_from_environ(env, tp_size)


def launched_by_mpi(env: Environ[str, str]) -> bool:
    """True when `env` carries variables that only an MPI launcher sets."""
    return any(name in env for name in _MPI_LAUNCHER_VARS)


def _int_var(env: Environ[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _launcher_triple(env: Environ[str, str]) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from the first launcher family present, else None."""
    families = (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
        ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")),
        ("SLURM_PROCID", "SLURM_NTASKS", ("SLURM_LOCALID",)),
    )
    for rank_var, size_var, local_vars in families:
        if rank_var not in env and size_var not in env:
            continue
        # Half a family is a broken environment; guessing the other half would
        # give every process the same rank.
        missing = [v for v in (rank_var, size_var) if v not in env]
        if missing:
            raise ValueError(f"{missing[0]} is not set but its partner variable is")
        rank = _int_var(env, rank_var)
        local = next((_int_var(env, v) for v in local_vars if v in env), rank)
        return rank, _int_var(env, size_var), local
    return None


def mapping_from_environ(env: Environ[str, str], tp_size: int | None = None) -> Mapping:
    """Pure: the mapping the launcher variables in `env` describe (one process if none)."""
    triple = _launcher_triple(env)
    rank, world_size, local_rank = (0, 1, 0) if triple is None else triple
    return Mapping(world_size, rank, tp_size, local_rank)


def mapping_from_comm(comm: Any, env: Environ[str, str], tp_size: int | None = None) -> Mapping:
    """The mapping of an mpi4py world communicator; local rank from `env` or the node.

    `comm` must span the whole job (COMM_WORLD or a duplicate). If the launcher
    variables disagree with it, mpi4py talks to a different MPI library than
    the one that launched us (every process would think it is rank 0): refused.
    Without launcher variables the local rank is this process's rank among the
    ranks sharing its node (a collective call on `comm`).
    """
    rank, world_size = comm.Get_rank(), comm.Get_size()
    triple = _launcher_triple(env)
    if triple is not None:
        env_rank, env_size, local_rank = triple
        if (env_rank, env_size) != (rank, world_size):
            raise ValueError(
                f"MPI says rank {rank} of {world_size}, the launcher's environment says "
                f"rank {env_rank} of {env_size}: mpi4py is probably built against a "
                "different MPI than the mpirun that started this process"
            )
    elif world_size == 1:
        local_rank = 0
    else:
        local_rank = _node_local_rank(comm)
    return Mapping(world_size, rank, tp_size, local_rank)


def _node_local_rank(comm: Any) -> int:
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_rank()
    finally:
        node.Free()


def _world_comm() -> Any:
    """mpi4py's COMM_WORLD (this initializes MPI), or None if mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD
