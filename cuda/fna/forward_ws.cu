// FNA forward on Hopper, warp-specialized (fna.cuh, "warp-specialized forward"; launch.h
// launch_forward_ws): a producer warpgroup stages, two computing warpgroups of 64 query rows share
// its stages. The steps it shares with the synchronous kernel are in forward_step.cuh.
#include "box_roles.cuh"
#include "forward_step.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

// Hopper, warp-specialized (fna.cuh, "warp-specialized forward"): warpgroup 2, the producer, stages
// the 128-token query tile, then each key tile of the walk into a ring of stages (pipeline.cuh);
// warpgroups 0 and 1 own 64 query rows each and compute on every key tile: s = q k^T and o += P v
// on wgmma, with softmax_step's masking and online softmax between them. The computing warpgroups
// never stage and never wait for each other: each waits until a stage is full and releases it
// once its products have read it.
//
// kTma (tiling.h forward_on_box_tma: 2-D and 3-D problems, every axis divisible by its dilation,
// at most 4 dilation groups, no additional keys, tiles that never cross a batch element along x):
// the producer's one thread copies the query tile and each key tile with the TMA, one box per 64
// head dims (box_roles.cuh produce_box_tiles; `maps`: one map per dilation group, tensor_maps.h
// encode_box_maps), into tiles laid out as 64-column blocks with 128-byte swizzle; the products
// read them through swizzled descriptors.
template <typename T, int DT, bool kTma>
__global__ void __launch_bounds__(kFwdWsThreads, fwd_ws_min_ctas(DT))
    fna_fwd_ws_kernel(const FnaArgs a, const FnaPtrs p, const __grid_constant__ BoxTmaMaps maps) {
  constexpr int kQRows = kFwdWsQRows;
  constexpr int kStages = fwd_ws_stages(DT);
  // kTma: 64-column blocks of q (kQBlock elements) and of each key tile (kKBlock).
  constexpr int kQBlock = kQRows * 64, kKBlock = kRows * 64;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // (kTma: the swizzle atoms need 1024-byte alignment: fwd_ws_smem added the slack.)
  unsigned char* smem =
      kTma ? smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023) : smem_raw;
  T* Qs = reinterpret_cast<T*>(smem);     // [kQRows][DT], core matrices (natten/wgmma.cuh)
  T* Ks = Qs + kQRows * DT;               // [kStages][kRows][DT]
  T* Vs = Ks + kStages * kRows * DT;      // [kStages][kRows][DT]
  int* Win = reinterpret_cast<int*>(Vs + kStages * kRows * DT);  // [kQRows][3 axes][start, length]
  float* SelfLogit = reinterpret_cast<float*>(Win + kQRows * 6);  // [kQRows], with rpb
  T* Ones = reinterpret_cast<T*>(SelfLogit + kQRows);  // kOnesBytes (products.cuh, RowSums)
  uint64_t* bars = reinterpret_cast<uint64_t*>(Ones + kOnesBytes / sizeof(T));  // full, empty, q

  Box qb;
  if (!tile_box(a, a.qlog, a.q_tpg, a.q_units, blockIdx.x, qb)) return;  // whole CTA
  const int h = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z), kvh = h / a.group;
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;
  const StageRing<kStages> ring{bars, bars + kStages};
  uint64_t* const q_full = bars + 2 * kStages;
  ring.setup(kTma ? 1 : kThreads, 2 * kThreads, q_full, kTma ? 1 : kThreads, kTma);

  if (kTma && threadIdx.x >= 2 * kThreads) {  // the producer, TMA: one thread copies
    regs_shrink<fwd_ws_producer_regs(DT)>();
    if (threadIdx.x == 2 * kThreads) {
      T* const q_dst[2] = {Qs, nullptr};
      produce_box_tiles<T, DT, kQRows, kStages, false>(a, maps, qb, b, h, kvh, q_dst, q_full, Ks,
                                                      Vs, ring);
    }
    return;
  }
  if (threadIdx.x >= 2 * kThreads) {  // the producer
    regs_shrink<fwd_ws_producer_regs(DT)>();
    Handoff handoff;
    {
      const TileRows<DT, kQRows, true> qrows(a, a.qlog);
      const int lim[3] = {qb.hi[0] - qb.lo[0], qb.hi[1] - qb.lo[1], qb.hi[2] - qb.lo[2]};
      qrows.stage(Qs, static_cast<const T*>(p.q), row0, token_of(a, qb.grp, qb.lo), lim, a.heads,
                  h, a.dim);
      cp_async_commit();
      handoff.then(q_full);
    }
    // (Each role builds its own walk after the split: values live across it would be held in
    // the launch's 80 registers per thread.)
    const KeyWalk walk = key_walk(a, qb);
    KeyStager<T, DT, kRows, true> keys(a);
    for (int j = 0; j < walk.total; ++j) {
      if (!ring.free(j)) handoff.flush();  // the pending step may be what holds stage j (Handoff)
      ring.acquire(j);
      const int st = ring.stage(j);
      keys(a, p, walk, qb, b, row0, kvh, j, Ks + st * kRows * DT, Vs + st * kRows * DT);
      handoff.then(ring.full + st);
    }
    handoff.flush();
    return;
  }
  regs_grow<fwd_ws_consumer_regs(DT)>();

  // The computing warpgroups: rows' windows (and with rpb their own-key logits) for the tile, then
  // the walk. Warpgroup wg owns query rows 64 wg .. 64 wg + 63 (tile_row<1, true>).
  // (kTma: read through a shuffle, so the compiler knows it is warp-uniform and keeps the
  // descriptor math in uniform registers, as in forward_tma.cu.)
  const int wg =
      kTma ? __shfl_sync(0xffffffffu, threadIdx.x / kThreads, 0) : threadIdx.x / kThreads;
  const KeyWalk walk = key_walk(a, qb);
  fill_windows(a, qb, kQRows, Win);
  fill_ones(Ones, threadIdx.x, 2 * kThreads);
  fence_proxy_async();  // -> the wgmma reads (after role_sync)
  const float* rpb = a.R ? p.rpb + static_cast<int64_t>(h) * a.R : nullptr;
  if (rpb != nullptr)
    self_logits<T>(a, p, qb, row0, h, kvh, kQRows, threadIdx.x, 2 * kThreads, SelfLogit);
  role_sync(1, 2 * kThreads);

  float acc[1][DT / 8][4];
  float m[1][2];
  RowSums<1> l;  // the rows' sums of the weights, formed by the products
  start_rows<DT, 1>(acc, l, m);
  if (rpb != nullptr) {
#pragma unroll
    for (int i = 0; i < 2; ++i) m[0][i] = SelfLogit[tile_row<1, true>(0, i)];
  }
  const T* qs = Qs + wg * kRows * (kTma ? 64 : DT);  // the warpgroup's rows (in each block)
  const OwnKeys own(a, qb, wg);  // the steps the warpgroup's rows need (box_roles.cuh)
  TileCounter current;  // the spatial key tile whose softmax comes next
  current.reset();
  // The first computed step in [j, end) (its stage full), releasing the skipped ones; end if none.
  auto next_step = [&](int j, int end) {
    for (; j < end; ++j) {
      ring.wait(j);
      if (own.computed(a, walk, current, j)) break;
      if (j < walk.spatial) current.next(walk.n);
      ring.release(j);
    }
    return j;
  };
  float s[1][8][4];  // the scores, then the weights P, of the step whose product comes next
  // kTma: the operands' descriptors built once and stepped with desc_add (building one from an
  // address costs ~10 uniform instructions, which each wgmma waits for): q and stage 0's k
  // K-major (k16 step kk: 32 bytes into the 128-byte rows, 64-column blocks apart), stage 0's v
  // MN-major (16 keys a k16 step, 2048 bytes), the tile of ones.
  const uint64_t q_desc = smem_desc_sw128(qs, 16, 1024), k_desc = smem_desc_sw128(Ks, 16, 1024);
  const uint64_t v_desc = smem_desc_sw128(Vs, kKBlock * 2, 1024);
  const uint64_t ones_desc = smem_desc(Ones, 128, 128);
  constexpr int kStageBytes = kRows * DT * 2;
  auto issue_scores = [&](float (&sc)[1][8][4], int j) {
    const T* ks = Ks + ring.stage(j) * kRows * DT;
    wgmma_fence();
    if constexpr (kTma) {
      const int stage = ring.stage(j) * kStageBytes;
#pragma unroll
      for (int kk = 0; kk < DT / 16; ++kk) {
        const int in_row = (kk % 4) * 32;
        wgmma_ss64<T>(&sc[0][0][0], desc_add(q_desc, (kk / 4) * kQBlock * 2 + in_row),
                      desc_add(k_desc, stage + (kk / 4) * kKBlock * 2 + in_row), kk);
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < DT / 16; ++kk)
        wgmma_ss64<T>(&sc[0][0][0], smem_desc(qs + kk * 128, 128, DT * 16),
                      smem_desc(ks + kk * 128, 128, DT * 16), kk);
    }
    wgmma_commit();
  };

  // The walk runs one computed step ahead: step n's s = q k^T is issued before step j's o += P v,
  // and n's masking and softmax run while that product is in flight; acc takes n's correction
  // once it is done. n stays within kStages of j (j's stage is held until its product is done:
  // further on, the producer could not fill n's); where no computed step is that close, step j's
  // product runs alone first. Each product is issued from one place (ptxas serializes wgmmas
  // whose accumulators come from several, C7514).
  auto issue_values = [&](int j) {
    unsigned pa[4][4];  // P of step j as the A operand, k16 steps kk
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) pack_a<T>(pa[kk], s[0], kk);
    const T* vs = Vs + ring.stage(j) * kRows * DT;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      // (kTma: v MN-major in 64-column blocks kKBlock apart; 16 keys a k16 step, 2048 bytes.)
      const uint64_t vd = kTma ? desc_add(v_desc, ring.stage(j) * kStageBytes + kk * 2048)
                               : smem_desc(vs + kk * 16 * DT, DT * 16, 128);
      wgmma_rs<T, DT, 1>(&acc[0][0][0], pa[kk], vd, 1);
      wgmma_rs<T, 8, 0>(&l[0][0][0], pa[kk], ones_desc, 1);
    }
    wgmma_commit();
  };
  mbar_wait(q_full, 0);
  // The walk runs one computed step ahead: step n's s = q k^T is issued before step j's o += P v
  // (P = 0 before the first step), and n's masking and softmax run while that product is in
  // flight; acc takes n's correction once it is done. n stays within kStages of j (j's stage is
  // held until its product is done: further on, the producer could not fill n's stage); where
  // the next computed step is further, step j's product first runs alone (drain).
