// Weight-only GEMV for small M: y[M, N] = x[M, K] @ W^T (+ bias), W stored as integer codes.
//
// tpquant/kernels/cuda_weight_only.py compiles this file at first use (NVRTC through CuPy,
// cached by CuPy), one module per (dtype, mode, pre-quant scale), and launches it on torch's
// current stream (so it can be captured in CUDA graphs). NVRTC compatible on purpose: no
// #include (half / bfloat16 arithmetic is inline PTX on 32-bit registers holding two values).
//
// Layouts: those of tpquant.kernels.weight_only (the fma and mma kernels): qweight int8 [N, K] or
// packed uint8 [N, K/2] (low nibble = even k), per-channel scale float32 [N], group scales /
// zeros float32 [K/g, N], pre-quant scale float32 [K], bias float32 [N]; and (the tiled kernel,
// at the end of this file) int8 / int4 in tpquant.kernels.tiles' layouts.
//
// Work split: a warp owns ROWS consecutive output rows and all M rows of x; its lanes walk
// the K range of the warp's split in 16-byte "chunks" of each weight row (32 int4 or 16 int8
// codes), lane l taking chunks l, l + 32, ... Each chunk lies in one group (the host checks
// that the group size is a multiple of 32). grid = (row groups, K splits); with one split the
// kernel writes y, with several it writes float32 partials [split, M, N] that wo_reduce sums
// in split order (deterministic, no atomics).
//
// Numerics. Codes become numbers without an int->float instruction: OR-ing a code u into the
// mantissa of a "magic" value gives exactly MAGIC + u (float16 1024 + u; bfloat16 128 + u for
// u < 16), and one fma then gives (u - OFF) / OFF exactly: q / 8 for int4, q / 128 for int8
// (|q / OFF| <= 1 keeps the half-precision partial sums small). Two codes travel in one 32-bit
// register, so every step is a paired (f16x2 / bf16x2) instruction: the pairs are (k, k+4)
// for int4 words and (k, k+2) for int8 words (what a mask on the word yields); x is permuted
// into the same pairs with one byte-permute per pair, shared by the warp's rows.
// bfloat16 int8 codes (256 values do not fit bfloat16's significand at one exponent) go
// through float32 instead: the byte becomes 2^23 + u with one byte-permute, one fma gives q/128.
// Products x * q / OFF are summed in the paired type over one word (bfloat16: 4 products a
// lane) or one chunk (float16: 16 products), then in float32. A group's zero enters through
// the sum of x over the chunk: sum x (u - z) = OFF * (sum x q/OFF + (OFF - z)/OFF sum x),
// so the codes need no per-group arithmetic. That sum of x is kept in float32: with a zero
// far from OFF it is multiplied up and nearly cancels the first term, so half-precision
// partial sums there cost up to 2-3x a bfloat16 rounding of the output (GPU test at
// K = 4096). Scales multiply float32 sums.

typedef unsigned int u32;
typedef unsigned long long u64;

#define WO_WARPS 4  // warps per block
#define WO_CHUNK_WORDS 4  // 32-bit weight words one lane loads per row per chunk (16 bytes)

// MODE: 0 int8 per channel, 1 int4 per channel, 2 groupwise int4 with zeros (codes 0..15),
// 3 groupwise int4 symmetric (signed codes). DT: 0 float16, 1 bfloat16.
template <int MODE> struct Mode {
  static constexpr int BITS = MODE == 0 ? 8 : 4;
  static constexpr int PAIRS = 16 / BITS;  // value pairs per 32-bit word
  static constexpr int ELEMS = 32 / BITS;  // codes per word
  static constexpr int OFF = MODE == 0 ? 128 : 8;  // u = q + OFF
  // XOR that turns a stored two's-complement code into u = q + OFF (zeros mode: already u).
  static constexpr u32 FLIP = MODE == 0 ? 0x80808080u : (MODE == 2 ? 0u : 0x88888888u);
  static constexpr u32 MASK = MODE == 0 ? 0x00FF00FFu : 0x000F000Fu;
  static constexpr bool GROUPED = MODE >= 2;
  static constexpr bool ZEROS = MODE == 2;
};

// ---- paired half-precision arithmetic (two values in a u32) --------------------------------

template <int DT> __device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
  u32 d;
  if (DT == 0) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}

// a * b: an fma with -0 adds nothing (and keeps the sign of a zero product); one instruction.
template <int DT> __device__ __forceinline__ u32 mul2(u32 a, u32 b) {
  return fma2<DT>(a, b, 0x80008000u);
}

// (lo, hi) floats -> one register, lo in the low half.
template <int DT> __device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 d;
  if (DT == 0) {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  }
  return d;
}

// Sum of the two halves, in float32.
template <int DT> __device__ __forceinline__ float hsum(u32 v) {
  if (DT == 0) {
    float lo, hi;
    asm("{.reg .f16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;}"
        : "=f"(lo), "=f"(hi) : "r"(v));
    return lo + hi;
  } else {
    return __uint_as_float(v << 16) + __uint_as_float(v & 0xFFFF0000u);
  }
}

template <int DT> __device__ __forceinline__ unsigned short from_float(float f) {
  return (unsigned short)(pack2<DT>(f, 0.f) & 0xFFFFu);
}

// ---- codes -> value pairs ------------------------------------------------------------------

// The "magic" value codes are OR-ed into (its unit in the last place is 1): float16 1024,
// bfloat16 128; PAIR is it in both halves of a 32-bit register.
template <int DT> struct Magic {
  static constexpr u32 PAIR = DT == 0 ? 0x64006400u : 0x43004300u;
  static constexpr float VALUE = DT == 0 ? 1024.f : 128.f;
};

// The code masks (int8, int4), read from constant memory rather than written as literals: a
// literal mask gets re-created in a register before nearly every mask instruction (the
// compiler reuses the register), a value from memory stays in one (SASS of the int4 fma loop:
// 219 -> 188 instructions per iteration).
__constant__ u32 kCodeMask[2] = {Mode<0>::MASK, Mode<1>::MASK};

// The XOR a stored weight word takes before code_pair: only bfloat16 int8 needs its bytes as
// u = q + OFF; every other code_pair folds the flip into its one mask instruction.
template <int DT, int MODE> __device__ __forceinline__ u32 word_flip() {
  return DT == 1 && MODE == 0 ? Mode<MODE>::FLIP : 0u;
}

// Pair p of a weight word (XOR-ed with word_flip) as q / OFF in the paired type. inv2 /
// shift2: the pairs (1/OFF, 1/OFF) and (-(MAGIC + OFF)/OFF, same).
template <int DT, int MODE>
__device__ __forceinline__ u32 code_pair(u32 w, int p, u32 inv2, u32 shift2) {
  typedef Mode<MODE> Md;
  if constexpr (DT == 1 && MODE == 0) {
    // bfloat16 int8: bytes p and p + 2 through float32 2^23 + u (selector: byte, 0, 0, 0x4B);
    // (2^23 + u) / 128 - (2^23 + 128) / 128 = q / 128, exact in float32.
    const float lo = __uint_as_float(__byte_perm(w, 0x4B000000u, (u32)p | 0x7440u));
    const float hi = __uint_as_float(__byte_perm(w, 0x4B000000u, (u32)(p + 2) | 0x7440u));
    return pack2<1>(fmaf(lo, 0.0078125f, -65537.0f), fmaf(hi, 0.0078125f, -65537.0f));
  } else {
    // The pair's codes, flipped to u and OR-ed into the magic's mantissa: the magic's bits
    // lie outside the mask, so one XOR with (magic | flip) does both (one LOP3).
    const u32 v = ((w >> (p * Md::BITS)) & kCodeMask[Md::BITS == 4]) ^
                  (Magic<DT>::PAIR | (Md::FLIP & Md::MASK));
    return fma2<DT>(v, inv2, shift2);  // (MAGIC + u) / OFF - (MAGIC + OFF) / OFF, exact
  }
}

// code_pair's fma operands for one kernel: inv2 = (1/OFF, 1/OFF), shift2 = (-(MAGIC + OFF)
// / OFF, same), MAGIC being the float16 / bfloat16 value of code_pair's magic.
template <int DT, int MODE> __device__ __forceinline__ void code_pair_operands(u32& inv2,
                                                                               u32& shift2) {
  constexpr float off = Mode<MODE>::OFF, magic = Magic<DT>::VALUE;
  inv2 = pack2<DT>(1.f / off, 1.f / off);
  shift2 = pack2<DT>(-(magic + off) / off, -(magic + off) / off);
}

// x word pair matching code pair p: the x words of one weight word hold its ELEMS values in
// k order, two per word; code pair p is values (p, p + ELEMS/2).
template <int MODE> __device__ __forceinline__ u32 x_pair(const u32* xw, int p) {
  constexpr int half = Mode<MODE>::PAIRS / 2;  // x words between the two values of a pair
  return __byte_perm(xw[p >> 1], xw[(p >> 1) + half], (p & 1) ? 0x7632u : 0x5410u);
}

