// The roles the warp-specialized box kernels share (Hopper): forward_ws.cu's forward and
// backward_dq_tma.cu's dq kernel both walk a 128-token query tile's key box in 64-key tiles with
// two computing warpgroups of 64 query rows, fed by a producer (pipeline.cuh). Here: the TMA
// producer's copies (the key side shared with forward_tma.cu's box walk), and which steps of the
// walk a computing warpgroup's rows need.
#pragma once

#include "fna.cuh"
#include "pipeline.cuh"
#include "tensor_maps.h"
#include "tiling.h"  // kTileLog

namespace natten {
namespace gpu {
namespace fna {

// A box tile's dilation group (x, y, z), the index of its maps (BoxTmaMaps: group (gx dy + gy)
// dz + gz), and batch element b's first local x (the maps fold batch and x into one axis).
__device__ __forceinline__ int box_map_group(const FnaArgs& a, const Box& qb) {
  return (qb.grp[0] * a.ax[1].dilation + qb.grp[1]) * a.ax[2].dilation + qb.grp[2];
}
__device__ __forceinline__ int box_batch_x(const FnaArgs& a, int b) {
  return b * (a.ax[0].length / a.ax[0].dilation);
}

// The TMA producer thread's key side: each spatial key tile of qb's walk (key_walk: a.kvlog
// boxes of kKeys keys) into the ring's stages, k and v as 64-column blocks of kKeys rows
// (`kmap`, `vmap`: the tile's dilation group's; `xb`: box_batch_x). Shared by the box kernels
// (produce_box_tiles, 64-key tiles) and forward_tma.cu's box walk (128-key boxes).
template <typename T, int DT, int kKeys, int kStages>
__device__ __forceinline__ void produce_key_boxes(const FnaArgs& a, const Box& qb,
                                                  const CUtensorMap* kmap,
                                                  const CUtensorMap* vmap, int xb, int kvh,
                                                  T* Ks, T* Vs, const StageRing<kStages>& ring) {
  constexpr int kBlock = kKeys * 64;
  const KeyWalk walk = key_walk(a, qb);
  TileCounter next;
  next.reset();
  for (int j = 0; j < walk.spatial; ++j) {
    ring.acquire(j);
    const int st = ring.stage(j);
    uint64_t* full = ring.full + st;
    mbar_expect_tx(full, 2 * kKeys * DT * static_cast<int>(sizeof(T)));
    int o[3];
    bool inside;
    key_tile(a, walk, next, o, inside);
    next.next(walk.n);
#pragma unroll
    for (int c = 0; c < DT / 64; ++c) {
      T* kd = Ks + st * kKeys * DT + c * kBlock;
      T* vd = Vs + st * kKeys * DT + c * kBlock;
      tma_load_5d(kd, kmap, full, 64 * c, kvh, o[2], o[1], xb + o[0]);
      tma_load_5d(vd, vmap, full, 64 * c, kvh, o[2], o[1], xb + o[0]);
    }
  }
}

// The TMA producer's one thread: the query-side tiles of qb (q, and with kGrad do, into q_dst[0]
// and q_dst[1]: 64-column blocks of kQRows rows, 128-byte swizzle), completing on q_full, then
// each spatial key tile of qb's walk (k and v) into the ring's stages (produce_key_boxes). The
// tile's dilation group picks the maps; boxes are (64 head dims, 1 head, z, y, x) at local
// coordinates, batch and x folded into one (tensor_maps.h encode_group_map).
template <typename T, int DT, int kQRows, int kStages, bool kGrad>
__device__ __forceinline__ void produce_box_tiles(const FnaArgs& a, const BoxTmaMaps& maps,
                                                  const Box& qb, int b, int h, int kvh,
                                                  T* const (&q_dst)[2], uint64_t* q_full,
                                                  T* Ks, T* Vs, const StageRing<kStages>& ring) {
  constexpr int kQBlock = kQRows * 64;
  const int grp = box_map_group(a, qb);
  const int xb = box_batch_x(a, b);
  constexpr int kSides = kGrad ? 2 : 1;
  mbar_expect_tx(q_full, kSides * kQRows * DT * static_cast<int>(sizeof(T)));
#pragma unroll
  for (int side = 0; side < kSides; ++side) {
    const CUtensorMap* map = side == 0 ? &maps.q[grp] : &maps.d_o[grp];
#pragma unroll
    for (int c = 0; c < DT / 64; ++c)
      tma_load_5d(q_dst[side] + c * kQBlock, map, q_full, 64 * c, h, qb.lo[2], qb.lo[1],
                  xb + qb.lo[0]);
  }
  produce_key_boxes<T, DT, kRows, kStages>(a, qb, &maps.k[grp], &maps.v[grp], xb, kvh, Ks, Vs,
                                           ring);
}

// Which steps of query tile qb's walk warpgroup wg computes: its rows 64 wg .. 64 wg + 63 of the
// 128-token tile are one half of it along its first axis of more than one token (the row index
// is row-major over the axes: its bit 6 belongs to that axis), so on every other axis they reach
// the whole tile's key range, and on that one (`axis`) the local keys [lo, hi). A tile of 64
// tokens or fewer is all warpgroup 0's (axis = -1: no limit). The spatial key tiles outside
// those keys are released without computing, so the two warpgroups share the staging of a
// 128-token tile but compute about what 64-token tiles would.
struct OwnKeys {
  bool any;  // the warpgroup has a row inside the problem
  int axis, lo, hi;

  __device__ __forceinline__ OwnKeys(const FnaArgs& a, const Box& qb, int wg) {
    axis = -1;
    lo = hi = 0;
    any = wg == 0;
    if (a.qlog[0] + a.qlog[1] + a.qlog[2] <= kTileLog) return;
    axis = a.qlog[0] > 0 ? 0 : (a.qlog[1] > 0 ? 1 : 2);
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {  // (constant indices keep qb in registers)
      if (ax != axis) continue;
      const int half = 1 << (a.qlog[ax] - 1);
      const int first = qb.lo[ax] + wg * half, last = imin(first + half, qb.hi[ax]);
      any = first < last;
      if (any) {
        lo = win_start(a.ax[ax], qb.lg[ax], first);
        hi = win_end(a.ax[ax], qb.lg[ax], last - 1);
      }
    }
  }
  // Whether step j (the spatial key tile at `current` when j < walk.spatial) is computed: every
  // tile of additional keys is, and the spatial tiles that meet the rows' keys on the split axis.
  __device__ __forceinline__ bool computed(const FnaArgs& a, const KeyWalk& walk,
                                           const TileCounter& current, int j) const {
    if (!any) return false;
    if (j >= walk.spatial || axis < 0) return true;
    int o = 0, t = 0;  // the tile's keys on that axis (constant indices keep arrays in registers)
#pragma unroll
    for (int ax = 0; ax < 3; ++ax) {
      if (ax == axis) {
        o = walk.box_lo[ax] + (current.j[ax] << a.kvlog[ax]);
        t = 1 << a.kvlog[ax];
      }
    }
    return o < hi && o + t > lo;
  }
};

}  // namespace fna
}  // namespace gpu
}  // namespace natten
