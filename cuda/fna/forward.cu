// FNA forward (fna.cuh): o = softmax(scale * q.k + rpb) v over each query's neighborhood and the
// additional keys, lse = log(sum(exp(logits))). One CTA per (query tile, head, batch).
#include <type_traits>

#include "fna.cuh"
#include "launch.h"
#include "pipeline.cuh"

namespace natten {
namespace gpu {
namespace fna {
namespace {

// One step of the walk after its products s = q k^T (raw, unscaled): masks the tile as its kind
// needs (inside every window, masked, additional keys; rpb), then the online softmax: s becomes
// the weights exp2(x - m), m and l are updated, and alpha is the factor the accumulator takes
// (rescale) before this step's o += P v. `current` counts the spatial key tiles. Shared by the
// forward kernels (rows: tile_row<MT, kWg>). kInBranches: the online softmax runs at the end of
// each tile kind's branch (the warp-specialized kernel, which keeps an MMA in flight across it,
// see `online`); otherwise once after the branches join, so that the exponentials are one copy
// of code, not four (the synchronous kernels: four copies made the mma.sync forward 12% longer
// and 9% slower).
template <int MT, bool kWg, bool kInBranches>
__device__ __forceinline__ void softmax_step(const FnaArgs& a, const KeyWalk& walk,
                                             TileCounter& current, int j, const Box& qb,
                                             const float* rpb, const int* Win,
                                             float (&s)[MT][8][4], float (&m)[MT][2],
                                             float (&l)[MT][2], float (&alpha)[MT][2]) {
  auto frag_row = [](int mt, int i) { return tile_row<MT, kWg>(mt, i); };
  // The softmax takes x = s * mul (- m in a masked tile with rpb): base-2 logits, -inf outside
  // the neighborhood, and forms exp2(fma(s, mul, -base)): the scale is applied inside the fma, so
  // only the difference from the row's max is rounded, never the logit itself (an ulp of a
  // logit of 2^13 is 2^-10). mul = |scale_log2|, the scale's sign folded into s (exact), so
  // the largest s has the largest logit.
  // The online softmax (m: the row's largest logit so far; l: sum of exp2(x - m)). With
  // kInBranches it runs at the end of each tile kind's branch rather than after they join: a
  // warpgroup MMA in flight across the softmax (the warp-specialized forward's one-step-ahead
  // walk) is waited for at the first join of divergent paths (ptxas).
  auto online = [&](float mul, bool biased) {
  #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
  #pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
  #pragma unroll
        for (int nb = 0; nb < 8; ++nb)
          mx = fmaxf(mx, fmaxf(s[mt][nb][2 * i], s[mt][nb][2 * i + 1]));
        const float off = biased ? m[mt][i] : 0.f;  // what s is relative to
        mx = fmaf(quad_max(mx), mul, off);  // mul > 0
        const float m_new = fmaxf(m[mt][i], mx);
        const float base = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet
        alpha[mt][i] = fast_exp2(m[mt][i] - base);
        const float rel = off - base;  // exact where it matters (off near base)
        m[mt][i] = m_new;
        float sum = 0.f;
  #pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
          s[mt][nb][2 * i] = fast_exp2(fmaf(s[mt][nb][2 * i], mul, rel));
          s[mt][nb][2 * i + 1] = fast_exp2(fmaf(s[mt][nb][2 * i + 1], mul, rel));
          sum += s[mt][nb][2 * i] + s[mt][nb][2 * i + 1];
        }
        l[mt][i] = l[mt][i] * alpha[mt][i] + sum;
      }
    }
  };
  // The branches end in finish(mul, biased): the online softmax there, or the arguments kept for
  // the one after the join.
  float join_mul = a.scale_log2_abs;
  bool join_biased = false;
  auto finish = [&](float mul_, bool biased_) {
    if constexpr (kInBranches) {
      online(mul_, biased_);
    } else {
      join_mul = mul_;
      join_biased = biased_;
    }
  };
  const float mul = a.scale_log2_abs;  // with a bias, the masked tiles' s is x - m and mul 1
  if (j < walk.spatial) {
    int o[3];
    bool full;
    key_tile(a, walk, current, o, full);
    current.next(walk.n);
    if (full && rpb == nullptr) {
      if (a.scale_sign < 0.f) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][nb][e] = -s[mt][nb][e];
      }
      finish(mul, false);
    } else {
      // The thread's rows' windows ([start, length) per axis), read once per masked tile.
      auto read_windows = [&](int mt, int i, int (&w)[6]) {
#pragma unroll
        for (int e = 0; e < 6; ++e) w[e] = Win[frag_row(mt, i) * 6 + e];
      };
      // With a bias, s * mul + bias rounded to float32 would lose the bias and the logits'
      // differences once the logits are large: the tile holds x - m = fma(s, mul, -m) + bias
      // instead (m: the running max, finite from the start, see above), whose roundings are
      // ulps of x - m, and mul becomes 1. `bias`: std::true_type / std::false_type on wgmma
      // (compiled apart, so the common case runs no per-element branch) or a bool on mma.sync
      // (one path for both: compiled twice, those kernels spill).
      auto mask = [&](auto bias) {
        // Without a bias, on wgmma (two rows a thread): per row, the tile's keys inside its
        // window as a bit set (tile_mask), shifted to the thread's first column; element
        // (nb, c) is then bit 8 nb + c, a constant position, instead of a test per axis per
        // element.
        constexpr bool kBits = kWg && std::is_same_v<decltype(bias), std::false_type>;
        if constexpr (kBits) {
          const int first_col = frag_col(0, 0);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              int w[6];
              read_windows(mt, i, w);
              int lo[3], hi[3];
#pragma unroll
              for (int ax = 0; ax < 3; ++ax) {
                const int extent = 1 << a.kvlog[ax];
                lo[ax] = imin(imax(w[2 * ax] - o[ax], 0), extent);
                hi[ax] = imin(imax(w[2 * ax] + w[2 * ax + 1] - o[ax], 0), extent);
              }
              const uint64_t bits = tile_mask(a.kvlog, a.kv_rep, lo, hi) >> first_col;
              const unsigned half[2] = {static_cast<unsigned>(bits),
                                        static_cast<unsigned>(bits >> 32)};
#pragma unroll
              for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                  const bool in = (half[nb >> 2] >> (8 * (nb & 3) + c)) & 1u;
                  s[mt][nb][2 * i + c] = in ? s[mt][nb][2 * i + c] * a.scale_sign : -INFINITY;
                }
            }
          }
        } else {
          int wr[MT][2][6];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 2; ++i) read_windows(mt, i, wr[mt][i]);
