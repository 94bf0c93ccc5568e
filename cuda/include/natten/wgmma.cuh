// Hopper warpgroup MMA (wgmma, sm_90a only) primitives for the fused kernels: a warpgroup (4
// consecutive warps) computes D[64 x N] (+)= A[64 x 16] B[16 x N] with A in registers and B in
// shared memory, described by a 64-bit matrix descriptor. Compiled only where
// __CUDA_ARCH_FEAT_SM90_ALL is defined; callers guard their use with NATTEN_HAS_WGMMA.
//
// Register layouts (PTX ISA, "wgmma .m64nNk16 register fragments"): warp w of the warpgroup holds
// rows 16 w .. 16 w + 15, and within a warp the A fragment (4 x b32) and the accumulator
// (d[4 nb + e] for n8 block nb) are laid out exactly as mma.m16n8k16's A and C (natten/mma.cuh):
// the softmax, masking and P-as-A code of the mma.sync kernels carries over unchanged.
//
// Shared-memory layout of B ("core matrix" tiles, no swizzle): an operand tile of R rows and C
// 16-bit columns is stored as 8 x 8 core matrices of 128 contiguous bytes (8 rows of 16 bytes);
// element (r, c) lives at ((r / 8) * (C / 8) + c / 8) * 64 + (r % 8) * 8 + c % 8. The same tile
// serves both majornesses:
//   K-major B (keys as N, head dim as K: S = q k^T): core matrices adjacent in K are 128 bytes
//     apart (leading offset), adjacent in N (next 8 keys) C * 16 bytes apart (stride offset);
//   MN-major B (keys as K, head dim as N: o += p v, "transposed B"): adjacent in N (next 8 head
//     dims) 128 bytes apart (stride offset), adjacent in K (next 8 keys) C * 16 bytes (leading).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NATTEN_HAS_WGMMA 1
#else
#define NATTEN_HAS_WGMMA 0
#endif

