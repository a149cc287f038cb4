# Sourced by the sbatch templates in this folder: the repository, the venv, TP and the
# launcher, decided once here. Not a job script itself.
#
# Settings (environment variables, all optional):
#   TPQUANT_ROOT  the repository (default: the directory sbatch was run from)
#   VENV          the virtual environment to activate (default: $TPQUANT_ROOT/.venv; if that
#                 does not exist the python already on PATH is used, e.g. from a module)
#   TP            tensor-parallel size = ranks per node (default: the job's tasks per node)
#   CHECKPOINT, QUANT   what to build (default: SmolLM2-135M-Instruct, fp16)
#   ENGINE        engine directory (default: $TPQUANT_ROOT/engines/<checkpoint>-<quant>-tp<TP>)
#   LAUNCHER      mpirun (default: the venv's Open MPI, launch/mpirun.sh; inside an allocation
#                 it takes the nodes and slots from Slurm and starts its daemons with srun) or
#                 srun (direct launch: srun --mpi=$SRUN_MPI, default pmix; needs Slurm's PMIx
#                 plugin and an MPI built with PMIx, which Open MPI 5 always is)

die() {
  echo "tpquant slurm: $*" >&2
  exit 2
}

[ -n "${SLURM_JOB_ID:-}" ] || die "run this through sbatch (SLURM_JOB_ID is not set)"
TPQUANT_ROOT=${TPQUANT_ROOT:-$SLURM_SUBMIT_DIR}
[ -f "$TPQUANT_ROOT/launch/mpirun.sh" ] ||
  die "no tpquant repository at TPQUANT_ROOT=$TPQUANT_ROOT: submit from the repository root or set TPQUANT_ROOT"

if [ -f "${VENV:-$TPQUANT_ROOT/.venv}/bin/activate" ]; then
  . "${VENV:-$TPQUANT_ROOT/.venv}/bin/activate"
elif [ -n "${VENV:-}" ]; then
  die "VENV=$VENV has no bin/activate"
fi
python -c "import tpquant" 2>/dev/null ||
  die "$(command -v python || echo python) cannot import tpquant: set VENV to the project's venv"

# Slurm gives SLURM_NTASKS_PER_NODE only when --ntasks-per-node was asked for.
tasks_per_node=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))}
TP=${TP:-$tasks_per_node}
[ "$TP" = "$tasks_per_node" ] ||
  die "TP=$TP but the job has $tasks_per_node tasks per node: submit with --ntasks-per-node=$TP (and --gpus-per-node=$TP)"

QUANT=${QUANT:-fp16}
checkpoint_name=$(basename "${CHECKPOINT:-SmolLM2-135M-Instruct}")
ENGINE=${ENGINE:-$TPQUANT_ROOT/engines/${checkpoint_name%.gguf}-$QUANT-tp$TP}

# Torch starts one thread per core in every rank; share the node's CPUs among the TP ranks.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(((SLURM_CPUS_ON_NODE / TP) > 0 ? SLURM_CPUS_ON_NODE / TP : 1))}
export PYTHONUNBUFFERED=1 # rank 0's lines reach the job's output as they are printed

# tp_launch INDEX COMMAND...: TP ranks of COMMAND on node INDEX (0-based) of the allocation,
# one tensor-parallel group. Ranks pick their GPU by local rank (tpquant.parallel.mapping).
tp_launch() {
  local index=$1 node
  shift
  node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n "$((index + 1))p")
  case "${LAUNCHER:-mpirun}" in
    mpirun) "$TPQUANT_ROOT/launch/mpirun.sh" -n "$TP" --host "$node:$TP" "$@" ;;
    srun) srun --nodes=1 --ntasks="$TP" --relative="$index" --exact --mpi="${SRUN_MPI:-pmix}" "$@" ;;
    *) die "LAUNCHER=$LAUNCHER: use mpirun or srun" ;;
  esac
}
