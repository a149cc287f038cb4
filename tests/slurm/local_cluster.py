"""A private Slurm cluster on localhost for tests: one slurmctld and one slurmd per node name.

Several node names on one host (each slurmd started with ``-N NAME`` on its own port) give a
"multi-node" allocation on a single machine, enough to run the multi-node template for real.
Authentication is ``auth/none`` (Slurm 22.05 still ships it), so no munge daemon is needed;
everything lives in one temporary directory, named by a generated ``slurm.conf`` that the
daemons, the clients and every job process see as ``SLURM_CONF``. `stop` ends all of them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scancel", "srun", "scontrol")
# Launcher variables of an enclosing job must not leak into the jobs of this cluster.
_FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMIX_", "PRTE_", "PMI_")


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed here, or a daemon refused to start; the message says which."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} is empty)"


class LocalSlurm:
    """slurmctld + one slurmd per name in `nodes`, all on this host, configured under `root`."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("tpq1",)) -> None:
        self.root = root
        self.nodes = nodes
        self.conf = root / "slurm.conf"
        self._daemons: list[tuple[list[str], subprocess.Popen, Path]] = []

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment for the clients and jobs, pointed at this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
        return {**env, "SLURM_CONF": str(self.conf), **extra}

    def write_conf(self) -> None:
        user = pwd.getpwuid(os.getuid()).pw_name
        cpus = os.cpu_count() or 1
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=tpquanttest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/none",
            "CredType=cred/none",
            # No cgroups, no accounting: nothing outside the temporary directory.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MessageTimeout=60",
            "KillWait=5",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool-%n'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd-%n.log'}",
        ]
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
                         f"Port={_free_port()} CPUs={cpus} RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName=local Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> None:
        """Start the daemons and wait until every node is idle; SlurmUnavailable if not."""
        programs = {p: _which(p) for p in DAEMONS + CLIENTS}
        missing = [p for p, path in programs.items() if path is None]
        if missing:
            raise SlurmUnavailable(f"Slurm is not installed: {', '.join(missing)} not on PATH "
                                   "(Debian: apt-get install slurm-wlm)")
        self.write_conf()
        self._spawn([programs["slurmctld"], "-D", "-f", str(self.conf)], "slurmctld")
        for node in self.nodes:
            (self.root / f"spool-{node}").mkdir(exist_ok=True)
            self._spawn([programs["slurmd"], "-D", "-N", node, "-f", str(self.conf)],
                        f"slurmd-{node}")
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            for command, process, out in self._daemons:
                if process.poll() is not None:
                    raise SlurmUnavailable(
                        f"`{' '.join(command)}` exited with status {process.returncode}:\n"
                        f"{_tail(out)}")
            sinfo = self.client(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=30)
            states = (sinfo.stdout + sinfo.stderr).strip()
            idle = {line.split()[0] for line in states.splitlines() if line.endswith(" idle")}
            if idle == set(self.nodes):
                return
            time.sleep(0.5)
        logs = "\n".join(f"{out.name}: {_tail(out, 600)}" for _, _, out in self._daemons)
        raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s; `sinfo -N` says:\n"
                               f"{states}\n{logs}")

    def _spawn(self, command: list[str], name: str) -> None:
        out = self.root / f"{name}.out"
        with out.open("wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                       env=self.env(), start_new_session=True)
        self._daemons.append((command, process, out))

    def client(self, command: list[str], timeout: float, **extra_env: str
               ) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(command, env=self.env(**extra_env), capture_output=True,
                              text=True, timeout=timeout)

    def sbatch(self, script: Path, options: list[str], args: list[str], output: Path,
               cwd: Path, timeout: float, **extra_env: str) -> tuple[int, str]:
        """Submit `sbatch [options] script [args]` and wait for the job to end: (its exit
        status, sbatch's and the job's output). Waits like ``sbatch --wait`` but polls every
        half second; sbatch's own wait backs off to 32 s between polls, which would add about
        half a minute to every job here."""
        submit = subprocess.run(
            ["sbatch", "--parsable", f"--output={output}", *options, str(script), *args],
            cwd=cwd, env=self.env(**extra_env), capture_output=True, text=True, timeout=60)
        said = f"sbatch: {submit.stdout}{submit.stderr}"
        if submit.returncode != 0:
            return submit.returncode, said
        job = submit.stdout.strip().split(";")[0]
        state, status = self._wait(job, timeout)
        text = output.read_text(errors="replace") if output.exists() else "(no job output)"
        return status, f"{said}job {job}: {state}\n--- job output ---\n{text}"

    def _wait(self, job: str, timeout: float) -> tuple[str, int]:
        """(final state, exit status) of `job`; cancels it after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.client(["scontrol", "-o", "show", "job", job], timeout=30).stdout
            fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
            state = fields.get("JobState", "UNKNOWN")
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "UNKNOWN"):
                status, signal_number = (int(x) for x in fields["ExitCode"].split(":"))
                failed = state != "COMPLETED"
                return state, status or signal_number or int(failed)
            if time.monotonic() > deadline:
                self.client(["scancel", job], timeout=30)
                return f"{state}, cancelled after {timeout:.0f} s", 124
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then kill anything still running that was
        started for this cluster (job steps, ranks: their environment names our SLURM_CONF)."""
        if self._daemons and all(p.poll() is None for _, p, _ in self._daemons):
            try:
                self.client(["scancel", "--user", pwd.getpwuid(os.getuid()).pw_name], timeout=30)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.client(
                        ["squeue", "-h", "-o", "%i"], timeout=30).stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for _, process, _ in reversed(self._daemons):  # the slurmds first, then slurmctld
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._daemons.clear()
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftover_pids(self) -> list[int]:
        """Live processes (not this one) whose environment holds this cluster's SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0") and \
                        "State:\tZ" not in (proc / "status").read_text():
                    pids.append(int(proc.name))
            except OSError:  # gone, or not ours to read
                continue
        return pids


def _which(program: str) -> str | None:
    """`program`'s path; the daemons live in /usr/sbin, which a non-root PATH may lack."""
    return shutil.which(program, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
