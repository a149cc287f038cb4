// Weight-only GEMM for larger M on Hopper: CUTLASS's mixed-input warp-specialized GEMM
// (collective sm90_mma_tma_gmma_rs_warpspecialized_mixed_input; CUTLASS example 55), one
// instantiation per build, exported through a C ABI for ctypes (tpquant/kernels/cutlass_gemm.py
// compiles it with nvcc at first use; the macros below pick the instantiation).
//
//   out[M, N] (x's dtype, row-major) = x[M, K] @ dequant(W)[N, K]^T * alpha[N] + bias[N]
//
// CUTLASS computes D^T = W X^T: its "A" operand is the weight (dequantized in registers, so
// the register-sourced wgmma), its "B" is x, and D is written transposed into row-major
// [M, N]. Its M is our N (a per-row alpha / bias there is per output channel here).
//
// TPQ_QUANT (the codes):
//   0  int4, two's complement, in tpquant's "tiles16x64" layout (tpquant/kernels/tiles.py)
//   1  int4, unsigned 0..15, same layout (groupwise with zeros)
//   2  int8, two's complement, in the "tiles16x32" layout
// The tiles hold exactly CUTLASS's "shuffled" layout (int4: 4 reorder atoms, int8: 2; K-fastest
// tile order) of a weight whose K is permuted inside every tile (design notes 34, 35); the
// caller feeds x with the same permutation, so the sums are the same products in another order.
//
// TPQ_MODE (the dequantization before the tensor cores):
//   0  convert only (codes are exact in bf16 / fp16); per-channel scale = alpha in the epilogue,
//      applied in float32 to the float32 sums: one rounding, at the output
//   1  w = q * s (groupwise, float32 scales [K/g, N])
//   2  w = u * s + z (groupwise with zeros; z = -zero * s, float32 [K/g, N])
// Modes 1 and 2 compute w in float32 and round it once to x's dtype (as dequantize + cuBLAS
// does); alpha is then null (1).
//
// The CTA tile: TPQ_TILE_TOKENS along M (16 to 256 tokens), TPQ_TILE_ROWS weight rows (64 or
// 128; CUTLASS's M), K steps of TPQ_TILE_K (64 or 128). TPQ_PINGPONG: two consumer warpgroups
// on two tiles, one's dequantization and epilogue overlapping the other's tensor-core work,
// else both on one tile (cooperative; 128 rows at least). TPQ_CLUSTER: CTAs along the weight
// rows that share each x tile by TMA multicast. TPQ_STREAMK (cooperative only): stream-K tile
// scheduling (where the output tiles alone leave SMs idle, K is split across them and the
// partial sums reduced through the workspace), else the persistent data-parallel one.
// TPQ_FP16: x and out are float16, else bfloat16.
//
// Programmatic dependent launch (tpquant/kernels/pdl.py): built with CUTLASS's grid dependency
// control, the kernel's producer warps wait (griddepcontrol.wait) before their first load, and
// its consumers let the next kernel launch once their last tile's main loop is done. Launched
// with PDL (the `pdl` argument), the kernel's launch and prologue overlap the end of the kernel
// before it (x's gather into the tiles' order); without, the wait is a no-op. Only on the
// cooperative data-parallel tile of 64 tokens, where it measured 1-9% faster (design note 51):
// CUTLASS 4.2's stream-K scheduler does not compile with it (a const is_last_tile); the pingpong
// kernel's consumers without a tile let the next kernel start before the kernel's own wait
// (against pdl.py's rule) and PDL measured up to 1.6x slower there; on the 256-token tile it
// measured 0.98x (up to 1.3x slower on narrow weights of small K). The other instantiations
// have no wait and always launch without PDL.
#if !defined(TPQ_STREAMK) && !defined(TPQ_PINGPONG) && TPQ_TILE_TOKENS <= 64
#define CUTLASS_ENABLE_GDC_FOR_SM90 1
constexpr bool kGridDependencyControl = true;
#else
constexpr bool kGridDependencyControl = false;
#endif
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