#pragma unroll
  for (int nb = 0; nb < 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[0][nb][e] = 0.f;
  int j = -1;  // the step whose P is in s (its product not issued yet); -1: none
  int next = 0;  // where the search for the next computed step goes on
  while (true) {
    const int end = j < 0 ? walk.total : imin(walk.total, j + kStages);
    const int n = next_step(next, end);
    if (n == end) {  // no computed step close enough (or none left)
      if (j >= 0) {  // drain: step j's product alone
        issue_values(j);
        wgmma_wait<0>();
        reg_fence(acc);
        reg_fence(l);
        ring.release(j);
        j = -1;
        next = end;
        continue;
      }
      break;
    }
    float s_next[1][8][4], alpha[1][2];
    issue_scores(s_next, n);
    issue_values(j >= 0 ? j : n);
    wgmma_wait<1>();  // step n's scores (committed first)
    reg_fence(s_next);
    softmax_step<1, true, true>(a, walk, current, n, qb, rpb, Win, s_next, m, alpha);
    wgmma_wait<0>();
    reg_fence(acc);
    reg_fence(l);
    if (j >= 0) ring.release(j);  // both products that read step j's stage have completed
    if (warp_rescales(alpha)) {
      rescale<DT, 1>(acc, alpha);
      rescale<8, 1>(l, alpha);
    }
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][nb][e] = s_next[0][nb][e];
    j = n;
    next = n + 1;
  }
  store_outputs<T, DT, 1, true>(a, p, qb, a.qlog, row0, h, m, l, acc);
}

}  // namespace

