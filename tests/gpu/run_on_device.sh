#!/usr/bin/env bash
# The GPU test run, as sent to the device machine (2 GPUs): NCCL collectives and the layer
# tests on CUDA tensors, under mpirun. pytest-mpi travels as a wheel in .whl/ (not in the image).
set -uo pipefail
export PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/pytest_mpi*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi -L; python3 -c "import torch, cupy; from cupy.cuda import nccl; print('torch', torch.__version__, 'cupy', cupy.__version__, 'nccl', nccl.get_version())"
status=0
for n in 1 2; do
  echo "== mpirun -n $n"
  mpirun --allow-run-as-root -n "$n" python3 -m pytest --with-mpi -p no:cacheprovider -q \
    tests/gpu tests/mpi/test_layers.py tests/mpi/test_collectives.py 2>&1 | tee "$out/gpu_tests_n$n.log" \
    | grep -aE "passed|failed|error" || true
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
exit $status
