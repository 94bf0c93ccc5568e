// Softmax arithmetic shared by the FNA kernels: the weights the backward forms from the forward's
// statistics, the special-function exp2 and the quad (4-lane) reductions over a C-fragment row.
#pragma once

#include <cuda_runtime.h>

namespace natten {
namespace gpu {
namespace fna {

// ---- softmax statistics ------------------------------------------------------------------------
// The forward's online softmax runs on base-2 logits x = (scale * q.k + rpb) * log2(e). Per query
// row it ends with m2, the largest x (the running max), and l = sum_j exp2(x_j - m2); o = acc / l
// and lse = (m2 + log2 l) ln 2. A forward whose result feeds a gradient also writes
// stats = (m2, log2_l = log2 l) and o unrounded (o32); a row without keys (none in NA) gets
// (0, -inf). The backward forms each weight from them as
//   P = exp2(fma(s, scale_log2, -m2) [+ rpb * log2(e)] - log2_l)
// (softmax_weight_exp2), not exp(logits - lse): m2 + log2_l rounded to float32 is off by an ulp of
// the logit (2^-10 at 2^13), and so is s * scale_log2 rounded on its own; the fma rounds only
// the difference from the row's max, which is small for every weight that matters.
__device__ __forceinline__ float softmax_weight_exp2(float s, float scale_log2, float2 st,
                                                     float bias2) {
  return (fmaf(s, scale_log2, -st.x) + bias2) - st.y;
}
__device__ __forceinline__ float softmax_weight_exp2(float s, float scale_log2, float2 st) {
  return fmaf(s, scale_log2, -st.x) - st.y;
}

// 2^x on the special-function unit, flushing subnormal results to zero (a probability below
// 2^-126 is zero to every dtype the kernels write); exp2f would add a subnormal-safe rescale.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
