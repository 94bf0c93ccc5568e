// Naive CUDA kernels for neighborhood attention (backend="naive"): the paper's baseline and a
// second GPU oracle. Every output element is computed by one thread (or, for the long sums over all
// queries, by one block with a fixed-order reduction), with f32 accumulation, no atomics, and so
// bit-for-bit deterministic results. Window math comes from natten/window.h only.
//
// Layout (cuda/README.md), all row-major, N = X * Y * Z tokens, token n = (x * Y + y) * Z + z:
//   "query-like"  [B, N, H, dim]      q, do, dq, o           row = (b * N + n) * H + h
//   "kv-like"     [B, N, KVH, dim]    k, v, dk, dv           offset ((b * N + n) * KVH + kvh) * dim
//   weights       [B, N, H, W]        w, dw; W = K + S       offset row * W + t
//   additional    [B, S, KVH, dim]    add_k, add_v, grads    offset ((b * S + s) * KVH + kvh) * dim
//   rpb           [H, rx, ry, rz]     rx = 2 kx - 1,  offset ((h * rx + ix) * ry + iy) * rz + iz
//   drpb          [B, H, rx, ry, rz]                         offset (b * H + h) * R + r
// Window offset t < K is row-major over (kx, ky, kz): t = (tx * ky + ty) * kz + tz; along axis a,
// offset ta of query c is the key at global coordinate start_a + ta * dilation_a (axis_window), and
// it is attended iff ta < count_a on every axis (count < kernel only past a causal query).
// Offsets t >= K are the additional tokens s = t - K (every query attends all of them).
// Query head h reads kv head h / G, G = H / KVH.
#pragma once

#include <cmath>

#include "natten/cuda_common.h"
#include "natten/window.h"

