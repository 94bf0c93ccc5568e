// FNA backward on Hopper for 1-D problems, fed by the tensor memory accelerator (fna.cuh, "TMA
// backward"; launch.h launch_backward_tma): the key-side walk of backward.cu with dq in it, in
// the TMA forward's shape. One CTA per (128-key tile, kv head, batch element) walks the query
// tiles of its inverse window, 128 queries a step, for every query head of its kv head.
//   producer (warpgroup 2): one thread copies the key tile's k and v once, then each step's q
//     and do (one 128 x 64 box each, 128-byte swizzle); its 128 threads stage the step's rows'
//     softmax statistics and delta with cp.async (8 and 4 bytes a row: too narrow for a box).
//   computing warpgroups 0, 1: warpgroup w owns keys 64 w .. 64 w + 63 and accumulates their
//     dk, dv in registers. Per step: S^T = k q^T and dP^T = v do^T (m64n128, two commit groups),
//     P^T from the forward's statistics while dP^T is in flight, dS^T = P^T (dP^T - delta),
//     dv += P^T do and dk += dS^T q with the weights as register A operands; dS^T goes to shared
//     memory, and once both warpgroups' rows are in, warpgroup w forms dq = dS k for queries
//     64 w .. 64 w + 63 of the step over all 128 keys, stages it as two swizzled [64 x 32] float
//     boxes and adds them to the float32 workspace with two TMA reduce-adds (any order: the
//     non-deterministic mode; launch_backward_dq_convert scales and rounds afterwards).
// Only steps that straddle an inverse-window edge test their elements. Serves what tiling.h
// backward_on_tma accepts: head-dim tile 64, no rpb, no additional keys, the axis divisible by
// its dilation (the maps' bounds are then every group's), the kernel's own tiles.
#include "fna.cuh"
#include "launch.h"
#include "pipeline.cuh"
#include "tensor_maps.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

constexpr int kDT = 64;                 // head-dim tile: one 128-byte swizzle row per token
constexpr int kQ = kTmaBwdRows;         // queries a step
constexpr int kKeys = kTmaBwdRows;      // keys a CTA, 64 per computing warpgroup
constexpr int kStages = kTmaBwdStages;  // ring of query-side stages

// Shared memory, in order: k, v [128 keys][64] and each stage's q, do [128 rows][64] (TMA boxes,
// 128-byte swizzle, 1024-byte aligned), the dq boxes [2 warpgroups][2 column halves][64 rows][32]
// floats (swizzled as the dq map says), dS^T [2 buffers][128 keys x 128 queries] (core matrices,
// natten/wgmma.cuh), the stages' statistics (float2) and delta per row, the barriers.
struct Layout {
  static constexpr int kTile = kQ * kDT;  // elements of a k, v, q or do tile
  static constexpr int kDqBox = kRows * 32;  // floats of one dq box
  static constexpr int kSs = kKeys * kQ;     // elements of one dS^T buffer
};

