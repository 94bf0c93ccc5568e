// FNA backward, key side (fna.cuh): per key tile and kv head, the walk over the query tiles of
// its inverse box for every query head of the kv head, accumulating dk = scale * dS^T q and
// dv = P^T do in registers (rows of the products are keys). CTAs past the spatial key tiles own
// tiles of additional keys: every query attends to them, so they walk every query tile.
//
// With kDq (Hopper only) the same walk also produces dq, so no second kernel recomputes the
// scores: each step's dS^T goes to shared memory, one more warpgroup MMA forms the step's
// dq = dS k [64 queries x DT], and the copy engine adds it to a float32 workspace
// (cp.reduce.async.bulk, one row per query), which launch_backward_dq_convert scales and rounds
// afterwards. The adds land in any order, so kDq is the non-deterministic mode. kDq is also
// warp-specialized (pipeline.cuh): a producer warpgroup (the last) stages the key tile, then
// each query tile's q, do, softmax statistics and delta into a ring of bwd_stages stages, while
// kDqWgs computing warpgroups (warps 0-3, and 4-7 with two) walk them, each owning 64 of the
// tile's keys (its S^T, dP^T, dk, dv); setmaxnreg splits the registers between the roles
// (bwd_producer_regs, bwd_consumer_regs). Two share every staged query tile and every dq row:
// dq = dS k sums over all 128 keys, each warpgroup forming and adding half of its columns, so
// per key the staging and the workspace adds cost half of what a 64-key tile's would (measured
// faster on 1-D problems, slower on 2-D ones, whose 128-key tiles walk more query tiles: tiling.h
// bwd_dq_warpgroups picks).
//
// The warp-specialized walk also runs without dq (kDqWgs = 2, kDq = false): the dk / dv kernel
// at head-dim tile 128 beside the TMA dq kernel, two computing warpgroups on 128-key tiles fed by
// the TMA, where a key tile's walk is long enough to pay for one CTA an SM (tiling.h
// mean_key_walk, kLongKeyWalk).
#include <type_traits>

#include "fna.cuh"
#include "launch.h"
#include "pipeline.cuh"
#include "tensor_maps.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