#pragma unroll
          for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              int koff[3], kl[3];
              tile_offsets(frag_col(nb, c), a.kvlog, koff);
#pragma unroll
              for (int ax = 0; ax < 3; ++ax) kl[ax] = o[ax] + koff[ax];
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                  const int* w = wr[mt][i];
                  bool in = true;
#pragma unroll
                  for (int ax = 0; ax < 3; ++ax)
                    in = in && static_cast<unsigned>(kl[ax] - w[2 * ax]) <
                                   static_cast<unsigned>(w[2 * ax + 1]);
                  float x = s[mt][nb][2 * i + c] * a.scale_sign;
                  if (bias && in) {
                    int qo[3], qc[3];
                    tile_offsets(frag_row(mt, i), a.qlog, qo);
#pragma unroll
                    for (int ax = 0; ax < 3; ++ax) qc[ax] = qb.lo[ax] + qo[ax];
                    x = fmaf(x, mul, -m[mt][i]) + __ldg(rpb + rpb_index(a, qc, kl)) * kLog2e;
                  }
                  s[mt][nb][2 * i + c] = in ? x : -INFINITY;
                }
              }
            }
          }
        }
        finish(bias ? 1.f : mul, bias);
      };
      if constexpr (kWg) {
        if (rpb != nullptr)
          mask(std::true_type{});
        else
          mask(std::false_type{});
      } else {
        mask(rpb != nullptr);
      }
    }
  } else {
    const int s0 = (j - walk.spatial) * kRows;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[mt][nb][e] = s0 + frag_col(nb, e) < a.S ? s[mt][nb][e] * a.scale_sign : -INFINITY;
    finish(mul, false);
  }
  if constexpr (!kInBranches) online(join_mul, join_biased);
}

// acc *= alpha per row (the online softmax's correction, once the products into acc are done).
template <int DT, int MT>
__device__ __forceinline__ void rescale(float (&acc)[MT][DT / 8][4], const float (&alpha)[MT][2]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nb = 0; nb < DT / 8; ++nb) {
      acc[mt][nb][0] *= alpha[mt][0];
      acc[mt][nb][1] *= alpha[mt][0];
      acc[mt][nb][2] *= alpha[mt][1];
      acc[mt][nb][3] *= alpha[mt][1];
    }
}

