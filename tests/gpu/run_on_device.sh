#!/usr/bin/env bash
# The GPU runs, as sent to the device machine (nvidia-h200-x4: 4 x H200) through the device
# tool, carrying .whl/ (pytest-mpi and gguf wheels; the image lacks both).
#
#   bash tests/gpu/run_on_device.sh STAGE...   with STAGE among
#     kernels     the kernel tests (1 GPU)
#     wo          the CUDA weight-only GEMV's tests (1 GPU)
#     wo_sweep    bench_wo_kernels: every path, then the CUDA GEMV's sweep (1 GPU)
#     tiles       the tiled int4 GEMV's tests, bench_int4_tiles, bench_decode --quick TP 1
#     tiles_sweep bench_int4_tiles with the tiled GEMV's shape sweep (1 GPU)
#     tiles_decode the tiled layout's dispatch tests, bench_int4_tiles to M = 128, bench_decode
#                 bf16 / int8 / int4 / int4 groupwise (batch 1 / 8 / 64) at TP 1 and 2
#     rows_final  the tiled GEMV's and PDL's tests, the layers on 2 GPUs, bench_int4_tiles (M = 1
#                 to 256), bench_decode bf16 / int8 / int4 / int4 groupwise (batch 1 / 8 / 64)
#                 at TP 1 and 2
#     gw_final    the tiled GEMV's tests (per channel and groupwise), the layers on 2 GPUs,
#                 bench_gemm --quick, bench_decode bf16 / int4 / int4 groupwise at TP 1 and 2
#     rows_sweep  bench_int4_tiles' shape sweep, M = 1 to 128 (1 GPU)
#     wide_sweep  the tiled GEMV's tests, then its shape sweep at M = 40 and 64 (1 GPU)
#     tiles_final the tiled GEMV's and PDL's tests, the layers on 2 GPUs, bench_int4_tiles,
#                 bench_decode --quick at TP 1 and 2, bench_gemm --quick
#     wo_table    bench_wo_kernels' table only: the dispatch against bf16 (1 GPU)
#     wo_m        bench_wo_kernels: dot vs dequant + cuBLAS vs the dispatch, M = 8 to 1024
#     w8a8_tma    bench_w8a8_gemm: the W8A8 GEMM's tiles by M (TP 1 and 2 shapes), with and
#                 without TMA, and the per-token quantization alone
#     w8a8_decode bench_w8a8_gemm: the W8A8 GEMM's decode tiles at M = 1 and 4
#     w8a8_medium the W8A8 tests, its medium and small tiles at M = 32-256 (7B TP 1 / 2, 70B
#                 TP 4 shapes), bench_gemm --quick, bench_decode bf16 / SmoothQuant (TP 1, 2)
#     w8a8_quant  the W8A8 tests, per-token quantization in one pass against two
#                 (sweep_gemm_variants), bench_gemm --quick, bench_decode bf16 / SmoothQuant
#     norm_one_pass the W8A8 and decode-op tests, the SmoothQuant RMSNorm in one pass against
#                 chunks (sweep_gemm_variants), bench_decode bf16 / int4 / SmoothQuant (TP 1, 2)
#     final_check the W8A8 tests, the weight-only dispatch tests, W8A8 decode tiles, gemm_quick
#     mma_tests   the CUDA GEMVs' tests (fma and mma kernels, dispatch, graphs) and the W8A8 tests
#     wo_check    the CUDA GEMVs' tests, then the dispatch's table against bf16 (1 GPU)
#     mma_bench   bench_wo_kernels: the CUDA fma and mma kernels against dot and bf16, M = 1 to
#                 32 (mma_sweep: then the mma kernel's split-K sweep)
#     allreduce   NCCL and custom all-reduce tests, and the layers over them (2 and 4 ranks)
#     allreduce_blocks  custom all-reduce latency at 36, 48, 64 blocks per launch (2 ranks)
#     cutlass_decode the CUTLASS GEMMs' tests, the layers (2 ranks), bench_cutlass_gemm at
#                 M = 32 / 64, bench_gemm --quick, bench_decode for five schemes at TP 1 and 2
#     int8_tiles  int8 in tiles: the tiled GEMV's and CUTLASS's tests, the dispatch's (1 GPU;
#                 at ee85c94 also sweep_int8_tiles, nibble mmas against q through float32)
#     int8_bench  bench_int4_tiles --bits 8, bench_cutlass_gemm (int8), bench_gemm --quick
#     int8_decode the layers on 2 GPUs, bench_decode bf16 / int8 / int4 at TP 1 and 2
#     int8_final  the CUTLASS tests, int8's CUTLASS against dequant at M = 64 / 4096, bench_gemm
#                 --quick, bench_decode bf16 / int8 / int4 at TP 1 and 2
#     cutlass_tiles the device's copy bandwidth four ways (bench_copy), the CUTLASS weight-only
#                 GEMM on every tile of bench_cutlass_gemm --tiles sweep (carry .cutlass_cache
#                 with the sweep's libraries, built ahead with --build-only), bench_gemm --quick
#     cutlass_rule the tiles by M and width (thirteenth session): the CUTLASS tests, the tiled
#                 dispatch's, bench_cutlass_gemm --tiles rule, bench_gemm --quick (1 GPU; carry
#                 .cutlass_cache)
#     rule_decode the layers on 2 GPUs, bench_decode bf16 / int8 / int4 / int4_gw at TP 1, 2
#     prefill     profile_decode --prefill: the time to first token by kernel kind and host
#                 operator, bf16 and int8, at TP 1 and 2 (prefill_ar: at TP 2, its Python, then
#                 by all-reduce mode)
#     fusion      the decode step (fourteenth session): the decode-op tests, the model tests on
#                 1 and 2 GPUs (without SmolLM2's file, those that need none),
#                 bench_decode_attention's sweep, profile_decode --ablate (bf16, int8, int4) at
#                 TP 1 and 2
#     fusion_decode the same tests and sweep, then bench_decode --quick at TP 1 and 2, on this
#                 tree and with BEFORE's (a commit) tpquant/layers/decode_attention.py
#     gw_decode   the groupwise fold (fifteenth session): the layers on 2 GPUs, bench_decode
#                 --quick with int4 groupwise at TP 1 and 2, then groupwise with BEFORE_CU's kernels
#                 (gw_fold: bench_int4_tiles --group 128 in place of the layers)
#     probe_final the sixteenth session's tree: the tiled GEMV's, PDL's and CUTLASS's tests, the
#                 layers on 2 GPUs, probe_stream, bench_gemm --quick, bench_decode --quick (TP 1, 2)
#     tune        benchmarks/tune_tiles.py: the tiled GEMV's shapes tuned (TUNE_SCHEMES, TUNE_MS)
#     tuned       the tuned table in the dispatch: the tiled GEMV's tests, bench_gemm at M = 1, 4,
#                 16, bench_decode --quick at TP 1 with the table and without (1 GPU)
#     variants    profile_decode --variants: the decode step's graph as it is against attention on
#                 2 and on 4 warps; bf16, int8 and int4 at batch 1, 8, 64, TP 1 and 2
#     push_check  the all-reduce tests and the layers' (2 ranks), the overlapped generate at TP 2,
#                 the killed-rank tests
#     push_bench  the all-reduce tests, bench_allreduce to 1 MiB, bench_allreduce_norm, the
#                 killed-rank tests
#     push        the all-reduce tests and the layers' (2 ranks), the overlapped generate on a
#                 random model at TP 2, bench_allreduce to 1 MiB, bench_allreduce_norm, then
#                 bench_decode (bf16, int4) at TP 2 with the one-shot (TPQUANT_ALLREDUCE=oneshot)
#                 and with push (auto)
#     cutlass     the CUTLASS GEMMs (weight-only, W8A8): build (or find) their libraries, their
#                 tests and the dispatch tests, bench_cutlass_gemm (each variant), bench_gemm --quick
#                 (carry .cutlass_cache/ too, built here: python -m tpquant.kernels.cutlass_gemm)
#     failures    a rank that raises or is killed while others sit in NCCL / custom all-reduce
#     model       the model tests (1, 2, 3 and 4 ranks, as many as there are GPUs)
#     norm        the fused all-reduce + add + RMSNorm's tests and the layers' (2 ranks)
#     norm_bench  bench_allreduce_norm, then bench_decode --quick at TP 2 without and with the
#                 fusion, and at TP 1
#     decode      bench_decode --quick at TP 1 and 2
#     decode_nopdl  the same with programmatic dependent launch off
#     pdl_full    every kernel test with PDL on, then bench_decode (SmoothQuant, int4; batch 1,
#                 8, 64) without and with it (1 GPU)
#     profile     profile_decode: a decode step's kernel time by kind (1 GPU)
#     profile_b64 profile_decode, bf16 and int4, at batch 1 and at batch 64 (1 GPU)
#     profile_tp  profile_decode, bf16 and int4 at batch 1, TP 1 and (on 2 GPUs) TP 2
#     loop        profile_tp, then bench_decode for the five schemes at TP 1 and 2
#     w8a8_check  the W8A8 and decode-op tests, the W8A8 tiles at M = 32-256, bench_gemm
#                 --quick, profile_tp, bench_decode for the five schemes at TP 1 and 2
#     pdl         programmatic dependent launch: its tests, then profile_decode without and with
#     ncu_wo      ncu_wo_kernels under Nsight Compute: the weight-only GEMVs' and bf16's
#                 counters (NCU_SHAPES, NCU_CASES; 1 GPU)
#     gemm_quick  bench_gemm --quick (1 GPU)
#     bench       bench_gemm, bench_allreduce and bench_allreduce_norm (TP 2, 4), bench_decode
#                 (TP 1, 2, 4)
#     quick       the same benchmarks in their --quick forms
#
# SmolLM2's GGUF (94 MB) is too large to travel in one call: the model tests look for it at
# $TPQUANT_SMOLLM2_GGUF, put together below from two parts sent in two calls back to back
# (the first copies .smolA/part to /tmp/smolA/, the second carries .smolB/). Logs and JSON go to $OUT/r/ and come back as $OUT/results.tgz.
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