// kWg: wgmma on core-matrix tiles (Hopper), else mma.sync (forward.cu explains both); one m64
// row block of keys per computing warpgroup either way. kDqWgs > 0: warp-specialized, with that
// many computing warpgroups, and with kDq (the default there) also dq and d-rpb (see above;
// wgmma only). (1-D problems on Hopper run
// backward_tma.cu's kernel instead, where it serves them.) kTma (wgmma, head-dim tiles 64 and
// 128 without dq, 64 with; tiling.h key_walk_on_box_tma): one thread (the producer's first with
// kDq) copies each query tile's q and do by the TMA (`maps`: one box per 64 head dims and dilation
// group, tensor_maps.h encode_box_maps) as 64-column blocks with 128-byte swizzle, read through
// swizzled descriptors; the statistics and delta stay cp.async copies. With kDq, each
// warpgroup's dq columns are added to the workspace as 32-float boxes of the query tile by TMA
// reduce-adds (one instruction per box instead of one bulk add per row).
template <typename T, int DT, bool kWg, int kDqWgs, bool kTma, bool kDq = (kDqWgs > 0)>
__global__ void __launch_bounds__(bwd_threads(kDqWgs), bwd_min_ctas(kDqWgs))
    fna_bwd_kernel(const FnaArgs a, const FnaPtrs p, const __grid_constant__ BoxTmaMaps maps) {
  // kWs: warp-specialized (kDqWgs computing warpgroups and a producer); kDq: dq in the walk too
  // (always, but in the head-dim-128 walk for dk and dv beside the TMA dq kernel: kDqWgs = 2,
  // kDq = false).
  constexpr bool kWs = kDqWgs > 0;
  static_assert(!kWs || kWg, "the warp-specialized variants are Hopper-only");
  static_assert(kWs || !kDq, "dq in the walk: warp-specialized");
  static_assert(!kTma || (kWg && DT >= 64 && (!kDq || DT == 64)),
                "the TMA variant: wgmma, head-dim tile 64 or 128 (64 with dq)");
  constexpr int kLd = kWg ? DT : DT + 8;
  constexpr int kStages = bwd_stages(kDqWgs);
  constexpr int kKeys = bwd_key_rows(kDqWgs);             // key rows: 64 per computing warpgroup
  constexpr int kCompute = bwd_compute_threads(kDqWgs);   // the computing warpgroups' threads
  constexpr int kQBlock = kRows * 64;  // kTma: a 64-column block of a query-side tile
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // (kTma: the swizzle atoms need 1024-byte alignment: the launch added the slack.)
  unsigned char* smem =
      kTma ? smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023) : smem_raw;
  T* Ks = reinterpret_cast<T*>(smem);   // [kKeys][kLd]
  T* Vs = Ks + kKeys * kLd;
  T* Qs = Vs + kKeys * kLd;              // [kStages][kRows][kLd]
  T* Os = Qs + kStages * kRows * kLd;    // do, [kStages][kRows][kLd]
  // The forward's softmax statistics (m2, log2_l) and delta per query row, [kStages][kRows].
  float2* Sts = reinterpret_cast<float2*>(Os + kStages * kRows * kLd);
  float* Ds = reinterpret_cast<float*>(Sts + kStages * kRows);
  // kDq: the stage ring's barriers (full, empty, then the key tile's; 64 bytes; kTma without kDq:
  // the two query-side buffers' TMA barriers), dS^T of the step (core-matrix tiles, keys x
  // queries, two buffers: step i writes buffer i % 2), the step's dq rows (float32, padded rows:
  // conflict-free fragment stores, 16-byte aligned for the bulk copies; warpgroup g writes and
  // adds columns [g kN, (g + 1) kN), kN = DT / kDqWgs; kTma: 32-column boxes [DT / 32][kRows][32]
  // with 128-byte swizzle, 1024-byte aligned), then (kDq) the walk's fields, written once by
  // thread 0 and read by every computing thread (uniform over the CTA: in registers they were
  // spilled and reloaded at the top of each step), then d-rpb.
  uint64_t* bars = reinterpret_cast<uint64_t*>(Ds + kStages * kRows);
  T* Ss = reinterpret_cast<T*>(bars + 8);
  float* Qacc = reinterpret_cast<float*>(Ss + (kDq ? 2 * kKeys * kRows : 0));
  if constexpr (kTma && kDq) Qacc += ((1024 - (smem_addr(Qacc) & 1023)) & 1023) / 4;
  QueryWalk* walk_s = reinterpret_cast<QueryWalk*>(Qacc + (kDq ? kRows * kDqLd<DT> : 0));
  float* drpb_s = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(walk_s) + 128);
  static_assert(sizeof(QueryWalk) <= 128 && alignof(QueryWalk) <= 16,
                "the walk fits its 128-byte slot (fna.cuh bwd_smem)");
  static_assert(2 * kStages + 1 <= 8, "barriers fit their 64 bytes");

  const int kvh = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;
  const bool spatial = blockIdx.x < a.kv_tiles;
  Box kb;
  int s0 = 0;
  if (spatial) {
    if (!tile_box(a, a.kvlog, a.kv_tpg, a.kv_units, blockIdx.x, kb)) return;  // whole CTA
  } else {
    s0 = static_cast<int>(blockIdx.x - a.kv_tiles) * kKeys;
  }

  // Key rows of the tile -> global rows of k / v (or of the additional kv).
  auto key_row = [&](int r, const T* base, const T* add_base, int dim) -> const T* {
    if (!spatial) {
      if (s0 + r >= a.S) return nullptr;
      return add_base + ((static_cast<int64_t>(b) * a.S + s0 + r) * a.kv_heads + kvh) * dim;
    }
    int off[3], l[3];
    tile_offsets(r, a.kvlog, off);
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {
      l[ax] = kb.lo[ax] + off[ax];
      if (l[ax] >= kb.hi[ax]) return nullptr;
    }
    return base + ((row0 + token_of(a, kb.grp, l)) * a.kv_heads + kvh) * dim;
  };
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* add_k = static_cast<const T*>(p.add_k);
  const T* add_v = static_cast<const T*>(p.add_v);
  auto stage_keys = [&]() {
    stage_rows<T, DT, kWg, kKeys>(Ks, [&](int r) { return key_row(r, k, add_k, a.dim); }, a.dim,
                                  k);
    stage_rows<T, DT, kWg, kKeys>(Vs, [&](int r) { return key_row(r, v, add_v, a.dim_v); },
                                  a.dim_v, v);
    cp_async_commit();
  };

  const T* q = static_cast<const T*>(p.q);
  const T* d_o = static_cast<const T*>(p.d_o);
  // kTma: the map index of query tile t's dilation group, and batch element b's first local x
  // (the maps fold batch and x).
  [[maybe_unused]] auto map_group = [&](const QueryTile& t) {
    return (t.box.grp[0] * a.ax[1].dilation + t.box.grp[1]) * a.ax[2].dilation + t.box.grp[2];
  };
  [[maybe_unused]] const int xb = b * (a.ax[0].length / a.ax[0].dilation);
  // The query-side rows of the walk's next tile (`staged`) into stage `buf`, one cp.async group.
  auto stage_queries = [&](const QueryWalk& walk, int buf, QueryWalk::Cursor& staged,
                           const TileRows<DT, kRows, kWg>& qrows) {
    const QueryTile t = walk.tile(a, staged);
    staged.next(walk, a);
    int lim[3];
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) lim[ax] = t.nonempty ? t.box.hi[ax] - t.box.lo[ax] : 0;
    if constexpr (kTma) {
      if (threadIdx.x == (kWs ? kCompute : 0)) {
        // The box at the tile's local origin in its dilation group's maps (batch and x folded:
        // tiling.h keeps boxes inside one batch element); an empty tile's box starts past the z
        // extent, so all of it is zero-filled. Barrier bars[buf]: with kDq the ring's full
        // barrier of stage buf (ring.full is bars), on which the producer's threads arrive
        // (Handoff) once their statistics have landed; else the buffer's own, this thread's
        // arrival the only one.
        const int grp = t.nonempty ? map_group(t) : 0;
        const int z = t.nonempty ? t.box.lo[2] : a.ax[2].length / a.ax[2].dilation;
        uint64_t* bar = bars + buf;
        if constexpr (kWs)
          mbar_expect_tx_only(bar, 2 * kRows * DT * static_cast<int>(sizeof(T)));
        else
          mbar_expect_tx(bar, 2 * kRows * DT * static_cast<int>(sizeof(T)));
#pragma unroll
        for (int c = 0; c < DT / 64; ++c) {
          tma_load_5d(Qs + buf * kRows * kLd + c * kQBlock, &maps.q[grp], bar, 64 * c, t.h, z,
                      t.box.lo[1], xb + t.box.lo[0]);
          tma_load_5d(Os + buf * kRows * kLd + c * kQBlock, &maps.d_o[grp], bar, 64 * c, t.h, z,
                      t.box.lo[1], xb + t.box.lo[0]);
        }
      }
    } else {
      const int64_t tok0 = t.nonempty ? token_of(a, t.box.grp, t.box.lo) : 0;
      qrows.stage(Qs + buf * kRows * kLd, q, row0, tok0, lim, a.heads, t.h, a.dim);
      qrows.stage(Os + buf * kRows * kLd, d_o, row0, tok0, lim, a.heads, t.h, a.dim_v);
    }
    // (The producer's threads are kThreads..; without kDq the plain index keeps the one-warpgroup
    // kernels' register allocation as it was: the modulo alone moved spills in the DT = 128 one.)
    for (int r = kWs ? threadIdx.x % kThreads : threadIdx.x; r < kRows; r += kThreads) {
      int off[3];
      tile_offsets(r, a.qlog, off);
      const bool ok = off[0] < lim[0] && off[1] < lim[1] && off[2] < lim[2];
      int l[3];
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) l[ax] = t.box.lo[ax] + off[ax];
      const int64_t i = ok ? (row0 + token_of(a, t.box.grp, l)) * a.heads + t.h : 0;
      cp_async8(Sts + buf * kRows + r, p.stats + i, ok);
      cp_async4(Ds + buf * kRows + r, p.delta + i, ok);
    }
    cp_async_commit();
  };

  // Feeding the walk. kDq (Hopper): the last warpgroup is the producer (pipeline.cuh) that stages
  // the key tile, then each query tile into a ring of kStages stages; the others compute. Else the
  // CTA's one warpgroup stages the next query tile itself while it computes on the current one.
  // Each role builds its own walk (QueryWalk) after the split: values live across it would be
  // held in the launch's 128 registers per thread.
  const StageRing<kStages> ring{bars, bars + kStages};
  uint64_t* const keys_full = bars + 2 * kStages;
  if constexpr (kWs) {
    ring.setup(kThreads, kCompute, keys_full, kThreads, kTma);
    if (threadIdx.x >= kCompute) {  // the producer
      regs_shrink<bwd_producer_regs(kDqWgs, kDq)>();
      const QueryWalk walk(a, kb, spatial, kvh);
      QueryWalk::Cursor staged = walk.start();
      const TileRows<DT, kRows, kWg> qrows(a, a.qlog);
      Handoff handoff;
      stage_keys();
      handoff.then(keys_full);
      for (int64_t it = 0; it < walk.total; ++it) {
        ring.acquire(it);
        stage_queries(walk, ring.stage(it), staged, qrows);
        handoff.then(ring.full + ring.stage(it));
      }
      handoff.flush();
      return;
    }
    regs_grow<bwd_consumer_regs(kDqWgs, kDq)>();
  } else {
    if constexpr (kTma) {
      if (threadIdx.x == 0) {
        mbar_init(bars, 1);
        mbar_init(bars + 1, 1);
        fence_mbar_init();
      }
      __syncthreads();
    }
    stage_keys();
  }

  // The computing warpgroups: the walk and the gradients. Warpgroup wg owns key rows
  // 64 wg .. 64 wg + 63 (thread tid of it, rows of warp w: 16 w .. 16 w + 15).
  if constexpr (kWs) {
    if (threadIdx.x == 0) *walk_s = QueryWalk(a, kb, spatial, kvh);
    role_sync(1, kCompute);
  }
  const QueryWalk walk_r = kWs ? QueryWalk() : QueryWalk(a, kb, spatial, kvh);
  const QueryWalk& walk = kWs ? *walk_s : walk_r;
  QueryWalk::Cursor staged = walk.start(), current = walk.start();
  [[maybe_unused]] const TileRows<DT, kRows, kWg> qrows(a, a.qlog);  // !kDq: this WG stages
  // (One computing warpgroup: wg is 0 at compile time; two: read through a shuffle, so the
  // compiler knows it is the same in every lane of a warp.)
  const int wg = kDqWgs == 2 ? __shfl_sync(0xffffffffu, warp >> 2, 0) : 0;
  const int tid = threadIdx.x % kThreads;
  const T* ks_wg = kWs ? Ks + wg * kRows * kLd : Ks;  // the warpgroup's keys and values
  const T* vs_wg = kWs ? Vs + wg * kRows * kLd : Vs;
  // wgmma's operand descriptors (kWg), built once from their tiles' addresses and moved per stage
  // and k16 step with desc_add (building one from an address costs ~10 uniform instructions,
  // which each wgmma then waits for): the warpgroup's k and v rows as A (core matrices, K-major:
  // k16 step kk 256 bytes on); q and do as the K-major B of the scores and the MN-major B of dk
  // and dv (q_k_step, q_mn_step); dS^T's buffers and the key tile read MN-major for dq.
  [[maybe_unused]] uint64_t k_a = 0, v_a = 0, q_k = 0, o_k = 0, q_mn = 0, o_mn = 0, ss_mn = 0,
                            k_dq = 0;
  if constexpr (kWg) {
    k_a = smem_desc(ks_wg, 128, DT * 16);
    v_a = smem_desc(vs_wg, 128, DT * 16);
    if constexpr (kTma) {
      q_k = smem_desc_sw128(Qs, 16, 1024);
      o_k = smem_desc_sw128(Os, 16, 1024);
      q_mn = smem_desc_sw128(Qs, kQBlock * 2, 1024);
      o_mn = smem_desc_sw128(Os, kQBlock * 2, 1024);
    } else {
      q_k = smem_desc(Qs, 128, DT * 16);
      o_k = smem_desc(Os, 128, DT * 16);
      q_mn = smem_desc(Qs, DT * 16, 128);
      o_mn = smem_desc(Os, DT * 16, 128);
    }
    if constexpr (kDq) {
      ss_mn = smem_desc(Ss, kRows * 16, 128);
      k_dq = smem_desc(Ks + wg * (DT / kDqWgs) * 8, DT * 16, 128);
    }
  }
  // Bytes from a query-side tile's first k16 step to step kk: K-major (kTma: 32 bytes into
  // 64-column block kk / 4), MN-major (16 query rows).
  [[maybe_unused]] auto q_k_step = [](int kk) {
    return kTma ? ((kk / 4) * kQBlock + (kk % 4) * 16) * 2 : kk * 256;
  };
  [[maybe_unused]] auto q_mn_step = [](int kk) {
    return kTma ? kk * 16 * 64 * 2 : kk * 16 * DT * 2;
  };
  // Barriers over the computing threads, and over the thread's own warpgroup (kDq).
  auto sync_compute = [&]() {
    if constexpr (kWs)
      role_sync(1, kCompute);
    else
      __syncthreads();
  };
  [[maybe_unused]] auto sync_wg = [&]() { role_sync(2 + wg, kThreads); };

  // The thread's two key rows: local coordinates and, per axis, the queries holding them.
  int kl[2][3], qf[2][3], qn[2][3];
  bool key_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + (lane >> 2) + 8 * i;
    if (spatial) {
      key_ok[i] = key_queries(a, kb, r, kl[i], qf[i], qn[i]);
    } else {
      key_ok[i] = s0 + r < a.S;
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) kl[i][ax] = qf[i][ax] = qn[i][ax] = 0;
    }
  }

  // d-rpb (kDq): summed per query head in shared memory when it fits, flushed with one atomic
  // per entry whenever the walk moves to the next head; else atomics on the output.
  const bool want_drpb = kDq && a.R && spatial && !a.skip_drpb;
  int drpb_h = -1;  // head whose sums drpb_s holds
  auto drpb_flush = [&]() {
    sync_compute();
    float* g = p.drpb + (static_cast<int64_t>(b) * a.heads + drpb_h) * a.R;
    for (int i = threadIdx.x; i < a.R; i += kCompute) {
      if (drpb_s[i] != 0.f) atomicAdd(g + i, drpb_s[i]);
      drpb_s[i] = 0.f;
    }
    sync_compute();
  };
  if (want_drpb && a.drpb_in_smem) {
    for (int i = threadIdx.x; i < a.R; i += kCompute) drpb_s[i] = 0.f;
    sync_compute();  // zeroed before any thread's first add
  }

  float dk1[1][DT / 8][4], dv1[1][DT / 8][4];
  auto& dk = dk1[0];
  auto& dv = dv1[0];
