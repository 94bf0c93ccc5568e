// FNA forward on Hopper for 1-D problems, fed by the tensor memory accelerator (fna.cuh, "TMA
// forward"; launch.h launch_forward_tma). One CTA per (query tile, head, batch element): a
// producer thread copies the query tile and then each 128-key tile of the walk into a ring of
// stages with one TMA copy per 64 head dims (tensor_maps.h); the computing warpgroups (three at
// head-dim tile 64: 192-query tiles; two at 128: 128-query tiles; tiling.h tma_fwd_wgs) own 64
// query rows each and run s = q k^T (m64n128), the online softmax and o += P v on every key tile
// their rows reach, one step ahead (the next tile's q k^T in flight during this tile's softmax).
// At head-dim tile 64 a step's exponentials take about as long as its products: with three
// warpgroups one's softmax runs while the others' products keep the tensor cores busy.
// Only key tiles that straddle a window edge are masked. The steps it shares with the other
// forwards (online softmax, rescale, epilogue) are in forward_step.cuh.
#include "forward_step.cuh"
#include "launch.h"
#include "pipeline.cuh"
#include "tensor_maps.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

// Shared-memory layout, in elements: q [halves][kQRows][64], then per stage k and v [halves]
// [128 keys][64], each 64-column block written by one TMA box with 128-byte swizzle (1024-byte
// aligned), then the tile of ones (RowSums) and the barriers.
template <int DT>
struct TmaFwdLayout {
  static constexpr int kWgs = tma_fwd_wgs(DT);            // computing warpgroups
  static constexpr int kQRows = tma_fwd_q_rows(DT);       // query rows of a tile
  static constexpr int kHalves = DT / 64;                 // 64-column blocks (one swizzle row)
  static constexpr int kBlock = kTmaFwdKeys * 64;         // elements of one k or v block
  static constexpr int kTile = kHalves * kBlock;          // a k or v tile
  static constexpr int kTileBytes = kTile * 2;
  static constexpr int kQBlock = kQRows * 64;             // elements of one q block
  static constexpr int kQTileBytes = kHalves * kQBlock * 2;
  static constexpr int kStages = tma_fwd_stages(DT);
};

