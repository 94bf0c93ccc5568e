// Fused neighborhood attention (FNA), backend="fused": flash-attention-style kernels that never
// build the [N, prod(kernel)] attention matrix.
//
// ---- Tiles ------------------------------------------------------------------------------------
// A query tile is a box of 64 * MT tokens (MT = 1 or 2 m16 row tiles per warp, launch.h) in the
// local coordinates of ONE dilation group (per axis a: group g = x % d, local i = x / d), with
// power-of-two extents (1-D 128, 2-D e.g. 8x16, 3-D e.g. 4x4x8; tiling.h picks them per problem
// or takes the user's). Window starts and ends never
// decrease as the query grows (natten/window.h), so the keys of a query tile's windows lie per
// axis in [start(first query), end(last query)): the kernel walks that "key box" in key tiles,
// boxes of 64 keys of their own power-of-two shape. Key tiles inside the intersection of the
// tile's windows ([start(last), end(first)) per axis) are "full": no element is tested. The
// others test each score against the row's window (per axis: key in [start, end)). Dilation only
// appears in token addresses (global = g + local * d).
//   forward   fna_fwd_kernel: one CTA per (query tile, head, batch); online softmax over the key
//             tiles, then over tiles of additional keys; writes o and lse, and for a gradient
//             the softmax statistics and o in float32 ("softmax statistics" below).
//   backward  fna_delta_kernel: delta = rowsum(do * o32) - dlse, one f32 per query row.
//             fna_dq_kernel: the forward's walk again; recomputes P from the statistics, then
//             dS = P (do.v - delta), dq = scale * dS k, and accumulates d-rpb.
//             fna_bwd_kernel (backward.cu): one CTA per (key tile, kv head, batch) walks the
//             inverse box (queries whose windows hold any key of the tile: [first(lo),
//             last(hi - 1)] per axis, window.h) in query tiles, for every query head of the kv
//             head (GQA: no repeated kv), accumulating dk = scale * dS^T q and dv = P^T do in
//             registers. CTAs past the spatial key tiles own tiles of additional keys and walk
//             every query.
//   Two schedules. Default on Hopper: fna_bwd_kernel<kDq> alone also forms dq = dS k per step
//   and adds it to a float32 workspace with the copy engine (bulk reduce-add), plus d-rpb; a
//   convert kernel then writes dq. The adds land in any order (last bits vary run to run). Its
//   CTA has two roles (pipeline.cuh): a producer warpgroup stages the query-side tiles into a
//   ring of shared-memory stages handed over by mbarriers, the other warpgroup computes.
//   Deterministic mode and mma.sync (sm_80): fna_dq_kernel (backward_dq.cu) walks the forward's
//   key tiles and recomputes P for dq and d-rpb, fna_bwd_kernel computes dk / dv only: no
//   atomics on dq. d-rpb is summed in shared memory per CTA and added to the output with one
//   atomic per entry and CTA, so its last bits depend on the order the CTAs run in; in
//   deterministic mode the kernels skip it and the Python layer computes it from the unfused
//   kernels' fixed-order reductions (ops.py).
//
// ---- Inside a CTA ------------------------------------------------------------------------------
// 4 warps; warp w owns MT m16 tiles, rows 16 MT w .. 16 MT (w + 1) - 1 of the CTA's 64 MT (queries;
// keys in dkdv, where MT = 1): every B fragment read from shared memory feeds MT products. Operands are
// staged in shared memory ([row][DT + 8] elements: the 16-byte pad makes ldmatrix conflict-free)
// by 16-byte cp.async copies that zero-fill rows outside the problem and columns past the head
// dim; the streamed operand is double buffered (tile j + 1 loads while tile j computes). DT is the
// head-dim tile (32, 64 or 128) covering D and Dv. Scores stay in registers (mma C fragments,
// natten/mma.cuh) and become the A operand of the next product without a trip to memory.
// Softmax runs in base 2 (exp2 of logits * log2(e)); lse is stored in natural log.
//
// ---- Two MMA families, one more dtype --------------------------------------------------------
// Every f16/bf16 kernel is templated on kWg. kWg = false is the above (mma.sync, sm_80+). kWg =
// true (Hopper, sm_90a) stages operands as 8 x 8 core matrices (natten/wgmma.cuh) and issues
// warpgroup MMAs: the four warps form one warpgroup owning MT m64 row blocks (wg_row), products
// with both operands in shared memory (s = q k^T: wgmma_ss64) or with P from registers (o += p v:
// wgmma_rs, B read MN-major). The C fragments land in the same per-warp layout, so masking,
// softmax and stores are shared; tile_scores / tile_apply / tile_row pick the family.
// float32 runs on simt_f32.cu's kernels: the same walks and tiles, CUDA-core FMAs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "natten/mma.cuh"
#include "natten/wgmma.cuh"
#include "natten/window.h"

