// Staging of the FNA kernels' operand tiles into shared memory with 16-byte cp.async copies: padded
// or core-matrix tiles, box-shaped (TileRows) or linear, and the double-buffered key walk.
#pragma once

#include <cstdint>

#include "args.cuh"
#include "natten/mma.cuh"
#include "natten/wgmma.cuh"
#include "walk.cuh"

namespace natten {
namespace gpu {
namespace fna {

// ---- staging ------------------------------------------------------------------------------------
// Copies ROWS rows of `cols` (<= DT) elements into a [ROWS][DT + 8] shared tile; row_ptr(r) gives
// the global row or nullptr (the row is then zero-filled, as are the columns past `cols`).
// kCore: the destination is a core-matrix tile (natten/wgmma.cuh) instead of a padded one.
// One warpgroup's threads copy (a warp-specialized kernel's producer too).
template <typename T, int DT, bool kCore = false, int ROWS = kRows, typename RowPtr>
__device__ __forceinline__ void stage_rows(T* s, RowPtr&& row_ptr, int cols, const void* any) {
  constexpr int kVecs = DT / 8;  // 16-byte vectors per row
#pragma unroll
  for (int v = threadIdx.x % kThreads; v < ROWS * kVecs; v += kThreads) {
    const int r = v / kVecs, c = (v % kVecs) * 8;
    const T* src = row_ptr(r);
    const bool valid = src != nullptr && c < cols;
    cp_async16(s + (kCore ? core_offset(r, c, DT) : r * (DT + 8) + c),
               valid ? static_cast<const void*>(src + c) : any, valid);
  }
}

// Staging of box tiles with per-thread precomputed rows. Thread t copies one 16-byte column `col`
// of rows row(0), row(1), ...: the same rows and column for every tile, so their offsets in the box
// and their token distances from the box origin are computed once; a tile then costs a bounds
// test and one address per copy. Two destination layouts:
//   padded (kCore = false): [ROWS][DT + 8] row-major (ldmatrix operands); a warp copies 4 whole
//     rows (DT = 64) per instruction;
//   core matrices (kCore = true, natten/wgmma.cuh): [ROWS][DT] in 8 x 8 blocks of 128 contiguous
//     bytes (wgmma operands); the 8 lanes of a quarter-warp copy the same column of 8 consecutive
//     rows, one core matrix, so a warp's writes fill 512 contiguous bytes without bank conflicts.
template <int DT, int ROWS, bool kCore = false, int kElems = 8>  // kElems per 16-byte copy
struct TileRows {
  static constexpr int kVecs = DT / kElems;
  static constexpr int kPer = ROWS * kVecs / kThreads;  // copies per thread
  static_assert(ROWS * kVecs % kThreads == 0, "tiles split evenly over the threads");
  static_assert(!kCore || (kVecs <= kThreads / 8 && kElems == 8), "8-row groups of 16-bit rows");
  int col;
  int packed[kPer];  // the row's offsets in the box: x | y << 10 | z << 20 (extents <= 128)
  int dtok[kPer];    // token index distance from the box origin (checked < 2^31 on the host)

  __device__ __forceinline__ TileRows(const FnaArgs& a, const int (&logs)[kMaxRank]) {
    const int tid = threadIdx.x % kThreads;
    col = kCore ? ((tid >> 3) % kVecs) * 8 : (tid % kVecs) * kElems;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      int off[3];
      tile_offsets(row(i), logs, off);
      packed[i] = off[0] | (off[1] << 10) | (off[2] << 20);
      dtok[i] = (off[0] * a.ax[0].dilation * a.Y + off[1] * a.ax[1].dilation) * a.Z +
                off[2] * a.ax[2].dilation;
    }
  }
  // (The thread's index within its warpgroup: a warp-specialized kernel's producer stages too.)
  __device__ __forceinline__ int row(int i) const {
    const int tid = threadIdx.x % kThreads;
    if constexpr (kCore)  // 8-row groups: kThreads / 8 / kVecs per pass
      return (tid & 7) + 8 * ((tid >> 3) / kVecs + i * (kThreads / 8 / kVecs));
    else
      return tid / kVecs + i * (kThreads / kVecs);
  }
  // Shared-memory element offset of copy i.
  __device__ __forceinline__ int dst(int i) const {
    const int r = row(i);
    return kCore ? ((r >> 3) * kVecs + (col >> 3)) * 64 + (r & 7) * 8 : r * (DT + 8) + col;
  }
  // Stages the box whose origin is token `tok0` of batch row `first` (= b * N): rows with an
  // offset >= lim on some axis, and columns >= cols, are zero-filled. Global row of token n:
  // base + ((first + n) * heads + head) * cols.
  template <typename T>
  __device__ __forceinline__ void stage(T* s, const T* base, int64_t first, int64_t tok0,
                                        const int (&lim)[3], int heads, int head, int cols) const {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int x = packed[i] & 1023, y = (packed[i] >> 10) & 1023, z = packed[i] >> 20;
      const bool valid = x < lim[0] && y < lim[1] && z < lim[2] && col < cols;
      const T* src = base + ((first + tok0 + dtok[i]) * heads + head) * cols + col;
      cp_async16(s + dst(i), valid ? static_cast<const void*>(src) : base, valid);
    }
  }
  // Stages rows [r0, r0 + ROWS) of a [rows, heads, cols] array (additional kv), zero past `rows`.
  template <typename T>
  __device__ __forceinline__ void stage_linear(T* s, const T* base, int64_t r0, int64_t rows,
                                               int heads, int head, int cols) const {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t r = r0 + row(i);
      const bool valid = r < rows && col < cols;
      const T* src = base + (r * heads + head) * cols + col;
      cp_async16(s + dst(i), valid ? static_cast<const void*>(src) : base, valid);
    }
  }
};