namespace natten {
namespace gpu {

// Element offset of (r, c) in a core-matrix tile with `cols` 16-bit columns.
__host__ __device__ __forceinline__ int core_offset(int r, int c, int cols) {
  return ((r >> 3) * (cols >> 3) + (c >> 3)) * 64 + (r & 7) * 8 + (c & 7);
}

// Matrix descriptor without swizzle: start address, leading and stride byte offsets (16-byte units).
__device__ __forceinline__ uint64_t smem_desc(const void* p, int lead_bytes, int stride_bytes) {
  const uint64_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return ((a & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lead_bytes >> 4) << 16) |
         (static_cast<uint64_t>(stride_bytes >> 4) << 32);
}

// Descriptor of a tile written by the TMA with 128-byte swizzle: rows of 128 bytes (64 16-bit
// elements), each 8-row group a 1024-byte swizzle atom (1024-byte aligned, so the base offset
// field is 0). K-major (rows are M or N, the 64 elements K): stride_bytes = 1024 between 8-row
// groups, the leading offset unused; a k16 step starts 32 bytes further (the hardware swizzles
// the address it forms). MN-major (rows are K, the 64 elements N): stride_bytes = 1024 between
// 8-row groups along K, lead_bytes between 64-element groups along N.
__device__ __forceinline__ uint64_t smem_desc_sw128(const void* p, int lead_bytes,
                                                    int stride_bytes) {
  return smem_desc(p, lead_bytes, stride_bytes) | (uint64_t{1} << 62);
}

// A descriptor moved by `bytes` (a multiple of 16) in shared memory: its start address is in
// 16-byte units in the low 14 bits, and shared addresses stay below 256 KB, so the move never
// carries out of that field; adding to the low 32-bit half keeps it one integer add (a kernel
// builds its base descriptors once and moves them per stage and k16 step).
__device__ __forceinline__ uint64_t desc_add(uint64_t d, int bytes) {
  const uint32_t lo = static_cast<uint32_t>(d) + static_cast<uint32_t>(bytes >> 4);
  return (d & 0xFFFFFFFF00000000ull) | lo;
}

// The primitives below exist on every target so that kernels templated on the MMA path compile
// everywhere; off sm_90a they trap (the host never launches a wgmma kernel there).
__device__ __forceinline__ void wgmma_fence() {
#if NATTEN_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if NATTEN_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if NATTEN_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Makes this thread's ordinary (and cp.async) shared-memory writes visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async() {
#if NATTEN_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Accumulator operand lists ("+f" of d[0..N/2)) and their asm placeholders.
#define NATTEN_F4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define NATTEN_F16(d, i) NATTEN_F4(d, i), NATTEN_F4(d, i + 4), NATTEN_F4(d, i + 8), NATTEN_F4(d, i + 12)
#define NATTEN_F8(d, i) NATTEN_F4(d, i), NATTEN_F4(d, i + 4)
#define NATTEN_D4 "{%0, %1, %2, %3}"
#define NATTEN_D8 "{%0, %1, %2, %3, %4, %5, %6, %7}"
#define NATTEN_D16                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define NATTEN_D32                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define NATTEN_D64                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, "  \
  "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, "  \
  "%55, %56, %57, %58, %59, %60, %61, %62, %63}"
// d (+)= a b for shape m64nNk16, f32 accumulators, operand type TY ("f16" / "bf16"), A in
// registers (A: its four placeholders), B by descriptor (placeholder DS), accumulate flag
// (placeholder SC; 0: d = a b), transpose-B immediate (placeholder TR).
#define NATTEN_WGMMA(N, TY, DREGS, A, DS, SC, TR)                                              \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" SC ", 0;\n"                                             \
  "wgmma.mma_async.sync.aligned.m64n" N "k16.f32." TY "." TY " " DREGS ", " A ", %" DS          \
  ", p, 1, 1, %" TR ";\n}\n"

// Both operands by descriptor (placeholders AD, BD), transpose immediates TA, TB (1: MN-major).
#define NATTEN_WGMMA_SS(N, TY, DREGS, AD, BD, SC, TA, TB)                                      \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" SC ", 0;\n"                                             \
  "wgmma.mma_async.sync.aligned.m64n" N "k16.f32." TY "." TY " " DREGS ", %" AD ", %" BD        \
  ", p, 1, 1, %" TA ", %" TB ";\n}\n"

// One asm statement per operand type: STMT(TY) for "f16" where T is __half, else "bf16".
#define NATTEN_BY_TYPE(STMT) \
  if constexpr (std::is_same<T, __half>::value) { STMT("f16"); } else { STMT("bf16"); }

// d[N / 2] (+)= a[64 x 16] b[16 x N] for one warpgroup; TRANS = 1: B is MN-major (see above).
template <typename T, int N, int TRANS>
__device__ __forceinline__ void wgmma_rs(float* d, const unsigned (&a)[4], uint64_t desc,
                                         int accumulate) {
#if NATTEN_HAS_WGMMA
  static_assert(N == 8 || N == 32 || N == 64 || N == 128, "wgmma_rs: N is 8, 32, 64 or 128");
#define NATTEN_RS_IN \
  "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS)
#define NATTEN_RS8(TY) \
  asm volatile(NATTEN_WGMMA("8", TY, NATTEN_D4, "{%4, %5, %6, %7}", "8", "9", "10") \
               : NATTEN_F4(d, 0) : NATTEN_RS_IN)
#define NATTEN_RS32(TY) \
  asm volatile(NATTEN_WGMMA("32", TY, NATTEN_D16, "{%16, %17, %18, %19}", "20", "21", "22") \
               : NATTEN_F16(d, 0) : NATTEN_RS_IN)
#define NATTEN_RS64(TY) \
  asm volatile(NATTEN_WGMMA("64", TY, NATTEN_D32, "{%32, %33, %34, %35}", "36", "37", "38") \
               : NATTEN_F16(d, 0), NATTEN_F16(d, 16) : NATTEN_RS_IN)
#define NATTEN_RS128(TY) \
  asm volatile(NATTEN_WGMMA("128", TY, NATTEN_D64, "{%64, %65, %66, %67}", "68", "69", "70") \
               : NATTEN_F16(d, 0), NATTEN_F16(d, 16), NATTEN_F16(d, 32), NATTEN_F16(d, 48) \
               : NATTEN_RS_IN)
  if constexpr (N == 8) {
    NATTEN_BY_TYPE(NATTEN_RS8)
  } else if constexpr (N == 32) {
    NATTEN_BY_TYPE(NATTEN_RS32)
  } else if constexpr (N == 64) {
    NATTEN_BY_TYPE(NATTEN_RS64)
  } else {
    NATTEN_BY_TYPE(NATTEN_RS128)
  }
#undef NATTEN_RS128
#undef NATTEN_RS64
#undef NATTEN_RS32
#undef NATTEN_RS8
#undef NATTEN_RS_IN
#endif
}

// d[N / 2] (+)= a[64 x 16] b[16 x N] with both operands in shared memory; TA / TB = 1: that
// operand is MN-major (A: M contiguous, i.e. stored as its transpose), else K-major.
template <typename T, int N, int TA, int TB>
__device__ __forceinline__ void wgmma_ss(float* d, uint64_t a_desc, uint64_t b_desc,
                                         int accumulate) {
#if NATTEN_HAS_WGMMA
  static_assert(N == 16 || N == 32 || N == 64 || N == 128, "wgmma_ss: N is 16, 32, 64 or 128");
#define NATTEN_SS_IN "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(TA), "n"(TB)
#define NATTEN_SS16(TY) \
  asm volatile(NATTEN_WGMMA_SS("16", TY, NATTEN_D8, "8", "9", "10", "11", "12") \
               : NATTEN_F8(d, 0) : NATTEN_SS_IN)
#define NATTEN_SS32(TY) \
  asm volatile(NATTEN_WGMMA_SS("32", TY, NATTEN_D16, "16", "17", "18", "19", "20") \
               : NATTEN_F16(d, 0) : NATTEN_SS_IN)
#define NATTEN_SS64(TY) \
  asm volatile(NATTEN_WGMMA_SS("64", TY, NATTEN_D32, "32", "33", "34", "35", "36") \
               : NATTEN_F16(d, 0), NATTEN_F16(d, 16) : NATTEN_SS_IN)
#define NATTEN_SS128(TY) \
  asm volatile(NATTEN_WGMMA_SS("128", TY, NATTEN_D64, "64", "65", "66", "67", "68") \
               : NATTEN_F16(d, 0), NATTEN_F16(d, 16), NATTEN_F16(d, 32), NATTEN_F16(d, 48) \
               : NATTEN_SS_IN)
  if constexpr (N == 16) {
    NATTEN_BY_TYPE(NATTEN_SS16)
  } else if constexpr (N == 32) {
    NATTEN_BY_TYPE(NATTEN_SS32)
  } else if constexpr (N == 64) {
    NATTEN_BY_TYPE(NATTEN_SS64)
  } else {
    NATTEN_BY_TYPE(NATTEN_SS128)
  }
#undef NATTEN_SS128
#undef NATTEN_SS64
#undef NATTEN_SS32
#undef NATTEN_SS16
#undef NATTEN_SS_IN
#endif
}

// d[32] (+)= a[64 x 16] b[16 x 64] with both operands K-major in shared memory (q k^T).
template <typename T>
__device__ __forceinline__ void wgmma_ss64(float* d, uint64_t a_desc, uint64_t b_desc,
                                          int accumulate) {
  wgmma_ss<T, 64, 0, 0>(d, a_desc, b_desc, accumulate);
}

// ---- bulk reduction (sm_90): shared -> global float adds by the copy engine --------------------
// Adds `bytes` (a multiple of 16; both addresses 16-byte aligned) of floats at `src` (shared) to
// `dst` (global); completes asynchronously in this thread's bulk group.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, const float* src, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(src));
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
      "r"(s), "r"(bytes)
      : "memory");
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// Waits until this thread's bulk groups have finished reading shared memory (it may be rewritten).
__device__ __forceinline__ void bulk_wait_read() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#endif
}
// Waits until this thread's bulk groups are complete (their global writes done).
__device__ __forceinline__ void bulk_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}

#undef NATTEN_BY_TYPE
#undef NATTEN_WGMMA_SS
#undef NATTEN_WGMMA
#undef NATTEN_D16
#undef NATTEN_D32
#undef NATTEN_D64
#undef NATTEN_F16
#undef NATTEN_F8
#undef NATTEN_F4
#undef NATTEN_D8
#undef NATTEN_D4

}  // namespace gpu
}  // namespace natten
