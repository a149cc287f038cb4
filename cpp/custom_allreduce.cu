// Custom all-reduce for the ranks of one node, over CUDA IPC.
//
// tpquant/parallel/custom_allreduce.py compiles this file at first use (NVRTC through CuPy,
// cached by CuPy) with -DTPQ_WORLD=<ranks> and launches the kernels on torch's current stream.
// NVRTC compatible on purpose: no #include (half/bfloat16 conversions are inline PTX).
//
// Every rank owns one workspace (a plain cudaMalloc; peers map it through its IPC handle):
//   [0, TPQ_CTRL_BYTES)                     Ctrl: flags peers write into, the call counter
//   [TPQ_CTRL_BYTES, + cap)                 data buffer of even calls
//   [TPQ_CTRL_BYTES + cap, + 2 cap)         data buffer of odd calls
//   [TPQ_CTRL_BYTES + 2 cap, + 2 N push)    push buffers: of even calls, then of odd calls,
//                                           each a slot of TPQ_PUSH_BYTES per source rank
//
// Protocol of one call (DESIGN s4):
// - The call counter lives on the device, so CUDA-graph replays advance it too. It is kept
//   once per block slot (steps[0..TPQ_MAX_BLOCKS)), all equal between calls: block b reads
//   steps[b] at its start and, at its end, writes the next value into every slot j with
//   j % gridDim.x == b. No atomics, and it holds whatever grid the next call launches.
// - The input is first copied into this rank's data buffer of parity step & 1, inside the
//   kernel, so a captured graph replays with its captured pointers.
// - Barrier: block b stores step + 1 into flags[parity][barrier][b][rank] of every rank with
//   release semantics at system scope, then waits (acquire) until every rank has stored at
//   least step + 1 into its own flags[parity][barrier][b][*]. Values only grow, and each call
//   has its own value, so a stale flag never lets a block through early.
// - A rank starts writing a data buffer again only two calls later. By then every peer has
//   started the call in between (it passed that call's barrier), so, kernels on one stream
//   running in order, every peer has finished reading this buffer: no end barrier is needed.
// - Sums run over ranks 0..N-1 in that order, in fp32, on every rank: bitwise-identical results.
// - Element k of the message is handled by the same (block, thread) on every rank and in every
//   phase, so the per-block barriers order exactly the writes and reads that meet.
// - Push (16-bit types, messages up to TPQ_PUSH_BYTES; DESIGN s4): no barrier and no reads
//   of peer memory. Every rank stores its packs straight into slot [rank] of every rank's push
//   buffer of parity step & 1, and a pack's arrival is its own signal: the push buffers hold
//   the sentinel 0x8000 (-0 in float16 and bfloat16) in every element between calls, and a
//   pushed pack never does (-0 goes as +0: the same sum, but for the sign of a zero). A thread
//   waits for exactly the packs it sums, then writes the sentinel back. A rank pushes into a
//   peer's buffer of this parity again two calls later, which needs this rank's packs of the
//   call in between: by then this rank has finished this call, sentinels included. Between
//   two barrier calls a push call does the barrier's job in the argument above: a rank's
//   packs go out only after its previous kernel has finished (kernels on one stream).
// - Every wait is bounded: after timeout_ns the waiting thread marks the rank it waited for
//   in the host-mapped error words, marks the workspace broken (later calls return at once)
//   and the block leaves. The host reads the words before each launch and in check().

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

#ifndef TPQ_WORLD
#error "compile with -DTPQ_WORLD=<ranks> (2..8)"
#endif
#if TPQ_WORLD < 2 || TPQ_WORLD > 8
#error "TPQ_WORLD must be in 2..8"
#endif

#define TPQ_MAX_RANKS 8
#define TPQ_MAX_BLOCKS 64
#define TPQ_THREADS 512
#define TPQ_CTRL_BYTES 65536
#define TPQ_ERR_ANY TPQ_MAX_RANKS  // host error word: some wait timed out
#define TPQ_NORM_PACKS 4  // fused norm: 16-byte packs of a row per thread, at most
#define TPQ_PUSH_BYTES (512 << 10)  // a push slot: the longest message the push kernels take
#define TPQ_PUSH_EMPTY 0x80008000u  // two 16-bit sentinels: a push slot word with nothing in it

