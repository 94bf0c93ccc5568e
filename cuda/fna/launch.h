// Host entry points of the FNA kernels (fna.cuh describes them), one .cu file per kernel so the
// template instances compile in parallel. The handlers (handlers.cu) validate and tile first.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>

#include "fna.cuh"
#include "natten/cuda_common.h"
#include "natten/ffi_helpers.h"
#include "tiling.h"

namespace natten {
namespace gpu {
namespace fna {

// Head-dim tiles the kernels are compiled for; D and Dv are padded (with zeros) to one of them.
constexpr int kHeadDimTiles[] = {32, 64, 128};
constexpr int kMaxHeadDim = 128;
// Shared memory the dq kernel may take with its d-rpb table (fits sm_80's 163 KB and sm_90's 227 KB).
// These are caps the handlers plan within (launch_kernel refuses more); a device is asked only for
// what a launch needs (grant_smem).
constexpr int kMaxDqSmem = 160 * 1024;
// The same for the TMA dq kernel (sm_90 only: its opt-in maximum, 227 KB).
constexpr int kMaxDqTmaSmem = 227 * 1024;
// The same for the key-side backward kernel (its Hopper dq variant keeps a d-rpb table too).
constexpr int kMaxBwdSmem = 200 * 1024;

// m16 tiles per warp of the forward kernel: its query tiles hold 64 * fwd_m_tiles tokens. mma.sync
// takes two (every B fragment loaded from shared memory feeds two products); wgmma reads B from
// shared memory itself, so one m64 block per warpgroup is as cheap per flop and needs half the
// registers: 4 CTAs per SM instead of 2 at D <= 64, more warps to hide latency with.
constexpr int fwd_m_tiles_log(int dt, bool wg) { return wg ? 0 : (dt <= 128 ? 1 : 0); }
constexpr int fwd_m_tiles(int dt, bool wg) { return 1 << fwd_m_tiles_log(dt, wg); }
static_assert(kTileLog + fwd_m_tiles_log(32, false) == fwd_q_tile_log(32, false, false) &&
                  kTileLog + fwd_m_tiles_log(128, false) == fwd_q_tile_log(128, false, false) &&
                  fwd_q_tile_log(32, false, true) == kTileLog + fwd_m_tiles_log(32, true) &&
                  fwd_warp_specialized(128) &&
                  1 << fwd_q_tile_log(128, false, true) == kFwdWsQRows,
              "the forward kernels' query tiles are the ones tiling.h plans for");
// The same for the dq kernel, which holds two more score tiles (dP, dS) per m16 tile.
constexpr int dq_m_tiles_log(int dt, bool wg) { return wg ? 0 : (dt <= 64 ? 1 : 0); }
constexpr int dq_m_tiles(int dt, bool wg) { return 1 << dq_m_tiles_log(dt, wg); }

// CTAs per SM each kernel's register budget is sized for (__launch_bounds__). mma.sync forward:
// small head dims leave room for a third CTA; wgmma kernels hold no B fragments in registers. (The
// dk/dv kernels keep 2: at 3 they spill.)
constexpr int fwd_min_ctas(int dt, int mt, bool wg) {
  return wg ? (dt <= 64 ? 4 : 2) : (dt * mt <= 64 ? 3 : 2);
}
constexpr int dq_min_ctas(int dt, bool wg) { return wg && dt <= 64 ? 3 : 2; }

inline ffi::Error launch_error(const char* what, cudaError_t e) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("natten: ") + what + " failed: " + cudaGetErrorString(e));
}

// Dynamic shared memory above 48 KB is an opt-in per kernel (cudaFuncSetAttribute) that holds
// for the current device only: each device's context loads its own copy of the kernel. So it is
// granted per device, raised to what a launch asks for the first time a launch on that device
// asks for more (the driver call under a lock; later launches read one atomic), and never past
// what the launch needs: asking a device for more than it has (a 200 KB limit on an A100's
// 163 KB) fails even where the launch would fit. One table per kernel (the statics are per
// instantiation); devices past kMaxDevices set the attribute at every launch.
constexpr int kMaxDevices = 64;
template <auto kKernel>
cudaError_t grant_smem(int smem) {
  static std::atomic<int> granted[kMaxDevices] = {};
  static std::mutex raising;
  int device = 0;
  const cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (device >= kMaxDevices)
    return cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (smem <= granted[device].load(std::memory_order_acquire)) return cudaSuccess;
  const std::lock_guard<std::mutex> lock(raising);
  if (smem <= granted[device].load(std::memory_order_relaxed)) return cudaSuccess;
  const cudaError_t set =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (set == cudaSuccess) granted[device].store(smem, std::memory_order_release);
  return set;
}

// The one launcher of the FNA kernels: kKernel(a, p, extra...) on `grid` x `threads` (kThreads,
// or more warpgroups for the warp-specialized kernels) with `smem` bytes of dynamic shared
// memory (at most `limit`, the most the kernel's callers plan for; grant_smem opts in), and the
// launch checked.
template <auto kKernel, typename... Extra>
ffi::Error launch_kernel(const char* what, int limit, int smem, dim3 grid, cudaStream_t stream,
                         const FnaArgs& a, const FnaPtrs& p, int threads = kThreads,
                         const Extra&... extra) {
  if (smem > limit)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("natten: ") + what + " asks for " + std::to_string(smem) +
                          " bytes of shared memory, past its " + std::to_string(limit));
  const cudaError_t attr = grant_smem<kKernel>(smem);
  if (attr != cudaSuccess) return launch_error(what, attr);
  kKernel<<<grid, threads, smem, stream>>>(a, p, extra...);
  return check_launch(what);
}

