// Tile shapes of the FNA kernels (host side): the user's, checked, or the cheapest by an exact count
// of the (query tile, key tile) pairs a problem's forward walk visits.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

#include "natten/ffi_helpers.h"
#include "natten/window.h"

namespace natten {
namespace gpu {
namespace fna {

constexpr int kTileLog = 6;     // key tiles and backward query tiles: 2^6 = 64 tokens
constexpr int kMaxQTileLog = 7;  // forward query tiles: up to 128 tokens

struct Tiling {
  int qlog[kMaxRank];
  int kvlog[kMaxRank];
};

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// (query tile, key tile) pairs the forward walk visits along one axis, counted exactly: over every
// dilation group, the sum over its query tiles [lo, hi] of the key tiles spanning [start(lo),
// end(hi)). The walk is a box, so a problem's pairs are the product of its axes' counts.
// pairs[ql][kl] for query tiles of 2^ql and key tiles of 2^kl tokens, ql <= max_q, kl <= max_kv.
// stacked[ql][kl]: the walk of query tiles of `parts` parts of 2^ql tokens each, where each part
// computes only the key tiles of its tile's walk (from the tile's first window start) that meet
// its own rows' windows, summed over the parts that hold queries: the Hopper forwards, whose
// computing warpgroups own a tile's parts (forward_ws.cu: the two 64-row halves of a 128-token
// tile, stacked[ql - 1] with parts 2; forward_tma.cu's box walk: tma_box_tiling).
struct AxisPairs {
  int64_t pairs[kMaxQTileLog + 1][kMaxQTileLog + 1] = {};
  int64_t stacked[kMaxQTileLog + 1][kMaxQTileLog + 1] = {};

  AxisPairs(const AxisParams& ax, int max_q, int max_kv, int parts = 2) {
    auto start = [&](int i, int lg) {
      return window_start(i, lg, ax.kernel, ax.stride, ax.causal);
    };
    auto end = [&](int i, int lg) { return window_end(i, lg, ax.kernel, ax.stride, ax.causal); };
    // Dilation groups have one of two lengths: L / d + 1 (the first L % d groups) and L / d.
    for (int longer = 0; longer <= 1; ++longer) {
      const int groups = longer ? ax.length % ax.dilation : ax.dilation - ax.length % ax.dilation;
      const int lg = ax.length / ax.dilation + longer;
      if (groups == 0 || lg == 0) continue;
      for (int ql = 0; ql <= max_q; ++ql) {
        const int tq = 1 << ql;
        for (int lo = 0; lo < lg; lo += tq) {
          const int hi = imin(lo + tq, lg) - 1;
          const int origin = start(lo, lg), span = end(hi, lg) - origin;
          for (int kl = 0; kl <= max_kv; ++kl)
            pairs[ql][kl] += int64_t{groups} * ceil_div(span, 1 << kl);
        }
        const int rows = parts * tq;  // a stacked tile
        for (int lo = 0; lo < lg; lo += rows) {
          const int origin = start(lo, lg);
          for (int first = lo; first < imin(lo + rows, lg); first += tq) {
            const int last = imin(first + tq, lg) - 1;
            const int a = start(first, lg) - origin, b = end(last, lg) - origin;
            for (int kl = 0; kl <= max_kv; ++kl)
              stacked[ql][kl] += int64_t{groups} * (ceil_div(b, 1 << kl) - (a >> kl));
          }
        }
      }
    }
  }
};

// The cost the chooser minimizes for query / key tile logs ql / kl: the walk's pairs (every pair
// costs the same: the kernels compute whole tiles of their own row counts, whatever the shape's
// token count). With `halves` (the warp-specialized forward, 2^(kTileLog + 1)-token tiles): a
// full-size tile splits along its first axis longer than one token into the two computing
// warpgroups' halves, which run side by side (cost: their pairs over 2); a smaller tile is all
// the first warpgroup's.
inline double walk_cost(const AxisPairs (&axes)[kMaxRank], const int (&ql)[kMaxRank],
                        const int (&kl)[kMaxRank], bool halves) {
  const bool split = halves && ql[0] + ql[1] + ql[2] > kTileLog;
  const int axis = ql[0] > 0 ? 0 : (ql[1] > 0 ? 1 : 2);
  double c = split ? 0.5 : 1.0;
  for (int a = 0; a < kMaxRank; ++a)
    c *= static_cast<double>(split && a == axis ? axes[a].stacked[ql[a] - 1][kl[a]]
                                                : axes[a].pairs[ql[a]][kl[a]]);
  return c;
}

// Every split of at most 2^max_log tokens over the axes that is no longer than an axis needs.
template <typename F>
void for_each_shape(const Problem& p, int max_log, F&& f) {
  int cap[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) {
    const int lg = group_length(p.axis[a].length, p.axis[a].dilation, 0);
    cap[a] = 0;
    while (cap[a] < max_log && (1 << cap[a]) < lg) ++cap[a];
  }
  for (int x = 0; x <= cap[0]; ++x)
    for (int y = 0; y <= cap[1] && x + y <= max_log; ++y)
      for (int z = 0; z <= cap[2] && x + y + z <= max_log; ++z) f(x, y, z);
}

inline int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return (v >= 1 && (int64_t{1} << l) == v) ? l : -1;
}

// Halves a given tile along its longest axis until it holds at most 2^max_log tokens.
inline void shrink_tile(int (&logs)[kMaxRank], bool given, int max_log) {
  while (given && logs[0] + logs[1] + logs[2] > max_log) {
    int longest = 0;
    for (int a = 1; a < kMaxRank; ++a)
      if (logs[a] > logs[longest]) longest = a;
    --logs[longest];
  }
}

// A user's tile shape ([x, y, z] extents; all 0 = choose), checked.
inline ffi::Error user_shape(const char* what, I64Span shape, int max_log, int (&logs)[kMaxRank],
                             bool& given) {
  if (shape.size() != static_cast<size_t>(kMaxRank))
    return invalid(std::string(what) + " must have 3 entries, got " + std::to_string(shape.size()));
  given = shape[0] != 0 || shape[1] != 0 || shape[2] != 0;
  if (!given) return ok();
  int sum = 0;
  for (int a = 0; a < kMaxRank; ++a) {
    logs[a] = log2_exact(shape[a]);
    if (logs[a] < 0)
      return invalid(std::string(what) + " extents must be powers of two, got " +
                     std::to_string(shape[a]));
    sum += logs[a];
  }
  if (sum > max_log)
    return invalid(std::string(what) + " must hold at most " + std::to_string(1 << max_log) +
                   " tokens");
  return ok();
}

// Grows a key tile to exactly 2^max_log tokens along the first axis. The kernels stage and
// compute whole tiles of that many rows, and a row r of a tile with extents 2^logs maps to
// offsets (r >> (logs1 + logs2), ...): with fewer tokens, rows past the tile would land on the
// first axis beyond its extent, on keys of the next tile. A grown tile makes them genuine tile
// members (real keys, or rows past the axis, zero-filled and masked).
inline void fill_tile(int (&logs)[kMaxRank], int max_log) {
  logs[0] += max_log - (logs[0] + logs[1] + logs[2]);
}

// The automatic choices made so far, per problem and given tiles: the handlers run on every call,
// and the exact count costs O(tokens) per axis (~0.5 ms on a 32K-token axis). Shared by the
// threads that call handlers (one per GPU, say); dropped whole if it ever grows large.
struct TilingCache {
  using Key = std::array<int, 5 * kMaxRank + 2 * kMaxRank + 3>;
  std::mutex mutex;
  std::map<Key, Tiling> choices;

