// Window tests for a whole tile row at once, as bit sets (host and device). A tile of at most 64
// tokens with extents 2^logs per axis orders its tokens row-major (bit r: the token at offsets
// r >> (logs[1] + logs[2]), (r >> logs[2]) % 2^logs[1], r % 2^logs[2]); tile_mask gives the
// tokens whose offsets lie in [lo, hi) on every axis. The FNA kernels test a query row's window
// against a key tile (forward) and a key row's inverse window against a query tile (backward)
// with it, one bit per element instead of a comparison per axis per element.
#pragma once

#include <cstdint>

#include "natten/window.h"

namespace natten {

// A 64-bit word with one bit at the start of every run of 2^run_log bits (run_log >= 6: one run).
NATTEN_HD constexpr uint64_t run_repeat(int run_log) {
  return run_log >= 6 ? 1ull : ~0ull / ((1ull << (1 << run_log)) - 1);
}
static_assert(run_repeat(0) == ~0ull && run_repeat(1) == 0x5555555555555555ull &&
                  run_repeat(3) == 0x0101010101010101ull && run_repeat(5) == 0x0000000100000001ull &&
                  run_repeat(6) == 1ull,
              "run_repeat: one bit per run");

// Per axis, the factor that repeats a pattern over the axis's runs of 2^(logs[ax] + later logs)
// bits. The first axis's run is the whole word, so a tile of fewer than 64 tokens has no bit past
// its last token.
NATTEN_HD void tile_reps(const int (&logs)[kMaxRank], uint64_t (&rep)[kMaxRank]) {
  rep[2] = run_repeat(logs[2]);
  rep[1] = run_repeat(logs[1] + logs[2]);
  rep[0] = run_repeat(6);
}

// The bits below n, 0 <= n <= 64.
NATTEN_HD uint64_t bits_below(int n) {
#if defined(__CUDA_ARCH__)
  uint64_t high;  // ~0 << n; PTX clamps shift amounts to 64 (a C++ shift by 64 is undefined)
  asm("shl.b64 %0, %1, %2;" : "=l"(high) : "l"(~0ull), "r"(n));
  return ~high;
#else
  return n >= 64 ? ~0ull : (1ull << n) - 1;
#endif
}

// The tokens with offsets in [lo, hi) on every axis (0 <= lo <= hi <= 2^logs per axis; rep:
// tile_reps(logs)). On axis ax they are, in each of its runs, the bits [lo step, hi step) with
// step = 2^(later axes' logs): the bits below hi step minus those below lo step, repeated.
NATTEN_HD uint64_t tile_mask(const int (&logs)[kMaxRank], const uint64_t (&rep)[kMaxRank],
                             const int (&lo)[kMaxRank], const int (&hi)[kMaxRank]) {
  uint64_t m = ~0ull;
  int step_log = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int ax = kMaxRank - 1; ax >= 0; --ax) {
    m &= (bits_below(hi[ax] << step_log) - bits_below(lo[ax] << step_log)) * rep[ax];
    step_log += logs[ax];
  }
  return m;
}

// ---- a tile's tokens as a thread's accumulator columns (fna/walk.cuh ColumnWindow) ------------
// A wgmma accumulator row of 8 B columns (B n8 blocks) gives each thread columns
// 8 nb + 2 (lane % 4) + c (nb < B, c < 2); over a tile of 2^logs tokens in the order above, axis
// ax's offset is column bits [S, S + L) (L = logs[ax], S the later axes' logs). The columns whose
// offset lies in [lo, hi) are, for each c, a run of n8 blocks repeated every 2^P blocks:
//   S >= 3: the offset is (nb >> (S - 3)) mod 2^L: blocks [lo, hi) << (S - 3), P = L + S - 3;
//   S < 3, u = 3 - S: the offset is (nb << u) mod 2^L + t, t = ((2 (lane % 4) + c) >> S) mod 2^L
//     (no carry: t < 2^u): blocks [ceil((lo - t) / 2^u), ceil((hi - t) / 2^u)), P = max(L - u, 0)
//     (L <= u: t is every block's offset; the run is all blocks or none).
// Both are block(x) = ((x + bias) scale) >> down, bias = 2^u - 1 - t (0 where S >= 3), scale =
// 2^max(S - 3, 0), down = u. For x in [0, 2^L] the blocks lie in [0, 2^P]; a bound outside the
// tile is clamped before the shift: block = min(max((x + bias) scale, 0), cap) >> down with cap =
// (2^P << down) + 2^down - 1 (an arithmetic shift is monotone and keeps 0). rep repeats a run
// every 2^P blocks below B (axes before the last: also from bit 16, the c = 1 copy: t depends on
// c only on the axis with S = 0, which must be the last, logs[2] >= 1).
struct ColumnAxes {
  int scale[kMaxRank], down[kMaxRank], cap[kMaxRank], shift[kMaxRank], mask[kMaxRank];
  uint32_t rep[kMaxRank];  // shift: S; mask: 2^L - 1
};
// For a tile of 8 blocks tokens (2 <= blocks <= 16) with logs[2] >= 1 (the caller checks).
NATTEN_HD ColumnAxes column_axes(const int (&logs)[kMaxRank], int blocks) {
  ColumnAxes c{};
  int s = 0;
  for (int ax = kMaxRank - 1; ax >= 0; --ax) {
    const int p = s + logs[ax] - 3 > 0 ? s + logs[ax] - 3 : 0;  // (2^P <= blocks)
    c.shift[ax] = s;
    c.mask[ax] = (1 << logs[ax]) - 1;
    c.scale[ax] = 1 << (s > 3 ? s - 3 : 0);
    c.down[ax] = s < 3 ? 3 - s : 0;
    c.cap[ax] = ((1 << p) << c.down[ax]) + (1 << c.down[ax]) - 1;
    const uint32_t run_rep = ((1u << blocks) - 1) / ((1u << (1 << p)) - 1);
    c.rep[ax] = ax == kMaxRank - 1 ? run_rep : run_rep | run_rep << 16;
    s += logs[ax];
  }
  return c;
}

