// Limits and attribute codes shared by the kernels and the Python layer. module.cc exports them as
// `jax_natten._natten_ext.limits()`, which jax_natten/backends/ffi.py reads (`LIMITS`), so Python's
// up-front errors and the handlers' checks use the same numbers. Plain C++: host and device code.
#pragma once

#include <cstdint>

namespace natten {
namespace limits {

// backend "gemm": rows move as 16-byte vectors, so head dims are multiples of 8 (any size).
constexpr int64_t kGemmHeadDimMultiple = 8;

// backend "fused": head dims are multiples of 8 up to 128 (the kernels' head-dim tiles: 32, 64,
// 128), at most 65535 query heads (a CUDA grid dimension). fused_config tiles: query tiles of up to
// 128 tokens, key tiles of up to 64.
constexpr int64_t kFusedHeadDimMultiple = 8;
constexpr int64_t kFusedMaxHeadDim = 128;
constexpr int64_t kFusedMaxHeads = 65535;
// Fewer than 2^31 tokens per batch element (the kernels index tokens within one in 32 bits).
constexpr int64_t kFusedMaxTokens = (int64_t{1} << 31) - 1;
constexpr int64_t kFusedMaxQTileTokens = 128;
constexpr int64_t kFusedMaxKvTileTokens = 64;

// The fused calls' `mma` attribute: which matrix instructions the float16 / bfloat16 kernels use.
enum MmaCode : int64_t {
  kMmaAuto = 0,   // wgmma on a compute capability 9.x device with an sm_90a image, else mma.sync
  kMmaSync = 1,   // mma.sync everywhere
  kMmaWgmma = 2,  // wgmma, or an error where it cannot run
};

}  // namespace limits
}  // namespace natten
