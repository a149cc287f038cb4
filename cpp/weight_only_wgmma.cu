// Weight-only GEMM for M >= 128 on Hopper: the weight's codes converted to x's dtype in shared
// memory, then the tensor cores' wgmma with both operands in shared memory.
//
//   out[M, N] (x's dtype) = x[M, K] @ (q * scale[:, None])^T (+ bias), W in the tiled layouts of
//   tpquant/kernels/tiles.py (int8 "tiles16x32", int4 "tiles16x64"), scale / bias float32 [N].
//
// tpquant/kernels/wgmma_weight_only.py compiles this file at first use (NVRTC through CuPy, for
// sm_90a: wgmma is an sm_90a instruction), like weight_only_gemv.cu: no #include.
//
// Why not the register-sourced mixed-input wgmma (CUTLASS, cpp/mixed_input_gemm.cu): there the
// consumer warps convert a k-step's codes between their own wgmmas, and it reached 0.70-0.84 of
// cuBLAS bf16 at M = 256-1024 (design notes 34, 36). Here the wgmma is issued first and runs
// asynchronously while the same warps convert the next k-step's codes into the other of two
// shared-memory buffers, so the conversion hides under the tensor cores' work.
//
// The GEMM is D[token, row] = X W^T: wgmma's A is x (BM = 64 WG tokens, one warpgroup per 64),
// its B the converted weight (BN rows); both K-major in 128-byte rows of a 64-feature k-step,
// with the 128-byte swizzle (16-byte chunk c of row r stored at chunk c ^ (r % 8)), so that a
// wgmma reads without bank conflicts and a lane's 16-byte stores of converted rows meet none.
// Per k-step: x and the codes arrive by cp.async, STAGES - 1 steps ahead; the block converts
// step kt + 1 while step kt's four k16 wgmmas run; then waits for them.
//
// Numerics (per channel): codes are exact in float16 / bfloat16, the tensor cores sum x q in
// float32, and the epilogue multiplies by the channel's scale and adds the bias in float32,
// rounding once to x's dtype (as the CUTLASS path and the tiled GEMV do).
//
// The tiles: a 512-byte tile holds 16 rows; lane l = 4 g + t of it holds rows g and g + 8 at
// int4 features 16 t .. 16 t + 15 of its 64 (word s: nibbles 0 / 4, 2 / 6 row g at 4 s + 0 / 1,
// 2 / 3; nibbles 1 / 5, 3 / 7 row g + 8), int8 features 8 t .. 8 t + 7 of its 32 (word s:
// bytes 0 / 2 row g at 2 s + 0 / 1, bytes 1 / 3 row g + 8). So each lane writes whole 16-byte
// chunks of two rows.

typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef WG_FENCE_LATE
#define WG_FENCE_LATE 0
#endif
#ifndef WG_SKIP
#define WG_SKIP 0  // probe only: 1 skips the conversion, 2 the wgmma, 3 both
#endif

// MODE: 0 int8 per channel, 1 int4 per channel (two's complement codes); DT: 0 float16,
// 1 bfloat16 (the codes of weight_only_gemv.cu).
template <int MODE> struct WgPlan {
  static constexpr int TILES_K = MODE == 0 ? 2 : 1;  // 512-byte tiles per 16 rows and k-step
};

// wgmma m64nNk16, both operands K-major in shared memory, float32 accumulators (+=).
template <int DT, int N> struct Wgmma;

template <> struct Wgmma<0, 64> {
  static __device__ __forceinline__ void mma(float (&d)[32], u64 a, u64 b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, 1, 1, 1, 0, 0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b));
  }
};

template <> struct Wgmma<0, 128> {
  static __device__ __forceinline__ void mma(float (&d)[64], u64 a, u64 b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, 1, 1, 1, 0, 0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b));
  }
};

template <> struct Wgmma<0, 256> {
  static __device__ __forceinline__ void mma(float (&d)[128], u64 a, u64 b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, 1, 1, 1, 0, 0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(a), "l"(b));
  }
};

template <> struct Wgmma<1, 64> {
  static __device__ __forceinline__ void mma(float (&d)[32], u64 a, u64 b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, 1, 1, 1, 0, 0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b));
  }
};

template <> struct Wgmma<1, 128> {
  static __device__ __forceinline__ void mma(float (&d)[64], u64 a, u64 b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, 1, 1, 1, 0, 0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b));
  }
};

template <> struct Wgmma<1, 256> {
  static __device__ __forceinline__ void mma(float (&d)[128], u64 a, u64 b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, 1, 1, 1, 0, 0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(a), "l"(b));
  }
};


