// natten_naive_qk_bwd: q, k, add_k, dw -> dq, dk, drpb, dadd_k.
//   dq[b, n, h, :]      = sum_{valid t} dw[b, n, h, t] k[nbr t]
//                       + sum_s dw[b, n, h, K + s] add_k[b, s]
//                         (window_gather_kernel, thread per element of dq)
//   dk[b, j, kvh, :]    = sum_{queries c holding j, heads of kvh} dw[b, c, h, t(c, j)] q[b, c, h]
//                         (inverse_gather_kernel, thread per element of dk)
//   drpb[b, h, r]       = sum_n dw[b, n, h, t(n, r)]  (rpb_grad_kernel, block per element; skipped
//                         when the drpb output has 0 elements)
//   dadd_k[b, s, kvh, :] = sum_{n, heads of kvh} dw[b, n, h, K + s] q[b, n, h]
//                         (additional_reduce_kernel, block per 32 features)
// dw past a causal query is never read. dw has the dtype of q (it is the cotangent of w).
#include "kernels.cuh"
#include "natten/cuda_common.h"
#include "natten/cuda_handlers.h"
#include "natten/ffi_helpers.h"
#include "natten/op_checks.h"

namespace natten {
namespace gpu {
namespace {

ffi::Error NaiveQkBwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer add_k,
                      ffi::AnyBuffer dw, ffi::Result<ffi::AnyBuffer> dq,
                      ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> drpb,
                      ffi::Result<ffi::AnyBuffer> dadd_k, I64Span kernel_size, I64Span stride,
                      I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_qk_bwd(p, q, k, add_k, dw, *dq, *dk, *drpb, *dadd_k, kernel_size, stride,
                          dilation, is_causal));
  const ffi::DataType dt = q.element_type();
  Params a;
  NATTEN_TRY(make_params(p, p.dim, a));
  NATTEN_TRY(poison_outputs(stream, *dq, *dk, *drpb, *dadd_k));
  NATTEN_TRY(dispatch_float(dt, [&](auto tag) -> ffi::Error {
    using T = typename decltype(tag)::type;
    NATTEN_TRY((naive::launch_window_gather<T, T, T>(stream, a, dw.untyped_data(), k.untyped_data(),
                                                     add_k.untyped_data(), dq->untyped_data())));
    return naive::launch_inverse_gather<T, T, T>(stream, a, dw.untyped_data(), q.untyped_data(),
                                                 dk->untyped_data());
  }));
  return naive::launch_qk_bwd_reductions(stream, a, dt, p.has_rpb, dw.untyped_data(),
                                         q.untyped_data(), dadd_k->untyped_data(),
                                         static_cast<float*>(drpb->untyped_data()));
}

}  // namespace
}  // namespace gpu
}  // namespace natten

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenNaiveQkBwd, natten::gpu::NaiveQkBwd, NATTEN_CUDA_BIND(4, 4),
                              {xla::ffi::Traits::kCmdBufferCompatible});