  static TilingCache& get() {
    static TilingCache cache;
    return cache;
  }
  static Key key(const Problem& p, const Tiling& given, int q_max_log, int kv_max_log,
                 bool q_given, bool kv_given, bool halves) {
    Key k{};
    int i = 0;
    for (int a = 0; a < kMaxRank; ++a) {
      const AxisParams& ax = p.axis[a];
      for (int v : {ax.length, ax.kernel, ax.stride, ax.dilation, static_cast<int>(ax.causal)})
        k[i++] = v;
      k[i++] = q_given ? given.qlog[a] : -1;
      k[i++] = kv_given ? given.kvlog[a] : -1;
    }
    k[i++] = q_max_log;
    k[i++] = kv_max_log;
    k[i++] = halves;
    return k;
  }
};
inline bool cached_tiling(const Problem& p, Tiling& t, int q_max_log, int kv_max_log, bool q_given,
                          bool kv_given, bool halves) {
  TilingCache& c = TilingCache::get();
  const TilingCache::Key k =
      TilingCache::key(p, t, q_max_log, kv_max_log, q_given, kv_given, halves);
  std::lock_guard<std::mutex> lock(c.mutex);
  const auto it = c.choices.find(k);
  if (it == c.choices.end()) return false;
  t = it->second;
  return true;
}
inline void cache_tiling(const Problem& p, const Tiling& t, int q_max_log, int kv_max_log,
                         bool q_given, bool kv_given, bool halves) {
  // (The key holds the given tiles, which the pick kept: t has them on the given sides.)
  TilingCache& c = TilingCache::get();
  const TilingCache::Key k =
      TilingCache::key(p, t, q_max_log, kv_max_log, q_given, kv_given, halves);
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.choices.size() >= 4096) c.choices.clear();
  c.choices.emplace(k, t);
}

// `q_max_log`: log2 of the query tile size of the kernel at hand (kMaxQTileLog for the forward,
// kTileLog for the backward, which splits a larger user tile along its longest axis);
// `kv_max_log`: log2 of the key tile size (kTileLog, or less for the float32 kernels).
inline ffi::Error choose_tiling(const Problem& p, I64Span q_tile, I64Span kv_tile, int q_max_log,
                                Tiling& t, int kv_max_log = kTileLog, bool halves = false) {
  bool q_given = false, kv_given = false;
  NATTEN_TRY(user_shape("q_tile", q_tile, kMaxQTileLog, t.qlog, q_given));
  NATTEN_TRY(user_shape("kv_tile", kv_tile, kTileLog, t.kvlog, kv_given));
  shrink_tile(t.qlog, q_given, q_max_log);
  shrink_tile(t.kvlog, kv_given, kv_max_log);
  if (!(q_given && kv_given) &&
      !cached_tiling(p, t, q_max_log, kv_max_log, q_given, kv_given, halves)) {
    const AxisPairs axis_pairs[kMaxRank] = {AxisPairs(p.axis[0], q_max_log, kv_max_log),
                                            AxisPairs(p.axis[1], q_max_log, kv_max_log),
                                            AxisPairs(p.axis[2], q_max_log, kv_max_log)};
    double best = -1;
    Tiling pick = t;
    for_each_shape(p, q_max_log, [&](int qx, int qy, int qz) {
      const int ql[3] = {qx, qy, qz};
      if (q_given && (qx != t.qlog[0] || qy != t.qlog[1] || qz != t.qlog[2])) return;
      for_each_shape(p, kv_max_log, [&](int kx, int ky, int kz) {
        const int kl[3] = {kx, ky, kz};
        if (kv_given && (kx != t.kvlog[0] || ky != t.kvlog[1] || kz != t.kvlog[2])) return;
        const double c = walk_cost(axis_pairs, ql, kl, halves);
        // Ties: the later candidate has longer z runs (contiguous rows) and wins.
        if (best < 0 || c <= best) {
          best = c;
          for (int a = 0; a < kMaxRank; ++a) {
            pick.qlog[a] = ql[a];
            pick.kvlog[a] = kl[a];
          }
        }
      });
    });
    t = pick;
    cache_tiling(p, t, q_max_log, kv_max_log, q_given, kv_given, halves);
  }
  fill_tile(t.kvlog, kv_max_log);
  return ok();
}

// ---- the forward's tiles ------------------------------------------------------------------------
// Whether the Hopper (wgmma) forward at head-dim tile dt is the warp-specialized kernel (128-token
// query tiles: a producer warpgroup and two computing warpgroups of 64 rows, forward_ws.cu
// fna_fwd_ws_kernel) or the one-warpgroup kernel (64-token tiles, several CTAs per SM). Measured
// on an H100 (BENCHMARKS.md, 2026-12-06 later): the warp-specialized one wins at 128 (3d-video
// 13.1 -> 9.6 ms) and loses at 32 and 64 (2d-large 3.0 -> 4.6 ms).
constexpr bool fwd_warp_specialized(int dt) { return dt >= 128; }
// log2 tokens of the float32 kernels' tiles (simt_f32.cu: 128 threads, a row per 2 threads, per 4
// at head-dim tile 128), and of the forward's query tiles: 128 on mma.sync (two m16 tiles per
// warp) and on the warp-specialized wgmma kernel, 64 on the one-warpgroup wgmma kernel. launch.h
// and simt_f32.cu check that their kernels agree.
constexpr int f32_tile_log(int dt) { return dt <= 64 ? 6 : 5; }
constexpr int fwd_q_tile_log(int dt, bool f32, bool wgmma) {
  return f32 ? f32_tile_log(dt) : (wgmma && !fwd_warp_specialized(dt) ? kTileLog : kTileLog + 1);
}

// Whether the automatic choice (`mma` 0) runs the forward on wgmma where it could: on every
// problem but 1-D ones (at most one axis longer than 1), whose mma.sync forward (128-token query
// tiles) measured faster on the H200 than the wgmma one (64-token tiles: twice the key-tile
// loads; 1-D tiles are mostly unmasked, so the wgmma kernel's extra occupancy buys little):
// BENCHMARKS.md, 1d-long.
inline int long_axes(const Problem& p) { return long_axis_count(p.axis); }
inline bool auto_forward_on_wgmma(const Problem& p) { return long_axes(p) > 1; }

// Computing warpgroups of the Hopper single-walk backward (fna.cuh, bwd_*): two, on 128-key
// tiles, for 1-D problems; one, on 64-key tiles, elsewhere. Measured on an H100 (BENCHMARKS.md,
// 2026-12-06 later): 128-key tiles made the 1-D backward 9% faster and the 2-D ones 6-14%
// slower, where a 128-key box's inverse neighborhood spans more query tiles (2d-large: 1.74x the
// useful scores instead of 1.50x).
inline int bwd_dq_warpgroups(const Problem& p) { return long_axes(p) > 1 ? 1 : 2; }

// The forward's tiles for problem p: the user's (checked) or the cheapest walk's.
inline ffi::Error forward_tiling(const Problem& p, I64Span q_tile, I64Span kv_tile, int dt,
                                 bool f32, bool wgmma, Tiling& t) {
  return choose_tiling(p, q_tile, kv_tile, fwd_q_tile_log(dt, f32, wgmma), t,
                       f32 ? f32_tile_log(dt) : kTileLog,
                       /*halves=*/wgmma && !f32 && fwd_warp_specialized(dt));
}

// ---- which forward kernel --------------------------------------------------------------------
// Whether the caller chose tiles (fused_config q_tile / kv_tile).
inline bool tiles_given(I64Span q_tile, I64Span kv_tile) {
  bool given = false;
  for (I64Span s : {q_tile, kv_tile})
    for (size_t i = 0; i < s.size(); ++i) given = given || s[i] != 0;
  return given;
}

// The TMA forward (forward_tma.cu) serves 1-D problems (at most one axis longer than one token)
// whose axis splits evenly into its dilation groups (the tensor maps' bounds are then every
// group's), at every head-dim tile (32 run at 64: tma_head_dim_tile), without rpb or additional
// keys, and with the kernel's own tiles (tma_fwd_q_rows queries, 128-key steps: a user's q_tile /
// kv_tile runs the box kernels).
inline int long_axis(const Problem& p) { return first_long_axis(p.axis); }
// The problems both TMA kernels serve, whatever the tiles.
inline bool tma_problem(const Problem& p) {
  const AxisParams& x = p.axis[long_axis(p)];
  return long_axes(p) <= 1 && !p.has_rpb && p.additional == 0 && x.length % x.dilation == 0;
}
inline bool forward_on_tma(const Problem& p, bool tiles_given) {
  return tma_problem(p) && !tiles_given;
}
// Its tiles: 128-key steps, and query tiles of 64 rows per computing warpgroup: three at
// head-dim tile 64 (192 queries: a warpgroup's exponentials, as long as its products there, run
// beside another's products), two at 128 (o's registers leave room for two).
constexpr int kTmaFwdKeys = 128;
constexpr int tma_fwd_wgs(int dt) { return dt <= 64 ? 3 : 2; }
constexpr int tma_fwd_q_rows(int dt) { return 64 * tma_fwd_wgs(dt); }
// The head-dim tile the 1-D TMA kernels (forward_tma.cu's 1-D walk, backward_tma.cu) run a
// problem at: the problem's (dt), but at least 64. Their tiles are rows of 128 bytes (64 16-bit
// elements: the 128-byte swizzle the wgmma descriptors read), so head dims up to 32 run there as
// 64-column tiles whose columns past the head dim the TMA fills with zeros and no kernel stores.
// The products do twice the multiply-adds a 32-column tile needs, but there the softmax bounds
// the step. Measured on an H100 (BENCHMARKS.md, session 19): a 1-D problem at head dim 32 ran
// its forward 37% and its backward 36% faster than on the cp.async kernels at tile 32; the box
// kernels at tile 64 were slower at head dim 32 (nat-2d-small forward +45%, backward +4%: their
// 128-key steps waste more of small windows), so 2-D / 3-D problems keep their tile.
constexpr int tma_head_dim_tile(int dt) { return dt < 64 ? 64 : dt; }
// The tiling the TMA kernels' arguments carry: 2^7 on the long axis (which marks it; the
// forward's query tiles of tma_fwd_q_rows are counted by its launcher and fused_tiles).
inline Tiling tma_tiling(const Problem& p) {
  Tiling t = {};
  const int ax = long_axis(p);
  t.qlog[ax] = t.kvlog[ax] = 7;
  return t;
}

// The TMA backward (backward_tma.cu: dq in the walk, the non-deterministic schedule): the same
// 1-D problems at head-dim tiles up to 64 (run at 64: tma_head_dim_tile), with its own tiles (128
// keys a CTA, 128 queries a step: tma_tiling).
inline bool backward_on_tma(const Problem& p, int dt, bool tiles_given) {
  return tma_problem(p) && dt <= 64 && !tiles_given;
}

// The problems the box TMA kernels serve, whatever the tiles: 2-D and 3-D, every axis split
// evenly into its dilation groups (at most 4: one tensor map each), no additional keys.
inline bool box_tma_problem(const Problem& p) {
  int groups = 1;
  bool even = true;
  for (int ax = 0; ax < kMaxRank; ++ax) {
    groups *= p.axis[ax].dilation;
    even = even && p.axis[ax].length % p.axis[ax].dilation == 0;
  }
  return long_axes(p) >= 2 && p.additional == 0 && even && groups <= 4;
}
// Whether query tiles of 2^qlog[0] tokens along x stay inside one batch element (the maps fold
// batch and x).
inline bool box_tiles_in_batch(const Problem& p, const Tiling& t) {
  return (p.axis[0].length / p.axis[0].dilation) % (1 << t.qlog[0]) == 0;
}
// The warp-specialized forward's TMA variant (forward_ws.cu kTma) serves those problems at
// head-dim tiles 64 and 128 with tiles whose TMA boxes are exactly the tiles and stay inside one
// batch element: 128-token query tiles whose x extent divides the group's x length, 64-token key
// tiles one x plane thick. `t`: the warp-specialized kernel's tiles.
inline bool forward_on_box_tma(const Problem& p, int dt, const Tiling& t) {
  return dt >= 64 && box_tma_problem(p) && t.kvlog[0] == 0 && box_tiles_in_batch(p, t) &&
         t.qlog[0] + t.qlog[1] + t.qlog[2] == kTileLog + 1 &&
         t.kvlog[1] + t.kvlog[2] == kTileLog;
}

// The box TMA kernels' tiles for p (the user's, or the chooser's 128-token query tiles over
// 64-key tiles) into t, and whether they are tiles those kernels serve (`fits`).
inline ffi::Error box_tma_tiling(const Problem& p, I64Span q_tile, I64Span kv_tile, int dt,
                                 Tiling& t, bool& fits) {
  NATTEN_TRY(choose_tiling(p, q_tile, kv_tile, kTileLog + 1, t, kTileLog, /*halves=*/true));
  fits = forward_on_box_tma(p, dt, t);
  return ok();
}

// ---- the TMA forward on 2-D and 3-D problems (its box walk) ------------------------------------
// forward_tma.cu serves the box TMA problems (box_tma_problem) without rpb too, at head-dim tiles
// 64 and 128 and with its own tiles: a query tile is tma_fwd_wgs(dt) parts of 64 queries (one per
// computing warpgroup), each a box of 2^qlog tokens per axis, stacked along the problem's first
// axis longer than one token (long_axis, the stacked axis: the tile spans wgs 2^qlog tokens on
// it); key tiles are boxes of 128 tokens (kvlog sums to 7) at least two tokens long on the last
// axis (the kernel's masks: walk.cuh ColumnWindow). The walk visits the key tiles of the
// whole tile's key box row-major, the stacked axis outermost (the axes before it are one token
// long), so the steps a part's own windows reach are one contiguous run of it.
constexpr int kTmaBoxKeyLog = 7;  // log2 kTmaFwdKeys
inline bool forward_on_tma_box(const Problem& p, int dt, bool tiles_given) {
  return dt >= 64 && box_tma_problem(p) && !p.has_rpb && !tiles_given;
}

// The box walk's tiles for p (the pair count its warpgroups compute, least first; ties: longer z
// runs), into t (qlog: one part's box; kvlog: the key tile's). False where no parts of exactly
// 64 queries fill a tile on the stacked axis, or no key tile of exactly 128 keys fits the
// problem's axes (small problems, or a last axis one token long).
// `cost`: the (part, key tile) pairs computed, each of 64 x 128 scores.
inline bool tma_box_tiling(const Problem& p, int dt, Tiling& t, double& cost) {
  const int parts = tma_fwd_wgs(dt), stacked = long_axis(p);
  const AxisPairs axes[kMaxRank] = {AxisPairs(p.axis[0], kTileLog, kTmaBoxKeyLog, parts),
                                    AxisPairs(p.axis[1], kTileLog, kTmaBoxKeyLog, parts),
                                    AxisPairs(p.axis[2], kTileLog, kTmaBoxKeyLog, parts)};
  double best = -1;
  const int stacked_length = group_length(p.axis[stacked].length, p.axis[stacked].dilation, 0);
  for_each_shape(p, kTileLog, [&](int qx, int qy, int qz) {
    const int ql[3] = {qx, qy, qz};
    // Parts of exactly 64 queries, all of them holding queries in a tile that does not run
    // past the axis (a warpgroup without rows would idle for the whole walk).
    if (qx + qy + qz != kTileLog || (parts << ql[stacked]) > stacked_length) return;
    for_each_shape(p, kTmaBoxKeyLog, [&](int kx, int ky, int kz) {
      if (kx + ky + kz != kTmaBoxKeyLog || kz < 1) return;
      const int kl[3] = {kx, ky, kz};
      double c = 1;
      for (int a = 0; a < kMaxRank; ++a)
        c *= static_cast<double>(a == stacked ? axes[a].stacked[ql[a]][kl[a]]
                                              : axes[a].pairs[ql[a]][kl[a]]);
      if (best < 0 || c <= best) {
        best = c;
        for (int a = 0; a < kMaxRank; ++a) t.qlog[a] = ql[a], t.kvlog[a] = kl[a];
      }
    });
  });
  cost = best;
  return best >= 0;
}

// Whether the box walk runs p's forward (tma_box_tiling's tiles into t) rather than the
// warp-specialized kernel's TMA variant (forward_ws.cu: 64-key steps, two warpgroups), which
// computes fewer scores on small windows: the box walk's steps take 128 keys and its tiles waste
// more of them, so it runs where its scores, divided by kTmaBoxGain, are no more than the other
// kernel's. kTmaBoxGain: how much faster the box walk computes a score, measured on an H100
// (BENCHMARKS.md, 2026-12-07 session 16).
constexpr double kTmaBoxGain = 1.3;
inline bool tma_box_plan(const Problem& p, int dt, Tiling& t) {
  const int parts = tma_fwd_wgs(dt);
  // (Cached as the other choices are, under q_max_log -parts; "no" as qlog[0] = -1.)
  if (cached_tiling(p, t, -parts, kTmaBoxKeyLog, false, false, false)) return t.qlog[0] >= 0;
  double cost = 0;
  bool use = tma_box_tiling(p, dt, t, cost);
  if (use) {
    Tiling ws;
    bool fits = false;
    const int64_t none[kMaxRank] = {0, 0, 0};  // (no user tiles)
    const ffi::Error e = box_tma_tiling(p, I64Span(none, kMaxRank), I64Span(none, kMaxRank), dt,
                                        ws, fits);
    if (!e.failure() && fits) {
      const AxisPairs axes[kMaxRank] = {AxisPairs(p.axis[0], kTileLog + 1, kTileLog),
                                        AxisPairs(p.axis[1], kTileLog + 1, kTileLog),
                                        AxisPairs(p.axis[2], kTileLog + 1, kTileLog)};
      const double ws_cost = walk_cost(axes, ws.qlog, ws.kvlog, /*halves=*/true) * 2;  // per part
      use = cost * 2 <= kTmaBoxGain * ws_cost;  // (scores: 64 x 128 a pair against 64 x 64)
    }
  }
  Tiling keep = t;
  if (!use) keep.qlog[0] = -1;
  cache_tiling(p, keep, -parts, kTmaBoxKeyLog, false, false, false);
  return use;
}

enum class ForwardKernel { kSimt, kMmaSync, kWgmma, kWgmmaWs, kTma, kWsTma };
inline const char* kernel_name(ForwardKernel k) {
  switch (k) {
    case ForwardKernel::kSimt: return "simt";
    case ForwardKernel::kMmaSync: return "mma_sync";
    case ForwardKernel::kWgmma: return "wgmma";
    case ForwardKernel::kWgmmaWs: return "wgmma_ws";
    case ForwardKernel::kTma: return "wgmma_tma";
    case ForwardKernel::kWsTma: return "wgmma_ws_tma";
  }
  return "?";
}
struct ForwardPlan {
  ForwardKernel kernel;
  Tiling tiling;
  int dt;  // the head-dim tile the kernel runs at (the 1-D TMA kernel: tma_head_dim_tile)
  bool wgmma() const {
    return kernel != ForwardKernel::kSimt && kernel != ForwardKernel::kMmaSync;
  }
};

// The forward kernel and tiles for problem p: `wgmma_ok` says whether the `mma` setting lets
// wgmma run (handlers.cu pick_wgmma: a Hopper device, and `mma` 0 or 2); with `mma` 0 (auto),
// 1-D problems the TMA kernel does not serve run on mma.sync (auto_forward_on_wgmma).
inline ffi::Error plan_forward(const Problem& p, I64Span q_tile, I64Span kv_tile, int dt, bool f32,
                               int64_t mma, bool wgmma_ok, ForwardPlan& plan) {
  plan.dt = dt;
  if (!f32 && wgmma_ok && forward_on_tma(p, tiles_given(q_tile, kv_tile))) {
    plan.kernel = ForwardKernel::kTma;
    plan.tiling = tma_tiling(p);
    plan.dt = tma_head_dim_tile(dt);
    return ok();
  }
  if (!f32 && wgmma_ok && forward_on_tma_box(p, dt, tiles_given(q_tile, kv_tile)) &&
      tma_box_plan(p, dt, plan.tiling)) {
    plan.kernel = ForwardKernel::kTma;  // its box walk
    return ok();
  }
  const bool wgmma = !f32 && wgmma_ok && !(mma == 0 && !auto_forward_on_wgmma(p));
  if (wgmma && dt >= 64) {  // the box TMA variant, where its tiles come out as it needs
    Tiling t;
    bool fits = false;
    NATTEN_TRY(box_tma_tiling(p, q_tile, kv_tile, dt, t, fits));
    if (fits) {
      plan.kernel = ForwardKernel::kWsTma;
      plan.tiling = t;
      return ok();
    }
  }
  plan.kernel = f32 ? ForwardKernel::kSimt
                    : !wgmma ? ForwardKernel::kMmaSync
                             : fwd_warp_specialized(dt) ? ForwardKernel::kWgmmaWs
                                                        : ForwardKernel::kWgmma;
  return forward_tiling(p, q_tile, kv_tile, dt, f32, wgmma, plan.tiling);
}

// The key-tile walk with q and do copied by the TMA (backward.cu kTma, Hopper; with dq formed in
// it, the dq tiles added by TMA reduce-adds): the box TMA problems at head-dim tiles 64 and 128,
// whose walk's 64-token query tiles (`t`) stay inside one batch element.
inline bool key_walk_on_box_tma(const Problem& p, int dt, const Tiling& t) {
  return dt >= 64 && box_tma_problem(p) && t.qlog[0] + t.qlog[1] + t.qlog[2] == kTileLog &&
         box_tiles_in_batch(p, t);
}

// The mean number of query tiles a key tile's walk visits (the backward's steps a CTA): the
// pairs of tiles `t` (the forward walk's, AxisPairs: the same tiles' windows meet) over the key
// tiles the launch's grid holds (every dilation group counted at the first one's length).
inline double mean_key_walk(const Problem& p, const Tiling& t) {
  double pairs = 1, key_tiles = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    const AxisParams& ax = p.axis[a];
    const int ql = t.qlog[a], kl = t.kvlog[a];
    pairs *= static_cast<double>(AxisPairs(ax, ql, kl).pairs[ql][kl]);
    key_tiles *= ax.dilation * ceil_div(group_length(ax.length, ax.dilation, 0), int64_t{1} << kl);
  }
  return pairs / key_tiles;
}
// The two-warpgroup dk / dv walk (one CTA an SM, 128-key tiles) pays its prologue (k and v in,
// 64 KB at head dim 128) and epilogue (dk, dv out) once per walk with nothing beside it on the
// SM; the one-warpgroup walk's two CTAs an SM overlap them. Measured on an H100 (BENCHMARKS.md,
// session 19): 3d-video (~45 query tiles a walk) backward 8-13% faster, 2d-rect-d128 (~6) 8%
// slower.
constexpr double kLongKeyWalk = 16;

