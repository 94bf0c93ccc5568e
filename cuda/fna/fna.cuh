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
//             the softmax statistics and o in float32 ("softmax statistics", softmax.cuh).
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
//   ring of shared-memory stages handed over by mbarriers, two warpgroups compute, each on 64
//   keys of the CTA's 128-key tile on 1-D problems (bwd_key_rows; one warpgroup of 64 keys
//   elsewhere, tiling.h bwd_dq_warpgroups), sharing every staged tile and dq row. 1-D problems
//   at head-dim tile 64 (tiling.h backward_on_tma) run the same schedule on backward_tma.cu's
//   kernel: every tile copied by the TMA, 128-query steps, dq added by TMA reduce-adds.
//   Deterministic mode, mma.sync (sm_80) and head-dim tile 128: fna_dq_kernel (backward_dq.cu)
//   walks the forward's key tiles and recomputes P for dq and d-rpb, fna_bwd_kernel computes dk /
//   dv only: no atomics on dq. On Hopper the box TMA forward's problems run fna_dq_tma_kernel
//   (backward_dq_tma.cu) for dq instead: the warp-specialized forward's roles and 128-token
//   query tiles, q, do, k and v copied by the TMA; and on 2-D / 3-D problems there
//   fna_bwd_kernel gets each query tile's q and do from the TMA (kTma; in the single walk too,
//   whose dq tiles then go by TMA reduce-adds). d-rpb is summed in shared
//   memory per CTA and added to the output with one atomic per entry and CTA, so its last bits
//   depend on the order the CTAs run in; in deterministic mode the kernels skip it and the
//   Python layer computes it from the unfused kernels' fixed-order reductions (ops.py).
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
// ---- Files ------------------------------------------------------------------------------------
// This header gathers the device-side parts every FNA kernel file includes:
//   args.cuh       FnaArgs / FnaPtrs (one call's arguments) and the constants the kernels share
//   walk.cuh       tile geometry; the key walk (forward, dq) and the query walk (dk / dv)
//   staging.cuh    cp.async staging of operand tiles; the double-buffered key walk's step
//   products.cuh   the tile products on both MMA families; C-fragment columns and row stores
//   softmax.cuh    the backward's weights from the softmax statistics; exp2; quad reductions
// and, below, each kernel's shared-memory size. Beside them: pipeline.cuh (producer / consumer
// roles, Hopper), launch.h (tiles per warp, CTAs per SM, the one launcher), tiling.h (host: tile
// shapes); the kernels: forward.cu (synchronous) and forward_ws.cu (warp-specialized, Hopper),
// sharing forward_step.cuh (masking, online softmax, epilogue); backward.cu (key side, and dq in
// the same walk on Hopper), backward_dq.cu, backward_rows.cu (delta, dq conversion), simt_f32.cu
// (float32); handlers.cu (the FFI handlers); fed by the tensor memory accelerator (Hopper: one
// producer thread copies each tile; tensor_maps.h their maps): forward_tma.cu (1-D problems, and
// 2-D / 3-D ones in stacked 64-query boxes with 128-key box steps), backward_tma.cu (1-D problems,
// 128-token tiles), forward_ws.cu's TMA variant and backward_dq_tma.cu (2-D / 3-D boxes, sharing
// box_roles.cuh).
#pragma once

#include "args.cuh"
#include "products.cuh"
#include "softmax.cuh"
#include "staging.cuh"
#include "tiling.h"  // the TMA kernels' tiles
#include "walk.cuh"

