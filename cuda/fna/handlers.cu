// The FFI handlers of backend="fused": natten_fused_fna_{fwd,bwd} (contract: cuda/README.md).
//   fna_fwd: q, k, v, rpb, add_k, add_v -> o, lse, stats, o32
//            stats [B, X, Y, Z, H, 2] f32: per query row (m2, log2_l), the softmax's base-2 max
//            logit and log2 of its sum relative to it (softmax.cuh, "softmax statistics"); o32
//            [B, X, Y, Z, H, Dv] f32: o before rounding. Residuals for the backward: a call
//            that wants no gradient passes both with 0 elements and they are not written.
//   fna_bwd: q, k, v, rpb, add_k, add_v, stats, o32, do, dlse -> dq, dk, dv, drpb, dadd_k,
//            dadd_v, delta (workspace: f32, shape of lse), dq_acc (workspace: f32, shape of dq,
//            or 0 elements where the schedule does not add into it; the caller discards both).
//            The weights come from stats, delta = rowsum(do * o32) - dlse.
// Attributes: the window's four, scale (f32), q_tile and kv_tile (3 extents each, all 0 = choose:
// tiling.h), `mma` (int64: 0 auto, 1 mma.sync, 2 wgmma; float32 runs neither) and for the
// backward `deterministic` (int64 0/1).
// Launches only on XLA's stream, allocates nothing, never synchronizes; every launch is checked.
#include <algorithm>
#include <string>

#include "launch.h"
#include "natten/cuda_common.h"
#include "natten/cuda_handlers.h"
#include "natten/ffi_helpers.h"
#include "natten/limits.h"
#include "natten/op_checks.h"
#include "tiling.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

constexpr int64_t kMaxGridY = 65535;  // grid.y and grid.z limit
// The limits Python checks first (natten/limits.h) are the kernels' own.
static_assert(limits::kFusedMaxHeads == kMaxGridY, "heads run on grid.y");
static_assert(limits::kFusedMaxHeadDim == kMaxHeadDim, "largest head-dim tile");
static_assert(int64_t{1} << kMaxQTileLog == limits::kFusedMaxQTileTokens, "query tile size");
static_assert(int64_t{1} << kTileLog == limits::kFusedMaxKvTileTokens, "key tile size");
static_assert(limits::kFusedHeadDimMultiple == 8, "head_dim_tile");
static_assert(limits::kMmaAuto == 0 && limits::kMmaSync == 1 && limits::kMmaWgmma == 2,
              "the `mma` codes of pick_wgmma");

// Head-dim tile serving D and Dv, or an error naming what the kernels take.
ffi::Error head_dim_tile(const Problem& p, int& dt) {
  for (int64_t d : {p.dim, p.dim_v}) {
    if (d % 8 != 0 || d < 8 || d > kMaxHeadDim)
      return invalid("the fused backend supports head dims that are multiples of 8 up to " +
                     std::to_string(kMaxHeadDim) + " (query/key " + std::to_string(p.dim) +
                     ", value " + std::to_string(p.dim_v) + ")");
  }
  const int64_t need = p.dim > p.dim_v ? p.dim : p.dim_v;
  for (int t : kHeadDimTiles) {
    if (t >= need) {
      dt = t;
      return ok();
    }
  }
  return invalid("no head-dim tile");
}

// float16 / bfloat16 run on tensor cores, float32 on the full-precision kernels (simt_f32.cu).
ffi::Error check_dtype(ffi::DataType t) {
  if (t == ffi::DataType::F16 || t == ffi::DataType::BF16 || t == ffi::DataType::F32) return ok();
  return invalid(std::string("the fused backend takes float16, bfloat16 or float32, got ") +
                 dtype_name(t));
}