// 16 bytes of the weight, kept out of L1 (read once; L1 holds x).
__device__ __forceinline__ uint4 load_weight(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Programmatic dependent launch (tpquant/kernels/pdl.py): wait for the kernel before this one
// (its writes visible), then let the next one start; every kernel here does so before it
// touches memory that a kernel may write (the tiled GEMV loads its first weights before it).
// No-ops when launched without PDL. (Prefetching the first weight bytes into L2 before the
// wait measured no faster for the fma / mma GEMVs: docs/design-notes.md, note 24.)
__device__ __forceinline__ void wait_then_signal() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Keeps the loads written above it ahead of the next wait_then_signal. ptxas otherwise moves
// griddepcontrol.wait to the top of the kernel (SASS of nvcc 13.0), so loads meant to overlap
// the kernel before this one were issued after it had ended. A fence on cluster shared memory
// orders them and compiles to no instruction (design note 44). Nothing at the C++ level orders
// them (the loads are non-volatile asm and __ldg), so tests/unit/test_tiles_sass.py reads the
// SASS. The fence is PTX ISA 8.6 (CUDA 12.8); older compilers keep the old order.
__device__ __forceinline__ void loads_before_wait() {
#if __CUDA_ARCH__ >= 900 && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 8))
  asm volatile("fence.acquire.sync_restrict::shared::cluster.cluster;" ::: "memory");
#endif
}

// A 4-byte copy from global to shared memory that holds no register until it is read, after
// wait_async_copies (cp.async: sm_80+, as the tiled GEMV's bfloat16 mma is).
__device__ __forceinline__ void copy_async(float* dst, const float* src) {
  asm volatile("{ .reg .u64 s; cvta.to.shared.u64 s, %0; cp.async.ca.shared.global [s], [%1], 4; }"
               :: "l"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void wait_async_copies() {
  asm volatile("cp.async.wait_all;" ::: "memory");
}

__device__ __forceinline__ u32 word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// One output of either kernel: its float32 sum v times the channel scale (per channel), then
// y = v + bias rounded to x's dtype, or (split-K) the float32 partial of this split.
template <int DT, int MODE>
__device__ __forceinline__ void store_output(float v, int m, int n, int M, int N, int split,
                                             const float* __restrict__ scale,
                                             const float* __restrict__ bias,
                                             void* __restrict__ out, int write_partial) {
  if constexpr (!Mode<MODE>::GROUPED) v *= __ldg(scale + n) * Mode<MODE>::OFF;
  if (write_partial) {
    reinterpret_cast<float*>(out)[((size_t)split * M + m) * N + n] = v;
  } else {
    if (bias) v += bias[n];
    reinterpret_cast<unsigned short*>(out)[(size_t)m * N + n] = from_float<DT>(v);
  }
}

// ---- the GEMV ------------------------------------------------------------------------------

// Adds one chunk (16 weight bytes of each of the warp's ROWS rows, at input feature k0) to
// the lane's sums acc[row][m].
template <int DT, int MODE, bool PQS, int MT, int ROWS>
__device__ __forceinline__ void accumulate_chunk(
    const uint4 (&wv)[ROWS], int k0, const unsigned short* __restrict__ x, int M, int K,
    const float* __restrict__ scale, const float* __restrict__ zeros,
    const float* __restrict__ pqs, int N, int row0, int group, u32 inv2, u32 shift2,
    float (&acc)[ROWS][MT]) {
  typedef Mode<MODE> Md;
  constexpr int X_WORDS = Md::PAIRS;  // x words (2 values each) per weight word
  constexpr int FLUSH = DT == 0 ? WO_CHUNK_WORDS : 1;  // words summed in the paired type
  constexpr int GR = Md::GROUPED ? ROWS : 1, GM = Md::GROUPED ? MT : 1, ZM = Md::ZEROS ? MT : 1;
  constexpr int PQ = PQS ? WO_CHUNK_WORDS * X_WORDS : 1;

  u32 pq[PQ];  // the pre-quant scale of this chunk's x values, paired in k order like x
  if constexpr (PQS) {
    const float4* p4 = reinterpret_cast<const float4*>(pqs + k0);
#pragma unroll
    for (int i = 0; i < PQ / 2; ++i) {
      const float4 f = __ldg(p4 + i);
      pq[2 * i] = pack2<DT>(f.x, f.y);
      pq[2 * i + 1] = pack2<DT>(f.z, f.w);
    }
  }

  u32 hacc[ROWS][MT];  // paired partial sums (float16: the chunk; bfloat16: one word)
  float dacc[GR][GM];  // groupwise: this chunk's float32 sums, before its scale
  float xsum[ZM];      // zeros: sum of x over the chunk, in float32
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) hacc[r][m] = 0u;
#pragma unroll
  for (int r = 0; r < GR; ++r)
#pragma unroll
    for (int m = 0; m < GM; ++m) dacc[r][m] = 0.f;
#pragma unroll
  for (int m = 0; m < ZM; ++m) xsum[m] = 0.f;

#pragma unroll
  for (int j = 0; j < WO_CHUNK_WORDS; ++j) {
    u32 cp[ROWS][Md::PAIRS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const u32 code_word = word(wv[r], j) ^ word_flip<DT, MODE>();
#pragma unroll
      for (int p = 0; p < Md::PAIRS; ++p)
        cp[r][p] = code_pair<DT, MODE>(code_word, p, inv2, shift2);
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const unsigned short* xrow = x + (size_t)min(m, M - 1) * K + k0 + j * Md::ELEMS;
      u32 xw[X_WORDS];
      if constexpr (X_WORDS == 4) {
        const uint4 t = __ldg(reinterpret_cast<const uint4*>(xrow));
        xw[0] = t.x; xw[1] = t.y; xw[2] = t.z; xw[3] = t.w;
      } else {
        const uint2 t = __ldg(reinterpret_cast<const uint2*>(xrow));
        xw[0] = t.x; xw[1] = t.y;
      }
      if constexpr (PQS) {
#pragma unroll
        for (int i = 0; i < X_WORDS; ++i) xw[i] = mul2<DT>(xw[i], pq[j * X_WORDS + i]);
      }
      if constexpr (Md::ZEROS) {
#pragma unroll
        for (int i = 0; i < X_WORDS; ++i) xsum[m] += hsum<DT>(xw[i]);
      }
#pragma unroll
      for (int p = 0; p < Md::PAIRS; ++p) {
        const u32 xp = x_pair<MODE>(xw, p);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) hacc[r][m] = fma2<DT>(cp[r][p], xp, hacc[r][m]);
      }
    }
    if ((j + 1) % FLUSH == 0) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float s = hsum<DT>(hacc[r][m]);
          if constexpr (Md::GROUPED) dacc[r][m] += s; else acc[r][m] += s;
          hacc[r][m] = 0u;
        }
    }
  }
  if constexpr (Md::GROUPED) {
    // sum x (u - z) s = OFF s (sum x q/OFF + (OFF - z)/OFF sum x); symmetric: z = OFF.
    const int g = k0 / group;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int n = min(row0 + r, N - 1);
      const float s = __ldg(scale + (size_t)g * N + n) * Md::OFF;
      float zt = 0.f;
      if constexpr (Md::ZEROS) zt = (Md::OFF - __ldg(zeros + (size_t)g * N + n)) / Md::OFF;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        float d = dacc[r][m];
        if constexpr (Md::ZEROS) d = fmaf(zt, xsum[m], d);
        acc[r][m] = fmaf(s, d, acc[r][m]);
      }
    }
  }
}

// MT: M rounded up (1, 2, 4, 8, 16); rows of x past M repeat row M - 1 and are not stored.
template <int DT, int MODE, bool PQS, int MT, int ROWS>
__device__ __forceinline__ void wo_gemv_body(
    const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
    const float* __restrict__ scale, const float* __restrict__ zeros,
    const float* __restrict__ pqs, const float* __restrict__ bias,
    void* __restrict__ out, int M, int N, int K, int group, int chunks_per_split,
    int write_partial) {
  typedef Mode<MODE> Md;
  constexpr int CHUNK_ELEMS = WO_CHUNK_WORDS * Md::ELEMS;
  constexpr int V = ROWS * MT;

  __shared__ float red[WO_WARPS][32][V + 1];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * WO_WARPS + warp) * ROWS;
  const int split = blockIdx.y;
  const int c_begin = split * chunks_per_split;
  const int c_end = min(c_begin + chunks_per_split, K / CHUNK_ELEMS);
  const size_t row_bytes = (size_t)K * Md::BITS / 8;

  u32 inv2, shift2;
  code_pair_operands<DT, MODE>(inv2, shift2);

  const unsigned char* wrow[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) wrow[r] = w + (size_t)min(row0 + r, N - 1) * row_bytes;

  wait_then_signal();

  float acc[ROWS][MT];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

  // (Measured no faster, design note 21: more bytes in flight, by loading 2 or 4 chunks per
  // lane before computing or through a cp.async ring in shared memory; lanes reading 4-byte
  // words in warp-wide stripes, which makes the x loads contiguous across the lanes.)
  for (int c = c_begin + lane; c < c_end; c += 32) {
    uint4 wv[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) wv[r] = load_weight(wrow[r] + (size_t)c * 16);
    accumulate_chunk<DT, MODE, PQS, MT, ROWS>(wv, c * CHUNK_ELEMS, x, M, K, scale, zeros, pqs,
                                              N, row0, group, inv2, shift2, acc);
  }

  // Sum the lanes: every lane stores its V sums, then lane l adds up value l (and l + 32).
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) red[warp][lane][r * MT + m] = acc[r][m];
  __syncwarp();
#pragma unroll
  for (int v0 = 0; v0 < V; v0 += 32) {
    const int v = v0 + lane;
    if (v < V) {
      float t = 0.f;
#pragma unroll 8
      for (int l = 0; l < 32; ++l) t += red[warp][l][v];
      const int r = v / MT, m = v % MT, n = row0 + r;
      if (m < M && n < N)
        store_output<DT, MODE>(t, m, n, M, N, split, scale, bias, out, write_partial);
    }
  }
}

// ---- the tensor-core GEMV (M up to 32) --------------------------------------------------------
//
// The FMA GEMV above spends 8 instructions per weight word on every row of x it multiplies,
// so it stops keeping up with the memory from M = 2 on. This one hands the products to the
// tensor cores (mma.sync m16n8k16, float32 accumulation): per weight word the cost is the
// dequantization and one mma per 16 x 16 block, whatever M is up to 8 (NT 8-token tiles).
//
// Work split: KW warps of a block own RT tiles of 16 consecutive rows and take turns of U
// steps along K; their sums meet in shared memory at the end, in warp order (with KW = 4 the
// rows alone fill the SMs on more shapes, without split-K's partials). Lane l = 4 g + j
// holds rows g and g + 8 of each tile (the mma's A fragment rows) and, in each "step" of 4
// chunks, reads chunk j (16 bytes) of those rows: a quad of lanes covers 4 consecutive
// chunks (128 int4 / 64 int8 features). The tiles share the step's x loads and pairs.
// The mma's k order is the lanes' own: for weight word i of the chunks, the A registers are
// code pairs (p, p + ELEMS/2) of rows g and g + 8 (code_pair), and lane l as the B fragment
// holds token g's x values at the same features (x_pair), so both sides agree on which
// feature each of the 16 k slots is without moving data between lanes. The outputs come
// out in the C fragment (rows g, g + 8; tokens 2 j, 2 j + 1), no reduction across lanes.
// Groupwise: a step lies in one group (the host checks group % (4 chunks) == 0); its mma
// sums start from zero and take the group's scale (and zero, through the step's sum of x,
// as above) in float32.
#define MMA_STEP_CHUNKS 4  // chunks per step, one per lane of a quad