// With rpb, the masked tiles form logits relative to the running max m, so m starts finite: at
// each row's logit of its own token's key, which is in its window (rpb implies non-causal,
// stride-1 windows), so at most the row's largest logit. (Any start does while l = 0; this one
// keeps x - m small.) Rows first, first + step, .. < rows of the query tile, into shared memory
// (in registers next to the walk's it costs spills); read at the walk's first step.
template <typename T>
__device__ __forceinline__ void self_logits(const FnaArgs& a, const FnaPtrs& p, const Box& qb,
                                            int64_t row0, int h, int kvh, int rows, int first,
                                            int step, float* SelfLogit) {
  const float* rpb = p.rpb + static_cast<int64_t>(h) * a.R;
  const T* q = static_cast<const T*>(p.q);
  const int zero[3] = {0, 0, 0};
  const float bias_self = __ldg(rpb + rpb_index(a, zero, zero)) * kLog2e;
  const T* k = static_cast<const T*>(p.k);
  for (int r = first; r < rows; r += step) {
    int qc[3];
    int64_t row;
    float dot = 0.f;
    if (query_row_at(a, qb, r, row0, h, qc, row)) {
      const int64_t tok = row0 + token_of(a, qb.grp, qc);
      const T* qr = q + (tok * a.heads + h) * a.dim;
      const T* kr = k + (tok * a.kv_heads + kvh) * a.dim;
      for (int c = 0; c < a.dim; c += 8) {
        const uint4 qv = __ldg(reinterpret_cast<const uint4*>(qr + c));
        const uint4 kv = __ldg(reinterpret_cast<const uint4*>(kr + c));
        const T* qe = reinterpret_cast<const T*>(&qv);
        const T* ke = reinterpret_cast<const T*>(&kv);
#pragma unroll
        for (int e = 0; e < 8; ++e)
          dot = fmaf(static_cast<float>(qe[e]), static_cast<float>(ke[e]), dot);
      }
      SelfLogit[r] = fmaf(dot, a.scale_log2, bias_self);
    } else {
      SelfLogit[r] = 0.f;
    }
  }
}

// Which keys warpgroup wg's rows of query tile qb reach, in the warp-specialized forward: rows
// 64 wg .. 64 wg + 63 of a 128-token tile are one half of it along its first axis of more than
// one token (the row index is row-major over the axes: its bit 6 belongs to that axis), so on
// every other axis they reach the whole tile's key range, and on that one (`axis`) the local
// keys [lo, hi). A tile of 64 tokens or fewer is all warpgroup 0's (axis = -1: no limit). False
// when the warpgroup has no row inside the problem.
__device__ __forceinline__ bool own_key_range(const FnaArgs& a, const Box& qb, int wg, int& axis,
                                              int& lo, int& hi) {
  axis = -1;
  lo = hi = 0;
  if (a.qlog[0] + a.qlog[1] + a.qlog[2] <= kTileLog) return wg == 0;
  axis = a.qlog[0] > 0 ? 0 : (a.qlog[1] > 0 ? 1 : 2);
  bool any = true;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {  // (constant indices keep qb in registers)
    if (ax != axis) continue;
    const int half = 1 << (a.qlog[ax] - 1);
    const int first = qb.lo[ax] + wg * half, last = imin(first + half, qb.hi[ax]);
    any = first < last;
    if (any) {
      lo = win_start(a.ax[ax], qb.lg[ax], first);
      hi = win_end(a.ax[ax], qb.lg[ax], last - 1);
    }
  }
  return any;
}

