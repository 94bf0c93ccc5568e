// The FNA kernels' arguments (built by handlers.cu from the problem and tiling.h's tiles) and
// the constants every kernel shares.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "natten/tile_mask.h"
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
  uint64_t q_rep[kMaxRank], kv_rep[kMaxRank];  // tile_reps(qlog), tile_reps(kvlog): tile_mask
  ColumnAxes kv_cols;           // column_axes(kvlog, 16): the box walk's masks (walk.cuh)
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