// Whether the kernels run their Hopper (wgmma) variant: `mma` 0 = where it can (a compute
// capability 9.x device and an sm_90a image in this build), 1 = never, 2 = required.
ffi::Error pick_wgmma(int64_t mma, bool& wgmma) {
  if (mma < 0 || mma > 2) return invalid("mma must be 0 (auto), 1 (mma.sync) or 2 (wgmma)");
  int dev = 0, major = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return launch_error("querying the device", e);
#ifdef NATTEN_BUILT_SM90A
  const bool can = major == 9;
#else
  const bool can = false;
#endif
  if (mma == 2 && !can)
    return invalid("fused_config(mma='wgmma') needs a Hopper GPU (compute capability 9.x) and a "
                   "build with the 90a architecture");
  wgmma = mma == 2 || (mma == 0 && can);
  return ok();
}

// Kernel arguments of a validated problem with a tiling.
ffi::Error make_args(const Problem& p, const Tiling& t, float scale, FnaArgs& a) {
  if (p.heads > kMaxGridY)
    return invalid("the fused backend takes at most 65535 heads");
  if (p.tokens() > limits::kFusedMaxTokens)
    return invalid("the fused backend takes < 2^31 tokens per batch element");
  for (int ax = 0; ax < kMaxRank; ++ax) a.ax[ax] = p.axis[ax];
  a.tokens = p.tokens();
  a.Y = static_cast<int>(p.extent[1]);
  a.Z = static_cast<int>(p.extent[2]);
  a.heads = static_cast<int>(p.heads);
  a.kv_heads = static_cast<int>(p.kv_heads);
  a.group = static_cast<int>(p.heads / p.kv_heads);
  a.dim = static_cast<int>(p.dim);
  a.dim_v = static_cast<int>(p.dim_v);
  if (p.additional > (int64_t{1} << 30)) return invalid("too many additional keys");
  a.S = static_cast<int>(p.additional);
  a.ry = static_cast<int>(p.rpb_extent(1));
  a.rz = static_cast<int>(p.rpb_extent(2));
  a.R = p.has_rpb ? static_cast<int>(p.rpb_per_head()) : 0;
  a.scale = scale;
  a.scale_log2 = scale * kLog2e;
  a.scale_sign = a.scale_log2 < 0.f ? -1.f : 1.f;
  a.scale_log2_abs = a.scale_log2 < 0.f ? -a.scale_log2 : a.scale_log2;
  a.q_tiles = a.kv_tiles = 1;
  for (int ax = 0; ax < kMaxRank; ++ax) {
    const AxisParams& x = p.axis[ax];
    const int lg0 = group_length(x.length, x.dilation, 0);  // the longest group
    a.qlog[ax] = t.qlog[ax];
    a.kvlog[ax] = t.kvlog[ax];
    a.q_tpg[ax] = ceil_div(lg0, 1 << t.qlog[ax]);
    a.kv_tpg[ax] = ceil_div(lg0, 1 << t.kvlog[ax]);
    a.q_units[ax] = x.dilation * a.q_tpg[ax];
    a.kv_units[ax] = x.dilation * a.kv_tpg[ax];
    a.q_tiles *= a.q_units[ax];
    a.kv_tiles *= a.kv_units[ax];
  }
  // Tiles of additional keys hold as many keys as a key tile (choose_tiling fills key tiles to the
  // kernel's tile size: 64 tokens, or 2^f32_tile_log for float32).
  a.add_tiles = ceil_div(a.S, 1 << (t.kvlog[0] + t.kvlog[1] + t.kvlog[2]));
  tile_reps(t.qlog, a.q_rep);
  tile_reps(t.kvlog, a.kv_rep);
  if (a.q_tiles + a.add_tiles >= (int64_t{1} << 31) || a.kv_tiles >= (int64_t{1} << 31))
    return invalid("problem too large for the fused kernels' grid");
  a.batch0 = 0;
  a.drpb_in_smem = 0;
  a.skip_drpb = 0;
  return ok();
}

// The pointers of the six inputs both passes take (the others stay null).
FnaPtrs input_ptrs(const Problem& p, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                   const ffi::AnyBuffer& v, const ffi::AnyBuffer& rpb, const ffi::AnyBuffer& add_k,
                   const ffi::AnyBuffer& add_v) {
  FnaPtrs ptr = {};
  ptr.q = q.untyped_data();
  ptr.k = k.untyped_data();
  ptr.v = v.untyped_data();
  ptr.add_k = add_k.untyped_data();
  ptr.add_v = add_v.untyped_data();
  ptr.rpb = p.has_rpb ? static_cast<const float*>(rpb.untyped_data()) : nullptr;
  return ptr;
}

