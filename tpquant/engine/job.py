"""The job around a CLI: this rank's mapping, device and communicator, and how it ends.

Errors every rank knows about (bad arguments, a JobError from `on_all_ranks`) are printed
once by rank 0 and every rank exits 1. An expected error (bad input) that one rank raises
outside any region is offered to the other ranks (`agree_on_error`): reported the same way
when they hear of it, otherwise the rank aborts the job. Anything else is unexpected: the
failing rank prints its traceback and one line naming itself, and aborts the whole MPI job,
so no rank is left waiting (tpquant/engine/collective.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tpquant.collectives import Communicator, make_communicator
from tpquant.engine.collective import EXPECTED, JobError, abort, agree_on_error, report_and_exit
from tpquant.parallel.mapping import Mapping


@dataclass(frozen=True)
class Job:
    mapping: Mapping
    device: torch.device
    comm: Communicator


def start_job(use_gpu: bool = True) -> Job:
    """Rank and GPU from the launcher (mpirun, Slurm) environment; NCCL on GPUs, MPI on CPUs."""
    mapping = Mapping.from_env()
    device = mapping.device() if use_gpu else torch.device("cpu")
    return Job(mapping, device, make_communicator(mapping, device))


def run_job(main: Callable[[Job], None], use_gpu: bool = True, what: str = "the job") -> None:
    """Start the job and run `main(job)` on this rank; end every rank on any rank's error.

    `what` names the work in the abort line of a failure outside any named region."""
    job = None
    try:
        job = start_job(use_gpu)
        main(job)
    except JobError as e:
        report_and_exit(job.comm if job else None, e)
    except EXPECTED as e:
        if job is None:  # no communicator yet: every rank fails to start the same way
            report_and_exit(None, e)
        else:
            report_and_exit(job.comm, agree_on_error(job.comm, e, what))
    except Exception as e:  # noqa: BLE001 - anything else takes the job down
        abort(e, job.mapping.rank if job else 0, what)