namespace natten {
namespace gpu {
namespace naive {

constexpr int kBlockThreads = 256;  // threads of a block: one output element each, or a tree sum

// ---- small device helpers -----------------------------------------------------------------------
__device__ __forceinline__ void token_coords(const Params& p, int64_t n, int& x, int& y, int& z) {
  z = static_cast<int>(n % p.Z);
  const int64_t r = n / p.Z;
  y = static_cast<int>(r % p.Y);
  x = static_cast<int>(r / p.Y);
}

__device__ __forceinline__ int64_t token_index(const Params& p, int x, int y, int z) {
  return (static_cast<int64_t>(x) * p.Y + y) * p.Z + z;
}

template <typename TA, typename TB>
__device__ __forceinline__ float dot(const TA* __restrict__ a, const TB* __restrict__ b, int n) {
  float acc = 0.f;
  for (int i = 0; i < n; ++i) acc = fmaf(load(a + i), load(b + i), acc);
  return acc;
}

// Inverse neighborhood along one axis, for global key coordinate `key`: the local queries
// [first, last] of the key's dilation group whose windows hold it, plus what is needed to turn a
// local query i into its global coordinate (group + i * dilation) and its window offset
// (local_key - window_start(i)).
struct AxisInverse {
  int group;      // key % dilation: only queries of the same group see the key
  int local_key;  // key / dilation
  int group_len;  // tokens in the group
  QueryRange range;
};

__device__ __forceinline__ AxisInverse axis_inverse(const AxisParams& a, int key) {
  AxisInverse r;
  r.group = key % a.dilation;
  r.local_key = key / a.dilation;
  r.group_len = group_length(a.length, a.dilation, r.group);
  r.range = inverse_window(r.local_key, r.group_len, a.kernel, a.stride, a.causal);
  return r;
}

// Window offset of the key along this axis for local query i, or -1 if the key is not attended.
// For i in the inverse range it is always attended (start and end are monotone in i); the check is
// kept as a cheap guard so a window.h change can never make this kernel read out of its window.
__device__ __forceinline__ int axis_offset(const AxisParams& a, const AxisInverse& inv, int i) {
  const int start = window_start(i, inv.group_len, a.kernel, a.stride, a.causal);
  const int end = a.causal ? i + 1 : start + a.kernel;  // == window_end, without recomputing start
  const int t = inv.local_key - start;
  return (t >= 0 && inv.local_key < end) ? t : -1;
}

// ---- kernel 1: window dot -----------------------------------------------------------------------
// out[b, n, h, t] = a[b, n, h, :] . kv[b, nbr_t(n), h / G, :]  (+ rpb[h, rel_t(n)])   for t < K
//                 = fill                                       if offset t is past a causal query
//                 = a[b, n, h, :] . add_kv[b, t - K, h / G, :]                      for t >= K
// Thread per output element idx = row * W + t, row = (b * N + n) * H + h; loop over dim.
// qk_fwd: a = q, kv = k, add_kv = add_k, fill = -inf.  av_bwd (dw): a = do, kv = v, add_kv = add_v,
// no rpb, fill = 0.
template <typename TA, typename TKV, typename TO>
__global__ void __launch_bounds__(kBlockThreads, 1)
window_dot_kernel(Params p, const TA* __restrict__ a, const TKV* __restrict__ kv,
                  const TKV* __restrict__ add_kv, const float* __restrict__ rpb,
                  TO* __restrict__ out, float fill) {
  const int64_t total = p.batch * p.tokens * p.heads * p.W;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int t = static_cast<int>(idx % p.W);
    const int64_t row = idx / p.W;
    const int h = static_cast<int>(row % p.heads);
    const int64_t bn = row / p.heads;  // b * N + n
    const int64_t b = bn / p.tokens;
    const int64_t n = bn % p.tokens;
    const int kvh = h / p.group;
    const TA* arow = a + row * p.dim;
    float acc;
    if (t < p.K) {
      const int tz = t % p.kz;
      const int ty = (t / p.kz) % p.ky;
      const int tx = t / (p.kz * p.ky);
      int x, y, z;
      token_coords(p, n, x, y, z);
      const AxisWindow wx = axis_window(p.ax[0], x);
      const AxisWindow wy = axis_window(p.ax[1], y);
      const AxisWindow wz = axis_window(p.ax[2], z);
      if (tx >= wx.count || ty >= wy.count || tz >= wz.count) {  // past a causal query
        store(out + idx, fill);
        continue;
      }
      const int64_t key = token_index(p, wx.start + tx * wx.step, wy.start + ty * wy.step,
                                      wz.start + tz * wz.step);
      acc = dot(arow, kv + ((b * p.tokens + key) * p.kv_heads + kvh) * p.dim, p.dim);
      if (rpb != nullptr) {
        // rpb0 + offset is (j - i) + k - 1 in local coordinates: always in [0, 2k - 2].
        const int64_t rel =
            ((static_cast<int64_t>(h) * p.rx + (wx.rpb0 + tx)) * p.ry + (wy.rpb0 + ty)) * p.rz +
            (wz.rpb0 + tz);
        acc += rpb[rel];
      }
    } else {
      const int s = t - p.K;
      acc = dot(arow, add_kv + ((b * p.S + s) * p.kv_heads + kvh) * p.dim, p.dim);
    }
    store(out + idx, acc);
  }
}

// ---- kernel 2: window gather --------------------------------------------------------------------
// out[b, n, h, e] = sum_{valid t < K} w[b, n, h, t] * kv[b, nbr_t(n), h / G, e]
//                 + sum_{s < S} w[b, n, h, K + s] * add_kv[b, s, h / G, e]
// Thread per output element idx = row * dim + e; loops over the valid window offsets only, so
// weights past a causal query (e.g. -inf logits) are never read.
// av_fwd: w = w, kv = v, add_kv = add_v.  qk_bwd (dq): w = dw, kv = k, add_kv = add_k.
template <typename TW, typename TKV, typename TO>
__global__ void __launch_bounds__(kBlockThreads, 1)
window_gather_kernel(Params p, const TW* __restrict__ w, const TKV* __restrict__ kv,
                     const TKV* __restrict__ add_kv, TO* __restrict__ out) {
  const int64_t total = p.batch * p.tokens * p.heads * p.dim;
  const int64_t kv_token_stride = static_cast<int64_t>(p.kv_heads) * p.dim;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int e = static_cast<int>(idx % p.dim);
    const int64_t row = idx / p.dim;
    const int h = static_cast<int>(row % p.heads);
    const int64_t bn = row / p.heads;
    const int64_t b = bn / p.tokens;
    const int64_t n = bn % p.tokens;
    const int kvh = h / p.group;
    const TW* wrow = w + row * p.W;
    // kv[b, token, kvh, e] = kv_base[token * kv_token_stride]
    const TKV* kv_base = kv + (b * p.tokens * p.kv_heads + kvh) * p.dim + e;
    int x, y, z;
    token_coords(p, n, x, y, z);
    const AxisWindow wx = axis_window(p.ax[0], x);
    const AxisWindow wy = axis_window(p.ax[1], y);
    const AxisWindow wz = axis_window(p.ax[2], z);
    float acc = 0.f;
    for (int tx = 0; tx < wx.count; ++tx) {
      const int kx = wx.start + tx * wx.step;
      for (int ty = 0; ty < wy.count; ++ty) {
        const int ky = wy.start + ty * wy.step;
        const int t0 = (tx * p.ky + ty) * p.kz;
        for (int tz = 0; tz < wz.count; ++tz) {
          const int64_t key = token_index(p, kx, ky, wz.start + tz * wz.step);
          acc = fmaf(load(wrow + t0 + tz), load(kv_base + key * kv_token_stride), acc);
        }
      }
    }
    if (p.S > 0) {  // add_kv may be a null, empty buffer otherwise
      const TKV* add_base = add_kv + (b * p.S * p.kv_heads + kvh) * p.dim + e;
      for (int s = 0; s < p.S; ++s)
        acc = fmaf(load(wrow + p.K + s), load(add_base + s * kv_token_stride), acc);
    }
    store(out + idx, acc);
  }
}

// ---- kernel 3: inverse-neighborhood gather ------------------------------------------------------
// out[b, j, kvh, e] = sum over queries c whose window holds key j, at offset t(c, j),
//                     and over the G query heads h = kvh * G + g of this kv head:
//                     w[b, c, h, t(c, j)] * a[b, c, h, e]
// Thread per output element idx = ((b * N + j) * KVH + kvh) * dim + e. Per axis the queries holding
// the key are one local range of the key's own dilation group (natten::inverse_window), so their
// box is walked directly; t(c, j) per axis is local_key - window_start(local query). Causal offsets
// past a query never occur in that range (end(i) > local_key), so masked weights are never read.
// Fixed loop order (x, y, z, head): deterministic.
// qk_bwd (dk): w = dw, a = q.  av_bwd (dv): w = w, a = do.
template <typename TW, typename TA, typename TO>
__global__ void __launch_bounds__(kBlockThreads, 1)
inverse_gather_kernel(Params p, const TW* __restrict__ w, const TA* __restrict__ a,
                      TO* __restrict__ out) {
  const int64_t total = p.batch * p.tokens * p.kv_heads * p.dim;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int e = static_cast<int>(idx % p.dim);
    const int64_t r = idx / p.dim;
    const int kvh = static_cast<int>(r % p.kv_heads);
    const int64_t bj = r / p.kv_heads;
    const int64_t b = bj / p.tokens;
    const int64_t j = bj % p.tokens;
    int jx, jy, jz;
    token_coords(p, j, jx, jy, jz);
    const AxisInverse ix = axis_inverse(p.ax[0], jx);
    const AxisInverse iy = axis_inverse(p.ax[1], jy);
    const AxisInverse iz = axis_inverse(p.ax[2], jz);
    // Row (b * N + c) * H + kvh * G + g of query token c, head g of the group, is at
    // w_base + c * H * W + g * W (+ t) and a_base + c * H * dim + g * dim.
    const int64_t first_row = b * p.tokens * p.heads + static_cast<int64_t>(kvh) * p.group;
    const TW* w_base = w + first_row * p.W;
    const TA* a_base = a + first_row * p.dim + e;
    const int64_t w_token_stride = static_cast<int64_t>(p.heads) * p.W;
    const int64_t a_token_stride = static_cast<int64_t>(p.heads) * p.dim;
    float acc = 0.f;
    for (int qi = ix.range.first; qi <= ix.range.last; ++qi) {
      const int tx = axis_offset(p.ax[0], ix, qi);
      if (tx < 0) continue;
      const int cx = ix.group + qi * p.ax[0].dilation;
      for (int qj = iy.range.first; qj <= iy.range.last; ++qj) {
        const int ty = axis_offset(p.ax[1], iy, qj);
        if (ty < 0) continue;
        const int cy = iy.group + qj * p.ax[1].dilation;
        for (int qk = iz.range.first; qk <= iz.range.last; ++qk) {
          const int tz = axis_offset(p.ax[2], iz, qk);
          if (tz < 0) continue;
          const int64_t c = token_index(p, cx, cy, iz.group + qk * p.ax[2].dilation);
          const TW* wc = w_base + c * w_token_stride + (tx * p.ky + ty) * p.kz + tz;
          const TA* ac = a_base + c * a_token_stride;
#pragma unroll 1
          for (int g = 0; g < p.group; ++g) {
            acc = fmaf(load(wc + static_cast<int64_t>(g) * p.W),
                       load(ac + static_cast<int64_t>(g) * p.dim), acc);
          }
        }
      }
    }
    store(out + idx, acc);
  }
}

