// Shared FFI plumbing for every handler, host or CUDA: error helpers, dtype and shape checks, and
// the decoding of buffers + attributes into one `Problem` (the layout is in cuda/README.md).
// Handlers check everything here before touching memory and report problems as ffi::Error; they
// never abort. Host-only code (no __device__), safe to include from .cu files.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>

#include "natten/window.h"
#include "xla/ffi/api/ffi.h"

namespace natten {

namespace ffi = ::xla::ffi;
using I64Span = ffi::Span<const int64_t>;

// Returns from the enclosing function when `expr` (an ffi::Error) is a failure.
#define NATTEN_TRY(expr)                                   \
  do {                                                     \
    ::xla::ffi::Error natten_error_ = (expr);              \
    if (natten_error_.failure()) return natten_error_;     \
  } while (0)

inline ffi::Error invalid(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "natten: " + message);
}

inline ffi::Error ok() { return ffi::Error::Success(); }

inline const char* dtype_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::S8: return "int8";
    case ffi::DataType::S16: return "int16";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    case ffi::DataType::U8: return "uint8";
    case ffi::DataType::PRED: return "bool";
    default: return "an unsupported dtype";
  }
}

inline bool is_supported_float(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::F16 || t == ffi::DataType::BF16;
}

inline ffi::Error check_float(const char* name, const ffi::AnyBuffer& buf) {
  if (is_supported_float(buf.element_type())) return ok();
  return invalid(std::string(name) + " must be float32, float16 or bfloat16, got " +
                 dtype_name(buf.element_type()));
}

inline ffi::Error check_dtype(const char* name, const ffi::AnyBuffer& buf, ffi::DataType want) {
  if (buf.element_type() == want) return ok();
  return invalid(std::string(name) + " must be " + dtype_name(want) + ", got " +
                 dtype_name(buf.element_type()));
}

