// FNA backward, query side (fna.cuh): delta = rowsum(do * o) - dlse, then per query tile the
// forward's walk over key tiles recomputing P = exp(logits - lse), dS = P (do.v - delta),
// dq = scale * dS k, and d-rpb = sum of dS per relative offset.
#include "fna.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

// One thread per query row (B * N * H rows of Dv elements).
template <typename T>
__global__ void fna_delta_kernel(const T* o, const T* d_o, const float* dlse, float* delta,
                                 int64_t rows, int dim_v) {
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < rows;
       r += int64_t{gridDim.x} * blockDim.x) {
    const T* a = o + r * dim_v;
    const T* b = d_o + r * dim_v;
    float sum = 0.f;
    for (int c = 0; c < dim_v; c += 8) {
      const uint4 va = __ldg(reinterpret_cast<const uint4*>(a + c));
      const uint4 vb = __ldg(reinterpret_cast<const uint4*>(b + c));
      const T* ea = reinterpret_cast<const T*>(&va);
      const T* eb = reinterpret_cast<const T*>(&vb);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += static_cast<float>(ea[e]) * static_cast<float>(eb[e]);
    }
    delta[r] = sum - dlse[r];
  }
}

template <typename T, int DT>
__global__ void __launch_bounds__(kThreads) fna_dq_kernel(const FnaArgs a, const FnaPtrs p) {
  constexpr int kLd = DT + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Os = Qs + kRows * kLd;       // do
  T* Ks = Os + kRows * kLd;       // [2][kRows][kLd]
  T* Vs = Ks + 2 * kRows * kLd;   // [2][kRows][kLd]
  float* drpb_s = reinterpret_cast<float*>(Vs + 2 * kRows * kLd);  // [R] when drpb_in_smem

  Box qb;
  if (!tile_box(a, a.qlog, a.q_tpg, a.q_units, blockIdx.x, qb)) return;  // whole CTA
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / a.group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* add_k = static_cast<const T*>(p.add_k);
  const T* add_v = static_cast<const T*>(p.add_v);
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;

  const T* q = static_cast<const T*>(p.q);
  const T* d_o = static_cast<const T*>(p.d_o);
  {
    const TileRows<DT, kRows> qrows(a, a.qlog);
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
  const TileRows<DT, kRows> kvrows(a, a.kvlog);
  TileCounter staged;  // the next spatial key tile to stage
  staged.reset();
  auto stage_keys = [&](int j, int buf) {
    T* ks = Ks + buf * kRows * kLd;
    T* vs = Vs + buf * kRows * kLd;
    if (j < walk.spatial) {
      int o[3];
      bool full;
      key_tile(a, walk, staged, o, full);
      staged.next(walk.n);
      const int lim[3] = {qb.lg[0] - o[0], qb.lg[1] - o[1], qb.lg[2] - o[2]};
      const int64_t tok0 = token_of(a, qb.grp, o);
      kvrows.stage(ks, k, row0, tok0, lim, a.kv_heads, kvh, a.dim);
      kvrows.stage(vs, v, row0, tok0, lim, a.kv_heads, kvh, a.dim_v);
    } else {
      const int64_t s0 = (j - walk.spatial) * kRows;
      const int64_t first = static_cast<int64_t>(b) * a.S;
      kvrows.stage_linear(ks, add_k, first + s0, first + a.S, a.kv_heads, kvh, a.dim);
      kvrows.stage_linear(vs, add_v, first + s0, first + a.S, a.kv_heads, kvh, a.dim_v);
    }
    cp_async_commit();
  };

  int ql[2][3], ws[2][3], wlen[2][3];
  bool row_ok[2];
  float lse2[2], delta[2];
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
    lse2[i] = 0.f;
    delta[i] = 0.f;
    if (row_ok[i]) {
      const int64_t r = (row0 + token_of(a, qb.grp, ql[i])) * a.heads + h;
      lse2[i] = p.lse[r] * kLog2e;
      delta[i] = p.delta[r];
    }
  }
  const float* rpb = a.R ? p.rpb + static_cast<int64_t>(h) * a.R : nullptr;
  const bool want_drpb = rpb != nullptr && !a.skip_drpb;

  float acc[DT / 8][4];
#pragma unroll
  for (int i = 0; i < DT / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  TileCounter current;  // the spatial key tile being computed
  current.reset();
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

    float s[8][4], dp[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.f;
    scores<T, DT>(s, Qs, warp * 16, ks);
    scores<T, DT>(dp, Os, warp * 16, vs);

    const bool spatial = j < walk.spatial;
    int o[3] = {0, 0, 0};
    bool full = false;
    if (spatial) {
      key_tile(a, walk, current, o, full);
      current.next(walk.n);
    }
    const int s0 = (j - walk.spatial) * kRows;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1;
        int kl[3] = {0, 0, 0};
        bool in;
        if (spatial) {
          in = row_ok[i];
          if (!full || rpb != nullptr) {
            int off[3];
            tile_offsets(frag_col(nb, e), a.kvlog, off);
#pragma unroll
            for (int ax = 0; ax < 3; ++ax) {
              kl[ax] = o[ax] + off[ax];
              in = in && (full || static_cast<unsigned>(kl[ax] - ws[i][ax]) <
                                      static_cast<unsigned>(wlen[i][ax]));
            }
          }
        } else {
          in = row_ok[i] && s0 + frag_col(nb, e) < a.S;
        }
        float x = s[nb][e] * a.scale_log2;
        int ri = 0;
        if (spatial && rpb != nullptr && in) {
          ri = rpb_index(a, ql[i], kl);
          x += __ldg(rpb + ri) * kLog2e;
        }
        const float pr = in ? exp2f(x - lse2[i]) : 0.f;
        const float ds = pr * (dp[nb][e] - delta[i]);
        s[nb][e] = ds;
        if (spatial && want_drpb && in) atomicAdd(drpb + ri, ds);
      }
    }
    apply<T, DT>(acc, s, ks);
    __syncthreads();  // the next iteration overwrites this buffer
  }

  T* dq = static_cast<T*>(p.dq);
  auto dq_row = [&](int i) -> T* {
    if (!row_ok[i]) return nullptr;
    return dq + ((row0 + token_of(a, qb.grp, ql[i])) * a.heads + h) * a.dim;
  };
  store_rows<T, DT>(acc, a.scale, a.scale, dq_row, a.dim);
  if (want_drpb && a.drpb_in_smem) {
    __syncthreads();
    for (int i = threadIdx.x; i < a.R; i += kThreads)
      if (drpb_s[i] != 0.f) atomicAdd(drpb_g + i, drpb_s[i]);
  }
}