ffi::Error launch_forward_ws(cudaStream_t stream, ffi::DataType t, int dt, bool tma,
                             const FnaArgs& a, const FnaPtrs& p, int64_t batch,
                             int64_t batch_total) {
  return dispatch_tile(t, dt, [&](auto tag, auto dtc) -> ffi::Error {
    using T = typename decltype(tag)::type;
    constexpr int DT = decltype(dtc)::value;
    const dim3 grid(static_cast<unsigned>(a.q_tiles), a.heads, static_cast<unsigned>(batch));
    if constexpr (DT >= 64) {
      if (tma) {
        BoxTmaMaps maps = {};
        NATTEN_TRY(encode_box_maps(maps, p, tma_type<T>(), batch_total, a, /*grad=*/false));
        constexpr int kSmem = fwd_ws_smem(DT, sizeof(T)) + 1024;  // + alignment slack
        return launch_kernel<fna_fwd_ws_kernel<T, DT, true>>("fna forward (TMA)", kSmem, kSmem,
                                                            grid, stream, a, p, kFwdWsThreads,
                                                            maps);
      }
    }
    if constexpr (fwd_warp_specialized(DT)) {
      constexpr int kSmem = fwd_ws_smem(DT, sizeof(T));
      return launch_kernel<fna_fwd_ws_kernel<T, DT, false>>("fna forward", kSmem, kSmem, grid,
                                                             stream, a, p, kFwdWsThreads,
                                                             BoxTmaMaps{});
    } else {
      return invalid("fused: the warp-specialized forward serves head-dim tile 128, or 64 with "
                     "the TMA");
    }
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
