#!/usr/bin/env bash
# mpirun with the flags this project's machines need, set once here:
#  - as root, Open MPI refuses to start without --allow-run-as-root;
#  - more ranks than cores (CPU runs and CI) need --oversubscribe;
#  - --bind-to none: each rank picks its GPU by its local rank (tpquant.parallel.mapping), so
#    no CUDA_VISIBLE_DEVICES juggling is needed; Open MPI's default would pin each rank to one
#    core, which starves torch's CPU threads and leaves NCCL no room to place its own threads
#    on the CPUs next to the rank's GPU (it intersects its choice with the process's affinity);
#  - OMP_NUM_THREADS, when unset: the cores divided among the ranks started here, since torch
#    otherwise starts one thread per core in every rank (ranks x cores threads on one node).
#    It counts all -n ranks on this node, which is right for the single-node jobs this wrapper
#    starts; set it yourself for an mpirun spanning several nodes;
#  - -x for the variables ranks on other nodes need (Open MPI forwards the whole environment
#    only to local ranks; Slurm's srun forwards it everywhere, ssh does not);
#  - NCCL_NVLS_ENABLE=0: NVLink multicast off (shared hosts); NCCL_DEBUG=WARN: NCCL's
#    warnings, not its INFO chatter.
# Usage: launch/mpirun.sh -n 4 python -m tpquant.run [args...]
set -euo pipefail
flags=(--oversubscribe --bind-to none)
[ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

if [ -z "${OMP_NUM_THREADS:-}" ]; then
  ranks=1 args=("$@")
  for ((i = 0; i + 1 < ${#args[@]}; i++)); do
    case "${args[i]}" in -n | -np | --np | -c) [[ ${args[i + 1]} =~ ^[0-9]+$ ]] && ranks=${args[i + 1]} ;; esac
  done
  threads=$(($(nproc) / (ranks > 0 ? ranks : 1)))
  export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi

for name in $(compgen -e); do
  case "$name" in
    TPQUANT_* | NCCL_* | CUDA_* | HF_* | OMP_NUM_THREADS | PATH | LD_LIBRARY_PATH | PYTHONPATH | VIRTUAL_ENV)
      flags+=(-x "$name") ;;
  esac
done
exec mpirun "${flags[@]}" "$@"
