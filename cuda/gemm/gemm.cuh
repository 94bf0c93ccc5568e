// GEMM-based (unfused) neighborhood-attention kernels, backend="gemm": what the paper's "PN", "NN"
// and "IN" operations share. Their kernels live in pn.cu, nn.cu and in.cu (one file each, so their
// template instances compile in parallel). All three are tiled matrix products on tensor cores
// (f16 / bf16 operands, f32 accumulation, hand-written `mma.sync.aligned.m16n8k16` + `ldmatrix`)
// or, for f32 inputs, the same tiles on FFMA in full precision. Window math comes from
// natten/window.h only.
//
// ---- Tiles --------------------------------------------------------------------------------
// A CTA (128 threads, 4 warps) owns a tile of up to 64 tokens that is a box in the local
// coordinates of ONE dilation group (per axis a: group g_a = x % d_a, local i = x / d_a), for one
// batch element and one head: 1-D runs of 64, 2-D 8x8, 3-D 4x4x4 (host: make_gemm_args, which hands
// the factors of an axis too short to use them to the other axes). Because a query's window start
// and end never decrease as the query grows (window.h), the union of the windows of a query tile is
// per axis the range [start(first), end(last)): a "key box". Symmetrically the queries whose
// windows hold any key of a key tile form per axis the range [inverse(first).first,
// inverse(last).last]: a "query box". Boxes are linearized row-major (x, y, z) and the GEMM's
// reduction / column index walks them; window tests (per box line, see below) mask what a box
// holds beyond one row's window. Dilation never appears except in the token address
// (global = g + local * d).
//
// ---- The three products (C is 64 x 64 per CTA, reduction steps of 32) ---------------------------
//   PN  out[m, t] = sum_e A[m, e] B[n, e] for the key n of the box at window offset t of query m.
//       A = query-like rows (q, or do), B = key-box rows (k, or v) followed by the S additional
//       rows; the CTA walks the key box in chunks of 64 keys and for each chunk scatters the
//       in-window products (+ rpb) to their offsets t (and additional keys to K + s). Entries past
//       a causal query are written with `fill` in a separate pass (-inf for qk, 0 for dw).
//       qk_fwd (w = q k^T), av_bwd (dw = do v^T).
//   NN  out[m, :] = sum_r W~[m, r] V[r, :], r over the key box + additional keys, where
//       W~[m, r] = w[m, t(m, r)] if key r is in query m's window, else 0 (scattered per tile; never
//       reads an entry past a causal query). Grid also splits the output columns in chunks of 64.
//       av_fwd (o = w v), qk_bwd (dq = dw k).
//   IN  out[j, :] = sum_{(c, g)} W~[j, (c, g)] A[(c, g), :], over the query box c of a key tile and
//       the G query heads g of the kv head, W~ = w[c, h, t(c, j)] if key j is in c's window, else
//       0.
//       qk_bwd (dk = dw^T q), av_bwd (dv = w^T do). One CTA per (key tile, kv head, column chunk):
//       no atomics, deterministic.
// Additional-token gradients and the rpb gradient reuse the naive reduction kernels.
//
// ---- Inside a CTA -------------------------------------------------------------------------
// Contiguous operands (q / k / v / do rows) are staged global -> registers -> shared memory in
// 16-byte vectors (head dims are multiples of 8, so rows are 16-byte aligned), double buffered:
// the loads of step s + 1 are in flight while step s computes. The weights operand of NN / IN is
// never tested element by element: per step, each thread zeroes a block of the shared A tile it
// owns and then walks the "box lines" (fixed x, y; z varies) that cross that block, writing only
// the z-run of each line that lies inside the window (w is read in contiguous runs of a row and
// converted to the compute type; nothing past a causal query is read). The PN epilogue does the
// same in reverse: it walks lines of (query, key block) and stores only in-window products, so it
// touches exactly the elements it writes. Block widths: PN 16 keys (2-D / 3-D) or 4 keys (long
// 1-D lines: a warp's stores stay coalesced); NN 16 keys; IN 16 keys with the lanes over
// reduction columns, or 8 keys with the 8 lanes of a column adjacent for long 1-D tiles.
// Shared tiles: A [64 m][32 k] (IN: [32 k][64 m]), B [64 n][32 k] (PN) or [32 k][64 n] (NN, IN),
// rows padded by 16 bytes (conflict-free ldmatrix). Tensor-core path: warp (wm, wn) owns a 32 x 32
// quarter of C = 2 x 4 m16n8 tiles; A fragments by ldmatrix.x4 (.trans for IN's [k][m]), B by
// ldmatrix.x4 (.trans for [k][n]). FFMA path: thread owns 8 rows x 4 columns, float4 shared loads;
// its sums run in the naive kernels' order, so f32 results equal the naive backend's bit for bit.
// The accumulators then go to a shared f32 C tile (aliasing the stage buffers) and the op's
// epilogue writes the outputs (16-byte stores for NN / IN). No atomics anywhere: deterministic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "natten/cuda_common.h"
#include "natten/mma.cuh"
#include "natten/window.h"