#ifndef TPQ_QUANT
#define TPQ_QUANT 0
#endif
#ifndef TPQ_MODE
#define TPQ_MODE 0
#endif
#ifndef TPQ_TILE_TOKENS
#define TPQ_TILE_TOKENS 128
#endif
#ifndef TPQ_TILE_ROWS
#define TPQ_TILE_ROWS 128
#endif
#ifndef TPQ_TILE_K
#define TPQ_TILE_K 64
#endif
#ifndef TPQ_CLUSTER
#define TPQ_CLUSTER 1
#endif

using namespace cute;

#ifdef TPQ_FP16
using ElementX = cutlass::half_t;
#else
using ElementX = cutlass::bfloat16_t;
#endif
#if TPQ_QUANT == 0
using ElementQ = cutlass::int4b_t;
#elif TPQ_QUANT == 1
using ElementQ = cutlass::uint4b_t;
#else
using ElementQ = int8_t;
#endif
// The reorder atom of CUTLASS's shuffled sub-byte layout, as tools/util/include/cutlass/util/
// mixed_dtype_utils.hpp builds it (compute_memory_reordering_atom; that header also pulls in
// the host tensor utilities): the 16 x 16 block one warp's wgmma A fragments cover, four of
// them along K for int4, values shuffled [0, 2, 4, 6, 1, 3, 5, 7] so that a lane's 8 codes of a
// 32-bit word unpack with shifts alone (16 rows x 64 features); two for int8, values shuffled
// [0, 2, 1, 3] so that a word's bytes 0 / 2 and 1 / 3 are pairs (16 x 32). One tpquant tile.
template <class ElementMma, class AtomLayout, class ValLayout>
constexpr auto reorder_atom(AtomLayout atom_layout, ValLayout val_layout) {
  using MmaAtom = decltype(SM90::GMMA::rs_op_selector<ElementMma, ElementMma, float, Shape<_64, _16, _32>>());
  using Traits = MMA_Traits<MmaAtom>;
  auto mk_shape_mma = select<0, 2>(typename Traits::Shape_MNK{});
  auto tv_layout_mma = typename Traits::ALayout{};
  auto tv_tiler_warp = make_shape(Int<32>{}, size<1>(tv_layout_mma));
  auto mk_shape_warp = shape_div(mk_shape_mma, size(typename Traits::ThrID{}) / Int<32>{});
  auto tv_layout_warp = make_layout_like(composition(tv_layout_mma, tv_tiler_warp));
  auto mk_layout_warp = right_inverse(tv_layout_warp).with_shape(mk_shape_warp);
  auto mk_layout_target = blocked_product(mk_layout_warp, atom_layout);
  auto val_to_offset = logical_product(val_layout, size<1>(tv_layout_mma) / size(val_layout) * size(atom_layout));
  auto thr_to_offset = make_layout(size<0>(tv_layout_warp));
  auto tv_to_offset = select<1, 0>(logical_product(val_to_offset, thr_to_offset));
  return composition(tv_to_offset, mk_layout_target);
}

using StrideW = cutlass::detail::TagToStrideB_t<cutlass::layout::ColumnMajor>;  // [N, K], K fastest
#if TPQ_QUANT == 2
using TileAtom = decltype(reorder_atom<ElementX>(Layout<Shape<_1, _2>>{}, Layout<Shape<_2, _2>, Stride<_2, _1>>{}));
#else
using TileAtom = decltype(reorder_atom<ElementX>(Layout<Shape<_1, _4>>{}, Layout<Shape<_2, _4>, Stride<_4, _1>>{}));
#endif
using KFastest = Step<_2, _1, _3>;  // tiles in (row tile, k tile) order, k tiles fastest
using LayoutW = decltype(cute::tile_to_shape(TileAtom{}, Layout<Shape<int, int, int>, StrideW>{}, KFastest{}));

#if TPQ_MODE == 0
using ElementWTuple = ElementQ;
#elif TPQ_MODE == 1
using ElementWTuple = cute::tuple<ElementQ, float>;
#else
using ElementWTuple = cute::tuple<ElementQ, float, float>;
#endif

using LayoutX = cutlass::layout::RowMajor;  // [M, K]
using LayoutXT = cutlass::layout::LayoutTranspose<LayoutX>::type;
using LayoutOutT = cutlass::layout::ColumnMajor;  // D^T of a row-major [M, N]
constexpr int kAlignX = 128 / cutlass::sizeof_bits<ElementX>::value;
constexpr int kAlignW = 128 / cutlass::sizeof_bits<ElementQ>::value;
using StrideX = cutlass::detail::TagToStrideA_t<LayoutX>;