template <int DT>
__device__ __forceinline__ void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                         u32 b1) {
  if (DT == 0) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// One step: the chunk this lane read of rows g and g + 8 of each of the warp's RT row tiles
// (wv), at chunk index c (ok: inside K), against tokens 8 t + g; adds to acc[r][t] = C
// fragments (per channel), or to d, then scaled into acc (groupwise). rows[r]: the rows
// g and g + 8 of tile r, clamped to N - 1.
template <int DT, int MODE, bool PQS, int NT, int RT>
__device__ __forceinline__ void mma_step(
    const uint4 (&wv)[RT][2], int c, bool ok, int step, const unsigned short* __restrict__ x,
    int M, int K, const float* __restrict__ scale, const float* __restrict__ zeros,
    const float* __restrict__ pqs, int N, const int (&rows)[RT][2], int group, int g, int j,
    u32 inv2, u32 shift2, float (&acc)[RT][NT][4]) {
  typedef Mode<MODE> Md;
  constexpr int CHUNK_ELEMS = WO_CHUNK_WORDS * Md::ELEMS;
  constexpr int XW = CHUNK_ELEMS / 2;  // x words (two values each) per chunk
  // Accumulator chains: back-to-back mmas on one accumulator wait for each other, so one
  // row tile alternates two (even and odd weight words); several tiles are chains already.
  constexpr int CH = RT == 1 ? 2 : 1;
  u32 xw[NT][XW];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int m = 8 * t + g;
    if (ok && m < M) {
      const uint4* src =
          reinterpret_cast<const uint4*>(x + (size_t)m * K + (size_t)c * CHUNK_ELEMS);
#pragma unroll
      for (int v = 0; v < XW / 4; ++v) {
        const uint4 q = __ldg(src + v);
        xw[t][4 * v] = q.x; xw[t][4 * v + 1] = q.y; xw[t][4 * v + 2] = q.z; xw[t][4 * v + 3] = q.w;
      }
    } else {
#pragma unroll
      for (int v = 0; v < XW; ++v) xw[t][v] = 0u;  // past K or M: contributes nothing
    }
  }
  if constexpr (PQS) {
    if (ok) {
      const float4* p4 = reinterpret_cast<const float4*>(pqs + (size_t)c * CHUNK_ELEMS);
#pragma unroll
      for (int v = 0; v < XW / 2; ++v) {
        const float4 f = __ldg(p4 + v);
        const u32 lo = pack2<DT>(f.x, f.y), hi = pack2<DT>(f.z, f.w);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          xw[t][2 * v] = mul2<DT>(xw[t][2 * v], lo);
          xw[t][2 * v + 1] = mul2<DT>(xw[t][2 * v + 1], hi);
        }
      }
    }
  }

  float d[CH][RT][NT][4];
#pragma unroll
  for (int h = 0; h < CH; ++h)
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) d[h][r][t][e] = Md::GROUPED || h ? 0.f : acc[r][t][e];
#pragma unroll
  for (int i = 0; i < WO_CHUNK_WORDS; ++i) {
#pragma unroll
    for (int p = 0; p < Md::PAIRS; p += 2) {
      u32 b[NT][2];  // the x pairs of code pairs p and p + 1, shared by the row tiles
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const u32* xi = xw[t] + i * Md::PAIRS;  // the x words of weight word i
        b[t][0] = x_pair<MODE>(xi, p);
        b[t][1] = x_pair<MODE>(xi, p + 1);
      }
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const u32 w0 = word(wv[r][0], i) ^ word_flip<DT, MODE>();
        const u32 w1 = word(wv[r][1], i) ^ word_flip<DT, MODE>();
        const u32 a0 = code_pair<DT, MODE>(w0, p, inv2, shift2);
        const u32 a1 = code_pair<DT, MODE>(w1, p, inv2, shift2);
        const u32 a2 = code_pair<DT, MODE>(w0, p + 1, inv2, shift2);
        const u32 a3 = code_pair<DT, MODE>(w1, p + 1, inv2, shift2);
#pragma unroll
        for (int t = 0; t < NT; ++t)
          mma16816<DT>(d[i % CH][r][t], a0, a1, a2, a3, b[t][0], b[t][1]);
      }
    }
  }
  if constexpr (CH == 2) {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) d[0][r][t][e] += d[1][r][t][e];
  }
  if constexpr (!Md::GROUPED) {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][t][e] = d[0][r][t][e];
  } else {
    // sum x (u - z) s = OFF s (sum x q/OFF + (OFF - z)/OFF sum x); symmetric: z = OFF.
    const int gi = step * MMA_STEP_CHUNKS * CHUNK_ELEMS / group;
    float xa[NT], xb[NT];  // the step's sum of x for tokens 8 t + 2 j and 8 t + 2 j + 1
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      xa[t] = xb[t] = 0.f;
      if constexpr (Md::ZEROS) {
        float xs = 0.f;  // token 8 t + g, this lane's chunk; then the quad's 4 chunks
#pragma unroll
        for (int v = 0; v < XW; ++v) xs += hsum<DT>(xw[t][v]);
        xs += __shfl_xor_sync(0xffffffffu, xs, 1);
        xs += __shfl_xor_sync(0xffffffffu, xs, 2);
        xa[t] = __shfl_sync(0xffffffffu, xs, 8 * j);
        xb[t] = __shfl_sync(0xffffffffu, xs, 8 * j + 4);
      }
    }
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const float s0 = __ldg(scale + (size_t)gi * N + rows[r][0]) * Md::OFF;
      const float s1 = __ldg(scale + (size_t)gi * N + rows[r][1]) * Md::OFF;
      float z0 = 0.f, z1 = 0.f;
      if constexpr (Md::ZEROS) {
        z0 = (Md::OFF - __ldg(zeros + (size_t)gi * N + rows[r][0])) / Md::OFF;
        z1 = (Md::OFF - __ldg(zeros + (size_t)gi * N + rows[r][1])) / Md::OFF;
      }
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const float(&dd)[4] = d[0][r][t];
        acc[r][t][0] = fmaf(s0, fmaf(z0, xa[t], dd[0]), acc[r][t][0]);
        acc[r][t][1] = fmaf(s0, fmaf(z0, xb[t], dd[1]), acc[r][t][1]);
        acc[r][t][2] = fmaf(s1, fmaf(z1, xa[t], dd[2]), acc[r][t][2]);
        acc[r][t][3] = fmaf(s1, fmaf(z1, xb[t], dd[3]), acc[r][t][3]);
      }
    }
  }
}

// NT: 8-token tiles (M <= 8 NT); U: steps whose weight loads are issued together; RT:
// 16-row tiles per warp (more rows share each x load and pair); KW: warps sharing rows.
template <int DT, int MODE, bool PQS, int NT, int U, int RT, int KW>
__device__ __forceinline__ void wo_mma_body(
    const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
    const float* __restrict__ scale, const float* __restrict__ zeros,
    const float* __restrict__ pqs, const float* __restrict__ bias, void* __restrict__ out,
    int M, int N, int K, int group, int steps_per_split, int write_partial) {
  typedef Mode<MODE> Md;
  constexpr int CHUNK_ELEMS = WO_CHUNK_WORDS * Md::ELEMS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, j = lane & 3;
  const int kw = warp % KW;  // this warp's turn among those sharing its rows
  const int row0 = (blockIdx.x * (WO_WARPS / KW) + warp / KW) * 16 * RT;
  const int chunks = K / CHUNK_ELEMS;
  const int steps = (chunks + MMA_STEP_CHUNKS - 1) / MMA_STEP_CHUNKS;
  const int split = blockIdx.y;
  const int s_begin = split * steps_per_split;
  const int s_end = min(s_begin + steps_per_split, steps);
  const size_t row_bytes = (size_t)K * Md::BITS / 8;
  int rows[RT][2];
  const unsigned char* wr[RT][2];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      rows[r][h] = min(row0 + 16 * r + g + 8 * h, N - 1);
      wr[r][h] = w + (size_t)rows[r][h] * row_bytes;
    }

  wait_then_signal();

  u32 inv2, shift2;
  code_pair_operands<DT, MODE>(inv2, shift2);

  float acc[RT][NT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][t][e] = 0.f;

  for (int s0 = s_begin + kw * U; s0 < s_end; s0 += KW * U) {
    uint4 wv[U][RT][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = (s0 + u) * MMA_STEP_CHUNKS + j;
      const bool in = s0 + u < s_end && c < chunks;
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wv[u][r][h] = in ? load_weight(wr[r][h] + (size_t)c * 16) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s0 + u < s_end) {  // the same for every lane: the shuffles inside stay converged
        const int c = (s0 + u) * MMA_STEP_CHUNKS + j;
        mma_step<DT, MODE, PQS, NT, RT>(wv[u], c, c < chunks, s0 + u, x, M, K, scale, zeros,
                                        pqs, N, rows, group, g, j, inv2, shift2, acc);
      }
    }
  }

  if constexpr (KW > 1) {  // the first warp of each KW adds the others' sums, in warp order
    constexpr int V = RT * NT * 4;
    __shared__ float red[WO_WARPS][V][32];
    float* mine = &acc[0][0][0];
    if (kw > 0) {
#pragma unroll
      for (int v = 0; v < V; ++v) red[warp][v][lane] = mine[v];
    }
    __syncthreads();
    if (kw > 0) return;
#pragma unroll
    for (int o = 1; o < KW; ++o)
#pragma unroll
      for (int v = 0; v < V; ++v) mine[v] += red[warp + o][v][lane];
  }

  // C fragment: acc[r][t][e] is row 16 r + g (e < 2) or + 8 (e >= 2), token 8 t + 2 j + (e & 1).
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = row0 + 16 * r + g + (e >= 2 ? 8 : 0), m = 8 * t + 2 * j + (e & 1);
        if (m < M && n < N)
          store_output<DT, MODE>(acc[r][t][e], m, n, M, N, split, scale, bias, out,
                                 write_partial);
      }
}