# SmolLM2's GGUF in two parts: /tmp/smolA/part left by a previous call on this (still warm)
# machine, .smolB/part carried by this one; used only if the whole file checks out.
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f /tmp/smolA/part ] && [ -f .smolB/part ]; then
  cat /tmp/smolA/part .smolB/part > /tmp/smollm2.gguf
  if [ "$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)" = "$SMOL_SHA" ]; then
    export TPQUANT_SMOLLM2_GGUF=/tmp/smollm2.gguf; echo "SmolLM2 GGUF assembled"
  else
    echo "SmolLM2 GGUF parts do not match its sha256"
  fi
fi

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
mpi() { mpirun --allow-run-as-root --bind-to none -x PYTHONPATH -x OUT -x NCCL_NVLS_ENABLE ${TPQUANT_SMOLLM2_GGUF:+-x TPQUANT_SMOLLM2_GGUF} ${TPQUANT_CACHE:+-x TPQUANT_CACHE -x PATH} "$@"; }
pyt() { python3 -m pytest -p no:cacheprovider -q --timeout 240 "$@"; }
tiles_tests() {  # the tiled GEMV's and PDL's tests, then the layers on 2 GPUs where there are 2
  step kernels_int4_tiles pyt tests/gpu/test_kernels_tiles.py tests/gpu/test_pdl_gpu.py
  [ "$ngpu" -ge 2 ] && step layers_n2 mpi -n 2 python3 -m pytest --with-mpi -p no:cacheprovider \
    -q --timeout 240 tests/mpi/test_layers.py
}
decode_tp12() {  # decode_tp12 ARGS...: bench_decode at TP 1 and (on 2 GPUs) 2
  for n in 1 2; do
    [ "$n" -le "$ngpu" ] || continue
    TAIL=8 step bench_decode_tp$n mpi -n $n python3 benchmarks/bench_decode.py "$@"
  done
}