// ---- which backward schedule ----------------------------------------------------------------
// kWalkTma: backward_tma.cu (1-D problems, backward_on_tma); kWalk: backward.cu with dq formed in
// the key-tile walk (Hopper, float16 / bfloat16, non-deterministic, with the dq workspace,
// head-dim tile 64 at most), on bwd_dq_warpgroups computing warpgroups; kDqDkdv: the dq kernel,
// then the key-tile walk for dk / dv only (deterministic mode, mma.sync, head-dim tile 128);
// kDqTmaDkdv: the same with the dq kernel fed by the TMA (backward_dq_tma.cu: Hopper, the box
// TMA forward's problems and tiles); kSimt: float32's pair of kernels. In kWalk (at
// head-dim tile 64) and both two-kernel schedules on Hopper the key-tile walk may be fed by the
// TMA too (kv_tma: key_walk_on_box_tma). The handler runs what this says;
// jax_natten.fused_tiles reports it (backward_name).
enum class BackwardKernel { kSimt, kDqDkdv, kDqTmaDkdv, kWalk, kWalkTma };
struct BackwardPlan {
  BackwardKernel kernel;
  int dq_wgs;         // kWalk: its computing warpgroups (64 keys each); else 0
  Tiling kv_tiling;   // the key-tile walk's tiles (query tiles it walks, key tiles it owns)
  Tiling dq_tiling;   // kDqTmaDkdv: the dq kernel's (the box TMA forward's)
  int dt;             // the head-dim tile the kernels run at (kWalkTma: tma_head_dim_tile)
  bool kv_tma;        // kWalk (head-dim tile 64), kDqDkdv, kDqTmaDkdv: the key-tile walk fed by
                      // the TMA (key_walk_on_box_tma)
};
// The schedule's name: "walk_tma" (the 1-D kernel), "walk", "walk_box_tma" (the walk fed by the
// TMA), "simt", or for the two-kernel schedules "dq", then "_tma" where the TMA feeds the dq
// kernel, "_dkdv", then "_tma" where it feeds the dk / dv walk.
inline const char* backward_name(const BackwardPlan& plan) {
  switch (plan.kernel) {
    case BackwardKernel::kSimt: return "simt";
    case BackwardKernel::kDqDkdv: return plan.kv_tma ? "dq_dkdv_tma" : "dq_dkdv";
    case BackwardKernel::kDqTmaDkdv: return plan.kv_tma ? "dq_tma_dkdv_tma" : "dq_tma_dkdv";
    case BackwardKernel::kWalk: return plan.kv_tma ? "walk_box_tma" : "walk";
    case BackwardKernel::kWalkTma: return "walk_tma";
  }
  return "?";
}
// `wgmma`: the handler's pick_wgmma; `have_dq_acc`: the caller passed the dq workspace
// (fna.py uses_dq_workspace). The dq kernel's own tiles (kDqDkdv) are the handler's.
inline ffi::Error plan_backward(const Problem& p, I64Span q_tile, I64Span kv_tile, int dt,
                                bool f32, bool wgmma, bool deterministic, bool have_dq_acc,
                                BackwardPlan& plan) {
  const bool walk = !f32 && wgmma && !deterministic && have_dq_acc && dt <= 64;
  plan.dq_wgs = walk ? bwd_dq_warpgroups(p) : 0;
  plan.kv_tma = false;
  plan.dt = dt;
  if (walk && backward_on_tma(p, dt, tiles_given(q_tile, kv_tile))) {
    plan.kernel = BackwardKernel::kWalkTma;
    plan.kv_tiling = tma_tiling(p);  // 128 keys a CTA, 128 queries a step
    plan.dt = tma_head_dim_tile(dt);
    return ok();
  }
  plan.kernel = f32    ? BackwardKernel::kSimt
                : walk ? BackwardKernel::kWalk
                       : BackwardKernel::kDqDkdv;
  if (plan.kernel == BackwardKernel::kDqDkdv && wgmma && dt >= 64) {
    // The box TMA forward's tiles (plan_forward), where they come out as its kernels need.
    Tiling t;
    bool fits = false;
    NATTEN_TRY(box_tma_tiling(p, q_tile, kv_tile, dt, t, fits));
    if (fits) {
      plan.kernel = BackwardKernel::kDqTmaDkdv;
      plan.dq_tiling = t;
    }
  }
  // Query tiles of 64 tokens, key tiles of 64 per computing warpgroup (float32: both
  // 2^f32_tile_log). A user's key tile (at most 64 tokens) grows along its first axis to a
  // two-warpgroup walk's 128 (fill_tile).
  const int q_log = f32 ? f32_tile_log(dt) : kTileLog;
  const int kv_log = f32 ? f32_tile_log(dt) : (plan.dq_wgs == 2 ? kTileLog + 1 : kTileLog);
  NATTEN_TRY(choose_tiling(p, q_tile, kv_tile, q_log, plan.kv_tiling, kv_log));
  plan.kv_tma = (plan.kernel == BackwardKernel::kDqDkdv ||
                 plan.kernel == BackwardKernel::kDqTmaDkdv ||
                 (plan.kernel == BackwardKernel::kWalk && dt == 64)) &&
                wgmma && key_walk_on_box_tma(p, dt, plan.kv_tiling);
  // Head-dim tile 128 beside the TMA dq kernel: the dk / dv walk on two computing warpgroups of
  // 64 keys (128-key tiles, a producer warpgroup: backward.cu, kDqWgs = 2 without dq), where its
  // tiles are fed by the TMA too and its walks are long (kLongKeyWalk). (One warpgroup of 64 keys
  // staging its own tiles waited on each step's chain: 3d-video's dk / dv kernel ran at ~41%
  // tensor time. The same walk adding dq too, which would drop the dq kernel's recomputation of
  // S and dP, made 3d-video's backward 40% slower: at ~198 KB of shared memory it runs one CTA an
  // SM on a two-stage ring. BENCHMARKS.md, session 21.) A user's tiles are kept.
  if (plan.kernel == BackwardKernel::kDqTmaDkdv && dt == 128 && !tiles_given(q_tile, kv_tile)) {
    Tiling t;
    NATTEN_TRY(choose_tiling(p, q_tile, kv_tile, q_log, t, kTileLog + 1));
    if (key_walk_on_box_tma(p, dt, t) && mean_key_walk(p, t) >= kLongKeyWalk) {
      plan.kv_tiling = t;
      plan.kv_tma = true;
    }
  }
  return ok();
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
