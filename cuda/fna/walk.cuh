// Tile geometry and the walks of the FNA kernels: which query / key tiles a CTA owns, the key tiles
// a query tile visits (KeyWalk) and the query tiles a key tile visits (QueryWalk), with the window
// math of natten/window.h in local (dilation group) coordinates.
#pragma once

#include <cstdint>

#include "args.cuh"
#include "natten/window.h"
#include "products.cuh"  // frag_col

namespace natten {
namespace gpu {
namespace fna {

// ---- tile geometry -------------------------------------------------------------------------------
// A tile slot (row-major over the axes' units = dilation groups x tiles per group) -> per axis its
// dilation group, group length and local range [lo, hi). False when the tile is empty. Its
// extents are 2^logs, except on axis `stacked` (if any), where it is `parts` such boxes long (the
// TMA forward's stacked tiles: stacked_tile).
struct Box {
  int grp[kMaxRank], lg[kMaxRank], lo[kMaxRank], hi[kMaxRank];
};

__device__ __forceinline__ bool tile_box(const FnaArgs& a, const int (&logs)[kMaxRank],
                                         const int (&tpg)[kMaxRank], const int (&units)[kMaxRank],
                                         int64_t slot, Box& t, int stacked = -1, int parts = 1) {
  bool nonempty = true;
  // (Slots are below 2^31, the grid's x extent: unsigned 32-bit divisions, a fraction of the
  // instructions of 64-bit signed ones.)
  unsigned rest = static_cast<unsigned>(slot);
#pragma unroll
  for (int ax = kMaxRank - 1; ax >= 0; --ax) {
    const unsigned n = static_cast<unsigned>(units[ax]);
    const int u = static_cast<int>(rest % n);
    rest /= n;
    const int boxes = ax == stacked ? parts : 1;
    t.grp[ax] = u / tpg[ax];
    t.lg[ax] = group_length(a.ax[ax].length, a.ax[ax].dilation, t.grp[ax]);
    t.lo[ax] = ((u % tpg[ax]) * boxes) << logs[ax];
    t.hi[ax] = imin(t.lo[ax] + (boxes << logs[ax]), t.lg[ax]);
    nonempty = nonempty && t.lo[ax] < t.lg[ax];
  }
  return nonempty;
}

// ---- 1-D tiles (the TMA kernels: tiling.h tma_tiling, backward_on_tma) ---------------------
// The one axis their query tiles span (the others are one token long).
__host__ __device__ __forceinline__ int tile_axis(const FnaArgs& a) {
  return a.qlog[0] > 0 ? 0 : (a.qlog[1] > 0 ? 1 : 2);
}
// A 1-D tile on that axis: the axis's parameters, the tile's dilation group g, the group's
// length lg and the tile's local indices [lo, hi).
struct AxisSpan {
  AxisParams p;
  int g, lg, lo, hi;
};
__device__ __forceinline__ AxisSpan axis_span(const FnaArgs& a, const Box& b) {
  const int ax = tile_axis(a);
  AxisSpan s{a.ax[2], b.grp[2], b.lg[2], b.lo[2], b.hi[2]};
#pragma unroll
  for (int x = 0; x < 2; ++x) {  // (constant indices keep the arrays out of local memory)
    if (x == ax) s = AxisSpan{a.ax[x], b.grp[x], b.lg[x], b.lo[x], b.hi[x]};
  }
  return s;
}

// The 1-D tile of `rows` queries (any count) at slot `slot` of that axis (dilation groups x
// tiles per group of ceil(group length / rows)): as a Box, the other axes one token long. False
// when it is empty. With the axis's log2 extent at least log2(rows) (axis_tile_logs), box_row /
// query_row_at read its rows.
__device__ __forceinline__ bool axis_tile(const FnaArgs& a, int rows, int slot, Box& t) {
  const int ax = tile_axis(a);
  const AxisParams& x = a.ax[ax];
  const int tpg = (group_length(x.length, x.dilation, 0) + rows - 1) / rows;
#pragma unroll
  for (int d = 0; d < kMaxRank; ++d) t.grp[d] = t.lo[d] = 0, t.lg[d] = t.hi[d] = 1;
  bool nonempty = true;
#pragma unroll
  for (int d = 0; d < kMaxRank; ++d) {  // (constant indices keep the Box out of local memory)
    if (d != ax) continue;
    t.grp[d] = slot / tpg;
    t.lg[d] = group_length(x.length, x.dilation, t.grp[d]);
    t.lo[d] = (slot % tpg) * rows;
    t.hi[d] = imin(t.lo[d] + rows, t.lg[d]);
    nonempty = t.lo[d] < t.lg[d];
  }
  return nonempty;
}
// Log2 extents that address rows 0 .. 255 of such a tile (tile_offsets).
__device__ __forceinline__ void axis_tile_logs(const FnaArgs& a, int (&logs)[kMaxRank]) {
  const int ax = tile_axis(a);
#pragma unroll
  for (int d = 0; d < kMaxRank; ++d) logs[d] = d == ax ? 8 : 0;
}

// ---- stacked tiles (the TMA forward's box walk, 2-D and 3-D: tiling.h tma_box_tiling) ---------
// The axis a stacked tile's parts stack along: the problem's first axis longer than one token
// (natten/window.h first_long_axis, which tiling.h's chooser calls too).
__host__ __device__ __forceinline__ int stacked_axis(const FnaArgs& a) {
  return first_long_axis(a.ax);
}
// The stacked query tile at slot `slot`: `parts` boxes of 2^a.qlog tokens (one per computing
// warpgroup) along axis sa (a.q_tpg, a.q_units: counted by the launcher for tiles of parts
// 2^qlog[sa] tokens on sa). False when empty.
__device__ __forceinline__ bool stacked_tile(const FnaArgs& a, int sa, int parts, int64_t slot,
                                             Box& t) {
  return tile_box(a, a.qlog, a.q_tpg, a.q_units, slot, t, sa, parts);
}
// Log2 extents that address a stacked tile's rows (tile_offsets): a.qlog, 4 parts' worth on the
// stacked axis. Part p's rows are then 64 p .. 64 p + 63 (the axes before sa are one token long).
__device__ __forceinline__ void stacked_tile_logs(const FnaArgs& a, int sa, int (&logs)[kMaxRank]) {
#pragma unroll
  for (int d = 0; d < kMaxRank; ++d) logs[d] = a.qlog[d] + (d == sa ? 2 : 0);
}

// Row r of a tile with extents 2^logs -> offsets per axis (row-major x, y, z).
__device__ __forceinline__ void tile_offsets(int r, const int (&logs)[kMaxRank], int (&o)[3]) {
  o[2] = r & ((1 << logs[2]) - 1);
  o[1] = (r >> logs[2]) & ((1 << logs[1]) - 1);
  o[0] = r >> (logs[1] + logs[2]);
}

// Token index of local coordinates l in dilation groups grp.
__device__ __forceinline__ int64_t token_of(const FnaArgs& a, const int (&grp)[3],
                                            const int (&l)[3]) {
  const int x = grp[0] + l[0] * a.ax[0].dilation;
  const int y = grp[1] + l[1] * a.ax[1].dilation;
  const int z = grp[2] + l[2] * a.ax[2].dilation;
  return (static_cast<int64_t>(x) * a.Y + y) * a.Z + z;
}

// Row r of tile b (extents 2^logs): its local coordinates c. Returns whether it is inside the
// problem (every coordinate below the box's end).
__device__ __forceinline__ bool box_row(const Box& b, const int (&logs)[kMaxRank], int r,
                                        int (&c)[3]) {
  int off[3];
  tile_offsets(r, logs, off);
  bool ok = true;
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    c[ax] = b.lo[ax] + off[ax];
    ok = ok && c[ax] < b.hi[ax];
  }
  return ok;
}

// Row r of query tile qb: its local coordinates qc and its global row (token * heads + h, tokens
// counted from batch row row0; -1 outside the problem). Returns whether it is inside.
// (`logs`: the tile's log2 extents, a.qlog unless its rows are not a power of two: axis_tile.)
__device__ __forceinline__ bool query_row_at(const FnaArgs& a, const Box& qb,
                                             const int (&logs)[kMaxRank], int r, int64_t row0,
                                             int h, int (&qc)[3], int64_t& row) {
  const bool ok = box_row(qb, logs, r, qc);
  row = ok ? (row0 + token_of(a, qb.grp, qc)) * a.heads + h : -1;
  return ok;
}
__device__ __forceinline__ bool query_row_at(const FnaArgs& a, const Box& qb, int r, int64_t row0,
                                             int h, int (&qc)[3], int64_t& row) {
  return query_row_at(a, qb, a.qlog, r, row0, h, qc, row);
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
// (The tiles start at the box's first key. Starting them up to a tile earlier, so that a boundary
// falls where the first query part's windows all begin, put more tiles inside on an axis but
// made 2d-dilated's forward 5% slower and 2d-large's no faster; BENCHMARKS.md, session 21.)
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
    w.n[ax] = (hi - lo + t - 1) >> a.kvlog[ax];  // (hi >= lo)
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

  QueryWalk() = default;
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
        const QueryRange first =
            inverse_window(kb.lo[ax], kb.lg[ax], ap.kernel, ap.stride, ap.causal);
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
  const bool ok = box_row(kb, a.kvlog, r, kl);
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

// The keys of the key tile (a.kvlog, rep a.kv_rep) at local origin o inside one query row's
// window w (fill_windows: start, length per axis) as a bit set (tile_mask), shifted to the
// thread's first C-fragment column: element (nb, c) of the row in the thread's fragment is bit
// 8 nb + c (wgmma's two rows a thread; a test per element would cost one per axis).
__device__ __forceinline__ uint64_t window_bits(const FnaArgs& a, const int* w,
                                                const int (&o)[3]) {
  int lo[3], hi[3];
#pragma unroll
  for (int ax = 0; ax < 3; ++ax) {
    const int extent = 1 << a.kvlog[ax];
    lo[ax] = imin(imax(w[2 * ax] - o[ax], 0), extent);
    hi[ax] = imin(imax(w[2 * ax] + w[2 * ax + 1] - o[ax], 0), extent);
  }
  return tile_mask(a.kvlog, a.kv_rep, lo, hi) >> frag_col(0, 0);
}

// ---- a row's window in the thread's accumulator columns (the TMA forward's box walk) -----------
// One query row's window [start, end) per axis over key tiles of a.kvlog, tested as the thread's
// 32 columns of the row's m64n128 accumulator (natten/tile_mask.h column_axes, a.kv_cols): bit
// nb + 16 c of bits() is element (nb, c) of the thread's fragment row. The bounds are kept as
// column_bound makes them (per c on the last axis, whose offsets depend on c), so that a step
// tests a bound in about five integer instructions.
struct ColumnWindow {
  int lo[4], hi[4];  // kinds: axes 0, 1, then the last axis for c = 0 and c = 1

  ColumnWindow() = default;
  __device__ __forceinline__ ColumnWindow(const FnaArgs& a, const int (&start)[3],
                                          const int (&end)[3]) {
    // (The lane read by a volatile asm: ptxas cannot recompute what derives from it, so the bounds
    // stay in registers instead of being rebuilt at every masked step.)
    unsigned lane;
    asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
    column_bounds(a.kv_cols, static_cast<int>(lane & 3), start, end, lo, hi);
  }

  // The thread's columns of the key tile at local origin o inside the window (off: the tile's
  // column_offset per axis, shared by the rows). Axes flagged in `inside` (bit ax: the tile lies
  // inside every row's window on that axis, uniform over the warp) are not tested.
  __device__ __forceinline__ static void step_offsets(const FnaArgs& a, const int (&o)[3],
                                                      int (&off)[3]) {
    column_offsets(a.kv_cols, o, off);
  }
  __device__ __forceinline__ unsigned bits(const FnaArgs& a, const int (&off)[3],
                                           unsigned inside) const {
    return column_bits(a.kv_cols, lo, hi, off, inside);
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

}  // namespace fna
}  // namespace gpu
}  // namespace natten
