// Unfused q.k on the host: w[..., t] = q . k_t + rpb_t for window offset t and w[..., K + s] =
// q . add_k_s (no scale); offsets past a causal query are -inf. Its backward scatters dw back.
#include <limits>

#include "common.h"
#include "natten/op_checks.h"
#include "natten/cpu_handlers.h"

namespace natten::cpu {
namespace {

ffi::Error QkForward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer rpb, ffi::AnyBuffer add_k,
                     ffi::Result<ffi::AnyBuffer> w, I64Span kernel_size, I64Span stride,
                     I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_qk_fwd(p, q, k, rpb, add_k, *w, kernel_size, stride, dilation, is_causal));
  const int64_t H = p.heads;

  return guarded([&] {
    InputF32 q32(q), k32(k), add_k32(add_k);
    OutputF32 w32(*w, -std::numeric_limits<float>::infinity());  // what causal-invalid slots keep
    const float* rpb32 = p.has_rpb ? static_cast<const float*>(rpb.untyped_data()) : nullptr;
    const Rows<const float> q_rows{q32.data(), p.tokens(), H, p.dim};
    const Rows<float> w_rows{w32.data(), p.tokens(), H, p.slots()};
    const auto k_rows = key_rows<const float>(p, k32.data(), add_k32.data(), p.dim);

    for_each_row(p, [&](int64_t b, int64_t token, int64_t h, int64_t kv_head, RowScratch& row) {
      score_row(q_rows(b, token, h), k_rows, b, kv_head, p.dim, row.keys, /*scale=*/1.f,
                rpb32 ? rpb32 + h * p.rpb_per_head() : nullptr, row.a.data());
      float* w_row = w_rows(b, token, h);
      for (size_t i = 0; i < row.keys.size(); ++i) w_row[row.keys[i].slot] = row.a[i];
    });
    w32.commit();
    return ok();
  });
}

ffi::Error QkBackward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer add_k, ffi::AnyBuffer dw,
                      ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                      ffi::Result<ffi::AnyBuffer> drpb, ffi::Result<ffi::AnyBuffer> dadd_k,
                      I64Span kernel_size, I64Span stride, I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_qk_bwd(p, q, k, add_k, dw, *dq, *dk, *drpb, *dadd_k, kernel_size, stride, dilation, is_causal));
  const int64_t H = p.heads;

  return guarded([&] {
    InputF32 q32(q), k32(k), add_k32(add_k), dw32(dw);
    OutputF32 dq32(*dq, kUnwritten), dk32(*dk, 0.f), drpb32(*drpb, 0.f), dadd_k32(*dadd_k, 0.f);
    const Rows<const float> q_rows{q32.data(), p.tokens(), H, p.dim};
    const Rows<const float> dw_rows{dw32.data(), p.tokens(), H, p.slots()};
    const Rows<float> dq_rows{dq32.data(), p.tokens(), H, p.dim};
    const auto k_rows = key_rows<const float>(p, k32.data(), add_k32.data(), p.dim);
    const auto dk_rows = key_rows<float>(p, dk32.data(), dadd_k32.data(), p.dim);

    for_each_row_by_kv_head(p, [&](int64_t b, int64_t token, int64_t h, int64_t kv_head,
                                   RowScratch& row) {
      // Gather the attended slots of dw; slots past a causal query are never read.
      const float* dw_row = dw_rows(b, token, h);
      for (size_t i = 0; i < row.keys.size(); ++i) row.a[i] = dw_row[row.keys[i].slot];
      score_row_backward(q_rows(b, token, h), row.a.data(), k_rows, dk_rows, b, kv_head, p.dim,
                         row.keys, /*scale=*/1.f, dq_rows(b, token, h),
                         p.has_rpb ? drpb32.data() + (b * H + h) * p.rpb_per_head() : nullptr);
    });
    for (OutputF32* out : {&dq32, &dk32, &drpb32, &dadd_k32}) out->commit();
    return ok();
  });
}

}  // namespace
}  // namespace natten::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenCpuQkFwd, natten::cpu::QkForward, (natten::bind_handler<4, 1>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenCpuQkBwd, natten::cpu::QkBackward, (natten::bind_handler<4, 4>()));