struct Ctrl {
  u64 flags[2][2][TPQ_MAX_BLOCKS][TPQ_MAX_RANKS];  // [call parity][barrier][block][from rank]
  u64 steps[TPQ_MAX_BLOCKS];   // calls this workspace has completed (one copy per block slot)
  u32 broken;                  // a wait timed out: every later call returns at once
  u32 unused;
  u64 probe;                   // start-up: the value peers must read from this workspace
  u64 reached[TPQ_MAX_RANKS];  // start-up: peers write their mark here
  u64 seen[TPQ_MAX_RANKS];     // start-up: the probe values this rank read from its peers
};
static_assert(sizeof(Ctrl) <= TPQ_CTRL_BYTES, "Ctrl must fit in front of the data buffers");

// What the host needs to know of the layout above, written once at start-up into `out`
// (NVRTC has no offsetof: the offsets are taken from a pointer).
extern "C" __global__ void tpq_layout(u64 out) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  long long* o = reinterpret_cast<long long*>(out);
  const Ctrl* c = reinterpret_cast<const Ctrl*>(out);  // never dereferenced
  const char* base = reinterpret_cast<const char*>(c);
  o[0] = TPQ_CTRL_BYTES;
  o[1] = TPQ_MAX_RANKS;
  o[2] = TPQ_MAX_BLOCKS;
  o[3] = TPQ_THREADS;
  o[4] = reinterpret_cast<const char*>(&c->probe) - base;
  o[5] = reinterpret_cast<const char*>(&c->reached[0]) - base;
  o[6] = reinterpret_cast<const char*>(&c->seen[0]) - base;
  o[7] = TPQ_NORM_PACKS * TPQ_THREADS * 16;  // the fused norm's longest row, in bytes
  o[8] = TPQ_PUSH_BYTES;
}

// Empty the push buffers at start-up: TPQ_PUSH_EMPTY in the `words` 32-bit words at `ptr`.
extern "C" __global__ void tpq_push_clear(u64 ptr, long long words) {
  u32* p = reinterpret_cast<u32*>(ptr);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < words;
       i += (long long)gridDim.x * blockDim.x)
    p[i] = TPQ_PUSH_EMPTY;
}

__device__ __forceinline__ void store_release(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ u64 load_acquire(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ u64 now_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// a + b rounded to nearest, subnormals kept: CuPy compiles with -ftz=true, which would flush
// them in a plain `+` (and every rank must round the same way as IEEE says).
__device__ __forceinline__ float add_rn(float a, float b) {
  float s;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(s) : "f"(a), "f"(b));
  return s;
}

// Element types: raw storage bits and their conversions to and from fp32.
struct F32 {
  typedef u32 Raw;
  static __device__ __forceinline__ float to_float(u32 r) { return __uint_as_float(r); }
  static __device__ __forceinline__ u32 from_float(float f) { return __float_as_uint(f); }
};

struct F16 {
  typedef u16 Raw;
  static __device__ __forceinline__ float to_float(u16 r) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(r));
    return f;
  }
  static __device__ __forceinline__ u16 from_float(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
  }
};

struct BF16 {
  typedef u16 Raw;
  static __device__ __forceinline__ float to_float(u16 r) { return __uint_as_float(u32(r) << 16); }
  static __device__ __forceinline__ u16 from_float(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
  }
};

// A pack is 16 bytes: 4 fp32 or 8 fp16/bf16 elements.
template <class D>
struct Pack {
  typedef typename D::Raw Raw;
  static constexpr int kElems = 16 / sizeof(Raw);

  static __device__ __forceinline__ void unpack(const uint4& p, float* f) {
    const u32 w[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (kElems == 4) {
        f[i] = D::to_float(w[i]);
      } else {
        f[2 * i] = D::to_float(u16(w[i] & 0xffffu));
        f[2 * i + 1] = D::to_float(u16(w[i] >> 16));
      }
    }
  }