template <typename T>
__global__ void __launch_bounds__(3 * kThreads, 1)
    fna_bwd_tma_kernel(const FnaArgs a, const FnaPtrs p, const __grid_constant__ BwdTmaMaps maps) {
  using L = Layout;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + L::kTile;
  T* Qs = Vs + L::kTile;             // [kStages][tile]
  T* Os = Qs + kStages * L::kTile;   // do, [kStages][tile]
  float* Dq = reinterpret_cast<float*>(Os + kStages * L::kTile);  // [2][2][64][32]
  T* Ss = reinterpret_cast<T*>(Dq + 4 * L::kDqBox);               // [2][kKeys x kQ]
  float2* Sts = reinterpret_cast<float2*>(Ss + 2 * L::kSs);        // [kStages][kQ]
  float* Ds = reinterpret_cast<float*>(Sts + kStages * kQ);         // [kStages][kQ]
  uint64_t* bars = reinterpret_cast<uint64_t*>(Ds + kStages * kQ);  // full, empty, keys

  Box kb;
  if (!tile_box(a, a.kvlog, a.kv_tpg, a.kv_units, blockIdx.x, kb)) return;  // whole CTA
  // The axis: its parameters, the tile's dilation group and keys [k_lo, k_hi) (local indices).
  const AxisSpan span = axis_span(a, kb);
  const AxisParams& axp = span.p;
  const int g = span.g, lg = span.lg, k_lo = span.lo, k_hi = span.hi;
  const int kvh = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z);
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;
  // The walk: the queries whose windows hold any key of the tile, [q_lo, q_end), in steps of
  // kQ (the last may reach past q_end: its extra columns are outside every key's inverse window,
  // or past the group, where the maps zero-fill and skip), for each query head of the kv head.
  const QueryRange first = inverse_window(k_lo, lg, axp.kernel, axp.stride, axp.causal);
  const QueryRange last = inverse_window(k_hi - 1, lg, axp.kernel, axp.stride, axp.causal);
  const int q_lo = first.first;
  const int tiles = (last.last + 1 - q_lo + kQ - 1) / kQ;
  const int total = tiles * a.group;
  // Steps inside every key's inverse window, [full_lo, full_hi): no element is tested.
  const int full_lo = last.first, full_hi = first.last + 1;

  const StageRing<kStages> ring{bars, bars + kStages};
  uint64_t* const keys_full = bars + 2 * kStages;
  ring.setup(kThreads, 2 * kThreads, keys_full, 1, /*tma=*/true);

  if (threadIdx.x >= 2 * kThreads) {  // the producer
    regs_shrink<tma_bwd_producer_regs()>();
    const int tid = threadIdx.x - 2 * kThreads;
    if (tid == 0) {
      tma_prefetch_map(&maps.q);
      tma_prefetch_map(&maps.d_o);
      mbar_expect_tx(keys_full, 2 * L::kTile * static_cast<int>(sizeof(T)));
      tma_load_5d(Ks, &maps.k, keys_full, 0, kvh, g, k_lo, b);
      tma_load_5d(Vs, &maps.v, keys_full, 0, kvh, g, k_lo, b);
    }
    Handoff handoff;
    int h = kvh * a.group, j = 0;  // the step's query head and tile
    for (int it = 0; it < total; ++it) {
      ring.acquire(it);
      const int st = ring.stage(it);
      const int o = q_lo + j * kQ;
      if (tid == 0) {  // (no arrival: the thread arrives with the others, through handoff)
        mbar_expect_tx_only(ring.full + st, 2 * L::kTile * static_cast<int>(sizeof(T)));
        tma_load_5d(Qs + st * L::kTile, &maps.q, ring.full + st, 0, h, g, o, b);
        tma_load_5d(Os + st * L::kTile, &maps.d_o, ring.full + st, 0, h, g, o, b);
      }
      const int l = o + tid;  // the thread's row: local query index
      const bool ok = l < lg;
      const int64_t i = ok ? (row0 + g + static_cast<int64_t>(l) * axp.dilation) * a.heads + h : 0;
      cp_async8(Sts + st * kQ + tid, p.stats + i, ok);
      cp_async4(Ds + st * kQ + tid, p.delta + i, ok);
      cp_async_commit();
      handoff.then(ring.full + st);
      if (++j == tiles) j = 0, ++h;
    }
    handoff.flush();
    return;
  }
  regs_grow<tma_bwd_consumer_regs()>();

  // The computing warpgroups. (wg through a shuffle: warp-uniform, so the descriptor math stays
  // in uniform registers.) Thread rows: keys 64 wg + 16 (warp % 4) + lane / 4 (+ 8).
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kThreads, 0);
  const int tid = threadIdx.x % kThreads;
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  int kl[2], qf[2], qn[2];  // the rows' local key index and inverse window [qf, qf + qn)
  bool key_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    kl[i] = k_lo + wg * kRows + warp * 16 + (lane >> 2) + 8 * i;
    key_ok[i] = kl[i] < k_hi;
    const QueryRange r =
        inverse_window(imin(kl[i], lg - 1), lg, axp.kernel, axp.stride, axp.causal);
    qf[i] = r.first;
    qn[i] = key_ok[i] ? r.last + 1 - r.first : 0;
  }

  float dk[kDT / 8][4], dv[kDT / 8][4];
