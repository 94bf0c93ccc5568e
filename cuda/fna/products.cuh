// The FNA kernels' tile products on both MMA families (mma.sync fragments from padded tiles; wgmma on
// core-matrix tiles) and their C-fragment layout: columns and the stores of accumulator rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "args.cuh"
#include "natten/mma.cuh"
#include "natten/wgmma.cuh"

namespace natten {
namespace gpu {
namespace fna {

// A fragment (16 rows from row0, k16 step kk) of a [row][DT + 8] tile.
template <typename T, int DT>
__device__ __forceinline__ void a_frag(unsigned (&f)[4], const T* s, int row0, int kk) {
  const int lane = threadIdx.x & 31;
  ldsm_x4(f, s + (row0 + (lane & 15)) * (DT + 8) + kk * 16 + (lane >> 4) * 8);
}

// B fragments of two n8 blocks (columns n0..n0+15) at k16 step kk, from a [n][k] tile (rows are
// the columns of the product: keys for q.k, queries for k.q).
template <typename T, int DT>
__device__ __forceinline__ void b_frag_nk(unsigned (&f)[4], const T* s, int n0, int kk) {
  const int lane = threadIdx.x & 31;
  ldsm_x4(f, s + (n0 + (lane & 7) + (lane >> 4) * 8) * (DT + 8) + kk * 16 + ((lane >> 3) & 1) * 8);
}

// B fragments of two n8 blocks (columns n0..n0+15 of the tile's row) at k16 step kk (rows
// kk*16..), from a [k][n] tile: p.v with the keys as k, or dS^T q with the queries as k.
template <typename T, int DT>
__device__ __forceinline__ void b_frag_kn(unsigned (&f)[4], const T* s, int n0, int kk) {
  const int lane = threadIdx.x & 31;
  ldsm_x4_trans(f, s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * (DT + 8) + n0 +
                        (lane >> 4) * 8);
}

// A warp owns MT m16 tiles (rows row0 + 16 mt): every B fragment loaded from shared memory feeds
// MT products, which is what makes MT = 2 cheaper in shared-memory bandwidth per flop.
//
// One k16 step kk of acc[mt][16 x 64] += A B^T: A fragments af[mt] of that step, the 64 B rows of
// `Bs` (each B fragment read once, used MT times).
template <typename T, int DT, int MT>
__device__ __forceinline__ void scores_step(float (&acc)[MT][8][4], const unsigned (&af)[MT][4],
                                            const T* Bs, int kk) {
#pragma unroll
  for (int np = 0; np < 4; ++np) {
    unsigned bf[4];
    b_frag_nk<T, DT>(bf, Bs, np * 16, kk);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma16816<T>(acc[mt][2 * np], af[mt], bf[0], bf[1]);
      mma16816<T>(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
    }
  }
}

// acc[mt][16 x 64] += A[16 x DT] B^T, A rows of `As` from row0 + 16 mt, B rows of `Bs`.
template <typename T, int DT, int MT>
__device__ __forceinline__ void scores(float (&acc)[MT][8][4], const T* As, int row0, const T* Bs) {
#pragma unroll
  for (int kk = 0; kk < DT / 16; ++kk) {
    unsigned af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) a_frag<T, DT>(af[mt], As, row0 + 16 * mt, kk);
    scores_step<T, DT, MT>(acc, af, Bs, kk);
  }
}

// The same with the A fragments already in registers (the forward keeps its queries there).
template <typename T, int DT, int MT>
__device__ __forceinline__ void scores_regs(float (&acc)[MT][8][4],
                                            const unsigned (&af)[MT][DT / 16][4], const T* Bs) {
#pragma unroll
  for (int kk = 0; kk < DT / 16; ++kk) {
    unsigned step[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) step[mt][e] = af[mt][kk][e];
    scores_step<T, DT, MT>(acc, step, Bs, kk);
  }
}

// The A fragment of k16 step kk of a [16 x 8 NB] product whose left operand is a C-fragment score
// tile (natten/mma.cuh: two adjacent n8 blocks packed to 16 bits; wgmma's register A is the same).
template <typename T, int NB>
__device__ __forceinline__ void pack_a(unsigned (&f)[4], const float (&x)[NB][4], int kk) {
  f[0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);
  f[1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);
  f[2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
  f[3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

// acc[mt][16 x DT] += P[mt][16 x 64] B, P in C-fragment registers, B a [64 k][DT n] tile. With
// kSums, also sums[mt] += P[mt] 1 (RowSums).
template <typename T, int DT, int MT, bool kSums = false>
__device__ __forceinline__ void apply(float (&acc)[MT][DT / 8][4], const float (&p)[MT][8][4],
                                      const T* Bs, float (*sums)[4] = nullptr) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    unsigned pa[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) pack_a<T>(pa[mt], p[mt], kk);
    if constexpr (kSums) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma16816<T>(sums[mt], pa[mt], ones2<T>(), ones2<T>());
    }
#pragma unroll
    for (int np = 0; np < DT / 16; ++np) {
      unsigned bf[4];
      b_frag_kn<T, DT>(bf, Bs, np * 16, kk);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(acc[mt][2 * np], pa[mt], bf[0], bf[1]);
        mma16816<T>(acc[mt][2 * np + 1], pa[mt], bf[2], bf[3]);
      }
    }
  }
}

// ---- row sums of P on the tensor cores ----------------------------------------------------------
// The forward multiplies its weights P rounded to T into o (o += P v), so the denominator l must
// sum those rounded weights: with the unrounded ones, o's weights sum to 1 +- ~eps(T), and the
// backward's delta = rowsum(do * o) carries that error into dP - delta, a small difference where
// every key's dP is nearly the same (bfloat16 gradients measured 2-6x over their bound). The
// products form l: one more n8 block of o += P v whose B operand is all ones, accumulated like
// o's blocks (same roundings, same rescales), so the softmax neither sums nor rounds twice.
// RowSums: that block's C fragment; every column holds its row's sum (elements 0 / 1: the
// thread's first row, 2 / 3: its second).
template <int MT>
using RowSums = float[MT][1][4];
template <int MT>
__device__ __forceinline__ void zero_sums(RowSums<MT>& sums) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) sums[mt][0][e] = 0.f;
}
// Row i of the thread's m16 tile mt.
template <int MT>
__device__ __forceinline__ float row_sum(const RowSums<MT>& sums, int mt, int i) {
  return sums[mt][0][2 * i];
}
// wgmma reads its B operand from shared memory: a [16 k][8 n] tile of ones (two core matrices,
// 256 bytes, 16-byte aligned), written once by the kernel's threads before its first product
// (then a fence.proxy.async by the writers and a barrier).
constexpr int kOnesBytes = 256;
template <typename T>
__device__ __forceinline__ void fill_ones(T* ones, int first, int step) {
  for (int e = first; e < kOnesBytes / 4; e += step)
    reinterpret_cast<unsigned*>(ones)[e] = ones2<T>();
}

