"""Failing together: an error on any rank ends the whole job, clearly and within seconds.

Two ways a job ends on an error (DESIGN s8):

- A clean message, for errors every rank learns about together (bad input, a bad file on one
  rank found before anyone communicates): every rank learns every rank's outcome, all raise
  `JobError`, rank 0 prints it once (`report_and_exit`) and every rank exits 1.
- An abort, when the failing rank cannot reach the others because they wait in a collective
  that it will never join: it prints ``tpquant: rank R failed during <phase>: <error>`` and
  calls MPI Abort, which ends every rank (`abort`).

`on_all_ranks` runs a step in a named region and decides between the two: an unexpected
exception (not in `EXPECTED`) aborts at once; an expected one is offered to the other ranks
for `AGREE_WAIT_S` seconds; if they all come (they finished the step or failed too) the job
ends cleanly, otherwise they sit in a collective of the step and the failing rank aborts.
`collective_region` does the same for code that is not a step (generation).

A rank killed outright (SIGKILL, out of memory) cannot say anything: the launcher notices
(mpirun names the rank and ends the job; under Slurm use `srun --kill-on-bad-exit=1`). NCCL
waits have no timeout of their own; the abort (or mpirun's teardown) ends those processes by
signal, which is what bounds them.
"""

from __future__ import annotations

import faulthandler
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tpquant.collectives import Communicator
from tpquant.engine.faults import inject

T = TypeVar("T")

# How long a rank with an expected error waits for the others to come and hear about it
# before concluding they are stuck in a collective and aborting. Ranks reach the end of the
# same step within seconds of each other; the bound keeps a failed job short.
AGREE_WAIT_S = 10.0
# How long an orderly exit may take (MPI finalize, NCCL teardown) before the process ends
# itself: a peer that is gone, or GPU work queued behind a collective, can block them.
EXIT_WAIT_S = 10.0


class JobError(Exception):
    """A failure every rank knows about; rank 0 reports it and the job exits non-zero."""


# What counts as bad input or a bad file: these are reported as messages, not tracebacks.
EXPECTED = (ValueError, KeyError, OSError, JobError)


def describe(error: BaseException) -> str:
    """One line for an error: its type and message."""
    return f"{type(error).__name__}: {error}"


def on_all_ranks(comm: Communicator, step: Callable[[], T], what: str,
                 wait_s: float = AGREE_WAIT_S) -> T:
    """Run `step` on every rank; if it failed anywhere, raise JobError on every rank.

    `what` names the region in messages ("calibrating") and is the fault-injection point
    (`tpquant.engine.faults`). An unexpected exception aborts the job from the failing rank;
    so does an expected one when the other ranks do not reach the end of the step within
    `wait_s` seconds (they wait in a collective of `step`).
    """
    error: BaseException | None = None
    result = None
    try:
        inject(what, comm.rank)
        result = step()
    except EXPECTED as e:
        error = e
    except Exception as e:  # noqa: BLE001 - a bug or a broken device: the job goes down
        abort(e, comm.rank, what)
    failed = _agree(comm, error, what, wait_s)
    if failed:
        distinct = {msg for _, msg in failed}
        if len(distinct) == 1 and len(failed) == comm.world_size:
            raise JobError(f"{what}: {failed[0][1]}")
        raise JobError(_listing(what, failed, comm.world_size))
    return result  # type: ignore[return-value]


@contextmanager
def collective_region(comm: Communicator, what: str,
                      wait_s: float = AGREE_WAIT_S) -> Iterator[None]:
    """Code that every rank runs in lockstep through collectives (generation, say).

    Costs nothing when it succeeds (no extra communication). On an exception this rank
    either aborts the job naming itself (unexpected errors, or expected ones the other ranks
    do not share within `wait_s`), or, when every rank failed, raises JobError everywhere.
    """
    try:
        inject(what, comm.rank)
        yield
    except JobError:
        raise  # already known to every rank
    except EXPECTED as e:
        failed = _agree(comm, e, what, wait_s)
        distinct = {msg for _, msg in failed}
        if len(distinct) == 1 and len(failed) == comm.world_size:
            raise JobError(f"{what}: {failed[0][1]}") from None
        raise JobError(_listing(what, failed, comm.world_size)) from None
    except Exception as e:  # noqa: BLE001
        abort(e, comm.rank, what)


