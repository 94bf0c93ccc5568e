// natten_naive_qk_fwd: q, k, rpb, add_k -> w [B, X, Y, Z, H, K + S] (dtype of q, or float32).
// w[..., t] = q . k[neighbor t] + rpb[h, rel(t)] for t < K (-inf past a causal query),
// w[..., K + s] = q . add_k[b, s, kvh]. No scaling.
// One thread per element of w (window_dot_kernel).
#include <cmath>

#include "kernels.cuh"
#include "natten/cuda_common.h"
#include "natten/cuda_handlers.h"
#include "natten/ffi_helpers.h"
#include "natten/op_checks.h"

namespace natten {
namespace gpu {
namespace {

ffi::Error NaiveQkFwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer rpb,
                      ffi::AnyBuffer add_k, ffi::Result<ffi::AnyBuffer> w, I64Span kernel_size,
                      I64Span stride, I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_qk_fwd(p, q, k, rpb, add_k, *w, kernel_size, stride, dilation, is_causal));
  Params a;
  NATTEN_TRY(make_params(p, p.dim, a));
  const float* bias = p.has_rpb ? static_cast<const float*>(rpb.untyped_data()) : nullptr;
  NATTEN_TRY(poison_outputs(stream, *w));
  const bool f32_out = w->element_type() == ffi::DataType::F32;
  return dispatch_float(q.element_type(), [&](auto tag) -> ffi::Error {
    using T = typename decltype(tag)::type;
    if (f32_out)  // float32 logits of float16 / bfloat16 inputs (check_qk_fwd)
      return naive::launch_window_dot<T, T, float>(stream, a, q.untyped_data(), k.untyped_data(),
                                                   add_k.untyped_data(), bias, w->untyped_data(),
                                                   -INFINITY);
    return naive::launch_window_dot<T, T, T>(stream, a, q.untyped_data(), k.untyped_data(),
                                             add_k.untyped_data(), bias, w->untyped_data(),
                                             -INFINITY);
  });
}

}  // namespace
}  // namespace gpu
}  // namespace natten

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenNaiveQkFwd, natten::gpu::NaiveQkFwd, NATTEN_CUDA_BIND(4, 1),
                              {xla::ffi::Traits::kCmdBufferCompatible});