  static __device__ __forceinline__ uint4 pack(const float* f) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (kElems == 4) {
        w[i] = D::from_float(f[i]);
      } else {
        w[i] = u32(D::from_float(f[2 * i])) | (u32(D::from_float(f[2 * i + 1])) << 16);
      }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// Copy pack k (elements [k*E, min((k+1)*E, n))) from src to dst; 16-byte accesses when the
// pack is whole and both pointers are 16-byte aligned, element by element otherwise.
template <class D>
__device__ __forceinline__ void copy_pack(const typename D::Raw* src, typename D::Raw* dst,
                                          long long k, long long n, bool vector_ok) {
  constexpr int E = Pack<D>::kElems;
  const long long first = k * E;
  if (vector_ok && first + E <= n) {
    reinterpret_cast<uint4*>(dst)[k] = reinterpret_cast<const uint4*>(src)[k];
  } else {
    const long long end = first + E < n ? first + E : n;
    for (long long i = first; i < end; ++i) dst[i] = src[i];
  }
}

// Sum pack k over the N buffers in rank order, in fp32; store the result to out (maybe
// unaligned) and, when keep is not null, to keep (a workspace buffer, aligned).
template <class D, int N>
__device__ __forceinline__ void reduce_pack(typename D::Raw* const* bufs, typename D::Raw* out,
                                            typename D::Raw* keep, long long k, long long n,
                                            bool out_aligned) {
  typedef typename D::Raw Raw;
  constexpr int E = Pack<D>::kElems;
  const long long first = k * E;
  if (first + E <= n) {
    uint4 v[N];
#pragma unroll
    for (int r = 0; r < N; ++r) v[r] = reinterpret_cast<const uint4*>(bufs[r])[k];
    float acc[E], x[E];
    Pack<D>::unpack(v[0], acc);
#pragma unroll
    for (int r = 1; r < N; ++r) {
      Pack<D>::unpack(v[r], x);
#pragma unroll
      for (int i = 0; i < E; ++i) acc[i] = add_rn(acc[i], x[i]);
    }
    const uint4 p = Pack<D>::pack(acc);
    if (keep != nullptr) reinterpret_cast<uint4*>(keep)[k] = p;
    if (out_aligned) {
      reinterpret_cast<uint4*>(out)[k] = p;
    } else {
      const Raw* elems = reinterpret_cast<const Raw*>(&p);
#pragma unroll
      for (int i = 0; i < E; ++i) out[first + i] = elems[i];
    }
  } else {
    for (long long i = first; i < n; ++i) {
      float acc = D::to_float(bufs[0][i]);
#pragma unroll
      for (int r = 1; r < N; ++r) acc = add_rn(acc, D::to_float(bufs[r][i]));
      const Raw s = D::from_float(acc);
      if (keep != nullptr) keep[i] = s;
      out[i] = s;
    }
  }
}

// The arguments every all-reduce kernel takes; pointers travel as 64-bit integers.
struct Args {
  const void* in;
  void* out;
  long long n;         // elements
  char* ws[TPQ_MAX_RANKS];  // every rank's workspace, mapped into this process
  int rank;
  long long cap;       // bytes of one data buffer
  u64 timeout_ns;
  volatile u32* host_err;  // TPQ_MAX_RANKS + 1 host-mapped words
};

// ws[i] for a run-time i, without indexing the array (which would put it in local memory).
__device__ __forceinline__ char* pick(const Args& a, int i) {
  char* p = a.ws[0];
#pragma unroll
  for (int r = 1; r < TPQ_WORLD; ++r) p = i == r ? a.ws[r] : p;
  return p;
}

#define TPQ_PARAMS                                                                             \
  u64 in, u64 out, long long n, u64 w0, u64 w1, u64 w2, u64 w3, u64 w4, u64 w5, u64 w6, u64 w7, \
      int rank, long long cap, u64 timeout_ns, u64 host_err
#define TPQ_MAKE_ARGS                                                                     \
  Args a;                                                                                 \
  a.in = reinterpret_cast<const void*>(in);                                               \
  a.out = reinterpret_cast<void*>(out);                                                   \
  a.n = n;                                                                                \
  a.ws[0] = reinterpret_cast<char*>(w0);                                                  \
  a.ws[1] = reinterpret_cast<char*>(w1);                                                  \
  a.ws[2] = reinterpret_cast<char*>(w2);                                                  \
  a.ws[3] = reinterpret_cast<char*>(w3);                                                  \
  a.ws[4] = reinterpret_cast<char*>(w4);                                                  \
  a.ws[5] = reinterpret_cast<char*>(w5);                                                  \
  a.ws[6] = reinterpret_cast<char*>(w6);                                                  \
  a.ws[7] = reinterpret_cast<char*>(w7);                                                  \
  a.rank = rank;                                                                          \
  a.cap = cap;                                                                            \
  a.timeout_ns = timeout_ns;                                                              \
  a.host_err = reinterpret_cast<volatile u32*>(host_err);

// State one block keeps for one call.
struct Call {
  Ctrl* self;
  u64 step;
  int parity;
  long long offset;  // of this call's data buffer inside a workspace
};

// Returns false when this workspace is broken (the block must leave at once).
__device__ __forceinline__ bool begin_call(const Args& a, Call& c, int* timed_out) {
  c.self = reinterpret_cast<Ctrl*>(pick(a, a.rank));
  if (*reinterpret_cast<volatile u32*>(&c.self->broken) != 0u) return false;
  if (threadIdx.x == 0) *timed_out = 0;  // ordered before any use by the barrier's first sync
  c.step = *reinterpret_cast<volatile u64*>(&c.self->steps[blockIdx.x]);
  c.parity = int(c.step & 1ull);
  c.offset = TPQ_CTRL_BYTES + c.parity * a.cap;
  return true;
}

// A wait for rank `peer` ran out: tell the host which rank, and break the workspace.
__device__ __forceinline__ void mark_timeout(const Args& a, const Call& c, int peer) {
  a.host_err[peer] = 1u;
  a.host_err[TPQ_ERR_ANY] = 1u;
  *reinterpret_cast<volatile u32*>(&c.self->broken) = 1u;
  __threadfence_system();
}

// Block blockIdx.x of every rank meets here. Returns false (on every thread of the block)
// when some rank did not arrive within the timeout.
template <int N>
__device__ __forceinline__ bool barrier(const Args& a, const Call& c, int which, int* timed_out) {
  __syncthreads();  // this block's writes before the flag (the release makes them visible)
  if (threadIdx.x < N) {
    const int peer = threadIdx.x;
    const u64 value = c.step + 1;
    Ctrl* peer_ctrl = reinterpret_cast<Ctrl*>(pick(a, peer));
    store_release(&peer_ctrl->flags[c.parity][which][blockIdx.x][a.rank], value);
    const u64* mine = &c.self->flags[c.parity][which][blockIdx.x][peer];
    if (load_acquire(mine) < value) {
      const u64 start = now_ns();
      while (load_acquire(mine) < value) {
        if (now_ns() - start > a.timeout_ns) {
          mark_timeout(a, c, peer);
          *timed_out = 1;
          break;
        }
      }
    }
  }
  __syncthreads();  // the acquire before every thread's reads of peer data
  return *timed_out == 0;
}

// Advance the call counter in this block's share of the slots. Every thread of the block
// read steps[blockIdx.x] before the barrier's sync, so none can read the new value.
__device__ __forceinline__ void end_call(const Call& c) {
  const long long j = blockIdx.x + (long long)threadIdx.x * gridDim.x;
  if (j < TPQ_MAX_BLOCKS) c.self->steps[j] = c.step + 1;
}

// One-shot: copy in, barrier, every rank sums the whole message from every buffer.
template <class D>
__device__ __forceinline__ void one_shot(const Args& a) {
  typedef typename D::Raw Raw;
  constexpr int N = TPQ_WORLD;
  constexpr int E = Pack<D>::kElems;
  __shared__ int timed_out;
  Call c;
  if (!begin_call(a, c, &timed_out)) return;
  const Raw* in = static_cast<const Raw*>(a.in);
  Raw* out = static_cast<Raw*>(a.out);
  Raw* bufs[N];
#pragma unroll
  for (int r = 0; r < N; ++r) bufs[r] = reinterpret_cast<Raw*>(a.ws[r] + c.offset);
  Raw* mine = reinterpret_cast<Raw*>(pick(a, a.rank) + c.offset);
  const bool in_aligned = (reinterpret_cast<u64>(in) & 15ull) == 0;
  const bool out_aligned = (reinterpret_cast<u64>(out) & 15ull) == 0;
  const long long packs = (a.n + E - 1) / E;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;

  for (long long k = first; k < packs; k += stride) copy_pack<D>(in, mine, k, a.n, in_aligned);
  if (!barrier<N>(a, c, 0, &timed_out)) return;
  for (long long k = first; k < packs; k += stride)
    reduce_pack<D, N>(bufs, out, nullptr, k, a.n, out_aligned);
  end_call(c);
}

// Two-shot: copy in, barrier, reduce-scatter (rank q sums slice q and keeps it in its own
// buffer), barrier, all-gather of the reduced slices. Slices are whole packs; the copy-in
// walks them slice by slice so each pack is handled by the same thread in all three phases.
template <class D>
__device__ __forceinline__ void two_shot(const Args& a) {
  typedef typename D::Raw Raw;
  constexpr int N = TPQ_WORLD;
  constexpr int E = Pack<D>::kElems;
  __shared__ int timed_out;
  Call c;
  if (!begin_call(a, c, &timed_out)) return;
  const Raw* in = static_cast<const Raw*>(a.in);
  Raw* out = static_cast<Raw*>(a.out);
  Raw* bufs[N];
#pragma unroll
  for (int r = 0; r < N; ++r) bufs[r] = reinterpret_cast<Raw*>(a.ws[r] + c.offset);
  Raw* mine = reinterpret_cast<Raw*>(pick(a, a.rank) + c.offset);
  const bool in_aligned = (reinterpret_cast<u64>(in) & 15ull) == 0;
  const bool out_aligned = (reinterpret_cast<u64>(out) & 15ull) == 0;
  const long long packs = (a.n + E - 1) / E;
  const long long slice = (packs + N - 1) / N;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;

#pragma unroll
  for (int q = 0; q < N; ++q) {
    const long long lo = q * slice, hi = lo + slice < packs ? lo + slice : packs;
    for (long long k = lo + first; k < hi; k += stride)
      copy_pack<D>(in, mine, k, a.n, in_aligned);
  }
  if (!barrier<N>(a, c, 0, &timed_out)) return;
  {
    const long long lo = a.rank * slice, hi = lo + slice < packs ? lo + slice : packs;
    for (long long k = lo + first; k < hi; k += stride)
      reduce_pack<D, N>(bufs, out, mine, k, a.n, out_aligned);
  }
  if (!barrier<N>(a, c, 1, &timed_out)) return;
#pragma unroll
  for (int q = 0; q < N; ++q) {
    if (q == a.rank) continue;  // written to out by the reduce-scatter
    const long long lo = q * slice, hi = lo + slice < packs ? lo + slice : packs;
    for (long long k = lo + first; k < hi; k += stride)
      copy_pack<D>(bufs[q], out, k, a.n, out_aligned);
  }
  end_call(c);
}

// ---- push (see the protocol at the top) ----------------------------------------------------

__device__ __forceinline__ uint4 ld_volatile(const uint4* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_volatile(uint4* p, const uint4& v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};"
               :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// A 32-bit word of two 16-bit elements with -0 (the sentinel) made +0.
__device__ __forceinline__ u32 no_sentinel(u32 w) {
  if ((w & 0xffffu) == 0x8000u) w &= 0xffff0000u;
  if ((w >> 16) == 0x8000u) w &= 0x0000ffffu;
  return w;
}

__device__ __forceinline__ uint4 pushable(const uint4& p) {
  return make_uint4(no_sentinel(p.x), no_sentinel(p.y), no_sentinel(p.z), no_sentinel(p.w));
}

__device__ __forceinline__ bool has_sentinel(u32 w) {
  return (w & 0xffffu) == 0x8000u || (w >> 16) == 0x8000u;
}

// Every element of the pack has arrived (an element is written whole, so a pack read while it
// lands shows some sentinels, never a torn element).
__device__ __forceinline__ bool arrived(const uint4& v) {
  return !(has_sentinel(v.x) || has_sentinel(v.y) || has_sentinel(v.z) || has_sentinel(v.w));
}

// Slot `from` of the push buffer of `parity` in the workspace at `ws`.
__device__ __forceinline__ uint4* push_slot(char* ws, long long cap, int parity, int from) {
  return reinterpret_cast<uint4*>(ws + TPQ_CTRL_BYTES + 2 * cap +
                                  (long long)(parity * TPQ_WORLD + from) * TPQ_PUSH_BYTES);
}

// Wait for the pack at `slot` (pushed by rank `from`), then put the sentinels back. False when
// it did not come within the timeout (then v is zeros and the workspace is broken).
__device__ __forceinline__ bool take(const Args& a, const Call& c, uint4* slot, int from,
                                     uint4& v) {
  v = ld_volatile(slot);
  if (!arrived(v)) {
    const u64 start = now_ns();
    do {
      if (now_ns() - start > a.timeout_ns) {
        mark_timeout(a, c, from);
        v = make_uint4(0u, 0u, 0u, 0u);
        return false;
      }
      v = ld_volatile(slot);
    } while (!arrived(v));
  }
  st_volatile(slot, make_uint4(TPQ_PUSH_EMPTY, TPQ_PUSH_EMPTY, TPQ_PUSH_EMPTY, TPQ_PUSH_EMPTY));
  return true;
}

// Pack k of the n 16-bit elements at src, the elements past n as +0.
__device__ __forceinline__ uint4 load_pack16(const u16* src, long long k, long long n,
                                             bool aligned) {
  if (aligned && (k + 1) * 8 <= n) return reinterpret_cast<const uint4*>(src)[k];
  u32 w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const long long lo = k * 8 + 2 * i;
    w[i] = (lo < n ? u32(src[lo]) : 0u) | ((lo + 1 < n ? u32(src[lo + 1]) : 0u) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Store the elements of pack p that fall below n as pack k of dst.
template <class D>
__device__ __forceinline__ void store_pack(typename D::Raw* dst, long long k, long long n,
                                           bool aligned, const uint4& p) {
  constexpr int E = Pack<D>::kElems;
  if (aligned && (k + 1) * E <= n) {
    reinterpret_cast<uint4*>(dst)[k] = p;
    return;
  }
  const typename D::Raw* e = reinterpret_cast<const typename D::Raw*>(&p);
#pragma unroll
  for (int i = 0; i < E; ++i)
    if (k * E + i < n) dst[k * E + i] = e[i];
}

// Push one-shot: push every pack to every rank, then sum the packs pushed here in rank order.
template <class D>
__device__ __forceinline__ void push_one_shot(const Args& a) {
  typedef typename D::Raw Raw;
  static_assert(sizeof(Raw) == 2, "push: 16-bit types only (the sentinel is -0)");
  constexpr int N = TPQ_WORLD;
  constexpr int E = Pack<D>::kElems;
  __shared__ int timed_out;
  Call c;
  if (!begin_call(a, c, &timed_out)) return;
  __syncthreads();  // every thread has read the step before any end_call can advance it
  const Raw* in = static_cast<const Raw*>(a.in);
  Raw* out = static_cast<Raw*>(a.out);
  uint4* to[N];  // this rank's slot at every rank
#pragma unroll
  for (int r = 0; r < N; ++r) to[r] = push_slot(a.ws[r], a.cap, c.parity, a.rank);
  char* self = pick(a, a.rank);
  const bool in_aligned = (reinterpret_cast<u64>(in) & 15ull) == 0;
  const bool out_aligned = (reinterpret_cast<u64>(out) & 15ull) == 0;
  const long long packs = (a.n + E - 1) / E;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;

  for (long long k = first; k < packs; k += stride) {
    const uint4 p = pushable(load_pack16(in, k, a.n, in_aligned));
#pragma unroll
    for (int r = 0; r < N; ++r) st_volatile(to[r] + k, p);
  }
  for (long long k = first; k < packs; k += stride) {
    float acc[E], x[E];
    uint4 v;
#pragma unroll
    for (int r = 0; r < N; ++r) {
      if (!take(a, c, push_slot(self, a.cap, c.parity, r) + k, r, v)) return;
      if (r == 0) {
        Pack<D>::unpack(v, acc);
      } else {
        Pack<D>::unpack(v, x);
#pragma unroll
        for (int i = 0; i < E; ++i) acc[i] = add_rn(acc[i], x[i]);
      }
    }
    store_pack<D>(out, k, a.n, out_aligned, Pack<D>::pack(acc));
  }
  end_call(c);
}

// The sum of v over the block's threads, in a fixed order (the same bits on every rank).
// red: blockDim.x / 32 floats of shared memory, free again when this returns.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = add_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warps = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = red[0];
  for (int w = 1; w < warps; ++w) total = add_rn(total, red[w]);
  __syncthreads();  // every thread has read red before the next use overwrites it
  return total;
}

// The residual add and RMSNorm after a row-parallel layer, fused into a one-shot all-reduce
// (tpquant.layers.row.PartialSum): with d = the all-reduced partial sums `in` (rounded to D, as
// the plain all-reduce returns them), s = residual + d rounded to D (as torch's add) goes to
// s_out, and s * inv_rms(s) * weight to out, inv_rms in float32 as in
// tpquant.kernels.norm.rms_norm_f32. A block owns whole rows (row r: block r % gridDim.x) in
// every phase and on every rank, so its barrier orders exactly the copies it then reads, and
// the row's sum of squares is one block's. A thread holds at most TPQ_NORM_PACKS packs of a
// row in registers: all its loads go out at once (a decode step has one row per block, and
// its latency is the point), the residual's and weight's before the barrier. One block reads
// a row's peer packs at a bounded rate, so where the plain one-shot would spread a row over
// more blocks, the host does not fuse (add_norm_pays). Every pointer 16-byte aligned, hidden
// a whole number of packs, at most TPQ_NORM_PACKS per thread (the host checks).

struct NormArgs {
  const void* residual;
  void* s_out;
  const void* weight;
  long long hidden;  // elements per row
  float eps;
};

// This thread's packs j = threadIdx.x + p * blockDim.x of row `row` of the residual and of the
// weight (packs past the row are not read).
__device__ __forceinline__ void load_row(const NormArgs& nrm, long long row, long long row_packs,
                                         uint4 (&res)[TPQ_NORM_PACKS],
                                         uint4 (&wt)[TPQ_NORM_PACKS]) {
#pragma unroll
  for (int p = 0; p < TPQ_NORM_PACKS; ++p) {
    const long long j = threadIdx.x + (long long)p * blockDim.x;
    if (j < row_packs) {
      res[p] = static_cast<const uint4*>(nrm.residual)[row * row_packs + j];
      wt[p] = static_cast<const uint4*>(nrm.weight)[j];
    }
  }
}

// PUSH: the packs travel as in push_one_shot (16-bit types) instead of copy-in, barrier and
// reads of peer memory. A wait that runs out leaves zeros and the block's flag set; the
// block goes on to its block_sum (every thread must reach its syncs) and stores nothing.
template <class D, bool PUSH>
__device__ __forceinline__ void one_shot_add_norm(const Args& a, const NormArgs& nrm) {
  constexpr int N = TPQ_WORLD;
  constexpr int E = Pack<D>::kElems;
  constexpr int P = TPQ_NORM_PACKS;
  __shared__ int timed_out;
  __shared__ float red[TPQ_THREADS / 32];
  Call c;
  if (!begin_call(a, c, &timed_out)) return;
  const uint4* in = static_cast<const uint4*>(a.in);
  uint4* s_out = static_cast<uint4*>(nrm.s_out);
  uint4* out = static_cast<uint4*>(a.out);
  uint4* bufs[N];  // barrier: every rank's data buffer; push: the slots pushed to this rank
  uint4* to[N];    // push: this rank's slot at every rank
#pragma unroll
  for (int r = 0; r < N; ++r) {
    if constexpr (PUSH) {
      bufs[r] = push_slot(pick(a, a.rank), a.cap, c.parity, r);
      to[r] = push_slot(a.ws[r], a.cap, c.parity, a.rank);
    } else {
      bufs[r] = reinterpret_cast<uint4*>(a.ws[r] + c.offset);
    }
  }
  uint4* mine = reinterpret_cast<uint4*>(pick(a, a.rank) + c.offset);
  const long long row_packs = nrm.hidden / E, rows = a.n / nrm.hidden;

  for (long long row = blockIdx.x; row < rows; row += gridDim.x)
    for (long long k = row * row_packs + threadIdx.x; k < (row + 1) * row_packs; k += blockDim.x) {
      if constexpr (PUSH) {
        const uint4 p = pushable(in[k]);
#pragma unroll
        for (int r = 0; r < N; ++r) st_volatile(to[r] + k, p);
      } else {
        mine[k] = in[k];
      }
    }
  uint4 res[P], wt[P];
  load_row(nrm, blockIdx.x, row_packs, res, wt);  // local: in flight during the barrier
  if constexpr (PUSH) {
    __syncthreads();  // the step read and timed_out reset before any end_call or wait
  } else {
    if (!barrier<N>(a, c, 0, &timed_out)) return;
  }
  bool ok = true;
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    if (row != blockIdx.x) load_row(nrm, row, row_packs, res, wt);
    float s[P][E];
    float squares = 0.f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const long long j = threadIdx.x + (long long)p * blockDim.x;
      if (j >= row_packs) continue;
      const long long k = row * row_packs + j;
      float acc[E], v[E];
#pragma unroll
      for (int r = 0; r < N; ++r) {
        uint4 packed;
        if constexpr (PUSH) {
          if (ok && !take(a, c, bufs[r] + k, r, packed)) {
            ok = false;
            timed_out = 1;
          }
          if (!ok) packed = make_uint4(0u, 0u, 0u, 0u);
        } else {
          packed = bufs[r][k];
        }
        if (r == 0) {
          Pack<D>::unpack(packed, acc);
        } else {
          Pack<D>::unpack(packed, v);
#pragma unroll
          for (int i = 0; i < E; ++i) acc[i] = add_rn(acc[i], v[i]);
        }
      }
      Pack<D>::unpack(Pack<D>::pack(acc), acc);  // d as the all-reduce would return it
      Pack<D>::unpack(res[p], v);
#pragma unroll
      for (int i = 0; i < E; ++i) acc[i] = add_rn(v[i], acc[i]);
      Pack<D>::unpack(Pack<D>::pack(acc), s[p]);  // s rounded to D
#pragma unroll
      for (int i = 0; i < E; ++i) squares = fmaf(s[p][i], s[p][i], squares);
    }
    const float mean = __fdiv_rn(block_sum(squares, red), float(nrm.hidden));
    if (PUSH && timed_out) return;  // read after block_sum's syncs: the same on every thread
    const float inv_rms = __fdiv_rn(1.f, __fsqrt_rn(add_rn(mean, nrm.eps)));
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const long long j = threadIdx.x + (long long)p * blockDim.x;
      if (j >= row_packs) continue;
      float w[E];
      Pack<D>::unpack(wt[p], w);
#pragma unroll
      for (int i = 0; i < E; ++i) w[i] = __fmul_rn(__fmul_rn(s[p][i], inv_rms), w[i]);
      s_out[row * row_packs + j] = Pack<D>::pack(s[p]);
      out[row * row_packs + j] = Pack<D>::pack(w);
    }
    if constexpr (PUSH) __syncthreads();  // all have read timed_out before the next waits
  }
  end_call(c);
}

