// Row-wise steps around the FNA backward kernels (fna.cuh): delta before them, and the float32 dq
// workspace of the single-walk schedule converted after it. Both are memory-bound grid-stride
// loops over 16-byte vectors (D and Dv are multiples of 8).
#include "fna.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace fna {
namespace {

// delta = rowsum(do * o32) - dlse: one thread per query row (B * N * H rows of Dv elements). o32
// is the forward's output before rounding: near one-hot rows, where dP - delta is a small
// difference, the rounded o would cost eps(T) |do| |o| of it.
template <typename T>
__global__ void fna_delta_kernel(const float* o32, const T* d_o, const float* dlse, float* delta,
                                 int64_t rows, int dim_v) {
  constexpr int kVec = 16 / sizeof(T);  // elements of do per 16-byte load
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < rows;
       r += int64_t{gridDim.x} * blockDim.x) {
    const float* a = o32 + r * dim_v;
    const T* b = d_o + r * dim_v;
    float sum = 0.f;
    for (int c = 0; c < dim_v; c += kVec) {
      const uint4 vb = __ldg(reinterpret_cast<const uint4*>(b + c));
      const T* eb = reinterpret_cast<const T*>(&vb);
#pragma unroll
      for (int e = 0; e < kVec; e += 4) {
        const float4 va = __ldg(reinterpret_cast<const float4*>(a + c + e));
        sum = fmaf(va.x, static_cast<float>(eb[e]), sum);
        sum = fmaf(va.y, static_cast<float>(eb[e + 1]), sum);
        sum = fmaf(va.z, static_cast<float>(eb[e + 2]), sum);
        sum = fmaf(va.w, static_cast<float>(eb[e + 3]), sum);
      }
    }
    delta[r] = sum - dlse[r];
  }
}

// dq = T(scale * acc), 8 elements a thread.
template <typename T>
__global__ void fna_dq_convert_kernel(const float* acc, T* dq, int64_t vecs, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < vecs;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float4 x = __ldg(reinterpret_cast<const float4*>(acc) + 2 * i);
    const float4 y = __ldg(reinterpret_cast<const float4*>(acc) + 2 * i + 1);
    uint4 u;
    u.x = pack2<T>(x.x * scale, x.y * scale);
    u.y = pack2<T>(x.z * scale, x.w * scale);
    u.z = pack2<T>(y.x * scale, y.y * scale);
    u.w = pack2<T>(y.z * scale, y.w * scale);
    reinterpret_cast<uint4*>(dq)[i] = u;
  }
}

template <typename T>
ffi::Error launch_delta(cudaStream_t stream, const FnaArgs& a, const FnaPtrs& p, int64_t batch) {
  const int64_t rows = batch * a.tokens * a.heads;
  fna_delta_kernel<T><<<grid_for(rows, 256), 256, 0, stream>>>(
      p.o32, static_cast<const T*>(p.d_o), p.dlse, p.delta, rows, a.dim_v);
  return check_launch("fna backward (delta)");
}

}  // namespace

ffi::Error launch_backward_delta(cudaStream_t stream, ffi::DataType t, const FnaArgs& a,
                                 const FnaPtrs& p, int64_t batch) {
  if (t == ffi::DataType::F32) return launch_delta<float>(stream, a, p, batch);
  return dispatch_tile(t, 32, [&](auto tag, auto) {
    return launch_delta<typename decltype(tag)::type>(stream, a, p, batch);
  });
}

ffi::Error launch_backward_dq_convert(cudaStream_t stream, ffi::DataType t, const FnaArgs& a,
                                      const FnaPtrs& p, int64_t batch) {
  const int64_t vecs = batch * a.tokens * a.heads * a.dim / 8;
  return dispatch_tile(t, 32, [&](auto tag, auto) {
    using T = typename decltype(tag)::type;
    fna_dq_convert_kernel<T><<<grid_for(vecs, 256), 256, 0, stream>>>(
        p.dq_acc, static_cast<T*>(p.dq), vecs, a.scale);
    return check_launch("fna backward (dq convert)");
  });
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