// ---- kernel 4: additional-token reduction -------------------------------------------------------
// out[b, s, kvh, e] = sum over all queries n and the G heads h of kv head kvh:
//                     w[b, n, h, K + s] * a[b, n, h, e]
// One block (kRedLanes x kRedRows threads) per (b, s, kvh, chunk of kRedLanes features); lane x
// owns feature e = chunk * kRedLanes + x, row y sums the (query, head) pairs m = y, y + kRedRows, ...
// (m = n * G + g), then row 0 adds the kRedRows partials in a fixed order: deterministic.
// qk_bwd (dadd_k): w = dw, a = q.  av_bwd (dadd_v): w = w, a = do.
constexpr int kRedLanes = 32;
constexpr int kRedRows = 16;

template <typename TW, typename TA, typename TO>
__global__ void __launch_bounds__(kRedLanes * kRedRows)
additional_reduce_kernel(Params p, const TW* __restrict__ w, const TA* __restrict__ a,
                         TO* __restrict__ out) {
  __shared__ float partial[kRedRows][kRedLanes + 1];
  const int chunks = (p.dim + kRedLanes - 1) / kRedLanes;
  const int64_t blocks = p.batch * p.S * p.kv_heads * chunks;
  const int64_t pairs = p.tokens * p.group;
  for (int64_t blk = blockIdx.x; blk < blocks; blk += gridDim.x) {  // uniform over the block
    const int chunk = static_cast<int>(blk % chunks);
    int64_t r = blk / chunks;
    const int kvh = static_cast<int>(r % p.kv_heads);
    r /= p.kv_heads;
    const int s = static_cast<int>(r % p.S);
    const int64_t b = r / p.S;
    const int e = chunk * kRedLanes + static_cast<int>(threadIdx.x);
    float acc = 0.f;
    if (e < p.dim) {
      for (int64_t m = threadIdx.y; m < pairs; m += kRedRows) {
        const int64_t n = m / p.group;
        const int g = static_cast<int>(m % p.group);
        const int64_t row = (b * p.tokens + n) * p.heads + static_cast<int64_t>(kvh) * p.group + g;
        acc = fmaf(load(w + row * p.W + p.K + s), load(a + row * p.dim + e), acc);
      }
    }
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && e < p.dim) {
      float sum = 0.f;
      for (int i = 0; i < kRedRows; ++i) sum += partial[i][threadIdx.x];
      store(out + ((b * p.S + s) * p.kv_heads + kvh) * p.dim + e, sum);
    }
    __syncthreads();  // partial is reused by the next block-stride iteration
  }
}

