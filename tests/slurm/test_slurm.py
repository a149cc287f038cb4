"""The sbatch templates in launch/slurm/, run for real on a private Slurm on localhost.

The cluster (tests/slurm/local_cluster.py) has two node names on this host, so one allocation
can span "two nodes": build.sbatch builds the default model at TP 2 with 2 ranks, run.sbatch
answers the default chat question on one node (through mpirun, then through srun --mpi=pmix),
and run_multinode.sbatch runs one TP-2 replica on each of the two nodes. The daemons are
started here and stopped (with every job process) when the module ends, pass or fail. The
module skips, with the command that refused and its output, when Slurm is not installed or a
daemon does not come up.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .local_cluster import LocalSlurm, SlurmUnavailable

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "launch" / "slurm"
QUESTION = "What is the capital of France?"  # tpquant.run's default question
NO_GPUS = ["--gpus-per-node=0"]  # the templates ask for GPUs; the local nodes have none
SHORT = ["--max-new-tokens", "16"]  # "The capital of France is Paris." and the end token fit
JOB_TIMEOUT = 600


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    if os.getuid() != 0:
        pytest.skip(f"the local Slurm needs root (slurmd starts job steps as their owner); "
                    f"this is uid {os.getuid()}")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=("tpq1", "tpq2"))
    try:
        slurm.start()
    except SlurmUnavailable as e:
        slurm.stop()
        pytest.skip(f"no local Slurm: {e}")
    try:
        yield slurm
    finally:
        slurm.stop()


def _submit(cluster: LocalSlurm, script: str, options: list[str], args: list[str], out: Path,
            **settings: str) -> str:
    """Run a template with sbatch, waiting for it, from the repository root; the job's output.
    `args` go to the template, which hands them to tpquant."""
    env = {"VENV": sys.prefix, "TPQUANT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TPQUANT_CACHE": str(out.parent / "cache"), **settings}
    status, log = cluster.sbatch(TEMPLATES / script, options, args, out, ROOT, JOB_TIMEOUT,
                                 **env)
    assert status == 0, f"{script} failed:\n{log[-4000:]}"
    return log


@pytest.fixture(scope="module")
def engine(cluster: LocalSlurm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model built at TP 2 by build.sbatch (its default: 2 tasks on one node)."""
    out = tmp_path_factory.mktemp("build")
    engine = out / "engine"
    log = _submit(cluster, "build.sbatch", [], [], out / "build.out", ENGINE=str(engine))
    assert f"built {engine} (fp16, tp 2" in log, log[-4000:]
    assert sorted(p.name for p in engine.glob("rank*.engine")) == ["rank0.engine", "rank1.engine"]
    return engine


def test_run_one_node_mpirun(cluster: LocalSlurm, engine: Path, tmp_path: Path) -> None:
    log = _submit(cluster, "run.sbatch", NO_GPUS, SHORT, tmp_path / "run.out",
                  ENGINE=str(engine))
    assert "Paris" in log and "[tpquant] tp 2 on cpu" in log, log[-4000:]


def test_run_one_node_srun_pmix(cluster: LocalSlurm, engine: Path, tmp_path: Path) -> None:
    plugins = cluster.client(["srun", "--mpi=list"], timeout=60)
    listing = plugins.stdout + plugins.stderr
    if "pmix" not in listing or "error" in listing:
        pytest.skip(f"Slurm's PMIx plugin is not usable (Debian: apt-get install libpmix-dev); "
                    f"`srun --mpi=list` says: {listing.strip()}")
    log = _submit(cluster, "run.sbatch", NO_GPUS, SHORT, tmp_path / "run.out",
                  ENGINE=str(engine), LAUNCHER="srun", PROMPT=QUESTION)
    assert "Paris" in log and "[tpquant] tp 2 on cpu" in log, log[-4000:]


def test_run_two_nodes_one_replica_each(cluster: LocalSlurm, engine: Path,
                                        tmp_path: Path) -> None:
    """Three prompts dealt over two replicas: replica 0 answers the 1st and 3rd as a batch
    (each printed under "### prompt"), replica 1 the 2nd alone (printed bare)."""
    prompts = [QUESTION, QUESTION, "Name the capital of France."]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    log = _submit(cluster, "run_multinode.sbatch", NO_GPUS, SHORT, tmp_path / "run.out",
                  ENGINE=str(engine), PROMPTS_FILE=str(tmp_path / "prompts.txt"))
    replicas: dict[tuple[int, str], list[str]] = {}
    for line in log.splitlines():
        match = re.match(r"\[replica (\d) (\S+)\] (.*)", line)
        if match:
            replicas.setdefault((int(match[1]), match[2]), []).append(match[3])
    assert sorted(replicas) == [(0, "tpq1"), (1, "tpq2")], log[-4000:]
    first, second = ("\n".join(replicas[key]) for key in sorted(replicas))
    headers = [line for line in first.splitlines() if line.startswith("### ")]
    assert headers == [f"### {prompts[0]}", f"### {prompts[2]}"], first
    assert "###" not in second, second
    for text in (first, second):
        assert "Paris" in text and "[tpquant] tp 2 on cpu" in text, text
