#!/usr/bin/env bash
# The GPU runs, as sent to the device machine (nvidia-h200-x4: 4 x H200) through the device
# tool, carrying .whl/ (pytest-mpi and gguf wheels; the image lacks both).
#
#   bash tests/gpu/run_on_device.sh STAGE...   with STAGE among
#     kernels     the kernel tests (1 GPU)
#     allreduce   NCCL and custom all-reduce tests, and the layers over them (2 and 4 ranks)
#     failures    a rank that raises or is killed while others sit in NCCL / custom all-reduce
#     model       the model tests (1, 3 and 4 ranks)
#     bench       bench_gemm, bench_allreduce (TP 2, 4), bench_decode (TP 1, 2, 4)
#     quick       the same benchmarks in their --quick forms
#
# SmolLM2's GGUF (94 MB) is too large to travel in one call: the model tests look for it at
# $TPQUANT_SMOLLM2_GGUF, put together beforehand from parts sent in two calls (see
# docs/benchmarks.md). Logs and JSON go to $OUT/r/ and come back as $OUT/results.tgz.
set -uo pipefail
export PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
out=${OUT:-/tmp/out}; r="$out/r"; mkdir -p "$r"; export OUT="$r"
ngpu=$(nvidia-smi -L | wc -l)
nvidia-smi -L; git log --oneline -1 2>/dev/null
python3 -c "import torch, cupy, triton; from cupy.cuda import nccl; print('torch', torch.__version__, 'cupy', cupy.__version__, 'nccl', nccl.get_version(), 'triton', triton.__version__)"
status=0

step() {  # step NAME CMD...: run, log to $r/NAME.log, print the log's last lines
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  timeout -k 10 "${STEP_TIMEOUT:-300}" bash -c '"$@"' _ "$@" >"$r/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-4}" "$r/$name.log" | cut -c1-300
  echo "   -> rc=$rc, $((SECONDS - t0)) s"
  [ $rc = 0 ] || status=1
}
mpi() { mpirun --allow-run-as-root --bind-to none -x PYTHONPATH -x OUT -x NCCL_NVLS_ENABLE "$@"; }
pyt() { python3 -m pytest -p no:cacheprovider -q --timeout 240 "$@"; }

for stage in "${@:-kernels}"; do
export -f mpi pyt
case $stage in
kernels)
  step kernels_w8a8 pyt tests/gpu/test_kernels_w8a8.py
  step kernels_wo pyt tests/gpu/test_kernels_weight_only.py
  ;;
allreduce)
  for n in 2 4; do
    [ "$n" -le "$ngpu" ] || continue
    step allreduce_n$n mpi -n $n python3 -m pytest --with-mpi -p no:cacheprovider -q --timeout 240 \
      tests/gpu/test_custom_allreduce.py tests/gpu/test_nccl.py tests/mpi/test_layers.py
  done
  ;;
allreduce_bench)
  for n in 2 4; do
    [ "$n" -le "$ngpu" ] || continue
    TAIL=26 step bench_allreduce_tp$n mpi -n $n python3 benchmarks/bench_allreduce.py
  done
  ;;
failures)
  # starts its own mpirun jobs, so not under mpirun itself
  TAIL=8 step failures pyt tests/gpu/test_failures_gpu.py
  ;;
model)
  for n in 1 3 4; do
    [ "$n" -le "$ngpu" ] || continue
    step model_n$n mpi -n $n python3 -m pytest --with-mpi -p no:cacheprovider -q --timeout 240 tests/gpu/test_model_gpu.py
  done
  ;;
bench|quick)
  q=(); [ "$stage" = quick ] && q=(--quick)
  TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py "${q[@]}"
  for n in 2 4; do
    [ "$n" -le "$ngpu" ] || continue
    TAIL=20 step bench_allreduce_tp$n mpi -n $n python3 benchmarks/bench_allreduce.py
  done
  for n in 1 2 4; do
    [ "$n" -le "$ngpu" ] || continue
    step bench_decode_tp$n mpi -n $n python3 benchmarks/bench_decode.py "${q[@]}"
  done
  TAIL=40 step bench_decode_merge python3 benchmarks/bench_decode.py --merge
  ;;
*) echo "unknown stage $stage"; status=2 ;;
esac
done
tar -C "$out" -czf "$out/results.tgz" r && rm -rf "$r"
exit $status
