// Shared plumbing for the CUDA handlers: element load/store for f32 / f16 / bf16, dtype dispatch,
// launch configuration and launch checks, and the compact problem description passed to kernels.
// Decoding and validation of buffers + attributes live in natten/ffi_helpers.h (shared with the
// host kernels); this header only turns a validated `Problem` into kernel arguments.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#include "natten/ffi_helpers.h"
#include "natten/window.h"

namespace natten {
namespace gpu {

// ---- element access: every kernel computes in f32 -----------------------------------------------
template <typename T>
__device__ __forceinline__ float load(const T* p);
template <>
__device__ __forceinline__ float load<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T>
__device__ __forceinline__ void store(T* p, float v);
template <>
__device__ __forceinline__ void store<float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void store<__half>(__half* p, float v) { *p = __float2half_rn(v); }
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

// ---- dtype dispatch: f(TypeTag<T>{}) for the element type of a checked float buffer -------------
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
ffi::Error dispatch_float(ffi::DataType dtype, F&& f) {
  switch (dtype) {
    case ffi::DataType::F32: return f(TypeTag<float>{});
    case ffi::DataType::F16: return f(TypeTag<__half>{});
    case ffi::DataType::BF16: return f(TypeTag<__nv_bfloat16>{});
    default:
      return invalid(std::string("unsupported dtype ") + dtype_name(dtype) +
                     " (float32, float16 or bfloat16)");
  }
}

// ---- launches -----------------------------------------------------------------------------------
// Kernels use grid-stride loops, so the grid can be capped without losing elements.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// Blocks of a grid-stride kernel over `items` (at least 1, at most kMaxBlocks).
inline unsigned grid_for(int64_t items, int64_t per_block) {
  int64_t blocks = (items + per_block - 1) / per_block;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

// Tests set JAX_NATTEN_POISON_OUTPUTS=1: every output is then filled with 0xFF bytes (NaN in f32,
// f16 and bf16) on XLA's stream before the kernels run, so an element a kernel misses shows as NaN.
inline bool poison_requested() {
  static const bool requested = [] {
    const char* v = std::getenv("JAX_NATTEN_POISON_OUTPUTS");
    return v != nullptr && v[0] == '1';
  }();
  return requested;
}

template <typename... Buffers>
ffi::Error poison_outputs(cudaStream_t stream, Buffers&... outs) {
  if (!poison_requested()) return ok();
  for (ffi::AnyBuffer* out : {&outs...}) {
    if (out->size_bytes() == 0) continue;
    cudaError_t e = cudaMemsetAsync(out->untyped_data(), 0xFF, out->size_bytes(), stream);
    if (e != cudaSuccess)
      return ffi::Error(ffi::ErrorCode::kInternal,
                        std::string("natten: poisoning an output failed: ") + cudaGetErrorString(e));
  }
  return ok();
}

// Call right after every launch: reports launch-configuration errors as an ffi::Error.
inline ffi::Error check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return ok();
  return ffi::Error(ffi::ErrorCode::kInternal, std::string("natten: CUDA launch of ") + what +
                                                   " failed: " + cudaGetErrorString(e));
}

// How the unfused backends (naive, gemm) launch a kernel: on XLA's stream, nothing when `grid` is
// 0 (an empty problem), the launch checked. `args` convert to the kernel's parameter types.
template <typename... KernelParams, typename... Args>
ffi::Error launch(const char* what, void (*kernel)(KernelParams...), unsigned grid, dim3 block,
                  cudaStream_t stream, const Args&... args) {
  if (grid == 0) return ok();
  kernel<<<grid, block, 0, stream>>>(args...);
  return check_launch(what);
}

// ---- kernel arguments ---------------------------------------------------------------------------
// A compact, trivially copyable copy of a validated Problem for one kernel launch. Sizes that index
// one row or one axis are int; counts of tokens/rows and every address computation are int64.
struct Params {
  AxisParams ax[kMaxRank];  // x, y, z
  int64_t batch;            // B
  int64_t tokens;           // N = X * Y * Z
  int Y, Z;                 // extents needed to (de)linearize a token index
  int heads, kv_heads, group;  // H, KVH, H / KVH
  int kx, ky, kz, K;        // kernel per axis, K = kx * ky * kz
  int S, W;                 // additional tokens, W = K + S (entries of one weights row)
  int rx, ry, rz, R;        // rpb extents 2k - 1 per axis, R = rx * ry * rz
  int dim;                  // feature size of the vector operand of this kernel (D or Dv)
};

// Builds kernel arguments; `dim` is D or Dv. Fails (InvalidArgument) if a per-row size would not
// fit in an int, which no real problem reaches.
inline ffi::Error make_params(const Problem& p, int64_t dim, Params& out) {
  const int64_t imax = std::numeric_limits<int>::max();
  if (p.heads > imax || p.kv_heads > imax || dim > imax || p.slots() > imax ||
      p.rpb_per_head() > imax || p.extent[1] > imax || p.extent[2] > imax)
    return invalid("problem dimensions exceed the 32-bit range of the naive CUDA kernels");
  for (int a = 0; a < kMaxRank; ++a) out.ax[a] = p.axis[a];
  out.batch = p.batch;
  out.tokens = p.tokens();
  out.Y = static_cast<int>(p.extent[1]);
  out.Z = static_cast<int>(p.extent[2]);
  out.heads = static_cast<int>(p.heads);
  out.kv_heads = static_cast<int>(p.kv_heads);
  out.group = static_cast<int>(p.heads / p.kv_heads);
  out.kx = p.axis[0].kernel;
  out.ky = p.axis[1].kernel;
  out.kz = p.axis[2].kernel;
  out.K = static_cast<int>(p.kernel_volume());
  out.S = static_cast<int>(p.additional);
  out.W = static_cast<int>(p.slots());
  out.rx = static_cast<int>(p.rpb_extent(0));
  out.ry = static_cast<int>(p.rpb_extent(1));
  out.rz = static_cast<int>(p.rpb_extent(2));
  out.R = static_cast<int>(p.rpb_per_head());
  out.dim = static_cast<int>(dim);
  return ok();
}

}  // namespace gpu
}  // namespace natten

// The binding of every CUDA handler: XLA's stream, then `args` operand and `rets` result buffers in
// the handler's parameter order, then the four window attributes (natten/ffi_helpers.h:
// bind_buffers). The counts are those of the op's description (cuda/README.md). Handlers with more
// attributes append them.
#define NATTEN_CUDA_BIND(args, rets)                \
  (natten::bind_buffers<args, rets>(                \
      xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()))
