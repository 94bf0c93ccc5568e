// FNA backward, query side, on Hopper for the problems the box TMA forward serves (tiling.h
// forward_on_box_tma): the dq kernel of the two-kernel schedule (backward_dq.cu's walk: per query
// tile, every key tile of its window box, P recomputed from the forward's softmax statistics,
// dS = P (dP - delta), dq = scale * dS k, d-rpb = the sum of dS per relative offset) in the
// warp-specialized forward's shape
// (box_roles.cuh): one producer thread copies q and do of the 128-token query tile once, then k
// and v of each 64-key tile, by the TMA into a ring of stages; two computing warpgroups of 64
// query rows each compute on every stage their rows need. dq is written once per row, so the
// kernel is deterministic (it also serves fused_config(deterministic=True), where the caller
// sums d-rpb in a fixed order: skip_drpb). d-rpb is summed per CTA in shared memory when it fits
// (drpb_in_smem), then added with one atomic per entry; else atomics on the output.
#include "box_roles.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

template <typename T, int DT>
__global__ void __launch_bounds__(kFwdWsThreads, 1)
    fna_dq_tma_kernel(const FnaArgs a, const FnaPtrs p, const __grid_constant__ BoxTmaMaps maps) {
  constexpr int kQRows = kFwdWsQRows;
  constexpr int kStages = kDqTmaStages;
  // 64-column blocks of the query-side tiles (kQBlock elements) and of each key tile (kKBlock),
  // 128-byte swizzle: the layout the TMA writes (tensor_maps.h).
  constexpr int kQBlock = kQRows * 64, kKBlock = kRows * 64;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // (The swizzle atoms need 1024-byte alignment: dq_tma_smem added the slack.)
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  T* Qs = reinterpret_cast<T*>(smem);  // [DT / 64][kQRows][64]
  T* Os = Qs + kQRows * DT;            // do, the same
  T* Ks = Os + kQRows * DT;            // [kStages][DT / 64][kRows][64]
  T* Vs = Ks + kStages * kRows * DT;
  int* Win = reinterpret_cast<int*>(Vs + kStages * kRows * DT);  // [kQRows][3 axes][start, length]
  uint64_t* bars = reinterpret_cast<uint64_t*>(Win + kQRows * 6);  // full, empty, q
  float* drpb_s = reinterpret_cast<float*>(bars + 2 * kStages + 1);  // [R] when drpb_in_smem

  Box qb;
  if (!tile_box(a, a.qlog, a.q_tpg, a.q_units, blockIdx.x, qb)) return;  // whole CTA
  const int h = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z), kvh = h / a.group;
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;
  const StageRing<kStages> ring{bars, bars + kStages};
  uint64_t* const q_full = bars + 2 * kStages;
  ring.setup(1, 2 * kThreads, q_full, 1, /*tma=*/true);

  if (threadIdx.x >= 2 * kThreads) {  // the producer: one thread copies
    regs_shrink<fwd_ws_producer_regs(DT)>();
    if (threadIdx.x == 2 * kThreads) {
      T* const q_dst[2] = {Qs, Os};
      produce_box_tiles<T, DT, kQRows, kStages, true>(a, maps, qb, b, h, kvh, q_dst, q_full, Ks,
                                                     Vs, ring);
    }
    return;
  }
  regs_grow<fwd_ws_consumer_regs(DT)>();

  // The computing warpgroups. Warpgroup wg owns query rows 64 wg .. 64 wg + 63 (tile_row<1,
  // true>); read through a shuffle, so the compiler knows it is warp-uniform and keeps the
  // descriptor math in uniform registers.
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / kThreads, 0);
  const KeyWalk walk = key_walk(a, qb);
  fill_windows(a, qb, kQRows, Win);
  const float* rpb = a.R ? p.rpb + static_cast<int64_t>(h) * a.R : nullptr;
  const bool want_drpb = rpb != nullptr && !a.skip_drpb;
  float* drpb_g = want_drpb ? p.drpb + (static_cast<int64_t>(b) * a.heads + h) * a.R : nullptr;
  if (want_drpb && a.drpb_in_smem)
    for (int i = threadIdx.x; i < a.R; i += 2 * kThreads) drpb_s[i] = 0.f;
  float* drpb = a.drpb_in_smem ? drpb_s : drpb_g;
  role_sync(1, 2 * kThreads);
  // The thread's two rows: global row (-1 outside the problem), local coordinates (rpb), the
  // forward's statistics, delta. A row outside the problem gets log2_l = +inf: its weights are 0
  // on every path.
  int64_t grow[2];
  int qc[2][3];
  float2 stats[2];
  float delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const bool ok = query_row_at(a, qb, tile_row<1, true>(0, i), row0, h, qc[i], grow[i]);
    stats[i] = ok ? p.stats[grow[i]] : make_float2(0.f, INFINITY);
    delta[i] = ok ? p.delta[grow[i]] : 0.f;
  }
  float acc[1][DT / 8][4];
