// natten_naive_av_fwd: w, v, add_v -> o [B, X, Y, Z, H, Dv] (dtype of v).
//   o[b, n, h, :] = sum_{valid t < K} w[b, n, h, t] v[b, nbr t, h / G]
//                 + sum_s w[b, n, h, K + s] add_v[b, s, h / G]
// w may be f32 / f16 / bf16 independently of v. Weights past a causal query are never read.
// One thread per element of o (window_gather_kernel).
#include "kernels.cuh"
#include "natten/cuda_common.h"
#include "natten/cuda_handlers.h"
#include "natten/ffi_helpers.h"
#include "natten/op_checks.h"

namespace natten {
namespace gpu {
namespace {

ffi::Error NaiveAvFwd(cudaStream_t stream, ffi::AnyBuffer w, ffi::AnyBuffer v, ffi::AnyBuffer add_v,
                      ffi::Result<ffi::AnyBuffer> o, I64Span kernel_size, I64Span stride,
                      I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_av_fwd(p, w, v, add_v, *o, kernel_size, stride, dilation, is_causal));
  Params a;
  NATTEN_TRY(make_params(p, p.dim_v, a));
  NATTEN_TRY(poison_outputs(stream, *o));
  return dispatch_float(w.element_type(), [&](auto wtag) -> ffi::Error {
    return dispatch_float(v.element_type(), [&](auto vtag) -> ffi::Error {
      using TW = typename decltype(wtag)::type;
      using TV = typename decltype(vtag)::type;
      return naive::launch_window_gather<TW, TV, TV>(stream, a, w.untyped_data(), v.untyped_data(),
                                                     add_v.untyped_data(), o->untyped_data());
    });
  });
}

}  // namespace
}  // namespace gpu
}  // namespace natten

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenNaiveAvFwd, natten::gpu::NaiveAvFwd, NATTEN_CUDA_BIND(3, 1),
                              {xla::ffi::Traits::kCmdBufferCompatible});