namespace natten {
namespace gpu {
namespace gemm {

constexpr int kBM = 64;          // rows of a CTA tile (tokens of the query / key tile)
constexpr int kBN = 64;          // columns of a CTA tile (keys for PN, features for NN / IN)
constexpr int kBK = 32;          // reduction step
constexpr int kCtaThreads = 128;  // 4 warps
constexpr int kLdC = kBN + 4;    // pitch of the shared f32 C tile
static_assert(kBK == 32, "the weight loaders split a step's 32 columns over the threads");
// CTAs per SM the register budget is sized for: 5 for the tensor-core kernels (<= 102 registers),
// 3 for the FFMA ones (their 64 x 64 f32 tile takes more registers per thread).
template <typename T>
constexpr int kMinBlocks = sizeof(T) == 4 ? 3 : 5;

// Runtime dtype code of a weights buffer (w may differ from the compute type in av ops).
enum : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Kernel arguments: the naive kernels' Params plus the tiling.
struct GemmArgs {
  Params p;         // p.dim: feature size of the contiguous operand (D or Dv)
  int tile[3];      // tile extent per axis (local coordinates), product <= 64
  int tpg[3];       // tiles per dilation group per axis: ceil(ceil(L / d) / tile)
  int units[3];     // dilation * tpg: tile slots per axis
  int64_t tiles;    // units[0] * units[1] * units[2]
  int chunks;       // column chunks of 64 (NN, IN); 1 for PN
  int wtype;        // dtype code of the weights operand / PN output
};

// ---- element helpers ----------------------------------------------------------------------------
__device__ __forceinline__ float load_any(const void* base, int64_t i, int type) {
  if (type == kF32) return static_cast<const float*>(base)[i];
  if (type == kF16) return __half2float(static_cast<const __half*>(base)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
}

__device__ __forceinline__ void store_any(void* base, int64_t i, float v, int type) {
  if (type == kF32) static_cast<float*>(base)[i] = v;
  else if (type == kF16) static_cast<__half*>(base)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
}

template <typename T>
struct Cfg {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte vector
  static constexpr int kLdA = kBK + kVec;  // pitch of A [m][k] and of B [n][k]
  static constexpr int kLdB = kBN + kVec;  // pitch of B [k][n]
  static constexpr int kA = kBM * kLdA;
  static constexpr int kB = (kBN * kLdA > kBK * kLdB) ? kBN * kLdA : kBK * kLdB;
  static constexpr int kStage = kA + kB;  // elements of one stage (A then B)
  static constexpr int kStageBytes = 2 * kStage * static_cast<int>(sizeof(T));
  static constexpr int kCBytes = kBM * kLdC * 4;
  static constexpr int kBytes = kStageBytes > kCBytes ? kStageBytes : kCBytes;
};

// kVec floats -> one 16-byte vector of T.
template <typename T>
__device__ __forceinline__ uint4 pack16(const float* v) {
  uint4 r;
  if constexpr (std::is_same<T, float>::value) {
    r = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                   __float_as_uint(v[3]));
  } else {
    unsigned u[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same<T, __half>::value) {
        __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
        memcpy(&u[i], &h, 4);
      } else {
        __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        memcpy(&u[i], &h, 4);
      }
    }
    r = make_uint4(u[0], u[1], u[2], u[3]);
  }
  return r;
}

__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ int64_t token_of(const Params& p, int x, int y, int z) {
  return (static_cast<int64_t>(x) * p.Y + y) * p.Z + z;
}

// ---- tile geometry ------------------------------------------------------------------------------
// The tile slot `tile` (row-major over the three axes' units) -> per axis the dilation group, its
// length and the tile's local range [lo, hi). False when the tile is empty (a short group).
struct Geometry {
  int grp[3], lg[3], lo[3], hi[3];
};

__device__ __forceinline__ bool tile_geometry(const GemmArgs& g, int64_t tile, Geometry& t) {
  int64_t rest = tile;
  bool nonempty = true;
#pragma unroll
  for (int a = 2; a >= 0; --a) {
    const int u = static_cast<int>(rest % g.units[a]);
    rest /= g.units[a];
    const AxisParams& ax = g.p.ax[a];
    t.grp[a] = u / g.tpg[a];
    t.lg[a] = group_length(ax.length, ax.dilation, t.grp[a]);
    t.lo[a] = (u % g.tpg[a]) * g.tile[a];
    t.hi[a] = imin(t.lo[a] + g.tile[a], t.lg[a]);
    nonempty = nonempty && t.lo[a] < t.lg[a];
  }
  return nonempty;
}

// Row m of a tile -> local coordinates per axis; false if m lies outside the tile.
__device__ __forceinline__ bool tile_row(const GemmArgs& g, const Geometry& t, int m, int (&i)[3]) {
  const int mz = m % g.tile[2];
  const int my = (m / g.tile[2]) % g.tile[1];
  const int mx = m / (g.tile[2] * g.tile[1]);
  i[0] = t.lo[0] + mx;
  i[1] = t.lo[1] + my;
  i[2] = t.lo[2] + mz;
  return mx < g.tile[0] && i[0] < t.hi[0] && i[1] < t.hi[1] && i[2] < t.hi[2];
}

// The key box of a query tile: per axis the union of its queries' windows, local keys
// [kb0, kb0 + nb) (window starts and ends never decrease as the query grows).
__device__ __forceinline__ void key_box(const GemmArgs& g, const Geometry& t, int (&kb0)[3],
                                        int (&nb)[3]) {
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    const AxisParams& A = g.p.ax[ax];
    kb0[ax] = window_start(t.lo[ax], t.lg[ax], A.kernel, A.stride, A.causal);
    nb[ax] = window_end(t.hi[ax] - 1, t.lg[ax], A.kernel, A.stride, A.causal) - kb0[ax];
  }
}

// Linear index r of a box with extents n[3] -> box coordinates.
__device__ __forceinline__ void box_coords(int r, const int (&n)[3], int (&c)[3]) {
  c[2] = r % n[2];
  const int rest = r / n[2];
  c[1] = rest % n[1];
  c[0] = rest / n[1];
}

// Walks the box lines (fixed x, y box coordinates; z runs along the line) that hold the box-linear
// range [lo, hi): f(bx, by, z0, z1, base) for the part z in [z0, z1) of each line, whose key
// z has linear index base + z. Two divisions in all; the rest is incremental.
// kSkipDiv: skip the divisions when they are trivial (1-D boxes: one line), at some register
// cost (the NN loader, tight on registers, walks without it).
template <bool kSkipDiv = true, typename F>
__device__ __forceinline__ void for_lines(int lo, int hi, int nb1, int nb2, F&& f) {
  if (lo >= hi) return;
  const int l = (kSkipDiv && lo < nb2) ? 0 : lo / nb2;
  int z = lo - l * nb2;
  int bx = (kSkipDiv && nb1 == 1) ? l : l / nb1, by = l - bx * nb1;
  for (int r = lo; r < hi;) {
    const int z1 = imin(nb2, z + (hi - r));
    f(bx, by, z, z1, r - z);
    r += z1 - z;
    z = 0;
    if (++by == nb1) {
      by = 0;
      ++bx;
    }
  }
}

// One reduction step (kBK) of the 64 x 64 tile: acc += A * B. A is stored [m][k] (pitch kLdA), or
// [k][m] (pitch kLdAT) when kAT; B is stored [n][k] (pitch kLdA, kKN false) or [k][n] (pitch kLdB).
// Tensor cores for f16 / bf16, FFMA for f32.
// Accumulator layout, tensor cores: acc[(mi * 4 + ni) * 4 + e] is C[wm*32 + mi*16 + gid + 8*(e/2)]
// [wn*32 + ni*8 + 2*tig + e%2] (gid = lane / 4, tig = lane % 4).  FFMA: acc[i * 4 + j] is
// C[row(i)][col(j)], row(i) = tm + 8 i (tm * 8 + i when kAT), col(j) = tn + 16 j for [n][k] B and
// tn * 4 + j for [k][n] B (tm = tid / 16, tn = tid % 16).
template <typename T>
constexpr int kLdAT = kBM + Cfg<T>::kVec;  // pitch of A stored [k][m]

template <typename T, bool kKN, bool kAT>
__device__ __forceinline__ void tile_step(const T* As, const T* Bs, float (&acc)[32]) {
  static_assert(!kAT || kKN, "A [k][m] is only used with B [k][n]");
  using C = Cfg<T>;
  const int tid = threadIdx.x;
  if constexpr (std::is_same<T, float>::value) {
    const int tm = tid / 16, tn = tid % 16;
    if constexpr (kAT) {
#pragma unroll 8
      for (int k = 0; k < kBK; ++k) {
        const float4 a0 = *reinterpret_cast<const float4*>(As + k * kLdAT<T> + tm * 8);
        const float4 a1 = *reinterpret_cast<const float4*>(As + k * kLdAT<T> + tm * 8 + 4);
        const float4 b = *reinterpret_cast<const float4*>(Bs + k * C::kLdB + tn * 4);
        const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float bb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i * 4 + j] = fmaf(a[i], bb[j], acc[i * 4 + j]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kBK; k += 4) {
        float a[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float4 v = *reinterpret_cast<const float4*>(As + (tm + 8 * i) * C::kLdA + k);
          a[i][0] = v.x; a[i][1] = v.y; a[i][2] = v.z; a[i][3] = v.w;
        }
        if constexpr (kKN) {
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const float4 b = *reinterpret_cast<const float4*>(Bs + (k + kk) * C::kLdB + tn * 4);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              acc[i * 4 + 0] = fmaf(a[i][kk], b.x, acc[i * 4 + 0]);
              acc[i * 4 + 1] = fmaf(a[i][kk], b.y, acc[i * 4 + 1]);
              acc[i * 4 + 2] = fmaf(a[i][kk], b.z, acc[i * 4 + 2]);
              acc[i * 4 + 3] = fmaf(a[i][kk], b.w, acc[i * 4 + 3]);
            }
          }
        } else {
          float b[4][4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float4 v = *reinterpret_cast<const float4*>(Bs + (tn + 16 * j) * C::kLdA + k);
            b[j][0] = v.x; b[j][1] = v.y; b[j][2] = v.z; b[j][3] = v.w;
          }
#pragma unroll
          for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
              for (int j = 0; j < 4; ++j)
                acc[i * 4 + j] = fmaf(a[i][kk], b[j][kk], acc[i * 4 + j]);
        }
      }
    }
  } else {
    const int lane = tid % 32, warp = tid / 32;
    const int wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      unsigned af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        if constexpr (kAT)
          ldsm_x4_trans(af[mi], As + (kk + (lane & 7) + (lane >> 4) * 8) * kLdAT<T> + wm * 32 +
                                    mi * 16 + ((lane >> 3) & 1) * 8);
        else
          ldsm_x4(af[mi], As + (wm * 32 + mi * 16 + (lane & 15)) * C::kLdA + kk + (lane >> 4) * 8);
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        unsigned r[4];
        if constexpr (kKN)
          ldsm_x4_trans(r, Bs + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * C::kLdB + wn * 32 +
                               nj * 16 + (lane >> 4) * 8);
        else
          ldsm_x4(r, Bs + (wn * 32 + nj * 16 + (lane & 7) + (lane >> 4) * 8) * C::kLdA + kk +
                         ((lane >> 3) & 1) * 8);
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          mma16816<T>(acc + (mi * 4 + ni) * 4, af[mi], bf[ni][0], bf[ni][1]);
    }
  }
}

