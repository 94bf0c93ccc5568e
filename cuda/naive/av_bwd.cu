// natten_naive_av_bwd: w, v, add_v, do -> dw, dv, dadd_v.
//   dw[b, n, h, t]       = do[b, n, h] . v[b, nbr t, h / G] (0 past a causal query),
//                          do[b, n, h] . add_v[b, t - K] for t >= K
//                          (window_dot_kernel, thread per element of dw; dtype of w)
//   dv[b, j, kvh, :]     = sum_{queries c holding j, heads of kvh} w[b, c, h, t(c, j)] do[b, c, h]
//                          (inverse_gather_kernel, thread per element of dv)
//   dadd_v[b, s, kvh, :] = sum_{n, heads of kvh} w[b, n, h, K + s] do[b, n, h]
//                          (additional_reduce_kernel, block per 32 features)
// w may be f32 / f16 / bf16 independently of v; do, dv, dadd_v have the dtype of v.
#include "kernels.cuh"
#include "natten/cuda_common.h"
#include "natten/cuda_handlers.h"
#include "natten/ffi_helpers.h"
#include "natten/op_checks.h"

namespace natten {
namespace gpu {
namespace {

ffi::Error NaiveAvBwd(cudaStream_t stream, ffi::AnyBuffer w, ffi::AnyBuffer v, ffi::AnyBuffer add_v,
                      ffi::AnyBuffer d_o, ffi::Result<ffi::AnyBuffer> dw,
                      ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dadd_v,
                      I64Span kernel_size, I64Span stride, I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_av_bwd(p, w, v, add_v, d_o, *dw, *dv, *dadd_v, kernel_size, stride, dilation,
                          is_causal));
  const ffi::DataType wt = w.element_type(), vt = v.element_type();
  Params a;
  NATTEN_TRY(make_params(p, p.dim_v, a));
  NATTEN_TRY(poison_outputs(stream, *dw, *dv, *dadd_v));
  NATTEN_TRY(dispatch_float(wt, [&](auto wtag) -> ffi::Error {
    return dispatch_float(vt, [&](auto vtag) -> ffi::Error {
      using TW = typename decltype(wtag)::type;
      using TV = typename decltype(vtag)::type;
      NATTEN_TRY((naive::launch_window_dot<TV, TV, TW>(stream, a, d_o.untyped_data(),
                                                       v.untyped_data(), add_v.untyped_data(),
                                                       /*rpb=*/nullptr, dw->untyped_data(),
                                                       /*fill=*/0.f)));
      return naive::launch_inverse_gather<TW, TV, TV>(stream, a, w.untyped_data(),
                                                      d_o.untyped_data(), dv->untyped_data());
    });
  }));
  return naive::launch_av_bwd_reduction(stream, a, wt, vt, w.untyped_data(), d_o.untyped_data(),
                                        dadd_v->untyped_data());
}

}  // namespace
}  // namespace gpu
}  // namespace natten

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenNaiveAvBwd, natten::gpu::NaiveAvBwd, NATTEN_CUDA_BIND(4, 3),
                              {xla::ffi::Traits::kCmdBufferCompatible});