for stage in "${@:-kernels}"; do
export -f mpi pyt
case $stage in
kernels)
  step kernels_w8a8 pyt tests/gpu/test_kernels_w8a8.py tests/gpu/test_decode_ops_gpu.py
  step kernels_wo pyt tests/gpu/test_kernels_weight_only.py
  ;;
wo|mma_tests|wo_check)
  # the CUDA weight-only GEMVs' tests, the dispatch and a CUDA graph; mma_tests: then the
  # W8A8 tests; wo_check: then the dispatch against bf16 (M = 1 to 32, six shapes)
  step kernels_wo_cuda pyt tests/gpu/test_kernels_weight_only.py -k "cuda or automatic or graph"
  [ "$stage" = mma_tests ] && step kernels_w8a8 pyt tests/gpu/test_kernels_w8a8.py
  [ "$stage" = wo_check ] && STEP_TIMEOUT=300 TAIL=8 step bench_wo_check \
    python3 benchmarks/bench_wo_kernels.py \
    --shapes 7b-qkv-tp1,7b-o-tp1,7b-gate_up-tp1,7b-down-tp1,7b-down-tp2,70b-gate_up-tp4 \
    --ms 1,2,4,8,16,32 --paths auto --budget 200 --no-sweep
  ;;
wo_sweep)
  # every path against bf16, then the CUDA GEMV's rows-per-warp x split-K sweep
  STEP_TIMEOUT=420 TAIL=60 step bench_wo python3 benchmarks/bench_wo_kernels.py \
    --shapes 7b-qkv-tp1,7b-o-tp1,7b-gate_up-tp1,7b-down-tp1,7b-down-tp2,70b-gate_up-tp4 \
    --ms 1,2,4 --paths auto,cuda,dot,tinygemm --budget 150 --sweep-budget 220 \
    --sweep-shapes 7b-qkv-tp1,7b-o-tp1,7b-down-tp2 --sweep-ms 1,2,4
  ;;
tiles|tiles_sweep)
  # the tiled int4 GEMV (pre-packed weight): its tests and the other weight-only kernels', then
  # against the dispatch on the stored layout and bf16 (M = 1 to 256), then bench_decode --quick
  # at TP 1; tiles_sweep: the benchmark alone, with the GEMV's shape sweep (M <= 32)
  if [ "$stage" = tiles ]; then
    step kernels_int4_tiles pyt tests/gpu/test_kernels_tiles.py
    step kernels_wo_cuda pyt tests/gpu/test_kernels_weight_only.py -k "cuda or automatic or graph"
    STEP_TIMEOUT=300 TAIL=60 step bench_int4_tiles python3 benchmarks/bench_int4_tiles.py \
      --no-sweep --ms 1,2,4,8,16,32,48,64,128,256
    TAIL=14 step bench_decode_tp1 python3 benchmarks/bench_decode.py --quick
  else
    STEP_TIMEOUT=450 TAIL=100 step bench_int4_tiles python3 benchmarks/bench_int4_tiles.py
  fi
  ;;
rows_final)
  tiles_tests
  STEP_TIMEOUT=150 TAIL=12 step bench_int4_tiles python3 benchmarks/bench_int4_tiles.py \
    --no-sweep --ms 1,2,4,8,16,32,40,64,128,256
  decode_tp12 --models llama2-7b --schemes bf16 int8_wo int4_wo int4_gw
  ;;
gw_final)
  tiles_tests
  STEP_TIMEOUT=240 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  decode_tp12 --models llama2-7b --schemes bf16 int4_wo int4_gw
  ;;
rows_sweep)
  STEP_TIMEOUT=560 TAIL=80 step bench_int4_tiles python3 benchmarks/bench_int4_tiles.py \
    --ms 1,8,16,32,64,128 --replays 10
  ;;
wide_sweep)
  step kernels_int4_tiles pyt tests/gpu/test_kernels_tiles.py
  STEP_TIMEOUT=300 TAIL=40 step bench_int4_tiles python3 benchmarks/bench_int4_tiles.py \
    --ms 40,64 --replays 10
  ;;
tiles_decode)
  # the tiled layout's dispatch and forced paths, bench_int4_tiles to M = 128, bench_decode
  # (Llama-2-7B bf16, int8, int4, int4 groupwise; batch 1 / 8 / 64) at TP 1 and 2
  step kernels_int4_tiles pyt tests/gpu/test_kernels_tiles.py -k "dispatch or forced"
  STEP_TIMEOUT=150 TAIL=10 step bench_int4_tiles python3 benchmarks/bench_int4_tiles.py \
    --no-sweep --ms 1,16,32,64,128
  decode_tp12 --models llama2-7b --schemes bf16 int8_wo int4_wo int4_gw
  ;;