// Programmatic dependent launch (tpquant/kernels/pdl.py): wait for the kernel before this one
// (the partial sums it wrote), then let the next one start. No-ops when launched without it.
__device__ __forceinline__ void wait_then_signal() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// An all-reduce kernel NAME: the PDL wait, then RUN<D>(a).
#define TPQ_ALL_REDUCE_KERNEL(NAME, RUN)                                              \
  extern "C" __global__ void __launch_bounds__(TPQ_THREADS) NAME(TPQ_PARAMS) {        \
    TPQ_MAKE_ARGS                                                                     \
    wait_then_signal();                                                               \
    RUN(a);                                                                           \
  }

// A fused all-reduce + add + RMSNorm kernel NAME over the one-shot (PUSH false) or push.
#define TPQ_ADD_NORM_KERNEL(NAME, D, PUSH)                                            \
  extern "C" __global__ void __launch_bounds__(TPQ_THREADS) NAME(                     \
      TPQ_PARAMS, u64 residual, u64 s_out, u64 weight, long long hidden, float eps) { \
    TPQ_MAKE_ARGS                                                                     \
    const NormArgs nrm = {reinterpret_cast<const void*>(residual),                    \
                          reinterpret_cast<void*>(s_out),                             \
                          reinterpret_cast<const void*>(weight), hidden, eps};        \
    wait_then_signal();                                                               \
    one_shot_add_norm<D, PUSH>(a, nrm);                                               \
  }

