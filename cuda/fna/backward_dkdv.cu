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

template <typename T, int DT>
__global__ void __launch_bounds__(kThreads, 2) fna_dkdv_kernel(const FnaArgs a, const FnaPtrs p) {
  constexpr int kLd = DT + 8;
  extern __shared__ __align__(16) unsigned char smem[];
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
  stage_rows<T, DT>(Ks, [&](int r) { return key_row(r, k, add_k, a.dim); }, a.dim, k);
  stage_rows<T, DT>(Vs, [&](int r) { return key_row(r, v, add_v, a.dim_v); }, a.dim_v, v);
  cp_async_commit();

  // The query walk: spatial tiles cover the inverse box of the key tile; additional-key tiles
  // visit every query tile slot.
  int q_lo[3] = {0, 0, 0}, nq[3] = {1, 1, 1}, full_lo[3] = {0, 0, 0}, full_hi[3] = {0, 0, 0};
  int64_t per_head = a.q_tiles;
  if (spatial) {
    per_head = 1;
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {
      const AxisParams& ap = a.ax[ax];
      const QueryRange first = inverse_window(kb.lo[ax], kb.lg[ax], ap.kernel, ap.stride, ap.causal);
      const QueryRange last =
          inverse_window(kb.hi[ax] - 1, kb.lg[ax], ap.kernel, ap.stride, ap.causal);
      const int t = 1 << a.qlog[ax];
      q_lo[ax] = first.first;
      nq[ax] = imax(0, (last.last + 1 - first.first + t - 1) / t);
      full_lo[ax] = last.first;
      full_hi[ax] = first.last + 1;
      per_head *= nq[ax];
    }
  }
  const int64_t total = per_head * a.group;

  // Position in the query walk: query head g of the kv head, then the query tile (spatial: a
  // counter over the inverse box; additional keys: every tile slot). Advanced, never divided.
  struct Cursor {
    int g;
    TileCounter c;
    int64_t slot;
    __device__ __forceinline__ void next(bool spatial_walk, const int (&n)[3], int64_t slots) {
      if (spatial_walk) {
        c.next(n);
        if (c.j[0] == n[0]) {
          c.reset();
          ++g;
        }
      } else if (++slot == slots) {
        slot = 0;
        ++g;
      }
    }
  };
  struct QueryTile {
    int h;
    Box box;
    bool nonempty, full;
  };
  auto query_tile = [&](const Cursor& cur) -> QueryTile {
    QueryTile t;
    t.h = kvh * a.group + cur.g;
    if (spatial) {
      t.nonempty = true;
      t.full = true;
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        t.box.grp[ax] = kb.grp[ax];
        t.box.lg[ax] = kb.lg[ax];
        t.box.lo[ax] = q_lo[ax] + (cur.c.j[ax] << a.qlog[ax]);
        t.box.hi[ax] = imin(t.box.lo[ax] + (1 << a.qlog[ax]), kb.lg[ax]);
        t.full = t.full && t.box.lo[ax] >= full_lo[ax] &&
                 t.box.lo[ax] + (1 << a.qlog[ax]) <= full_hi[ax];
      }
    } else {
      t.nonempty = tile_box(a, a.qlog, a.q_tpg, a.q_units, cur.slot, t.box);
      t.full = false;
    }
    return t;
  };
  Cursor staged{0, {{0, 0, 0}}, 0}, current{0, {{0, 0, 0}}, 0};

  const T* q = static_cast<const T*>(p.q);
  const T* d_o = static_cast<const T*>(p.d_o);
  const TileRows<DT, kRows> qrows(a, a.qlog);
  auto stage_queries = [&](int buf) {
    const QueryTile t = query_tile(staged);
    staged.next(spatial, nq, a.q_tiles);
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
      int off[3];
      tile_offsets(r, a.kvlog, off);
      key_ok[i] = true;
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        kl[i][ax] = kb.lo[ax] + off[ax];
        key_ok[i] = key_ok[i] && kl[i][ax] < kb.hi[ax];
      }
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        const AxisParams& ap = a.ax[ax];
        const QueryRange qr = inverse_window(imin(kl[i][ax], kb.lg[ax] - 1), kb.lg[ax], ap.kernel,
                                             ap.stride, ap.causal);
        qf[i][ax] = qr.first;
        qn[i][ax] = key_ok[i] ? imax(0, qr.last + 1 - qr.first) : 0;
      }
    } else {
      key_ok[i] = s0 + r < a.S;
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) kl[i][ax] = qf[i][ax] = qn[i][ax] = 0;
    }
  }

  float dk[DT / 8][4], dv[DT / 8][4];
#pragma unroll
  for (int i = 0; i < DT / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  if (total > 0) stage_queries(0);
  for (int64_t it = 0; it < total; ++it) {
    if (it + 1 < total) {
      stage_queries((it + 1) & 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int buf = static_cast<int>(it & 1);
    const T* qs = Qs + buf * kRows * kLd;
    const T* os = Os + buf * kRows * kLd;
    const float* ls = Ls + buf * kRows;
    const float* ds = Ds + buf * kRows;
    const QueryTile t = query_tile(current);
    current.next(spatial, nq, a.q_tiles);
    const float* rpb = a.R && spatial ? p.rpb + static_cast<int64_t>(t.h) * a.R : nullptr;

    float s[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
    scores<T, DT>(s, Ks, warp * 16, qs);
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
    apply<T, DT>(dv, s, os);
    float dp[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) dp[nb][0] = dp[nb][1] = dp[nb][2] = dp[nb][3] = 0.f;
    scores<T, DT>(dp, Vs, warp * 16, os);
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float delta = ds[frag_col(nb, e)];
        s[nb][e] *= dp[nb][e] - delta;
        s[nb][2 + e] *= dp[nb][2 + e] - delta;
      }
    }
    apply<T, DT>(dk, s, qs);
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

template <typename T, int DT>
ffi::Error launch(cudaStream_t stream, const FnaArgs& a, const FnaPtrs& p, int64_t batch) {
  constexpr int kSmem = dkdv_smem(DT, sizeof(T));
  static const cudaError_t attr = cudaFuncSetAttribute(
      fna_dkdv_kernel<T, DT>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (attr != cudaSuccess) return launch_error("fna backward dk/dv (shared memory)", attr);
  const dim3 grid(static_cast<unsigned>(a.kv_tiles + a.add_tiles), a.kv_heads,
                  static_cast<unsigned>(batch));
  fna_dkdv_kernel<T, DT><<<grid, kThreads, kSmem, stream>>>(a, p);
  return check_launch("fna backward dk/dv");
}

}  // namespace

ffi::Error launch_backward_dkdv(cudaStream_t stream, ffi::DataType t, int dt, const FnaArgs& a,
                                const FnaPtrs& p, int64_t batch) {
  return dispatch_tile(t, dt, [&](auto tag, auto dtc) {
    return launch<typename decltype(tag)::type, decltype(dtc)::value>(stream, a, p, batch);
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
