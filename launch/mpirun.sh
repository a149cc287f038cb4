#!/usr/bin/env bash
# mpirun with the flags this project's machines need, set once here:
#  - as root, Open MPI refuses to start without --allow-run-as-root;
#  - more ranks than cores (CPU runs and CI) need --oversubscribe;
#  - each rank picks its GPU by its local rank (tpquant.parallel.mapping), so no binding
#    of CUDA_VISIBLE_DEVICES is needed here.
# Usage: launch/mpirun.sh -n 4 python -m tpquant.run [args...]
set -euo pipefail
flags=(--oversubscribe)
[ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"   # NVLink multicast off (shared hosts)
exec mpirun "${flags[@]}" "$@"
