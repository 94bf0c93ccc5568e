// The FFI handlers of backend="gemm": natten_gemm_{qk,av}_{fwd,bwd} (contract: cuda/README.md).
// Decoding (natten/ffi_helpers.h) and validation (natten/op_checks.h) are the naive handlers';
// the products run on the tiled kernels of gemm.cuh (launch.h), the additional-token and rpb
// gradients on the naive deterministic reductions (naive/kernels.cuh).
//   qk_fwd: q, k, rpb, add_k -> w             PN(q, k), w of q's dtype or float32
//   qk_bwd: q, k, add_k, dw -> dq, dk, drpb, dadd_k
//           dq = NN(dw, k), dk = IN(dw, q), drpb / dadd_k: naive reductions
//   av_fwd: w, v, add_v -> o                  NN(w, v)
//   av_bwd: w, v, add_v, do -> dw, dv, dadd_v
//           dw = PN(do, v) (0 past a causal query), dv = IN(w, do), dadd_v: naive reduction
// Launches only on XLA's stream, allocates nothing, never synchronizes; every launch is checked.
#include <cmath>

#include "../naive/kernels.cuh"
#include "launch.h"
#include "natten/cuda_common.h"
#include "natten/cuda_handlers.h"
#include "natten/ffi_helpers.h"
#include "natten/op_checks.h"

namespace natten {
namespace gpu {
namespace {

ffi::Error GemmQkFwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer rpb,
                     ffi::AnyBuffer add_k, ffi::Result<ffi::AnyBuffer> w, I64Span kernel_size,
                     I64Span stride, I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_qk_fwd(p, q, k, rpb, add_k, *w, kernel_size, stride, dilation, is_causal));
  NATTEN_TRY(gemm::check_head_dim("query/key", p.dim));
  const float* bias = p.has_rpb ? static_cast<const float*>(rpb.untyped_data()) : nullptr;
  NATTEN_TRY(poison_outputs(stream, *w));
  return gemm::launch_pn(stream, q.element_type(), p, p.dim, q.untyped_data(), k.untyped_data(),
                         add_k.untyped_data(), bias, w->untyped_data(), w->element_type(),
                         -INFINITY);
}

ffi::Error GemmQkBwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer add_k,
                     ffi::AnyBuffer dw, ffi::Result<ffi::AnyBuffer> dq,
                     ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> drpb,
                     ffi::Result<ffi::AnyBuffer> dadd_k, I64Span kernel_size, I64Span stride,
                     I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_qk_bwd(p, q, k, add_k, dw, *dq, *dk, *drpb, *dadd_k, kernel_size, stride,
                          dilation, is_causal));
  const ffi::DataType dt = q.element_type();
  NATTEN_TRY(gemm::check_head_dim("query/key", p.dim));
  Params a;
  NATTEN_TRY(make_params(p, p.dim, a));
  NATTEN_TRY(poison_outputs(stream, *dq, *dk, *drpb, *dadd_k));
  NATTEN_TRY(gemm::launch_nn(stream, dt, p, p.dim, dw.untyped_data(), dt, k.untyped_data(),
                             add_k.untyped_data(), dq->untyped_data()));
  NATTEN_TRY(gemm::launch_in(stream, dt, p, p.dim, dw.untyped_data(), dt, q.untyped_data(),
                             dk->untyped_data()));
  return naive::launch_qk_bwd_reductions(stream, a, dt, p.has_rpb, dw.untyped_data(),
                                         q.untyped_data(), dadd_k->untyped_data(),
                                         static_cast<float*>(drpb->untyped_data()));
}

ffi::Error GemmAvFwd(cudaStream_t stream, ffi::AnyBuffer w, ffi::AnyBuffer v, ffi::AnyBuffer add_v,
                     ffi::Result<ffi::AnyBuffer> o, I64Span kernel_size, I64Span stride,
                     I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_av_fwd(p, w, v, add_v, *o, kernel_size, stride, dilation, is_causal));
  NATTEN_TRY(gemm::check_head_dim("value", p.dim_v));
  NATTEN_TRY(poison_outputs(stream, *o));
  return gemm::launch_nn(stream, v.element_type(), p, p.dim_v, w.untyped_data(), w.element_type(),
                         v.untyped_data(), add_v.untyped_data(), o->untyped_data());
}

ffi::Error GemmAvBwd(cudaStream_t stream, ffi::AnyBuffer w, ffi::AnyBuffer v, ffi::AnyBuffer add_v,
                     ffi::AnyBuffer d_o, ffi::Result<ffi::AnyBuffer> dw,
                     ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dadd_v,
                     I64Span kernel_size, I64Span stride, I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_av_bwd(p, w, v, add_v, d_o, *dw, *dv, *dadd_v, kernel_size, stride, dilation,
                          is_causal));
  const ffi::DataType wt = w.element_type(), vt = v.element_type();
  NATTEN_TRY(gemm::check_head_dim("value", p.dim_v));
  Params a;
  NATTEN_TRY(make_params(p, p.dim_v, a));
  NATTEN_TRY(poison_outputs(stream, *dw, *dv, *dadd_v));
  NATTEN_TRY(gemm::launch_pn(stream, vt, p, p.dim_v, d_o.untyped_data(), v.untyped_data(),
                             add_v.untyped_data(), /*rpb=*/nullptr, dw->untyped_data(), wt,
                             /*fill=*/0.f));
  NATTEN_TRY(gemm::launch_in(stream, vt, p, p.dim_v, w.untyped_data(), wt, d_o.untyped_data(),
                             dv->untyped_data()));
  return naive::launch_av_bwd_reduction(stream, a, wt, vt, w.untyped_data(), d_o.untyped_data(),
                                        dadd_v->untyped_data());
}

}  // namespace
}  // namespace gpu
}  // namespace natten

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenGemmQkFwd, natten::gpu::GemmQkFwd, NATTEN_CUDA_BIND(4, 1),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenGemmQkBwd, natten::gpu::GemmQkBwd, NATTEN_CUDA_BIND(4, 4),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenGemmAvFwd, natten::gpu::GemmAvFwd, NATTEN_CUDA_BIND(3, 1),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenGemmAvBwd, natten::gpu::GemmAvBwd, NATTEN_CUDA_BIND(4, 3),
                              {xla::ffi::Traits::kCmdBufferCompatible});
