// FNA in float32 at full precision (walk.cuh's walks, CUDA-core FMAs instead of tensor cores):
// forward, dq and dk / dv kernels for backend="fused" with float32 inputs. No product is rounded
// below float32 (no TF32), and the softmax uses exp2f, not the approximate ex2. Scores stay raw
// (s = q.k): the scale enters the exponent's fma, so only differences from the row's max are
// rounded (softmax.cuh, "softmax statistics").
//
// A CTA owns a tile of kRowsF32(DT) query rows (forward, dq) or key rows (dk / dv); kLanes(DT)
// consecutive threads share a row, each holding kCols = DT / kLanes of its columns in registers
// (q / do / accumulators), and reduce dot products with warp shuffles. The streamed operand (key
// tiles; query tiles in dk / dv) is double buffered in shared memory ([rows][DT + 8] floats, staged
// by TileRows); all rows of a warp read the same streamed row at once, so those reads broadcast.
#include "fna.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

template <int DT>
struct F32Shape {
  static constexpr int kLanes = DT >= 64 ? DT / 32 : 2;  // threads per row
  static constexpr int kCols = DT / kLanes;               // columns per thread (16 or 32)
  static constexpr int kRowsTile = kThreads / kLanes;     // rows per CTA tile (64 or 32)
  static constexpr int kLd = DT + 8;
  static constexpr int kTile = kRowsTile * kLd;           // floats per staged tile
};

// Sum over the kLanes threads of a row (consecutive lanes).
template <int kLanes>
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int o = 1; o < kLanes; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// dot(x, row) over the thread's columns of a shared-memory row (16-byte reads).
template <int kCols>
__device__ __forceinline__ float dot_cols(const float (&x)[kCols], const float* row) {
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kCols; c += 4) {
    const float4 v = *reinterpret_cast<const float4*>(row + c);
    s = fmaf(x[c], v.x, s);
    s = fmaf(x[c + 1], v.y, s);
    s = fmaf(x[c + 2], v.z, s);
    s = fmaf(x[c + 3], v.w, s);
  }
  return s;
}

// acc += w * row over the thread's columns.
template <int kCols>
__device__ __forceinline__ void axpy_cols(float (&acc)[kCols], float w, const float* row) {
#pragma unroll
  for (int c = 0; c < kCols; c += 4) {
    const float4 v = *reinterpret_cast<const float4*>(row + c);
    acc[c] = fmaf(w, v.x, acc[c]);
    acc[c + 1] = fmaf(w, v.y, acc[c + 1]);
    acc[c + 2] = fmaf(w, v.z, acc[c + 2]);
    acc[c + 3] = fmaf(w, v.w, acc[c + 3]);
  }
}

// The thread's columns [c0, c0 + kCols) of a global row (zeros past `cols` or without a row).
template <int kCols>
__device__ __forceinline__ void load_cols(float (&x)[kCols], const float* row, int c0, int cols,
                                          float mul = 1.f) {
#pragma unroll
  for (int c = 0; c < kCols; c += 4) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row != nullptr && c0 + c < cols) v = __ldg(reinterpret_cast<const float4*>(row + c0 + c));
    x[c] = v.x * mul;
    x[c + 1] = v.y * mul;
    x[c + 2] = v.z * mul;
    x[c + 3] = v.w * mul;
  }
}

template <int kCols>
__device__ __forceinline__ void store_cols(float* row, const float (&x)[kCols], int c0, int cols,
                                           float mul) {
#pragma unroll
  for (int c = 0; c < kCols; c += 4)
    if (c0 + c < cols)
      *reinterpret_cast<float4*>(row + c0 + c) =
          make_float4(x[c] * mul, x[c + 1] * mul, x[c + 2] * mul, x[c + 3] * mul);
}

// A query row of a forward / dq CTA: coordinates, global row (-1 outside the problem), window.
struct QueryRow {
  int qc[3];
  int64_t grow;
  int ws[3], wn[3];  // window start and length per axis (length 0 outside the problem)
};

