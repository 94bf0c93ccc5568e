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

}  // namespace natten
