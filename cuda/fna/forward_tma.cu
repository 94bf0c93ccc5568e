// FNA forward on Hopper, fed by the tensor memory accelerator (fna.cuh, "TMA forward"; launch.h
// launch_forward_tma). One CTA per (query tile, head, batch element): a producer thread copies the
// query tile and then each 128-key tile of the walk into a ring of stages with one TMA copy per
// 64 head dims (tensor_maps.h); the computing warpgroups (three at head-dim tile 64: 192-query
// tiles; two at 128: 128-query tiles; tiling.h tma_fwd_wgs) own 64 query rows each and run
// s = q k^T (m64n128), the online softmax and o += P v on every key tile their rows reach, one
// step ahead (the next tile's q k^T in flight during this tile's softmax). At head-dim tile 64 a
// step's exponentials take about as long as its products: with three warpgroups one's softmax
// runs while the others' products keep the tensor cores busy (1-D: taking turns at issuing
// them, pipeline.cuh IssueTurns; boxes: each at its own pace, NoTurns).
// Two walks (kBox):
//   1-D problems (tiling.h forward_on_tma): query tiles of 192 / 128 consecutive queries of one
//     dilation group, key tiles of 128 consecutive keys (maps with the dilation folded in).
//   2-D and 3-D problems (forward_on_tma_box, tma_box_tiling): a query tile is one box of 64
//     queries per warpgroup, the boxes stacked along the problem's first long axis; key tiles are
//     boxes of 128 keys (kvlog), walked row-major over the tile's key box, that axis outermost,
//     so each warpgroup's steps (those its own rows reach) are one run, as in 1-D. One map per
//     dilation group (tensor_maps.h encode_box_maps).
// Only key tiles that straddle a window edge are masked (1-D: a test per element; boxes: the
// row's window as a bit set of the thread's 32 columns, walk.cuh ColumnWindow, testing only the
// axes on which the tile straddles an edge). The steps it shares with the other forwards (online
// softmax, rescale, epilogue) are in forward_step.cuh.
#include "box_roles.cuh"
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

template <bool kBox>
using TmaFwdMaps = std::conditional_t<kBox, BoxTmaMaps, TmaMaps>;