tiles_final)
  # the tiled GEMV's tests, PDL's, the layers on 2 GPUs (int4 tiled in bfloat16 among them),
  # then bench_int4_tiles, bench_decode --quick at TP 1 and 2, bench_gemm --quick
  tiles_tests
  STEP_TIMEOUT=150 TAIL=14 step bench_int4_tiles python3 benchmarks/bench_int4_tiles.py \
    --no-sweep --ms 1,2,4,8,16,32,64,256
  decode_tp12 --quick
  STEP_TIMEOUT=240 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  ;;
wo_table)
  # the dispatch (auto) and the CUDA GEMV against bf16 and torch's tinygemm, no sweep
  STEP_TIMEOUT=200 TAIL=22 step bench_wo_table python3 benchmarks/bench_wo_kernels.py \
    --shapes 7b-qkv-tp1,7b-o-tp1,7b-gate_up-tp1,7b-down-tp1,7b-down-tp2,70b-gate_up-tp4 \
    --ms 1,2,4,16 --paths auto,cuda,tinygemm --budget 150 --no-sweep
  ;;
wo_m)
  # dot (autotuned, SPLIT_X among its configs) against dequant + cuBLAS and the dispatch,
  # M = 8 to 1024: where each path wins
  STEP_TIMEOUT=300 TAIL=40 step bench_wo_m python3 benchmarks/bench_wo_kernels.py \
    --shapes 7b-qkv-tp1,7b-o-tp1,7b-down-tp1,70b-gate_up-tp4 --ms 8,16,32,64,128,256,512,1024 \
    --paths auto,dot,dequant --budget 240 --no-sweep
  ;;
w8a8_tma)
  # the W8A8 GEMM's configs by M, pointer loads against TMA descriptors
  STEP_TIMEOUT=240 TAIL=60 step bench_w8a8_gemm python3 benchmarks/bench_w8a8_gemm.py \
    --ms 1,4,16,1024,4096 --shapes 7b,7b-tp2
  ;;
w8a8_decode)
  # the W8A8 GEMM's decode tiles at M = 1 and 4, and M = 1 given as two rows
  STEP_TIMEOUT=240 TAIL=40 step bench_w8a8_decode python3 benchmarks/bench_w8a8_gemm.py \
    --ms 1,4 --shapes 7b,7b-tp2
  ;;
w8a8_medium)
  step kernels_w8a8 pyt tests/gpu/test_kernels_w8a8.py
  STEP_TIMEOUT=200 TAIL=30 step bench_w8a8_medium python3 benchmarks/bench_w8a8_gemm.py \
    --ms 32,64,128,256 --shapes 7b,7b-tp2,70b
  STEP_TIMEOUT=330 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  decode_tp12 --models llama2-7b --schemes bf16 w8a8_token
  ;;
w8a8_quant)
  step kernels_w8a8 pyt tests/gpu/test_kernels_w8a8.py
  STEP_TIMEOUT=120 TAIL=40 step sweep_quant python3 benchmarks/sweep_gemm_variants.py \
    --parts quant --ms 1,16,64,256,1024,4096
  STEP_TIMEOUT=330 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  decode_tp12 --models llama2-7b --schemes bf16 w8a8_token
  ;;
norm_one_pass)
  step kernels_norm pyt tests/gpu/test_kernels_w8a8.py tests/gpu/test_decode_ops_gpu.py
  STEP_TIMEOUT=120 TAIL=30 step sweep_norm python3 benchmarks/sweep_gemm_variants.py \
    --parts norm --ms 1,8,64,512,4096
  decode_tp12 --models llama2-7b --schemes bf16 int4_wo w8a8_token
  ;;
final_check)
  # after the decode tile and dispatch changes: W8A8 tests, the weight-only dispatch, the
  # W8A8 decode tiles at M = 1, 4, 16, then bench_gemm --quick
  step kernels_w8a8 pyt tests/gpu/test_kernels_w8a8.py
  step kernels_wo_dispatch pyt tests/gpu/test_kernels_weight_only.py -k "automatic or graph"
  STEP_TIMEOUT=120 TAIL=40 step bench_w8a8_decode python3 benchmarks/bench_w8a8_gemm.py \
    --ms 1,4,16 --shapes 7b,7b-tp2
  STEP_TIMEOUT=200 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  ;;
mma_bench|mma_sweep)
  sweep=(--no-sweep)
  [ "$stage" = mma_sweep ] && sweep=(--sweep-budget 120 --sweep-paths cuda-mma --sweep-ms 1,4,16 \
    --sweep-shapes 7b-qkv-tp1,7b-o-tp1,7b-down-tp2 --sweep-schemes int4_wo,int8_wo)
  STEP_TIMEOUT=450 TAIL=20 step bench_wo_mma python3 benchmarks/bench_wo_kernels.py \
    --shapes 7b-qkv-tp1,7b-o-tp1,7b-gate_up-tp1,7b-down-tp1,7b-down-tp2,70b-gate_up-tp4 \
    --ms 1,2,4,8,16,32 --paths auto,cuda-fma,cuda-mma,dot --budget 200 "${sweep[@]}"
  ;;
allreduce)
  for n in 2 4; do
    [ "$n" -le "$ngpu" ] || continue
    step allreduce_n$n mpi -n $n python3 -m pytest --with-mpi -p no:cacheprovider -q --timeout 240 \
      tests/gpu/test_custom_allreduce.py tests/gpu/test_nccl.py tests/mpi/test_layers.py
  done
  ;;
