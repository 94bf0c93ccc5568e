// NN (av_fwd: o = w v; qk_bwd: dq = dw k): the kernel and its launcher. The shared tiling,
// loaders and main loop are in gemm.cuh, which describes the three products.
#include "gemm.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace gemm {

// ---- NN: av_fwd (o = w v), qk_bwd (dq = dw k) ---------------------------------------------------
// Grid: B * H * tiles * chunks, blockIdx.x = ((b * H + h) * tiles + tile) * chunks + chunk.
// w: [B, N, H, W] (dtype g.wtype), kv / add_kv: [B, N, KVH, dim] / [B, S, KVH, dim],
// out: [B, N, H, dim]. Reduction index r: key r of the box (r < box), additional token r - box.
// A tile of step s: thread (m, q) = (tid / 2, tid % 2) owns row m, columns [16q, 16q + 16): it
// zeroes them, then writes the weights of the box-line z-runs inside m's window (no barrier: the
// same thread writes both).
template <typename T>
__global__ void __launch_bounds__(kCtaThreads, kMinBlocks<T>)
nn_kernel(GemmArgs g, const void* __restrict__ w, const T* __restrict__ kv,
          const T* __restrict__ add_kv, T* __restrict__ out) {
  using C = Cfg<T>;
  __shared__ __align__(128) unsigned char smem[C::kBytes];
  __shared__ int64_t qrow[kBM];  // (b * N + n) * H + h, -1: no query
  __shared__ int qs[3][kBM];
  __shared__ int qc[3][kBM];

  const Params& p = g.p;
  const int tid = threadIdx.x;
  const int chunk = static_cast<int>(blockIdx.x % g.chunks);
  const int64_t rest = blockIdx.x / g.chunks;
  const int64_t tile = rest % g.tiles;
  const int64_t bh = rest / g.tiles;
  const int h = static_cast<int>(bh % p.heads);
  const int64_t b = bh / p.heads;
  const int kvh = h / p.group;
  Geometry t;
  if (!tile_geometry(g, tile, t)) return;
  int kb0[3], nb[3];
  key_box(g, t, kb0, nb);
  const int box = nb[0] * nb[1] * nb[2];
  const int keys = box + p.S;

  if (tid < kBM) {
    int i[3];
    int64_t row = -1;
    if (tile_row(g, t, tid, i)) {
      int x[3];
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        const AxisParams& A = p.ax[ax];
        const int s = window_start(i[ax], t.lg[ax], A.kernel, A.stride, A.causal);
        qs[ax][tid] = s - kb0[ax];
        qc[ax][tid] = window_end(i[ax], t.lg[ax], A.kernel, A.stride, A.causal) - s;
        x[ax] = t.grp[ax] + i[ax] * A.dilation;
      }
      row = (b * p.tokens + token_of(p, x[0], x[1], x[2])) * p.heads + h;
    }
    qrow[tid] = row;
  }
  __syncthreads();

  struct KeyRow {  // row of reduction index r in kv / add_kv, nullptr past the keys
    const Params* p;
    const T* kv;
    const T* add_kv;
    int64_t b;
    int kvh, box, keys;
    int kb0[3], nb[3], grp[3];
    __device__ __forceinline__ const T* operator()(int r) const {
      if (r < box) {
        int c[3];
        box_coords(r, nb, c);
        const int64_t n = token_of(*p, grp[0] + (kb0[0] + c[0]) * p->ax[0].dilation,
                                   grp[1] + (kb0[1] + c[1]) * p->ax[1].dilation,
                                   grp[2] + (kb0[2] + c[2]) * p->ax[2].dilation);
        return kv + ((b * p->tokens + n) * p->kv_heads + kvh) * p->dim;
      }
      if (r < keys) return add_kv + ((b * p->S + (r - box)) * p->kv_heads + kvh) * p->dim;
      return nullptr;
    }
  };
  struct Loader {
    ColTile<T> B;
    KeyRow keyrow;
    const Params* p;
    const void* w;
    int wtype, n0, dim, box, keys, nb1, nb2;
    int m, q;                    // this thread's A row and column half
    int64_t wrow;                // weights offset of row m (-1: no query)
    int s0, s1, s2, n0w, n1w, n2w;  // row m's window: box-relative start, length per axis
    __device__ __forceinline__ void load(int s, T* As, T*) {
      B.load(keyrow, s * kBK, n0, dim);
      T* arow = As + m * Cfg<T>::kLdA + 16 * q;
      zero16(arow);
      if (wrow < 0) return;
      const int lo = s * kBK + 16 * q, hi = imin(lo + 16, keys);
      T* acol = arow - lo;  // acol[r]: column of reduction index r
      for_lines<false>(lo, imin(hi, box), nb1, nb2, [&](int bx, int by, int z0, int z1, int base) {
        const int tx = bx - s0, ty = by - s1;
        if (static_cast<unsigned>(tx) >= static_cast<unsigned>(n0w) ||
            static_cast<unsigned>(ty) >= static_cast<unsigned>(n1w))
          return;
        const int za = imax(z0, s2), zb = imin(z1, s2 + n2w);
        const int64_t wbase = wrow + (tx * p->ky + ty) * p->kz - s2;
        for (int z = za; z < zb; ++z) gpu::store<T>(acol + base + z, load_any(w, wbase + z, wtype));
      });
      for (int r = imax(lo, box); r < hi; ++r)
        gpu::store<T>(acol + r, load_any(w, wrow + p->K + (r - box), wtype));
    }
    __device__ __forceinline__ void store(T*, T* Bs) const { B.store(Bs); }
  };
  Loader ld;
  ld.keyrow.p = &p;
  ld.keyrow.kv = kv;
  ld.keyrow.add_kv = add_kv;
  ld.keyrow.b = b;
  ld.keyrow.kvh = kvh;
  ld.keyrow.box = box;
  ld.keyrow.keys = keys;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    ld.keyrow.kb0[ax] = kb0[ax];
    ld.keyrow.nb[ax] = nb[ax];
    ld.keyrow.grp[ax] = t.grp[ax];
  }
  ld.p = &p;
  ld.w = w;
  ld.wtype = g.wtype;
  ld.n0 = chunk * kBN;
  ld.dim = p.dim;
  ld.box = box;
  ld.keys = keys;
  ld.nb1 = nb[1];
  ld.nb2 = nb[2];
  ld.m = tid >> 1;
  ld.q = tid & 1;
  const int64_t row = qrow[ld.m];
  ld.wrow = row < 0 ? -1 : row * p.W;
  ld.s0 = qs[0][ld.m];
  ld.s1 = qs[1][ld.m];
  ld.s2 = qs[2][ld.m];
  ld.n0w = qc[0][ld.m];
  ld.n1w = qc[1][ld.m];
  ld.n2w = qc[2][ld.m];

  float acc[32];
  mainloop<T, true, false>(ld, (keys + kBK - 1) / kBK, smem, acc);
  float* Cs = reinterpret_cast<float*>(smem);
  store_acc<T, true, false>(acc, Cs);
  __syncthreads();
  write_rows<T>(Cs, qrow, out, chunk * kBN, p.dim);
}

ffi::Error launch_nn(cudaStream_t stream, ffi::DataType t, const Problem& p, int64_t dim,
                     const void* w, ffi::DataType w_t, const void* kv, const void* add_kv,
                     void* out) {
  GemmArgs g;
  NATTEN_TRY(make_gemm_args(p, dim, /*chunk_dim=*/dim, dtype_code(w_t), g));
  unsigned grid;
  NATTEN_TRY(grid_of(p.batch * p.heads * g.tiles * g.chunks, grid));
  return dispatch_float(t, [&](auto tag) -> ffi::Error {
    using T = typename decltype(tag)::type;
    return launch("gemm nn_kernel", nn_kernel<T>, grid, kCtaThreads, stream, g, w,
                  static_cast<const T*>(kv), static_cast<const T*>(add_kv), static_cast<T*>(out));
  });
}

}  // namespace gemm
}  // namespace gpu
}  // namespace natten