// Keeps the compiler from moving reads of registers written by an asynchronous MMA above the wait
// that completes it (an empty asm that "rewrites" each one after the wait).
template <int N>
__device__ __forceinline__ void reg_fence_n(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <typename A>
__device__ __forceinline__ void reg_fence(A& regs) {
  reg_fence_n<sizeof(A) / sizeof(float)>(reinterpret_cast<float*>(&regs));
}

// ---- Hopper (wgmma) products: the same three shapes on core-matrix tiles (natten/wgmma.cuh) -----
// The warpgroup owns MT m64 row blocks (rows 64 mt + 16 warp + ..., wg_row); the C fragments a
// warp receives are laid out as with mma.sync, so masking and softmax code is shared.
__device__ __forceinline__ int wg_row(int mt, int i) {
  return mt * 64 + (threadIdx.x >> 5) * 16 + ((threadIdx.x & 31) >> 2) + 8 * i;
}

// acc = A[64][DT] B[64][DT]^T with both tiles as the TMA writes them: 64-column blocks with
// 128-byte swizzle, given as descriptors of their first block (a, b; smem_desc_sw128 K-major,
// built once by the caller) and the bytes between blocks; k16 step kk reads 32 bytes into block
// kk / 4. Issues the MMAs only: the caller fences before, commits and waits after.
template <typename T, int DT>
__device__ __forceinline__ void wg_issue_scores_sw128(float (&acc)[8][4], uint64_t a,
                                                      int a_block_bytes, uint64_t b,
                                                      int b_block_bytes) {
#pragma unroll
  for (int kk = 0; kk < DT / 16; ++kk)
    wgmma_ss64<T>(&acc[0][0], desc_add(a, (kk / 4) * a_block_bytes + (kk % 4) * 32),
                  desc_add(b, (kk / 4) * b_block_bytes + (kk % 4) * 32), kk);
}

// acc[mt] = A[64 mt .. 64 mt + 63][DT] B[64][DT]^T, both core-matrix tiles (K-major operands:
// k16 step kk starts 128 elements in). Waits for the result.
template <typename T, int DT, int MT>
__device__ __forceinline__ void wg_scores(float (&acc)[MT][8][4], const T* As, const T* Bs) {
  wgmma_fence();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kk = 0; kk < DT / 16; ++kk)
      wgmma_ss64<T>(&acc[mt][0][0], smem_desc(As + mt * 64 * DT + kk * 128, 128, DT * 16),
                    smem_desc(Bs + kk * 128, 128, DT * 16), kk);
  wgmma_commit();
  wgmma_wait<0>();
  reg_fence(acc);
}