cutlass)
  # the CUTLASS GEMMs (weight-only, W8A8): their libraries (from the carried cache,
  # .cutlass_cache/, or built here 8 at a time), their tests and the tests that reach them
  # through the dispatch, then bench_cutlass_gemm (each variant against bf16 and the paths
  # the dispatch took before) and bench_gemm --quick
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  nvcc --version | tail -2
  TAIL=6 STEP_TIMEOUT=420 step cutlass_build python3 -m tpquant.kernels.cutlass_gemm --jobs 8
  step kernels_cutlass pyt tests/gpu/test_kernels_cutlass.py
  step kernels_int4_tiles pyt tests/gpu/test_kernels_tiles.py -k "dispatch or forced or graph"
  step kernels_wo_dispatch pyt tests/gpu/test_kernels_weight_only.py -k "automatic or graph"
  step kernels_w8a8 pyt tests/gpu/test_kernels_w8a8.py -k "gemm or graph"
  STEP_TIMEOUT=360 TAIL=30 step bench_cutlass_gemm python3 benchmarks/bench_cutlass_gemm.py
  STEP_TIMEOUT=200 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  ;;
cutlass_decode)
  # the CUTLASS GEMMs' tests, the layers on 2 GPUs, bench_cutlass_gemm at M = 32 / 64,
  # bench_gemm --quick, then bench_decode (five schemes, TP 1 and 2) with the CUTLASS GEMMs in
  # prefill and, for wide weights, in batch-64 decode (from the carried cache)
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  step kernels_cutlass pyt tests/gpu/test_kernels_cutlass.py
  [ "$ngpu" -ge 2 ] && step layers_n2 mpi -n 2 python3 -m pytest \
    --with-mpi -p no:cacheprovider -q --timeout 240 tests/mpi/test_layers.py
  STEP_TIMEOUT=120 TAIL=12 step bench_cutlass_small python3 benchmarks/bench_cutlass_gemm.py \
    --ms 32,64 --schemes int4_wo,int4_gw,int8_wo
  STEP_TIMEOUT=200 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  decode_tp12 --models llama2-7b --schemes bf16 int8_wo int4_wo int4_gw w8a8_token
  ;;
int8_tiles)
  # int8 in tiles: the tiled GEMV's and the CUTLASS GEMMs' tests (carry .cutlass_cache), the
  # untiled paths' dispatch and graph tests (1 GPU)
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  step kernels_tiles pyt tests/gpu/test_kernels_tiles.py
  step kernels_cutlass pyt tests/gpu/test_kernels_cutlass.py
  step kernels_wo pyt tests/gpu/test_kernels_weight_only.py -k "automatic or graph or cuda"
  ;;
int8_bench)
  # int8 in tiles: the tiled GEMV against the stored layout's dispatch, the CUTLASS GEMM for
  # int8, bench_gemm --quick (1 GPU)
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  STEP_TIMEOUT=200 TAIL=12 step bench_int8_tiles python3 benchmarks/bench_int4_tiles.py \
    --bits 8 --ms 1,4,16,32,64 --no-sweep
  STEP_TIMEOUT=150 TAIL=12 step bench_cutlass_int8 python3 benchmarks/bench_cutlass_gemm.py \
    --ms 32,64,128,256,1024 --schemes int8_wo
  STEP_TIMEOUT=200 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  ;;
int8_final)
  # int8 in tiles, the final rule (CUTLASS from M = 33 to 1024): the CUTLASS tests, int8's
  # CUTLASS against dequant at M = 64 / 4096, bench_gemm --quick, then bench_decode (bf16,
  # int8, int4) at TP 1 and 2
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  step kernels_cutlass pyt tests/gpu/test_kernels_cutlass.py
  STEP_TIMEOUT=100 TAIL=6 step bench_cutlass_int8 python3 benchmarks/bench_cutlass_gemm.py \
    --ms 64,4096 --schemes int8_wo
  STEP_TIMEOUT=150 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  STEP_TIMEOUT=200 decode_tp12 --models llama2-7b --schemes bf16 int8_wo int4_wo
  ;;
cutlass_tiles)
  # the copy bandwidth launched directly and from a graph, then every tile of the sweep against
  # bf16, dequant + cuBLAS and the dispatch (the libraries come in the carried cache)
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  TAIL=5 step bench_copy python3 benchmarks/bench_copy.py
  STEP_TIMEOUT=480 TAIL=60 step bench_cutlass_tiles python3 benchmarks/bench_cutlass_gemm.py \
    --tiles sweep --schemes int4_wo,int8_wo,int4_gw
  STEP_TIMEOUT=150 TAIL=12 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  ;;
cutlass_rule)
  # the tiles by M and the weight's width: the CUTLASS tests (every tile forced, the dispatch
  # around M = 32), the tiled dispatch's, the rule against dequant / the GEMV / bf16, bench_gemm
  # --quick (1 GPU)
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  step kernels_cutlass pyt tests/gpu/test_kernels_cutlass.py
  step kernels_tiles pyt tests/gpu/test_kernels_tiles.py -k "dispatch or forced"
  STEP_TIMEOUT=150 TAIL=20 step bench_cutlass_rule python3 benchmarks/bench_cutlass_gemm.py \
    --ms 32,64,128,256,1024 --schemes int4_wo,int8_wo,int4_gw
  STEP_TIMEOUT=150 TAIL=12 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  ;;