// Stages the key tiles of a query tile's walk (key_walk: the spatial tiles over its key box, then
// tiles of additional keys), one step j per call: its K and V rows into ks / vs as one cp.async
// group. ROWS keys a tile; kCore / kElems as for TileRows. The one key stager of the forward and
// dq kernels, tensor-core and float32. (The kernel's own values are passed in, not held: held
// copies cost registers the forward kernels do not have.)
template <typename T, int DT, int ROWS, bool kCore = false, int kElems = 8>
struct KeyStager {
  TileRows<DT, ROWS, kCore, kElems> rows;
  TileCounter next_tile;  // the next spatial key tile to stage

  __device__ __forceinline__ explicit KeyStager(const FnaArgs& a) : rows(a, a.kvlog) {
    next_tile.reset();
  }
  // Step j of query tile qb's walk, for batch element b (its first token row0) and kv head kvh.
  __device__ __forceinline__ void operator()(const FnaArgs& a, const FnaPtrs& p,
                                             const KeyWalk& walk, const Box& qb, int b,
                                             int64_t row0, int kvh, int j, T* ks, T* vs) {
    if (j < walk.spatial) {
      int o[3];
      bool full;
      key_tile(a, walk, next_tile, o, full);
      next_tile.next(walk.n);
      const int lim[3] = {qb.lg[0] - o[0], qb.lg[1] - o[1], qb.lg[2] - o[2]};
      const int64_t tok0 = token_of(a, qb.grp, o);
      rows.stage(ks, static_cast<const T*>(p.k), row0, tok0, lim, a.kv_heads, kvh, a.dim);
      rows.stage(vs, static_cast<const T*>(p.v), row0, tok0, lim, a.kv_heads, kvh, a.dim_v);
    } else {
      const int64_t s0 = static_cast<int64_t>(j - walk.spatial) * ROWS;
      const int64_t first = static_cast<int64_t>(b) * a.S;
      rows.stage_linear(ks, static_cast<const T*>(p.add_k), first + s0, first + a.S, a.kv_heads,
                        kvh, a.dim);
      rows.stage_linear(vs, static_cast<const T*>(p.add_v), first + s0, first + a.S, a.kv_heads,
                        kvh, a.dim_v);
    }
    cp_async_commit();
  }
};

// The double-buffered key walk of the forward and dq kernels (tensor-core and float32): before
// step j computes, stage step j + 1 into the other buffer (stage(step, buffer): one cp.async group
// per step; the caller staged step 0 into buffer 0) and wait for step j's own copies; the CTA
// barrier then makes every thread's copies visible to all, with kWgmma to the wgmma reads too.
template <bool kWgmma, typename Stage>
__device__ __forceinline__ void key_step_ready(int j, int total, Stage&& stage) {
  if (j + 1 < total) {
    stage(j + 1, (j + 1) & 1);
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  if constexpr (kWgmma) fence_proxy_async();  // cp.async writes -> wgmma reads
  __syncthreads();
}

// The synchronous kernels' walk over a query tile's key tiles (backward_dq.cu, simt_f32.cu;
// forward.cu writes it out: through this its mma.sync kernel at head-dim tile 128 spilled more):
// stage(j, buf) copies step j's tiles into buffer buf (one cp.async group),
// body(j, buf) computes on them; step j + 1's copies are in flight while step j computes
// (key_step_ready), and the barrier after each step lets the next overwrite the buffer it read.
template <bool kWgmma, typename Stage, typename Body>
__device__ __forceinline__ void double_buffered_walk(int total, Stage&& stage, Body&& body) {
  stage(0, 0);
  for (int j = 0; j < total; ++j) {
    key_step_ready<kWgmma>(j, total, stage);
    body(j, j & 1);
    __syncthreads();  // the next step overwrites this buffer
  }
}

// Step j of a key walk: a spatial tile (the one at `current`, which advances: its local origin o
// and whether it lies inside every window of the query tile) or a tile of additional keys (its
// first key s0; tiles of `rows` keys).
struct KeyStep {
  bool spatial, full;
  int o[3];
  int s0;
};
__device__ __forceinline__ KeyStep key_step(const FnaArgs& a, const KeyWalk& walk,
                                            TileCounter& current, int j, int rows) {
  KeyStep k;
  k.spatial = j < walk.spatial;
  k.full = false;
  k.o[0] = k.o[1] = k.o[2] = 0;
  if (k.spatial) {
    key_tile(a, walk, current, k.o, k.full);
    current.next(walk.n);
  }
  k.s0 = (j - walk.spatial) * rows;
  return k;
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