namespace natten {
namespace gpu {
namespace fna {

constexpr int kRows = 64;     // rows of every CTA tile (query tile, key tile)
constexpr int kThreads = 128;  // 4 warps x 16 rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Kernel arguments (trivially copyable; built by the handlers, tiling.h).
struct FnaArgs {
  AxisParams ax[kMaxRank];
  int batch0;                   // first batch element of this launch (grids take <= 65535)
  int64_t tokens;               // N = X * Y * Z
  int Y, Z;
  int heads, kv_heads, group;   // H, KVH, H / KVH
  int dim, dim_v;               // D and Dv (multiples of 8, <= DT)
  int S;                        // additional keys
  int ry, rz, R;                // rpb extents of the y, z axes and per head (R = 0: no rpb)
  float scale;                  // softmax scale
  float scale_log2;             // scale * log2(e)
  float scale_sign, scale_log2_abs;  // its sign (+-1) and magnitude (the forward folds the sign
                                     // into the scores: exact)
  int qlog[kMaxRank], kvlog[kMaxRank];  // log2 of the query / key tile extents
  int q_tpg[kMaxRank], q_units[kMaxRank];    // query tiles per dilation group; d * q_tpg
  int kv_tpg[kMaxRank], kv_units[kMaxRank];  // the same for key tiles
  int64_t q_tiles, kv_tiles;    // tile slots (product of units)
  int add_tiles;                // ceil(S / 64)
  int drpb_in_smem;             // d-rpb accumulates in shared memory (R floats fit)
  int skip_drpb;                // deterministic mode: the caller computes d-rpb (fixed order)
};

// Device pointers of one call (unused ones are null).
struct FnaPtrs {
  const void *q, *k, *v, *add_k, *add_v, *d_o;
  const float *rpb, *dlse;
  const float2* stats;  // backward: the forward's (m2, log2_l) per query row (softmax_weight_exp2)
  const float* o32;     // backward: the forward's output before rounding (the delta kernel)
  void *out, *dq, *dk, *dv, *dadd_k, *dadd_v;
  float *out_lse, *delta, *drpb;
  float2* out_stats;  // forward: (m2, log2_l) per query row, or null (no gradient wanted)
  float* out_o32;     // forward: o = acc / l in float32, or null (no gradient wanted)
  float* dq_acc;  // float32 dq workspace of the single-walk backward (shape of dq), or null
};

// ---- softmax statistics ------------------------------------------------------------------------
// The forward's online softmax runs on base-2 logits x = (scale * q.k + rpb) * log2(e). Per query
// row it ends with m2, the largest x (the running max), and l = sum_j exp2(x_j - m2); o = acc / l
// and lse = (m2 + log2 l) ln 2. A forward whose result feeds a gradient also writes
// stats = (m2, log2_l = log2 l) and o unrounded (o32); a row without keys (none in NA) gets
// (0, -inf). The backward forms each weight from them as
//   P = exp2(fma(s, scale_log2, -m2) [+ rpb * log2(e)] - log2_l)
// (softmax_weight_exp2), not exp(logits - lse): m2 + log2_l rounded to float32 is off by an ulp of
// the logit (2^-10 at 2^13), and so is s * scale_log2 rounded on its own; the fma rounds only
// the difference from the row's max, which is small for every weight that matters.
__device__ __forceinline__ float softmax_weight_exp2(float s, float scale_log2, float2 st,
                                                     float bias2) {
  return (fmaf(s, scale_log2, -st.x) + bias2) - st.y;
}
__device__ __forceinline__ float softmax_weight_exp2(float s, float scale_log2, float2 st) {
  return fmaf(s, scale_log2, -st.x) - st.y;
}

// ---- tile geometry -------------------------------------------------------------------------------
// A tile slot (row-major over the axes' units = dilation groups x tiles per group) -> per axis its
// dilation group, group length and local range [lo, hi). False when the tile is empty.
struct Box {
  int grp[kMaxRank], lg[kMaxRank], lo[kMaxRank], hi[kMaxRank];
};

__device__ __forceinline__ bool tile_box(const FnaArgs& a, const int (&logs)[kMaxRank],
                                         const int (&tpg)[kMaxRank], const int (&units)[kMaxRank],
                                         int64_t slot, Box& t) {
  bool nonempty = true;
#pragma unroll
  for (int ax = kMaxRank - 1; ax >= 0; --ax) {
    const int u = static_cast<int>(slot % units[ax]);
    slot /= units[ax];
    t.grp[ax] = u / tpg[ax];
    t.lg[ax] = group_length(a.ax[ax].length, a.ax[ax].dilation, t.grp[ax]);
    t.lo[ax] = (u % tpg[ax]) << logs[ax];
    t.hi[ax] = imin(t.lo[ax] + (1 << logs[ax]), t.lg[ax]);
    nonempty = nonempty && t.lo[ax] < t.lg[ax];
  }
  return nonempty;
}

// Row r of a tile with extents 2^logs -> offsets per axis (row-major x, y, z).
__device__ __forceinline__ void tile_offsets(int r, const int (&logs)[kMaxRank], int (&o)[3]) {
  o[2] = r & ((1 << logs[2]) - 1);
  o[1] = (r >> logs[2]) & ((1 << logs[1]) - 1);
  o[0] = r >> (logs[1] + logs[2]);
}

// Token index of local coordinates l in dilation groups grp.
__device__ __forceinline__ int64_t token_of(const FnaArgs& a, const int (&grp)[3], const int (&l)[3]) {
  const int x = grp[0] + l[0] * a.ax[0].dilation;
  const int y = grp[1] + l[1] * a.ax[1].dilation;
  const int z = grp[2] + l[2] * a.ax[2].dilation;
  return (static_cast<int64_t>(x) * a.Y + y) * a.Z + z;
}

// Row r of query tile qb: its local coordinates qc and its global row (token * heads + h, tokens
// counted from batch row row0; -1 outside the problem). Returns whether it is inside.
__device__ __forceinline__ bool query_row_at(const FnaArgs& a, const Box& qb, int r, int64_t row0,
                                             int h, int (&qc)[3], int64_t& row) {
  int off[3];
  tile_offsets(r, a.qlog, off);
  bool ok = true;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    qc[ax] = qb.lo[ax] + off[ax];
    ok = ok && qc[ax] < qb.hi[ax];
  }
  row = ok ? (row0 + token_of(a, qb.grp, qc)) * a.heads + h : -1;
  return ok;
}

__device__ __forceinline__ int win_start(const AxisParams& p, int lg, int i) {
  return window_start(i, lg, p.kernel, p.stride, p.causal);
}
__device__ __forceinline__ int win_end(const AxisParams& p, int lg, int i) {
  return window_end(i, lg, p.kernel, p.stride, p.causal);
}

// rpb entry of (query i, key j) in local coordinates: rpb[h, j - i + k - 1 per axis].
__device__ __forceinline__ int rpb_index(const FnaArgs& a, const int (&q)[3], const int (&k)[3]) {
  const int ix = k[0] - q[0] + a.ax[0].kernel - 1;
  const int iy = k[1] - q[1] + a.ax[1].kernel - 1;
  const int iz = k[2] - q[2] + a.ax[2].kernel - 1;
  return (ix * a.ry + iy) * a.rz + iz;
}

// Row-major counter over the key tiles of a walk (replaces divisions in the loop).
struct TileCounter {
  int j[3];
  __device__ __forceinline__ void reset() { j[0] = j[1] = j[2] = 0; }
  __device__ __forceinline__ void next(const int (&n)[3]) {
    if (++j[2] == n[2]) {
      j[2] = 0;
      if (++j[1] == n[1]) {
        j[1] = 0;
        ++j[0];
      }
    }
  }
};

// The key tiles a query tile walks: spatial tiles over its key box, then tiles of additional keys.
struct KeyWalk {
  int box_lo[3];   // local origin of the key box
  int n[3];        // key tiles per axis
  int full_lo[3], full_hi[3];  // intersection of the query tile's windows
  int spatial;     // n[0] * n[1] * n[2]
  int total;       // spatial + additional tiles
};

__device__ __forceinline__ KeyWalk key_walk(const FnaArgs& a, const Box& qb) {
  KeyWalk w;
  w.spatial = 1;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    const int lo = win_start(a.ax[ax], qb.lg[ax], qb.lo[ax]);
    const int hi = win_end(a.ax[ax], qb.lg[ax], qb.hi[ax] - 1);
    const int t = 1 << a.kvlog[ax];
    w.box_lo[ax] = lo;
    w.n[ax] = (hi - lo + t - 1) / t;
    w.full_lo[ax] = win_start(a.ax[ax], qb.lg[ax], qb.hi[ax] - 1);
    w.full_hi[ax] = win_end(a.ax[ax], qb.lg[ax], qb.lo[ax]);
    w.spatial *= w.n[ax];
  }
  w.total = w.spatial + a.add_tiles;
  return w;
}

// Local origin of the spatial key tile at counter c; `full`: every key of it is in every query's
// window.
__device__ __forceinline__ void key_tile(const FnaArgs& a, const KeyWalk& w, const TileCounter& c,
                                         int (&o)[3], bool& full) {
  full = true;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    o[ax] = w.box_lo[ax] + (c.j[ax] << a.kvlog[ax]);
    full = full && o[ax] >= w.full_lo[ax] && o[ax] + (1 << a.kvlog[ax]) <= w.full_hi[ax];
  }
}