rule_decode)
  # the tiles by M and width on 2 GPUs: the layers, then bench_decode (bf16, int8, int4, gw; batch
  # 1, 8, 64; prefill of 512 tokens) at TP 1 and 2
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  [ "$ngpu" -ge 2 ] && step layers_n2 mpi -n 2 python3 -m pytest --with-mpi -p no:cacheprovider \
    -q --timeout 240 tests/mpi/test_layers.py
  STEP_TIMEOUT=240 decode_tp12 --models llama2-7b --schemes bf16 int8_wo int4_wo int4_gw
  ;;
prefill)
  # where the time to first token goes: profile_decode --prefill at TP 1 and 2 (bf16, int8)
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  for n in 1 2; do
    [ "$n" -le "$ngpu" ] || continue
    TAIL=60 step profile_prefill_tp$n mpi -n $n python3 benchmarks/profile_decode.py --prefill \
      --schemes bf16 int8_wo
  done
  ;;
prefill_ar)
  # the time to first token at TP 2 by all-reduce mode (TPQUANT_ALLREDUCE: nccl, twoshot, auto)
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  TAIL=70 step prefill_python_tp2 mpi -n 2 python3 benchmarks/profile_decode.py --prefill \
    --python --schemes int8_wo
  for mode in nccl twoshot auto; do
    TAIL=14 step prefill_tp2_$mode env TPQUANT_ALLREDUCE=$mode bash -c "mpi -n 2 -x \
      TPQUANT_ALLREDUCE python3 benchmarks/profile_decode.py --prefill --schemes bf16 int8_wo"
  done
  ;;
int8_decode)
  # int8 in tiles at TP 2: the layers on 2 GPUs, then bench_decode (bf16, int8, int4; batch 1,
  # 8, 64) at TP 1 and 2
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  [ "$ngpu" -ge 2 ] && step layers_n2 mpi -n 2 python3 -m pytest --with-mpi -p no:cacheprovider \
    -q --timeout 240 tests/mpi/test_layers.py
  decode_tp12 --models llama2-7b --schemes bf16 int8_wo int4_wo
  ;;
push)
  step allreduce_n2 mpi -n 2 python3 -m pytest --with-mpi -p no:cacheprovider -q --timeout 240 \
    tests/gpu/test_custom_allreduce.py tests/mpi/test_layers.py
  step generate_n2 mpi -n 2 python3 -m pytest --with-mpi -p no:cacheprovider -q --timeout 240 \
    tests/gpu/test_model_gpu.py -k "overlapped or decode_attention_kernel"
  TAIL=26 step bench_allreduce_tp2 mpi -n 2 python3 benchmarks/bench_allreduce.py \
    --max-bytes $((1 << 20))
  TAIL=12 step bench_allreduce_norm_tp2 mpi -n 2 python3 benchmarks/bench_allreduce_norm.py
  for v in oneshot auto; do
    TAIL=8 step bench_decode_ar_$v env TPQUANT_ALLREDUCE=$v bash -c \
      "mpi -n 2 -x TPQUANT_ALLREDUCE python3 benchmarks/bench_decode.py --models llama2-7b \
       --schemes bf16 int4_wo int8_wo --out $r/ar_$v"
  done
  ;;
fusion|fusion_decode)
  # the model tests that need no SmolLM2 file unless one was assembled above
  [ -n "${TPQUANT_SMOLLM2_GGUF:-}" ] && sel=() || sel=(-k "attention_kernel or overlapped or prefill_graph")
  step decode_ops pyt tests/gpu/test_decode_ops_gpu.py
  for n in 1 2; do
    [ "$n" -le "$ngpu" ] || continue
    step model_n$n mpi -n $n python3 -m pytest --with-mpi -p no:cacheprovider -q -rfE \
      --timeout 240 tests/gpu/test_model_gpu.py "${sel[@]}"
  done
  TAIL=14 step bench_attention python3 benchmarks/bench_decode_attention.py
  if [ "$stage" = fusion ]; then
    for n in 1 2; do
      [ "$n" -le "$ngpu" ] || continue
      TAIL=60 step profile_ablate_tp$n mpi -n $n python3 benchmarks/profile_decode.py --ablate \
        --schemes bf16 int8_wo int4_wo
    done
  else
    export TPQUANT_CACHE=$PWD/.cutlass_cache
    decode_tp12 --quick
    f=tpquant/layers/decode_attention.py  # BEFORE's, then this tree's again
    cp $f /tmp/decode_attention.py.now && git show "${BEFORE:?set BEFORE to a commit}:$f" > $f
    for n in 1 2; do
      [ "$n" -le "$ngpu" ] || continue
      TAIL=8 step before_decode_tp$n mpi -n $n python3 benchmarks/bench_decode.py --quick \
        --out "$r/before"
    done
    cp /tmp/decode_attention.py.now $f
  fi
  ;;
probe_final)
  # the sixteenth session's tree: the tiled GEMV's, PDL's and CUTLASS's tests (carry
  # .cutlass_cache), the layers on 2 GPUs, probe_stream (the int4 weight read alone, two ways,
  # against the GEMV), bench_gemm --quick, bench_decode --quick at TP 1 and 2
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
  tiles_tests
  step kernels_cutlass pyt tests/gpu/test_kernels_cutlass.py
  STEP_TIMEOUT=120 TAIL=16 step probe_stream python3 benchmarks/probe_stream.py
  STEP_TIMEOUT=240 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  decode_tp12 --quick
  ;;
tune)
  # the tiled GEMV's shapes tuned on this GPU (TUNE_SCHEMES, default all three; TUNE_MS, default 1)
  STEP_TIMEOUT=540 TAIL=80 step tune_tiles python3 benchmarks/tune_tiles.py \
    --schemes "${TUNE_SCHEMES:-int4_wo,int4_gw,int8_wo}" --ms "${TUNE_MS:-1}"
  ;;
