// Building blocks of the host (CPU) kernels: f32 views of buffers, the neighborhood of a query as a
// list of keys, the per-query-row arithmetic shared by forward and backward, and a thread splitter.
// All arithmetic is f32, whatever the buffer dtype.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "natten/ffi_helpers.h"

namespace natten::cpu {

// An input buffer as f32: the buffer itself when it is f32, else a converted copy.
class InputF32 {
 public:
  explicit InputF32(const ffi::AnyBuffer& buf);
  const float* data() const { return data_; }

 private:
  std::vector<float> copy_;
  const float* data_;
};

// An output buffer computed in f32: written in place when it is f32, else in a scratch copy that
// commit() rounds into the buffer. Every element starts at `fill`: the value a kernel leaves where it
// writes nothing on purpose (0 for sums, -inf for masked logits), or kUnwritten for outputs the
// kernel must overwrite everywhere, so that a missed element shows as NaN in the tests.
inline constexpr float kUnwritten = std::numeric_limits<float>::quiet_NaN();

class OutputF32 {
 public:
  OutputF32(ffi::AnyBuffer buf, float fill);
  float* data() { return data_; }
  void commit();

 private:
  ffi::AnyBuffer buf_;
  std::vector<float> copy_;
  float* data_;
};

// A row-major [B, tokens, heads, dim] array seen as rows of `dim` values.
template <typename T>
struct Rows {
  T* data;
  int64_t tokens, heads, dim;
  T* operator()(int64_t b, int64_t token, int64_t head) const {
    return data + ((b * tokens + token) * heads + head) * dim;
  }
};

// One key attended by a query: its entry (`slot`) in the [K + S] weights row, where it lives (a
// window token, or additional key number `token`), and its offset in one head's rpb table (-1 for
// additional keys, which take no bias).
struct KeyRef {
  int64_t slot;
  int64_t token;
  int64_t rpb;
  bool additional;
};

// Keys and values of one problem: window rows [B, X*Y*Z, KVH, dim] and additional rows [B, S, KVH, dim].
template <typename T>
struct KeyRows {
  Rows<T> window, additional;
  T* operator()(int64_t b, const KeyRef& key, int64_t kv_head) const {
    return key.additional ? additional(b, key.token, kv_head) : window(b, key.token, kv_head);
  }
};

template <typename T>
KeyRows<T> key_rows(const Problem& p, T* window, T* additional, int64_t dim) {
  return {{window, p.tokens(), p.kv_heads, dim}, {additional, p.additional, p.kv_heads, dim}};
}

// The keys attended by query token `token` (flat over X, Y, Z), in slot order: the valid window
// offsets (row-major over kx, ky, kz; causal windows skip offsets past the query), then the
// additional keys. Same for every batch and head.
void neighborhood(const Problem& p, int64_t token, std::vector<KeyRef>& keys);

// Splits [0, tasks) into contiguous ranges run on up to hardware_concurrency() threads; small jobs
// (total `work` in flops) stay on the calling thread. Exceptions reach the caller.
void parallel_for(int64_t tasks, double work, const std::function<void(int64_t, int64_t)>& body);

// Runs a handler body, turning a C++ exception (e.g. out of memory) into an ffi::Error.
ffi::Error guarded(const std::function<ffi::Error()>& body);

// ---- Traversals: who computes which query rows --------------------------------------------------

// Per-thread scratch for one query row: two vectors of one entry per slot.
struct RowScratch {
  std::vector<KeyRef> keys;
  std::vector<float> a, b;
  explicit RowScratch(const Problem& p) : a(p.slots()), b(p.slots()) { keys.reserve(p.slots()); }
};

inline double row_work(const Problem& p) {  // flops of all query rows, to size the thread count
  return 2.0 * p.batch * p.tokens() * p.heads * p.slots() * (p.dim + p.dim_v + 1);
}

// Calls visit(b, token, h, kv_head, scratch) for every query row, scratch.keys holding the row's
// neighborhood. For forward ops, whose rows are independent: (batch, token) pairs are split across
// threads.
template <typename Visit>
void for_each_row(const Problem& p, Visit&& visit) {
  parallel_for(p.batch * p.tokens(), row_work(p), [&](int64_t begin, int64_t end) {
    RowScratch scratch(p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.tokens(), token = task % p.tokens();
      neighborhood(p, token, scratch.keys);
      for (int64_t h = 0; h < p.heads; ++h) visit(b, token, h, h / p.head_group(), scratch);
    }
  });
}

// The same visit for backward ops, whose key/value gradients sum over many queries: each thread
// owns whole (batch, kv head) pairs, so every gradient slice it adds to (dk, dv, additional kv of
// that pair; drpb of that batch and its query heads) is its own, and sums run in a fixed order: no
// races, deterministic results.
template <typename Visit>
void for_each_row_by_kv_head(const Problem& p, Visit&& visit) {
  parallel_for(p.batch * p.kv_heads, row_work(p), [&](int64_t begin, int64_t end) {
    RowScratch scratch(p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.kv_heads, kv_head = task % p.kv_heads;
      for (int64_t token = 0; token < p.tokens(); ++token) {
        neighborhood(p, token, scratch.keys);
        for (int64_t h = kv_head * p.head_group(); h < (kv_head + 1) * p.head_group(); ++h)
          visit(b, token, h, kv_head, scratch);
      }
    }
  });
}

// ---- Per-query-row arithmetic, shared by the fused and the unfused ops -------------------------

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// scores[i] = scale * q . k_i + rpb_head[rpb_i] (no bias where rpb_head is null).
inline void score_row(const float* q, const KeyRows<const float>& k, int64_t b, int64_t kv_head,
                      int64_t dim, const std::vector<KeyRef>& keys, float scale,
                      const float* rpb_head, float* scores) {
  for (size_t i = 0; i < keys.size(); ++i) {
    scores[i] = scale * dot(q, k(b, keys[i], kv_head), dim);
    if (rpb_head != nullptr && !keys[i].additional) scores[i] += rpb_head[keys[i].rpb];
  }
}

// Turns scores into softmax probabilities in place (max-subtracted); returns log(sum(exp(scores))).
inline float softmax(float* scores, size_t n) {
  float max_score = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n; ++i) max_score = std::max(max_score, scores[i]);
  float sum = 0.f;
  for (size_t i = 0; i < n; ++i) sum += scores[i] = std::exp(scores[i] - max_score);
  for (size_t i = 0; i < n; ++i) scores[i] /= sum;
  return max_score + std::log(sum);
}