// The walk's end: o = acc / l, lse = (m + log2 l) ln 2 and, for a gradient, the statistics and o
// unrounded (softmax.cuh, "softmax statistics"), for the thread's rows (tile_row<MT, kWg>).
template <typename T, int DT, int MT, bool kWg>
__device__ __forceinline__ void store_outputs(const FnaArgs& a, const FnaPtrs& p, const Box& qb,
                                              int64_t row0, int h, float (&m)[MT][2],
                                              float (&l)[MT][2], float (&acc)[MT][DT / 8][4]) {
  auto frag_row = [](int mt, int i) { return tile_row<MT, kWg>(mt, i); };
  const int lane = threadIdx.x & 31;
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[mt][i] = quad_sum(l[mt][i]);
      inv[i] = l[mt][i] > 0.f ? 1.f / l[mt][i] : 0.f;
    }
    int64_t rows[2];  // global row index (token * heads + h), -1 outside the problem
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int qc[3];
      query_row_at(a, qb, frag_row(mt, i), row0, h, qc, rows[i]);
    }
    store_rows<T, DT>(acc[mt], inv[0], inv[1],
                      [&](int i) -> T* { return rows[i] < 0 ? nullptr : out + rows[i] * a.dim_v; },
                      a.dim_v);
    if (p.out_o32 != nullptr)
      store_rows<float, DT>(acc[mt], inv[0], inv[1],
                            [&](int i) -> float* {
                              return rows[i] < 0 ? nullptr : p.out_o32 + rows[i] * a.dim_v;
                            },
                            a.dim_v);
    if ((lane & 3) == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (rows[i] < 0) continue;
        const float log2_l = log2f(l[mt][i]);
        p.out_lse[rows[i]] = (m[mt][i] + log2_l) * kLn2;
        if (p.out_stats != nullptr)
          p.out_stats[rows[i]] = m[mt][i] == -INFINITY ? make_float2(0.f, -INFINITY)
                                                       : make_float2(m[mt][i], log2_l);
      }
    }
  }
}

// MT m16 tiles per warp: the query tile holds 64 * MT tokens. kWg: the products run on Hopper's
// warpgroup MMA (sm_90a; q and the key tiles in core-matrix layout, natten/wgmma.cuh; the four
// warps form one warpgroup that owns MT m64 row blocks), otherwise on mma.sync (ldmatrix operands
// from padded tiles; warp w owns rows 16 MT w ..). Masking and softmax are the same code: both
// leave a warp's scores in the mma.m16n8k16 C layout.
template <typename T, int DT, int MT, bool kWg>
__global__ void __launch_bounds__(kThreads, fwd_min_ctas(DT, MT, kWg)) fna_fwd_kernel(const FnaArgs a, const FnaPtrs p) {
  constexpr int kLd = kWg ? DT : DT + 8;  // elements per tile row (core matrices: no padding)
  constexpr int kQRows = kRows * MT;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + kQRows * kLd;      // [2][kRows][kLd]
  T* Vs = Ks + 2 * kRows * kLd;   // [2][kRows][kLd]
  int* Win = reinterpret_cast<int*>(Vs + 2 * kRows * kLd);  // [kQRows][3 axes][start, length]
  float* SelfLogit = reinterpret_cast<float*>(Win + kQRows * 6);  // [kQRows], with rpb

  Box qb;
  if (!tile_box(a, a.qlog, a.q_tpg, a.q_units, blockIdx.x, qb)) return;  // whole CTA
  const int h = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z), kvh = h / a.group;
  const int warp = threadIdx.x >> 5;
  const T* q = static_cast<const T*>(p.q);
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;

  {
    const TileRows<DT, kQRows, kWg> qrows(a, a.qlog);
    const int lim[3] = {qb.hi[0] - qb.lo[0], qb.hi[1] - qb.lo[1], qb.hi[2] - qb.lo[2]};
    qrows.stage(Qs, q, row0, token_of(a, qb.grp, qb.lo), lim, a.heads, h, a.dim);
    cp_async_commit();
  }

  const KeyWalk walk = key_walk(a, qb);
  KeyStager<T, DT, kRows, kWg> keys(a);
  auto stage_keys = [&](int j, int buf) {
    keys(a, p, walk, qb, b, row0, kvh, j, Ks + buf * kRows * kLd, Vs + buf * kRows * kLd);
  };

  fill_windows(a, qb, kQRows, Win);
  auto frag_row = [](int mt, int i) { return tile_row<MT, kWg>(mt, i); };
  const float* rpb = a.R ? p.rpb + static_cast<int64_t>(h) * a.R : nullptr;
  if (rpb != nullptr)
    self_logits<T>(a, p, qb, row0, h, kvh, kQRows, threadIdx.x, kThreads, SelfLogit);

  float acc[MT][DT / 8][4];
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < DT / 8; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }
  // mma.sync: query fragments stay in registers for the whole walk when they fit (DT <= 64).
  constexpr bool kQInRegs = !kWg && DT <= 64;
  unsigned qf[kQInRegs ? MT : 1][kQInRegs ? DT / 16 : 1][4];

  TileCounter current;  // the spatial key tile being computed
  current.reset();
  stage_keys(0, 0);
  for (int j = 0; j < walk.total; ++j) {
    key_step_ready<kWg>(j, walk.total, stage_keys);
    if (j == 0 && rpb != nullptr) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i) m[mt][i] = SelfLogit[frag_row(mt, i)];
    }
    if constexpr (kQInRegs) {
      if (j == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int kk = 0; kk < DT / 16; ++kk)
            a_frag<T, DT>(qf[mt][kk], Qs, warp * 16 * MT + mt * 16, kk);
      }
    }
    const T* ks = Ks + (j & 1) * kRows * kLd;
    const T* vs = Vs + (j & 1) * kRows * kLd;

    float s[MT][8][4];
    if constexpr (kQInRegs) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) s[mt][nb][0] = s[mt][nb][1] = s[mt][nb][2] = s[mt][nb][3] = 0.f;
      scores_regs<T, DT, MT>(s, qf, ks);
    } else {
      tile_scores<T, DT, MT, kWg>(s, Qs, ks);
    }

    float alpha[MT][2];
    softmax_step<MT, kWg, false>(a, walk, current, j, qb, rpb, Win, s, m, l, alpha);
    rescale<DT, MT>(acc, alpha);
    tile_apply<T, DT, MT, kWg>(acc, s, vs);
    __syncthreads();  // the next iteration overwrites this buffer
  }

  store_outputs<T, DT, MT, kWg>(a, p, qb, row0, h, m, l, acc);
}