// Accumulators -> the shared f32 C tile [kBM][kLdC].
template <typename T, bool kKN, bool kAT>
__device__ __forceinline__ void store_acc(const float (&acc)[32], float* Cs) {
  const int tid = threadIdx.x;
  if constexpr (std::is_same<T, float>::value) {
    const int tm = tid / 16, tn = tid % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float* row = Cs + (kAT ? tm * 8 + i : tm + 8 * i) * kLdC;
      if constexpr (kKN) {
        *reinterpret_cast<float4*>(row + tn * 4) =
            make_float4(acc[i * 4 + 0], acc[i * 4 + 1], acc[i * 4 + 2], acc[i * 4 + 3]);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) row[tn + 16 * j] = acc[i * 4 + j];
      }
    }
  } else {
    const int lane = tid % 32, warp = tid / 32;
    const int wm = warp / 2, wn = warp % 2, gid = lane / 4, tig = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const float* d = acc + (mi * 4 + ni) * 4 + 2 * hh;
          *reinterpret_cast<float2*>(Cs + (wm * 32 + mi * 16 + gid + 8 * hh) * kLdC + wn * 32 +
                                     ni * 8 + 2 * tig) = make_float2(d[0], d[1]);
        }
  }
}

// The double-buffered main loop. `ld.load(s, As, Bs)` starts step s: it may fetch into registers
// and may write the stage (As, Bs) directly (that stage is free: its last readers finished before
// the previous barrier); `ld.store(As, Bs)` then writes the registers to the stage. The loads of
// step s + 1 are issued before step s computes. Ends with a barrier, after which the stage
// buffers (and so the C tile that aliases them) are free.
template <typename T, bool kKN, bool kAT, typename Loader>
__device__ __forceinline__ void mainloop(Loader& ld, int steps, unsigned char* smem,
                                         float (&acc)[32]) {
  using C = Cfg<T>;
  T* buf = reinterpret_cast<T*>(smem);
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;
  if (steps <= 0) return;
  ld.load(0, buf, buf + C::kA);
  ld.store(buf, buf + C::kA);
  __syncthreads();
  for (int s = 0; s < steps; ++s) {
    T* cur = buf + (s & 1) * C::kStage;
    T* nxt = buf + ((s + 1) & 1) * C::kStage;
    const bool more = s + 1 < steps;
    if (more) ld.load(s + 1, nxt, nxt + C::kA);
    tile_step<T, kKN, kAT>(cur, cur + C::kA, acc);
    if (more) ld.store(nxt, nxt + C::kA);
    __syncthreads();
  }
}