// Sum the float32 partials [splits, M, N] in split order, add the bias, cast to x's dtype.
template <int DT>
__device__ __forceinline__ void wo_reduce_body(const float* __restrict__ partial,
                                               const float* __restrict__ bias,
                                               unsigned short* __restrict__ out, int M, int N,
                                               int splits) {
  wait_then_signal();
  const size_t mn = (size_t)M * N;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < mn;
       i += (size_t)gridDim.x * blockDim.x) {
    float t = 0.f;
    for (int s0 = 0; s0 < splits; s0 += 8) {  // 8 loads in flight, then their sum in order
      float p[8];
#pragma unroll
      for (int s = 0; s < 8; ++s) p[s] = s0 + s < splits ? partial[(s0 + s) * mn + i] : 0.f;
#pragma unroll
      for (int s = 0; s < 8; ++s) t += p[s];
    }
    if (bias) t += bias[i % N];
    out[i] = from_float<DT>(t);
  }
}

template <int DT, int MODE, bool PQS, int MT, int ROWS>
__global__ void __launch_bounds__(WO_WARPS * 32)
wo_gemv(const unsigned short* x, const unsigned char* w, const float* scale, const float* zeros,
        const float* pqs, const float* bias, void* out, int M, int N, int K, int group,
        int chunks_per_split, int write_partial) {
  wo_gemv_body<DT, MODE, PQS, MT, ROWS>(x, w, scale, zeros, pqs, bias, out, M, N, K, group,
                                        chunks_per_split, write_partial);
}

template <int DT, int MODE, bool PQS, int NT, int U, int RT, int KW>
__global__ void __launch_bounds__(WO_WARPS * 32)
wo_mma(const unsigned short* x, const unsigned char* w, const float* scale, const float* zeros,
       const float* pqs, const float* bias, void* out, int M, int N, int K, int group,
       int steps_per_split, int write_partial) {
  wo_mma_body<DT, MODE, PQS, NT, U, RT, KW>(x, w, scale, zeros, pqs, bias, out, M, N, K,
                                            group, steps_per_split, write_partial);
}

template <int DT>
__global__ void wo_reduce(const float* partial, const float* bias, unsigned short* out,
                          int M, int N, int splits) {
  wo_reduce_body<DT>(partial, bias, out, M, N, splits);
}

// ---- the tiled int4 GEMV (pre-packed weight, M up to 64) -----------------------------------
//
// The fma and mma kernels above read the stored [N, K/2] layout and spend most of their
// instructions rearranging codes and x into matching pairs (design note 21). This kernel reads
// int4 weights, per channel (MODE 1) or groupwise (MODE 2 with zeros, 3 symmetric; design note
// 29), pre-packed by tpquant/kernels/tiles.py ("tiles16x64"): a
// 16-row x 64-feature tile is 512 contiguous bytes, lane l's 16 bytes of it holding exactly the
// mma A fragments it needs for the tile's four k16 steps. Lane l = 4 g + t, weight word s (one
// step) of its chunk: nibbles 0 / 4 are row g at features 16 t + 4 s + 0 / 1, nibbles 1 / 5 row
// g + 8 at the same features, nibbles 2 / 6 and 3 / 7 the same rows at + 2 / + 3. So each A
// register is one shift and one LOP3 away from the word (the mask puts nibbles j and j + 4 into
// a value pair), and the step's B fragment, token g's x at those four features, is an 8-byte
// piece of the lane's 32-byte x load: no byte permutes, no shuffles.
// Numerics: a code becomes MAGIC + u = MAGIC + 8 + q (u = q + 8, one LOP3, exact) and the
// tensor cores sum x (MAGIC + 8 + q) in float32; a second mma sums x itself over the same
// features, and (MAGIC + 8) times that sum is taken off at the end, before the channel scale.
// Per channel that mma takes x as A and all-ones as B: a lane's 16-byte x load is two k16
// steps' B fragments of its token g, which as A registers put one half of those 32 features in
// row g and the other in row g + 8, so one mma sums two steps (design note 42; groupwise, which
// folds each run's sums per token, an all-ones A sums one step for the tile's 8 tokens). The
// products are exact in float32; the cancellation costs about log2((MAGIC + 8) / 8) bits of
// the float32 sums (4 for bfloat16, 7 for float16), leaving ~17-20 bits against the output's
// 8 / 11. Groupwise, the same over each run of a warp's consecutive k-tiles inside
// one group, with the group's offset (MAGIC + zero, or MAGIC + 8), folded into the totals with
// the group's scale (tiles_fold).
// int8 per channel (MODE 0; design note 35) comes in 16-row x 32-feature tiles ("tiles16x32"),
// the same 512 bytes a tile: lane l's bytes 4 w .. 4 w + 3 are rows g, g + 8, g, g + 8 at
// features 8 t + 2 w, + 2 w, + 2 w + 1, + 2 w + 1, so words 2 s and 2 s + 1 are step s's A
// fragments, bytes 0 / 2 and 1 / 3 of a word one register each, and x's 16 bytes a lane are
// its B fragments. float16: the byte u = q + 128 under 1024's exponent (one PRMT a register
// pair, exact), x (1152 + q) summed and 1152 sum x taken off as for int4 (~4 bits of the float32
// sums; the wide plan takes 1152 off each A register). bfloat16 holds only 8 significant bits,
// too few for 1024 + u: q itself goes through float32 (two PRMTs, two FADDs and one pack a
// register, exact), and the tensor cores sum x q with no offset, so no sums of x. Measured
// against two mmas a step on the nibbles (128 + low, 2048 + 16 high: one LOP3 a register), as
// fast at 1-4 token tiles and 1.4x faster at 8 (design note 35).
// Work split: a block holds RW row warps x KW K warps. Each row warp owns RT row tiles; its KW
// K warps take turns of U k-tiles along K, and their sums meet in shared memory in warp order.
// The RW row warps step through K together and read the same x, so all but the first find it
// in L1: per block, x costs L2 M x K x 2 bytes against the weight's 8 x RT x RW x K (with one
// row warp of two tiles, x's traffic at M = 32 was 4x the weight's). Measured, sharing x gained
// up to 12% at M = 16-32 on the largest N (design note 28). grid: row groups. No split-K (a
// split range cost the kernels 2-24 registers, i.e. blocks per SM, for less than it gained).

// The outputs a lane holds in mma C fragments, for the tiled kernels' stores: f(r, n, e, row,
// m) for fragment element e of row tile r (from rt0, stopping at row_tiles) and token tile n,
// that is row 16 (rt0 + r) + g (+ 8 for e >= 2) and token 8 n + 2 t (+ 1 for odd e), m < M.
template <int RT, int NT, typename F>
__device__ __forceinline__ void for_each_output(int rt0, int row_tiles, int M, int g, int t,
                                                F&& f) {
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    if (rt0 + r >= row_tiles) break;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = 16 * (rt0 + r) + g + (e >= 2 ? 8 : 0), m = 8 * n + 2 * t + (e & 1);
        if (m < M) f(r, n, e, row, m);
      }
  }
}

// How the kernel spends registers on NT token tiles (MODE: per channel or groupwise). Up to 4
// (32 tokens): x is loaded a round ahead with the weights, the sums alternate between two
// accumulator chains, and a second mma sums x for the codes' offset. At 8 tiles ("wide") one
// chain; per channel, the offset comes off each A register with one paired fma instead (1 x
// (MAGIC + u) - (MAGIC + 8) = q, exact), and x is still loaded a round ahead for one row tile
// unrolled once; past that, and groupwise (whose zeros need the sums of x), x is loaded as each
// k-tile is multiplied (from L1, above): the registers run out.
// The loads, per mode as measured (design note 43). ZERO_X zero-fills x past M; without it a
// token past M reads token M - 1's row, whose sums are never stored. int4 per channel ran ~5%
// faster without it at 2 token tiles, 0-4% at one (at 8 its batch-64 decode lost 6%). LEAN
// takes a load's k offset in 32 bits, checks K only in a round that reaches it, and skips the
// zero-fill: int8 from 2 token tiles 5-15% faster, groupwise at 8 15%; int4 per channel, none.
// EARLY_SCALE reads the channel scales of the lane's rows with the first weights, before the
// wait, rather than after the sums (where each block's stores waited on them): per channel
// below the wide plan (design notes 44, 45). int8 holds them in registers (decode at batch 1
// and 8 +4%; through shared memory its kernel was 3-5% slower). int4 copies them to shared
// memory (SCALE_COPY, cp.async: no register held through the loop; decode +3%): in registers
// they took the table's (1, 8, 1, 4) from 128 to 130 registers, one block an SM instead of
// two, and decode lost 10%. Wide, both ways raised registers (int8 157 -> 191 in registers,
// -> 188 copied; batch 64 -12% in registers): not taken.
template <int MODE, int NT, int RT, int U> struct TilesPlan {
  static constexpr int TK = MODE == 0 ? 32 : 64;  // features per k-tile (int8, int4)
  static constexpr int XH = TK / 32;              // a lane's 16-byte x loads per token tile
  static constexpr bool GROUPED = Mode<MODE>::GROUPED;
  static constexpr bool WIDE = NT > 4;
  static constexpr bool SUB_A = WIDE && !GROUPED;  // the offset off A, else the sums of x
  static constexpr bool LATE_X = WIDE && (GROUPED || RT * U > 1);
  static constexpr int CHAINS = WIDE ? 1 : 2;
  static constexpr bool LEAN = MODE == 0 ? NT > 1 : GROUPED && WIDE;  // int8; groupwise, wide
  static constexpr bool ZERO_X = MODE == 1 ? WIDE : !LEAN;  // int4 per channel: wide only
  static constexpr bool EARLY_SCALE = !GROUPED && !WIDE;
  static constexpr bool SCALE_COPY = EARLY_SCALE && MODE == 1;
};