template <typename T, int DT, bool kBox>
__global__ void __launch_bounds__(tma_fwd_threads(DT), 1)
    fna_fwd_tma_kernel(const FnaArgs a, const FnaPtrs p,
                       const __grid_constant__ TmaFwdMaps<kBox> maps) {
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
  const int sa = kBox ? stacked_axis(a) : 0;  // boxes: the axis the parts stack along
  if constexpr (kBox) {
    if (!stacked_tile(a, sa, L::kWgs, blockIdx.x, qb)) return;  // whole CTA
  } else {
    if (!axis_tile(a, L::kQRows, blockIdx.x, qb)) return;
  }
  // 1-D: the problem's one long axis (tma_tiling): its parameters, the tile's group and rows, and
  // the first key of its walk. (Boxes: walk.cuh key_walk, built by each role after the split:
  // values live across it would be held in the producer's few registers.)
  const AxisSpan span = axis_span(a, qb);
  const AxisParams& axp = span.p;
  const int g = span.g, lg = span.lg, lo = span.lo, hi = span.hi;
  const int h = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z), kvh = h / a.group;
  const int box_lo = kBox ? 0 : window_start(lo, lg, axp.kernel, axp.stride, axp.causal);
  const StageRing<kStages> ring{bars, bars + kStages};
  uint64_t* const q_full = bars + 2 * kStages;
  ring.setup(1, kCompute, q_full, 1, /*tma=*/true);

  if (threadIdx.x >= kCompute) {  // the producer: one thread issues every copy
    regs_shrink<tma_fwd_producer_regs()>();
    if (threadIdx.x == kCompute) {
      if constexpr (kBox) {
        const int grp = box_map_group(a, qb);
        const int xb = box_batch_x(a, b);
        const CUtensorMap* kmap = &maps.k[grp];
        const CUtensorMap* vmap = &maps.v[grp];
        tma_prefetch_map(kmap);
        tma_prefetch_map(vmap);
        // The parts that hold queries (a part past the axis's end stays unwritten: its
        // warpgroup computes nothing).
        const int sa_lo = sa == 0 ? qb.lo[0] : (sa == 1 ? qb.lo[1] : qb.lo[2]);
        const int sa_hi = sa == 0 ? qb.hi[0] : (sa == 1 ? qb.hi[1] : qb.hi[2]);
        const int part = 1 << a.qlog[sa];
        const int parts = imin(L::kWgs, (sa_hi - sa_lo + part - 1) / part);
        mbar_expect_tx(q_full, parts * kRows * DT * static_cast<int>(sizeof(T)));
        for (int pt = 0; pt < parts; ++pt) {
          const int off = pt * part;
#pragma unroll
          for (int c = 0; c < L::kHalves; ++c)
            tma_load_5d(Qs + c * L::kQBlock + pt * kRows * 64, &maps.q[grp], q_full, 64 * c, h,
                        qb.lo[2] + (sa == 2 ? off : 0), qb.lo[1] + (sa == 1 ? off : 0),
                        xb + qb.lo[0] + (sa == 0 ? off : 0));
        }
        produce_key_boxes<T, DT, kTmaFwdKeys, kStages>(a, qb, kmap, vmap, xb, kvh, Ks, Vs, ring);
      } else {
        tma_prefetch_map(&maps.k);
        tma_prefetch_map(&maps.v);
        mbar_expect_tx(q_full, L::kQTileBytes);
#pragma unroll
        for (int c = 0; c < L::kHalves; ++c)
          tma_load_5d(Qs + c * L::kQBlock, &maps.q, q_full, 64 * c, h, g, lo, b);
        const int box_hi = window_end(hi - 1, lg, axp.kernel, axp.stride, axp.causal);
        const int steps = (box_hi - box_lo + kTmaFwdKeys - 1) / kTmaFwdKeys;
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
    }
    return;
  }
  regs_grow<tma_fwd_consumer_regs(DT)>();

  // The computing warpgroups. Warpgroup wg owns query rows 64 wg .. 64 wg + 63 of the tile
  // (tile_row<1, true>; boxes: its part); the thread holds rows r[0], r[1] (local indices) and
  // their windows.
  // (Read through a shuffle so the compiler knows it is the same in every lane of a warp: what
  // derives from it, the warpgroup's walk and its wgmma descriptors, can live in uniform
  // registers, which the wgmma instructions read.)
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / kThreads, 0);
  fill_ones(Ones, threadIdx.x, kCompute);
  fence_proxy_async();  // -> the wgmma reads (after role_sync)
  role_sync(1, kCompute);

  // The warpgroup's reach: the steps [step_lo, step_hi) its rows' windows span (windows never
  // move back as the query grows), and per axis the keys [full_lo, full_hi) inside all of them.
  int steps = 0, step_lo = 0, step_hi = 0;
  int full_lo[3] = {0, 0, 0}, full_hi[3] = {0, 0, 0};
  int logs[kMaxRank];  // the tile's rows' log2 extents (tile_offsets)
  // 1-D: the rows' windows, keys [ws, ws + wlen) (empty past the problem).
  int ws[2], wlen[2];
  // Boxes: the rows' windows (empty past the problem) as the thread's key columns; the key
  // box; the counter of the step whose scores come next.
  ColumnWindow rows[2];
  const KeyWalk walk = key_walk(a, qb);  // (boxes only)
  TileCounter cur;
  cur.reset();
  if constexpr (kBox) {
    stacked_tile_logs(a, sa, logs);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int qc[3];
      const bool in = box_row(qb, logs, tile_row<1, true>(0, i), qc);
      int start[3], end[3];
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        start[ax] = in ? win_start(a.ax[ax], qb.lg[ax], qc[ax]) : 0;
        end[ax] = in ? win_end(a.ax[ax], qb.lg[ax], qc[ax]) : 0;
      }
      rows[i] = ColumnWindow(a, start, end);
    }
    steps = walk.spatial;
    int inner = 1, s_lo = 0, s_hi = 0;
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {
      const AxisParams& x = a.ax[ax];
      int f = qb.lo[ax], l = qb.hi[ax] - 1;  // the warpgroup's first and last rows on ax
      if (ax == sa) {
        f += wg << a.qlog[ax];
        l = imin(f + (1 << a.qlog[ax]), qb.hi[ax]) - 1;
        if (f <= l) {
          const int t = 1 << a.kvlog[ax];
          s_lo = (win_start(x, qb.lg[ax], f) - walk.box_lo[ax]) >> a.kvlog[ax];
          s_hi = (win_end(x, qb.lg[ax], l) - walk.box_lo[ax] + t - 1) >> a.kvlog[ax];
          cur.j[ax] = s_lo;
        }
      }
      if (ax > sa) inner *= walk.n[ax];
      if (f <= l) {
        full_lo[ax] = win_start(x, qb.lg[ax], l);
        full_hi[ax] = win_end(x, qb.lg[ax], f);
      }
    }
    step_lo = s_lo * inner;
    step_hi = s_hi * inner;
  } else {
    axis_tile_logs(a, logs);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = lo + tile_row<1, true>(0, i);
      ws[i] = r < hi ? window_start(r, lg, axp.kernel, axp.stride, axp.causal) : 0;
      wlen[i] = r < hi ? window_end(r, lg, axp.kernel, axp.stride, axp.causal) - ws[i] : 0;
    }
    const int box_hi = window_end(hi - 1, lg, axp.kernel, axp.stride, axp.causal);
    steps = (box_hi - box_lo + kTmaFwdKeys - 1) / kTmaFwdKeys;
    const int first_row = lo + kRows * wg, last_row = imin(first_row + kRows, hi) - 1;
    if (first_row <= last_row) {
      const int k_lo = window_start(first_row, lg, axp.kernel, axp.stride, axp.causal);
      const int k_hi = window_end(last_row, lg, axp.kernel, axp.stride, axp.causal);
      step_lo = (k_lo - box_lo) / kTmaFwdKeys;
      step_hi = (k_hi - box_lo + kTmaFwdKeys - 1) / kTmaFwdKeys;
      full_lo[0] = window_start(last_row, lg, axp.kernel, axp.stride, axp.causal);
      full_hi[0] = window_end(first_row, lg, axp.kernel, axp.stride, axp.causal);
    }
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

  // 1-D: the warpgroups take turns at issuing their products (pipeline.cuh IssueTurns), one round
  // per step of the CTA's walk and one for the last o += P v: steps + 1 rounds each, idle ones
  // (steps outside the warpgroup's reach) included. Boxes: no turns (pipeline.cuh NoTurns says
  // why); the idle steps only wait for their stage and release it.
  const std::conditional_t<kBox, NoTurns, IssueTurns<L::kWgs>> turns(wg);
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
    // The step's key tile: its origin (1-D: o[0]) and whether it lies inside every row's window.
    int o[3] = {box_lo + n * kTmaFwdKeys, 0, 0};
    bool inside = true;
    unsigned inside_axes = 0;  // (boxes: bit ax, inside every row's window on axis ax)
    if constexpr (kBox) {
      bool whole_tile;  // (key_tile's test is the whole query tile's: the warpgroup's is below)
      key_tile(a, walk, cur, o, whole_tile);
      cur.next(walk.n);
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        const bool in = o[ax] >= full_lo[ax] && o[ax] + (1 << a.kvlog[ax]) <= full_hi[ax];
        inside_axes |= in ? 1u << ax : 0u;
      }
      inside = inside_axes == 7u;
    } else {
      inside = o[0] >= full_lo[0] && o[0] + kTmaFwdKeys <= full_hi[0];
    }
    // Scores with a negative scale: negated, so that the online softmax's max is the weights'.
    if (a.scale_sign < 0.f) {
#pragma unroll
      for (int nb = 0; nb < 16; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[0][nb][e] = -s[0][nb][e];
    }
    // (The softmax ends each branch: ptxas would move the wait for the product in flight up to
    // where they join.)
    float alpha[1][2];
    if (inside) {
      online_softmax<1, 16>(s, m, alpha, mul, false);
    } else if constexpr (kBox) {
      // Per row, the thread's keys inside the row's window: element (nb, c) is bit nb + 16 c,
      // read a byte at a time (ptxas then turns seven bits into predicates with one R2P).
      int off[3];
      ColumnWindow::step_offsets(a, o, off);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const unsigned in = rows[i].bits(a, off, inside_axes);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const unsigned byte = (in >> (8 * k)) & 0xffu;
#pragma unroll
          for (int b = 0; b < 8; ++b) {
            const int nb = 8 * (k & 1) + b, c = k >> 1;
            if (!((byte >> b) & 1u)) s[0][nb][2 * i + c] = -INFINITY;
          }
        }
      }
      online_softmax<1, 16>(s, m, alpha, mul, false);
    } else {
#pragma unroll
      for (int nb = 0; nb < 16; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          const bool in = static_cast<unsigned>(o[0] + frag_col(nb, e) - ws[i]) <
                          static_cast<unsigned>(wlen[i]);
          if (!in) s[0][nb][e] = -INFINITY;
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
      constexpr CUtensorMapDataType type = tma_type<T>();
      constexpr int kQRows = tma_fwd_q_rows(DT);
      constexpr int kSmem = tma_fwd_smem(DT);
      const int sa = stacked_axis(a);  // (the first axis longer than one token)
      if (long_axis_count(a.ax) >= 2) {  // the box walk (tiling.h tma_box_tiling)
        // Its query tiles: tma_fwd_wgs parts of 2^qlog tokens stacked along axis sa
        // (walk.cuh stacked_tile), counted per axis into the arguments.
        FnaArgs s = a;
        s.q_tiles = 1;
        for (int ax = 0; ax < kMaxRank; ++ax) {
          const AxisParams& x = a.ax[ax];
          const int extent = (ax == sa ? tma_fwd_wgs(DT) : 1) << a.qlog[ax];
          s.q_tpg[ax] = ceil_div(group_length(x.length, x.dilation, 0), extent);
          s.q_units[ax] = x.dilation * s.q_tpg[ax];
          s.q_tiles *= s.q_units[ax];
        }
        // (walk.cuh ColumnWindow: the key tile's last axis at least two tokens long.)
        if (a.kvlog[kMaxRank - 1] < 1)
          return invalid("fused: the TMA forward's box walk needs key tiles of two or more "
                         "tokens on the last axis");
        s.kv_cols = column_axes(a.kvlog, kTmaFwdKeys / 8);
        BoxTmaMaps maps = {};
        NATTEN_TRY(encode_box_maps(maps, p, type, batch_total, s, /*grad=*/false));
        const dim3 grid(static_cast<unsigned>(s.q_tiles), a.heads, static_cast<unsigned>(batch));
        return launch_kernel<fna_fwd_tma_kernel<T, DT, true>>(
            "fna forward (TMA, boxes)", kSmem, kSmem, grid, stream, s, p, tma_fwd_threads(DT),
            maps);
      }
      const AxisParams& x = a.ax[tile_axis(a)];
      TmaMaps maps;
      NATTEN_TRY(encode_token_map(maps.q, p.q, type, batch_total, x.length, a.heads, a.dim,
                                  x.dilation, kQRows));
      NATTEN_TRY(encode_token_map(maps.k, p.k, type, batch_total, x.length, a.kv_heads, a.dim,
                                  x.dilation, kTmaFwdKeys));
      NATTEN_TRY(encode_token_map(maps.v, p.v, type, batch_total, x.length, a.kv_heads, a.dim_v,
                                  x.dilation, kTmaFwdKeys));
      // Query tiles: per dilation group (all of one length: tma_problem), axis_tile's slots.
      const int64_t tiles = x.dilation * ceil_div(x.length / x.dilation, kQRows);
      const dim3 grid(static_cast<unsigned>(tiles), a.heads, static_cast<unsigned>(batch));
      return launch_kernel<fna_fwd_tma_kernel<T, DT, false>>("fna forward (TMA)", kSmem, kSmem,
                                                              grid, stream, a, p,
                                                              tma_fwd_threads(DT), maps);
    }
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