// The query tiles a key tile's CTA walks (dk / dv kernels), for every query head of its kv head:
// spatial key tiles cover the inverse box of the tile ([first(lo), last(hi - 1)] per axis, in
// query tiles; "full" tiles lie inside every key's inverse window), tiles of additional keys
// visit every query tile slot. A Cursor advances through (head, tile) without divisions.
struct QueryTile {
  int h;
  Box box;
  bool nonempty, full;
};
struct QueryWalk {
  bool spatial;
  int kvh;
  Box kb;  // the key tile (spatial walks)
  int q_lo[3], n[3], full_lo[3], full_hi[3];
  int64_t total;  // (query tile, head) pairs

  struct Cursor {
    int g;  // query head of the kv head
    TileCounter c;  // spatial walks: the tile in the inverse box
    int64_t slot;   // additional-key walks: the tile slot
    __device__ __forceinline__ void next(const QueryWalk& w, const FnaArgs& a) {
      if (w.spatial) {
        c.next(w.n);
        if (c.j[0] == w.n[0]) {
          c.reset();
          ++g;
        }
      } else if (++slot == a.q_tiles) {
        slot = 0;
        ++g;
      }
    }
  };
  __device__ __forceinline__ Cursor start() const { return Cursor{0, {{0, 0, 0}}, 0}; }