template <typename T, int DT>
__global__ void __launch_bounds__(tma_fwd_threads(DT), 1)
    fna_fwd_tma_kernel(const FnaArgs a, const FnaPtrs p, const __grid_constant__ TmaMaps maps) {
  using L = TmaFwdLayout<DT>;
  constexpr int kStages = L::kStages;
  constexpr int kCompute = L::kWgs * kThreads;  // the computing threads
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // (The swizzle atoms need 1024-byte alignment: the launch adds that much slack.)
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + L::kHalves * L::kQBlock;  // [kStages][tile]
  T* Vs = Ks + kStages * L::kTile;     // [kStages][tile]
  T* Ones = Vs + kStages * L::kTile;   // kOnesBytes (products.cuh, RowSums)
  uint64_t* bars = reinterpret_cast<uint64_t*>(Ones + kOnesBytes / sizeof(T));  // full, empty, q

  Box qb;
  if (!axis_tile(a, L::kQRows, blockIdx.x, qb)) return;  // whole CTA
  // The problem's one long axis (tma_tiling): its parameters and the tile's group and rows.
  const AxisSpan span = axis_span(a, qb);
  const AxisParams& axp = span.p;
  const int g = span.g, lg = span.lg, lo = span.lo, hi = span.hi;
  const int h = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z), kvh = h / a.group;
  const int box_lo = window_start(lo, lg, axp.kernel, axp.stride, axp.causal);
  const int box_hi = window_end(hi - 1, lg, axp.kernel, axp.stride, axp.causal);
  const int steps = (box_hi - box_lo + kTmaFwdKeys - 1) / kTmaFwdKeys;
  const StageRing<kStages> ring{bars, bars + kStages};
  uint64_t* const q_full = bars + 2 * kStages;
  ring.setup(1, kCompute, q_full, 1, /*tma=*/true);

  if (threadIdx.x >= kCompute) {  // the producer: one thread issues every copy
    regs_shrink<tma_fwd_producer_regs()>();
    if (threadIdx.x == kCompute) {
      tma_prefetch_map(&maps.k);
      tma_prefetch_map(&maps.v);
      mbar_expect_tx(q_full, L::kQTileBytes);
#pragma unroll
      for (int c = 0; c < L::kHalves; ++c)
        tma_load_5d(Qs + c * L::kQBlock, &maps.q, q_full, 64 * c, h, g, lo, b);
      for (int j = 0; j < steps; ++j) {
        ring.acquire(j);
        const int st = ring.stage(j);
        uint64_t* full = ring.full + st;
        mbar_expect_tx(full, 2 * L::kTileBytes);
        const int o = box_lo + j * kTmaFwdKeys;
#pragma unroll
        for (int c = 0; c < L::kHalves; ++c) {
          tma_load_5d(Ks + st * L::kTile + c * L::kBlock, &maps.k, full, 64 * c, kvh, g, o, b);
          tma_load_5d(Vs + st * L::kTile + c * L::kBlock, &maps.v, full, 64 * c, kvh, g, o, b);
        }
      }
    }
    return;
  }
  regs_grow<tma_fwd_consumer_regs(DT)>();

  // The computing warpgroups. Warpgroup wg owns query rows 64 wg .. 64 wg + 63 of the tile
  // (tile_row<1, true>); the thread holds rows r[0], r[1] (local indices) and their windows.
  // (Read through a shuffle so the compiler knows it is the same in every lane of a warp: what
  // derives from it, the warpgroup's walk and its wgmma descriptors, can live in uniform
  // registers, which the wgmma instructions read.)
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / kThreads, 0);
  fill_ones(Ones, threadIdx.x, kCompute);
  fence_proxy_async();  // -> the wgmma reads (after role_sync)
  role_sync(1, kCompute);

  int ws[2], wlen[2];  // the rows' windows: keys [ws, ws + wlen); empty past the problem
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = lo + tile_row<1, true>(0, i);
    ws[i] = r < hi ? window_start(r, lg, axp.kernel, axp.stride, axp.causal) : 0;
    wlen[i] = r < hi ? window_end(r, lg, axp.kernel, axp.stride, axp.causal) - ws[i] : 0;
  }
  // The warpgroup's reach: the steps its first and last rows' windows span (windows never move
  // back as the query grows), and the keys inside all of them.
  const int first_row = lo + kRows * wg, last_row = imin(first_row + kRows, hi) - 1;
  int step_lo = 0, step_hi = 0, full_lo = 0, full_hi = 0;
  if (first_row <= last_row) {
    const int k_lo = window_start(first_row, lg, axp.kernel, axp.stride, axp.causal);
    const int k_hi = window_end(last_row, lg, axp.kernel, axp.stride, axp.causal);
    step_lo = (k_lo - box_lo) / kTmaFwdKeys;
    step_hi = (k_hi - box_lo + kTmaFwdKeys - 1) / kTmaFwdKeys;
    full_lo = window_start(last_row, lg, axp.kernel, axp.stride, axp.causal);
    full_hi = window_end(first_row, lg, axp.kernel, axp.stride, axp.causal);
  }

  float acc[1][DT / 8][4];
  float m[1][2];
  RowSums<1> l;  // the rows' sums of the weights, formed by the products
  start_rows<DT, 1>(acc, l, m);
  unsigned pa[8][4];  // P of the pending step, packed as the A operand of o += P v (k16 steps)
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) pa[kk][0] = pa[kk][1] = pa[kk][2] = pa[kk][3] = 0u;

  // The operands' descriptors, built once: the warpgroup's q rows, stage 0's k and v (moved per
  // stage and k16 step by desc_add), the tile of ones.
  const uint64_t q_desc = smem_desc_sw128(Qs + wg * kRows * 64, 16, 1024);
  constexpr int kQBlockBytes = L::kQBlock * 2;
  const uint64_t k_desc = smem_desc_sw128(Ks, 16, 1024);
  const uint64_t v_desc = smem_desc_sw128(Vs, L::kBlock * 2, 1024);
  const uint64_t ones_desc = smem_desc(Ones, 128, 128);
  constexpr int kBlockBytes = L::kBlock * 2;
  // s = q k^T of step n (128 keys: n = 128, K-major operands, k16 step kk 32 bytes into its
  // 64-column block).
  auto issue_scores = [&](float (&sc)[1][16][4], int n) {
    const int stage = ring.stage(n) * L::kTileBytes;
#pragma unroll
    for (int kk = 0; kk < DT / 16; ++kk) {
      const int in_row = (kk % 4) * 32;
      wgmma_ss<T, 128, 0, 0>(&sc[0][0][0], desc_add(q_desc, (kk / 4) * kQBlockBytes + in_row),
                             desc_add(k_desc, stage + (kk / 4) * kBlockBytes + in_row), kk);
    }
  };
  // o += P v and l += P 1 of step j (v MN-major: 16 keys a k16 step, 2048 bytes; 64-column
  // blocks kBlockBytes apart, the descriptor's leading offset).
  auto issue_values = [&](int j) {
    const int stage = ring.stage(j) * L::kTileBytes;
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      wgmma_rs<T, DT, 1>(&acc[0][0][0], pa[kk], desc_add(v_desc, stage + kk * 2048), 1);
      wgmma_rs<T, 8, 0>(&l[0][0][0], pa[kk], ones_desc, 1);
    }
  };

  // The warpgroups take turns at issuing their products (pipeline.cuh IssueTurns), one round per
  // step of the CTA's walk and one for the last o += P v: steps + 1 rounds each, idle ones
  // (steps outside the warpgroup's reach) included.
  const IssueTurns<L::kWgs> turns(wg);
  turns.start();
  mbar_wait(q_full, 0);
  for (int j = 0; j < step_lo; ++j) {  // tiles before the warpgroup's reach
    ring.wait(j);
    turns.take();
    turns.pass();
    ring.release(j);
  }
  // The walk, one step ahead: step n's s = q k^T is issued with step n - 1's o += P v (P = 0
  // on the first step, over step n's own stage), n's masking and softmax run while that product
  // is in flight, and acc takes n's correction once it is done. Each product has one issue site
  // (ptxas serializes wgmmas whose accumulators come from several, C7514).
  const float mul = a.scale_log2_abs;
  for (int n = step_lo; n < step_hi; ++n) {
    ring.wait(n);
    float s[1][16][4];
    wgmma_fence();
    turns.take();
    issue_scores(s, n);
    wgmma_commit();
    issue_values(n > step_lo ? n - 1 : n);
    wgmma_commit();
    turns.pass();
    wgmma_wait<1>();  // step n's scores (committed first)
    reg_fence(s);
    const int o = box_lo + n * kTmaFwdKeys;
    // (The softmax ends each branch: ptxas would move the wait for the product in flight up to
    // where they join.)
    float alpha[1][2];
    if (o >= full_lo && o + kTmaFwdKeys <= full_hi) {  // inside every row's window
      if (a.scale_sign < 0.f) {
#pragma unroll
        for (int nb = 0; nb < 16; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[0][nb][e] = -s[0][nb][e];
      }
      online_softmax<1, 16>(s, m, alpha, mul, false);
    } else {
#pragma unroll
      for (int nb = 0; nb < 16; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          const bool in = static_cast<unsigned>(o + frag_col(nb, e) - ws[i]) <
                          static_cast<unsigned>(wlen[i]);
          s[0][nb][e] = in ? s[0][nb][e] * a.scale_sign : -INFINITY;
        }
      online_softmax<1, 16>(s, m, alpha, mul, false);
    }
    wgmma_wait<0>();
    reg_fence(acc);
    reg_fence(l);
    if (n > step_lo) ring.release(n - 1);  // both products that read its stage have completed
    if (warp_rescales(alpha)) {
      rescale<DT, 1>(acc, alpha);
      rescale<8, 1>(l, alpha);
    }
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) pack_a<T>(pa[kk], s[0], kk);
  }
  if (step_lo < step_hi) {  // the last step's o += P v
    wgmma_fence();
    turns.take();
    issue_values(step_hi - 1);
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(acc);
    reg_fence(l);
    ring.release(step_hi - 1);
  } else {
    turns.take();
  }
  // (Passed once the product is done: a branch while it is in flight would serialize it.)
  const bool last_round = step_hi == steps;  // (or no reach and no steps)
  if (last_round) turns.pass_last(); else turns.pass();
  for (int j = imax(step_hi, step_lo); j < steps; ++j) {  // tiles past the warpgroup's reach
    ring.wait(j);
    turns.take();
    if (j + 1 == steps) turns.pass_last(); else turns.pass();
    ring.release(j);
  }
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;
  int logs[kMaxRank];
  axis_tile_logs(a, logs);
  store_outputs<T, DT, 1, true>(a, p, qb, logs, row0, h, m, l, acc);
}

}  // namespace