__device__ __forceinline__ QueryRow query_row(const FnaArgs& a, const Box& qb, int r, int64_t row0,
                                              int h) {
  QueryRow q;
  int off[3];
  tile_offsets(r, a.qlog, off);
  bool ok = true;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    q.qc[ax] = qb.lo[ax] + off[ax];
    ok = ok && q.qc[ax] < qb.hi[ax];
  }
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    const int l = imin(q.qc[ax], qb.lg[ax] - 1);
    q.ws[ax] = win_start(a.ax[ax], qb.lg[ax], l);
    q.wn[ax] = ok ? win_end(a.ax[ax], qb.lg[ax], l) - q.ws[ax] : 0;
  }
  q.grow = ok ? (row0 + token_of(a, qb.grp, q.qc)) * a.heads + h : -1;
  return q;
}

// Whether key jj of walk tile j is in the query row's neighborhood, and its rpb entry (ri; -1
// without rpb). `o`, `full`: the spatial tile's origin and fullness.
__device__ __forceinline__ bool key_in(const FnaArgs& a, const QueryRow& q, bool spatial,
                                       const int (&o)[3], bool full, int s0, int jj, int& ri) {
  ri = -1;
  if (!spatial) return q.grow >= 0 && s0 + jj < a.S;
  int off[3], kl[3];
  tile_offsets(jj, a.kvlog, off);
  bool in = q.grow >= 0;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    kl[ax] = o[ax] + off[ax];
    if (!full)
      in = in && static_cast<unsigned>(kl[ax] - q.ws[ax]) < static_cast<unsigned>(q.wn[ax]);
  }
  if (in && a.R) ri = rpb_index(a, q.qc, kl);
  return in;
}

template <int DT>
__global__ void __launch_bounds__(kThreads) fna_fwd_f32_kernel(const FnaArgs a, const FnaPtrs p) {
  using S = F32Shape<DT>;
  constexpr int C = S::kCols;
  extern __shared__ __align__(16) unsigned char smem[];
  float* Ks = reinterpret_cast<float*>(smem);  // [2][rows][DT + 8]
  float* Vs = Ks + 2 * S::kTile;

  Box qb;
  if (!tile_box(a, a.qlog, a.q_tpg, a.q_units, blockIdx.x, qb)) return;  // whole CTA
  const int h = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z), kvh = h / a.group;
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;
  const int r = threadIdx.x / S::kLanes, c0 = (threadIdx.x % S::kLanes) * C;
  const QueryRow qr = query_row(a, qb, r, row0, h);
  float q[C];
  load_cols(q, qr.grow < 0 ? nullptr : static_cast<const float*>(p.q) + qr.grow * a.dim, c0,
            a.dim);
  const float* rpb = a.R ? p.rpb + static_cast<int64_t>(h) * a.R : nullptr;

  const KeyWalk walk = key_walk(a, qb);
  KeyStager<float, DT, S::kRowsTile, false, 4> keys(a);
  auto stage = [&](int j, int buf) {
    keys(a, p, walk, qb, b, row0, kvh, j, Ks + buf * S::kTile, Vs + buf * S::kTile);
  };
  TileCounter current;
  current.reset();
  float acc[C], m = -INFINITY, l = 0.f;