#pragma unroll
  for (int nb = 0; nb < kDT / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nb][e] = dv[nb][e] = 0.f;

  const T* ks_wg = Ks + wg * kRows * kDT;  // the warpgroup's 64 keys (8 swizzle atoms in)
  const T* vs_wg = Vs + wg * kRows * kDT;
  // The operands' descriptors, built once from their tiles' addresses and stepped with desc_add
  // (building one from an address costs ~10 uniform instructions, which each wgmma then waits
  // for): K-major (k, v as A; q, do as B of the scores): k16 step kk is 32 bytes into the
  // 128-byte rows; MN-major (q, do as B of dk, dv; k as B of dq): k16 step kk is 16 rows
  // (2048 bytes) further; the stages kTile elements apart; dS^T's buffers kSs apart.
  const uint64_t k_wg = smem_desc_sw128(ks_wg, 16, 1024), v_wg = smem_desc_sw128(vs_wg, 16, 1024);
  const uint64_t q_k = smem_desc_sw128(Qs, 16, 1024), o_k = smem_desc_sw128(Os, 16, 1024);
  const uint64_t q_mn = smem_desc_sw128(Qs, kQ * kDT * 2, 1024);
  const uint64_t o_mn = smem_desc_sw128(Os, kQ * kDT * 2, 1024);
  const uint64_t k_mn = smem_desc_sw128(Ks, kQ * kDT * 2, 1024);
  const uint64_t ss_mn = smem_desc(Ss + wg * kRows * 8, kQ * 16, 128);
  constexpr int kTileBytes = L::kTile * 2;
  float* dq_box = Dq + wg * 2 * L::kDqBox;  // the warpgroup's two dq boxes

  mbar_wait(keys_full, 0);
  int h = kvh * a.group, j = 0;
  for (int it = 0; it < total; ++it) {
    const int st = ring.stage(it);
    const int o = q_lo + j * kQ;  // the step's first query (local index)
    const int stage = st * kTileBytes;  // the stage's q, do: bytes from stage 0's
    const float2* sts = Sts + st * kQ;
    const float* ds = Ds + st * kQ;
    ring.wait(it);

    // S^T = k q^T, dP^T = v do^T: [64 keys x 128 queries] each, two commit groups.
    float s[16][4], dp[16][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDT / 16; ++kk)
      wgmma_ss<T, 128, 0, 0>(&s[0][0], desc_add(k_wg, 32 * kk),
                             desc_add(q_k, stage + 32 * kk), kk);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < kDT / 16; ++kk)
      wgmma_ss<T, 128, 0, 0>(&dp[0][0], desc_add(v_wg, 32 * kk),
                             desc_add(o_k, stage + 32 * kk), kk);
    wgmma_commit();
    // P^T from the forward's statistics, 0 outside the key's inverse window, while dP^T is in
    // flight. (Each branch ends on its own: ptxas would move the wait up to where they join.)
    wgmma_wait<1>();
    reg_fence(s);
    const float mul = a.scale_log2;
    if (o >= full_lo && o + kQ <= full_hi) {
#pragma unroll
      for (int nb = 0; nb < 16; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float2 w = sts[frag_col(nb, e)];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const float x = softmax_weight_exp2(s[nb][2 * i + e], mul, w);
            s[nb][2 * i + e] = key_ok[i] ? fast_exp2(x) : 0.f;
          }
        }
    } else {
#pragma unroll
      for (int nb = 0; nb < 16; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = frag_col(nb, e);
          const float2 w = sts[c];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const bool in = static_cast<unsigned>(o + c - qf[i]) < static_cast<unsigned>(qn[i]);
            const float x = softmax_weight_exp2(s[nb][2 * i + e], mul, w);
            s[nb][2 * i + e] = in ? fast_exp2(x) : 0.f;
          }
        }
    }
    wgmma_wait<0>();
    reg_fence(dp);
    // dS^T = P^T (dP^T - delta).
