// The forward kernels' shared steps (forward.cu: the synchronous kernels; forward_ws.cu: the
// warp-specialized one): a walk step's masking and online softmax, the accumulator's rescale, the
// rows' own-key logits (rpb) and the epilogue.
#pragma once

#include <type_traits>

#include "fna.cuh"

namespace natten {
namespace gpu {
namespace fna {

// The online softmax of one step's scores s (NB n8 blocks of keys; a thread holds two rows per
// m16 tile): s = x / mul is turned into the weights exp2(x - m_new), m (each row's largest logit
// so far, base 2) is updated, and alpha = exp2(m_old - m_new) is the factor the accumulators take
// before this step's products add to them (rescale). `biased`: s holds x - m already (the masked
// tiles with rpb, mul = 1). A row with no key yet (every x = -inf) keeps m = -inf and gets
// weights 0. The scale is applied inside the fma, so only the difference from the row's max is
// rounded, never the logit itself (an ulp of a logit of 2^13 is 2^-10); mul > 0 (the scale's
// sign is folded into s by the caller), so the largest s has the largest logit.
template <int MT, int NB>
__device__ __forceinline__ void online_softmax(float (&s)[MT][NB][4], float (&m)[MT][2],
                                               float (&alpha)[MT][2], float mul, bool biased) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) mx = fmaxf(mx, fmaxf(s[mt][nb][2 * i], s[mt][nb][2 * i + 1]));
      const float off = biased ? m[mt][i] : 0.f;  // what s is relative to
      mx = fmaf(quad_max(mx), mul, off);
      const float m_new = fmaxf(m[mt][i], mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet
      alpha[mt][i] = fast_exp2(m[mt][i] - base);
      const float rel = off - base;  // exact where it matters (off near base)
      m[mt][i] = m_new;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        s[mt][nb][2 * i] = fast_exp2(fmaf(s[mt][nb][2 * i], mul, rel));
        s[mt][nb][2 * i + 1] = fast_exp2(fmaf(s[mt][nb][2 * i + 1], mul, rel));
      }
    }
  }
}

// One step of the walk after its products s = q k^T (raw, unscaled): masks the tile as its kind
// needs (inside every window, masked, additional keys; rpb), then the online softmax: s becomes
// the weights exp2(x - m), m is updated, and alpha is the factor the accumulators (o and the row
// sums l, products.cuh RowSums) take (rescale) before this step's o += P v adds to them.
// `current` counts the spatial key tiles. Shared by the forward kernels (rows:
// tile_row<MT, kWg>). kInBranches: the online softmax runs at the end of each tile kind's branch
// (the warp-specialized kernel, which keeps an MMA in flight across it, see `online`); otherwise
// once after the branches join, so that the exponentials are one copy of code, not four (the
// synchronous kernels: four copies made the mma.sync forward 12% longer and 9% slower).
template <int MT, bool kWg, bool kInBranches>
__device__ __forceinline__ void softmax_step(const FnaArgs& a, const KeyWalk& walk,
                                             TileCounter& current, int j, const Box& qb,
                                             const float* rpb, const int* Win,
                                             float (&s)[MT][8][4], float (&m)[MT][2],
                                             float (&alpha)[MT][2]) {
  auto frag_row = [](int mt, int i) { return tile_row<MT, kWg>(mt, i); };
  // The softmax takes x = s * mul (- m in a masked tile with rpb): base-2 logits, -inf outside
  // the neighborhood; mul = |scale_log2|, the scale's sign folded into s (exact). The sum of
  // exp2(x - m), l, is formed by the products (RowSums). With kInBranches the online softmax
  // runs at the end of each tile kind's branch rather than after they join: a warpgroup MMA in
  // flight across the softmax (the warp-specialized forward's one-step-ahead walk) is waited for
  // at the first join of divergent paths (ptxas).
  auto online = [&](float mul, bool biased) { online_softmax<MT, 8>(s, m, alpha, mul, biased); };
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
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const uint64_t bits = window_bits(a, Win + frag_row(mt, i) * 6, o);
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

// Whether any of the warp's rows takes a correction this step (alpha != 1): once the rows'
// running maxima settle, most steps of a long walk leave them unchanged, and the warp skips the
// rescale's multiplies (x * 1 is exact: skipping them changes no bit). A warp-uniform branch.
template <int MT>
__device__ __forceinline__ bool warp_rescales(const float (&alpha)[MT][2]) {
  bool any = false;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) any = any || alpha[mt][0] != 1.f || alpha[mt][1] != 1.f;
  return __any_sync(0xffffffffu, any);
}

// The walk's starting state: o = 0, the row sums l = 0, each row's running max m = -inf.
template <int DT, int MT>
__device__ __forceinline__ void start_rows(float (&acc)[MT][DT / 8][4], RowSums<MT>& l,
                                           float (&m)[MT][2]) {
  zero_sums<MT>(l);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < DT / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][i][e] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
  }
}

// acc *= alpha per row (the online softmax's correction, once the products into acc are done);
// DT = 8: the row sums (RowSums).
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

// The walk's end: o = acc / l, lse = (m + log2 l) ln 2 and, for a gradient, the statistics and o
// unrounded (softmax.cuh, "softmax statistics"), for the thread's rows (tile_row<MT, kWg>) of the
// tile qb with log2 extents `logs` (query_row_at).
template <typename T, int DT, int MT, bool kWg>
__device__ __forceinline__ void store_outputs(const FnaArgs& a, const FnaPtrs& p, const Box& qb,
                                              const int (&logs)[kMaxRank], int64_t row0, int h,
                                              float (&m)[MT][2], const RowSums<MT>& sums,
                                              float (&acc)[MT][DT / 8][4]) {
  auto frag_row = [](int mt, int i) { return tile_row<MT, kWg>(mt, i); };
  const int lane = threadIdx.x & 31;
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float l[2], inv[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] = row_sum(sums, mt, i);
      inv[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
    }
    int64_t rows[2];  // global row index (token * heads + h), -1 outside the problem
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int qc[3];
      query_row_at(a, qb, logs, frag_row(mt, i), row0, h, qc, rows[i]);
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
        const float log2_l = log2f(l[i]);
        p.out_lse[rows[i]] = (m[mt][i] + log2_l) * kLn2;
        if (p.out_stats != nullptr)
          p.out_stats[rows[i]] = m[mt][i] == -INFINITY ? make_float2(0.f, -INFINITY)
                                                       : make_float2(m[mt][i], log2_l);
      }
    }
  }
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