  __device__ __forceinline__ QueryWalk(const FnaArgs& a, const Box& key_box, bool spatial_tile,
                                       int kv_head)
      : spatial(spatial_tile), kvh(kv_head), kb(key_box) {
    int64_t per_head = a.q_tiles;
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) q_lo[ax] = full_lo[ax] = full_hi[ax] = 0, n[ax] = 1;
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
        n[ax] = imax(0, (last.last + 1 - first.first + t - 1) / t);
        full_lo[ax] = last.first;
        full_hi[ax] = first.last + 1;
        per_head *= n[ax];
      }
    }
    total = per_head * a.group;
  }

  __device__ __forceinline__ QueryTile tile(const FnaArgs& a, const Cursor& cur) const {
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
  }
};

// Key row r of a spatial key tile kb: local coordinates kl, and per axis the queries whose
// windows hold it (first qf, count qn; qn = 0 for rows outside the problem). False outside.
__device__ __forceinline__ bool key_queries(const FnaArgs& a, const Box& kb, int r, int (&kl)[3],
                                            int (&qf)[3], int (&qn)[3]) {
  int off[3];
  tile_offsets(r, a.kvlog, off);
  bool ok = true;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    kl[ax] = kb.lo[ax] + off[ax];
    ok = ok && kl[ax] < kb.hi[ax];
  }
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    const AxisParams& ap = a.ax[ax];
    const QueryRange qr =
        inverse_window(imin(kl[ax], kb.lg[ax] - 1), kb.lg[ax], ap.kernel, ap.stride, ap.causal);
    qf[ax] = qr.first;
    qn[ax] = ok ? imax(0, qr.last + 1 - qr.first) : 0;
  }
  return ok;
}