#pragma unroll
  for (int i = 0; i < DT / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  // One step per query tile. kDq: wait for the producer's stage. Else: wait for the staged rows,
  // then (past the barrier, so
  // every thread is done with the step before, which read the other buffer) stage the next
  // tile's rows into the other buffer while this one computes.
  if (walk.total > 0) {
    if constexpr (kWs)
      mbar_wait(keys_full, 0);
    else
      stage_queries(walk, 0, staged, qrows);
  }
  for (int64_t it = 0; it < walk.total; ++it) {
    if constexpr (kWs) {
      ring.wait(it);
    } else {
      cp_async_wait<0>();
      if constexpr (kTma) mbar_wait(bars + (it & 1), static_cast<unsigned>((it >> 1) & 1));
      if constexpr (kWg) fence_proxy_async();  // cp.async writes -> wgmma reads
      __syncthreads();
      if (it + 1 < walk.total) stage_queries(walk, (it + 1) & 1, staged, qrows);
    }
    const int buf = kWs ? ring.stage(it) : static_cast<int>(it & 1);
    const T* qs = Qs + buf * kRows * kLd;
    const T* os = Os + buf * kRows * kLd;
    const float2* sts = Sts + buf * kRows;
    const float* ds = Ds + buf * kRows;
    const QueryTile t = walk.tile(a, current);
    current.next(walk, a);
    const float* rpb = a.R && spatial ? p.rpb + static_cast<int64_t>(t.h) * a.R : nullptr;
    float* drpb = nullptr;
    if (want_drpb) {
      if (a.drpb_in_smem) {
        if (t.h != drpb_h) {  // uniform over the CTA
          if (drpb_h >= 0) drpb_flush();
          drpb_h = t.h;
        }
        drpb = drpb_s;
      } else {
        drpb = p.drpb + (static_cast<int64_t>(b) * a.heads + t.h) * a.R;
      }
    }

    // S^T = k q^T and dP^T = v do^T (rows: keys, columns: queries). At DT = 128 the dk / dv
    // accumulators take 128 registers: dP^T is formed only after dv is done (kLateDp), else the
    // kernel spills.
    constexpr bool kLateDp = DT == 128;
    float s1[1][8][4], dp1[1][8][4];
    auto& s = s1[0];
    auto& dp = dp1[0];
    // The stage's query-side tiles (q, do): bytes from stage 0's (wgmma descriptors).
    [[maybe_unused]] const int stage = buf * kRows * kLd * 2;
    // acc = A B^T issued on wgmma (not committed): A the warpgroup's k or v rows (a_desc), B the
    // stage's query-side tile (b_desc: q or do).
    [[maybe_unused]] auto issue_scores = [&](float (&acc)[8][4], uint64_t a_desc,
                                             uint64_t b_desc) {
#pragma unroll
      for (int kk = 0; kk < DT / 16; ++kk)
        wgmma_ss64<T>(&acc[0][0], desc_add(a_desc, kk * 256),
                      desc_add(b_desc, stage + q_k_step(kk)), kk);
    };
    auto scores_dp = [&]() {  // dP^T = v do^T, waited for
      if constexpr (kTma) {
        wgmma_fence();
        issue_scores(dp, v_a, o_k);
        wgmma_commit();
        wgmma_wait<0>();
        reg_fence(dp1);
      } else if constexpr (kWg) {
        wg_scores<T, DT, 1>(dp1, vs_wg, os);
      } else {
        tile_scores<T, DT, 1, false>(dp1, vs_wg, os);
      }
    };
    // On wgmma, S^T and dP^T are two commit groups: the weights P^T (the exponentials) are
    // formed from S^T while dP^T is still in flight, and dS^T once it lands (late_ds). With rpb
    // the weights pass also forms dS^T and d-rpb (one pass over the bias indices), after both.
    const bool bias_pass = rpb != nullptr;
    if constexpr (kWg) {
      wgmma_fence();
      issue_scores(s, k_a, q_k);
      wgmma_commit();
      if constexpr (!kLateDp) {
        issue_scores(dp, v_a, o_k);
        wgmma_commit();
      }
    } else {
      tile_scores<T, DT, 1, false>(s1, ks_wg, qs);
      if constexpr (!kLateDp) scores_dp();
    }
    // dS^T = P^T (dP^T - delta), in dp, once dP^T exists (kLateDp; wgmma without rpb).
    auto late_ds = [&]() {
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float delta = ds[frag_col(nb, e)];
          dp[nb][e] = s[nb][e] * (dp[nb][e] - delta);
          dp[nb][2 + e] = s[nb][2 + e] * (dp[nb][2 + e] - delta);
        }
    };
    // P^T (the query's softmax weights, from its statistics: softmax_weight_exp2), 0 outside the
    // neighborhood, into s; dS^T = P^T (dP^T - delta) into dp (mma.sync, or with the bias; else
    // late_ds). Per column (query) of the
    // thread: its statistics and delta (and for masked tiles its coordinates) once, then the
    // thread's two key rows. Compiled three ways,
    // picked per tile: kMask = false for spatial tiles inside every key's inverse window (no
    // per-element test: the common case of large windows), kBias for rpb / d-rpb.
    auto weights = [&](auto mask_tag, auto bias_tag) {
      constexpr bool kMask = decltype(mask_tag)::value, kBias = decltype(bias_tag)::value;
      // Masked without a bias, on wgmma: per key row, the query tile's columns inside its inverse
      // window (spatial) or inside the tile's box (additional keys) as a bit set (tile_mask),
      // shifted to the thread's first column: element (nb, e) is bit 8 nb + e.
      constexpr bool kBits = kMask && !kBias && kWg;
      [[maybe_unused]] unsigned in_bits[2][2];
      if constexpr (kBits) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          int lo[3], hi[3];
#pragma unroll
          for (int ax = 0; ax < 3; ++ax) {
            const int extent = 1 << a.qlog[ax], first = spatial ? qf[i][ax] : t.box.lo[ax];
            const int end = spatial ? qf[i][ax] + qn[i][ax] : t.box.hi[ax];
            lo[ax] = imin(imax(first - t.box.lo[ax], 0), extent);
            hi[ax] = imin(imax(end - t.box.lo[ax], 0), extent);
          }
          const bool any = key_ok[i] && (spatial || t.nonempty);
          const uint64_t bits = any ? tile_mask(a.qlog, a.q_rep, lo, hi) >> frag_col(0, 0) : 0;
          in_bits[i][0] = static_cast<unsigned>(bits);
          in_bits[i][1] = static_cast<unsigned>(bits >> 32);
        }
      }
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = frag_col(nb, e);
          int qc[3] = {0, 0, 0};
          bool q_in = true;
          if constexpr ((kMask || kBias) && !kBits) {
            int off[3];
            tile_offsets(c, a.qlog, off);
            q_in = spatial || t.nonempty;
#pragma unroll
            for (int ax = 0; ax < 3; ++ax) {
              qc[ax] = t.box.lo[ax] + off[ax];
              if (!spatial) q_in = q_in && qc[ax] < t.box.hi[ax];
            }
          }
          const float2 st = sts[c];
          [[maybe_unused]] const float delta = ds[c];  // (unused where late_ds forms dS^T)
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            // Keys past the problem (zero rows) are never stored, but their weights must stay
            // finite: they feed dq through zero key rows.
            bool in = q_in && key_ok[i];
            if constexpr (kBits) {
              in = (in_bits[i][nb >> 2] >> (8 * (nb & 3) + e)) & 1u;
            } else if constexpr (kMask) {
              if (spatial) {
#pragma unroll
                for (int ax = 0; ax < 3; ++ax)
                  in = in && static_cast<unsigned>(qc[ax] - qf[i][ax]) <
                                 static_cast<unsigned>(qn[i][ax]);
              }
            }
            float x;
            int ri = 0;
            if constexpr (kBias) {
              float bias2 = 0.f;
              if (rpb != nullptr && in) {
                ri = rpb_index(a, qc, kl[i]);
                bias2 = __ldg(rpb + ri) * kLog2e;
              }
              x = softmax_weight_exp2(s[nb][2 * i + e], a.scale_log2, st, bias2);
            } else {
              x = softmax_weight_exp2(s[nb][2 * i + e], a.scale_log2, st);
            }
            const float pr = in ? fast_exp2(x) : 0.f;
            s[nb][2 * i + e] = pr;
            if constexpr (!kLateDp && (kBias || !kWg)) {  // else late_ds, below
              const float dsv = pr * (dp[nb][2 * i + e] - delta);
              dp[nb][2 * i + e] = dsv;
              if constexpr (kBias) {
                if (drpb != nullptr && in) atomicAdd(drpb + ri, dsv);
              }
            }
          }
        }
      }
    };
    using True = std::true_type;
    using False = std::false_type;
    // (Each branch waits for all it reads: ptxas serializes the MMAs where a path that has not
    // waited meets one that reads their accumulators, C7514.)
    if (bias_pass) {
      if constexpr (kWg) {
        wgmma_wait<0>();
        reg_fence(s1);
        if constexpr (!kLateDp) reg_fence(dp1);
      }
      weights(True{}, True{});
    } else {
      if constexpr (kWg) {
        wgmma_wait<kLateDp ? 0 : 1>();  // S^T (committed first)
        reg_fence(s1);
      }
      if (spatial && t.full)
        weights(False{}, False{});
      else
        weights(True{}, False{});
      if constexpr (kWg && !kLateDp) {
        wgmma_wait<0>();  // dP^T
        reg_fence(dp1);
        late_ds();
      }
    }

    if constexpr (kWg) {
      // dv += P^T do, dk += dS^T q: P^T and dS^T (packed) are the A operands, do and q the
      // MN-major B (k16 step kk: query rows 16 kk..).
      unsigned pa[4][4], da[4][4];
      auto pack = [](unsigned (&f)[4][4], const float (&x)[8][4]) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) pack_a<T>(f[kk], x, kk);
      };
      pack(pa, s);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_rs<T, DT, 1>(&dv[0][0], pa[kk], desc_add(o_mn, stage + q_mn_step(kk)), 1);
      wgmma_commit();
      if constexpr (kLateDp) {
        wgmma_wait<0>();
        reg_fence(dv1);
        scores_dp();
        late_ds();
      }
      pack(da, dp);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_rs<T, DT, 1>(&dk[0][0], da[kk], desc_add(q_mn, stage + q_mn_step(kk)), 1);
      wgmma_commit();
      if constexpr (kDq) {
        // dS^T -> this step's Ss buffer (element (key r, query c) at core_offset(r, c, 64)): the
        // packed registers hold rows r, r + 8 and column pairs 16 kk + 2 (lane % 4) (+ 8). The
        // buffer was last read by step it - 2's dq products, which both warpgroups completed
        // before the barrier of step it - 1.
        T* ss = Ss + (it & 1) * kKeys * kRows;
        const int r = warp * 16 + (lane >> 2), c = 2 * (lane & 3);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          *reinterpret_cast<unsigned*>(ss + core_offset(r, 16 * kk + c, kRows)) = da[kk][0];
          *reinterpret_cast<unsigned*>(ss + core_offset(r + 8, 16 * kk + c, kRows)) = da[kk][1];
          *reinterpret_cast<unsigned*>(ss + core_offset(r, 16 * kk + 8 + c, kRows)) = da[kk][2];
          *reinterpret_cast<unsigned*>(ss + core_offset(r + 8, 16 * kk + 8 + c, kRows)) = da[kk][3];
        }
        fence_proxy_async();
        sync_compute();  // both warpgroups' dS^T rows are in
        // Columns [wg kN, (wg + 1) kN) of dq[64 queries x DT] = dS k over all kKeys keys: A = dS^T
        // read MN-major (queries contiguous; k16 step kk: key rows 16 kk..), B = the key tile
        // read MN-major from column wg kN.
        constexpr int kN = DT / kDqWgs;
        float dq[kN / 8][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk)
          wgmma_ss<T, kN, 1, 1>(&dq[0][0],
                                desc_add(ss_mn, ((it & 1) * kKeys * kRows + kk * 16 * kRows) * 2),
                                desc_add(k_dq, kk * 16 * DT * 2), kk);
        wgmma_commit();
        wgmma_wait<0>();
        reg_fence(dq);
        reg_fence(dk1);
        reg_fence(dv1);
        ring.release(it);  // every MMA that read the stage (dv, dk) has completed
        // The step's dq columns -> Qacc (once the last step's adds have read it) -> the float32
        // workspace. kTma: as 32-column boxes of the query tile (box c: columns 32 c ..; 128-byte
        // swizzle: 16-byte chunk k of row r lands at chunk k ^ (r % 8)), one TMA reduce-add each
        // (rows and columns outside the problem skipped); else one bulk add per query row in the
        // problem.
        if (tid < (kTma ? 1 : kRows)) bulk_wait_read();
        sync_wg();
        const int qr = (warp & 3) * 16 + (lane >> 2);
        if constexpr (kTma) {
          // Element (row r = qr + 8 i, column c = wg kN + 8 nb + 2 q), q = lane % 4, goes to box
          // c / 32 = wg kN / 32 + nb / 4, row r, 16-byte chunk (2 (nb % 4) + q / 2) ^ (r % 8),
          // word 2 (q % 2); r % 8 = lane / 4 in both rows, so the swizzled chunk takes four
          // values a thread and the rest is a constant offset from its first element.
          const int q = lane & 3;
          float* const first = Qacc + wg * (kN / 32) * kRows * 32 + qr * 32 + 2 * (q & 1);
          int chunk[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) chunk[k] = ((2 * k + (q >> 1)) ^ (lane >> 2)) << 2;
#pragma unroll
          for (int nb = 0; nb < kN / 8; ++nb)
#pragma unroll
            for (int i = 0; i < 2; ++i)
              *reinterpret_cast<float2*>(first + (nb >> 2) * kRows * 32 + i * 8 * 32 +
                                         chunk[nb & 3]) =
                  make_float2(dq[nb][2 * i], dq[nb][2 * i + 1]);
        } else {
#pragma unroll
          for (int nb = 0; nb < kN / 8; ++nb)
#pragma unroll
            for (int i = 0; i < 2; ++i)
              *reinterpret_cast<float2*>(Qacc + (qr + 8 * i) * kDqLd<DT> + wg * kN +
                                         frag_col(nb, 0)) =
                  make_float2(dq[nb][2 * i], dq[nb][2 * i + 1]);
        }
        fence_proxy_async();
        sync_wg();
        const int cols = imin(kN, a.dim - wg * kN);  // of the head dim, in this half
        if constexpr (kTma) {
          if (tid == 0 && cols > 0 && t.nonempty) {
#pragma unroll
            for (int box = wg * kN / 32; box < (wg + 1) * kN / 32; ++box)
              if (32 * box < a.dim)
                tma_reduce_add_5d(&maps.dq[map_group(t)], Qacc + box * kRows * 32, 32 * box, t.h,
                                  t.box.lo[2], t.box.lo[1], xb + t.box.lo[0]);
            bulk_commit();
          }
        } else if (tid < kRows && cols > 0 && (spatial || t.nonempty)) {
          int qc[3];
          int64_t grow;
          if (query_row_at(a, t.box, tid, row0, t.h, qc, grow)) {
            bulk_reduce_add_f32(p.dq_acc + grow * a.dim + wg * kN,
                                Qacc + tid * kDqLd<DT> + wg * kN, cols * 4);
            bulk_commit();
          }
        }
      } else {
        wgmma_wait<0>();
        reg_fence(dk1);
        reg_fence(dv1);
        if constexpr (kWs) ring.release(it);  // every MMA that read the stage has completed
      }
    } else {
      tile_apply<T, DT, 1, false>(dv1, s1, os);
      if constexpr (kLateDp) {
        scores_dp();
        late_ds();
      }
      tile_apply<T, DT, 1, false>(dk1, dp1, qs);
    }
  }
  if constexpr (kDq) {
    if (tid < (kTma ? 1 : kRows)) bulk_wait_all();
    if (want_drpb && a.drpb_in_smem && drpb_h >= 0) drpb_flush();
  }

  // Rows of dk / dv (or of the additional-kv gradients) of the thread's keys.
  auto out_row = [&](int i, T* base, T* add_base, int dim) -> T* {
    if (!key_ok[i]) return nullptr;
    const int r = warp * 16 + (lane >> 2) + 8 * i;
    if (!spatial)
      return add_base + ((static_cast<int64_t>(b) * a.S + s0 + r) * a.kv_heads + kvh) * dim;
    return base + ((row0 + token_of(a, kb.grp, kl[i])) * a.kv_heads + kvh) * dim;
  };
  T* dk_out = static_cast<T*>(p.dk);
  T* dv_out = static_cast<T*>(p.dv);
  T* dak = static_cast<T*>(p.dadd_k);
  T* dav = static_cast<T*>(p.dadd_v);
  store_rows<T, DT>(dk, a.scale, a.scale, [&](int i) { return out_row(i, dk_out, dak, a.dim); },
                    a.dim);
  store_rows<T, DT>(dv, 1.f, 1.f, [&](int i) { return out_row(i, dv_out, dav, a.dim_v); },
                    a.dim_v);
}

