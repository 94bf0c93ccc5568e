// PN (qk_fwd: w = q k^T + rpb; av_bwd: dw = do v^T): the kernel and its launcher. The shared
// tiling, loaders and main loop are in gemm.cuh, which describes the three products.
#include "gemm.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace gemm {

// Width of the key blocks one thread owns in the PN epilogue: 16 when box lines are short (2-D /
// 3-D: a block spans a few lines, and each thread walks only the runs inside its query's window),
// 4 when they are long (1-D: lanes then cover consecutive keys of one weights row, so the stores
// of a warp stay coalesced). (The NN weights tile keeps blocks of 16 with the row's window in
// registers: measured faster there, and the 4-wide variant spilled.)
__device__ __forceinline__ int block_log2(int line) { return line >= 32 ? 2 : 4; }

// ---- PN: qk_fwd (w = q k^T + rpb), av_bwd (dw = do v^T) -----------------------------------------
// Grid: B * H * tiles CTAs, blockIdx.x = (b * H + h) * tiles + tile. a: [B, N, H, dim] rows,
// kv / add_kv: [B, N, KVH, dim] / [B, S, KVH, dim], out: [B, N, H, W] of dtype g.wtype.
// Epilogue of a chunk of 64 keys: item (m, q) = query m, key block q (block_log2); it walks the
// box lines of those keys and writes only the z-run of each line inside m's window, so it touches
// exactly the products it stores.
template <typename T>
__global__ void __launch_bounds__(kCtaThreads, kMinBlocks<T>)
pn_kernel(GemmArgs g, const T* __restrict__ a, const T* __restrict__ kv,
          const T* __restrict__ add_kv, const float* __restrict__ rpb, void* __restrict__ out,
          float fill) {
  using C = Cfg<T>;
  __shared__ __align__(128) unsigned char smem[C::kBytes];
  __shared__ const T* arow[kBM];   // query rows of a (nullptr: no query)
  __shared__ int64_t orow[kBM];    // output row (b * N + n) * H + h, -1: no query
  __shared__ int qs[3][kBM];       // window start relative to the key box, per axis
  __shared__ int qc[3][kBM];       // window length per axis (< kernel only past a causal query)
  __shared__ int qr[3][kBM];       // rpb index of window offset 0 per axis
  __shared__ const T* brow[kBN];   // rows of the current key chunk (nullptr: past the keys)

  const Params& p = g.p;
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x % g.tiles;
  const int64_t bh = blockIdx.x / g.tiles;
  const int h = static_cast<int>(bh % p.heads);
  const int64_t b = bh / p.heads;
  const int kvh = h / p.group;
  Geometry t;
  if (!tile_geometry(g, tile, t)) return;  // uniform over the CTA
  int kb0[3], nb[3];
  key_box(g, t, kb0, nb);
  const int box = nb[0] * nb[1] * nb[2];
  const int keys = box + p.S;

  if (tid < kBM) {
    int i[3];
    const bool valid = tile_row(g, t, tid, i);
    int64_t row = -1;
    if (valid) {
      int x[3];
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        const AxisParams& A = p.ax[ax];
        const int s = window_start(i[ax], t.lg[ax], A.kernel, A.stride, A.causal);
        const int e = window_end(i[ax], t.lg[ax], A.kernel, A.stride, A.causal);
        qs[ax][tid] = s - kb0[ax];
        qc[ax][tid] = e - s;
        qr[ax][tid] = s - i[ax] + A.kernel - 1;
        x[ax] = t.grp[ax] + i[ax] * A.dilation;
      }
      row = (b * p.tokens + token_of(p, x[0], x[1], x[2])) * p.heads + h;
    }
    orow[tid] = row;
    arow[tid] = valid ? a + row * p.dim : nullptr;
  }

  struct Loader {
    RowTile<T> A, B;
    const T* const* arow;
    const T* const* brow;
    int dim;
    __device__ __forceinline__ void load(int s, T*, T*) {
      A.load(arow, 0, s * kBK, dim);
      B.load(brow, 0, s * kBK, dim);
    }
    __device__ __forceinline__ void store(T* As, T* Bs) const {
      A.store(As);
      B.store(Bs);
    }
  };
  const int steps = (p.dim + kBK - 1) / kBK;
  float* Cs = reinterpret_cast<float*>(smem);

  for (int c0 = 0; c0 < keys; c0 += kBN) {
    __syncthreads();  // the previous chunk's epilogue is done with brow and C
    if (tid < kBN) {
      const int r = c0 + tid;
      const T* ptr = nullptr;
      if (r < box) {
        int c[3];
        box_coords(r, nb, c);
        int x[3];
#pragma unroll
        for (int ax = 0; ax < 3; ++ax) x[ax] = t.grp[ax] + (kb0[ax] + c[ax]) * p.ax[ax].dilation;
        ptr = kv + ((b * p.tokens + token_of(p, x[0], x[1], x[2])) * p.kv_heads + kvh) * p.dim;
      } else if (r < keys) {
        ptr = add_kv + ((b * p.S + (r - box)) * p.kv_heads + kvh) * p.dim;
      }
      brow[tid] = ptr;
    }
    __syncthreads();
    Loader ld{RowTile<T>{}, RowTile<T>{}, arow, brow, static_cast<int>(p.dim)};
    float acc[32];
    mainloop<T, false, false>(ld, steps, smem, acc);
    store_acc<T, false, false>(acc, Cs);
    __syncthreads();
    const int bl = block_log2(nb[2]);         // key blocks of 1 << bl keys
    const int nbl = (kBN >> bl);                // blocks per chunk (a power of two)
    for (int e = tid; e < kBM * nbl; e += kCtaThreads) {
      const int m = e / nbl;
      const int64_t row = orow[m];
      if (row < 0) continue;
      const int lo = c0 + (e & (nbl - 1)) * (1 << bl);
      const int hi = imin(lo + (1 << bl), keys);
      const float* crow = Cs + m * kLdC - c0;  // crow[r]: product with box-linear key r
      const int64_t obase = row * p.W;
      const int s0 = qs[0][m], s1 = qs[1][m], s2 = qs[2][m];
      const int n0 = qc[0][m], n1 = qc[1][m], n2 = qc[2][m];
      for_lines(lo, imin(hi, box), nb[1], nb[2], [&](int bx, int by, int z0, int z1, int base) {
        const int tx = bx - s0, ty = by - s1;
        if (static_cast<unsigned>(tx) >= static_cast<unsigned>(n0) ||
            static_cast<unsigned>(ty) >= static_cast<unsigned>(n1))
          return;
        const int za = imax(z0, s2), zb = imin(z1, s2 + n2);
        const int64_t tbase = obase + (tx * p.ky + ty) * p.kz - s2;  // + z: the output element
        if (rpb != nullptr) {
          const float* bias = rpb + ((static_cast<int64_t>(h) * p.rx + (qr[0][m] + tx)) * p.ry +
                                     (qr[1][m] + ty)) * p.rz + qr[2][m] - s2;
          for (int z = za; z < zb; ++z)
            store_any(out, tbase + z, crow[base + z] + bias[z], g.wtype);
        } else {
          for (int z = za; z < zb; ++z) store_any(out, tbase + z, crow[base + z], g.wtype);
        }
      });
      for (int r = imax(lo, box); r < hi; ++r)
        store_any(out, obase + p.K + (r - box), crow[r], g.wtype);
    }
  }
  // Window offsets past a causal query: never produced above; write `fill`.
  if (p.ax[0].causal || p.ax[1].causal || p.ax[2].causal) {
    for (int e = tid; e < kBM * p.K; e += kCtaThreads) {
      const int m = e / p.K, slot = e % p.K;
      const int64_t row = orow[m];
      if (row < 0) continue;
      const int tz = slot % p.kz, ty = (slot / p.kz) % p.ky, tx = slot / (p.kz * p.ky);
      if (tx >= qc[0][m] || ty >= qc[1][m] || tz >= qc[2][m])
        store_any(out, row * p.W + slot, fill, g.wtype);
    }
  }
}

ffi::Error launch_pn(cudaStream_t stream, ffi::DataType t, const Problem& p, int64_t dim,
                     const void* a, const void* kv, const void* add_kv, const float* rpb,
                     void* out, ffi::DataType out_t, float fill) {
  GemmArgs g;
  NATTEN_TRY(make_gemm_args(p, dim, /*chunk_dim=*/kBN, dtype_code(out_t), g));
  unsigned grid;
  NATTEN_TRY(grid_of(p.batch * p.heads * g.tiles, grid));
  if (g.p.W == 0) return ok();
  return dispatch_float(t, [&](auto tag) -> ffi::Error {
    using T = typename decltype(tag)::type;
    return launch("gemm pn_kernel", pn_kernel<T>, grid, kCtaThreads, stream, g,
                  static_cast<const T*>(a), static_cast<const T*>(kv),
                  static_cast<const T*>(add_kv), rpb, out, fill);
  });
}

}  // namespace gemm
}  // namespace gpu
}  // namespace natten
