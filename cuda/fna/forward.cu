// FNA forward (fna.cuh): o = softmax(scale * q.k + rpb) v over each query's neighborhood and the
// additional keys, lse = log(sum(exp(logits))). One CTA per (query tile, head, batch).
#include "fna.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

template <typename T, int DT>
__global__ void __launch_bounds__(kThreads) fna_fwd_kernel(const FnaArgs a, const FnaPtrs p) {
  constexpr int kLd = DT + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + kRows * kLd;       // [2][kRows][kLd]
  T* Vs = Ks + 2 * kRows * kLd;   // [2][kRows][kLd]

  Box qb;
  if (!tile_box(a, a.qlog, a.q_tpg, a.q_units, blockIdx.x, qb)) return;  // whole CTA
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / a.group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* add_k = static_cast<const T*>(p.add_k);
  const T* add_v = static_cast<const T*>(p.add_v);
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;

  // Query rows of the tile -> global rows (nullptr outside the problem).
  auto query_row = [&](int r, auto* base, int heads, int hh, int dim) -> decltype(base) {
    int off[3], l[3];
    tile_offsets(r, a.qlog, off);
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {
      l[ax] = qb.lo[ax] + off[ax];
      if (l[ax] >= qb.hi[ax]) return nullptr;
    }
    return base + ((row0 + token_of(a, qb.grp, l)) * heads + hh) * dim;
  };
  stage_rows<T, DT>(Qs, [&](int r) { return query_row(r, q, a.heads, h, a.dim); }, a.dim, q);
  cp_async_commit();

  const KeyWalk walk = key_walk(a, qb);
  // Stages key tile j (K and V) into buffer `buf`.
  auto stage_keys = [&](int j, int buf) {
    T* ks = Ks + buf * kRows * kLd;
    T* vs = Vs + buf * kRows * kLd;
    if (j < walk.spatial) {
      int o[3];
      bool full;
      key_tile(a, walk, j, o, full);
      auto key_row = [&](int r, const T* base, int dim) -> const T* {
        int off[3], l[3];
        tile_offsets(r, a.kvlog, off);
#pragma unroll
        for (int ax = 0; ax < 3; ++ax) {
          l[ax] = o[ax] + off[ax];
          if (l[ax] >= qb.lg[ax]) return nullptr;
        }
        return base + ((row0 + token_of(a, qb.grp, l)) * a.kv_heads + kvh) * dim;
      };
      stage_rows<T, DT>(ks, [&](int r) { return key_row(r, k, a.dim); }, a.dim, k);
      stage_rows<T, DT>(vs, [&](int r) { return key_row(r, v, a.dim_v); }, a.dim_v, v);
    } else {
      const int s0 = (j - walk.spatial) * kRows;
      auto add_row = [&](int r, const T* base, int dim) -> const T* {
        if (s0 + r >= a.S) return nullptr;
        return base + ((static_cast<int64_t>(b) * a.S + s0 + r) * a.kv_heads + kvh) * dim;
      };
      stage_rows<T, DT>(ks, [&](int r) { return add_row(r, add_k, a.dim); }, a.dim, k);
      stage_rows<T, DT>(vs, [&](int r) { return add_row(r, add_v, a.dim_v); }, a.dim_v, v);
    }
    cp_async_commit();
  };

  // The thread's two rows (gid, gid + 8 of the warp's 16): local coordinates and windows.
  int ql[2][3], ws[2][3], wlen[2][3];
  bool row_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    int off[3];
    tile_offsets(warp * 16 + (lane >> 2) + 8 * i, a.qlog, off);
    row_ok[i] = true;
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {
      ql[i][ax] = qb.lo[ax] + off[ax];
      row_ok[i] = row_ok[i] && ql[i][ax] < qb.hi[ax];
    }
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {
      const int l = imin(ql[i][ax], qb.lg[ax] - 1);
      ws[i][ax] = win_start(a.ax[ax], qb.lg[ax], l);
      wlen[i][ax] = row_ok[i] ? win_end(a.ax[ax], qb.lg[ax], l) - ws[i][ax] : 0;
    }
  }
  const float* rpb = a.R ? p.rpb + static_cast<int64_t>(h) * a.R : nullptr;

  float acc[DT / 8][4];
