"""Fault injection for the failure tests: make one rank fail at a named point of a real job.

    TPQUANT_FAULT="rank=1,phase=calibrate,kind=raise" mpirun -n 2 python -m tpquant.build ...

The variable is read here only, by `inject`, which the collective regions of
`tpquant.engine.collective` (`on_all_ranks`, `collective_region`) call as they start, with
their name. Unset (the normal case), `inject` does nothing.

Fields (comma-separated key=value, all three required):
- rank: the global rank that fails.
- phase: a region name (`what` of on_all_ranks / collective_region), or one of the short
  names in `PHASES` (build, calibrate, generate, ...).
- kind: `raise` (RuntimeError: an unexpected failure, as a bug would give), `error`
  (ValueError: a "bad input" error that only this rank sees, the kind `on_all_ranks` reports
  as a message), or `kill` (SIGKILL: the process vanishes without a word).

Before failing, the rank prints one line with the wall-clock time, so a test can measure how
long the job took to end after the fault.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

ENV = "TPQUANT_FAULT"
KINDS = ("raise", "error", "kill")
# Short names -> the region names the build and run use (tpquant/engine/build.py, tpquant/run.py).
PHASES = {
    "checkpoint": "opening the checkpoint",
    "calibrate": "calibrating",
    "build": "building the engine",
    "load": "loading the engine",
    "prompts": "reading the prompts",
    "generate": "generation",
}


class InjectedFault(RuntimeError):
    """The failure `kind=raise` injects."""


class InjectedError(ValueError):
    """The failure `kind=error` injects: an expected-looking error on one rank only."""


@dataclass(frozen=True)
class Fault:
    """Where and how one rank fails."""

    rank: int
    phase: str  # a region name, short names already resolved
    kind: str

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Parse "rank=R,phase=P,kind=K"; ValueError naming what is wrong."""
        fields: dict[str, str] = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ValueError(f"{ENV}={spec!r}: {item!r} is not key=value")
            fields[key.strip()] = value.strip()
        unknown = set(fields) - {"rank", "phase", "kind"}
        missing = {"rank", "phase", "kind"} - set(fields)
        if unknown or missing:
            raise ValueError(f"{ENV}={spec!r}: needs exactly rank, phase and kind "
                             f"(unknown {sorted(unknown)}, missing {sorted(missing)})")
        if not fields["rank"].isdigit():
            raise ValueError(f"{ENV}={spec!r}: rank must be a non-negative int")
        if fields["kind"] not in KINDS:
            raise ValueError(f"{ENV}={spec!r}: kind must be one of {', '.join(KINDS)}")
        phase = PHASES.get(fields["phase"], fields["phase"])
        return cls(int(fields["rank"]), phase, fields["kind"])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Fault | None:
        spec = environ.get(ENV, "").strip()
        return cls.parse(spec) if spec else None

    def fire(self) -> None:
        """Fail now, the configured way."""
        print(f"tpquant: injecting fault kind={self.kind} on rank {self.rank} at "
              f"{self.phase!r}, time {time.time():.3f}", file=sys.stderr, flush=True)
        if self.kind == "kill":
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "error":
            raise InjectedError(f"injected error on rank {self.rank} at {self.phase}")
        raise InjectedFault(f"injected fault on rank {self.rank} at {self.phase}")


def inject(phase: str, rank: int, environ: Mapping[str, str] = os.environ) -> None:
    """Fail here if $TPQUANT_FAULT names this phase and rank; otherwise do nothing."""
    fault = Fault.from_env(environ)
    if fault is not None and fault.rank == rank and fault.phase == phase:
        fault.fire()
