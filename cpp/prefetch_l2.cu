// L2 prefetch of a decode step's next weight (tpquant/kernels/prefetch.py compiles and launches
// it, NVRTC through CuPy, on torch's current stream; CUDA-graph safe).
//
// Launched with programmatic dependent launch just before a GEMV, so that it runs beside the
// kernel before it, which leaves DRAM idle (an all-reduce, a norm, attention's last kernel).
// Block b has the TMA bring the first `take` bytes of stripe b (`stripe` bytes from the tensor's
// start, b * stripe on) into L2: one cp.async.bulk.prefetch, a hint that reads nothing into the
// SM and writes nothing. Order: let the next kernel (the GEMV) launch, issue the prefetch, then
// wait for the kernel before this one. The GEMV waits for this kernel to end, so it still
// waits for everything before it (tpquant/kernels/pdl.py); without that last wait it could
// read its input before the kernel before this one had written it.

typedef unsigned long long u64;

extern "C" __global__ void tpq_prefetch_l2(u64 ptr, long long bytes, long long stripe,
                                           long long take) {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const long long start = (long long)blockIdx.x * stripe;
  // whole 16-byte units, inside the tensor (the host passes stripe and take in such units)
  const long long n = min(take, bytes - start) & ~15ll;
  if (threadIdx.x == 0 && n > 0) {
    u64 global;
    asm("cvta.to.global.u64 %0, %1;" : "=l"(global) : "l"(ptr + start));
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(global),
                 "r"((unsigned)n) : "memory");
  }
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