// A thread's window bounds are kept per kind k: axes 0, 1, the last axis for c = 0, and for
// c = 1 (k = 3). column_bound: a bound x of kind k for the thread with columns 2 quad, 2 quad + 1
// (quad = lane % 4) of each n8 block, kept as (x + bias) scale.
NATTEN_HD int column_axis(int k) { return k < 2 ? k : 2; }
NATTEN_HD int column_bound(const ColumnAxes& ca, int quad, int k, int x) {
  const int ax = column_axis(k), s = ca.shift[ax];
  const int t = s >= 3 ? 0 : ((2 * quad + (k == 3)) >> s) & ca.mask[ax];
  return (x + (1 << ca.down[ax]) - 1 - t) * ca.scale[ax];
}
// A row's window [start, end) per axis as its kept bounds per kind, for the thread of lane quad
// `quad` (formed once per row: fna/walk.cuh ColumnWindow).
NATTEN_HD void column_bounds(const ColumnAxes& ca, int quad, const int (&start)[kMaxRank],
                             const int (&end)[kMaxRank], int (&lo)[4], int (&hi)[4]) {
  for (int k = 0; k < 4; ++k) {
    lo[k] = column_bound(ca, quad, k, start[column_axis(k)]);
    hi[k] = column_bound(ca, quad, k, end[column_axis(k)]);
  }
}
// The columns between kept bounds lo and hi of kind k, for a tile at origin o on that axis
// (off = -o scale: column_offset), as bits nb of the run (repeated; not yet placed for c = 1).
NATTEN_HD int column_offset(const ColumnAxes& ca, int ax, int o) { return -o * ca.scale[ax]; }
// A tile's column_offset per axis (formed once per step, shared by the rows).
NATTEN_HD void column_offsets(const ColumnAxes& ca, const int (&o)[kMaxRank],
                              int (&off)[kMaxRank]) {
  for (int ax = 0; ax < kMaxRank; ++ax) off[ax] = column_offset(ca, ax, o[ax]);
}
NATTEN_HD uint32_t column_run(const ColumnAxes& ca, int k, int lo, int hi, int off) {
  const int ax = column_axis(k);
  auto block = [&](int x) { return imin(imax(x + off, 0), ca.cap[ax]) >> ca.down[ax]; };
  const int first = block(lo), last = block(hi);
  uint32_t m;
#if defined(__CUDA_ARCH__)
  asm("bmsk.clamp.b32 %0, %1, %2;" : "=r"(m) : "r"(first), "r"(last - first));
#else
  m = ((1u << (last - first)) - 1) << first;  // (runs of at most 16 bits)
#endif
  return m * ca.rep[ax];
}
// A row's window as the thread's columns: bit nb + 16 c for column 8 nb + 2 quad + c, from its
// kept bounds per kind (lo, hi: column_bound) and the tile's column_offset per axis. Axes flagged
// in `skip` (bit ax: the tile lies inside the window on that axis) are not tested.
NATTEN_HD uint32_t column_bits(const ColumnAxes& ca, const int (&lo)[4], const int (&hi)[4],
                               const int (&off)[kMaxRank], unsigned skip) {
  auto run = [&](int k) { return column_run(ca, k, lo[k], hi[k], off[column_axis(k)]); };
  uint32_t m = ~0u;
  if (!(skip & 1u)) m &= run(0);
  if (!(skip & 2u)) m &= run(1);
  if (!(skip & 4u)) m &= run(2) | run(3) << 16;
  return m;
}

}  // namespace natten
