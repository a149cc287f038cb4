#!/usr/bin/env bash
# The project's test command: plain tests, then the MPI tests under real ranks.
# Exits non-zero when any test fails or when a stage collects no test (pytest's exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== unit and CLI tests (one process; the CLI tests start their own mpirun jobs; GPU tests skip without CUDA)"
python -m pytest tests/unit tests/cli tests/gpu -q "$@"

for n in 2 3; do
  echo "== MPI tests, mpirun -n $n"
  launch/mpirun.sh -n "$n" python -m pytest --with-mpi tests/mpi -q -p no:cacheprovider "$@"
done

echo "== Slurm templates (launch/slurm) on a private Slurm on localhost; skips with the reason without slurm-wlm"
python -m pytest tests/slurm -q -p no:cacheprovider "$@"
