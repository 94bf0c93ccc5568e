// The FNA kernels' arguments (built by handlers.cu from the problem and tiling.h's tiles) and
// the constants every kernel shares.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "natten/window.h"

namespace natten {
namespace gpu {
namespace fna {

constexpr int kRows = 64;     // rows of every CTA tile (query tile, key tile)
constexpr int kThreads = 128;  // 4 warps x 16 rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A 64-bit word with one bit set at the start of every run of 2^run_log bits (run_log <= 6): the
// factor that repeats a pattern of one run over the word (walk.cuh, tile_mask).
__host__ __device__ constexpr uint64_t run_repeat(int run_log) {
  return run_log >= 6 ? 1ull : ~0ull / ((1ull << (1 << run_log)) - 1);
}
static_assert(run_repeat(0) == ~0ull && run_repeat(1) == 0x5555555555555555ull &&
                  run_repeat(3) == 0x0101010101010101ull && run_repeat(5) == 0x0000000100000001ull &&
                  run_repeat(6) == 1ull,
              "run_repeat: one bit per run");

// Per axis of a tile with extents 2^logs, the factor that repeats a pattern over the runs of
// 2^(logs[ax] + later logs) bits (walk.cuh, tile_mask); the first axis's run is the whole word, so
// a tile of fewer than 64 tokens has no bit past its last token.
__host__ __device__ inline void tile_reps(const int (&logs)[kMaxRank], uint64_t (&rep)[kMaxRank]) {
  rep[2] = run_repeat(logs[2]);
  rep[1] = run_repeat(logs[1] + logs[2]);
  rep[0] = run_repeat(6);
}

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
  uint64_t q_rep[kMaxRank], kv_rep[kMaxRank];  // tile_reps(qlog), tile_reps(kvlog): tile_mask
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

}  // namespace fna
}  // namespace gpu
}  // namespace natten