// f(TypeTag<T>{}, std::integral_constant<int, DT>{}) for a tensor-core dtype and head-dim tile.
template <typename F>
ffi::Error dispatch_tile(ffi::DataType t, int dt, F&& f) {
  auto by_dim = [&](auto tag) -> ffi::Error {
    switch (dt) {
      case 32: return f(tag, std::integral_constant<int, 32>{});
      case 64: return f(tag, std::integral_constant<int, 64>{});
      case 128: return f(tag, std::integral_constant<int, 128>{});
      default: return invalid("fused: no kernel for head-dim tile " + std::to_string(dt));
    }
  };
  switch (t) {
    case ffi::DataType::F16: return by_dim(TypeTag<__half>{});
    case ffi::DataType::BF16: return by_dim(TypeTag<__nv_bfloat16>{});
    default: return invalid("fused: the kernels take float16 or bfloat16");
  }
}

// o, lse (and where p.out_stats / p.out_o32 are set, the softmax statistics and o in float32)
// from q, k, v (+ rpb, additional kv) of batch elements [a.batch0, a.batch0 + batch).
// Grid: (a.q_tiles, heads, batch). wgmma: the Hopper kernels (sm_90 devices only; the same flag
// in the backward launches).
ffi::Error launch_forward(cudaStream_t stream, ffi::DataType t, int dt, bool wgmma,
                          const FnaArgs& a, const FnaPtrs& p, int64_t batch);
// The same on the warp-specialized Hopper kernel (forward_ws.cu), which launch_forward picks where
// fwd_warp_specialized(dt); with `tma` (tiling.h forward_on_box_tma) its TMA variant, whose maps
// span `batch_total` batch elements.
ffi::Error launch_forward_ws(cudaStream_t stream, ffi::DataType t, int dt, bool tma,
                             const FnaArgs& a, const FnaPtrs& p, int64_t batch,
                             int64_t batch_total);
// The same on the TMA forward (forward_tma.cu), for the problems tiling.h's forward_on_tma
// accepts, with its tiles (tma_tiling), and for those of forward_on_tma_box where tma_box_plan
// takes it (a: its tiles' arguments; the launch counts the stacked query tiles); `batch_total`:
// the call's batch elements (the tensor maps span all of them; this launch runs `batch` from
// a.batch0).
ffi::Error launch_forward_tma(cudaStream_t stream, ffi::DataType t, int dt, const FnaArgs& a,
                              const FnaPtrs& p, int64_t batch, int64_t batch_total);
// delta = rowsum(do * o32) - dlse for all `batch` elements (one grid-stride launch).
ffi::Error launch_backward_delta(cudaStream_t stream, ffi::DataType t, const FnaArgs& a,
                                 const FnaPtrs& p, int64_t batch);
// dq (+ d-rpb) of batch elements [a.batch0, a.batch0 + batch). Grid: (a.q_tiles, heads, batch).
ffi::Error launch_backward_dq(cudaStream_t stream, ffi::DataType t, int dt, bool wgmma,
                              const FnaArgs& a, const FnaPtrs& p, int64_t batch);
// The same on the TMA dq kernel (backward_dq_tma.cu), for the problems tiling.h's dq_on_box_tma
// accepts, with the box TMA forward's tiles; its tensor maps span `batch_total` batch elements.
ffi::Error launch_backward_dq_tma(cudaStream_t stream, ffi::DataType t, int dt, const FnaArgs& a,
                                  const FnaPtrs& p, int64_t batch, int64_t batch_total);
// dk, dv, dadd_k, dadd_v of batch elements [a.batch0, ...), and with dq_wgs > 0 (wgmma only) dq
// into the float32 workspace p.dq_acc (zeroed first) and d-rpb, on dq_wgs computing warpgroups
// (key tiles of bwd_key_rows(dq_wgs)). Grid: (a.kv_tiles + a.add_tiles, kv_heads, batch). With
// `tma` (dq_wgs 0, tiling.h key_walk_on_box_tma) q and do come by the TMA, whose maps span
// `batch_total` batch elements.
ffi::Error launch_backward_kv(cudaStream_t stream, ffi::DataType t, int dt, bool wgmma,
                              int dq_wgs, bool tma, const FnaArgs& a, const FnaPtrs& p,
                              int64_t batch, int64_t batch_total);
// dk, dv and dq (into p.dq_acc, zeroed first) on the TMA backward (backward_tma.cu), for the
// problems tiling.h's backward_on_tma accepts, with its tiles (tma_tiling); its tensor maps span
// `batch_total` batch elements (this launch runs `batch` from a.batch0).
ffi::Error launch_backward_tma(cudaStream_t stream, ffi::DataType t, const FnaArgs& a,
                               const FnaPtrs& p, int64_t batch, int64_t batch_total);
// dq = scale * dq_acc, rounded to the dtype, for all `batch` elements.
ffi::Error launch_backward_dq_convert(cudaStream_t stream, ffi::DataType t, const FnaArgs& a,
                                      const FnaPtrs& p, int64_t batch);

// float32 (simt_f32.cu): query and key tiles of 2^f32_tile_log(dt) tokens (tiling.h); the dq
// kernel's shared memory before its d-rpb table.
int f32_dq_smem(int dt);
ffi::Error launch_forward_f32(cudaStream_t stream, int dt, const FnaArgs& a, const FnaPtrs& p,
                              int64_t batch);
// dq (+ d-rpb) with dq_args, then dk / dv with kv_args (the delta kernel ran before).
ffi::Error launch_backward_f32(cudaStream_t stream, int dt, const FnaArgs& dq_args,
                               const FnaArgs& kv_args, const FnaPtrs& p, int64_t batch);

}  // namespace fna
}  // namespace gpu
}  // namespace natten