// Hopper, warp-specialized (fna.cuh, "warp-specialized forward"): warpgroup 2, the producer, stages
// the 128-token query tile, then each key tile of the walk into a ring of stages (pipeline.cuh);
// warpgroups 0 and 1 own 64 query rows each and compute on every key tile: s = q k^T and o += P v
// on wgmma, with softmax_step's masking and online softmax between them. The computing warpgroups
// never stage and never wait for each other: each waits until a stage is full and releases it
// once its products have read it.
template <typename T, int DT>
__global__ void __launch_bounds__(kFwdWsThreads, fwd_ws_min_ctas(DT))
    fna_fwd_ws_kernel(const FnaArgs a, const FnaPtrs p) {
  constexpr int kQRows = kFwdWsQRows;
  constexpr int kStages = fwd_ws_stages(DT);
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);     // [kQRows][DT], core matrices (natten/wgmma.cuh)
  T* Ks = Qs + kQRows * DT;               // [kStages][kRows][DT]
  T* Vs = Ks + kStages * kRows * DT;      // [kStages][kRows][DT]
  int* Win = reinterpret_cast<int*>(Vs + kStages * kRows * DT);  // [kQRows][3 axes][start, length]
  float* SelfLogit = reinterpret_cast<float*>(Win + kQRows * 6);  // [kQRows], with rpb
  uint64_t* bars = reinterpret_cast<uint64_t*>(SelfLogit + kQRows);  // full, empty, query tile

  Box qb;
  if (!tile_box(a, a.qlog, a.q_tpg, a.q_units, blockIdx.x, qb)) return;  // whole CTA
  const int h = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z), kvh = h / a.group;
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;
  const StageRing<kStages> ring{bars, bars + kStages};
  uint64_t* const q_full = bars + 2 * kStages;
  if (threadIdx.x == 0) {
    ring.init(kThreads, 2 * kThreads);
    mbar_init(q_full, kThreads);
  }
  __syncthreads();

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
  const int wg = threadIdx.x / kThreads;
  const KeyWalk walk = key_walk(a, qb);
  fill_windows(a, qb, kQRows, Win);
  const float* rpb = a.R ? p.rpb + static_cast<int64_t>(h) * a.R : nullptr;
  if (rpb != nullptr)
    self_logits<T>(a, p, qb, row0, h, kvh, kQRows, threadIdx.x, 2 * kThreads, SelfLogit);
  role_sync(1, 2 * kThreads);

  float acc[1][DT / 8][4];
  float m[1][2] = {{-INFINITY, -INFINITY}}, l[1][2] = {{0.f, 0.f}};
