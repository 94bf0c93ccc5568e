// Producer / consumer roles of the warp-specialized FNA kernels (Hopper, sm_90a): one warpgroup
// (the producer) stages a walk's tiles into a ring of shared-memory stages with cp.async while the
// other (the consumer) computes on the stage before. Stages hand over through mbarriers:
//   full[s]:  the producer's 128 threads arrive once their copies into stage s have landed;
//             the consumer waits on it before reading the stage.
//   empty[s]: the consumer's 128 threads arrive once they will not read stage s again (their
//             MMAs that read it have completed); the producer waits on it before refilling s.
// Step i of the walk uses stage i % kStages; the n-th use of a stage is phase n of its barriers,
// waited on by parity n & 1.
//
// Why each producer thread waits for its own copies before arriving (instead of letting the copy
// unit arrive for it): the tiles are read by wgmma, through the async proxy, and ordinary cp.async
// writes become visible to that proxy only after a fence.proxy.async by the writing thread. The
// producer therefore runs one step ahead: it issues step i's copies, then waits for step i - 1's
// (cp.async.wait_group 1), fences and arrives on that step's full barrier. `Handoff` holds that
// one pending arrival.
//
// setmaxnreg moves registers between the roles: the producer's address arithmetic needs few, the
// consumer's accumulators many. The kernel is compiled with a per-thread cap (launch bounds); the
// producer's branch returns before the consumer's code, which runs after its own setmaxnreg (the
// consumer's values are built after the split: whatever lives across it must fit the cap).
//
// Keeping warpgroup MMAs asynchronous. ptxas decides per kernel whether wgmma may stay in flight
// while other code runs; when it cannot prove that safe it serializes every wgmma of the kernel
// (a wait after each) and says so only in "ptxas info" lines, codes C7510..C7520 (.ci/
// kernel_report.py lists them and fails CI on them). What has triggered it here: too few
// registers for the accumulators in flight (C7512: 104 per thread at head-dim tile 64); an
// accumulator written from two issue sites that meet in a loop (C7514); issues or waits under
// conditions, and per-thread branches, inside the in-flight window (C7518 / C7520). Silently,
// ptxas also moves a wait up to the first join of divergent paths inside the window, so code
// meant to overlap an MMA (a softmax with per-tile-kind branches) must finish inside each branch.
// And pack register A operands before the first MMA of a group: packing between them makes it
// inject a warpgroup.arrive before each (C7519).
#pragma once

#include <cstdint>

#include "natten/mma.cuh"
#include "natten/wgmma.cuh"

namespace natten {
namespace gpu {
namespace fna {

// ---- PTX primitives (sm_90; the kernels using them are only launched there) ---------------------
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
#endif
}
// Arrive (release: this thread's earlier writes are visible to whoever waits on the phase).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
// Waits (acquire) until the phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#endif
}
// Whether the phase with this parity has completed (no waiting).
__device__ __forceinline__ bool mbar_done(uint64_t* bar, unsigned parity) {
  unsigned done = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
#endif
  return done != 0;
}
// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads of the CTA: one role only.
__device__ __forceinline__ void role_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <int kRegs>
__device__ __forceinline__ void regs_grow() {
#if NATTEN_HAS_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void regs_shrink() {
#if NATTEN_HAS_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// ---- the stage ring -------------------------------------------------------------------------
template <int kStages>
struct StageRing {
  uint64_t* full;   // [kStages]
  uint64_t* empty;  // [kStages]

  // One thread, before the CTA barrier that precedes the role split.
  __device__ __forceinline__ void init(int producers, int consumers) const {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + s, producers);
      mbar_init(empty + s, consumers);
    }
  }
  __device__ __forceinline__ static int stage(int64_t step) {
    return static_cast<int>(step % kStages);
  }
  __device__ __forceinline__ static unsigned parity(int64_t step) {
    return static_cast<unsigned>((step / kStages) & 1);
  }
  // Producer: before filling step's stage, wait until the consumer released its previous use.
  __device__ __forceinline__ void acquire(int64_t step) const {
    if (step >= kStages) mbar_wait(empty + stage(step), parity(step) ^ 1u);
  }
  // Producer: whether acquire(step) would return at once.
  __device__ __forceinline__ bool free(int64_t step) const {
    return step < kStages || mbar_done(empty + stage(step), parity(step) ^ 1u);
  }
  // Consumer: wait for step's tiles; release them once done reading.
  __device__ __forceinline__ void wait(int64_t step) const {
    mbar_wait(full + stage(step), parity(step));
  }
  __device__ __forceinline__ void release(int64_t step) const { mbar_arrive(empty + stage(step)); }
};

// The producer thread's one pending arrival (see above): after committing a cp.async group for a
// barrier, `then` makes the previous group visible and arrives on its barrier; `flush` does the
// same for the last group. A producer about to block in acquire flushes first: a consumer that
// holds one stage while it waits for a later one (the forward looks ahead) may be waiting for
// exactly the pending arrival, and it releases nothing until that arrives.
struct Handoff {
  uint64_t* pending = nullptr;
  __device__ __forceinline__ void then(uint64_t* bar) {
    cp_async_wait<1>();
    arrive_pending();
    pending = bar;
  }
  __device__ __forceinline__ void flush() {
    cp_async_wait<0>();
    arrive_pending();
    pending = nullptr;
  }

 private:
  __device__ __forceinline__ void arrive_pending() {
    if (pending == nullptr) return;
    fence_proxy_async();  // this thread's cp.async writes -> the consumer's wgmma reads
    mbar_arrive(pending);
  }
};

}  // namespace fna
}  // namespace gpu
}  // namespace natten