#pragma unroll
  for (int nb = 0; nb < DT / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[0][nb][e] = 0.f;
  // wgmma's operand descriptors, built once and moved per stage and k16 step with desc_add
  // (building one from an address costs ~10 uniform instructions, which each wgmma then waits
  // for): the warpgroup's q and do rows (in each 64-column block), stage 0's k and v K-major (the
  // scores) and k MN-major (dq: 16 keys a k16 step, 2048 bytes into each 64-column block).
  const uint64_t q_desc = smem_desc_sw128(Qs + wg * kRows * 64, 16, 1024);
  const uint64_t o_desc = smem_desc_sw128(Os + wg * kRows * 64, 16, 1024);
  const uint64_t k_desc = smem_desc_sw128(Ks, 16, 1024), v_desc = smem_desc_sw128(Vs, 16, 1024);
  const uint64_t k_mn = smem_desc_sw128(Ks, kKBlock * 2, 1024);
  const OwnKeys own(a, qb, wg);  // the steps the warpgroup's rows need
  TileCounter current;
  current.reset();
  mbar_wait(q_full, 0);
  for (int j = 0; j < walk.spatial; ++j) {  // (the TMA problems have no additional keys)
    ring.wait(j);
    if (!own.computed(a, walk, current, j)) {
      current.next(walk.n);
      ring.release(j);
      continue;
    }
    int o[3];
    bool full;
    key_tile(a, walk, current, o, full);
    current.next(walk.n);
    const int stage = ring.stage(j) * kRows * DT * 2;  // the stage's k, v: bytes from stage 0's

    // s = q k^T and dP = do v^T, two commit groups: the weights are formed from s while dP is
    // in flight.
    float s[1][8][4], dp[1][8][4];
    wgmma_fence();
    wg_issue_scores_sw128<T, DT>(s[0], q_desc, kQBlock * 2, desc_add(k_desc, stage), kKBlock * 2);
    wgmma_commit();
    wg_issue_scores_sw128<T, DT>(dp[0], o_desc, kQBlock * 2, desc_add(v_desc, stage), kKBlock * 2);
    wgmma_commit();
    wgmma_wait<1>();  // s (committed first)
    reg_fence(s);
    // P (softmax.cuh softmax_weight_exp2), 0 outside the rows' windows: tiles inside every
    // window of the query tile (`full`) test nothing; the others test each row's window as a
    // bit set (walk.cuh window_bits). With rpb each weight takes its bias (rpb_index of the
    // row's and the key's local coordinates), and d-rpb its dS below.
    auto bias_index = [&](int i, int nb, int c) {
      int off[3], kl[3];
      tile_offsets(frag_col(nb, c), a.kvlog, off);
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) kl[ax] = o[ax] + off[ax];
      return rpb_index(a, qc[i], kl);
    };
    if (rpb != nullptr) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint64_t bits = full ? ~uint64_t{0} : window_bits(a, Win + tile_row<1, true>(0, i) * 6, o);
        const unsigned half[2] = {static_cast<unsigned>(bits), static_cast<unsigned>(bits >> 32)};
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const bool in = grow[i] >= 0 && ((half[nb >> 2] >> (8 * (nb & 3) + c)) & 1u);
            const float bias2 = in ? __ldg(rpb + bias_index(i, nb, c)) * kLog2e : 0.f;
            const float x =
                softmax_weight_exp2(s[0][nb][2 * i + c], a.scale_log2, stats[i], bias2);
            s[0][nb][2 * i + c] = in ? fast_exp2(x) : 0.f;
          }
      }
    } else if (full) {
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[0][nb][e] = fast_exp2(softmax_weight_exp2(s[0][nb][e], a.scale_log2, stats[e >> 1]));
    } else {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint64_t bits = window_bits(a, Win + tile_row<1, true>(0, i) * 6, o);
        const unsigned half[2] = {static_cast<unsigned>(bits), static_cast<unsigned>(bits >> 32)};
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const bool in = (half[nb >> 2] >> (8 * (nb & 3) + c)) & 1u;
            const float x = softmax_weight_exp2(s[0][nb][2 * i + c], a.scale_log2, stats[i]);
            s[0][nb][2 * i + c] = in ? fast_exp2(x) : 0.f;
          }
      }
    }
    wgmma_wait<0>();  // dP
    reg_fence(dp);
    // dS = P (dP - delta), packed as the A operand of dq += dS k (k MN-major: 16 keys a k16
    // step, 2048 bytes into each 64-column block).
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][nb][e] *= dp[0][nb][e] - delta[e >> 1];
    if (want_drpb) {  // (dS is 0 outside the neighborhood: those adds are skipped)
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (s[0][nb][e] != 0.f) atomicAdd(drpb + bias_index(e >> 1, nb, e & 1), s[0][nb][e]);
    }
    unsigned da[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) pack_a<T>(da[kk], s[0], kk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_rs<T, DT, 1>(&acc[0][0][0], da[kk], desc_add(k_mn, stage + kk * 2048), 1);
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(acc);
    ring.release(j);  // every product that read the stage has completed
  }

  T* dq = static_cast<T*>(p.dq);
  store_rows<T, DT>(acc[0], a.scale, a.scale,
                    [&](int i) -> T* { return grow[i] < 0 ? nullptr : dq + grow[i] * a.dim; },
                    a.dim);
  if (want_drpb && a.drpb_in_smem) {
    role_sync(1, 2 * kThreads);
    for (int i = threadIdx.x; i < a.R; i += 2 * kThreads)
      if (drpb_s[i] != 0.f) atomicAdd(drpb_g + i, drpb_s[i]);
  }
}

}  // namespace

ffi::Error launch_backward_dq_tma(cudaStream_t stream, ffi::DataType t, int dt, const FnaArgs& a,
                                  const FnaPtrs& p, int64_t batch, int64_t batch_total) {
  return dispatch_tile(t, dt, [&](auto tag, auto dtc) -> ffi::Error {
    using T = typename decltype(tag)::type;
    constexpr int DT = decltype(dtc)::value;
    if constexpr (DT >= 64) {
      BoxTmaMaps maps = {};
      NATTEN_TRY(encode_box_maps(maps, p, tma_type<T>(), batch_total, a, /*grad=*/true));
      const int smem = dq_tma_smem(DT, sizeof(T)) + (a.drpb_in_smem ? a.R * 4 : 0);
      const dim3 grid(static_cast<unsigned>(a.q_tiles), a.heads, static_cast<unsigned>(batch));
      return launch_kernel<fna_dq_tma_kernel<T, DT>>("fna backward dq (TMA)", kMaxDqTmaSmem,
                                                    smem, grid, stream, a, p, kFwdWsThreads,
                                                    maps);
    } else {
      return invalid("fused: the TMA dq kernel serves head-dim tiles 64 and 128");
    }
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