// ---- loaders ------------------------------------------------------------------------------
// Rows of a tile come from an array of row pointers or from a functor row_of(r); nullptr: zeros.
template <typename T>
__device__ __forceinline__ const T* row_at(const T* const* rows, int r) {
  return rows[r];
}
template <typename T, typename RowOf>
__device__ __forceinline__ const T* row_at(const RowOf& row_of, int r) {
  return row_of(r);
}

// A Rows x Cols tile of row-major rows: rows [r0, r0 + Rows) of `rows` (see row_at), columns
// [c0, c0 + Cols) masked at `dim`, loaded as 16-byte vectors into registers (so the next step's
// loads overlap this step's MMAs), then stored into shared memory with row pitch `Pitch`.
template <typename T, int Rows, int Cols, int Pitch>
struct StagedTile {
  static constexpr int kVec = Cfg<T>::kVec;
  static constexpr int kVpr = Cols / kVec;
  static constexpr int kN = Rows * kVpr / kCtaThreads;
  uint4 r[kN];
  template <typename RowSource>
  __device__ __forceinline__ void load(const RowSource& rows, int r0, int c0, int dim) {
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const int idx = threadIdx.x + i * kCtaThreads;
      const int col = c0 + (idx % kVpr) * kVec;
      const T* p = row_at<T>(rows, r0 + idx / kVpr);
      r[i] = (p != nullptr && col < dim) ? ldg16(p + col) : make_uint4(0, 0, 0, 0);
    }
  }
  __device__ __forceinline__ void store(T* s) const {
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const int idx = threadIdx.x + i * kCtaThreads;
      *reinterpret_cast<uint4*>(s + (idx / kVpr) * Pitch + (idx % kVpr) * kVec) = r[i];
    }
  }
};