namespace natten {
namespace gpu {
namespace fna {

// Shared-memory bytes of each kernel for head-dim tile DT and element size `elem`.
constexpr int tile_bytes(int dt, int elem) { return kRows * (dt + 8) * elem; }
// q (64 mt rows), 2 x (k, v), windows, the rows' own-key logits; wgmma tiles have no row padding,
// and wgmma takes a tile of ones from shared memory (products.cuh, RowSums).
constexpr int fwd_smem(int dt, int elem, int mt, bool wg) {
  return (mt + 4) * (wg ? kRows * dt * elem : tile_bytes(dt, elem)) + kRows * mt * 7 * 4 +
         (wg ? kOnesBytes : 0);
}
// q, do (64 mt rows each), 2 x (k, v), windows.
constexpr int dq_smem(int dt, int elem, int mt, bool wg) {
  return (2 * mt + 4) * (wg ? kRows * dt * elem : tile_bytes(dt, elem)) + kRows * mt * 6 * 4;
}
// The warp-specialized forward (Hopper, forward_ws.cu fna_fwd_ws_kernel): a producer warpgroup and two
// computing warpgroups of 64 query rows each (128-token query tiles) sharing a ring of key-tile
// stages, one CTA per SM (168 registers per thread at launch: 72 for the producer, whose key
// staging spilled 25 instructions at 56, 216 for the computing threads, which need ~200 at
// head-dim tile 128). (Two CTAs per SM leave the computing threads 104 registers: too few for
// asynchronous wgmma at head-dim tile 64, which ptxas then serializes, C7512.)
constexpr int kFwdWsThreads = 3 * kThreads;
constexpr int kFwdWsQRows = 2 * kRows;
constexpr int fwd_ws_min_ctas(int) { return 1; }
constexpr int fwd_ws_stages(int) { return 3; }
constexpr int fwd_ws_producer_regs(int) { return 72; }
constexpr int fwd_ws_consumer_regs(int) { return 216; }
static_assert(kThreads * fwd_ws_producer_regs(128) + 2 * kThreads * fwd_ws_consumer_regs(128) <=
                  kFwdWsThreads * 168,
              "the roles' registers fit what the CTA holds at launch");
// q (128 rows), the stages' k and v, windows and own-key logits (7 ints / floats a row), the tile
// of ones (products.cuh, RowSums), barriers.
constexpr int fwd_ws_smem(int dt, int elem) {
  return (kFwdWsQRows + 2 * fwd_ws_stages(dt) * kRows) * dt * elem + kFwdWsQRows * 7 * 4 +
         kOnesBytes + 8 * (2 * fwd_ws_stages(dt) + 1);
}
// The dq kernel fed by the TMA (Hopper, backward_dq_tma.cu fna_dq_tma_kernel): the warp-
// specialized forward's roles, tiles and registers; shared memory for q and do (128 rows each),
// the stages' k and v, the rows' windows, barriers, and the swizzle's alignment slack (~164 KB at
// head-dim tile 128).
constexpr int kDqTmaStages = 3;
constexpr int dq_tma_smem(int dt, int elem) {
  return (2 * kFwdWsQRows + 2 * kDqTmaStages * kRows) * dt * elem + kFwdWsQRows * 6 * 4 +
         8 * (2 * kDqTmaStages + 1) + 1024;
}
// The TMA forward (Hopper, forward_tma.cu fna_fwd_tma_kernel: 1-D problems, and 2-D / 3-D ones
// in its box walk, tiling.h tma_box_tiling): a producer
// warpgroup and tma_fwd_wgs(dt) computing warpgroups of 64 query rows each (tiling.h: three at
// head-dim tile 64, 192-query tiles; two at 128), 128-key steps, every tile copied by the TMA
// (one producer thread) as 64-column blocks with 128-byte swizzle, a ring of 5 stages at head-dim
// tile 64 and 3 at 128 (~186 / ~226 KB). The producer thread needs few registers: the computing
// warpgroups take 160 of the SM's 64K each at three (s: 64 floats, o: 32, P packed: 32) and 240
// at two (o: 64).
constexpr int tma_fwd_stages(int dt) { return dt <= 64 ? 5 : 3; }
constexpr int tma_fwd_threads(int dt) { return (tma_fwd_wgs(dt) + 1) * kThreads; }
constexpr int tma_fwd_producer_regs() { return 24; }
constexpr int tma_fwd_consumer_regs(int dt) { return tma_fwd_wgs(dt) == 3 ? 160 : 240; }
constexpr bool tma_fwd_regs_fit(int dt) {
  return kThreads * tma_fwd_producer_regs() +
             tma_fwd_wgs(dt) * kThreads * tma_fwd_consumer_regs(dt) <=
         64 * 1024;
}
static_assert(tma_fwd_regs_fit(64) && tma_fwd_regs_fit(128),
              "the roles' registers fit the SM's 64K");
// q, the stages' k and v, the tile of ones, barriers, and 1024 bytes of slack to align the
// swizzle atoms.
constexpr int tma_fwd_smem(int dt) {
  return (tma_fwd_q_rows(dt) + 2 * tma_fwd_stages(dt) * kTmaFwdKeys) * dt * 2 + kOnesBytes +
         8 * (2 * tma_fwd_stages(dt) + 1) + 1024;
}
// Floats per row of the backward's float32 dq staging tile (rows stay 16-byte aligned; the pad
// spreads a warp's fragment stores over the banks).
template <int DT>
constexpr int kDqLd = DT + 8;
// The key-side backward (backward.cu), by its variant kDqWgs: 0, dk / dv only, one warpgroup
// that stages and computes 64 keys, 2 CTAs per SM; 1 or 2, warp-specialized with dq in the walk
// (pipeline.cuh): a producer warpgroup and kDqWgs computing warpgroups of 64 keys each. With two
// (a 128-key tile) every staged q / do tile and every dq row added to the workspace serves twice
// the keys, at one CTA per SM; with one, 2 CTAs per SM. Per variant: stages of the query-side
// tiles (q, do, stats, delta), key rows, threads, and the roles' registers (setmaxnreg): the
// launch's share of the SM's 64K registers, moved from the producer's address arithmetic to the
// computing warpgroups' accumulators.
constexpr int bwd_stages(int dq_wgs) { return dq_wgs ? 3 : 2; }
constexpr int bwd_compute_wgs(int dq_wgs) { return dq_wgs ? dq_wgs : 1; }
constexpr int bwd_key_rows(int dq_wgs) { return bwd_compute_wgs(dq_wgs) * kRows; }
constexpr int bwd_compute_threads(int dq_wgs) { return bwd_compute_wgs(dq_wgs) * kThreads; }
constexpr int bwd_threads(int dq_wgs) {
  return bwd_compute_threads(dq_wgs) + (dq_wgs ? kThreads : 0);
}
constexpr int bwd_min_ctas(int dq_wgs) { return dq_wgs == 2 ? 1 : 2; }
// (dq = false: the two-warpgroup walk for dk and dv alone, head-dim tile 128 beside the TMA dq
// kernel: dk and dv take 128 registers a thread.)
constexpr int bwd_producer_regs(int dq_wgs, bool dq = true) {
  return dq_wgs == 2 ? (dq ? 56 : 40) : 40;
}
constexpr int bwd_consumer_regs(int dq_wgs, bool dq = true) {
  return dq_wgs == 2 ? (dq ? 224 : 232) : 216;
}
static_assert(kThreads * bwd_producer_regs(1) + kThreads * bwd_consumer_regs(1) <= 32 * 1024 &&
                  kThreads * bwd_producer_regs(2) + 2 * kThreads * bwd_consumer_regs(2) <=
                      64 * 1024,
              "the roles' registers fit the CTA's share of the SM's 64K");
static_assert(kThreads * bwd_producer_regs(2, false) + 2 * kThreads * bwd_consumer_regs(2, false) <=
                  64 * 1024,
              "the dk / dv walk's roles fit too");
// k, v (bwd_key_rows), stages x (q, do, stats, delta); with dq: + the stage barriers (64 bytes),
// two dS^T buffers (keys x 64 queries) and the float32 dq rows; with `tma` (backward.cu kTma):
// + the TMA barriers (16 bytes where the ring's would be) and the alignment slack of the tiles
// and, with dq, of its boxes (1024 bytes each). Without the d-rpb table (launch adds it).
constexpr int bwd_smem(int dt, int elem, bool wg, int dq_wgs, bool tma = false, bool dq = true) {
  const bool with_dq = dq_wgs && dq;
  return 2 * bwd_key_rows(dq_wgs) * (wg ? dt : dt + 8) * elem +
         2 * bwd_stages(dq_wgs) * (wg ? kRows * dt * elem : tile_bytes(dt, elem)) +
         3 * bwd_stages(dq_wgs) * kRows * 4 + (dq_wgs ? 64 + 128 : 0) +
         (with_dq ? 2 * bwd_key_rows(dq_wgs) * kRows * elem + kRows * (dt + 8) * 4 : 0) +
         (tma ? 16 + 1024 + (with_dq ? 1024 : 0) : 0);
}
// The TMA backward (Hopper, 1-D problems, head-dim tile 64: backward_tma.cu): 128-key CTAs (two
// computing warpgroups of 64 keys) walking 128-query steps, a producer warpgroup (one thread
// copies by the TMA, its threads stage statistics and delta), a ring of 2 stages: with k, v,
// the dq boxes (2 x 2 x 64 x 32 floats) and two dS^T buffers (128 x 128) it takes ~196 KB. The
// computing warpgroups hold S^T and dP^T (64 floats each) with dk, dv (32 each).
constexpr int kTmaBwdRows = 128;  // keys of a CTA and queries of a step
constexpr int kTmaBwdStages = 2;
constexpr int tma_bwd_producer_regs() { return 40; }
constexpr int tma_bwd_consumer_regs() { return 232; }
static_assert(kThreads * tma_bwd_producer_regs() + 2 * kThreads * tma_bwd_consumer_regs() <=
                  64 * 1024,
              "the roles' registers fit the SM's 64K");
// k, v, the stages' q and do (16-bit, head-dim tile 64), the dq boxes, the dS^T buffers, the
// stages' statistics and delta, the barriers, 1024 bytes of slack to align the swizzle atoms.
constexpr int tma_bwd_smem() {
  return (2 + 2 * kTmaBwdStages) * kTmaBwdRows * 64 * 2 + 4 * kRows * 32 * 4 +
         2 * kTmaBwdRows * kTmaBwdRows * 2 + kTmaBwdStages * kTmaBwdRows * 12 +
         8 * (2 * kTmaBwdStages + 1) + 1024;
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