#pragma unroll
  for (int c = 0; c < C; ++c) acc[c] = 0.f;
  double_buffered_walk<false>(walk.total, stage, [&](int j, int buf) {
    const float* ks = Ks + buf * S::kTile + c0;
    const float* vs = Vs + buf * S::kTile + c0;
    const KeyStep step = key_step(a, walk, current, j, S::kRowsTile);
    const bool spatial = step.spatial, full = step.full;
    const int (&o)[3] = step.o;
    const int s0 = step.s0;
    // Online softmax over chunks of 8 keys (one rescale per chunk). Key u's base-2 logit is
    // s[u] * scale_log2 + bias[u] (bias -inf outside the neighborhood); its rounded value only
    // picks the max, the weight is exp2(fma(s, scale_log2, -base) + bias).
    for (int k0 = 0; k0 < S::kRowsTile; k0 += 8) {
      float sc[8], bias[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int jj = k0 + u;
        sc[u] = row_sum<S::kLanes>(dot_cols<C>(q, ks + jj * S::kLd));
        int ri;
        const bool in = key_in(a, qr, spatial, o, full, s0, jj, ri);
        bias[u] = !in ? -INFINITY : ri >= 0 ? __ldg(rpb + ri) * kLog2e : 0.f;
      }
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < 8; ++u) mx = fmaxf(mx, fmaf(sc[u], a.scale_log2, bias[u]));
      const float m_new = fmaxf(m, mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m - base);
      m = m_new;
      l *= alpha;
#pragma unroll
      for (int c = 0; c < C; ++c) acc[c] *= alpha;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const float pu = exp2f(fmaf(sc[u], a.scale_log2, -base) + bias[u]);
        l += pu;
        axpy_cols<C>(acc, pu, vs + (k0 + u) * S::kLd);
      }
    }
  });
  if (qr.grow < 0) return;
  store_cols<C>(static_cast<float*>(p.out) + qr.grow * a.dim_v, acc, c0, a.dim_v,
                l > 0.f ? 1.f / l : 0.f);
  if (p.out_o32 != nullptr)
    store_cols<C>(p.out_o32 + qr.grow * a.dim_v, acc, c0, a.dim_v, l > 0.f ? 1.f / l : 0.f);
  if (c0 == 0) {
    p.out_lse[qr.grow] = (m + log2f(l)) * kLn2;
    if (p.out_stats != nullptr)
      p.out_stats[qr.grow] = m == -INFINITY ? make_float2(0.f, -INFINITY)
                                            : make_float2(m, log2f(l));
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads) fna_dq_f32_kernel(const FnaArgs a, const FnaPtrs p) {
  using S = F32Shape<DT>;
  constexpr int C = S::kCols;
  extern __shared__ __align__(16) unsigned char smem[];
  float* Ks = reinterpret_cast<float*>(smem);  // [2][rows][DT + 8]
  float* Vs = Ks + 2 * S::kTile;
  float* drpb_s = Vs + 2 * S::kTile;  // [R] when drpb_in_smem

  Box qb;
  if (!tile_box(a, a.qlog, a.q_tpg, a.q_units, blockIdx.x, qb)) return;  // whole CTA
  const int h = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z), kvh = h / a.group;
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;
  const int r = threadIdx.x / S::kLanes, c0 = (threadIdx.x % S::kLanes) * C;
  const QueryRow qr = query_row(a, qb, r, row0, h);
  const bool ok = qr.grow >= 0;
  float q[C], d_o[C], dq[C];
  load_cols(q, ok ? static_cast<const float*>(p.q) + qr.grow * a.dim : nullptr, c0, a.dim);
  load_cols(d_o, ok ? static_cast<const float*>(p.d_o) + qr.grow * a.dim_v : nullptr, c0, a.dim_v);
  const float2 stats = ok ? p.stats[qr.grow] : make_float2(0.f, 0.f);
  const float delta = ok ? p.delta[qr.grow] : 0.f;