ffi::Error FusedFwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer rpb, ffi::AnyBuffer add_k, ffi::AnyBuffer add_v,
                    ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse,
                    ffi::Result<ffi::AnyBuffer> stats, ffi::Result<ffi::AnyBuffer> o32,
                    I64Span kernel_size, I64Span stride, I64Span dilation, I64Span is_causal,
                    float scale, I64Span q_tile, I64Span kv_tile, int64_t mma) {
  Problem p;
  NATTEN_TRY(check_fna_fwd(p, q, k, v, rpb, add_k, add_v, *o, *lse, kernel_size, stride, dilation,
                           is_causal));
  bool residuals = false;
  NATTEN_TRY(check_fna_residuals(p, *stats, *o32, residuals));
  const int64_t B = p.batch;
  const ffi::DataType t = q.element_type();
  NATTEN_TRY(check_dtype(t));
  const bool f32 = t == ffi::DataType::F32;
  int dt = 0;
  NATTEN_TRY(head_dim_tile(p, dt));
  bool wgmma = false;
  NATTEN_TRY(pick_wgmma(f32 ? 1 : mma, wgmma));  // the float32 kernels use no MMA
  ForwardPlan plan;
  NATTEN_TRY(plan_forward(p, q_tile, kv_tile, dt, f32, mma, wgmma, plan));
  dt = plan.dt;  // (the 1-D TMA kernels run head-dim tile 32 at 64: tiling.h tma_head_dim_tile)
  FnaArgs a;
  NATTEN_TRY(make_args(p, plan.tiling, scale, a));
  NATTEN_TRY(poison_outputs(stream, *o, *lse, *stats, *o32));
  if (B == 0 || p.tokens() == 0) return ok();
  FnaPtrs ptr = input_ptrs(p, q, k, v, rpb, add_k, add_v);
  ptr.out = o->untyped_data();
  ptr.out_lse = static_cast<float*>(lse->untyped_data());
  if (residuals) {
    ptr.out_stats = static_cast<float2*>(stats->untyped_data());
    ptr.out_o32 = static_cast<float*>(o32->untyped_data());
  }
  for (a.batch0 = 0; a.batch0 < B; a.batch0 += kMaxGridY) {  // grid.z holds <= 65535 elements
    const int64_t n = std::min<int64_t>(kMaxGridY, B - a.batch0);
    switch (plan.kernel) {
      case ForwardKernel::kSimt: NATTEN_TRY(launch_forward_f32(stream, dt, a, ptr, n)); break;
      case ForwardKernel::kTma: NATTEN_TRY(launch_forward_tma(stream, t, dt, a, ptr, n, B)); break;
      case ForwardKernel::kWsTma:
        NATTEN_TRY(launch_forward_ws(stream, t, dt, true, a, ptr, n, B));
        break;
      default: NATTEN_TRY(launch_forward(stream, t, dt, plan.wgmma(), a, ptr, n));
    }
  }
  return ok();
}

