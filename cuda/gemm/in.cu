// IN (qk_bwd: dk = dw^T q; av_bwd: dv = w^T do): the kernel and its launcher. The shared tiling,
// loaders and main loop are in gemm.cuh, which describes the three products.
#include "gemm.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace gemm {

// ---- IN: qk_bwd (dk = dw^T q), av_bwd (dv = w^T do) ---------------------------------------------
// Grid: B * KVH * tiles * chunks, blockIdx.x = ((b * KVH + kvh) * tiles + tile) * chunks + chunk;
// the tile is a box of keys. w: [B, N, H, W] (dtype g.wtype), a: [B, N, H, dim] (q or do),
// out: [B, N, KVH, dim]. Reduction index r = c * G + g over the query box c and the heads g.
// A is stored [k][m] here: item (cl, q) = reduction column cl of the step, keys m of block q (4
// blocks of 16, lanes over columns; or, for long tile rows (1-D), 8 blocks of 8 with the lanes of
// one column adjacent, so they read consecutive weights of one row). Its thread zeroes the block,
// then walks the lines of (query window) x (key tile) and writes the weights of the runs inside.
template <typename T>
__global__ void __launch_bounds__(kCtaThreads, kMinBlocks<T>)
in_kernel(GemmArgs g, const void* __restrict__ w, const T* __restrict__ a, T* __restrict__ out) {
  using C = Cfg<T>;
  __shared__ __align__(128) unsigned char smem[C::kBytes];
  __shared__ int64_t orow[kBM];  // (b * N + key) * KVH + kvh, -1: no key

  const Params& p = g.p;
  const int tid = threadIdx.x;
  const int chunk = static_cast<int>(blockIdx.x % g.chunks);
  const int64_t rest = blockIdx.x / g.chunks;
  const int64_t tile = rest % g.tiles;
  const int64_t bk = rest / g.tiles;
  const int kvh = static_cast<int>(bk % p.kv_heads);
  const int64_t b = bk / p.kv_heads;
  Geometry t;
  if (!tile_geometry(g, tile, t)) return;
  int qf[3], nq[3];
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    const AxisParams& A = p.ax[ax];
    const QueryRange f = inverse_window(t.lo[ax], t.lg[ax], A.kernel, A.stride, A.causal);
    const QueryRange l = inverse_window(t.hi[ax] - 1, t.lg[ax], A.kernel, A.stride, A.causal);
    qf[ax] = f.first;
    nq[ax] = imax(l.last - f.first + 1, 0);
  }
  const int pairs = nq[0] * nq[1] * nq[2] * p.group;

  if (tid < kBM) {
    int j[3];
    int64_t row = -1;
    if (tile_row(g, t, tid, j)) {
      const int64_t n = token_of(p, t.grp[0] + j[0] * p.ax[0].dilation,
                                 t.grp[1] + j[1] * p.ax[1].dilation,
                                 t.grp[2] + j[2] * p.ax[2].dilation);
      row = (b * p.tokens + n) * p.kv_heads + kvh;
    }
    orow[tid] = row;
  }
  __syncthreads();

  // Reduction index r -> query (box coordinates -> local -> token) and head; its row index.
  struct Query {
    const Params* p;
    int64_t b;
    int kvh, pairs;
    int qf[3], nq[3], grp[3];
    // Row (b * N + n) * H + kvh * G + g of pair r, and the local query coordinates; false: none.
    __device__ __forceinline__ bool locate(int r, int64_t& row, int (&i)[3]) const {
      if (r >= pairs) return false;
      const int c = r / p->group, gg = r % p->group;
      int cc[3];
      box_coords(c, nq, cc);
      int x[3];
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        i[ax] = qf[ax] + cc[ax];
        x[ax] = grp[ax] + i[ax] * p->ax[ax].dilation;
      }
      row = (b * p->tokens + token_of(*p, x[0], x[1], x[2])) * p->heads +
            static_cast<int64_t>(kvh) * p->group + gg;
      return true;
    }
  };
  struct ARow {
    Query q;
    const T* a;
    __device__ __forceinline__ const T* operator()(int r) const {
      int64_t row;
      int i[3];
      return q.locate(r, row, i) ? a + row * q.p->dim : nullptr;
    }
  };
  struct Loader {
    ColTile<T> B;
    ARow arow;
    const void* w;
    int wtype, n0, dim;
    bool octets;                      // key blocks of 8 (else 16)
    int lg[3], lo[3], hi[3], T1, T2;  // key tile geometry
    __device__ __forceinline__ void load(int s, T* As, T*) {
      B.load(arow, s * kBK, n0, dim);
      const int width = octets ? 8 : 16, items = kBK * (kBM / width);
      for (int e = threadIdx.x; e < items; e += kCtaThreads) {
        const int cl = octets ? e >> 3 : e & 31;
        const int q = octets ? e & 7 : e >> 5;
        scatter(s, As, cl, q * width, q * width + width);
      }
    }
    // Column cl of step s, keys [mlo, mhi) of the tile.
    __device__ __forceinline__ void scatter(int s, T* As, int cl, int mlo, int mhi) {
      T* col = As + cl * kLdAT<T> + mlo;
      zero_n(col, mhi - mlo);
      int64_t row;
      int i[3];
      if (!arow.q.locate(s * kBK + cl, row, i)) return;
      const Params& p = *arow.q.p;
      int ws[3], k0[3], k1[3];  // query window start; its keys inside the tile [k0, k1)
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        const AxisParams& A = p.ax[ax];
        ws[ax] = window_start(i[ax], lg[ax], A.kernel, A.stride, A.causal);
        k0[ax] = imax(ws[ax], lo[ax]);
        k1[ax] = imin(window_end(i[ax], lg[ax], A.kernel, A.stride, A.causal), hi[ax]);
      }
      const int64_t wrow = row * p.W;
      T* cm = col - mlo;  // cm[m]: key m of the tile
      for (int jx = k0[0]; jx < k1[0]; ++jx) {
        for (int jy = k0[1]; jy < k1[1]; ++jy) {
          const int mline = ((jx - lo[0]) * T1 + (jy - lo[1])) * T2 - lo[2];  // m = mline + jz
          const int za = imax(k0[2], mlo - mline), zb = imin(k1[2], mhi - mline);
          const int64_t wbase = wrow + ((jx - ws[0]) * p.ky + (jy - ws[1])) * p.kz - ws[2];
          for (int jz = za; jz < zb; ++jz)
            gpu::store<T>(cm + mline + jz, load_any(w, wbase + jz, wtype));
        }
      }
    }
    __device__ __forceinline__ void store(T*, T* Bs) const { B.store(Bs); }
  };
  Query qq;
  qq.p = &p;
  qq.b = b;
  qq.kvh = kvh;
  qq.pairs = pairs;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    qq.qf[ax] = qf[ax];
    qq.nq[ax] = nq[ax];
    qq.grp[ax] = t.grp[ax];
  }
  Loader ld;
  ld.arow.q = qq;
  ld.arow.a = a;
  ld.w = w;
  ld.wtype = g.wtype;
  ld.n0 = chunk * kBN;
  ld.dim = p.dim;
  ld.octets = g.tile[2] >= 32;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    ld.lg[ax] = t.lg[ax];
    ld.lo[ax] = t.lo[ax];
    ld.hi[ax] = t.hi[ax];
  }
  ld.T1 = g.tile[1];
  ld.T2 = g.tile[2];

  float acc[32];
  mainloop<T, true, true>(ld, (pairs + kBK - 1) / kBK, smem, acc);
  float* Cs = reinterpret_cast<float*>(smem);
  store_acc<T, true, true>(acc, Cs);
  __syncthreads();
  write_rows<T>(Cs, orow, out, chunk * kBN, p.dim);
}

ffi::Error launch_in(cudaStream_t stream, ffi::DataType t, const Problem& p, int64_t dim,
                     const void* w, ffi::DataType w_t, const void* a, void* out) {
  GemmArgs g;
  NATTEN_TRY(make_gemm_args(p, dim, /*chunk_dim=*/dim, dtype_code(w_t), g));
  unsigned grid;
  NATTEN_TRY(grid_of(p.batch * p.kv_heads * g.tiles * g.chunks, grid));
  return dispatch_float(t, [&](auto tag) -> ffi::Error {
    using T = typename decltype(tag)::type;
    return launch("gemm in_kernel", in_kernel<T>, grid, kCtaThreads, stream, g, w,
                  static_cast<const T*>(a), static_cast<T*>(out));
  });
}

}  // namespace gemm
}  // namespace gpu
}  // namespace natten
