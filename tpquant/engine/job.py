"""The job around a CLI: this rank's mapping, device and communicator, and how it ends.

Errors every rank knows about (bad arguments, a JobError from `on_all_ranks`) are printed
once by rank 0 and every rank exits 1. Anything else is unexpected: the failing rank prints
its traceback and aborts the whole MPI job, so no rank is left waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tpquant.collectives import Communicator, make_communicator
from tpquant.engine.collective import EXPECTED, abort, report_and_exit
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


def run_job(main: Callable[[Job], None], use_gpu: bool = True) -> None:
    job = None
    try:
        job = start_job(use_gpu)
        main(job)
    except EXPECTED as e:
        report_and_exit(job.comm if job else None, e)
    except Exception as e:  # noqa: BLE001 - anything else takes the job down
        abort(e, job.mapping.rank if job else 0)
