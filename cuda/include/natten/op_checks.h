// Validation of the ops' buffers (cuda/README.md), shared by the handlers of every backend (cpu,
// naive, gemm, fused): each decodes the problem from the inputs and attributes, then checks the
// shape and dtype of every other buffer. A backend adds only its own limits (e.g. head dims).
#pragma once

#include "natten/ffi_helpers.h"

namespace natten {

// One [B, X, Y, Z, heads, width] buffer's expected shape.
#define NATTEN_TOKENS(p, heads, width) \
  { (p).batch, (p).extent[0], (p).extent[1], (p).extent[2], (heads), (width) }

// qk forward: q, k, rpb, add_k -> w, of q's dtype or float32 (the unfused attention keeps its
// logits unrounded: large logits would lose their differences in float16 / bfloat16).
inline ffi::Error check_qk_fwd(Problem& p, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                               const ffi::AnyBuffer& rpb, const ffi::AnyBuffer& add_k,
                               const ffi::AnyBuffer& w, I64Span kernel_size, I64Span stride,
                               I64Span dilation, I64Span is_causal) {
  NATTEN_TRY(decode_attention(p, q, k, nullptr, add_k, nullptr, rpb, /*rpb_is_grad=*/false,
                              kernel_size, stride, dilation, is_causal));
  const ffi::DataType wt =
      w.element_type() == ffi::DataType::F32 ? ffi::DataType::F32 : q.element_type();
  return check_like("weights (qk output)", w, wt, NATTEN_TOKENS(p, p.heads, p.slots()));
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

// Fused op forward: q, k, v, rpb, add_k, add_v -> o, lse.
inline ffi::Error check_fna_fwd(Problem& p, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                const ffi::AnyBuffer& v, const ffi::AnyBuffer& rpb,
                                const ffi::AnyBuffer& add_k, const ffi::AnyBuffer& add_v,
                                const ffi::AnyBuffer& o, const ffi::AnyBuffer& lse,
                                I64Span kernel_size, I64Span stride, I64Span dilation,
                                I64Span is_causal) {
  NATTEN_TRY(decode_attention(p, q, k, &v, add_k, &add_v, rpb, /*rpb_is_grad=*/false, kernel_size,
                              stride, dilation, is_causal));
  const int64_t B = p.batch, X = p.extent[0], Y = p.extent[1], Z = p.extent[2], H = p.heads;
  NATTEN_TRY(check_like("output", o, q.element_type(), {B, X, Y, Z, H, p.dim_v}));
  return check_like("lse", lse, ffi::DataType::F32, {B, X, Y, Z, H});
}

// The fused CUDA forward's residuals, written for a gradient: stats [B, X, Y, Z, H, 2] (per query
// row m2, the largest base-2 logit, and log2_l, the log2 of the softmax's sum relative to it) and
// o32 [B, X, Y, Z, H, Dv] (the output before rounding), both float32; both 0 elements (absent)
// for a call that wants no gradient. `present`: whether they are there.
inline ffi::Error check_fna_residuals(const Problem& p, const ffi::AnyBuffer& stats,
                                      const ffi::AnyBuffer& o32, bool& present) {
  present = stats.element_count() != 0 || o32.element_count() != 0;
  if (!present) return ok();
  const int64_t B = p.batch, X = p.extent[0], Y = p.extent[1], Z = p.extent[2], H = p.heads;
  NATTEN_TRY(check_like("softmax statistics (stats)", stats, ffi::DataType::F32,
                        {B, X, Y, Z, H, 2}));
  return check_like("float32 output (o32)", o32, ffi::DataType::F32, {B, X, Y, Z, H, p.dim_v});
}

// Fused op backward, what every backend takes: the primal inputs q, k, v, rpb, add_k, add_v, the
// cotangents do, dlse, and the gradients dq, dk, dv, drpb (per batch, 0 elements exactly when rpb
// has none), dadd_k, dadd_v. What the forward saved for it is the backend's own (check_fna_bwd:
// o and lse; the fused CUDA backward: the residuals, check_fna_residuals).
inline ffi::Error check_fna_grads(Problem& p, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                  const ffi::AnyBuffer& v, const ffi::AnyBuffer& rpb,
                                  const ffi::AnyBuffer& add_k, const ffi::AnyBuffer& add_v,
                                  const ffi::AnyBuffer& dout, const ffi::AnyBuffer& dlse,
                                  const ffi::AnyBuffer& dq, const ffi::AnyBuffer& dk,
                                  const ffi::AnyBuffer& dv, const ffi::AnyBuffer& drpb,
                                  const ffi::AnyBuffer& dadd_k, const ffi::AnyBuffer& dadd_v,
                                  I64Span kernel_size, I64Span stride, I64Span dilation,
                                  I64Span is_causal) {
  NATTEN_TRY(decode_attention(p, q, k, &v, add_k, &add_v, rpb, /*rpb_is_grad=*/false, kernel_size,
                              stride, dilation, is_causal));
  const int64_t B = p.batch, X = p.extent[0], Y = p.extent[1], Z = p.extent[2], H = p.heads;
  const ffi::DataType dtype = q.element_type();
  NATTEN_TRY(check_like("output gradient", dout, dtype, {B, X, Y, Z, H, p.dim_v}));
  NATTEN_TRY(check_like("lse gradient", dlse, ffi::DataType::F32, {B, X, Y, Z, H}));
  NATTEN_TRY(check_like("query gradient", dq, dtype, {B, X, Y, Z, H, p.dim}));
  NATTEN_TRY(check_like("key gradient", dk, dtype, {B, X, Y, Z, p.kv_heads, p.dim}));
  NATTEN_TRY(check_like("value gradient", dv, dtype, {B, X, Y, Z, p.kv_heads, p.dim_v}));
  NATTEN_TRY(check_like("additional_keys gradient", dadd_k, dtype,
                        {B, p.additional, p.kv_heads, p.dim}));
  NATTEN_TRY(check_like("additional_values gradient", dadd_v, dtype,
                        {B, p.additional, p.kv_heads, p.dim_v}));
  Problem with_drpb = p;
  NATTEN_TRY(decode_rpb(with_drpb, "rpb gradient", drpb, /*per_batch=*/true));
  if (with_drpb.has_rpb != p.has_rpb && B > 0)
    return invalid("rpb gradient must have elements exactly when rpb does");
  return ok();
}

// Fused op backward of the host kernels: q, k, v, rpb, add_k, add_v, o, lse, do, dlse -> dq, dk,
// dv, drpb, dadd_k, dadd_v (check_fna_grads), o and lse as the forward wrote them.
inline ffi::Error check_fna_bwd(Problem& p, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                const ffi::AnyBuffer& v, const ffi::AnyBuffer& rpb,
                                const ffi::AnyBuffer& add_k, const ffi::AnyBuffer& add_v,
                                const ffi::AnyBuffer& o, const ffi::AnyBuffer& lse,
                                const ffi::AnyBuffer& dout, const ffi::AnyBuffer& dlse,
                                const ffi::AnyBuffer& dq, const ffi::AnyBuffer& dk,
                                const ffi::AnyBuffer& dv, const ffi::AnyBuffer& drpb,
                                const ffi::AnyBuffer& dadd_k, const ffi::AnyBuffer& dadd_v,
                                I64Span kernel_size, I64Span stride, I64Span dilation,
                                I64Span is_causal) {
  NATTEN_TRY(check_fna_grads(p, q, k, v, rpb, add_k, add_v, dout, dlse, dq, dk, dv, drpb, dadd_k,
                             dadd_v, kernel_size, stride, dilation, is_causal));
  const int64_t B = p.batch, X = p.extent[0], Y = p.extent[1], Z = p.extent[2], H = p.heads;
  NATTEN_TRY(check_like("output", o, q.element_type(), {B, X, Y, Z, H, p.dim_v}));
  return check_like("lse", lse, ffi::DataType::F32, {B, X, Y, Z, H});
}

}  // namespace natten
