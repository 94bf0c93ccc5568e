// Fused backward on the host. Recomputes each query row's softmax P from its logits, then
// dS = P * (dP - Delta) with dP = do.v and Delta = sum(P * dP) - dlse (dlse: the cotangent of lse,
// whose gradient w.r.t. the logits is P), and scatters dS into dq, dk, drpb and P * do into dv
// (additional keys/values included).
// Neither stored forward result is read back, on purpose (numerics at the edges):
// - P is normalized by its own row sum, not formed as exp(logits - lse): with large, nearly equal
//   logits the float32 lse is off by more than log(window) and those weights would not sum to 1.
// - Delta is not rowsum(do * o): that equals sum(P * dP) only for the exact o; from the stored o,
//   rounded to the output dtype, it is off by ~eps(dtype) |do| |o|, and near one-hot rows, where
//   dP_i - Delta is itself tiny, that error swamps dS. softmax_backward forms dP_i - Delta from
//   the same f32 P and dP, relative to the largest weight's entry (no cancellation at all).
#include "common.h"
#include "natten/cpu_handlers.h"
#include "natten/op_checks.h"

namespace natten::cpu {
namespace {

ffi::Error FnaBackward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer rpb,
                       ffi::AnyBuffer add_k, ffi::AnyBuffer add_v, ffi::AnyBuffer o,
                       ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                       ffi::Result<ffi::AnyBuffer> dq,
                       ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                       ffi::Result<ffi::AnyBuffer> drpb, ffi::Result<ffi::AnyBuffer> dadd_k,
                       ffi::Result<ffi::AnyBuffer> dadd_v, I64Span kernel_size, I64Span stride,
                       I64Span dilation, I64Span is_causal, float scale) {
  Problem p;
  NATTEN_TRY(check_fna_bwd(p, q, k, v, rpb, add_k, add_v, o, lse, dout, dlse, *dq, *dk, *dv, *drpb,
                           *dadd_k, *dadd_v, kernel_size, stride, dilation, is_causal));
  const int64_t H = p.heads;

  return guarded([&] {
    InputF32 q32(q), k32(k), v32(v), add_k32(add_k), add_v32(add_v), dout32(dout);
    const float* dlse32 = static_cast<const float*>(dlse.untyped_data());
    const float* rpb32 = p.has_rpb ? static_cast<const float*>(rpb.untyped_data()) : nullptr;
    OutputF32 dq32(*dq, kUnwritten), dk32(*dk, 0.f), dv32(*dv, 0.f), drpb32(*drpb, 0.f),
        dadd_k32(*dadd_k, 0.f), dadd_v32(*dadd_v, 0.f);
    const Rows<const float> q_rows{q32.data(), p.tokens(), H, p.dim};
    const Rows<const float> dout_rows{dout32.data(), p.tokens(), H, p.dim_v};
    const Rows<float> dq_rows{dq32.data(), p.tokens(), H, p.dim};
    const auto k_rows = key_rows<const float>(p, k32.data(), add_k32.data(), p.dim);
    const auto v_rows = key_rows<const float>(p, v32.data(), add_v32.data(), p.dim_v);
    const auto dk_rows = key_rows<float>(p, dk32.data(), dadd_k32.data(), p.dim);
    const auto dv_rows = key_rows<float>(p, dv32.data(), dadd_v32.data(), p.dim_v);

    for_each_row_by_kv_head(p, [&](int64_t b, int64_t token, int64_t h, int64_t kv_head,
                                   RowScratch& row) {
      const size_t n = row.keys.size();
      float* probs = row.a.data();
      float* dscores = row.b.data();
      const float* q_row = q_rows(b, token, h);
      const float* dout_row = dout_rows(b, token, h);
      score_row(q_row, k_rows, b, kv_head, p.dim, row.keys, scale,
                rpb32 ? rpb32 + h * p.rpb_per_head() : nullptr, probs);
      const int64_t row_index = (b * p.tokens() + token) * H + h;
      softmax(probs, n);
      weighted_sum_backward(probs, dout_row, v_rows, dv_rows, b, kv_head, p.dim_v, row.keys,
                            dscores);
      softmax_backward(probs, dscores, n, dlse32[row_index]);
      score_row_backward(q_row, dscores, k_rows, dk_rows, b, kv_head, p.dim, row.keys, scale,
                         dq_rows(b, token, h),
                         p.has_rpb ? drpb32.data() + (b * H + h) * p.rpb_per_head() : nullptr);
    });
    for (OutputF32* out : {&dq32, &dk32, &dv32, &drpb32, &dadd_k32, &dadd_v32}) out->commit();
    return ok();
  });
}

}  // namespace
}  // namespace natten::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenCpuFnaBwd, natten::cpu::FnaBackward,
                              (natten::bind_handler<10, 6>().Attr<float>("scale")));