// A shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte swizzle, 8-row groups
// 1024 bytes apart (the stride), the start a multiple of 16 (k16 steps add 32 bytes to it).
__device__ __forceinline__ u64 smem_desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

// Byte offset of 16-byte chunk c (0-7) of row r in a swizzled tile of 128-byte rows.
__device__ __forceinline__ u32 swizzled(int r, int c) {
  return (u32)((r >> 3) * 1024 + (r & 7) * 128 + ((c ^ (r & 7)) << 4));
}

__device__ __forceinline__ void wg_copy16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void wg_store16(u32 dst, u32 a, u32 b, u32 c, u32 d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" :: "r"(dst), "r"(a), "r"(b), "r"(c),
               "r"(d) : "memory");
}

__device__ __forceinline__ uint4 wg_load16(u32 src) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(src));
  return v;
}

template <int DT> __device__ __forceinline__ u32 wg_sub2(u32 a, u32 b) {
  u32 d;
  if (DT == 0) {
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("sub.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  }
  return d;
}

template <int DT> __device__ __forceinline__ u32 wg_pack2(float lo, float hi) {
  u32 d;
  if (DT == 0) {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  }
  return d;
}

// Two int4 codes (nibbles at bits 0 and 16 of v) -> the pair (q0, q1) in x's dtype, exactly:
// the code's u = q + 8 under the magic exponent (float16 1024 + u, bfloat16 128 + u), less 1032
// / 136. One LOP3 and one paired subtract.
template <int DT> __device__ __forceinline__ u32 int4_pair(u32 v) {
  // (magic | 8) both XORs the nibble to u and sets the exponent; as a number it is 1032 / 136
  const u32 magic = DT == 0 ? 0x64086408u : 0x43084308u;
  return wg_sub2<DT>((v & 0x000F000Fu) ^ magic, magic);
}

// Bytes LO, HI of an int8 word already XOR-ed to u = q + 128 -> the pair (q_lo, q_hi) in x's
// dtype, exactly: float16 1024 + u (one byte permute under 0x64) less 1152; bfloat16 has 8
// significant bits, so through float32's 2^23 + u (permutes under 0x4B000000) less 2^23 + 128.
template <int DT, int LO, int HI> __device__ __forceinline__ u32 int8_pair(u32 u) {
  if (DT == 0) {
    u32 h;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(h) : "r"(u), "r"(0x64646464u), "n"(LO | 4 << 4 | HI << 8 | 4 << 12));
    return wg_sub2<DT>(h, 0x64806480u);
  }
  u32 lo, hi;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(lo) : "r"(u), "r"(0x4B000000u), "n"(0x7540 | LO));
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(hi) : "r"(u), "r"(0x4B000000u), "n"(0x7540 | HI));
  return wg_pack2<DT>(__uint_as_float(lo) - 8388736.f, __uint_as_float(hi) - 8388736.f);
}

// One lane's share of converting a tile: its 16 bytes `v` (rows g and g + 8) into the swizzled
// buffer at `buf` (rows of the block's BN), 16 features (int4) or 8 (int8) of each row.
template <int DT, int MODE>
__device__ __forceinline__ void convert_lane(uint4 v, u32 buf, int row, int chunk) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
  if (MODE == 1) {
    u32 lo[8], hi[8];  // row g, row g + 8: features 4 s + 0..3 as two pairs each
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      lo[2 * s] = int4_pair<DT>(w[s]);
      lo[2 * s + 1] = int4_pair<DT>(w[s] >> 8);
      hi[2 * s] = int4_pair<DT>(w[s] >> 4);
      hi[2 * s + 1] = int4_pair<DT>(w[s] >> 12);
    }
    wg_store16(buf + swizzled(row, chunk), lo[0], lo[1], lo[2], lo[3]);
    wg_store16(buf + swizzled(row, chunk + 1), lo[4], lo[5], lo[6], lo[7]);
    wg_store16(buf + swizzled(row + 8, chunk), hi[0], hi[1], hi[2], hi[3]);
    wg_store16(buf + swizzled(row + 8, chunk + 1), hi[4], hi[5], hi[6], hi[7]);
  } else {
    u32 lo[4], hi[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const u32 u = w[s] ^ 0x80808080u;  // u = q + 128
      lo[s] = int8_pair<DT, 0, 2>(u);        // bytes 0 / 2: row g
      hi[s] = int8_pair<DT, 1, 3>(u);        // bytes 1 / 3: row g + 8
    }
    wg_store16(buf + swizzled(row, chunk), lo[0], lo[1], lo[2], lo[3]);
    wg_store16(buf + swizzled(row + 8, chunk), hi[0], hi[1], hi[2], hi[3]);
  }
}

