"""One rank fails during a real mpirun job: the whole job ends, non-zero, soon, naming the rank.

Faults are injected through TPQUANT_FAULT (tpquant/engine/faults.py) at the named regions of
the build and the run: `raise` (an unexpected exception: the rank aborts the job at once),
`error` (an expected-looking ValueError on that rank alone, while the other rank waits in a
collective of the same step: the rank gives up waiting and aborts) and `kill` (SIGKILL:
mpirun notices and ends the job). Each job is timed from the fault (the rank prints the time
as it fires) to mpirun's exit.

The default model at TP 2; one engine is built once for the generation cases.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpquant.engine.faults import PHASES, Fault

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = [str(ROOT / "launch" / "mpirun.sh")]
TIMEOUT = 240  # s; a job that hangs fails here
ENDS_WITHIN_S = 30  # after the fault
FAULT_LINE = re.compile(
    r"tpquant: injecting fault kind=(\w+) on rank (\d+) at '([^']*)', time ([0-9.]+)")


def _job(fault: str, module: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [*MPIRUN, "-n", "2", sys.executable, "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TPQUANT_FAULT": fault}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return result, time.time()


def _ended_soon_naming_rank(result: subprocess.CompletedProcess, ended: float, kind: str,
                            phase: str) -> None:
    output = result.stdout + result.stderr
    fired = FAULT_LINE.search(output)
    assert fired, f"the fault did not fire:\n{output[-3000:]}"
    assert fired.groups()[:3] == (kind, "1", phase), fired.group(0)
    assert result.returncode != 0, output[-3000:]
    took = ended - float(fired.group(4))
    assert took < ENDS_WITHIN_S, f"the job took {took:.1f} s to end after the fault"
    if kind == "kill":  # Open MPI's launcher (prterun/mpirun) names the rank and the signal
        assert re.search(r"process rank 1 with PID \d+ on node \S+ exited on\s+signal 9", output), \
            output[-3000:]
    else:
        assert f"tpquant: rank 1 failed during {phase}: " in output, output[-3000:]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    # A session-wide path: a module that builds the same engine there (same build key) gets
    # it reused instead of rebuilt (tpquant.engine.build.build_engine).
    out = tmp_path_factory.getbasetemp() / "engine-int8_wo-bfloat16-tp2"
    result = subprocess.run(
        [sys.executable, "-m", "tpquant.build", "--quant", "int8_wo", "--dtype", "bfloat16",
         "--tp", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_fault_during_build(kind, tmp_path):
    result, ended = _job(f"rank=1,phase=build,kind={kind}", "tpquant.build",
                         "--quant", "int8_wo", "--out", str(tmp_path / "e"))
    _ended_soon_naming_rank(result, ended, kind, PHASES["build"])
    assert not (tmp_path / "e" / "config.json").exists()  # no engine claims to be complete


@pytest.mark.parametrize("kind", ["raise", "kill", "error"])
def test_fault_during_calibration(kind, tmp_path):
    """`error`: the gap of issue 4 (an error on one rank while the other sits in calibration's
    all_reduce) must end the job too, not leave rank 0 waiting."""
    result, ended = _job(f"rank=1,phase=calibrate,kind={kind}", "tpquant.build",
                         "--quant", "w8a8_token", "--out", str(tmp_path / "e"))
    _ended_soon_naming_rank(result, ended, kind, PHASES["calibrate"])


@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_fault_during_generation(kind, engine):
    result, ended = _job(f"rank=1,phase=generate,kind={kind}", "tpquant.run", "--engine",
                         str(engine), "--no-verify", "--max-new-tokens", "4", "--prompt", "Hello")
    _ended_soon_naming_rank(result, ended, kind, PHASES["generate"])


# -- the fault specification (no job) -------------------------------------------------------


def test_fault_spec_parses_and_resolves_short_phases():
    assert Fault.parse("rank=1,phase=calibrate,kind=kill") == Fault(1, "calibrating", "kill")
    assert Fault.parse(" rank=0 , phase=loading the engine , kind=error ") == \
        Fault(0, "loading the engine", "error")
    assert Fault.from_env({}) is None
    assert Fault.from_env({"TPQUANT_FAULT": "rank=2,phase=generate,kind=raise"}) == \
        Fault(2, "generation", "raise")


@pytest.mark.parametrize("spec, needle", [
    ("rank=1,phase=build", "missing ['kind']"),
    ("rank=1,phase=build,kind=explode", "kind must be one of"),
    ("rank=-1,phase=build,kind=raise", "rank must be a non-negative int"),
    ("rank=1,phase=build,kind=raise,when=now", "unknown ['when']"),
    ("rank1,phase=build,kind=raise", "is not key=value"),
])
def test_bad_fault_spec_is_refused_by_name(spec, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        Fault.parse(spec)


# -- the regions in one process (world size 1: no peers to wait for) ------------------------


def test_expected_error_in_a_step_becomes_a_job_error(monkeypatch):
    from tpquant.collectives import SingleProcessCommunicator
    from tpquant.engine.collective import JobError, on_all_ranks

    comm = SingleProcessCommunicator()
    assert on_all_ranks(comm, lambda: 7, "adding") == 7
    with pytest.raises(JobError, match=r"^reading: ValueError: bad byte$"):
        on_all_ranks(comm, lambda: (_ for _ in ()).throw(ValueError("bad byte")), "reading")
    monkeypatch.setenv("TPQUANT_FAULT", "rank=0,phase=calibrate,kind=error")
    with pytest.raises(JobError, match=r"^calibrating: InjectedError: injected error on rank 0"):
        on_all_ranks(comm, lambda: 7, "calibrating")
    assert on_all_ranks(comm, lambda: 8, "building the engine") == 8  # another phase: no fault


def test_unexpected_error_names_the_rank_and_exits(capsys):
    from tpquant.collectives import SingleProcessCommunicator
    from tpquant.engine.collective import collective_region

    with pytest.raises(SystemExit) as exit_info:
        with collective_region(SingleProcessCommunicator(), "generation"):
            raise RuntimeError("device lost")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "tpquant: rank 0 failed during generation: RuntimeError: device lost" in err