#define TPQ_KERNELS(NAME, D)                                                          \
  TPQ_ALL_REDUCE_KERNEL(tpq_one_shot_##NAME, one_shot<D>)                             \
  TPQ_ALL_REDUCE_KERNEL(tpq_two_shot_##NAME, two_shot<D>)                             \
  TPQ_ADD_NORM_KERNEL(tpq_add_norm_##NAME, D, false)

// The push kernels, for the 16-bit types.
#define TPQ_PUSH_KERNELS(NAME, D)                                                     \
  TPQ_ALL_REDUCE_KERNEL(tpq_push_##NAME, push_one_shot<D>)                            \
  TPQ_ADD_NORM_KERNEL(tpq_push_add_norm_##NAME, D, true)

TPQ_KERNELS(f32, F32)
TPQ_KERNELS(f16, F16)
TPQ_KERNELS(bf16, BF16)
TPQ_PUSH_KERNELS(f16, F16)
TPQ_PUSH_KERNELS(bf16, BF16)

// Start-up check that peers really reach each other: thread r reads rank r's probe value
// (into this rank's `seen`) and writes this rank's mark into rank r's `reached[rank]`.
extern "C" __global__ void tpq_probe(u64 w0, u64 w1, u64 w2, u64 w3, u64 w4, u64 w5, u64 w6,
                                     u64 w7, int rank, u64 mark) {
  const u64 w[TPQ_MAX_RANKS] = {w0, w1, w2, w3, w4, w5, w6, w7};
  const int r = threadIdx.x;
  if (r >= TPQ_WORLD) return;
  Ctrl* self = reinterpret_cast<Ctrl*>(w[rank]);
  Ctrl* peer = reinterpret_cast<Ctrl*>(w[r]);
  self->seen[r] = *reinterpret_cast<volatile u64*>(&peer->probe);
  *reinterpret_cast<volatile u64*>(&peer->reached[rank]) = mark;
  __threadfence_system();
}
