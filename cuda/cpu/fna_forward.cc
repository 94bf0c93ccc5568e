// Fused forward on the host: o = softmax(scale * q.k + rpb) v over each query's neighborhood and
// the additional keys, plus lse = log(sum(exp(logits))).
#include "common.h"
#include "natten/cpu_handlers.h"
#include "natten/op_checks.h"

namespace natten::cpu {
namespace {

ffi::Error FnaForward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer rpb,
                      ffi::AnyBuffer add_k, ffi::AnyBuffer add_v, ffi::Result<ffi::AnyBuffer> o,
                      ffi::Result<ffi::AnyBuffer> lse, I64Span kernel_size, I64Span stride,
                      I64Span dilation, I64Span is_causal, float scale) {
  Problem p;
  NATTEN_TRY(check_fna_fwd(p, q, k, v, rpb, add_k, add_v, *o, *lse, kernel_size, stride, dilation,
                           is_causal));
  const int64_t H = p.heads;

  return guarded([&] {
    InputF32 q32(q), k32(k), v32(v), add_k32(add_k), add_v32(add_v);
    OutputF32 out(*o, kUnwritten), lse_out(*lse, kUnwritten);
    const float* rpb32 = p.has_rpb ? static_cast<const float*>(rpb.untyped_data()) : nullptr;
    const Rows<const float> q_rows{q32.data(), p.tokens(), H, p.dim};
    const Rows<float> o_rows{out.data(), p.tokens(), H, p.dim_v};
    const auto k_rows = key_rows<const float>(p, k32.data(), add_k32.data(), p.dim);
    const auto v_rows = key_rows<const float>(p, v32.data(), add_v32.data(), p.dim_v);

    for_each_row(p, [&](int64_t b, int64_t token, int64_t h, int64_t kv_head, RowScratch& row) {
      float* probs = row.a.data();
      score_row(q_rows(b, token, h), k_rows, b, kv_head, p.dim, row.keys, scale,
                rpb32 ? rpb32 + h * p.rpb_per_head() : nullptr, probs);
      lse_out.data()[(b * p.tokens() + token) * H + h] = softmax(probs, row.keys.size());
      weighted_sum(probs, v_rows, b, kv_head, p.dim_v, row.keys, o_rows(b, token, h));
    });
    out.commit();
    lse_out.commit();
    return ok();
  });
}

}  // namespace
}  // namespace natten::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenCpuFnaFwd, natten::cpu::FnaForward,
                              (natten::bind_handler<6, 2>().Attr<float>("scale")));