using TileShape = Shape<Int<TPQ_TILE_ROWS>, Int<TPQ_TILE_TOKENS>, Int<TPQ_TILE_K>>;
using ClusterShape = Shape<Int<TPQ_CLUSTER>, _1, _1>;
#ifdef TPQ_PINGPONG
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
#else
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
#endif
#ifdef TPQ_STREAMK
using TileScheduler = cutlass::gemm::StreamKScheduler;
#else
using TileScheduler = void;  // persistent, data-parallel
#endif

// out^T = alpha[row] * acc + bias[row], float32 arithmetic, no C operand.
using Fusion = cutlass::epilogue::fusion::PerRowLinCombPerRowBiasEltAct<
    cutlass::epilogue::thread::Identity, ElementX, float, float, ElementX, float>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, LayoutOutT, kAlignX, ElementX, LayoutOutT, kAlignX, EpilogueSchedule, Fusion>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementWTuple, LayoutW, kAlignW,
    ElementX, LayoutXT, kAlignX, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                        CollectiveEpilogue, TileScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
using StrideOut = typename GemmKernel::StrideD;

static typename Gemm::Arguments make_args(const void* x, const void* w, const float* scales, const float* zeros,
                                          const float* alpha, const float* bias, void* out, int M, int N, int K,
                                          int group) {
  LayoutW layout_w = cute::tile_to_shape(TileAtom{}, cute::make_shape(N, K, 1), KFastest{});
  StrideX stride_x = cutlass::make_cute_packed_stride(StrideX{}, cute::make_shape(M, K, 1));
  StrideOut stride_out = cutlass::make_cute_packed_stride(StrideOut{}, cute::make_shape(N, M, 1));
  typename CollectiveMainloop::Arguments mainloop{static_cast<const ElementQ*>(w), layout_w,
                                                  static_cast<const ElementX*>(x), stride_x};
#if TPQ_MODE != 0
  mainloop.ptr_S = scales;
  using StrideScale = typename CollectiveMainloop::StrideScale;
  mainloop.dS = cutlass::make_cute_packed_stride(StrideScale{}, cute::make_shape(N, K / group, 1));
  mainloop.group_size = group;
#endif
#if TPQ_MODE == 2
  mainloop.ptr_Z = zeros;
#endif
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                {N, M, K, 1},
                                mainloop,
                                {{}, nullptr, stride_out, static_cast<ElementX*>(out), stride_out}};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.alpha_ptr = alpha;  // null: alpha = 1
  args.epilogue.thread.bias_ptr = bias;    // null: no bias
  return args;
}

extern "C" {

// Bytes of device workspace a call needs.
size_t tpq_mixed_gemm_workspace(int M, int N, int K, int group) {
  return Gemm::get_workspace_size(make_args(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M, N,
                                            K, group));
}

// Whether CUTLASS takes the problem (alignment, group size): 0 if so, else a cutlass::Status.
int tpq_mixed_gemm_check(int M, int N, int K, int group) {
  return int(Gemm::can_implement(make_args(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K,
                                           group)));
}

// Runs out = x @ dequant(W)^T * alpha + bias on `stream` of `device` (this library's static
// CUDA runtime keeps its own current device), launched with PDL if `pdl` and the
// instantiation waits for the kernel before (kGridDependencyControl). 0 on success, else
// 1000 + a cutlass::Status or 2000 + a cudaError_t.
int tpq_mixed_gemm(int device, const void* x, const void* w, const float* scales, const float* zeros, const float* alpha,
                   const float* bias, void* out, int M, int N, int K, int group, void* workspace,
                   cudaStream_t stream, int pdl) {
  cudaError_t error = cudaSetDevice(device);
  if (error != cudaSuccess) return 2000 + int(error);
  auto args = make_args(x, w, scales, zeros, alpha, bias, out, M, N, K, group);
  Gemm gemm;
  cutlass::Status status = gemm.initialize(args, workspace, stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(stream, nullptr, pdl != 0 && kGridDependencyControl);
  if (status != cutlass::Status::kSuccess) return 1000 + int(status);
  error = cudaGetLastError();
  return error == cudaSuccess ? 0 : 2000 + int(error);
}

}  // extern "C"