// ---- staging ------------------------------------------------------------------------------------
// Copies ROWS rows of `cols` (<= DT) elements into a [ROWS][DT + 8] shared tile; row_ptr(r) gives
// the global row or nullptr (the row is then zero-filled, as are the columns past `cols`).
// kCore: the destination is a core-matrix tile (natten/wgmma.cuh) instead of a padded one.
template <typename T, int DT, bool kCore = false, typename RowPtr>
__device__ __forceinline__ void stage_rows(T* s, RowPtr&& row_ptr, int cols, const void* any) {
  constexpr int kVecs = DT / 8;  // 16-byte vectors per row
#pragma unroll
  for (int v = threadIdx.x % kThreads; v < kRows * kVecs; v += kThreads) {
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
  __device__ __forceinline__ void operator()(const FnaArgs& a, const FnaPtrs& p, const KeyWalk& walk,
                                             const Box& qb, int b, int64_t row0, int kvh, int j,
                                             T* ks, T* vs) {
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

// Per row r < rows of query tile qb, its window per axis into win[r * 6 ..]: (start, length)
// pairs, length 0 for rows outside the problem. Kept in shared memory by the kernels that test
// many scores per row: registers are the scarce resource there.
__device__ __forceinline__ void fill_windows(const FnaArgs& a, const Box& qb, int rows, int* win) {
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    int off[3];
    tile_offsets(r, a.qlog, off);
    bool ok = true;
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) ok = ok && qb.lo[ax] + off[ax] < qb.hi[ax];
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {
      const int l = imin(qb.lo[ax] + off[ax], qb.lg[ax] - 1);
      const int st = win_start(a.ax[ax], qb.lg[ax], l);
      win[r * 6 + 2 * ax] = st;
      win[r * 6 + 2 * ax + 1] = ok ? win_end(a.ax[ax], qb.lg[ax], l) - st : 0;
    }
  }
}

// A fragment (16 rows from row0, k16 step kk) of a [row][DT + 8] tile.
template <typename T, int DT>
__device__ __forceinline__ void a_frag(unsigned (&f)[4], const T* s, int row0, int kk) {
  const int lane = threadIdx.x & 31;
  ldsm_x4(f, s + (row0 + (lane & 15)) * (DT + 8) + kk * 16 + (lane >> 4) * 8);
}

// B fragments of two n8 blocks (columns n0..n0+15) at k16 step kk, from a [n][k] tile (rows are
// the columns of the product: keys for q.k, queries for k.q).
template <typename T, int DT>
__device__ __forceinline__ void b_frag_nk(unsigned (&f)[4], const T* s, int n0, int kk) {
  const int lane = threadIdx.x & 31;
  ldsm_x4(f, s + (n0 + (lane & 7) + (lane >> 4) * 8) * (DT + 8) + kk * 16 + ((lane >> 3) & 1) * 8);
}

// B fragments of two n8 blocks (columns n0..n0+15 of the tile's row) at k16 step kk (rows
// kk*16..), from a [k][n] tile: p.v with the keys as k, or dS^T q with the queries as k.
template <typename T, int DT>
__device__ __forceinline__ void b_frag_kn(unsigned (&f)[4], const T* s, int n0, int kk) {
  const int lane = threadIdx.x & 31;
  ldsm_x4_trans(f, s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * (DT + 8) + n0 +
                        (lane >> 4) * 8);
}

// A warp owns MT m16 tiles (rows row0 + 16 mt): every B fragment loaded from shared memory feeds
// MT products, which is what makes MT = 2 cheaper in shared-memory bandwidth per flop.
//
// acc[mt][16 x 64] += A[16 x DT] B^T, A rows of `As` from row0 + 16 mt, B rows of `Bs`.
template <typename T, int DT, int MT>
__device__ __forceinline__ void scores(float (&acc)[MT][8][4], const T* As, int row0, const T* Bs) {
#pragma unroll
  for (int kk = 0; kk < DT / 16; ++kk) {
    unsigned af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) a_frag<T, DT>(af[mt], As, row0 + 16 * mt, kk);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      unsigned bf[4];
      b_frag_nk<T, DT>(bf, Bs, np * 16, kk);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(acc[mt][2 * np], af[mt], bf[0], bf[1]);
        mma16816<T>(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
      }
    }
  }
}