// A load's k offset: 32 bits where the plan is lean (it is below K), else size_t.
template <bool LEAN> struct TilesIdx { typedef size_t T; };
template <> struct TilesIdx<true> { typedef int T; };

// U k-tiles from T0 on: the lane's 16 weight bytes of each row tile; zeros past K (CHECK).
template <int MODE, int NT, int RT, int U, bool CHECK = true>
__device__ __forceinline__ void tiles_load_weight(int T0, int tiles_k,
                                                  const uint4* const (&wt)[RT],
                                                  uint4 (&wv)[U][RT]) {
  typedef typename TilesIdx<TilesPlan<MODE, NT, RT, U>::LEAN>::T Idx;
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int r = 0; r < RT; ++r)
      wv[u][r] = !CHECK || T0 + u < tiles_k ? load_weight(wt[r] + (Idx)(T0 + u) * 32)
                                            : make_uint4(0u, 0u, 0u, 0u);
}

// The lane's 16 bytes of x (load h of its XH) of token tile n at k-tile T; zeros past M if
// the plan says so.
template <int MODE, int NT>
__device__ __forceinline__ uint4 tiles_x(int T, int h, int n,
                                         const unsigned short* const (&xr)[NT],
                                         const bool (&xin)[NT]) {
  typedef TilesPlan<MODE, NT, 1, 1> Plan;
  typedef typename TilesIdx<Plan::LEAN>::T Idx;
  const auto load = [&] {  // (its address inside the branch: the others' code as before)
    return __ldg(reinterpret_cast<const uint4*>(xr[n] + (Idx)T * Plan::TK) + h);
  };
  if constexpr (Plan::ZERO_X) return xin[n] ? load() : make_uint4(0u, 0u, 0u, 0u);
  return load();
}

// The lane's x (32 bytes int4, 16 int8) of each token tile for U k-tiles from T0 (unless x is
// loaded as it is used); zeros past K (CHECK) or M (above).
template <int MODE, int NT, int RT, int U, int XH, bool CHECK = true>
__device__ __forceinline__ void tiles_load_x(int T0, int tiles_k,
                                             const unsigned short* const (&xr)[NT],
                                             const bool (&xin)[NT], uint4 (&xv)[U][NT][XH]) {
  typedef TilesPlan<MODE, NT, RT, U> Plan;
  if constexpr (!Plan::LATE_X) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int h = 0; h < XH; ++h)
          xv[u][n][h] = !CHECK || T0 + u < tiles_k ? tiles_x<MODE, NT>(T0 + u, h, n, xr, xin)
                                                 : make_uint4(0u, 0u, 0u, 0u);
  }
}

// A round's loads: weights and x of U k-tiles from T0 (past K, zeros: the tile then adds
// nothing); a lean plan checks K only in a round that reaches it.
template <int MODE, int NT, int RT, int U, int XH>
__device__ __forceinline__ void tiles_load(int T0, int tiles_k, const uint4* const (&wt)[RT],
                                           const unsigned short* const (&xr)[NT],
                                           const bool (&xin)[NT], uint4 (&wv)[U][RT],
                                           uint4 (&xv)[U][NT][XH]) {
  if (TilesPlan<MODE, NT, RT, U>::LEAN && T0 + U <= tiles_k) {
    tiles_load_weight<MODE, NT, RT, U, false>(T0, tiles_k, wt, wv);
    tiles_load_x<MODE, NT, RT, U, XH, false>(T0, tiles_k, xr, xin, xv);
  } else {
    tiles_load_weight<MODE, NT, RT, U>(T0, tiles_k, wt, wv);
    tiles_load_x<MODE, NT, RT, U, XH>(T0, tiles_k, xr, xin, xv);
  }
}

// Whether the A registers hold q itself (no offset: no sums of x to take one off): the wide
// plan per channel, and bfloat16 int8 always.
template <int DT, int MODE, int NT> struct TilesQ {
  static constexpr bool VALUE = TilesPlan<MODE, NT, 1, 1>::SUB_A || (MODE == 0 && DT == 1);
};

// What each code adds over q in the tiled kernel's per-channel sums unless TilesQ (the sums of
// x take it off): int4 MAGIC + 8; int8 (float16) 1024 + 128.
template <int DT, int MODE> __device__ __forceinline__ constexpr float tiles_offset() {
  return MODE == 0 ? 1152.f : Magic<DT>::VALUE + Mode<MODE>::OFF;
}

// q itself from bytes sel_lo / sel_hi (0x7440 + b: byte b) of u = q + 128: each byte under
// float32's 2^23 exponent (one PRMT), minus 2^23 + 128, the pair rounded to bfloat16 (exact).
__device__ __forceinline__ u32 int8_pair_exact(u32 u, u32 sel_lo, u32 sel_hi) {
  const float lo = __uint_as_float(__byte_perm(u, 0x4B000000u, sel_lo)) - 8388736.f;
  const float hi = __uint_as_float(__byte_perm(u, 0x4B000000u, sel_hi)) - 8388736.f;
  return pack2<1>(lo, hi);
}

// One k16 step s of an int8 k-tile (the header's layout): A from the lane's words 2 s, 2 s + 1
// of each row tile, B (b) the lane's x words of each token tile. float16: 1024 + u, one PRMT a
// register (SUB_A: minus 1152, q); bfloat16: q through float32.
template <int DT, int NT, int RT, int CH, bool SUB_A>
__device__ __forceinline__ void tiles_step_int8(int s, const uint4 (&wv)[RT],
                                                const u32 (&b)[NT][2],
                                                float (&acc)[CH][RT][NT][4]) {
  constexpr u32 one = DT == 0 ? 0x3C003C00u : 0x3F803F80u;  // 1.0 in both halves
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    // u = q + 128; registers a0 / a1 of words 2 s (bytes 0 / 2, 1 / 3), a2 / a3 of 2 s + 1
    const u32 u0 = word(wv[r], 2 * s) ^ 0x80808080u, u1 = word(wv[r], 2 * s + 1) ^ 0x80808080u;
    u32 a[4];
    if constexpr (DT == 0) {
      a[0] = __byte_perm(u0, 0x64646464u, 0x4240u);
      a[1] = __byte_perm(u0, 0x64646464u, 0x4341u);
      a[2] = __byte_perm(u1, 0x64646464u, 0x4240u);
      a[3] = __byte_perm(u1, 0x64646464u, 0x4341u);
      if constexpr (SUB_A) {
#pragma unroll
        for (int j = 0; j < 4; ++j) a[j] = fma2<DT>(a[j], one, 0xE480E480u);  // - 1152
      }
    } else {
      a[0] = int8_pair_exact(u0, 0x7440u, 0x7442u);
      a[1] = int8_pair_exact(u0, 0x7441u, 0x7443u);
      a[2] = int8_pair_exact(u1, 0x7440u, 0x7442u);
      a[3] = int8_pair_exact(u1, 0x7441u, 0x7443u);
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
      mma16816<DT>(acc[s % CH][r][n], a[0], a[1], a[2], a[3], b[n][0], b[n][1]);
  }
}

// One k16 step s of a k-tile for the warp's row tiles: A from the lane's weight word s of each
// (int8: tiles_step_int8), B (b) the lane's x words of each token tile.
// SUB_A: the offset comes off each A register (the plan's choice unless a caller says).
template <int DT, int MODE, int NT, int RT, int CH,
          bool SUB_A = TilesPlan<MODE, NT, RT, 1>::SUB_A>
__device__ __forceinline__ void tiles_step(int s, const uint4 (&wv)[RT], const u32 (&b)[NT][2],
                                           u32 mask, float (&acc)[CH][RT][NT][4]) {
  if constexpr (MODE == 0) {
    tiles_step_int8<DT, NT, RT, CH, SUB_A>(s, wv, b, acc);
    return;
  }
  // OR the magic, XOR 8 (signed codes' flip to u = q + 8; zeros mode's codes are u already):
  // one LOP3 with the mask
  constexpr u32 flip = Magic<DT>::PAIR | (Mode<MODE>::FLIP & Mode<MODE>::MASK);
  constexpr u32 one = DT == 0 ? 0x3C003C00u : 0x3F803F80u;  // 1.0 in both halves
  constexpr u32 minus = (Magic<DT>::PAIR | 0x00080008u) ^ 0x80008000u;  // -(MAGIC + 8), both
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const u32 q = word(wv[r], s);
    u32 a[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      a[j] = ((q >> (4 * j)) & mask) ^ flip;
      if constexpr (SUB_A) a[j] = fma2<DT>(a[j], one, minus);
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
      mma16816<DT>(acc[s % CH][r][n], a[0], a[1], a[2], a[3], b[n][0], b[n][1]);
  }
}

// Groupwise int4 (MODE 2 / 3): where the lane's rows find their group's scale and zero.
template <int RT> struct TilesGroups {
  const float* scale;  // [K/g, N]
  const float* zeros;  // [K/g, N]; null without zeros (MODE 3)
  int n;               // N
  int shift;           // log2 of the k-tiles a group holds (a power of two: tiles.groups_tile)
  int row[RT];         // row g of each row tile (the lane's other row is g + 8)
};

// Groupwise: k-tiles lie in one group each, so the sums of a run of k-tiles of one group (acc,
// sx over CH chains, fresh after each fold) fold into the totals with the group's scale s and
// offset MAGIC + z (zeros) or MAGIC + 8 (symmetric): total += s (sum x (MAGIC + u) - (MAGIC +
// z) sum x) = s sum x (u - z). T: the run's last k-tile. Each sum starts from its first chain
// (0 + a is not a for a = -0, so the compiler would add it); the lane's second row is 8 floats
// after its first, one address for both.
template <int DT, int MODE, int NT, int RT, int CH>
__device__ __forceinline__ void tiles_fold(int T, const TilesGroups<RT>& grp,
                                           float (&acc)[CH][RT][NT][4], float (&sx)[CH][NT][4],
                                           float (&total)[RT][NT][4]) {
  const size_t base = (size_t)(T >> grp.shift) * grp.n;
  float sum[NT][2];  // sum x of the lane's two tokens of each token tile
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      sum[n][c] = sx[0][n][c];
#pragma unroll
      for (int ch = 1; ch < CH; ++ch) sum[n][c] += sx[ch][n][c];
    }
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const float* scale = grp.scale + base + grp.row[r];
    const float* zeros = MODE == 2 ? grp.zeros + base + grp.row[r] : nullptr;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float s = __ldg(scale + 8 * h);
      const float off =
          Magic<DT>::VALUE + (MODE == 2 ? __ldg(zeros + 8 * h) : (float)Mode<MODE>::OFF);
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int e = 2 * h + c;
          float a = acc[0][r][n][e];
