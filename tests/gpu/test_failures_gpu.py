"""One rank fails while the other waits in a GPU all-reduce: the job still ends, soon, non-zero.

Each case starts its own `launch/mpirun.sh -n 2` job of this file's worker (one rank per
GPU). Rank 0 launches all-reduces and waits for them on the GPU (`torch.cuda.synchronize`);
rank 1 joins late and fails as TPQUANT_FAULT says (tpquant/engine/faults.py): `raise`, `error`
(a ValueError on rank 1 alone) or `kill` (SIGKILL). NCCL itself has no timeout: what ends
rank 0 is rank 1's MPI Abort, or mpirun's teardown after the kill (tpquant/engine/collective.py).
`async`: rank 0 only queues its all-reduce and reaches the error exchange, so the job takes the
clean path (rank 0 prints one message) while an all-reduce that will never complete is still
queued on its GPU; the exit must not hang on it.

Run with plain pytest on a machine with 2 GPUs (it starts mpirun itself, so it skips when
already inside an MPI job, as under tests/gpu/run_on_device.sh):

    python -m pytest -q -p no:cacheprovider tests/gpu/test_failures_gpu.py

Writes each job's output to $OUT/failures_gpu_<case>.log and the timings to
$OUT/failures_gpu.json (OUT defaults to /tmp/out).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
ENDS_WITHIN_S = 30  # after the fault
FAULT_LINE = re.compile(
    r"tpquant: injecting fault kind=(\w+) on rank (\d+) at '([^']*)', time ([0-9.]+)")
REGION = "all-reduce test"


def _worker(mode: str, numel: int, dtype: str) -> None:
    """One rank of the job: warm the communicator up, then meet the fault (see module doc)."""
    from tpquant.engine.collective import collective_region, on_all_ranks
    from tpquant.engine.job import Job, run_job

    def main(job: Job) -> None:
        x = torch.ones(numel, device=job.device, dtype=getattr(torch, dtype))
        job.comm.all_reduce(x)  # NCCL connects on first use: not inside the test
        torch.cuda.synchronize(job.device)
        job.comm.barrier()
        if job.comm.rank == 1:
            time.sleep(3)  # rank 0 is inside its all-reduce by now
        if mode == "async":
            on_all_ranks(job.comm, lambda: job.comm.all_reduce(x), REGION)
        else:
            with collective_region(job.comm, REGION):
                for _ in range(10):
                    job.comm.all_reduce(x)
                torch.cuda.synchronize(job.device)
        print(f"rank {job.comm.rank}: not failed", flush=True)

    run_job(main, use_gpu=True, what=REGION)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    sys.exit(0)

import pytest  # noqa: E402 - the worker above needs only torch and tpquant

pytestmark = [pytest.mark.gpu]

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs", allow_module_level=True)
if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
    pytest.skip("starts its own mpirun: run with plain pytest, not under mpirun",
                allow_module_level=True)
nccl = pytest.importorskip("cupy.cuda.nccl", reason="needs CuPy (cupy-cuda12x/13x)")

OUT = Path(os.environ.get("OUT", "/tmp/out"))
RESULTS: dict[str, dict] = {}


def _job(case: str, mode: str, fault: str, all_reduce: str) -> tuple[str, int, float]:
    # NCCL: 16 MiB, beyond a custom all-reduce's workspace; auto: 16 KiB, the custom one-shot's;
    # push: 8 KiB of bfloat16
    numel = 1 << 22 if all_reduce == "nccl" else 1 << 12
    dtype = "bfloat16" if all_reduce == "push" else "float32"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TPQUANT_FAULT": fault,
           "TPQUANT_ALLREDUCE": all_reduce,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [str(ROOT / "launch" / "mpirun.sh"), "-n", "2", sys.executable, str(Path(__file__)), mode,
           str(numel), dtype]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    ended = time.time()
    output = result.stdout + result.stderr
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"failures_gpu_{case}.log").write_text(output)
    return output, result.returncode, ended


@pytest.mark.parametrize("case, mode, kind, all_reduce", [
    ("nccl_raise", "region", "raise", "nccl"),
    ("nccl_error", "region", "error", "nccl"),
    ("nccl_kill", "region", "kill", "nccl"),
    ("auto_raise", "region", "raise", "auto"),
    ("push_raise", "region", "raise", "push"),
    ("nccl_async_error", "async", "error", "nccl"),
])
def test_rank_fails_while_the_other_waits_in_an_all_reduce(case, mode, kind, all_reduce):
    output, code, ended = _job(case, mode, f"rank=1,phase={REGION},kind={kind}", all_reduce)
    fired = FAULT_LINE.search(output)
    took = ended - float(fired.group(4)) if fired else None
    RESULTS[case] = {"returncode": code, "seconds_after_fault": took, "fired": bool(fired)}
    (OUT / "failures_gpu.json").write_text(json.dumps(RESULTS, indent=2))
    assert fired and fired.groups()[:3] == (kind, "1", REGION), output[-3000:]
    assert code != 0, output[-3000:]
    assert took < ENDS_WITHIN_S, f"the job took {took:.1f} s to end after the fault"
    assert "rank 0: not failed" not in output, output[-3000:]
    if kind == "kill":
        assert re.search(r"process rank 1 with PID \d+ on node \S+ exited on\s+signal 9", output), \
            output[-3000:]
    elif mode == "async":  # every rank reached the exchange: rank 0 reports rank 1's error once
        assert f"error: {REGION} failed on 1 of 2 ranks" in output, output[-3000:]
        assert "rank 1: InjectedError" in output, output[-3000:]
    else:
        assert f"tpquant: rank 1 failed during {REGION}: " in output, output[-3000:]