// The same with the A fragments already in registers (the forward keeps its queries there).
template <typename T, int DT, int MT>
__device__ __forceinline__ void scores_regs(float (&acc)[MT][8][4],
                                            const unsigned (&af)[MT][DT / 16][4], const T* Bs) {
#pragma unroll
  for (int kk = 0; kk < DT / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      unsigned bf[4];
      b_frag_nk<T, DT>(bf, Bs, np * 16, kk);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(acc[mt][2 * np], af[mt][kk], bf[0], bf[1]);
        mma16816<T>(acc[mt][2 * np + 1], af[mt][kk], bf[2], bf[3]);
      }
    }
  }
}

// The A fragment of k16 step kk of a [16 x 64] product whose left operand is a C-fragment score
// tile (natten/mma.cuh: two adjacent n8 blocks packed to 16 bits; wgmma's register A is the same).
template <typename T>
__device__ __forceinline__ void pack_a(unsigned (&f)[4], const float (&x)[8][4], int kk) {
  f[0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);
  f[1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);
  f[2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
  f[3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

// acc[mt][16 x DT] += P[mt][16 x 64] B, P in C-fragment registers, B a [64 k][DT n] tile.
template <typename T, int DT, int MT>
__device__ __forceinline__ void apply(float (&acc)[MT][DT / 8][4], const float (&p)[MT][8][4],
                                      const T* Bs) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    unsigned pa[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) pack_a<T>(pa[mt], p[mt], kk);
#pragma unroll
    for (int np = 0; np < DT / 16; ++np) {
      unsigned bf[4];
      b_frag_kn<T, DT>(bf, Bs, np * 16, kk);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(acc[mt][2 * np], pa[mt], bf[0], bf[1]);
        mma16816<T>(acc[mt][2 * np + 1], pa[mt], bf[2], bf[3]);
      }
    }
  }
}

