// Read-only streams of a weight buffer, for benchmarks/probe_stream.py: how fast can a kernel
// only read the bytes the tiled GEMV reads (no arithmetic), two ways.
//
// stream_regs<U, KW>: the tiled GEMV's access pattern (cpp/weight_only_gemv.cu, wo_tiles, one
// row tile a warp): block = KW warps over one row tile of tiles_k 512-byte k-tiles, warp kw
// taking turns of U k-tiles, two register sets (the next round's loads issued before the
// current round is used). The words are XOR-ed together.
// stream_bulk<S, B, CW>: a ring of S stages of B bytes in shared memory, filled by one thread
// with cp.async.bulk (the copy engine of the SM: one instruction a stage, the completion on an
// mbarrier), read by CW consumer warps with 16-byte shared loads. Each block streams one
// contiguous range of the buffer; grid = a few blocks an SM.
// stream_ring<U, KW, S>: the pattern of 44d661d's ring GEMV (design note 41): as stream_regs,
// but each warp copies its rounds with cp.async into S slots of shared memory of its own, S - 1
// rounds ahead, and each lane reads back the 16 bytes it copied.
// All launch with PDL: the weight loads go out before griddepcontrol.wait.
typedef unsigned int u32;

__device__ __forceinline__ void pdl_wait_then_signal() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

template <int U, int KW>
__global__ void __launch_bounds__(KW * 32) stream_regs(const uint4* __restrict__ w, u32* out,
                                                      int tiles_k) {
  const int lane = threadIdx.x & 31, kw = threadIdx.x >> 5;
  const uint4* wt = w + (size_t)blockIdx.x * tiles_k * 32 + lane;
  uint4 a[U], b[U];
  u32 acc = 0;
  const int step = KW * U;
#pragma unroll
  for (int u = 0; u < U; ++u)
    a[u] = kw * U + u < tiles_k ? ldg_stream(wt + (size_t)(kw * U + u) * 32) : make_uint4(0, 0, 0, 0);
  pdl_wait_then_signal();
  for (int T0 = kw * U; T0 < tiles_k; T0 += 2 * step) {
#pragma unroll
    for (int u = 0; u < U; ++u)
      b[u] = T0 + step + u < tiles_k ? ldg_stream(wt + (size_t)(T0 + step + u) * 32)
                                     : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= a[u].x ^ a[u].y ^ a[u].z ^ a[u].w;
    if (T0 + step >= tiles_k) break;
#pragma unroll
    for (int u = 0; u < U; ++u)
      a[u] = T0 + 2 * step + u < tiles_k ? ldg_stream(wt + (size_t)(T0 + 2 * step + u) * 32)
                                         : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= b[u].x ^ b[u].y ^ b[u].z ^ b[u].w;
  }
  if (acc == 0x9E3779B9u) out[blockIdx.x] = acc;  // keeps the loads; (almost) never stores
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  return (u32)__cvta_generic_to_shared(p);
}

// One round (U k-tiles from T0) of a warp's row tile into a ring slot; zeros past K.
template <int U>
__device__ __forceinline__ void ring_copy(const uint4* wt, int T0, int tiles_k, uint4* slot) {
  if (T0 >= tiles_k) return;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const bool in = T0 + u < tiles_k;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(slot + u * 32)),
                 "l"(wt + (size_t)(in ? T0 + u : T0) * 32), "r"(in ? 16 : 0) : "memory");
  }
}

template <int U, int KW, int S>
__global__ void __launch_bounds__(KW * 32) stream_ring(const uint4* __restrict__ w, u32* out,
                                                      int tiles_k) {
  extern __shared__ uint4 slots[];  // [KW][S][U][32 lanes]
  const int lane = threadIdx.x & 31, kw = threadIdx.x >> 5, step = KW * U;
  const uint4* wt = w + (size_t)blockIdx.x * tiles_k * 32 + lane;
  uint4* const mine = slots + kw * S * U * 32 + lane;
#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    ring_copy<U>(wt, kw * U + i * step, tiles_k, mine + i * U * 32);
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  pdl_wait_then_signal();
  u32 acc = 0;
  int read = 0;
  for (int T0 = kw * U; T0 < tiles_k; T0 += step) {
    ring_copy<U>(wt, T0 + (S - 1) * step, tiles_k, mine + (read == 0 ? S - 1 : read - 1) * U * 32);
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group %0;" ::"n"(S - 1) : "memory");
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint4 v = mine[(read * U + u) * 32];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    read = read + 1 == S ? 0 : read + 1;
  }
  if (acc == 0x9E3779B9u) out[blockIdx.x] = acc;
}

__device__ __forceinline__ void mbar_init(unsigned long long* bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(unsigned long long* bar, u32 parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity) : "memory");
}

__device__ __forceinline__ void bulk_load(void* dst, const void* src, u32 bytes,
                                          unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

// chunks: B-byte pieces of the whole buffer; block b takes pieces [b * per, (b + 1) * per).
template <int S, int B, int CW>
__global__ void __launch_bounds__((CW + 1) * 32) stream_bulk(const unsigned char* __restrict__ w,
                                                            u32* out, int chunks, int per) {
  extern __shared__ __align__(128) unsigned char ring[];  // S * B bytes
  __shared__ unsigned long long full[S], empty[S];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c0 = blockIdx.x * per, c1 = min(c0 + per, chunks);
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], CW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == CW) {  // the producer
    if (lane == 0) {
      for (int c = c0, i = 0; c < c1; ++c, ++i) {
        const int s = i % S;
        if (i >= S) mbar_wait(&empty[s], ((i / S) - 1) & 1);
        mbar_expect_tx(&full[s], B);
        bulk_load(ring + s * B, w + (size_t)c * B, B, &full[s]);
      }
    }
    pdl_wait_then_signal();
    return;
  }
  pdl_wait_then_signal();
  u32 acc = 0;
  constexpr int PER_LANE = B / (CW * 32 * 16);
  for (int c = c0, i = 0; c < c1; ++c, ++i) {
    const int s = i % S;
    mbar_wait(&full[s], (i / S) & 1);
    const uint4* src = reinterpret_cast<const uint4*>(ring + s * B) + warp * 32 * PER_LANE + lane;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const uint4 v = src[32 * j];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
  }
  if (acc == 0x9E3779B9u) out[blockIdx.x] = acc;
}
