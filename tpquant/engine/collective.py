"""Failing together: an error on any rank becomes one clear error on every rank.

A check that can fail on one rank only (its engine file is truncated, say) must not leave the
other ranks waiting in the next collective. `on_all_ranks` runs a step on every rank, then
every rank learns every rank's outcome; if any failed, all raise `JobError` with the
messages, and rank 0 prints it once (`report_and_exit`).
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from tpquant.collectives import Communicator

T = TypeVar("T")


class JobError(Exception):
    """A failure every rank knows about; rank 0 reports it and the job exits non-zero."""


# What counts as bad input or a bad file: these are reported as messages, not tracebacks.
EXPECTED = (ValueError, KeyError, OSError, JobError)


def on_all_ranks(comm: Communicator, step: Callable[[], T], what: str) -> T:
    """Run `step` on every rank; if it failed anywhere, raise JobError on every rank."""
    error: str | None = None
    result = None
    try:
        result = step()
    except EXPECTED as e:
        error = f"{type(e).__name__}: {e}"
    errors = [comm.broadcast_object(error, root=r) for r in range(comm.world_size)]
    failed = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
    if failed:
        distinct = {msg for _, msg in failed}
        if len(distinct) == 1 and len(failed) == comm.world_size:
            raise JobError(f"{what}: {failed[0][1]}")
        lines = "\n".join(f"  rank {r}: {msg}" for r, msg in failed)
        raise JobError(f"{what} failed on {len(failed)} of {comm.world_size} ranks:\n{lines}")
    return result  # type: ignore[return-value]


def report_and_exit(comm: Communicator | None, error: BaseException, code: int = 1) -> None:
    """Rank 0 prints `error`; every rank exits with `code`."""
    if comm is None or comm.rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(code)


def abort(error: BaseException, rank: int) -> None:
    """An unexpected failure on one rank: say which, then take the whole job down so that no
    rank waits forever in a collective (DESIGN s8)."""
    import traceback

    traceback.print_exception(error)
    print(f"error: rank {rank} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    try:
        from mpi4py import MPI

        if MPI.Is_initialized() and MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(1)
    except ImportError:
        pass
    sys.exit(1)
