// FNA backward, key side (fna.cuh): per key tile and kv head, the walk over the query tiles of
// its inverse box for every query head of the kv head, accumulating dk = scale * dS^T q and
// dv = P^T do in registers (rows of the products are keys). CTAs past the spatial key tiles own
// tiles of additional keys: every query attends to them, so they walk every query tile.
#include "fna.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

// kWg: wgmma on core-matrix tiles (Hopper), else mma.sync (forward.cu explains both); one m64
// row block of keys either way.
template <typename T, int DT, bool kWg>
__global__ void __launch_bounds__(kThreads, 2) fna_dkdv_kernel(const FnaArgs a, const FnaPtrs p) {
  constexpr int kLd = kWg ? DT : DT + 8;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + kRows * kLd;
  T* Qs = Vs + kRows * kLd;        // [2][kRows][kLd]
  T* Os = Qs + 2 * kRows * kLd;    // do, [2][kRows][kLd]
  float* Ls = reinterpret_cast<float*>(Os + 2 * kRows * kLd);  // lse, [2][kRows]
  float* Ds = Ls + 2 * kRows;                                   // delta, [2][kRows]

  const int kvh = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;
  const bool spatial = blockIdx.x < a.kv_tiles;
  Box kb;
  int s0 = 0;
  if (spatial) {
    if (!tile_box(a, a.kvlog, a.kv_tpg, a.kv_units, blockIdx.x, kb)) return;  // whole CTA
  } else {
    s0 = static_cast<int>(blockIdx.x - a.kv_tiles) * kRows;
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
  stage_rows<T, DT, kWg>(Ks, [&](int r) { return key_row(r, k, add_k, a.dim); }, a.dim, k);
  stage_rows<T, DT, kWg>(Vs, [&](int r) { return key_row(r, v, add_v, a.dim_v); }, a.dim_v, v);
  cp_async_commit();

  const QueryWalk walk(a, kb, spatial, kvh);
  QueryWalk::Cursor staged = walk.start(), current = walk.start();

  const T* q = static_cast<const T*>(p.q);
  const T* d_o = static_cast<const T*>(p.d_o);
  const TileRows<DT, kRows, kWg> qrows(a, a.qlog);
  auto stage_queries = [&](int buf) {
    const QueryTile t = walk.tile(a, staged);
    staged.next(walk, a);
    int lim[3];
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) lim[ax] = t.nonempty ? t.box.hi[ax] - t.box.lo[ax] : 0;
    const int64_t tok0 = t.nonempty ? token_of(a, t.box.grp, t.box.lo) : 0;
    qrows.stage(Qs + buf * kRows * kLd, q, row0, tok0, lim, a.heads, t.h, a.dim);
    qrows.stage(Os + buf * kRows * kLd, d_o, row0, tok0, lim, a.heads, t.h, a.dim_v);
    for (int r = threadIdx.x; r < kRows; r += kThreads) {
      int off[3];
      tile_offsets(r, a.qlog, off);
      const bool ok = off[0] < lim[0] && off[1] < lim[1] && off[2] < lim[2];
      int l[3];
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) l[ax] = t.box.lo[ax] + off[ax];
      const int64_t i = ok ? (row0 + token_of(a, t.box.grp, l)) * a.heads + t.h : 0;
      cp_async4(Ls + buf * kRows + r, p.lse + i, ok);
      cp_async4(Ds + buf * kRows + r, p.delta + i, ok);
    }
    cp_async_commit();
  };

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

  float dk1[1][DT / 8][4], dv1[1][DT / 8][4];
  auto& dk = dk1[0];
  auto& dv = dv1[0];
#pragma unroll
  for (int i = 0; i < DT / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  if (walk.total > 0) stage_queries(0);
  for (int64_t it = 0; it < walk.total; ++it) {
    if (it + 1 < walk.total) {
      stage_queries((it + 1) & 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if constexpr (kWg) fence_proxy_async();  // cp.async writes -> wgmma reads
    __syncthreads();
    const int buf = static_cast<int>(it & 1);
    const T* qs = Qs + buf * kRows * kLd;
    const T* os = Os + buf * kRows * kLd;
    const float* ls = Ls + buf * kRows;
    const float* ds = Ds + buf * kRows;
    const QueryTile t = walk.tile(a, current);
    current.next(walk, a);
    const float* rpb = a.R && spatial ? p.rpb + static_cast<int64_t>(t.h) * a.R : nullptr;

    float s1[1][8][4];
    auto& s = s1[0];
    tile_scores<T, DT, 1, kWg>(s1, Ks, qs);
    // P^T = exp(logits - lse of the query), 0 outside the neighborhood. Per column (query) of
    // the thread: its coordinates and lse once, then the thread's two key rows.
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = frag_col(nb, e);
        int off[3], qc[3];
        tile_offsets(c, a.qlog, off);
        bool q_in = spatial || t.nonempty;
#pragma unroll
        for (int ax = 0; ax < 3; ++ax) {
          qc[ax] = t.box.lo[ax] + off[ax];
          if (!spatial) q_in = q_in && qc[ax] < t.box.hi[ax];
        }
        const float lse2 = ls[c] * kLog2e;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          bool in = q_in && key_ok[i];
          if (spatial && !t.full) {
#pragma unroll
            for (int ax = 0; ax < 3; ++ax)
              in = in && static_cast<unsigned>(qc[ax] - qf[i][ax]) <
                             static_cast<unsigned>(qn[i][ax]);
          }
          float x = s[nb][2 * i + e] * a.scale_log2;
          if (rpb != nullptr && in) x += __ldg(rpb + rpb_index(a, qc, kl[i])) * kLog2e;
          s[nb][2 * i + e] = in ? fast_exp2(x - lse2) : 0.f;
        }
      }
    }
    tile_apply<T, DT, 1, kWg>(dv1, s1, os);
    float dp1[1][8][4];
    auto& dp = dp1[0];
    tile_scores<T, DT, 1, kWg>(dp1, Vs, os);
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float delta = ds[frag_col(nb, e)];
        s[nb][e] *= dp[nb][e] - delta;
        s[nb][2 + e] *= dp[nb][2 + e] - delta;
      }
    }
    tile_apply<T, DT, 1, kWg>(dk1, s1, qs);
    __syncthreads();  // the next iteration overwrites this buffer
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

template <typename T, int DT, bool kWg>
ffi::Error launch(cudaStream_t stream, const FnaArgs& a, const FnaPtrs& p, int64_t batch) {
  constexpr int kSmem = dkdv_smem(DT, sizeof(T), kWg);
  static const cudaError_t attr = cudaFuncSetAttribute(
      fna_dkdv_kernel<T, DT, kWg>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (attr != cudaSuccess) return launch_error("fna backward dk/dv (shared memory)", attr);
  const dim3 grid(static_cast<unsigned>(a.kv_tiles + a.add_tiles), a.kv_heads,
                  static_cast<unsigned>(batch));
  fna_dkdv_kernel<T, DT, kWg><<<grid, kThreads, kSmem, stream>>>(a, p);
  return check_launch("fna backward dk/dv");
}

}  // namespace

ffi::Error launch_backward_dkdv(cudaStream_t stream, ffi::DataType t, int dt, bool wgmma,
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