#pragma unroll
          for (int ch = 1; ch < CH; ++ch) a += acc[ch][r][n][e];
          total[r][n][e] += s * (a - off * sum[n][c]);
        }
    }
  }
#pragma unroll
  for (int ch = 0; ch < CH; ++ch)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sx[ch][n][e] = 0.f;
#pragma unroll
        for (int r = 0; r < RT; ++r) acc[ch][r][n][e] = 0.f;
      }
}

// Step s's B fragments of each token tile: words 2 (s & 1) and 2 (s & 1) + 1 of the lane's
// 16-byte x load of that step's pair of steps (the tiles' layout, above).
template <int NT>
__device__ __forceinline__ void step_fragments(const uint4 (&xh)[NT], int s, u32 (&b)[NT][2]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    b[n][0] = word(xh[n], 2 * (s & 1));
    b[n][1] = word(xh[n], 2 * (s & 1) + 1);
  }
}

// The k16 steps of each of U k-tiles from T0 (weights wv; x xv, or loaded here if late):
// sum x (MAGIC + u), or x q (TilesQ), into acc, and (unless TilesQ) x into sx; groupwise, fold
// each k-tile's sums into total.
template <int DT, int MODE, int NT, int RT, int U, int CH, int XH>
__device__ __forceinline__ void tiles_compute(int T0, int tiles_k, const uint4 (&wv)[U][RT],
                                              const uint4 (&xv)[U][NT][XH],
                                              const unsigned short* const (&xr)[NT],
                                              const bool (&xin)[NT], u32 mask,
                                              float (&acc)[CH][RT][NT][4],
                                              float (&sx)[CH][NT][4],
                                              const TilesGroups<RT>& grp,
                                              float (&total)[RT][NT][4]) {
  typedef TilesPlan<MODE, NT, RT, U> Plan;
  constexpr bool LATE_X = Plan::LATE_X, SUM_X = !TilesQ<DT, MODE, NT>::VALUE;
  // the sums of x: per channel two steps a mma (x as A: the header), groupwise one
  constexpr bool X_AS_A = SUM_X && !Plan::GROUPED;
  constexpr u32 ones = DT == 0 ? 0x3C003C00u : 0x3F803F80u;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (LATE_X && T0 + u >= tiles_k) break;
#pragma unroll
    for (int h = 0; h < XH; ++h) {
      uint4 xh[NT];
#pragma unroll
      for (int n = 0; n < NT; ++n)
        xh[n] = LATE_X ? tiles_x<MODE, NT>(T0 + u, h, n, xr, xin) : xv[u][n][h];
      if constexpr (X_AS_A) {
        // rows g / g + 8: token g's first / second halves of steps 2 h and 2 h + 1
#pragma unroll
        for (int n = 0; n < NT; ++n)
          mma16816<DT>(sx[h % CH][n], word(xh[n], 0), word(xh[n], 1), word(xh[n], 2),
                       word(xh[n], 3), ones, ones);
      }
#pragma unroll
      for (int s = 2 * h; s < 2 * h + 2; ++s) {
        u32 b[NT][2];
        step_fragments(xh, s, b);
        if constexpr (SUM_X && !X_AS_A) {
#pragma unroll
          for (int n = 0; n < NT; ++n)
            mma16816<DT>(sx[s % CH][n], ones, ones, ones, ones, b[n][0], b[n][1]);
        }
        tiles_step<DT, MODE, NT, RT, CH>(s, wv[u], b, mask, acc);
      }
    }
    if constexpr (Mode<MODE>::GROUPED) {
      // fold where the group ends, or this warp's run of U consecutive k-tiles, or K: groups
      // of 128 fold once a run of 2 or 4 (every k-tile, with U = 1, as they once did)
      const int T = T0 + u;
      const bool ends = ((T + 1) & ((1 << grp.shift) - 1)) == 0;
      if (T < tiles_k && (ends || u == U - 1 || T + 1 == tiles_k))
        tiles_fold<DT, MODE, NT, RT, CH>(T, grp, acc, sx, total);
    }
  }
}

template <int DT, int MODE, int NT, int RT, int KW, int RW, int U>
__global__ void __launch_bounds__(KW * RW * 32)
wo_tiles(const unsigned short* __restrict__ x, const uint4* __restrict__ w,
         const float* __restrict__ scale, const float* __restrict__ zeros,
         const float* __restrict__ bias, unsigned short* __restrict__ out, int M, int N, int K,
         int group) {
  typedef TilesPlan<MODE, NT, RT, U> Plan;
  constexpr bool GROUPED = Plan::GROUPED;
  constexpr int CH = Plan::CHAINS, S = RT * NT * 4;
  constexpr bool Q = TilesQ<DT, MODE, NT>::VALUE;
  // sums a lane hands to its row warp's first K warp: its outputs' sums, and per channel
  // (unless Q) the sums of x for its two tokens of each token tile
  constexpr int V = S + (GROUPED || Q ? 0 : 2 * NT);
  // what a code adds over q (the sums of x take it off); none if Q
  constexpr float offset = Q ? 0.f : tiles_offset<DT, MODE>();
  constexpr int TK = Plan::TK, XH = Plan::XH;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kw = warp % KW, rw = warp / KW, g = lane >> 2, t = lane & 3;
  const int tiles_k = K / TK, row_tiles = N / 16;
  const int rt0 = (blockIdx.x * RW + rw) * RT;
  const uint4* wt[RT];
  const int shift = __ffs(group / TK) - 1;  // groupwise: log2 of the k-tiles of a group
  TilesGroups<RT> grp{scale, zeros, N, shift, {}};
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int tile = min(rt0 + r, row_tiles - 1);
    wt[r] = w + (size_t)tile * tiles_k * 32 + lane;
    grp.row[r] = 16 * tile + g;
  }
  const unsigned short* xr[NT];
  bool xin[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int m = 8 * n + g;
    xin[n] = m < M;
    xr[n] = x + (size_t)min(m, M - 1) * K + TK / 4 * t;
  }

  // The first weight loads (and the plan's early scales) go out before the wait for the kernel
  // before this one (PDL): no kernel writes them, and their latency then overlaps that kernel's
  // end.
  const int step = KW * U;
  uint4 wa[U][RT], xa[U][NT][XH], wb[U][RT], xb[U][NT][XH];  // (xa, xb unused if x is late)
  tiles_load_weight<MODE, NT, RT, U>(kw * U, tiles_k, wt, wa);
  // (EARLY_SCALE) rows g and g + 8 of each row tile, for the first K warp's stores: in registers
  // (every K warp loads them), or copied to shared memory by the first K warp (SCALE_COPY)
  float row_scale[RT][2];
  __shared__ float scale_copy[Plan::SCALE_COPY ? RW : 1][RT][2][32];
  float(&copied)[RT][2][32] = scale_copy[Plan::SCALE_COPY ? rw : 0];
  constexpr bool IN_REGISTERS = Plan::EARLY_SCALE && !Plan::SCALE_COPY;
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      row_scale[r][h] = IN_REGISTERS ? __ldg(scale + grp.row[r] + 8 * h) : 0.f;
  if (Plan::SCALE_COPY && kw == 0) {  // (apart: one loop for both compiled 1-3% longer)
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) copy_async(&copied[r][h][lane], scale + grp.row[r] + 8 * h);
  }
  loads_before_wait();
  wait_then_signal();
  tiles_load_x<MODE, NT, RT, U, XH>(kw * U, tiles_k, xr, xin, xa);

  const u32 mask = kCodeMask[1];
  // acc and sx: the sums (groupwise: of the current k-tile); total: groupwise, the folded sums
  float acc[CH][RT][NT][4], sx[CH][NT][4], total[RT][NT][4];  // (sx unused if Q)
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        sx[c][n][e] = 0.f;
#pragma unroll
        for (int r = 0; r < RT; ++r) acc[c][r][n][e] = 0.f;
      }
#pragma unroll
      for (int r = 0; r < RT; ++r) total[r][n][e] = 0.f;
    }

  // Two register sets, A and B, take turns: a round's loads are issued before the round
  // before it is multiplied, so each warp keeps U tiles in flight while it computes.
  for (int T0 = kw * U; T0 < tiles_k; T0 += 2 * step) {
    tiles_load<MODE, NT, RT, U, XH>(T0 + step, tiles_k, wt, xr, xin, wb, xb);
    tiles_compute<DT, MODE, NT, RT, U, CH, XH>(T0, tiles_k, wa, xa, xr, xin, mask, acc, sx, grp,
                                               total);
    if (T0 + step >= tiles_k) break;
    tiles_load<MODE, NT, RT, U, XH>(T0 + 2 * step, tiles_k, wt, xr, xin, wa, xa);
    tiles_compute<DT, MODE, NT, RT, U, CH, XH>(T0 + step, tiles_k, wb, xb, xr, xin, mask, acc,
                                               sx, grp, total);
  }

  // The lane's sums: acc or total (rows g, g + 8 of each tile; tokens 8 n + 2 t, + 1), then
  // (per channel, unless Q) sum x for those two tokens: rows g and g + 8 of the x-as-A mma's C
  // fragment hold token g's halves (any column), so lanes 8 t and 8 t + 4 have tokens 2 t and
  // 2 t + 1.
  float v[V];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int i = 0; i < 4 * RT; ++i) {
      const int r = i / 4, e = i % 4;
      v[(r * NT + n) * 4 + e] = GROUPED ? total[r][n][e] : 0.f;
      if constexpr (!GROUPED) {
#pragma unroll
        for (int c = 0; c < CH; ++c) v[(r * NT + n) * 4 + e] += acc[c][r][n][e];
      }
    }
  }
  if constexpr (V > S) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      float mine = 0.f;  // token 8 n + g