#pragma unroll
  for (int c = 0; c < C; ++c) dq[c] = 0.f;

  const float* rpb = a.R ? p.rpb + static_cast<int64_t>(h) * a.R : nullptr;
  const bool want_drpb = rpb != nullptr && !a.skip_drpb;
  float* drpb_g = a.R ? p.drpb + (static_cast<int64_t>(b) * a.heads + h) * a.R : nullptr;
  if (a.R && a.drpb_in_smem)
    for (int i = threadIdx.x; i < a.R; i += kThreads) drpb_s[i] = 0.f;
  float* drpb = a.drpb_in_smem ? drpb_s : drpb_g;

  const KeyWalk walk = key_walk(a, qb);
  KeyStager<float, DT, S::kRowsTile, false, 4> keys(a);
  auto stage = [&](int j, int buf) {
    keys(a, p, walk, qb, b, row0, kvh, j, Ks + buf * S::kTile, Vs + buf * S::kTile);
  };
  TileCounter current;
  current.reset();
  double_buffered_walk<false>(walk.total, stage, [&](int j, int buf) {
    const float* ks = Ks + buf * S::kTile + c0;
    const float* vs = Vs + buf * S::kTile + c0;
    const KeyStep step = key_step(a, walk, current, j, S::kRowsTile);
    const bool spatial = step.spatial, full = step.full;
    const int (&o)[3] = step.o;
    const int s0 = step.s0;
    for (int jj = 0; jj < S::kRowsTile; ++jj) {
      const float x = row_sum<S::kLanes>(dot_cols<C>(q, ks + jj * S::kLd));
      const float dp = row_sum<S::kLanes>(dot_cols<C>(d_o, vs + jj * S::kLd));
      int ri;
      const bool in = key_in(a, qr, spatial, o, full, s0, jj, ri);
      const float bias2 = ri >= 0 ? __ldg(rpb + ri) * kLog2e : 0.f;
      const float ds =
          in ? exp2f(softmax_weight_exp2(x, a.scale_log2, stats, bias2)) * (dp - delta) : 0.f;
      axpy_cols<C>(dq, ds, ks + jj * S::kLd);
      if (want_drpb && ri >= 0 && c0 == 0) atomicAdd(drpb + ri, ds);
    }
  });
  if (ok) store_cols<C>(static_cast<float*>(p.dq) + qr.grow * a.dim, dq, c0, a.dim, a.scale);
  if (want_drpb && a.drpb_in_smem) {
    __syncthreads();
    for (int i = threadIdx.x; i < a.R; i += kThreads)
      if (drpb_s[i] != 0.f) atomicAdd(drpb_g + i, drpb_s[i]);
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads) fna_dkdv_f32_kernel(const FnaArgs a, const FnaPtrs p) {
  using S = F32Shape<DT>;
  constexpr int C = S::kCols;
  extern __shared__ __align__(16) unsigned char smem[];
  float* Qs = reinterpret_cast<float*>(smem);  // [2][rows][DT + 8]
  float* Os = Qs + 2 * S::kTile;               // do
  float2* Ls = reinterpret_cast<float2*>(Os + 2 * S::kTile);  // softmax statistics, [2][rows]
  float* Ds = reinterpret_cast<float*>(Ls + 2 * S::kRowsTile);  // delta, [2][rows]

  const int kvh = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z);
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;
  const bool spatial = blockIdx.x < a.kv_tiles;
  Box kb;
  int s0 = 0;
  if (spatial) {
    if (!tile_box(a, a.kvlog, a.kv_tpg, a.kv_units, blockIdx.x, kb)) return;  // whole CTA
  } else {
    s0 = static_cast<int>(blockIdx.x - a.kv_tiles) * S::kRowsTile;
  }
  const int r = threadIdx.x / S::kLanes, c0 = (threadIdx.x % S::kLanes) * C;
  // The thread's key row: coordinates, the queries holding it, its k and v columns.
  int kl[3] = {0, 0, 0}, qf[3] = {0, 0, 0}, qn[3] = {0, 0, 0};
  bool key_ok;
  int64_t krow;  // row of k / v (or of the additional kv), -1 outside
  if (spatial) {
    key_ok = key_queries(a, kb, r, kl, qf, qn);
    krow = key_ok ? (row0 + token_of(a, kb.grp, kl)) * a.kv_heads + kvh : -1;
  } else {
    key_ok = s0 + r < a.S;
    krow = key_ok ? (static_cast<int64_t>(b) * a.S + s0 + r) * a.kv_heads + kvh : -1;
  }
  const float* kbase = static_cast<const float*>(spatial ? p.k : p.add_k);
  const float* vbase = static_cast<const float*>(spatial ? p.v : p.add_v);
  float k[C], v[C], dk[C], dv[C];
  load_cols(k, krow < 0 ? nullptr : kbase + krow * a.dim, c0, a.dim);
  load_cols(v, krow < 0 ? nullptr : vbase + krow * a.dim_v, c0, a.dim_v);
