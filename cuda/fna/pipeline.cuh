// Producer / consumer roles of the warp-specialized FNA kernels (Hopper, sm_90a): one warpgroup
// (the producer) stages a walk's tiles into a ring of shared-memory stages, with cp.async or the
// TMA (below), while the others (the consumers) compute on the stages before. Stages hand over
// through mbarriers:
//   full[s]:  the producer's threads arrive once their copies into stage s have landed (with
//             the TMA: one thread arrives with the byte count, the copies complete the phase);
//             the consumers wait on it before reading the stage.
//   empty[s]: the consumers' threads arrive once they will not read stage s again (their MMAs
//             that read it have completed); the producer waits on it before refilling s.
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
// Makes mbarrier initializations visible to the other proxies (the TMA's complete_tx) before
// the CTA barrier that follows them.
__device__ __forceinline__ void fence_mbar_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
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
// Arrive at barrier `id` without waiting (the `threads` count includes the threads that sync).
__device__ __forceinline__ void role_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
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

// ---- the tensor memory accelerator (TMA, sm_90) --------------------------------------------------
// A copy of a box of a tensor (described on the host by a CUtensorMap: tensor_maps.h) from global
// into shared memory by the copy engine: one instruction per box, no registers per element, rows
// outside the tensor zero-filled. Its writes complete on an mbarrier as a transaction count:
// the thread that issues a stage's copies arrives once with the stage's byte count
// (mbar_expect_tx), and the phase completes when that many bytes have landed. The copies write
// through the async proxy that wgmma reads through: no proxy fence between them.
// Arrive on `bar` and expect `bytes` more bytes of copies to complete on its current phase.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
#endif
}
// Expect `bytes` more bytes of copies on `bar`'s current phase, without arriving (a producer
// whose threads arrive for other copies of the same stage).
__device__ __forceinline__ void mbar_expect_tx_only(uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
#endif
}
// Copies the box at coordinates c (innermost first) of the 5-D tensor map `map` (a kernel
// parameter: __grid_constant__) to `dst` (its swizzle's alignment: 1024 bytes for 128-byte
// swizzle), completing on `bar`.
__device__ __forceinline__ void tma_load_5d(void* dst, const void* map, uint64_t* bar, int c0,
                                            int c1, int c2, int c3, int c4) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4),
      "r"(smem_addr(bar))
      : "memory");
#endif
}
// Adds the float32 box at `src` (laid out as the map says, swizzle included) to the box at
// coordinates c of `map`'s tensor in global memory, elementwise, by the copy engine; elements
// outside the tensor are skipped. Completes in this thread's bulk group (bulk_commit,
// bulk_wait_read before rewriting src, natten/wgmma.cuh).
__device__ __forceinline__ void tma_reduce_add_5d(const void* map, const void* src, int c0, int c1,
                                                  int c2, int c3, int c4) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.reduce.async.bulk.tensor.5d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%2, %3, %4, %5, %6}], [%1];\n" ::"l"(reinterpret_cast<uint64_t>(map)),
      "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
#endif
}
// Fetches a tensor map into the TMA unit's cache ahead of its first copy.
__device__ __forceinline__ void tma_prefetch_map(const void* map) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
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
  // The whole CTA, before the role split: one thread initializes the ring and the barrier of the
  // tiles copied once (`once`, with `once_producers` arrivals), fenced for the TMA's complete_tx
  // where a TMA copies (`tma`); then the CTA barrier.
  __device__ __forceinline__ void setup(int producers, int consumers, uint64_t* once,
                                        int once_producers, bool tma) const {
    if (threadIdx.x == 0) {
      init(producers, consumers);
      mbar_init(once, once_producers);
      if (tma) fence_mbar_init();
    }
    __syncthreads();
  }
  // Step `step`'s stage and the parity of its use of it. In 32-bit arithmetic (a CTA's walk has
  // far fewer than 2^32 steps): the 64-bit division by a constant costs ~15 uniform instructions,
  // which sit in front of every step's first product.
  __device__ __forceinline__ static int stage(int64_t step) {
    return static_cast<int>(static_cast<uint32_t>(step) % kStages);
  }
  __device__ __forceinline__ static unsigned parity(int64_t step) {
    return (static_cast<uint32_t>(step) / kStages) & 1u;
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

// Turns at issuing the products, between kWgs computing warpgroups (FlashAttention 3's scheduler
// barrier): warpgroup w issues its products of a round only after warpgroup w - 1 issued its
// own, and warpgroup 0 after the last one's of the round before. The tensor cores run products
// in issue order, so each warpgroup's products come out of the pipe one after another, and one
// warpgroup's softmax runs while the others' products keep the tensor cores busy, instead of
// all of them waiting for their products at once and then all taking their exponentials at once.
// Named barrier kFirstId + w (256 threads: warpgroup w syncs, its predecessor arrives) is w's
// turn. Every warpgroup takes the same number of turns (a walk's rounds, idle ones included): a
// warpgroup that skips one leaves the others waiting for ever. The last round's hand-over to
// warpgroup 0 (pass_last) is skipped, so no barrier is left half-arrived when the CTA exits.
template <int kWgs>
struct IssueTurns {
  static constexpr int kFirstId = 2;     // (1 is the computing warpgroups' role_sync)
  static constexpr int kPair = 2 * 128;  // a barrier's threads: two warpgroups
  int own, next;                         // this warpgroup's barrier, its successor's
  __device__ __forceinline__ explicit IssueTurns(int wg)
      : own(kFirstId + wg), next(kFirstId + (wg + 1) % kWgs) {}
  // Before the first round: the last warpgroup gives the first its turn.
  __device__ __forceinline__ void start() const {
    if (next == kFirstId) role_arrive(next, kPair);
  }
  __device__ __forceinline__ void take() const { role_sync(own, kPair); }
  // (No branch: it runs while the warpgroup's products are in flight, where ptxas would
  // serialize them over a divergent path.)
  __device__ __forceinline__ void pass() const { role_arrive(next, kPair); }
  __device__ __forceinline__ void pass_last() const {
    if (next != kFirstId) role_arrive(next, kPair);
  }
};

// No turns: every call returns at once. The box walk (forward_tma.cu) runs without them: its
// warpgroups' rows reach different runs of the CTA's steps (a third of 2d-large's rounds has one
// warpgroup with work), so the turns made the working warpgroups wait on the idle ones' hops
// round after round; without them the working ones run ahead, as far as the stage ring lets them.
// Measured on an H100 (session 18): box-walk forwards 4-11% faster (2d-large 1.647 -> 1.547 ms);
// the 1-D walk, whose warpgroups share most steps, keeps its turns.
struct NoTurns {
  __device__ __forceinline__ explicit NoTurns(int) {}
  __device__ __forceinline__ void start() const {}
  __device__ __forceinline__ void take() const {}
  __device__ __forceinline__ void pass() const {}
  __device__ __forceinline__ void pass_last() const {}
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