#pragma unroll
      for (int c = 0; c < CH; ++c) mine += sx[c][n][0] + sx[c][n][2];
      v[S + 2 * n] = __shfl_sync(0xffffffffu, mine, 8 * t);
      v[S + 2 * n + 1] = __shfl_sync(0xffffffffu, mine, 8 * t + 4);
    }
  }
  if constexpr (KW > 1) {  // each row warp's first K warp adds the others' sums, in warp order
    __shared__ float red[RW][KW - 1][V][32];
    if (kw > 0) {
#pragma unroll
      for (int i = 0; i < V; ++i) red[rw][kw - 1][i][lane] = v[i];
    }
    __syncthreads();
    if (kw > 0) return;
#pragma unroll
    for (int o = 0; o < KW - 1; ++o)
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] += red[rw][o][i][lane];
  }
  if constexpr (Plan::SCALE_COPY) wait_async_copies();
  for_each_output<RT, NT>(rt0, row_tiles, M, g, t, [&](int r, int n, int e, int row, int m) {
    float y = v[(r * NT + n) * 4 + e];
    if constexpr (!GROUPED) {
      if constexpr (V > S) y -= offset * v[S + 2 * n + (e & 1)];
      y *= !Plan::EARLY_SCALE ? __ldg(scale + row)
           : Plan::SCALE_COPY ? copied[r][e >= 2][lane] : row_scale[r][e >= 2];
    }
    if (bias) y += bias[row];
    out[(size_t)m * N + row] = from_float<DT>(y);
  });
}

// ---- the staged GEMM (wo_staged): x through shared memory, up to 64 tokens -----------------
//
// The tiled GEMV above loads x from L1 in every warp: at 8 token tiles a warp reads 8 KB of x
// for each 512-byte weight tile, and it ran at 0.64-0.76x bf16 on Llama's 4096-row weights at
// M = 64 (design note 28 named this kernel as the next step). Here a block copies x into shared
// memory once per stage of KS k-tiles, STAGES stages ahead (cp.async, zero-filled past M and
// K), and every warp reads its B fragments from there; the weights still go straight to
// registers, a stage ahead. Same tiles, same conversion and mma as the tiled GEMV's wide plan
// (the offset off each A register: the sums hold x q exactly; int8 bfloat16 through float32).
// Work split: WR row warps of RT row tiles each, times WK K warps that take every WK-th k-tile
// of a stage (groupwise: a run of KS / WK consecutive ones, so that a group's k-tiles fold
// once); their sums meet in shared memory in warp order.
// Groupwise int4 (MODE 2 / 3): A is u - 8 exactly, as per channel (q for signed codes), so a
// run's sums are sum x (u - 8); where a group or the warp's run of its k-tiles ends they fold
// into the totals as s (sums + (8 - z) sum x) with zeros z, s sums without, s and z read from
// [K/g, N] as the stage starts. The sums of x take x as the mma's A (two k16 steps a mma, note
// 42) and reach their tokens' lanes by two shuffles a fold. (u - z) is never rounded to x's
// dtype: the products stay exact, as per channel. grid = (row blocks, K splits),
// the splits of a row block launched as one thread-block cluster (Hopper): each block leaves
// its block's sums in its shared memory, and after a cluster barrier each block adds up one
// slice of the block's outputs over the splits' shared memory (distributed shared memory), in
// split order, then scales and rounds it: no float32 partials in HBM, no second kernel.
template <int MODE, int NT, int KS> struct StagedPlan {
  static constexpr int TK = MODE == 0 ? 32 : 64;  // features per k-tile
  static constexpr int XH = TK / 32;              // a lane's 16-byte x loads a k-tile and token
  static constexpr int TOKENS = 8 * NT;
  // a token's row of a stage, padded so that a quarter warp's 16-byte loads (tokens g, g + 1
  // at 4 lanes each) meet no bank twice
  static constexpr int ROW_BYTES = KS * TK * 2 + (XH == 2 ? 16 : 64);
  static constexpr int STAGE_BYTES = TOKENS * ROW_BYTES;
  static constexpr int CHUNKS = KS * TK * 2 / 16;  // 16-byte pieces of a token's row
};

// 16 bytes from global to shared memory (past L1), or zeros when src_bytes is 0.
__device__ __forceinline__ void copy16_async(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void commit_copies() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int PENDING> __device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;" :: "n"(PENDING) : "memory");
}

// The cluster's shape and barrier (sm_90): a block's rank in its cluster, a barrier that
// orders every block's shared-memory writes before the others' reads after it, and a float
// read from the shared memory of block `rank` of the cluster at this block's address.
__device__ __forceinline__ u32 cluster_rank() {
  u32 r = 0;
#if __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
  return r;
}

__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
               ::: "memory");
#endif
}

__device__ __forceinline__ float cluster_load(u32 address, u32 rank) {
  float v = 0.f;
#if __CUDA_ARCH__ >= 900
  u32 remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
#endif
  return v;
}