tuned)
  # the tuned table in the dispatch (seventeenth session): the tiled GEMV's tests, bench_gemm at
  # M = 1, 4, 16 (every model and TP), bench_decode --quick at TP 1 with the table and without
  step kernels_int4_tiles pyt tests/gpu/test_kernels_tiles.py
  STEP_TIMEOUT=200 TAIL=45 step bench_gemm python3 benchmarks/bench_gemm.py --ms 1,4,16
  TAIL=8 step bench_decode_tp1 python3 benchmarks/bench_decode.py --quick
  TAIL=8 step bench_decode_tp1_rule env TPQUANT_TILES_TUNED=off python3 benchmarks/bench_decode.py \
    --quick --out "$r/rule"
  ;;
gw_decode|gw_fold)
  # groupwise int4's sums folded once a run of a group's k-tiles (fifteenth session): the layers
  # on 2 GPUs (gw_fold instead: bench_int4_tiles groupwise at the rule's shapes), bench_decode
  # --quick for bf16, int8, int4 and int4 groupwise at TP 1 and 2, then groupwise again with
  # the kernel file BEFORE_CU (a copy of the earlier one, carried)
  if [ "$stage" = gw_fold ]; then
    TAIL=6 step bench_gw_tiles python3 benchmarks/bench_int4_tiles.py --group 128 --ms 1,4,16 \
      --no-sweep
  elif [ "$ngpu" -ge 2 ]; then
    step layers_n2 mpi -n 2 python3 -m pytest --with-mpi -p no:cacheprovider -q --timeout 240 \
      tests/mpi/test_layers.py
  fi
  export TPQUANT_CACHE=$PWD/.cutlass_cache
  decode_tp12 --quick --schemes bf16 int8_wo int4_wo int4_gw
  f=cpp/weight_only_gemv.cu
  cp $f /tmp/weight_only_gemv.cu.now && cp "${BEFORE_CU:?set BEFORE_CU to a .cu file}" $f
  for n in 1 2; do
    [ "$n" -le "$ngpu" ] || continue
    TAIL=8 step before_decode_tp$n mpi -n $n python3 benchmarks/bench_decode.py --quick \
      --schemes int4_gw --out "$r/before"
  done
  cp /tmp/weight_only_gemv.cu.now $f
  ;;
variants)
  for n in 1 2; do
    [ "$n" -le "$ngpu" ] || continue
    TAIL=40 step profile_variants_tp$n mpi -n $n python3 benchmarks/profile_decode.py --variants \
      --schemes bf16 int8_wo int4_wo --batches 1 8 64
  done
  ;;
push_check)
  # the push all-reduce's and the overlapped generate's tests, the layers, the killed-rank tests
  step allreduce_n2 mpi -n 2 python3 -m pytest --with-mpi -p no:cacheprovider -q --timeout 240 \
    tests/gpu/test_custom_allreduce.py tests/gpu/test_nccl.py tests/mpi/test_layers.py
  step generate_n2 mpi -n 2 python3 -m pytest --with-mpi -p no:cacheprovider -q --timeout 240 \
    tests/gpu/test_model_gpu.py -k "overlapped or decode_attention_kernel"
  TAIL=8 step failures pyt tests/gpu/test_failures_gpu.py
  ;;
push_bench)
  # after push: the all-reduce tests again, bench_allreduce to 1 MiB, bench_allreduce_norm,
  # and the killed-rank tests (push is what bf16 decode-sized all-reduces take now)
  step allreduce_n2 mpi -n 2 python3 -m pytest --with-mpi -p no:cacheprovider -q --timeout 240 \
    tests/gpu/test_custom_allreduce.py
  TAIL=26 step bench_allreduce_tp2 mpi -n 2 python3 benchmarks/bench_allreduce.py \
    --max-bytes $((1 << 20))
  TAIL=12 step bench_allreduce_norm_tp2 mpi -n 2 python3 benchmarks/bench_allreduce_norm.py
  TAIL=8 step failures pyt tests/gpu/test_failures_gpu.py
  ;;
allreduce_bench)
  for n in 2 4; do
    [ "$n" -le "$ngpu" ] || continue
    TAIL=26 step bench_allreduce_tp$n mpi -n $n python3 benchmarks/bench_allreduce.py
  done
  ;;
allreduce_blocks)
  # thread blocks per custom all-reduce launch, 4 KiB to 2 MiB (how DEFAULT_MAX_BLOCKS was set)
  for b in 36 48 64; do
    TAIL=16 step ar_blocks$b mpi -n 2 python3 benchmarks/bench_allreduce.py --min-bytes 4096 \
      --max-bytes $((2 << 20)) --max-blocks $b --out "$r/blocks$b"
  done
  ;;
failures)
  # starts its own mpirun jobs, so not under mpirun itself
  TAIL=8 step failures pyt tests/gpu/test_failures_gpu.py
  ;;
model)
  for n in 1 2 3 4; do
    [ "$n" -le "$ngpu" ] || continue
    step model_n$n mpi -n $n python3 -m pytest --with-mpi -p no:cacheprovider -q --timeout 240 tests/gpu/test_model_gpu.py
  done
  ;;
profile)
  TAIL=40 step profile_decode python3 benchmarks/profile_decode.py
  ;;