// Keeps the compiler from moving reads of registers written by an asynchronous MMA above the wait
// that completes it (an empty asm that "rewrites" each one after the wait).
template <int N>
__device__ __forceinline__ void reg_fence_n(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <typename A>
__device__ __forceinline__ void reg_fence(A& regs) {
  reg_fence_n<sizeof(A) / sizeof(float)>(reinterpret_cast<float*>(&regs));
}

// ---- Hopper (wgmma) products: the same three shapes on core-matrix tiles (natten/wgmma.cuh) -----
// The warpgroup owns MT m64 row blocks (rows 64 mt + 16 warp + ..., wg_row); the C fragments a
// warp receives are laid out as with mma.sync, so masking and softmax code is shared.
__device__ __forceinline__ int wg_row(int mt, int i) {
  return mt * 64 + (threadIdx.x >> 5) * 16 + ((threadIdx.x & 31) >> 2) + 8 * i;
}

// acc[mt] = A[64 mt .. 64 mt + 63][DT] B[64][DT]^T, both core-matrix tiles (K-major operands:
// k16 step kk starts 128 elements in). Waits for the result.
template <typename T, int DT, int MT>
__device__ __forceinline__ void wg_scores(float (&acc)[MT][8][4], const T* As, const T* Bs) {
  wgmma_fence();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kk = 0; kk < DT / 16; ++kk)
      wgmma_ss64<T>(&acc[mt][0][0], smem_desc(As + mt * 64 * DT + kk * 128, 128, DT * 16),
                    smem_desc(Bs + kk * 128, 128, DT * 16), kk);
  wgmma_commit();
  wgmma_wait<0>();
  reg_fence(acc);
}

// acc[mt] += P[mt][64 x 64] B[64][DT], P in C-fragment registers (the A operand after packing),
// B a core-matrix tile read MN-major (k16 step kk: rows 16 kk.., 16 DT elements in). Waits.
template <typename T, int DT, int MT>
__device__ __forceinline__ void wg_apply(float (&acc)[MT][DT / 8][4], const float (&p)[MT][8][4],
                                         const T* Bs) {
  wgmma_fence();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      unsigned pa[4];
      pack_a<T>(pa, p[mt], kk);
      wgmma_rs<T, DT, 1>(&acc[mt][0][0], pa, smem_desc(Bs + kk * 16 * DT, DT * 16, 128), 1);
    }
  wgmma_commit();
  wgmma_wait<0>();
  reg_fence(acc);
}

// The products of the kernels templated on kWg: wgmma on core-matrix tiles, or mma.sync on padded
// tiles (warp rows 16 MT warp ..). `As` holds the CTA's 64 MT A rows.
template <typename T, int DT, int MT, bool kWg>
__device__ __forceinline__ void tile_scores(float (&acc)[MT][8][4], const T* As, const T* Bs) {
  if constexpr (kWg) {
    wg_scores<T, DT, MT>(acc, As, Bs);
  } else {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) acc[mt][nb][0] = acc[mt][nb][1] = acc[mt][nb][2] = acc[mt][nb][3] = 0.f;
    scores<T, DT, MT>(acc, As, (threadIdx.x >> 5) * 16 * MT, Bs);
  }
}
template <typename T, int DT, int MT, bool kWg>
__device__ __forceinline__ void tile_apply(float (&acc)[MT][DT / 8][4], const float (&p)[MT][8][4],
                                           const T* Bs) {
  if constexpr (kWg)
    wg_apply<T, DT, MT>(acc, p, Bs);
  else
    apply<T, DT, MT>(acc, p, Bs);
}
// Row of element (mt, i) of the thread's C fragments.
template <int MT, bool kWg>
__device__ __forceinline__ int tile_row(int mt, int i) {
  return kWg ? wg_row(mt, i)
             : (threadIdx.x >> 5) * 16 * MT + mt * 16 + ((threadIdx.x & 31) >> 2) + 8 * i;
}

// One m16 tile per warp (the backward kernels).
template <typename T, int DT>
__device__ __forceinline__ void scores(float (&acc)[8][4], const T* As, int row0, const T* Bs) {
  scores<T, DT, 1>(reinterpret_cast<float (&)[1][8][4]>(acc), As, row0, Bs);
}
template <typename T, int DT>
__device__ __forceinline__ void apply(float (&acc)[DT / 8][4], const float (&p)[8][4], const T* Bs) {
  apply<T, DT, 1>(reinterpret_cast<float (&)[1][DT / 8][4]>(acc),
                  reinterpret_cast<const float (&)[1][8][4]>(p), Bs);
}