ffi::Error launch_forward_tma(cudaStream_t stream, ffi::DataType t, int dt, const FnaArgs& a,
                              const FnaPtrs& p, int64_t batch, int64_t batch_total) {
  return dispatch_tile(t, dt, [&](auto tag, auto dtc) -> ffi::Error {
    using T = typename decltype(tag)::type;
    constexpr int DT = decltype(dtc)::value;
    if constexpr (DT < 64) {
      return invalid("fused: the TMA forward serves head-dim tiles 64 and 128");
    } else {
      const AxisParams& x = a.ax[tile_axis(a)];
      constexpr CUtensorMapDataType type = tma_type<T>();
      TmaMaps maps;
      constexpr int kQRows = tma_fwd_q_rows(DT);
      NATTEN_TRY(encode_token_map(maps.q, p.q, type, batch_total, x.length, a.heads, a.dim,
                                  x.dilation, kQRows));
      NATTEN_TRY(encode_token_map(maps.k, p.k, type, batch_total, x.length, a.kv_heads, a.dim,
                                  x.dilation, kTmaFwdKeys));
      NATTEN_TRY(encode_token_map(maps.v, p.v, type, batch_total, x.length, a.kv_heads, a.dim_v,
                                  x.dilation, kTmaFwdKeys));
      // Query tiles: per dilation group (all of one length: tma_problem), axis_tile's slots.
      const int64_t tiles = x.dilation * ceil_div(x.length / x.dilation, kQRows);
      const dim3 grid(static_cast<unsigned>(tiles), a.heads, static_cast<unsigned>(batch));
      constexpr int kSmem = tma_fwd_smem(DT);
      return launch_kernel<fna_fwd_tma_kernel<T, DT>>("fna forward (TMA)", kSmem, kSmem, grid,
                                                       stream, a, p, tma_fwd_threads(DT), maps);
    }
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
