// Validation of the unfused ops' buffers (cuda/README.md), shared by the handlers of every backend
// (cpu, naive, gemm): each decodes the problem from the inputs and attributes, then checks the
// shape and dtype of every other buffer. A backend adds only its own limits (e.g. head dims).
#pragma once

#include "natten/ffi_helpers.h"

namespace natten {

// One [B, X, Y, Z, heads, width] buffer's expected shape.
#define NATTEN_TOKENS(p, heads, width) \
  { (p).batch, (p).extent[0], (p).extent[1], (p).extent[2], (heads), (width) }

// qk forward: q, k, rpb, add_k -> w.
inline ffi::Error check_qk_fwd(Problem& p, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                               const ffi::AnyBuffer& rpb, const ffi::AnyBuffer& add_k,
                               const ffi::AnyBuffer& w, I64Span kernel_size, I64Span stride,
                               I64Span dilation, I64Span is_causal) {
  NATTEN_TRY(decode_attention(p, q, k, nullptr, add_k, nullptr, rpb, /*rpb_is_grad=*/false,
                              kernel_size, stride, dilation, is_causal));
  return check_like("weights (qk output)", w, q.element_type(),
                    NATTEN_TOKENS(p, p.heads, p.slots()));
}

// qk backward: q, k, add_k, dw -> dq, dk, drpb, dadd_k. There is no rpb input: the drpb output
// (per batch, [B, H, 2k-1 ...], or 0 elements) says whether there is a bias.
inline ffi::Error check_qk_bwd(Problem& p, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                               const ffi::AnyBuffer& add_k, const ffi::AnyBuffer& dw,
                               const ffi::AnyBuffer& dq, const ffi::AnyBuffer& dk,
                               const ffi::AnyBuffer& drpb, const ffi::AnyBuffer& dadd_k,
                               I64Span kernel_size, I64Span stride, I64Span dilation,
                               I64Span is_causal) {
  NATTEN_TRY(decode_attention(p, q, k, nullptr, add_k, nullptr, drpb, /*rpb_is_grad=*/true,
                              kernel_size, stride, dilation, is_causal));
  const ffi::DataType dt = q.element_type();
  NATTEN_TRY(check_like("dw (weights cotangent)", dw, dt, NATTEN_TOKENS(p, p.heads, p.slots())));
  NATTEN_TRY(check_like("dq", dq, dt, NATTEN_TOKENS(p, p.heads, p.dim)));
  NATTEN_TRY(check_like("dk", dk, dt, NATTEN_TOKENS(p, p.kv_heads, p.dim)));
  return check_like("dadd_k", dadd_k, dt, {p.batch, p.additional, p.kv_heads, p.dim});
}

// av forward: w, v, add_v -> o (dtype of v; w may have its own dtype).
inline ffi::Error check_av_fwd(Problem& p, const ffi::AnyBuffer& w, const ffi::AnyBuffer& v,
                               const ffi::AnyBuffer& add_v, const ffi::AnyBuffer& o,
                               I64Span kernel_size, I64Span stride, I64Span dilation,
                               I64Span is_causal) {
  NATTEN_TRY(decode_av(p, w, v, add_v, kernel_size, stride, dilation, is_causal));
  return check_like("output (av)", o, v.element_type(), NATTEN_TOKENS(p, p.heads, p.dim_v));
}

// av backward: w, v, add_v, do -> dw (dtype of w), dv, dadd_v.
inline ffi::Error check_av_bwd(Problem& p, const ffi::AnyBuffer& w, const ffi::AnyBuffer& v,
                               const ffi::AnyBuffer& add_v, const ffi::AnyBuffer& d_o,
                               const ffi::AnyBuffer& dw, const ffi::AnyBuffer& dv,
                               const ffi::AnyBuffer& dadd_v, I64Span kernel_size, I64Span stride,
                               I64Span dilation, I64Span is_causal) {
  NATTEN_TRY(decode_av(p, w, v, add_v, kernel_size, stride, dilation, is_causal));
  const ffi::DataType wt = w.element_type(), vt = v.element_type();
  NATTEN_TRY(check_like("do (output cotangent)", d_o, vt, NATTEN_TOKENS(p, p.heads, p.dim_v)));
  NATTEN_TRY(check_like("dw", dw, wt, NATTEN_TOKENS(p, p.heads, p.slots())));
  NATTEN_TRY(check_like("dv", dv, vt, NATTEN_TOKENS(p, p.kv_heads, p.dim_v)));
  return check_like("dadd_v", dadd_v, vt, {p.batch, p.additional, p.kv_heads, p.dim_v});
}

#undef NATTEN_TOKENS

}  // namespace natten