#pragma unroll
  for (int c = 0; c < C; ++c) dk[c] = dv[c] = 0.f;

  const QueryWalk walk(a, kb, spatial, kvh);
  QueryWalk::Cursor staged = walk.start(), current = walk.start();
  const float* q = static_cast<const float*>(p.q);
  const float* d_o = static_cast<const float*>(p.d_o);
  const TileRows<DT, S::kRowsTile, false, 4> qrows(a, a.qlog);
  auto stage_queries = [&](int buf) {
    const QueryTile t = walk.tile(a, staged);
    staged.next(walk, a);
    int lim[3];
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) lim[ax] = t.nonempty ? t.box.hi[ax] - t.box.lo[ax] : 0;
    const int64_t tok0 = t.nonempty ? token_of(a, t.box.grp, t.box.lo) : 0;
    qrows.stage(Qs + buf * S::kTile, q, row0, tok0, lim, a.heads, t.h, a.dim);
    qrows.stage(Os + buf * S::kTile, d_o, row0, tok0, lim, a.heads, t.h, a.dim_v);
    for (int n = threadIdx.x; n < S::kRowsTile; n += kThreads) {
      int off[3], l[3];
      tile_offsets(n, a.qlog, off);
      const bool in = off[0] < lim[0] && off[1] < lim[1] && off[2] < lim[2];
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) l[ax] = t.box.lo[ax] + off[ax];
      const int64_t i = in ? (row0 + token_of(a, t.box.grp, l)) * a.heads + t.h : 0;
      cp_async8(Ls + buf * S::kRowsTile + n, p.stats + i, in);
      cp_async4(Ds + buf * S::kRowsTile + n, p.delta + i, in);
    }
    cp_async_commit();
  };

  if (walk.total > 0) stage_queries(0);
  for (int64_t it = 0; it < walk.total; ++it) {
    if (it + 1 < walk.total) {
      stage_queries((it + 1) & 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int buf = static_cast<int>(it & 1);
    const float* qs = Qs + buf * S::kTile + c0;
    const float* os = Os + buf * S::kTile + c0;
    const float2* ls = Ls + buf * S::kRowsTile;
    const float* ds = Ds + buf * S::kRowsTile;
    const QueryTile t = walk.tile(a, current);
    current.next(walk, a);
    const float* rpb = a.R && spatial ? p.rpb + static_cast<int64_t>(t.h) * a.R : nullptr;
    for (int n = 0; n < S::kRowsTile; ++n) {
      int off[3], qc[3];
      tile_offsets(n, a.qlog, off);
      bool in = key_ok && t.nonempty;
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        qc[ax] = t.box.lo[ax] + off[ax];
        in = in && qc[ax] < t.box.hi[ax];
        if (spatial && !t.full)
          in = in && static_cast<unsigned>(qc[ax] - qf[ax]) < static_cast<unsigned>(qn[ax]);
      }
      const float x = row_sum<S::kLanes>(dot_cols<C>(k, qs + n * S::kLd));
      const float dp = row_sum<S::kLanes>(dot_cols<C>(v, os + n * S::kLd));
      const float bias2 = rpb != nullptr && in ? __ldg(rpb + rpb_index(a, qc, kl)) * kLog2e : 0.f;
      const float pr = in ? exp2f(softmax_weight_exp2(x, a.scale_log2, ls[n], bias2)) : 0.f;
      axpy_cols<C>(dv, pr, os + n * S::kLd);
      axpy_cols<C>(dk, pr * (dp - ds[n]), qs + n * S::kLd);
    }
    __syncthreads();  // the next iteration overwrites this buffer
  }
  if (krow < 0) return;
  float* dk_out = static_cast<float*>(spatial ? p.dk : p.dadd_k);
  float* dv_out = static_cast<float*>(spatial ? p.dv : p.dadd_v);
  store_cols<C>(dk_out + krow * a.dim, dk, c0, a.dim, a.scale);
  store_cols<C>(dv_out + krow * a.dim_v, dv, c0, a.dim_v, 1.f);
}

