// Unfused weights x values on the host: o = sum_t w[..., t] v_t over the window offsets and the
// additional values (w past a causal query is ignored). Its backward gives dw (0 past a causal
// query) and scatters w * do into dv.
#include "common.h"
#include "natten/op_checks.h"
#include "natten/cpu_handlers.h"

namespace natten::cpu {
namespace {

ffi::Error AvForward(ffi::AnyBuffer w, ffi::AnyBuffer v, ffi::AnyBuffer add_v,
                     ffi::Result<ffi::AnyBuffer> o, I64Span kernel_size, I64Span stride,
                     I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_av_fwd(p, w, v, add_v, *o, kernel_size, stride, dilation, is_causal));
  const int64_t H = p.heads;

  return guarded([&] {
    InputF32 w32(w), v32(v), add_v32(add_v);
    OutputF32 out(*o, kUnwritten);
    const Rows<const float> w_rows{w32.data(), p.tokens(), H, p.slots()};
    const Rows<float> o_rows{out.data(), p.tokens(), H, p.dim_v};
    const auto v_rows = key_rows<const float>(p, v32.data(), add_v32.data(), p.dim_v);

    for_each_row(p, [&](int64_t b, int64_t token, int64_t h, int64_t kv_head, RowScratch& row) {
      const float* w_row = w_rows(b, token, h);
      for (size_t i = 0; i < row.keys.size(); ++i) row.a[i] = w_row[row.keys[i].slot];
      weighted_sum(row.a.data(), v_rows, b, kv_head, p.dim_v, row.keys, o_rows(b, token, h));
    });
    out.commit();
    return ok();
  });
}

ffi::Error AvBackward(ffi::AnyBuffer w, ffi::AnyBuffer v, ffi::AnyBuffer add_v, ffi::AnyBuffer dout,
                      ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::AnyBuffer> dv,
                      ffi::Result<ffi::AnyBuffer> dadd_v, I64Span kernel_size, I64Span stride,
                      I64Span dilation, I64Span is_causal) {
  Problem p;
  NATTEN_TRY(check_av_bwd(p, w, v, add_v, dout, *dw, *dv, *dadd_v, kernel_size, stride, dilation, is_causal));
  const int64_t H = p.heads;

  return guarded([&] {
    InputF32 w32(w), v32(v), add_v32(add_v), dout32(dout);
    OutputF32 dw32(*dw, 0.f), dv32(*dv, 0.f), dadd_v32(*dadd_v, 0.f);
    const Rows<const float> w_rows{w32.data(), p.tokens(), H, p.slots()};
    const Rows<const float> dout_rows{dout32.data(), p.tokens(), H, p.dim_v};
    const Rows<float> dw_rows{dw32.data(), p.tokens(), H, p.slots()};
    const auto v_rows = key_rows<const float>(p, v32.data(), add_v32.data(), p.dim_v);
    const auto dv_rows = key_rows<float>(p, dv32.data(), dadd_v32.data(), p.dim_v);

    for_each_row_by_kv_head(p, [&](int64_t b, int64_t token, int64_t h, int64_t kv_head,
                                   RowScratch& row) {
      const float* w_row = w_rows(b, token, h);
      for (size_t i = 0; i < row.keys.size(); ++i) row.a[i] = w_row[row.keys[i].slot];
      weighted_sum_backward(row.a.data(), dout_rows(b, token, h), v_rows, dv_rows, b, kv_head,
                            p.dim_v, row.keys, row.b.data());
      float* dw_row = dw_rows(b, token, h);
      for (size_t i = 0; i < row.keys.size(); ++i) dw_row[row.keys[i].slot] = row.b[i];
    });
    for (OutputF32* out : {&dw32, &dv32, &dadd_v32}) out->commit();
    return ok();
  });
}

}  // namespace
}  // namespace natten::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenCpuAvFwd, natten::cpu::AvForward, (natten::bind_handler<3, 1>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NattenCpuAvBwd, natten::cpu::AvBackward, (natten::bind_handler<4, 3>()));
