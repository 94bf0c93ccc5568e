// Tensor-core and async-copy primitives (inline PTX, sm_80+) shared by the GEMM-based and the fused
// kernels: ldmatrix, mma.sync m16n8k16 (f16 / bf16 operands, f32 accumulators), cp.async.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"): with gid = lane / 4 and tig = lane % 4, a thread
// holds C/D elements (gid, 2 tig + {0, 1}) and (gid + 8, 2 tig + {0, 1}) as d[0..1] and d[2..3];
// A registers a[0..3] hold rows gid / gid + 8 and columns 2 tig + {0, 1} / 8 + 2 tig + {0, 1} in
// the order (gid, lo), (gid + 8, lo), (gid, hi), (gid + 8, hi); B registers b0 / b1 hold column
// gid and rows 2 tig + {0, 1} / 8 + 2 tig + {0, 1}. So the C fragments of two adjacent n8 blocks,
// packed to 16 bits, are exactly the A fragment of one k16 step (flash-attention's P trick).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <type_traits>

namespace natten {
namespace gpu {

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}

// d += a * b for one m16n8k16 tile; T (__half or __nv_bfloat16) is the operand type.
template <typename T>
__device__ __forceinline__ void mma16816(float* d, const unsigned (&a)[4], unsigned b0,
                                         unsigned b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats -> one register of two T (the low half holds `lo`).
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  unsigned u;
  if constexpr (std::is_same<T, __half>::value) {
    __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&u, &h, 4);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &h, 4);
  }
  return u;
}

// Two ones of T in one register: the B operand that makes an MMA sum its A rows.
template <typename T>
__device__ __forceinline__ unsigned ones2() {
  return std::is_same<T, __half>::value ? 0x3C003C00u : 0x3F803F80u;
}

// 16-byte global -> shared copy that bypasses L1; zero-fills the destination when !valid (then
// nothing is read, but `src` must still be a mapped address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes)
               : "memory");
}

// 4-byte variant (through L1), for f32 scalars; zero-fills when !valid.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(bytes)
               : "memory");
}

// 8-byte variant (through L1), for float2 pairs (the fused backward's softmax statistics);
// zero-fills when !valid.
__device__ __forceinline__ void cp_async8(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? 8 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(d), "l"(src), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace gpu
}  // namespace natten