// acc[mt] += P[mt][64 x 64] B[64][DT], P in C-fragment registers (the A operand after packing),
// B a core-matrix tile read MN-major (k16 step kk: rows 16 kk.., 16 DT elements in). With kSums,
// also sums[mt] += P[mt] 1 (`ones`: fill_ones). Waits.
template <typename T, int DT, int MT, bool kSums = false>
__device__ __forceinline__ void wg_apply(float (&acc)[MT][DT / 8][4], const float (&p)[MT][8][4],
                                         const T* Bs, float (*sums)[4] = nullptr,
                                         const T* ones = nullptr) {
  // Every A fragment is packed before the first MMA: packing between them makes ptxas inject a
  // warpgroup.arrive before each (C7519).
  unsigned pa[MT][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) pack_a<T>(pa[mt][kk], p[mt], kk);
  wgmma_fence();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      wgmma_rs<T, DT, 1>(&acc[mt][0][0], pa[mt][kk], smem_desc(Bs + kk * 16 * DT, DT * 16, 128),
                         1);
      if constexpr (kSums) wgmma_rs<T, 8, 0>(sums[mt], pa[mt][kk], smem_desc(ones, 128, 128), 1);
    }
  wgmma_commit();
  wgmma_wait<0>();
  reg_fence(acc);
  if constexpr (kSums) reg_fence_n<4 * MT>(&sums[0][0]);
}

// The products of the kernels templated on kWg: wgmma on core-matrix tiles, or mma.sync on padded
// tiles (warp rows 16 MT warp ..). `As` holds the CTA's 64 MT A rows.
template <typename T, int DT, int MT, bool kWg>
__device__ __forceinline__ void tile_scores(float (&acc)[MT][8][4], const T* As, const T* Bs) {
  if constexpr (kWg) {
    wg_scores<T, DT, MT>(acc, As, Bs);
  } else {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nb][e] = 0.f;
    scores<T, DT, MT>(acc, As, (threadIdx.x >> 5) * 16 * MT, Bs);
  }
}
template <typename T, int DT, int MT, bool kWg>
__device__ __forceinline__ void tile_apply(float (&acc)[MT][DT / 8][4], const float (&p)[MT][8][4],
                                           const T* Bs) {
  if constexpr (kWg)
    wg_apply<T, DT, MT>(acc, p, Bs);
  else
    apply<T, DT, MT>(acc, p, Bs);
}
// The forward's o += P v, with l += P 1 (RowSums; `ones` for wgmma).
template <typename T, int DT, int MT, bool kWg>
__device__ __forceinline__ void tile_apply_sums(float (&acc)[MT][DT / 8][4], RowSums<MT>& sums,
                                                const float (&p)[MT][8][4], const T* Bs,
                                                const T* ones) {
  if constexpr (kWg)
    wg_apply<T, DT, MT, true>(acc, p, Bs, &sums[0][0], ones);
  else
    apply<T, DT, MT, true>(acc, p, Bs, &sums[0][0]);
}
// Row of element (mt, i) of the thread's C fragments.
template <int MT, bool kWg>
__device__ __forceinline__ int tile_row(int mt, int i) {
  return kWg ? wg_row(mt, i)
             : (threadIdx.x >> 5) * 16 * MT + mt * 16 + ((threadIdx.x & 31) >> 2) + 8 * i;
}

// One m16 tile per warp (the backward kernels).
template <typename T, int DT>
__device__ __forceinline__ void scores(float (&acc)[8][4], const T* As, int row0, const T* Bs) {
  scores<T, DT, 1>(reinterpret_cast<float (&)[1][8][4]>(acc), As, row0, Bs);
}
template <typename T, int DT>
__device__ __forceinline__ void apply(float (&acc)[DT / 8][4], const float (&p)[8][4],
                                      const T* Bs) {
  apply<T, DT, 1>(reinterpret_cast<float (&)[1][DT / 8][4]>(acc),
                  reinterpret_cast<const float (&)[1][8][4]>(p), Bs);
}

// Column of element e of n8 block nb in a C fragment.
__device__ __forceinline__ int frag_col(int nb, int e) {
  return nb * 8 + 2 * (threadIdx.x & 3) + (e & 1);
}

// Stores a [16 x DT] C-fragment accumulator (times `mul`) to the warp's rows, as T (float: the
// forward's o32); row_ptr(which) gives the global row of the thread's first (0) or second (1) row,
// or nullptr.
template <typename T, int DT, typename RowPtr>
__device__ __forceinline__ void store_rows(const float (&acc)[DT / 8][4], float mul0, float mul1,
                                           RowPtr&& row_ptr, int cols) {
  T* rows[2] = {row_ptr(0), row_ptr(1)};
#pragma unroll
  for (int nb = 0; nb < DT / 8; ++nb) {
    const int c = frag_col(nb, 0);
    if (c >= cols) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (rows[half] == nullptr) continue;
      const float m = half ? mul1 : mul0;
      if constexpr (std::is_same_v<T, float>) {
        *reinterpret_cast<float2*>(rows[half] + c) =
            make_float2(acc[nb][2 * half] * m, acc[nb][2 * half + 1] * m);
      } else {
        const unsigned u = pack2<T>(acc[nb][2 * half] * m, acc[nb][2 * half + 1] * m);
        *reinterpret_cast<unsigned*>(rows[half] + c) = u;
      }
    }
  }
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