template <int DT>
constexpr int f32_smem(bool dkdv) {  // two double-buffered tiles (+ statistics / delta rows)
  return 4 * F32Shape<DT>::kTile * 4 + (dkdv ? 6 * F32Shape<DT>::kRowsTile * 4 : 0);
}

// Raises the kernel's dynamic shared-memory limit to `limit` once per process, then launches.

template <typename F>
ffi::Error by_tile(int dt, F&& f) {
  switch (dt) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return invalid("fused: no float32 kernel for head-dim tile " + std::to_string(dt));
  }
}

// Host-side values of the shape that serves head-dim tile dt (32, 64 or 128).
template <typename F>
int f32_shape_value(int dt, F&& f) {
  return dt <= 32 ? f(std::integral_constant<int, 32>{})
                  : dt <= 64 ? f(std::integral_constant<int, 64>{})
                             : f(std::integral_constant<int, 128>{});
}

}  // namespace

static_assert((1 << f32_tile_log(32)) == F32Shape<32>::kRowsTile &&
                  (1 << f32_tile_log(64)) == F32Shape<64>::kRowsTile &&
                  (1 << f32_tile_log(128)) == F32Shape<128>::kRowsTile,
              "tiling.h plans the float32 kernels' tiles");
int f32_dq_smem(int dt) {
  return f32_shape_value(dt, [](auto d) { return f32_smem<decltype(d)::value>(false); });
}

ffi::Error launch_forward_f32(cudaStream_t stream, int dt, const FnaArgs& a, const FnaPtrs& p,
                              int64_t batch) {
  return by_tile(dt, [&](auto dtc) {
    constexpr int DT = decltype(dtc)::value;
    const dim3 grid(static_cast<unsigned>(a.q_tiles), a.heads, static_cast<unsigned>(batch));
    constexpr int kSmem = f32_smem<DT>(false);
    return launch_kernel<fna_fwd_f32_kernel<DT>>("fna forward (float32)", kSmem, kSmem, grid,
                                              stream, a, p);
  });
}

ffi::Error launch_backward_f32(cudaStream_t stream, int dt, const FnaArgs& dq_args,
                               const FnaArgs& kv_args, const FnaPtrs& p, int64_t batch) {
  return by_tile(dt, [&](auto dtc) {
    constexpr int DT = decltype(dtc)::value;
    const int dq_smem = f32_smem<DT>(false) + (dq_args.drpb_in_smem ? dq_args.R * 4 : 0);
    const dim3 dq_grid(static_cast<unsigned>(dq_args.q_tiles), dq_args.heads,
                       static_cast<unsigned>(batch));
    NATTEN_TRY(launch_kernel<fna_dq_f32_kernel<DT>>("fna backward dq (float32)", kMaxDqSmem,
                                                 dq_smem, dq_grid, stream, dq_args, p));
    const dim3 kv_grid(static_cast<unsigned>(kv_args.kv_tiles + kv_args.add_tiles),
                       kv_args.kv_heads, static_cast<unsigned>(batch));
    constexpr int kSmem = f32_smem<DT>(true);
    return launch_kernel<fna_dkdv_f32_kernel<DT>>("fna backward dk/dv (float32)", kSmem, kSmem,
                                               kv_grid, stream, kv_args, p);
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
