// FNA forward (fna.cuh): o = softmax(scale * q.k + rpb) v over each query's neighborhood and the
// additional keys, lse = log(sum(exp(logits))). One CTA per (query tile, head, batch). This file:
// the synchronous kernel (mma.sync, and wgmma with one warpgroup) and the forward's launch; the
// warp-specialized Hopper kernel is in forward_ws.cu, their shared steps in forward_step.cuh.
#include "forward_step.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

// MT m16 tiles per warp: the query tile holds 64 * MT tokens. kWg: the products run on Hopper's
// warpgroup MMA (sm_90a; q and the key tiles in core-matrix layout, natten/wgmma.cuh; the four
// warps form one warpgroup that owns MT m64 row blocks), otherwise on mma.sync (ldmatrix operands
// from padded tiles; warp w owns rows 16 MT w ..). Masking and softmax are the same code: both
// leave a warp's scores in the mma.m16n8k16 C layout.
template <typename T, int DT, int MT, bool kWg>
__global__ void __launch_bounds__(kThreads, fwd_min_ctas(DT, MT, kWg))
    fna_fwd_kernel(const FnaArgs a, const FnaPtrs p) {
  constexpr int kLd = kWg ? DT : DT + 8;  // elements per tile row (core matrices: no padding)
  constexpr int kQRows = kRows * MT;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + kQRows * kLd;      // [2][kRows][kLd]
  T* Vs = Ks + 2 * kRows * kLd;   // [2][kRows][kLd]
  int* Win = reinterpret_cast<int*>(Vs + 2 * kRows * kLd);  // [kQRows][3 axes][start, length]
  float* SelfLogit = reinterpret_cast<float*>(Win + kQRows * 6);  // [kQRows], with rpb
  T* Ones = reinterpret_cast<T*>(SelfLogit + kQRows);  // wgmma: kOnesBytes (RowSums)

  Box qb;
  if (!tile_box(a, a.qlog, a.q_tpg, a.q_units, blockIdx.x, qb)) return;  // whole CTA
  const int h = blockIdx.y, b = a.batch0 + static_cast<int>(blockIdx.z), kvh = h / a.group;
  const int warp = threadIdx.x >> 5;
  const T* q = static_cast<const T*>(p.q);
  const int64_t row0 = static_cast<int64_t>(b) * a.tokens;

  {
    const TileRows<DT, kQRows, kWg> qrows(a, a.qlog);
    const int lim[3] = {qb.hi[0] - qb.lo[0], qb.hi[1] - qb.lo[1], qb.hi[2] - qb.lo[2]};
    qrows.stage(Qs, q, row0, token_of(a, qb.grp, qb.lo), lim, a.heads, h, a.dim);
    cp_async_commit();
  }

  const KeyWalk walk = key_walk(a, qb);
  KeyStager<T, DT, kRows, kWg> keys(a);
  auto stage_keys = [&](int j, int buf) {
    keys(a, p, walk, qb, b, row0, kvh, j, Ks + buf * kRows * kLd, Vs + buf * kRows * kLd);
  };

  fill_windows(a, qb, kQRows, Win);
  if constexpr (kWg) {
    fill_ones(Ones, threadIdx.x, kThreads);
    fence_proxy_async();  // -> the wgmma reads (after the walk's first barrier)
  }
  auto frag_row = [](int mt, int i) { return tile_row<MT, kWg>(mt, i); };
  const float* rpb = a.R ? p.rpb + static_cast<int64_t>(h) * a.R : nullptr;
  if (rpb != nullptr)
    self_logits<T>(a, p, qb, row0, h, kvh, kQRows, threadIdx.x, kThreads, SelfLogit);

  float acc[MT][DT / 8][4];
  float m[MT][2];
  RowSums<MT> l;  // the rows' sums of the weights, formed by the products
  start_rows<DT, MT>(acc, l, m);
  // mma.sync: query fragments stay in registers for the whole walk when they fit (DT <= 64).
  constexpr bool kQInRegs = !kWg && DT <= 64;
  unsigned qf[kQInRegs ? MT : 1][kQInRegs ? DT / 16 : 1][4];

  // (Double-buffered: a ring of four stages at head-dim tile 32, copies three steps ahead, made
  // nat-2d-small's forward 4% slower; BENCHMARKS.md, session 21.)
  TileCounter current;  // the spatial key tile being computed
  current.reset();
  stage_keys(0, 0);
  for (int j = 0; j < walk.total; ++j) {
    key_step_ready<kWg>(j, walk.total, stage_keys);
    if (j == 0 && rpb != nullptr) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i) m[mt][i] = SelfLogit[frag_row(mt, i)];
    }
    if constexpr (kQInRegs) {
      if (j == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int kk = 0; kk < DT / 16; ++kk)
            a_frag<T, DT>(qf[mt][kk], Qs, warp * 16 * MT + mt * 16, kk);
      }
    }
    const T* ks = Ks + (j & 1) * kRows * kLd;
    const T* vs = Vs + (j & 1) * kRows * kLd;

    float s[MT][8][4];
    if constexpr (kQInRegs) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nb][e] = 0.f;
      scores_regs<T, DT, MT>(s, qf, ks);
    } else {
      tile_scores<T, DT, MT, kWg>(s, Qs, ks);
    }

    float alpha[MT][2];
    softmax_step<MT, kWg, false>(a, walk, current, j, qb, rpb, Win, s, m, alpha);
    if (warp_rescales(alpha)) {
      rescale<DT, MT>(acc, alpha);
      rescale<8, MT>(l, alpha);
    }
    tile_apply_sums<T, DT, MT, kWg>(acc, l, s, vs, Ones);
    __syncthreads();  // the next iteration overwrites this buffer
  }

  store_outputs<T, DT, MT, kWg>(a, p, qb, a.qlog, row0, h, m, l, acc);
}

template <typename T, int DT, bool kWg>
ffi::Error launch(cudaStream_t stream, const FnaArgs& a, const FnaPtrs& p, int64_t batch) {
  const dim3 grid(static_cast<unsigned>(a.q_tiles), a.heads, static_cast<unsigned>(batch));
  constexpr int kMT = fwd_m_tiles(DT, kWg);
  constexpr int kSmem = fwd_smem(DT, sizeof(T), kMT, kWg);
  return launch_kernel<fna_fwd_kernel<T, DT, kMT, kWg>>("fna forward", kSmem, kSmem, grid, stream,
                                                       a, p);
}

}  // namespace

ffi::Error launch_forward(cudaStream_t stream, ffi::DataType t, int dt, bool wgmma,
                          const FnaArgs& a, const FnaPtrs& p, int64_t batch) {
  // Hopper at head-dim tile 128: the warp-specialized kernel (tiling.h fwd_warp_specialized).
  if (wgmma && fwd_warp_specialized(dt))
    return launch_forward_ws(stream, t, dt, false, a, p, batch, batch);
  return dispatch_tile(t, dt, [&](auto tag, auto dtc) {
    using T = typename decltype(tag)::type;
    constexpr int DT = decltype(dtc)::value;
    if constexpr (fwd_warp_specialized(DT)) {
      return launch<T, DT, false>(stream, a, p, batch);  // (wgmma went to forward_ws.cu)
    } else {
      return wgmma ? launch<T, DT, true>(stream, a, p, batch)
                   : launch<T, DT, false>(stream, a, p, batch);
    }
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