// 64 rows x kBK columns into a [row][k] tile (the A operand, pitch kLdA).
template <typename T>
using RowTile = StagedTile<T, kBM, kBK, Cfg<T>::kLdA>;
// kBK reduction rows x 64 columns into a [k][n] tile (the B operand, pitch kLdB).
template <typename T>
using ColTile = StagedTile<T, kBK, kBN, Cfg<T>::kLdB>;

// Zeroes 16 consecutive elements of a shared row (16-byte aligned).
template <typename T>
__device__ __forceinline__ void zero16(T* p) {
#pragma unroll
  for (int i = 0; i < 16 / Cfg<T>::kVec; ++i)
    reinterpret_cast<uint4*>(p)[i] = make_uint4(0, 0, 0, 0);
}

// Zeroes n (a multiple of 4) consecutive elements of a shared row, aligned to 4 elements.
template <typename T>
__device__ __forceinline__ void zero_n(T* p, int n) {
  for (int i = 0; i < n; i += 4) {
    if constexpr (sizeof(T) == 4)
      *reinterpret_cast<uint4*>(p + i) = make_uint4(0, 0, 0, 0);
    else
      *reinterpret_cast<uint2*>(p + i) = make_uint2(0, 0);
  }
}

// Writes the 64 x 64 C tile to out[rows[m] * dim + n0 + n] with 16-byte stores (rows < 0 skipped).
template <typename T>
__device__ __forceinline__ void write_rows(const float* Cs, const int64_t* rows, T* out, int n0,
                                           int dim) {
  constexpr int kVec = Cfg<T>::kVec, kVpr = kBN / kVec;
  for (int idx = threadIdx.x; idx < kBM * kVpr; idx += kCtaThreads) {
    const int m = idx / kVpr, col = (idx % kVpr) * kVec;
    const int64_t row = rows[m];
    if (row < 0 || n0 + col >= dim) continue;
    float v[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = Cs[m * kLdC + col + i];
    *reinterpret_cast<uint4*>(out + row * dim + n0 + col) = pack16<T>(v);
  }
}

// ---- host side: tiling and launch arguments -----------------------------------------------------
inline int dtype_code(ffi::DataType t) {
  return t == ffi::DataType::F32 ? kF32 : (t == ffi::DataType::F16 ? kF16 : kBF16);
}

// Tile shape: start from 1 x 1 x 1 and double the smallest axis that can still grow (ties: the
// later, contiguous axis) until 64 tokens; an axis grows only up to its longest dilation group.
// 1-D: 64, 2-D: 8 x 8, 3-D: 4 x 4 x 4; a short axis hands its share to the others.
inline ffi::Error make_gemm_args(const Problem& p, int64_t dim, int64_t chunk_dim, int wtype,
                                 GemmArgs& g) {
  NATTEN_TRY(make_params(p, dim, g.p));
  int cap[3];
  int64_t lgmax[3];
  for (int a = 0; a < kMaxRank; ++a) {
    lgmax[a] = (p.extent[a] + p.axis[a].dilation - 1) / p.axis[a].dilation;
    cap[a] = 1;
    while (cap[a] < lgmax[a] && cap[a] < kBM) cap[a] *= 2;
    g.tile[a] = 1;
  }
  for (int prod = 1; prod < kBM; prod *= 2) {
    int best = -1;
    for (int a = kMaxRank - 1; a >= 0; --a)
      if (g.tile[a] < cap[a] && (best < 0 || g.tile[a] < g.tile[best])) best = a;
    if (best < 0) break;
    g.tile[best] *= 2;
  }
  g.tiles = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    const int64_t tpg = (lgmax[a] + g.tile[a] - 1) / g.tile[a];
    g.tpg[a] = static_cast<int>(tpg);
    g.units[a] = static_cast<int>(tpg * p.axis[a].dilation);
    g.tiles *= g.units[a];
  }
  g.chunks = static_cast<int>((chunk_dim + kBN - 1) / kBN);
  g.wtype = wtype;
  return ok();
}

inline ffi::Error grid_of(int64_t blocks, unsigned& grid) {
  if (blocks > 2147483647)
    return invalid("problem too large for the gemm kernels' grid (" + std::to_string(blocks) +
                   " CTAs)");
  grid = static_cast<unsigned>(blocks);
  return ok();
}

}  // namespace gemm
}  // namespace gpu
}  // namespace natten