// Column of element e of n8 block nb in a C fragment.
__device__ __forceinline__ int frag_col(int nb, int e) {
  return nb * 8 + 2 * (threadIdx.x & 3) + (e & 1);
}

// 2^x on the special-function unit, flushing subnormal results to zero (a probability below
// 2^-126 is zero to every dtype the kernels write); exp2f would add a subnormal-safe rescale.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Stores a [16 x DT] C-fragment accumulator (times `mul`) to the warp's rows, as T (float: the
// forward's o32); row_ptr(which) gives the global row of the thread's first (0) or second (1) row,
// or nullptr.
template <typename T, int DT, typename RowPtr>
__device__ __forceinline__ void store_rows(const float (&acc)[DT / 8][4], float mul0, float mul1,
                                           RowPtr&& row_ptr, int cols) {
  T* rows[2] = {row_ptr(0), row_ptr(1)};
#pragma unroll
  for (int nb = 0; nb < DT / 8; ++nb) {
    const int c = frag_col(nb, 0);
    if (c >= cols) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (rows[half] == nullptr) continue;
      const float m = half ? mul1 : mul0;
      if constexpr (std::is_same_v<T, float>) {
        *reinterpret_cast<float2*>(rows[half] + c) =
            make_float2(acc[nb][2 * half] * m, acc[nb][2 * half + 1] * m);
      } else {
        const unsigned u = pack2<T>(acc[nb][2 * half] * m, acc[nb][2 * half + 1] * m);
        *reinterpret_cast<unsigned*>(rows[half] + c) = u;
      }
    }
  }
}

// Shared-memory bytes of each kernel for head-dim tile DT and element size `elem`.
constexpr int tile_bytes(int dt, int elem) { return kRows * (dt + 8) * elem; }
// q (64 mt rows), 2 x (k, v), windows, the rows' own-key logits; wgmma tiles have no row padding.
constexpr int fwd_smem(int dt, int elem, int mt, bool wg) {
  return (mt + 4) * (wg ? kRows * dt * elem : tile_bytes(dt, elem)) + kRows * mt * 7 * 4;
}
// q, do (64 mt rows each), 2 x (k, v), windows.
constexpr int dq_smem(int dt, int elem, int mt, bool wg) {
  return (2 * mt + 4) * (wg ? kRows * dt * elem : tile_bytes(dt, elem)) + kRows * mt * 6 * 4;
}
// Floats per row of the backward's float32 dq staging tile (rows stay 16-byte aligned; the pad
// spreads a warp's fragment stores over the banks).
template <int DT>
constexpr int kDqLd = DT + 8;
// The key-side backward: stages of its query-side tiles (q, do, stats, delta), threads per CTA
// and, for its warp-specialized variant (dq in the walk: a producer and a computing warpgroup,
// pipeline.cuh), each role's registers: 2 CTAs per SM share 64K registers, 128 per thread at
// launch, moved from the producer's address arithmetic to the computing warpgroup's accumulators.
constexpr int bwd_stages(bool dq) { return dq ? 3 : 2; }
constexpr int bwd_threads(bool dq) { return dq ? 2 * kThreads : kThreads; }
constexpr int kBwdProducerRegs = 40;
constexpr int kBwdConsumerRegs = 216;
// k, v, stages x (q, do, stats, delta); with dq: + the stage barriers (64 bytes), dS^T (64 x 64)
// and the float32 dq rows.
constexpr int bwd_smem(int dt, int elem, bool wg, bool dq) {
  return (2 + 2 * bwd_stages(dq)) * (wg ? kRows * dt * elem : tile_bytes(dt, elem)) +
         3 * bwd_stages(dq) * kRows * 4 +
         (dq ? 64 + kRows * kRows * elem + kRows * (dt + 8) * 4 : 0);
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
