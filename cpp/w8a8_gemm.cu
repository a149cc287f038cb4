// W8A8 GEMM for large M on Hopper: CUTLASS's warp-specialized int8 x int8 -> int32 wgmma GEMM
// with the SmoothQuant rescale fused into its epilogue, one instantiation per build, exported
// through a C ABI for ctypes (tpquant/kernels/cutlass_gemm.py builds it with nvcc at first use).
//
//   out[M, N] = float32(q_x[M, K] . q_w[N, K]) * s_x[M or 1] * s_w[N or 1] + bias[N]
//
// in that order, each step rounded to float32, then once to out's dtype: the order of
// tpquant.kernels.w8a8's reference epilogue (built with -fmad=false, so that the compiler does
// not fuse the last multiply and the add). A scale of one value is broadcast (a zero stride).
//
// TPQ_TILE_N: the CTA tile along N (128 or 256; M 128, K steps of 128 bytes);
// TPQ_STREAMK: stream-K tile scheduling (splits the last wave's work along K), else the
// persistent data-parallel one; TPQ_FP16: out is float16, else bfloat16.
//
// Programmatic dependent launch, as cpp/mixed_input_gemm.cu: built with CUTLASS's grid
// dependency control (not with stream-K), launched with PDL if `pdl` (the kernel before is x's
// quantization).
#ifndef TPQ_STREAMK
#define CUTLASS_ENABLE_GDC_FOR_SM90 1
constexpr bool kGridDependencyControl = true;
#else
constexpr bool kGridDependencyControl = false;
#endif
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

#ifndef TPQ_TILE_N
#define TPQ_TILE_N 128
#endif

using namespace cute;

#ifdef TPQ_FP16
using ElementOut = cutlass::half_t;
#else
using ElementOut = cutlass::bfloat16_t;
#endif

using TileShape = Shape<_128, Int<TPQ_TILE_N>, _128>;
using ClusterShape = Shape<_1, _1, _1>;
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
#ifdef TPQ_STREAMK
using TileScheduler = cutlass::gemm::StreamKScheduler;
#else
using TileScheduler = void;  // persistent, data-parallel
#endif

// The epilogue as a tree of visitors: ((float(acc) * s_x) * s_w) + bias.
namespace fusion = cutlass::epilogue::fusion;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
using ScaleX = fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<bool, _0, int64_t>>;  // per token or one
using ScaleW = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, bool, int64_t>>;  // per channel or one
using Bias = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;      // null: 0
using Times = fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>;
using Plus = fusion::Sm90Compute<cutlass::plus, ElementOut, float, kRound>;
using Rescale = fusion::Sm90EVT<
    Plus, fusion::Sm90EVT<Times, fusion::Sm90EVT<Times, fusion::Sm90AccFetch, ScaleX>, ScaleW>, Bias>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, cutlass::layout::RowMajor, 8,
    ElementOut, cutlass::layout::RowMajor, 8, EpilogueSchedule, Rescale>::CollectiveOp;

// x [M, K] row-major, W [N, K] K-major (B column-major), 16-byte TMA rows.
using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16, int8_t,
    cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                        CollectiveEpilogue, TileScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

static typename Gemm::Arguments make_args(const int8_t* x, const int8_t* w, const float* x_scale, bool x_per_token,
                                          const float* w_scale, bool w_per_channel, const float* bias, void* out,
                                          int M, int N, int K) {
  auto stride_x = cutlass::make_cute_packed_stride(typename GemmKernel::StrideA{}, cute::make_shape(M, K, 1));
  auto stride_w = cutlass::make_cute_packed_stride(typename GemmKernel::StrideB{}, cute::make_shape(N, K, 1));
  auto stride_out = cutlass::make_cute_packed_stride(typename GemmKernel::StrideD{}, cute::make_shape(M, N, 1));
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                {M, N, K, 1},
                                {x, stride_x, w, stride_w},
                                {{}, nullptr, stride_out, static_cast<ElementOut*>(out), stride_out}};
  args.epilogue.thread = {
      {                                                                        // (..) * s_w
          {                                                                    // acc * s_x
              {},                                                              // acc
              {x_scale, 0.0f, {x_per_token, _0{}, int64_t(0)}},                // s_x
              {}},
          {w_scale, 0.0f, {_0{}, w_per_channel, int64_t(0)}},                  // s_w
          {}},
      {bias, 0.0f, {_0{}, _1{}, int64_t(0)}},                                  // bias
      {}};
  return args;
}

extern "C" {

size_t tpq_w8a8_gemm_workspace(int M, int N, int K) {
  return Gemm::get_workspace_size(
      make_args(nullptr, nullptr, nullptr, true, nullptr, true, nullptr, nullptr, M, N, K));
}

// Runs the GEMM on `stream` of `device`, launched with PDL if `pdl` (and built to wait); the
// workspace must hold tpq_w8a8_gemm_workspace bytes. 0 on success, else 1000 + a
// cutlass::Status or 2000 + a cudaError_t.
int tpq_w8a8_gemm(int device, const int8_t* x, const int8_t* w, const float* x_scale, int x_per_token,
                  const float* w_scale, int w_per_channel, const float* bias, void* out, int M, int N, int K,
                  void* workspace, cudaStream_t stream, int pdl) {
  cudaError_t error = cudaSetDevice(device);
  if (error != cudaSuccess) return 2000 + int(error);
  auto args = make_args(x, w, x_scale, x_per_token, w_scale, w_per_channel, bias, out, M, N, K);
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status == cutlass::Status::kSuccess) status = gemm.initialize(args, workspace, stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(stream, nullptr, pdl != 0 && kGridDependencyControl);
  if (status != cutlass::Status::kSuccess) return 1000 + int(status);
  error = cudaGetLastError();
  return error == cudaSuccess ? 0 : 2000 + int(error);
}

}  // extern "C"