def agree_on_error(comm: Communicator, error: BaseException, what: str,
                   wait_s: float = AGREE_WAIT_S) -> JobError:
    """An expected error raised outside any region: the JobError to report when every rank
    hears of it within `wait_s` (the original message if all ranks failed alike); otherwise
    this rank aborts the job."""
    failed = _agree(comm, error, what, wait_s)
    if len(failed) == comm.world_size and len({msg for _, msg in failed}) == 1:
        return JobError(str(error))
    return JobError(_listing(what, failed, comm.world_size))


def _listing(what: str, failed: list[tuple[int, str]], world_size: int) -> str:
    lines = "\n".join(f"  rank {r}: {msg}" for r, msg in failed)
    return f"{what} failed on {len(failed)} of {world_size} ranks:\n{lines}"


def _agree(comm: Communicator, error: BaseException | None, what: str,
           wait_s: float) -> list[tuple[int, str]]:
    """Every rank's failure of one step, as (rank, message), on every rank.

    A rank that failed waits at most `wait_s` for the others, then aborts; a rank that
    succeeded waits as long as it takes (if a peer failed and aborts, the abort ends it).
    """
    message = None if error is None else describe(error)
    if comm.world_size == 1:
        return [] if message is None else [(0, message)]
    flags = _failure_flags(comm, message is not None, None if error is None else wait_s)
    if flags is None:
        assert error is not None
        abort(error, comm.rank, what, traceback_too=False)
    # Everyone is here: the messages of the ranks that failed, one broadcast each.
    return [(r, comm.broadcast_object(message, root=r)) for r in range(comm.world_size) if flags[r]]


def _failure_flags(comm: Communicator, failed: bool, wait_s: float | None) -> list[bool] | None:
    """Every rank's "I failed" flag; None if they did not all arrive within wait_s.

    A non-blocking all-gather over the communicator's MPI communicator, polled: the only
    collective here that can give up. A peer stuck in another collective never matches it
    (MPI keeps non-blocking collectives' messages apart), and the caller aborts.
    """
    mpi_comm = getattr(comm, "mpi_comm", None)
    if mpi_comm is None:  # a backend without MPI: a plain exchange, unbounded
        return [comm.broadcast_object(failed, root=r) for r in range(comm.world_size)]
    import numpy as np

    mine = np.array([failed], dtype=np.uint8)
    every = np.zeros(comm.world_size, dtype=np.uint8)
    request = mpi_comm.Iallgather(mine, every)
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(0.002)
    return [bool(x) for x in every]


def report_and_exit(comm: Communicator | None, error: BaseException, code: int = 1) -> None:
    """Rank 0 prints `error`; every rank exits with `code` (all ranks must call this)."""
    if comm is None or comm.rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    if comm is not None and comm.world_size > 1:
        # If finalization blocks (a queued NCCL op whose peer is gone), end the process anyway.
        faulthandler.dump_traceback_later(EXIT_WAIT_S, exit=True)
    sys.exit(code)


def abort(error: BaseException, rank: int, what: str = "the job", code: int = 1,
          traceback_too: bool = True) -> None:
    """An unexpected failure on one rank: say which, then take the whole job down so that no
    rank waits forever in a collective (DESIGN s8). Does not return."""
    if traceback_too:
        traceback.print_exception(error)
    print(f"tpquant: rank {rank} failed during {what}: {describe(error)}", file=sys.stderr,
          flush=True)
    sys.stdout.flush()
    mpi = sys.modules.get("mpi4py.MPI")  # a job that never started MPI has nothing to abort
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() \
            and mpi.COMM_WORLD.Get_size() > 1:
        mpi.COMM_WORLD.Abort(code)
    sys.exit(code)