#pragma unroll
    for (int nb = 0; nb < 16; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float delta = ds[frag_col(nb, e)];
        dp[nb][e] = s[nb][e] * (dp[nb][e] - delta);
        dp[nb][2 + e] = s[nb][2 + e] * (dp[nb][2 + e] - delta);
      }

    // dv += P^T do, dk += dS^T q (the weights packed as A; do, q MN-major: k16 step kk is
    // queries 16 kk ..). Packed before the group's first MMA (C7519).
    unsigned pa[8][4], da[8][4];
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) pack_a<T>(pa[kk], s, kk);
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) pack_a<T>(da[kk], dp, kk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
      wgmma_rs<T, kDT, 1>(&dv[0][0], pa[kk], desc_add(o_mn, stage + 2048 * kk), 1);
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
      wgmma_rs<T, kDT, 1>(&dk[0][0], da[kk], desc_add(q_mn, stage + 2048 * kk), 1);
    wgmma_commit();

    // dS^T -> this step's buffer: element (key r, query c) at core_offset(r, c, kQ). The buffer
    // was last read by step it - 2's dq products, which both warpgroups completed before the
    // barrier of step it - 1.
    T* ss = Ss + (it & 1) * L::kSs;
    const int buffer = (it & 1) * L::kSs * 2;  // its bytes from the first buffer
    {
      const int r = wg * kRows + warp * 16 + (lane >> 2), c = 2 * (lane & 3);
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        *reinterpret_cast<unsigned*>(ss + core_offset(r, 16 * kk + c, kQ)) = da[kk][0];
        *reinterpret_cast<unsigned*>(ss + core_offset(r + 8, 16 * kk + c, kQ)) = da[kk][1];
        *reinterpret_cast<unsigned*>(ss + core_offset(r, 16 * kk + 8 + c, kQ)) = da[kk][2];
        *reinterpret_cast<unsigned*>(ss + core_offset(r + 8, 16 * kk + 8 + c, kQ)) = da[kk][3];
      }
    }
    fence_proxy_async();
    role_sync(1, 2 * kThreads);  // both warpgroups' dS^T rows are in
    // dq [queries 64 wg .., 64 dims] = dS k over the 128 keys: A = dS^T read MN-major (queries
    // contiguous; k16 step kk: keys 16 kk ..), B = k read MN-major.
    float dq[kDT / 8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk)
      wgmma_ss<T, kDT, 1, 1>(&dq[0][0], desc_add(ss_mn, buffer + kk * 16 * kQ * 2),
                             desc_add(k_mn, 2048 * kk), kk);
    wgmma_commit();
    wgmma_wait<1>();  // dv, dk: the stage is read
    reg_fence(dk);
    reg_fence(dv);
    ring.release(it);
    wgmma_wait<0>();
    reg_fence(dq);
    // dq -> the warpgroup's two boxes (once the last step's reduce-adds have read them) -> the
    // workspace. Box half: columns 32 half ..; 128-byte swizzle: 16-byte chunk c / 4 of row r
    // lands at chunk (c / 4) ^ (r % 8).
    if (tid == 0) bulk_wait_read();
    role_sync(2 + wg, kThreads);
    {
      const int r0 = warp * 16 + (lane >> 2);
#pragma unroll
      for (int nb = 0; nb < kDT / 8; ++nb)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = r0 + 8 * i, c = frag_col(nb, 0) & 31, half = nb >> 2;
          const int swizzled = (((c >> 2) ^ (r & 7)) << 2) | (c & 3);
          *reinterpret_cast<float2*>(dq_box + half * L::kDqBox + r * 32 + swizzled) =
              make_float2(dq[nb][2 * i], dq[nb][2 * i + 1]);
        }
    }
    fence_proxy_async();
    role_sync(2 + wg, kThreads);
    if (tid == 0) {
      tma_reduce_add_5d(&maps.dq, dq_box, 0, h, g, o + wg * kRows, b);
      tma_reduce_add_5d(&maps.dq, dq_box + L::kDqBox, 32, h, g, o + wg * kRows, b);
      bulk_commit();
    }
    if (++j == tiles) j = 0, ++h;
  }
  if (tid == 0) bulk_wait_all();

  // dk (scaled), dv of the thread's key rows.
  auto out_row = [&](int i, void* base, int dim) -> T* {
    if (!key_ok[i]) return nullptr;
    const int64_t token = g + static_cast<int64_t>(kl[i]) * axp.dilation;
    return static_cast<T*>(base) + ((row0 + token) * a.kv_heads + kvh) * dim;
  };
  store_rows<T, kDT>(dk, a.scale, a.scale, [&](int i) { return out_row(i, p.dk, a.dim); },
                     a.dim);
  store_rows<T, kDT>(dv, 1.f, 1.f, [&](int i) { return out_row(i, p.dv, a.dim_v); }, a.dim_v);
}

}  // namespace

ffi::Error launch_backward_tma(cudaStream_t stream, ffi::DataType t, const FnaArgs& a,
                               const FnaPtrs& p, int64_t batch, int64_t batch_total) {
  return dispatch_tile(t, kDT, [&](auto tag, auto) -> ffi::Error {
    using T = typename decltype(tag)::type;
    const AxisParams& x = a.ax[tile_axis(a)];
    constexpr CUtensorMapDataType type = tma_type<T>();
    BwdTmaMaps maps;
    NATTEN_TRY(encode_token_map(maps.q, p.q, type, batch_total, x.length, a.heads, a.dim,
                                x.dilation, kQ));
    NATTEN_TRY(encode_token_map(maps.d_o, p.d_o, type, batch_total, x.length, a.heads, a.dim_v,
                                x.dilation, kQ));
    NATTEN_TRY(encode_token_map(maps.k, p.k, type, batch_total, x.length, a.kv_heads, a.dim,
                                x.dilation, kKeys));
    NATTEN_TRY(encode_token_map(maps.v, p.v, type, batch_total, x.length, a.kv_heads, a.dim_v,
                                x.dilation, kKeys));
    NATTEN_TRY(encode_token_map(maps.dq, p.dq_acc, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, batch_total,
                                x.length, a.heads, a.dim, x.dilation, kRows));
    const dim3 grid(static_cast<unsigned>(a.kv_tiles), a.kv_heads, static_cast<unsigned>(batch));
    constexpr int kSmem = tma_bwd_smem();
    return launch_kernel<fna_bwd_tma_kernel<T>>("fna backward (TMA)", kSmem, kSmem, grid, stream,
                                                a, p, 3 * kThreads, maps);
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