#pragma unroll
  for (int i = 0; i < DT / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  stage_keys(0, 0);
  for (int j = 0; j < walk.total; ++j) {
    if (j + 1 < walk.total) {
      stage_keys(j + 1, (j + 1) & 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* ks = Ks + (j & 1) * kRows * kLd;
    const T* vs = Vs + (j & 1) * kRows * kLd;

    float s[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
    scores<T, DT>(s, Qs, warp * 16, ks);

    // Logits in base 2, masked.
    if (j < walk.spatial) {
      int o[3];
      bool full;
      key_tile(a, walk, j, o, full);
      if (full && rpb == nullptr) {
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nb][e] *= a.scale_log2;
      } else {
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            int off[3], kl[3];
            tile_offsets(frag_col(nb, e), a.kvlog, off);
            const int i = e >> 1;
            bool in = true;
#pragma unroll
            for (int ax = 0; ax < 3; ++ax) {
              kl[ax] = o[ax] + off[ax];
              in = in && static_cast<unsigned>(kl[ax] - ws[i][ax]) <
                             static_cast<unsigned>(wlen[i][ax]);
            }
            float x = s[nb][e] * a.scale_log2;
            if (in && rpb != nullptr) x += __ldg(rpb + rpb_index(a, ql[i], kl)) * kLog2e;
            s[nb][e] = in ? x : -INFINITY;
          }
        }
      }
    } else {
      const int s0 = (j - walk.spatial) * kRows;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[nb][e] = s0 + frag_col(nb, e) < a.S ? s[nb][e] * a.scale_log2 : -INFINITY;
    }

    // Online softmax.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * i], s[nb][2 * i + 1]));
      mx = quad_max(mx);
      const float m_new = fmaxf(m[i], mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet
      const float alpha = exp2f(m[i] - base);
      m[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        s[nb][2 * i] = exp2f(s[nb][2 * i] - base);
        s[nb][2 * i + 1] = exp2f(s[nb][2 * i + 1] - base);
        sum += s[nb][2 * i] + s[nb][2 * i + 1];
      }
      l[i] = l[i] * alpha + sum;
#pragma unroll
      for (int nb = 0; nb < DT / 8; ++nb) {
        acc[nb][2 * i] *= alpha;
        acc[nb][2 * i + 1] *= alpha;
      }
    }
    apply<T, DT>(acc, s, vs);
    __syncthreads();  // the next iteration overwrites this buffer
  }

  // Epilogue: o = acc / l, lse = (m + log2 l) ln 2.
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] = quad_sum(l[i]);
    inv[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
  }
  T* out = static_cast<T*>(p.out);
  auto out_row = [&](int i) -> T* {
    if (!row_ok[i]) return nullptr;
    return out + ((row0 + token_of(a, qb.grp, ql[i])) * a.heads + h) * a.dim_v;
  };
  store_rows<T, DT>(acc, inv[0], inv[1], out_row, a.dim_v);
  if ((lane & 3) == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      if (row_ok[i])
        p.out_lse[(row0 + token_of(a, qb.grp, ql[i])) * a.heads + h] = (m[i] + log2f(l[i])) * kLn2;
  }
}

template <typename T, int DT>
ffi::Error launch(cudaStream_t stream, const FnaArgs& a, const FnaPtrs& p, int64_t batch) {
  constexpr int kSmem = fwd_smem(DT, sizeof(T));
  static const cudaError_t attr = cudaFuncSetAttribute(
      fna_fwd_kernel<T, DT>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (attr != cudaSuccess) return launch_error("fna forward (shared memory)", attr);
  const dim3 grid(static_cast<unsigned>(a.q_tiles), a.heads, static_cast<unsigned>(batch));
  fna_fwd_kernel<T, DT><<<grid, kThreads, kSmem, stream>>>(a, p);
  return check_launch("fna forward");
}

}  // namespace

ffi::Error launch_forward(cudaStream_t stream, ffi::DataType t, int dt, const FnaArgs& a,
                          const FnaPtrs& p, int64_t batch) {
  return dispatch_tile(t, dt, [&](auto tag, auto dtc) {
    return launch<typename decltype(tag)::type, decltype(dtc)::value>(stream, a, p, batch);
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