profile_tp|w8a8_check|loop)
  if [ "$stage" = w8a8_check ]; then
    step kernels_w8a8 pyt tests/gpu/test_kernels_w8a8.py tests/gpu/test_decode_ops_gpu.py
    STEP_TIMEOUT=200 TAIL=30 step bench_w8a8_medium python3 benchmarks/bench_w8a8_gemm.py \
      --ms 32,64,128,256 --shapes 7b,7b-tp2,70b
    STEP_TIMEOUT=200 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  fi
  for n in 1 2; do
    [ "$n" -le "$ngpu" ] || continue
    TAIL=40 step profile_decode_tp$n mpi -n $n python3 benchmarks/profile_decode.py \
      --schemes bf16 int4_wo
  done
  [ "$stage" != profile_tp ] && decode_tp12 --models llama2-7b \
    --schemes bf16 int8_wo int4_wo int4_gw w8a8_token
  ;;
profile_b64)
  for b in 1 64; do
    TAIL=30 step profile_decode_b$b env OUT="$r/b$b" python3 benchmarks/profile_decode.py \
      --schemes bf16 int4_wo --batch $b
  done
  ;;
pdl)
  # programmatic dependent launch: its chain test, the decode ops and CUDA GEMVs with it on,
  # then a decode step's profile with it off and on
  step kernels_pdl pyt tests/gpu/test_pdl_gpu.py tests/gpu/test_decode_ops_gpu.py
  step kernels_wo_cuda pyt tests/gpu/test_kernels_weight_only.py -k "cuda or automatic or graph"
  for v in 0 1; do
    TAIL=30 step profile_decode_pdl$v env TPQUANT_PDL=$v OUT="$r/pdl$v" \
      python3 benchmarks/profile_decode.py --schemes bf16 int4_wo int8_wo
  done
  ;;
ncu_wo)
  # Nsight Compute's counters for the weight-only GEMVs and bf16 (${NCU_SHAPES}, default qkv)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  for shape in ${NCU_SHAPES:-7b-qkv-tp1}; do
    STEP_TIMEOUT=400 TAIL=2 step "ncu_$shape" "$NCU" --clock-control none --nvtx \
      --nvtx-include "prof/" --section SpeedOfLight --section LaunchStats --section Occupancy \
      --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
      --metrics "dram__bytes_read.sum,smsp__inst_executed.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python3 benchmarks/ncu_wo_kernels.py --shape "$shape" ${NCU_CASES:+--cases "$NCU_CASES"}
  done
  ;;
gemm_quick)
  STEP_TIMEOUT=330 TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py --quick
  ;;
norm)
  # the fused all-reduce + residual add + RMSNorm: its tests and the layers' (2 ranks)
  step allreduce_norm_n2 mpi -n 2 python3 -m pytest --with-mpi -p no:cacheprovider -q \
    --timeout 240 tests/gpu/test_custom_allreduce.py tests/mpi/test_layers.py
  ;;
norm_bench)
  # its latency against the two kernels it replaces, then bench_decode --quick at TP 2
  # without and with it (TPQUANT_ALLREDUCE_NORM), and at TP 1
  TAIL=12 step bench_allreduce_norm mpi -n 2 python3 benchmarks/bench_allreduce_norm.py
  for v in 0 1; do
    TAIL=14 step bench_decode_norm$v env TPQUANT_ALLREDUCE_NORM=$v bash -c \
      "mpi -n 2 -x TPQUANT_ALLREDUCE_NORM python3 benchmarks/bench_decode.py --quick --out $r/norm$v"
  done
  TAIL=14 step bench_decode_tp1 python3 benchmarks/bench_decode.py --quick
  ;;
decode)
  for n in 1 2; do
    [ "$n" -le "$ngpu" ] || continue
    TAIL=14 step bench_decode_tp$n mpi -n $n python3 benchmarks/bench_decode.py --quick
  done
  ;;
pdl_full)
  # PDL on across the kernel tests, then bench_decode (Llama-2-7B, SmoothQuant per token and
  # int4, batch 1 / 8 / 64, TP 1) without and with it
  STEP_TIMEOUT=240 step kernels_pdl_full pyt tests/gpu/test_pdl_gpu.py \
    tests/gpu/test_decode_ops_gpu.py tests/gpu/test_kernels_w8a8.py
  STEP_TIMEOUT=240 step kernels_wo_pdl_full pyt tests/gpu/test_kernels_weight_only.py \
    -k "each_path or automatic or graph or split_k or cuda_path"
  for v in 0 1; do
    TAIL=8 step bench_decode_pdl$v env TPQUANT_PDL=$v python3 benchmarks/bench_decode.py \
      --models llama2-7b --schemes w8a8_token int4_wo --out "$r/pdl$v"
  done
  ;;
decode_nopdl)
  # bench_decode --quick at TP 1 and 2 with programmatic dependent launch off (TPQUANT_PDL=0)
  for n in 1 2; do
    [ "$n" -le "$ngpu" ] || continue
    TAIL=14 step bench_decode_nopdl_tp$n env TPQUANT_PDL=0 bash -c \
      "mpi -n $n -x TPQUANT_PDL python3 benchmarks/bench_decode.py --quick --out $r/nopdl"
  done
  ;;
bench|quick)
  q=(); [ "$stage" = quick ] && q=(--quick)
  TAIL=30 step bench_gemm python3 benchmarks/bench_gemm.py "${q[@]}"
  for n in 2 4; do
    [ "$n" -le "$ngpu" ] || continue
    TAIL=20 step bench_allreduce_tp$n mpi -n $n python3 benchmarks/bench_allreduce.py
    TAIL=12 step bench_allreduce_norm_tp$n mpi -n $n python3 benchmarks/bench_allreduce_norm.py
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