__device__ __forceinline__ u32 shared_address(const void* p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

// mbarriers (shared::cta): init, arrive, the cp.async arrival (fires when this thread's earlier
// cp.async copies have landed; .noinc: counted in the init count), and the wait on a phase.
__device__ __forceinline__ void bar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void bar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}

__device__ __forceinline__ void bar_arrive_copies(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(bar) : "memory");
}

__device__ __forceinline__ void bar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{ .reg .pred done;\n"
      "WAIT_%=: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=; }" :: "r"(bar), "r"(parity) : "memory");
}

// Shared memory of a block: STAGES stages of x (BM rows of 128 bytes), two converted k-steps of
// the weight (BN rows), STAGES stages of codes; every part 1024-byte aligned (the swizzle's
// period), the whole aligned at run time (+ 1024 bytes of slack); then 2 STAGES mbarriers.
template <int MODE, int WG, int BN, int STAGES> struct WgLayout {
  static constexpr int BM = 64 * WG;
  static constexpr int CONSUMERS = 128 * WG;  // threads of the warpgroups
  static constexpr int THREADS = CONSUMERS + 128;  // and a producer warpgroup
  static constexpr int TILES = BN / 16 * WgPlan<MODE>::TILES_K;  // code tiles of a k-step
  static constexpr int X_BYTES = BM * 128;
  static constexpr int B_BYTES = BN * 128;
  static constexpr int W_BYTES = TILES * 512;
  static constexpr int B_OFF = STAGES * X_BYTES;
  static constexpr int W_OFF = B_OFF + 2 * B_BYTES;
  static constexpr int BAR_OFF = W_OFF + STAGES * W_BYTES;  // full[STAGES], empty[STAGES]
  static constexpr int BYTES = BAR_OFF + 16 * STAGES + 1024;
};