inline std::string shape_string(I64Span dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline std::string shape_string(std::initializer_list<int64_t> dims) {
  return shape_string(I64Span(dims.begin(), dims.size()));
}

inline ffi::Error check_rank(const char* name, const ffi::AnyBuffer& buf, size_t rank) {
  if (buf.dimensions().size() == rank) return ok();
  return invalid(std::string(name) + " must have rank " + std::to_string(rank) + ", got shape " +
                 shape_string(buf.dimensions()));
}

inline ffi::Error check_shape(const char* name, const ffi::AnyBuffer& buf,
                              std::initializer_list<int64_t> want) {
  I64Span got = buf.dimensions();
  bool same = got.size() == want.size();
  for (size_t i = 0; same && i < want.size(); ++i) same = got[i] == want.begin()[i];
  if (same) return ok();
  return invalid(std::string(name) + " must have shape " + shape_string(want) + ", got " +
                 shape_string(got));
}

// Everything a kernel needs to know about one (padded-to-3-D) problem.
struct Problem {
  int64_t batch = 0;
  int64_t extent[kMaxRank] = {};  // X, Y, Z
  int64_t heads = 0;              // H (query heads)
  int64_t kv_heads = 0;           // KVH
  int64_t dim = 0;                // D of q and k
  int64_t dim_v = 0;              // Dv of v
  int64_t additional = 0;         // S: additional keys / values
  bool has_rpb = false;
  AxisParams axis[kMaxRank] = {};

  int64_t tokens() const { return extent[0] * extent[1] * extent[2]; }
  int64_t kernel_volume() const {
    return int64_t{axis[0].kernel} * axis[1].kernel * axis[2].kernel;
  }
  int64_t slots() const { return kernel_volume() + additional; }  // entries of one weights row
  int64_t head_group() const { return heads / kv_heads; }          // query heads per kv head
  int64_t rpb_extent(int a) const { return 2 * int64_t{axis[a].kernel} - 1; }
  int64_t rpb_per_head() const { return rpb_extent(0) * rpb_extent(1) * rpb_extent(2); }
};

// Reads the window attributes; needs `p.extent` already set.
inline ffi::Error decode_axes(Problem& p, I64Span kernel_size, I64Span stride, I64Span dilation,
                              I64Span is_causal) {
  const char* names[] = {"kernel_size", "stride", "dilation", "is_causal"};
  I64Span spans[] = {kernel_size, stride, dilation, is_causal};
  for (int i = 0; i < 4; ++i) {
    if (spans[i].size() != static_cast<size_t>(kMaxRank))
      return invalid(std::string(names[i]) + " must have 3 entries (problems are padded to 3-D), got " +
                     std::to_string(spans[i].size()));
  }
  for (int a = 0; a < kMaxRank; ++a) {
    const int64_t length = p.extent[a], k = kernel_size[a], s = stride[a], d = dilation[a];
    const std::string axis = " on axis " + std::to_string(a);
    if (length > std::numeric_limits<int>::max()) return invalid("axis too long" + axis);
    if (k < 1) return invalid("kernel_size must be >= 1" + axis + ", got " + std::to_string(k));
    if (s < 1 || s > k)
      return invalid("stride must be in [1, kernel_size]" + axis + ", got " + std::to_string(s));
    if (d < 1) return invalid("dilation must be >= 1" + axis + ", got " + std::to_string(d));
    if (k > length / d || k * d > length)  // first test guards the product against overflow
      return invalid("kernel_size * dilation must be <= the axis length" + axis + ": " +
                     std::to_string(k) + " * " + std::to_string(d) + " > " + std::to_string(length));
    if (is_causal[a] != 0 && is_causal[a] != 1)
      return invalid("is_causal must hold 0 or 1" + axis);
    p.axis[a] = AxisParams{static_cast<int>(length), static_cast<int>(k), static_cast<int>(s),
                           static_cast<int>(d), is_causal[a] == 1};
  }
  return ok();
}

// Reads B, X, Y, Z, H (and the last dim into `last`) from a [B, X, Y, Z, H, last] buffer.
inline ffi::Error decode_query_like(Problem& p, const char* name, const ffi::AnyBuffer& buf,
                                    int64_t& last) {
  NATTEN_TRY(check_rank(name, buf, 6));
  I64Span d = buf.dimensions();
  p.batch = d[0];
  for (int a = 0; a < kMaxRank; ++a) p.extent[a] = d[1 + a];
  p.heads = d[4];
  last = d[5];
  if (p.heads < 1) return invalid(std::string(name) + " must have at least one head");
  return ok();
}

// Reads KVH from k or v ([B, X, Y, Z, KVH, D]) and checks it against the query layout.
inline ffi::Error decode_kv_like(Problem& p, const char* name, const ffi::AnyBuffer& buf,
                                 int64_t& last) {
  NATTEN_TRY(check_rank(name, buf, 6));
  I64Span d = buf.dimensions();
  p.kv_heads = d[4];
  last = d[5];
  NATTEN_TRY(check_shape(name, buf, {p.batch, p.extent[0], p.extent[1], p.extent[2], d[4], d[5]}));
  if (p.kv_heads < 1 || p.heads % p.kv_heads != 0)
    return invalid("heads (" + std::to_string(p.heads) + ") must be a multiple of kv_heads (" +
                   std::to_string(p.kv_heads) + ")");
  return ok();
}

// Additional keys/values [B, S, KVH, last]; sets S (0 when absent).
inline ffi::Error decode_additional(Problem& p, const char* name, const ffi::AnyBuffer& buf,
                                    int64_t last) {
  NATTEN_TRY(check_rank(name, buf, 4));
  p.additional = buf.dimensions()[1];
  return check_shape(name, buf, {p.batch, p.additional, p.kv_heads, last});
}

// The positional bias (rpb, [H, 2kx-1, 2ky-1, 2kz-1]) or its per-batch gradient (drpb,
// [B, H, ...]): present iff it has elements. Needs the axes decoded.
inline ffi::Error decode_rpb(Problem& p, const char* name, const ffi::AnyBuffer& buf,
                             bool per_batch) {
  p.has_rpb = buf.element_count() != 0;
  if (!p.has_rpb) return ok();
  NATTEN_TRY(check_dtype(name, buf, ffi::DataType::F32));
  if (per_batch)
    NATTEN_TRY(check_shape(name, buf, {p.batch, p.heads, p.rpb_extent(0), p.rpb_extent(1),
                                       p.rpb_extent(2)}));
  else
    NATTEN_TRY(check_shape(name, buf, {p.heads, p.rpb_extent(0), p.rpb_extent(1), p.rpb_extent(2)}));
  for (int a = 0; a < kMaxRank; ++a) {
    if (p.axis[a].causal || p.axis[a].stride != 1)
      return invalid("relative positional bias is only defined for non-causal, stride-1 axes "
                     "(axis " + std::to_string(a) + ")");
  }
  return ok();
}

// Every input of an attention-like op (q, k, optional v, additional kv, rpb) decoded and checked.
// Pass nullptr for v / add_v when the op has none. `rpb_is_grad` selects the drpb [B, H, ...] layout.
inline ffi::Error decode_attention(Problem& p, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                   const ffi::AnyBuffer* v, const ffi::AnyBuffer& add_k,
                                   const ffi::AnyBuffer* add_v, const ffi::AnyBuffer& rpb,
                                   bool rpb_is_grad, I64Span kernel_size, I64Span stride,
                                   I64Span dilation, I64Span is_causal) {
  NATTEN_TRY(check_float("query", q));
  NATTEN_TRY(decode_query_like(p, "query", q, p.dim));
  int64_t key_dim = 0;
  NATTEN_TRY(decode_kv_like(p, "key", k, key_dim));
  if (key_dim != p.dim)
    return invalid("key head_dim (" + std::to_string(key_dim) + ") must equal query head_dim (" +
                   std::to_string(p.dim) + ")");
  NATTEN_TRY(check_dtype("key", k, q.element_type()));
  NATTEN_TRY(decode_additional(p, "additional_keys", add_k, p.dim));
  NATTEN_TRY(check_dtype("additional_keys", add_k, q.element_type()));
  if (v != nullptr) {
    NATTEN_TRY(check_rank("value", *v, 6));
    p.dim_v = v->dimensions()[5];
    NATTEN_TRY(check_shape("value", *v, {p.batch, p.extent[0], p.extent[1], p.extent[2],
                                         p.kv_heads, p.dim_v}));
    NATTEN_TRY(check_dtype("value", *v, q.element_type()));
    NATTEN_TRY(check_shape("additional_values", *add_v, {p.batch, p.additional, p.kv_heads,
                                                         p.dim_v}));
    NATTEN_TRY(check_dtype("additional_values", *add_v, q.element_type()));
  }
  NATTEN_TRY(decode_axes(p, kernel_size, stride, dilation, is_causal));
  return decode_rpb(p, rpb_is_grad ? "rpb gradient" : "rpb", rpb, rpb_is_grad);
}

// The inputs of av: weights [B, X, Y, Z, H, K + S], value, additional values.
inline ffi::Error decode_av(Problem& p, const ffi::AnyBuffer& w, const ffi::AnyBuffer& v,
                            const ffi::AnyBuffer& add_v, I64Span kernel_size, I64Span stride,
                            I64Span dilation, I64Span is_causal) {
  NATTEN_TRY(check_float("weights", w));
  NATTEN_TRY(check_float("value", v));
  int64_t slots = 0;
  NATTEN_TRY(decode_query_like(p, "weights", w, slots));
  NATTEN_TRY(decode_kv_like(p, "value", v, p.dim_v));
  NATTEN_TRY(decode_additional(p, "additional_values", add_v, p.dim_v));
  NATTEN_TRY(check_dtype("additional_values", add_v, v.element_type()));
  NATTEN_TRY(decode_axes(p, kernel_size, stride, dilation, is_causal));
  if (slots != p.slots())
    return invalid("weights must have prod(kernel_size) + additional = " +
                   std::to_string(p.slots()) + " entries per query, got " + std::to_string(slots));
  return ok();
}

// Appends the four window attributes that every handler takes after its buffers, in this order.
template <typename Binding>
auto bind_window_attrs(Binding&& binding) {
  return std::move(binding)
      .template Attr<I64Span>("kernel_size")
      .template Attr<I64Span>("stride")
      .template Attr<I64Span>("dilation")
      .template Attr<I64Span>("is_causal");
}

// The binding of a handler that takes `Args` buffers, returns `Rets` buffers, then takes the window
// attributes: the buffers' order and meaning are those of the handler function's parameters.
// (Parenthesize it inside XLA_FFI_DEFINE_HANDLER_SYMBOL: the macro would split on the comma.)
template <int Args, int Rets, typename Binding>
auto bind_buffers(Binding&& binding) {
  if constexpr (Args > 0)
    return bind_buffers<Args - 1, Rets>(std::move(binding).template Arg<ffi::AnyBuffer>());
  else if constexpr (Rets > 0)
    return bind_buffers<0, Rets - 1>(std::move(binding).template Ret<ffi::AnyBuffer>());
  else
    return bind_window_attrs(std::move(binding));
}

template <int Args, int Rets>
auto bind_handler() {
  return bind_buffers<Args, Rets>(ffi::Ffi::Bind());
}

// Shape and dtype of an output (or a cotangent input) that must mirror a given layout.
inline ffi::Error check_like(const char* name, const ffi::AnyBuffer& buf, ffi::DataType dtype,
                             std::initializer_list<int64_t> shape) {
  NATTEN_TRY(check_shape(name, buf, shape));
  return check_dtype(name, buf, dtype);
}

}  // namespace natten