// Backward of softmax (and of its log-sum-exp, whose cotangent is dlse), in place:
// grads[i] = probs[i] * (grads[i] - sum_j probs[j] grads[j] + dlse), grads[] holding dP on entry.
// The difference dP_i - sum_j P_j dP_j is formed relative to the entry m of the largest weight,
// (dP_i - dP_m) - sum_{j != m} P_j (dP_j - dP_m), which is the same number (the weights sum to 1)
// without the cancellation that loses it to f32 rounding near one-hot rows
// (jax_natten/_softmax.py).
inline void softmax_backward(const float* probs, float* grads, size_t n, float dlse) {
  if (n == 0) return;
  const size_t m = static_cast<size_t>(std::max_element(probs, probs + n) - probs);
  const float ref = grads[m];
  float r = 0.f;
  for (size_t i = 0; i < n; ++i) r += probs[i] * (grads[i] - ref);
  for (size_t i = 0; i < n; ++i) grads[i] = probs[i] * ((grads[i] - ref) - r + dlse);
}

// out = sum_i weights[i] * v_i (out is overwritten).
inline void weighted_sum(const float* weights, const KeyRows<const float>& v, int64_t b,
                         int64_t kv_head, int64_t dim_v, const std::vector<KeyRef>& keys,
                         float* out) {
  for (int64_t c = 0; c < dim_v; ++c) out[c] = 0.f;
  for (size_t i = 0; i < keys.size(); ++i) axpy(weights[i], v(b, keys[i], kv_head), out, dim_v);
}

// Backward of weighted_sum: dweights[i] = dout . v_i and dv_i += weights[i] * dout.
inline void weighted_sum_backward(const float* weights, const float* dout,
                                  const KeyRows<const float>& v, const KeyRows<float>& dv,
                                  int64_t b, int64_t kv_head, int64_t dim_v,
                                  const std::vector<KeyRef>& keys, float* dweights) {
  for (size_t i = 0; i < keys.size(); ++i) {
    dweights[i] = dot(dout, v(b, keys[i], kv_head), dim_v);
    axpy(weights[i], dout, dv(b, keys[i], kv_head), dim_v);
  }
}

// Backward of score_row given dscores: dq = scale * sum_i ds_i k_i (dq is overwritten),
// dk_i += scale * ds_i q, drpb_head[rpb_i] += ds_i (where drpb_head is not null).
inline void score_row_backward(const float* q, const float* dscores, const KeyRows<const float>& k,
                               const KeyRows<float>& dk, int64_t b, int64_t kv_head, int64_t dim,
                               const std::vector<KeyRef>& keys, float scale, float* dq,
                               float* drpb_head) {
  for (int64_t c = 0; c < dim; ++c) dq[c] = 0.f;
  for (size_t i = 0; i < keys.size(); ++i) {
    axpy(scale * dscores[i], k(b, keys[i], kv_head), dq, dim);
    axpy(scale * dscores[i], q, dk(b, keys[i], kv_head), dim);
    if (drpb_head != nullptr && !keys[i].additional) drpb_head[keys[i].rpb] += dscores[i];
  }
}

}  // namespace natten::cpu