// ---- kernel 5: relative-positional-bias gradient ------------------------------------------------
// drpb[b, h, r] = sum over queries n with a valid window offset t at relative index r:
//                 dw[b, n, h, t],   r = (ix, iy, iz), offset along axis a: ta = ia - rpb0_a(n),
//                 valid iff 0 <= ta < count_a(n) on every axis.
// One block (kBlockThreads) per (b, h, r); threads stride over the queries, then a fixed tree
// reduction in shared memory: deterministic, no atomics. Per-batch partial sums (Python sums them
// over B).
template <typename TW>
__global__ void __launch_bounds__(kBlockThreads, 1)
rpb_grad_kernel(Params p, const TW* __restrict__ dw, float* __restrict__ drpb) {
  static_assert((kBlockThreads & (kBlockThreads - 1)) == 0,
                "tree reduction needs a power-of-two block");
  __shared__ float partial[kBlockThreads];
  const int64_t blocks = p.batch * p.heads * p.R;
  for (int64_t blk = blockIdx.x; blk < blocks; blk += gridDim.x) {  // blk == (b * H + h) * R + r
    const int r = static_cast<int>(blk % p.R);
    const int64_t bh = blk / p.R;
    const int h = static_cast<int>(bh % p.heads);
    const int64_t b = bh / p.heads;
    const int iz = r % p.rz;
    const int iy = (r / p.rz) % p.ry;
    const int ix = r / (p.rz * p.ry);
    float acc = 0.f;
    for (int64_t n = threadIdx.x; n < p.tokens; n += kBlockThreads) {
      int x, y, z;
      token_coords(p, n, x, y, z);
      const AxisWindow wx = axis_window(p.ax[0], x);
      const int tx = ix - wx.rpb0;
      if (tx < 0 || tx >= wx.count) continue;
      const AxisWindow wy = axis_window(p.ax[1], y);
      const int ty = iy - wy.rpb0;
      if (ty < 0 || ty >= wy.count) continue;
      const AxisWindow wz = axis_window(p.ax[2], z);
      const int tz = iz - wz.rpb0;
      if (tz < 0 || tz >= wz.count) continue;
      const int t = (tx * p.ky + ty) * p.kz + tz;
      acc += load(dw + ((b * p.tokens + n) * p.heads + h) * p.W + t);
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = kBlockThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) drpb[blk] = partial[0];
    __syncthreads();  // partial is reused by the next block-stride iteration
  }
}