#pragma unroll
  for (int i = 0; i < DT / 8; ++i) acc[0][i][0] = acc[0][i][1] = acc[0][i][2] = acc[0][i][3] = 0.f;
  if (rpb != nullptr) {
#pragma unroll
    for (int i = 0; i < 2; ++i) m[0][i] = SelfLogit[tile_row<1, true>(0, i)];
  }
  const T* qs = Qs + wg * kRows * DT;
  // The warpgroup's rows are half of the query tile: the spatial key tiles of the walk (over the
  // whole tile's key box) outside its own rows' windows are released without computing, so the
  // two warpgroups share the staging of a 128-token tile but compute about what 64-token tiles
  // would.
  int own_axis, own_lo, own_hi;
  const bool own_rows = own_key_range(a, qb, wg, own_axis, own_lo, own_hi);
  TileCounter current;  // the spatial key tile whose softmax comes next
  current.reset();
  // Whether step j is computed: a warpgroup with rows computes every tile of additional keys and
  // the spatial tiles that meet its rows' windows on the split axis (own_key_range).
  auto computed = [&](int j) {
    if (!own_rows) return false;
    if (j >= walk.spatial || own_axis < 0) return true;
    int o = 0, t = 0;  // the tile's keys on that axis (constant indices keep arrays in registers)
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {
      if (ax == own_axis) {
        o = walk.box_lo[ax] + (current.j[ax] << a.kvlog[ax]);
        t = 1 << a.kvlog[ax];
      }
    }
    return o < own_hi && o + t > own_lo;
  };
  // The first computed step in [j, end) (its stage full), releasing the skipped ones; end if none.
  auto next_step = [&](int j, int end) {
    for (; j < end; ++j) {
      ring.wait(j);
      if (computed(j)) break;
      if (j < walk.spatial) current.next(walk.n);
      ring.release(j);
    }
    return j;
  };
  float s[1][8][4];  // the scores, then the weights P, of the step whose product comes next
  auto issue_scores = [&](float (&sc)[1][8][4], int j) {
    const T* ks = Ks + ring.stage(j) * kRows * DT;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < DT / 16; ++kk)
      wgmma_ss64<T>(&sc[0][0][0], smem_desc(qs + kk * 128, 128, DT * 16),
                    smem_desc(ks + kk * 128, 128, DT * 16), kk);
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
    for (int kk = 0; kk < 4; ++kk)
      wgmma_rs<T, DT, 1>(&acc[0][0][0], pa[kk], smem_desc(vs + kk * 16 * DT, DT * 16, 128), 1);
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
    softmax_step<1, true, true>(a, walk, current, n, qb, rpb, Win, s_next, m, l, alpha);
    wgmma_wait<0>();
    reg_fence(acc);
    if (j >= 0) ring.release(j);  // both products that read step j's stage have completed
    rescale<DT, 1>(acc, alpha);
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][nb][e] = s_next[0][nb][e];
    j = n;
    next = n + 1;
  }
  store_outputs<T, DT, 1, true>(a, p, qb, row0, h, m, l, acc);
}

template <typename T, int DT, bool kWg>
ffi::Error launch(cudaStream_t stream, const FnaArgs& a, const FnaPtrs& p, int64_t batch) {
  const dim3 grid(static_cast<unsigned>(a.q_tiles), a.heads, static_cast<unsigned>(batch));
  if constexpr (kWg && fwd_warp_specialized(DT)) {
    constexpr int kSmem = fwd_ws_smem(DT, sizeof(T));
    return launch_kernel<fna_fwd_ws_kernel<T, DT>>("fna forward", kSmem, kSmem, grid, stream, a,
                                                    p, kFwdWsThreads);
  } else {
    constexpr int kMT = fwd_m_tiles(DT, kWg);
    constexpr int kSmem = fwd_smem(DT, sizeof(T), kMT, kWg);
    return launch_kernel<fna_fwd_kernel<T, DT, kMT, kWg>>("fna forward", kSmem, kSmem, grid,
                                                         stream, a, p);
  }
}

}  // namespace

ffi::Error launch_forward(cudaStream_t stream, ffi::DataType t, int dt, bool wgmma,
                          const FnaArgs& a, const FnaPtrs& p, int64_t batch) {
  return dispatch_tile(t, dt, [&](auto tag, auto dtc) {
    using T = typename decltype(tag)::type;
    constexpr int DT = decltype(dtc)::value;
    return wgmma ? launch<T, DT, true>(stream, a, p, batch) : launch<T, DT, false>(stream, a, p, batch);
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
