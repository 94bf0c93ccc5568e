// FNA backward, query side (fna.cuh; deterministic mode and mma.sync): per query tile the
// forward's walk over key tiles recomputing P from the forward's softmax statistics (softmax.cuh,
// softmax_weight_exp2), dS = P (do.v - delta), dq = scale * dS k, and d-rpb = sum of dS per
// relative offset.
#include <type_traits>

#include "fna.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

// MT m16 tiles per warp: the query tile holds 64 * MT tokens (as in the forward). kWg: wgmma on
// core-matrix tiles (Hopper), else mma.sync (forward.cu explains both).
template <typename T, int DT, int MT, bool kWg>
__global__ void __launch_bounds__(kThreads, dq_min_ctas(DT, kWg))
    fna_dq_kernel(const FnaArgs a, const FnaPtrs p) {
  constexpr int kLd = kWg ? DT : DT + 8;
  constexpr int kQRows = kRows * MT;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Os = Qs + kQRows * kLd;      // do
  T* Ks = Os + kQRows * kLd;      // [2][kRows][kLd]
  T* Vs = Ks + 2 * kRows * kLd;   // [2][kRows][kLd]
  int* Win = reinterpret_cast<int*>(Vs + 2 * kRows * kLd);  // [kQRows][3 axes][start, length]
  float* drpb_s = reinterpret_cast<float*>(Win + kQRows * 6);  // [R] when drpb_in_smem

  Box qb;
  if (!tile_box(a, a.qlog, a.q_tpg, a.q_units, blockIdx.x, qb)) return;  // whole CTA
  const int h = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z), kvh = h / a.group;
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;

  const T* q = static_cast<const T*>(p.q);
  const T* d_o = static_cast<const T*>(p.d_o);
  {
    const TileRows<DT, kQRows, kWg> qrows(a, a.qlog);
    const int lim[3] = {qb.hi[0] - qb.lo[0], qb.hi[1] - qb.lo[1], qb.hi[2] - qb.lo[2]};
    const int64_t tok0 = token_of(a, qb.grp, qb.lo);
    qrows.stage(Qs, q, row0, tok0, lim, a.heads, h, a.dim);
    qrows.stage(Os, d_o, row0, tok0, lim, a.heads, h, a.dim_v);
    cp_async_commit();
  }

  float* drpb_g = a.R ? p.drpb + (static_cast<int64_t>(b) * a.heads + h) * a.R : nullptr;
  if (a.R && a.drpb_in_smem)
    for (int i = threadIdx.x; i < a.R; i += kThreads) drpb_s[i] = 0.f;
  float* drpb = a.drpb_in_smem ? drpb_s : drpb_g;

  const KeyWalk walk = key_walk(a, qb);
  KeyStager<T, DT, kRows, kWg> keys(a);
  auto stage_keys = [&](int j, int buf) {
    keys(a, p, walk, qb, b, row0, kvh, j, Ks + buf * kRows * kLd, Vs + buf * kRows * kLd);
  };

  fill_windows(a, qb, kQRows, Win);
  auto frag_row = [](int mt, int i) { return tile_row<MT, kWg>(mt, i); };
  // The thread's rows: global row index (-1 outside the problem), softmax statistics, delta.
  int64_t grow[MT][2];
  float2 stats[MT][2];
  float delta[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int qc[3];
      const bool ok = query_row_at(a, qb, frag_row(mt, i), row0, h, qc, grow[mt][i]);
      stats[mt][i] = ok ? p.stats[grow[mt][i]] : make_float2(0.f, 0.f);
      delta[mt][i] = ok ? p.delta[grow[mt][i]] : 0.f;
    }
  }
  const float* rpb = a.R ? p.rpb + static_cast<int64_t>(h) * a.R : nullptr;
  const bool want_drpb = rpb != nullptr && !a.skip_drpb;

  float acc[MT][DT / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < DT / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][i][e] = 0.f;

  TileCounter current;  // the spatial key tile being computed
  current.reset();
  double_buffered_walk<kWg>(walk.total, stage_keys, [&](int j, int buf) {
    const T* ks = Ks + buf * kRows * kLd;
    const T* vs = Vs + buf * kRows * kLd;

    float s[MT][8][4], dp[MT][8][4];
    tile_scores<T, DT, MT, kWg>(s, Qs, ks);
    tile_scores<T, DT, MT, kWg>(dp, Os, vs);

    const KeyStep step = key_step(a, walk, current, j, kRows);
    const bool spatial = step.spatial, full = step.full;
    const int (&o)[3] = step.o;
    const int s0 = step.s0;
    // dS = P (dP - delta), P = softmax_weight_exp2; 0 outside the neighborhood. Compiled three
    // ways, picked per tile: kMask = false for spatial tiles inside every window of the query
    // tile (no per-element test), kBias for rpb / d-rpb.
    auto weights = [&](auto mask_tag, auto bias_tag) {
      constexpr bool kMask = decltype(mask_tag)::value, kBias = decltype(bias_tag)::value;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          int kl[3] = {0, 0, 0};
          if (kMask || kBias) {
            if (spatial) {
              int off[3];
              tile_offsets(frag_col(nb, c), a.kvlog, off);
#pragma unroll
              for (int ax = 0; ax < 3; ++ax) kl[ax] = o[ax] + off[ax];
            }
          }
          const bool add_in = !spatial && s0 + frag_col(nb, c) < a.S;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              bool in = grow[mt][i] >= 0;
              if constexpr (kMask) {
                if (spatial) {
                  const int* w = Win + frag_row(mt, i) * 6;
#pragma unroll
                  for (int ax = 0; ax < 3; ++ax)
                    in = in && static_cast<unsigned>(kl[ax] - w[2 * ax]) <
                                   static_cast<unsigned>(w[2 * ax + 1]);
                } else {
                  in = in && add_in;
                }
              }
              const int e = 2 * i + c;
              float bias2 = 0.f;
              int ri = 0;
              if constexpr (kBias) {
                if (spatial && rpb != nullptr && in) {
                  int qo[3], qc[3];
                  tile_offsets(frag_row(mt, i), a.qlog, qo);
#pragma unroll
                  for (int ax = 0; ax < 3; ++ax) qc[ax] = qb.lo[ax] + qo[ax];
                  ri = rpb_index(a, qc, kl);
                  bias2 = __ldg(rpb + ri) * kLog2e;
                }
              }
              const float pr = in ? fast_exp2(softmax_weight_exp2(s[mt][nb][e], a.scale_log2,
                                                                  stats[mt][i], bias2))
                                  : 0.f;
              const float ds = pr * (dp[mt][nb][e] - delta[mt][i]);
              s[mt][nb][e] = ds;
              if constexpr (kBias) {
                if (spatial && want_drpb && in) atomicAdd(drpb + ri, ds);
              }
            }
          }
        }
      }
    };
    if (rpb != nullptr)
      weights(std::true_type{}, std::true_type{});
    else if (spatial && full)
      weights(std::false_type{}, std::false_type{});
    else
      weights(std::true_type{}, std::false_type{});
    tile_apply<T, DT, MT, kWg>(acc, s, ks);
  });

  T* dq = static_cast<T*>(p.dq);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    store_rows<T, DT>(acc[mt], a.scale, a.scale,
                      [&](int i) -> T* {
                        return grow[mt][i] < 0 ? nullptr : dq + grow[mt][i] * a.dim;
                      },
                      a.dim);
  if (want_drpb && a.drpb_in_smem) {
    __syncthreads();
    for (int i = threadIdx.x; i < a.R; i += kThreads)
      if (drpb_s[i] != 0.f) atomicAdd(drpb_g + i, drpb_s[i]);
  }
}

template <typename T, int DT, bool kWg>
ffi::Error launch(cudaStream_t stream, const FnaArgs& a, const FnaPtrs& p, int64_t batch) {
  constexpr int kMT = dq_m_tiles(DT, kWg);
  const int smem = dq_smem(DT, sizeof(T), kMT, kWg) + (a.drpb_in_smem ? a.R * 4 : 0);
  const dim3 grid(static_cast<unsigned>(a.q_tiles), a.heads, static_cast<unsigned>(batch));
  return launch_kernel<fna_dq_kernel<T, DT, kMT, kWg>>("fna backward dq", kMaxDqSmem, smem, grid,
                                                      stream, a, p);
}

}  // namespace

ffi::Error launch_backward_dq(cudaStream_t stream, ffi::DataType t, int dt, bool wgmma,
                              const FnaArgs& a, const FnaPtrs& p, int64_t batch) {
  return dispatch_tile(t, dt, [&](auto tag, auto dtc) {
    using T = typename decltype(tag)::type;
    constexpr int DT = decltype(dtc)::value;
    return wgmma ? launch<T, DT, true>(stream, a, p, batch)
                 : launch<T, DT, false>(stream, a, p, batch);
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