// ---- launchers (gpu::launch: skip empty launches, check every launch) ---------------------------
// Blocks of kBlockThreads threads, one thread per item in a grid-stride loop.
inline unsigned item_grid(int64_t items) { return items == 0 ? 0 : grid_for(items, kBlockThreads); }

template <typename TA, typename TKV, typename TO>
ffi::Error launch_window_dot(cudaStream_t stream, const Params& p, const void* a, const void* kv,
                             const void* add_kv, const float* rpb, void* out, float fill) {
  return launch("naive window_dot_kernel", window_dot_kernel<TA, TKV, TO>,
                item_grid(p.batch * p.tokens * p.heads * p.W), kBlockThreads, stream, p,
                static_cast<const TA*>(a), static_cast<const TKV*>(kv),
                static_cast<const TKV*>(add_kv), rpb, static_cast<TO*>(out), fill);
}

template <typename TW, typename TKV, typename TO>
ffi::Error launch_window_gather(cudaStream_t stream, const Params& p, const void* w, const void* kv,
                                const void* add_kv, void* out) {
  return launch("naive window_gather_kernel", window_gather_kernel<TW, TKV, TO>,
                item_grid(p.batch * p.tokens * p.heads * p.dim), kBlockThreads, stream, p,
                static_cast<const TW*>(w), static_cast<const TKV*>(kv),
                static_cast<const TKV*>(add_kv), static_cast<TO*>(out));
}

template <typename TW, typename TA, typename TO>
ffi::Error launch_inverse_gather(cudaStream_t stream, const Params& p, const void* w, const void* a,
                                 void* out) {
  return launch("naive inverse_gather_kernel", inverse_gather_kernel<TW, TA, TO>,
                item_grid(p.batch * p.tokens * p.kv_heads * p.dim), kBlockThreads, stream, p,
                static_cast<const TW*>(w), static_cast<const TA*>(a), static_cast<TO*>(out));
}

template <typename TW, typename TA, typename TO>
ffi::Error launch_additional_reduce(cudaStream_t stream, const Params& p, const void* w,
                                    const void* a, void* out) {
  const int64_t blocks =
      p.batch * p.S * p.kv_heads * static_cast<int64_t>((p.dim + kRedLanes - 1) / kRedLanes);
  return launch("naive additional_reduce_kernel", additional_reduce_kernel<TW, TA, TO>,
                blocks == 0 ? 0 : grid_for(blocks, 1), dim3(kRedLanes, kRedRows), stream, p,
                static_cast<const TW*>(w), static_cast<const TA*>(a), static_cast<TO*>(out));
}

template <typename TW>
ffi::Error launch_rpb_grad(cudaStream_t stream, const Params& p, const void* dw, float* drpb) {
  const int64_t blocks = p.batch * p.heads * p.R;
  return launch("naive rpb_grad_kernel", rpb_grad_kernel<TW>, blocks == 0 ? 0 : grid_for(blocks, 1),
                kBlockThreads, stream, p, static_cast<const TW*>(dw), drpb);
}

// ---- the backward ops' reductions, shared by the naive and gemm handlers (reductions.cu) -------
// qk_bwd: dadd_k from dw and q (dtype t), and drpb when the call has a bias.
ffi::Error launch_qk_bwd_reductions(cudaStream_t stream, const Params& p, ffi::DataType t,
                                    bool has_rpb, const void* dw, const void* q, void* dadd_k,
                                    float* drpb);
// av_bwd: dadd_v from w (dtype wt) and do (dtype vt).
ffi::Error launch_av_bwd_reduction(cudaStream_t stream, const Params& p, ffi::DataType wt,
                                   ffi::DataType vt, const void* w, const void* d_o, void* dadd_v);

}  // namespace naive
}  // namespace gpu
}  // namespace natten
