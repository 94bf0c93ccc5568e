#include "common.h"

#include <algorithm>
#include <exception>
#include <new>
#include <thread>

#include "natten/half.h"

namespace natten::cpu {

InputF32::InputF32(const ffi::AnyBuffer& buf) {
  const size_t n = buf.element_count();
  switch (buf.element_type()) {
    case ffi::DataType::F32:
      data_ = static_cast<const float*>(buf.untyped_data());
      return;
    case ffi::DataType::F16: {
      const uint16_t* src = static_cast<const uint16_t*>(buf.untyped_data());
      copy_.resize(n);
      for (size_t i = 0; i < n; ++i) copy_[i] = f16_to_float(src[i]);
      break;
    }
    default: {  // BF16: the handlers' dtype checks admit nothing else
      const uint16_t* src = static_cast<const uint16_t*>(buf.untyped_data());
      copy_.resize(n);
      for (size_t i = 0; i < n; ++i) copy_[i] = bf16_to_float(src[i]);
      break;
    }
  }
  data_ = copy_.data();
}

OutputF32::OutputF32(ffi::AnyBuffer buf, float fill) : buf_(buf) {
  const size_t n = buf.element_count();
  if (buf.element_type() == ffi::DataType::F32) {
    data_ = static_cast<float*>(buf.untyped_data());
  } else {
    copy_.resize(n);
    data_ = copy_.data();
  }
  std::fill(data_, data_ + n, fill);
}

void OutputF32::commit() {
  if (buf_.element_type() == ffi::DataType::F32) return;
  uint16_t* dst = static_cast<uint16_t*>(buf_.untyped_data());
  const bool f16 = buf_.element_type() == ffi::DataType::F16;
  for (size_t i = 0; i < copy_.size(); ++i)
    dst[i] = f16 ? float_to_f16(copy_[i]) : float_to_bf16(copy_[i]);
}

void neighborhood(const Problem& p, int64_t token, std::vector<KeyRef>& keys) {
  keys.clear();
  const int64_t coord[kMaxRank] = {token / (p.extent[1] * p.extent[2]),
                                   token / p.extent[2] % p.extent[1], token % p.extent[2]};
  AxisWindow w[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) w[a] = axis_window(p.axis[a], static_cast<int>(coord[a]));
  const int64_t k1 = p.axis[1].kernel, k2 = p.axis[2].kernel;
  const int64_t r1 = p.rpb_extent(1), r2 = p.rpb_extent(2);
  for (int64_t tx = 0; tx < w[0].count; ++tx) {
    const int64_t kx = w[0].start + tx * w[0].step;
    for (int64_t ty = 0; ty < w[1].count; ++ty) {
      const int64_t ky = w[1].start + ty * w[1].step;
      for (int64_t tz = 0; tz < w[2].count; ++tz) {
        const int64_t kz = w[2].start + tz * w[2].step;
        KeyRef key;
        key.slot = (tx * k1 + ty) * k2 + tz;
        key.token = (kx * p.extent[1] + ky) * p.extent[2] + kz;
        key.rpb = ((w[0].rpb0 + tx) * r1 + (w[1].rpb0 + ty)) * r2 + (w[2].rpb0 + tz);
        key.additional = false;
        keys.push_back(key);
      }
    }
  }
  for (int64_t s = 0; s < p.additional; ++s) keys.push_back({p.kernel_volume() + s, s, -1, true});
}

void parallel_for(int64_t tasks, double work, const std::function<void(int64_t, int64_t)>& body) {
  constexpr double kMinWorkPerThread = 1 << 20;  // below ~1 Mflop a thread costs more than it saves
  const int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
  const int64_t by_work = static_cast<int64_t>(work / kMinWorkPerThread);
  const int64_t threads = std::max<int64_t>(1, std::min({hardware, tasks, by_work}));
  if (threads <= 1) {
    if (tasks > 0) body(0, tasks);
    return;
  }
  // Thread t takes tasks [t * tasks / threads, (t + 1) * tasks / threads); the caller runs the last.
  std::vector<std::exception_ptr> errors(threads);
  auto run = [&](int64_t t) {
    try {
      body(t * tasks / threads, (t + 1) * tasks / threads);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);  // so that no push can throw once a thread runs
  int64_t t = 0;
  try {
    for (; t < threads - 1; ++t) pool.emplace_back(run, t);
  } catch (const std::system_error&) {
    // No more threads to be had: the calling thread runs what is left.
  }
  for (int64_t rest = t; rest < threads; ++rest) run(rest);
  for (std::thread& thread : pool) thread.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

ffi::Error guarded(const std::function<ffi::Error()>& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "natten: out of host memory");
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("natten: ") + e.what());
  }
}

}  // namespace natten::cpu