template <typename T, int DT>
ffi::Error launch(cudaStream_t stream, const FnaArgs& a, const FnaPtrs& p, int64_t batch) {
  const int64_t rows = batch * a.tokens * a.heads;
  fna_delta_kernel<T><<<grid_for(rows, 256), 256, 0, stream>>>(
      static_cast<const T*>(p.o), static_cast<const T*>(p.d_o), p.dlse, p.delta, rows, a.dim_v);
  NATTEN_TRY(check_launch("fna backward (delta)"));
  constexpr int kMaxSmem = kMaxDqSmem;
  static const cudaError_t attr = cudaFuncSetAttribute(
      fna_dq_kernel<T, DT>, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem);
  if (attr != cudaSuccess) return launch_error("fna backward dq (shared memory)", attr);
  const int smem = dq_smem(DT, sizeof(T)) + (a.drpb_in_smem ? a.R * 4 : 0);
  const dim3 grid(static_cast<unsigned>(a.q_tiles), a.heads, static_cast<unsigned>(batch));
  fna_dq_kernel<T, DT><<<grid, kThreads, smem, stream>>>(a, p);
  return check_launch("fna backward dq");
}

}  // namespace

ffi::Error launch_backward_dq(cudaStream_t stream, ffi::DataType t, int dt, const FnaArgs& a,
                              const FnaPtrs& p, int64_t batch) {
  return dispatch_tile(t, dt, [&](auto tag, auto dtc) {
    return launch<typename decltype(tag)::type, decltype(dtc)::value>(stream, a, p, batch);
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