template <typename T, int DT, bool kWg, int kDqWgs, bool kTma = false, bool kDq = (kDqWgs > 0)>
ffi::Error launch(cudaStream_t stream, const FnaArgs& a, const FnaPtrs& p, int64_t batch,
                  int64_t batch_total = 0) {
  const int smem =
      bwd_smem(DT, sizeof(T), kWg, kDqWgs, kTma, kDq) + (kDq && a.drpb_in_smem ? a.R * 4 : 0);
  const dim3 grid(static_cast<unsigned>(a.kv_tiles + a.add_tiles), a.kv_heads,
                  static_cast<unsigned>(batch));
  BoxTmaMaps maps = {};
  if constexpr (kTma)
    NATTEN_TRY(encode_box_maps(maps, p, tma_type<T>(), batch_total, a, /*grad=*/true));
  return launch_kernel<fna_bwd_kernel<T, DT, kWg, kDqWgs, kTma, kDq>>(
      kDq ? "fna backward (dk, dv, dq)"
          : (kTma ? "fna backward (dk, dv; TMA)" : "fna backward (dk, dv)"),
      kMaxBwdSmem, smem, grid, stream, a, p, bwd_threads(kDqWgs), maps);
}

}  // namespace

ffi::Error launch_backward_kv(cudaStream_t stream, ffi::DataType t, int dt, bool wgmma,
                              int dq_wgs, bool tma, const FnaArgs& a, const FnaPtrs& p,
                              int64_t batch, int64_t batch_total) {
  return dispatch_tile(t, dt, [&](auto tag, auto dtc) {
    using T = typename decltype(tag)::type;
    constexpr int DT = decltype(dtc)::value;
    if (!wgmma) return launch<T, DT, false, 0>(stream, a, p, batch);
    if (dq_wgs == 0) {
      // 128-key tiles (tiling.h plan_backward: head-dim tile 128 fed by the TMA): the walk for dk
      // and dv on two computing warpgroups and a producer.
      const bool two_wgs = a.kvlog[0] + a.kvlog[1] + a.kvlog[2] == kTileLog + 1;
      if constexpr (DT == 128) {
        if (two_wgs && tma)
          return launch<T, DT, true, 2, true, false>(stream, a, p, batch, batch_total);
      }
      if (two_wgs) return invalid("fused: 128-key tiles without the TMA dk / dv walk");
      if constexpr (DT >= 64) {
        if (tma) return launch<T, DT, true, 0, true>(stream, a, p, batch, batch_total);
      }
      return launch<T, DT, true, 0>(stream, a, p, batch);
    }
    if constexpr (DT <= 64) {  // the handler's schedule: the 128 tile runs the dq kernel
      if constexpr (DT == 64) {
        if (tma)
          return dq_wgs == 2 ? launch<T, DT, true, 2, true>(stream, a, p, batch, batch_total)
                             : launch<T, DT, true, 1, true>(stream, a, p, batch, batch_total);
      }
      return dq_wgs == 2 ? launch<T, DT, true, 2>(stream, a, p, batch)
                         : launch<T, DT, true, 1>(stream, a, p, batch);
    } else {
      return invalid("fused: no single-walk backward for head-dim tile 128");
    }
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