ffi::Error FusedBwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer rpb, ffi::AnyBuffer add_k, ffi::AnyBuffer add_v,
                    ffi::AnyBuffer stats, ffi::AnyBuffer o32, ffi::AnyBuffer d_o,
                    ffi::AnyBuffer dlse,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                    ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> drpb,
                    ffi::Result<ffi::AnyBuffer> dadd_k, ffi::Result<ffi::AnyBuffer> dadd_v,
                    ffi::Result<ffi::AnyBuffer> delta, ffi::Result<ffi::AnyBuffer> dq_acc,
                    I64Span kernel_size, I64Span stride, I64Span dilation, I64Span is_causal,
                    float scale, I64Span q_tile, I64Span kv_tile, int64_t mma,
                    int64_t deterministic) {
  Problem p;
  NATTEN_TRY(check_fna_grads(p, q, k, v, rpb, add_k, add_v, d_o, dlse, *dq, *dk, *dv, *drpb,
                             *dadd_k, *dadd_v, kernel_size, stride, dilation, is_causal));
  const int64_t B = p.batch;
  const ffi::DataType t = q.element_type();
  bool residuals = false;
  NATTEN_TRY(check_fna_residuals(p, stats, o32, residuals));
  if (!residuals && B * p.tokens() * p.heads > 0)
    return invalid("the fused backward needs the forward's residuals (stats, o32)");
  NATTEN_TRY(check_like("delta workspace", *delta, ffi::DataType::F32,
                        {B, p.extent[0], p.extent[1], p.extent[2], p.heads}));
  // dq_acc: 0 elements where the Python side knows the schedule does not use it (fna.py).
  const bool have_dq_acc = dq_acc->element_count() != 0;
  if (have_dq_acc)
    NATTEN_TRY(check_like("dq workspace", *dq_acc, ffi::DataType::F32,
                          {B, p.extent[0], p.extent[1], p.extent[2], p.heads, p.dim}));
  NATTEN_TRY(check_dtype(t));
  const bool f32 = t == ffi::DataType::F32;
  int dt = 0;
  NATTEN_TRY(head_dim_tile(p, dt));
  bool wgmma = false;
  NATTEN_TRY(pick_wgmma(f32 ? 1 : mma, wgmma));  // the float32 kernels use no MMA
  // Schedule (fna.cuh, tiling.h plan_backward): on Hopper one walk over key tiles forms dk, dv
  // and dq (float32 adds in any order); deterministic mode, mma.sync and float32 run a dq kernel
  // and a dk/dv kernel. So does a problem without a dq workspace (the caller's choice where it
  // cannot be used; B * N * H = 0 too), and the 128 head-dim tile: there the single walk's
  // shared memory leaves one CTA per SM and it measured slower (H200, 3d-video fwd+bwd: 62.9 vs
  // 55.0 ms; BENCHMARKS.md).
  BackwardPlan plan;
  NATTEN_TRY(plan_backward(p, q_tile, kv_tile, dt, f32, wgmma, deterministic != 0, have_dq_acc,
                           plan));
  dt = plan.dt;  // (the 1-D TMA kernels run head-dim tile 32 at 64: tiling.h tma_head_dim_tile)
  const bool tma = plan.kernel == BackwardKernel::kWalkTma;
  const bool dq_tma = plan.kernel == BackwardKernel::kDqTmaDkdv;
  const bool single_walk = tma || plan.kernel == BackwardKernel::kWalk;
  const int dq_wgs = plan.dq_wgs;
  const Tiling& kv_tiling = plan.kv_tiling;
  // The dq kernel walks 64 * dq_m_tiles(dt)-token query tiles over 64-token key tiles (float32:
  // both 2^f32_tile_log(dt)); the TMA one, the box TMA forward's tiles (plan.dq_tiling).
  const int dq_log = f32 ? f32_tile_log(dt) : kTileLog + dq_m_tiles_log(dt, wgmma);
  const int dq_kv_log = f32 ? f32_tile_log(dt) : kTileLog;
  Tiling dq_tiling;
  FnaArgs dq_args, kv_args;
  NATTEN_TRY(make_args(p, kv_tiling, scale, kv_args));
  if (single_walk) {
    const int bytes = bwd_smem(dt, 2, true, dq_wgs, plan.kv_tma);
    kv_args.drpb_in_smem = kv_args.R > 0 && bytes + kv_args.R * 4 <= kMaxBwdSmem;
  } else {
    if (dq_tma)
      dq_tiling = plan.dq_tiling;
    else
      NATTEN_TRY(choose_tiling(p, q_tile, kv_tile, dq_log, dq_tiling, dq_kv_log));
    NATTEN_TRY(make_args(p, dq_tiling, scale, dq_args));
    const int dq_bytes = f32      ? f32_dq_smem(dt)
                         : dq_tma ? dq_tma_smem(dt, 2)
                                  : dq_smem(dt, 2, dq_m_tiles(dt, wgmma), wgmma);
    dq_args.drpb_in_smem =
        dq_args.R > 0 && dq_bytes + dq_args.R * 4 <= (dq_tma ? kMaxDqTmaSmem : kMaxDqSmem);
    dq_args.skip_drpb = deterministic != 0;
  }
  NATTEN_TRY(poison_outputs(stream, *dq, *dk, *dv, *drpb, *dadd_k, *dadd_v, *delta, *dq_acc));
  if (B == 0 || p.tokens() == 0) return ok();
  if (p.has_rpb) {  // the kernels add their CTAs' partial sums
    const cudaError_t e = cudaMemsetAsync(drpb->untyped_data(), 0, drpb->size_bytes(), stream);
    if (e != cudaSuccess) return launch_error("zeroing the rpb gradient", e);
  }
  FnaPtrs ptr = input_ptrs(p, q, k, v, rpb, add_k, add_v);
  ptr.d_o = d_o.untyped_data();
  ptr.stats = static_cast<const float2*>(stats.untyped_data());
  ptr.o32 = static_cast<const float*>(o32.untyped_data());
  ptr.dlse = static_cast<const float*>(dlse.untyped_data());
  ptr.dq = dq->untyped_data();
  ptr.dk = dk->untyped_data();
  ptr.dv = dv->untyped_data();
  ptr.dadd_k = dadd_k->untyped_data();
  ptr.dadd_v = dadd_v->untyped_data();
  ptr.drpb = p.has_rpb ? static_cast<float*>(drpb->untyped_data()) : nullptr;
  ptr.delta = static_cast<float*>(delta->untyped_data());
  ptr.dq_acc = have_dq_acc ? static_cast<float*>(dq_acc->untyped_data()) : nullptr;
  if (single_walk) {
    const cudaError_t e = cudaMemsetAsync(ptr.dq_acc, 0, dq_acc->size_bytes(), stream);
    if (e != cudaSuccess) return launch_error("zeroing the dq workspace", e);
  }
  NATTEN_TRY(launch_backward_delta(stream, t, kv_args, ptr, B));
  for (int64_t b0 = 0; b0 < B; b0 += kMaxGridY) {  // grid.z holds <= 65535 elements
    const int64_t n = std::min<int64_t>(kMaxGridY, B - b0);
    dq_args.batch0 = kv_args.batch0 = static_cast<int>(b0);
    if (f32) {
      NATTEN_TRY(launch_backward_f32(stream, dt, dq_args, kv_args, ptr, n));
    } else {
      if (tma) {
        NATTEN_TRY(launch_backward_tma(stream, t, kv_args, ptr, n, B));
      } else {
        if (dq_tma)
          NATTEN_TRY(launch_backward_dq_tma(stream, t, dt, dq_args, ptr, n, B));
        else if (!single_walk)
          NATTEN_TRY(launch_backward_dq(stream, t, dt, wgmma, dq_args, ptr, n));
        NATTEN_TRY(launch_backward_kv(stream, t, dt, wgmma, dq_wgs, plan.kv_tma, kv_args, ptr, n,
                                      B));
      }
    }
  }
  if (single_walk) NATTEN_TRY(launch_backward_dq_convert(stream, t, kv_args, ptr, B));
  return ok();
}

}  // namespace
}  // namespace fna
}  // namespace gpu
}  // namespace natten

#define NATTEN_FUSED_BIND(args, rets)                                                  \
  (NATTEN_CUDA_BIND(args, rets)                                                        \
       .Attr<float>("scale")                                                           \
       .Attr<natten::I64Span>("q_tile")                                                \
       .Attr<natten::I64Span>("kv_tile"))

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenFusedFnaFwd, natten::gpu::fna::FusedFwd,
                              NATTEN_FUSED_BIND(6, 4).Attr<int64_t>("mma"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenFusedFnaBwd, natten::gpu::fna::FusedBwd,
                              NATTEN_FUSED_BIND(10, 8).Attr<int64_t>("mma")
                                  .Attr<int64_t>("deterministic"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