// grid = (N / BN, M / BM) rounded up; block = 128 WG + 128 threads. N % 16 == 0, K % 64 == 0,
// 16-byte aligned x, w and out (the host checks).
//
// Warp specialised: the last warpgroup copies stages (cp.async, STAGES ahead, each stage's arrival
// on its "full" mbarrier; a slot is reused once the consumers' wgmmas that read it are done,
// its "empty" mbarrier); the warpgroups convert and multiply. Only the converting threads may
// fence the generic proxy's writes for wgmma (fence.proxy.async): the fence also waits for the
// thread's own copies in flight, which stalled every k-step by a copy's latency (1.6 us) when
// the same threads issued them.
template <int DT, int MODE, int WG, int BN, int STAGES>
__global__ void __launch_bounds__(128 * WG + 128) wo_wgmma(
    const unsigned short* __restrict__ x, const uint4* __restrict__ w,
    const float* __restrict__ scale, const float* __restrict__ bias,
    unsigned short* __restrict__ out, int M, int N, int K) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = WgLayout<MODE, WG, BN, STAGES>;
  constexpr int TILES_K = WgPlan<MODE>::TILES_K;
  extern __shared__ unsigned char wg_smem[];
  const u32 base = (shared_address(wg_smem) + 1023u) & ~1023u;
  const u32 full = base + L::BAR_OFF, empty = full + 8 * STAGES;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * L::BM;
  const int steps = K >> 6;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      bar_init(full + 8 * s, 128);                 // the producer's threads
      bar_init(empty + 8 * s, L::CONSUMERS / 32);  // a lane of each consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  // PDL: x is the kernel before's output (weight_only_gemv.cu's wait_then_signal).
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

  if (warp >= 4 * WG) {  // the producer warpgroup: k-step kt's x (zeros past M) and codes
    constexpr int XC = L::BM * 8 / 128, WC = L::TILES * 32 / 128;  // 16-byte copies a thread
    static_assert(L::BM * 8 % 128 == 0 && L::TILES * 32 % 128 == 0, "whole copies per thread");
    const int p = tid - L::CONSUMERS;
    // each copy's source at k-step 0, its bytes and its place in a stage (k-steps add 64
    // features: 128 bytes of x, TILES_K tiles of codes)
    const unsigned short* xsrc[XC];
    u32 xdst[XC];
    int xbytes[XC];
#pragma unroll
    for (int i = 0; i < XC; ++i) {
      const int c = p + 128 * i, r = c >> 3, m = m0 + r;
      xsrc[i] = x + (size_t)min(m, M - 1) * K + (c & 7) * 8;
      xdst[i] = swizzled(r, c & 7);
      xbytes[i] = m < M ? 16 : 0;
    }
    const unsigned char* wsrc[WC];
    bool wok[WC];
#pragma unroll
    for (int i = 0; i < WC; ++i) {
      const int c = p + 128 * i, tile = c >> 5, R = (n0 >> 4) + tile / TILES_K;
      wok[i] = R < (N >> 4);
      wsrc[i] = reinterpret_cast<const unsigned char*>(w) +
                ((size_t)min(R, (N >> 4) - 1) * steps * TILES_K + tile % TILES_K) * 512 + (c & 31) * 16;
    }
    for (int kt = 0; kt < steps; ++kt) {
      const int slot = kt % STAGES;
      if (kt >= STAGES) bar_wait(empty + 8 * slot, (kt / STAGES - 1) & 1);
      const u32 xs = base + slot * L::X_BYTES, ws = base + L::W_OFF + slot * L::W_BYTES;
#pragma unroll
      for (int i = 0; i < XC; ++i) wg_copy16(xs + xdst[i], xsrc[i] + kt * 64, xbytes[i]);
#pragma unroll
      for (int i = 0; i < WC; ++i) {
        if (wok[i]) wg_copy16(ws + (p + 128 * i) * 16, wsrc[i] + kt * TILES_K * 512, 16);
      }
      bar_arrive_copies(full + 8 * slot);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");  // leave no copy of this warp in flight
    return;
  }

  // k-step kt's codes -> x's dtype in buffer kt % 2: a warp a tile at a time; then the fence
  // that lets wgmma read them (and the stage's x, which this thread has waited for).
  auto convert = [&](int kt) {
    const int slot = kt % STAGES;
    bar_wait(full + 8 * slot, (kt / STAGES) & 1);
    const u32 ws = base + L::W_OFF + slot * L::W_BYTES;
    const u32 bs = base + L::B_OFF + (kt & 1) * L::B_BYTES;
    for (int tile = warp; tile < L::TILES && !(WG_SKIP & 1); tile += L::CONSUMERS / 32) {
      const int r = tile / TILES_K, j = tile % TILES_K;
      if (n0 + 16 * r >= N) break;  // later tiles are past N too
      const uint4 v = wg_load16(ws + tile * 512 + lane * 16);
      const int g = lane >> 2, t = lane & 3;
      convert_lane<DT, MODE>(v, bs, 16 * r + g, MODE == 0 ? 4 * j + t : 2 * t);
    }
#if !WG_FENCE_LATE
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
  };
  // the consumers' barrier (named barrier 1: the producer runs on)
  auto consumers_sync = [] { asm volatile("bar.sync 1, %0;" :: "n"(L::CONSUMERS) : "memory"); };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

  convert(0);
  consumers_sync();
  const int wg = warp >> 2;  // this warpgroup's 64 tokens
  for (int kt = 0; kt < steps; ++kt) {
    const u64 da = smem_desc(base + (kt % STAGES) * L::X_BYTES + wg * 64 * 128);
    const u64 db = smem_desc(base + L::B_OFF + (kt & 1) * L::B_BYTES);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int j = 0; j < 4 && !(WG_SKIP & 2); ++j) Wgmma<DT, BN>::mma(acc, da + 2 * j, db + 2 * j);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    // while the tensor cores run: the next step's conversion (its buffer was read by step
    // kt - 1's wgmmas, complete at that step's end)
    if (kt + 1 < steps) convert(kt + 1);
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) asm volatile("" : "+f"(acc[i]) :: "memory");
#if WG_FENCE_LATE
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
    if (lane == 0) bar_arrive(empty + 8 * (kt % STAGES));  // this warp is done with the slot
    consumers_sync();
  }

  // D fragments: warp w of the warpgroup holds tokens 16 w + g (+ 8), rows 8 i + 2 q (+ 1).
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    const int n = n0 + 8 * i + 2 * q;
    if (n >= N) continue;  // N % 16 == 0: a pair is whole
    const float2 s = *reinterpret_cast<const float2*>(scale + n);
    const float2 b = bias ? *reinterpret_cast<const float2*>(bias + n) : make_float2(0.f, 0.f);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + 64 * wg + 16 * (warp & 3) + g + 8 * h;
      if (m < M) {
        *reinterpret_cast<u32*>(out + (size_t)m * N + n) =
            wg_pack2<DT>(acc[4 * i + 2 * h] * s.x + b.x, acc[4 * i + 2 * h + 1] * s.y + b.y);
      }
    }
  }
#endif
}