__device__ __forceinline__ u32 shared_address(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

extern __shared__ __align__(16) unsigned char staged_smem[];

template <int DT, int MODE, int NT, int RT, int WR, int WK, int KS, int STAGES>
__global__ void __launch_bounds__(WR * WK * 32)
wo_staged(const unsigned short* __restrict__ x, const uint4* __restrict__ w,
          const float* __restrict__ scale, const float* __restrict__ zeros,
          const float* __restrict__ bias, unsigned short* __restrict__ out, int M, int N, int K,
          int stages_per_split, int group) {
  typedef StagedPlan<MODE, NT, KS> Plan;
  static_assert(KS % WK == 0, "a stage's k-tiles split evenly between the K warps");
  constexpr bool GROUPED = Mode<MODE>::GROUPED, ZEROS = Mode<MODE>::ZEROS;
  constexpr int TK = Plan::TK, XH = Plan::XH, J = KS / WK, THREADS = WR * WK * 32;
  constexpr int COPIES = Plan::TOKENS * Plan::CHUNKS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wk = warp % WK, wr = warp / WK, g = lane >> 2, t = lane & 3;
  const int tiles_k = K / TK, row_tiles = N / 16;
  const int stages = (tiles_k + KS - 1) / KS;
  const int s0 = blockIdx.y * stages_per_split;
  const int count = min(stages_per_split, stages - s0);
  const int rt0 = (blockIdx.x * WR + wr) * RT;
  const uint4* wt[RT];
  int lane_row[RT];  // the lane's first row of each row tile (its second is 8 below)
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int tile = min(rt0 + r, row_tiles - 1);
    wt[r] = w + (size_t)tile * tiles_k * 32 + lane;
    lane_row[r] = 16 * tile + g;
  }
  const int shift = GROUPED ? __ffs(group / TK) - 1 : 0;  // log2 of the k-tiles of a group
  const u32 smem = shared_address(staged_smem);

  // k-tile j of this warp's in a stage: wk + WK j, or (groupwise) WK's j-th of a run
  const auto tile_of = [&](int j) { return GROUPED ? wk * J + j : wk + WK * j; };
  // this warp's k-tiles of stage i (of the split); zeros past K
  const auto load_w = [&](int i, uint4 (&wv)[J][RT]) {
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const int T = (s0 + i) * KS + tile_of(j);
        wv[j][r] = T < tiles_k ? load_weight(wt[r] + (size_t)T * 32) : make_uint4(0u, 0u, 0u, 0u);
      }
  };
  // the block's copy of x for stage i, into buffer i % STAGES
  const auto copy_x = [&](int i) {
    const int k0 = (s0 + i) * KS * TK;
    const u32 buffer = smem + (i % STAGES) * Plan::STAGE_BYTES;
#pragma unroll
    for (int c0 = 0; c0 < COPIES; c0 += THREADS) {
      const int c = c0 + threadIdx.x;
      if (COPIES % THREADS != 0 && c >= COPIES) break;
      const int m = c / Plan::CHUNKS, piece = c % Plan::CHUNKS, f = k0 + 8 * piece;
      const bool in = m < M && f < K;
      copy16_async(buffer + m * Plan::ROW_BYTES + 16 * piece, in ? x + (size_t)m * K + f : x,
                   in ? 16 : 0);
    }
  };

  // acc: the sums (groupwise: of the current run); total: groupwise, the folded runs; sx: with
  // zeros, the run's sums of x (x as A: rows g and g + 8 of token tile n's C hold token 8 n +
  // g's halves)
  float acc[1][RT][NT][4], total[RT][NT][4], sx[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sx[n][e] = 0.f;
#pragma unroll
      for (int r = 0; r < RT; ++r) acc[0][r][n][e] = total[r][n][e] = 0.f;
    }
  const u32 mask = kCodeMask[1];
  constexpr u32 ones = DT == 0 ? 0x3C003C00u : 0x3F803F80u;
  // Groupwise: a run's sums into the totals with the scales s and zeros z of its group (rows g
  // and g + 8 of each row tile), then zeroed.
  const auto fold = [&](const float (&s)[RT][2], const float (&z)[RT][2]) {
    float xsum[NT][2];  // (zeros) sum x of the lane's tokens 8 n + 2 t and 8 n + 2 t + 1
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const float mine = ZEROS ? sx[n][0] + sx[n][2] : 0.f;
      xsum[n][0] = ZEROS ? __shfl_sync(0xffffffffu, mine, 8 * t) : 0.f;
      xsum[n][1] = ZEROS ? __shfl_sync(0xffffffffu, mine, 8 * t + 4) : 0.f;
#pragma unroll
      for (int e = 0; e < 4; ++e) sx[n][e] = 0.f;
    }
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1;
          float a = acc[0][r][n][e];
          if constexpr (ZEROS) a += (8.f - z[r][h]) * xsum[n][e & 1];
          total[r][n][e] += s[r][h] * a;
          acc[0][r][n][e] = 0.f;
        }
  };
  // stage i's sums: B fragments from shared memory (token 8 n + g, the lane's TK / 4 features
  // of each of its k-tiles), A from the weight registers
  const auto compute = [&](int i, const uint4 (&wv)[J][RT]) {
    const unsigned char* xs = staged_smem + (i % STAGES) * Plan::STAGE_BYTES;
    // groupwise: each k-tile's group's scales and zeros, read as the stage starts (used where a
    // run folds; past K, the last k-tile's)
    float gs[GROUPED ? J : 1][RT][2], gz[ZEROS ? J : 1][RT][2];
    if constexpr (GROUPED) {
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const size_t base = (size_t)(min((s0 + i) * KS + tile_of(j), tiles_k - 1) >> shift) * N;
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            gs[j][r][h] = __ldg(scale + base + lane_row[r] + 8 * h);
            if constexpr (ZEROS) gz[j][r][h] = __ldg(zeros + base + lane_row[r] + 8 * h);
          }
      }
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int tile = tile_of(j);
#pragma unroll
      for (int h = 0; h < XH; ++h) {
        uint4 xh[NT];
#pragma unroll
        for (int n = 0; n < NT; ++n)
          xh[n] = *reinterpret_cast<const uint4*>(
              xs + (8 * n + g) * Plan::ROW_BYTES + 2 * (tile * TK + TK / 4 * t) + 16 * h);
        if constexpr (ZEROS) {
#pragma unroll
          for (int n = 0; n < NT; ++n)
            mma16816<DT>(sx[n], word(xh[n], 0), word(xh[n], 1), word(xh[n], 2), word(xh[n], 3),
                         ones, ones);
        }
#pragma unroll
        for (int s = 2 * h; s < 2 * h + 2; ++s) {
          u32 b[NT][2];
          step_fragments(xh, s, b);
          tiles_step<DT, MODE, NT, RT, 1, true>(s, wv[j], b, mask, acc);
        }
      }
      if constexpr (GROUPED) {  // fold where the group or the warp's run ends
        const int T = (s0 + i) * KS + tile;
        if (j == J - 1 || ((T + 1) & ((1 << shift) - 1)) == 0) fold(gs[j], gz[ZEROS ? j : 0]);
      }
    }
  };

  // The first weights before the PDL wait (no kernel writes them); x after it.
  uint4 wa[J][RT], wb[J][RT];
  load_w(0, wa);
  loads_before_wait();
  wait_then_signal();
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < count) copy_x(i);
    commit_copies();
  }
  // stage i: its copies landed (each thread's, then the barrier: everyone's, and every warp
  // is done with stage i - 1's buffer, which the copy for stage i + STAGES - 1 then takes);
  // the next stage's weights go out before this one is multiplied
  const auto stage = [&](int i, const uint4 (&cur)[J][RT], uint4 (&next)[J][RT]) {
    wait_copies<STAGES - 2>();
    __syncthreads();
    if (i + STAGES - 1 < count) copy_x(i + STAGES - 1);
    commit_copies();
    if (i + 1 < count) load_w(i + 1, next);
    compute(i, cur);
  };
  for (int i = 0; i < count; i += 2) {  // two register sets take turns
    stage(i, wa, wb);
    if (i + 1 >= count) break;
    stage(i + 1, wb, wa);
  }

  // The K warps' sums meet in shared memory (the stages' buffers, now free) in warp order.
  // What a lane holds: per channel its sums (scaled at the output), groupwise the totals.
  float(&lane_sums)[RT][NT][4] = GROUPED ? total : acc[0];
  constexpr int V = RT * NT * 4;
  wait_copies<0>();
  __syncthreads();
  if constexpr (WK > 1) {
    float* red = reinterpret_cast<float*>(staged_smem) + (size_t)wr * (WK - 1) * V * 32;
    if (wk > 0) {
#pragma unroll
      for (int i = 0; i < V; ++i) red[((wk - 1) * V + i) * 32 + lane] = (&lane_sums[0][0][0])[i];
    }
    __syncthreads();
    if (wk == 0) {
#pragma unroll
      for (int o = 0; o < WK - 1; ++o)
#pragma unroll
        for (int i = 0; i < V; ++i) (&lane_sums[0][0][0])[i] += red[(o * V + i) * 32 + lane];
    }
  }
  // per channel the row's scale; groupwise the totals are scaled already
  const auto scaled = [&](float y, int row) { return GROUPED ? y : y * __ldg(scale + row); };
  const int splits = gridDim.y;
  if (splits == 1) {
    if (wk > 0) return;
    for_each_output<RT, NT>(rt0, row_tiles, M, g, t, [&](int r, int n, int e, int row, int m) {
      const float y = scaled(lane_sums[r][n][e], row);
      out[(size_t)m * N + row] = from_float<DT>(bias ? y + bias[row] : y);
    });
    return;
  }
  // K splits: the block's sums [token][row of the block] in shared memory, then, across the
  // cluster, each block takes every splits-th output of the row block.
  constexpr int ROWS = WR * RT * 16;
  float* sums = reinterpret_cast<float*>(staged_smem);
  if constexpr (WK > 1) __syncthreads();  // (the K warps' exchange above used this memory)
  if (wk == 0) {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = 16 * (wr * RT + r) + g + (e >= 2 ? 8 : 0), m = 8 * n + 2 * t + (e & 1);
          sums[m * ROWS + row] = lane_sums[r][n][e];
        }
  }
  cluster_sync();
  const u32 rank = cluster_rank(), base = shared_address(sums);
  const int row0 = blockIdx.x * ROWS;
  for (int i = rank * THREADS + threadIdx.x; i < Plan::TOKENS * ROWS; i += splits * THREADS) {
    const int m = i / ROWS, row = row0 + i % ROWS;
    if (m >= M || row >= N) continue;
    float y = 0.f;
    for (int s = 0; s < splits; ++s) y += cluster_load(base + 4 * i, s);
    y = scaled(y, row);
    out[(size_t)m * N + row] = from_float<DT>(bias ? y + bias[row] : y);
  }
  cluster_sync();  // no block leaves while another still reads its shared memory
}

// W[N, K] in x's dtype from the tiled layout, for the larger M that go to cuBLAS: q * scale[row]
// per channel, (u - zero) * scale or q * scale of the tile's group groupwise (as
// tpquant.kernels.weight_only computes them in float32, then one rounding). A warp dequantizes
// one tile: lane (g, t) holds features TK/4 t .. TK/4 t + TK/4 - 1 of rows g and g + 8 (its
// four words), writes them into the warp's tile in shared memory (rows padded to 72 values, so
// that neither side's 16-byte accesses meet in a bank), and the warp then writes the tile's 16
// rows whole. grid: row tiles x k-tiles / 4 (4 warps a block).
#define DEQ_ROW 72  // padded row of a tile in shared memory, in 16-bit values

template <int DT, int MODE>
__global__ void __launch_bounds__(128)
wo_tiles_dequant(const uint4* __restrict__ w, const float* __restrict__ scale,
                 const float* __restrict__ zeros, unsigned short* __restrict__ out, int N, int K,
                 int group) {
  constexpr int TK = TilesPlan<MODE, 1, 1, 1>::TK, F = TK / 4;  // F: a lane's features a row
  __shared__ __align__(16) unsigned short tile[4][16 * DEQ_ROW];
  wait_then_signal();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int tiles_k = K / TK;
  const int T = blockIdx.y * 4 + warp, R = blockIdx.x;
  if (T >= tiles_k) return;  // (a whole warp: no barrier below but __syncwarp)
  const uint4 v = load_weight(w + ((size_t)R * tiles_k + T) * 32 + lane);
  // per channel: scale[row]; groupwise: scales / zeros [K/g, N] at the tile's group
  const size_t base = Mode<MODE>::GROUPED ? (size_t)(T * TK / group) * N : 0;
  unsigned short* mine = tile[warp];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = 16 * R + g + 8 * h;
    const float s = __ldg(scale + base + row);
    const float z = MODE == 2 ? __ldg(zeros + base + row) : 0.f;
    float f[F];  // features F t + c of row g + 8 h
#pragma unroll
    for (int c = 0; c < F; ++c) {
      if constexpr (MODE == 0) {  // byte h + 2 c of the lane's 16
        const int b = h + 2 * c;
        f[c] = (float)(signed char)((word(v, b >> 2) >> (8 * (b & 3))) & 0xFFu) * s;
      } else {  // word c / 4, nibble j = 4 (c & 1) + 2 ((c >> 1) & 1) + h
        const int j = 4 * (c & 1) + 2 * ((c >> 1) & 1) + h;
        const u32 code = (word(v, c >> 2) >> (4 * j)) & 0xFu;
        // zeros mode: u - z; signed codes: q (bit 3 sign-extended)
        f[c] = (MODE == 2 ? (float)code - z : (float)((int)(code ^ 8u) - 8)) * s;
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(mine + (g + 8 * h) * DEQ_ROW + F * t);
#pragma unroll
    for (int i = 0; i < F / 8; ++i)
      dst[i] = make_uint4(pack2<DT>(f[8 * i], f[8 * i + 1]), pack2<DT>(f[8 * i + 2], f[8 * i + 3]),
                          pack2<DT>(f[8 * i + 4], f[8 * i + 5]),
                          pack2<DT>(f[8 * i + 6], f[8 * i + 7]));
  }
  __syncwarp();
  constexpr int ROW_CHUNKS = TK / 8;  // 16-byte chunks of a tile row
#pragma unroll
  for (int i = 0; i < 16 * ROW_CHUNKS / 32; ++i) {  // chunk c: row c / ROW_CHUNKS
    const int c = lane + 32 * i, row = c / ROW_CHUNKS, col = 8 * (c % ROW_CHUNKS);
    *reinterpret_cast<uint4*>(out + (size_t)(16 * R + row) * K + (size_t)T * TK + col) =
        *reinterpret_cast<const uint4*>(mine + row * DEQ_ROW + col);
  }
}

// Launch geometry the host reads once: warps per block, 16-byte chunk words.
extern "C" __global__ void wo_layout(long long* out) {
  out[0] = WO_WARPS;
  out[1] = WO_CHUNK_WORDS;
}
