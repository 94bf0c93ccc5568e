// Host entry points of the GEMM-based kernels, defined next to their kernels in pn.cu, nn.cu and
// in.cu (gemm.cuh describes the three products). The handlers (handlers.cu) validate first; these
// build the tiling, dispatch on the compute dtype and launch (gpu::launch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "natten/ffi_helpers.h"
#include "natten/limits.h"

namespace natten {
namespace gpu {
namespace gemm {

// Head dims the kernels serve: rows move as 16-byte vectors, so dim % 8 == 0 (any dtype).
inline ffi::Error check_head_dim(const char* what, int64_t dim) {
  if (dim % limits::kGemmHeadDimMultiple == 0) return ok();
  return invalid(std::string("the gemm backend supports ") + what +
                 " head_dim that is a multiple of 8 (8, 16, 24, ..., any size), got " +
                 std::to_string(dim));
}

// PN: out[b, n, h, t] = a[b, n, h, :] . kv[b, nbr_t(n), h / G, :] (+ rpb), additional slots from
// add_kv, `fill` past a causal query. `t` is the dtype of a / kv / add_kv; out has `out_t`.
ffi::Error launch_pn(cudaStream_t stream, ffi::DataType t, const Problem& p, int64_t dim,
                     const void* a, const void* kv, const void* add_kv, const float* rpb,
                     void* out, ffi::DataType out_t, float fill);

// NN: out[b, n, h, :] = sum_t w[b, n, h, t] kv[b, nbr_t(n), h / G, :] (+ additional). w has
// `w_t`; kv, add_kv and out have `t`.
ffi::Error launch_nn(cudaStream_t stream, ffi::DataType t, const Problem& p, int64_t dim,
                     const void* w, ffi::DataType w_t, const void* kv, const void* add_kv,
                     void* out);

// IN: out[b, j, kvh, :] = sum over queries c holding key j and heads h of kvh of
// w[b, c, h, t(c, j)] a[b, c, h, :]. w has `w_t`; a and out have `t`.
ffi::Error launch_in(cudaStream_t stream, ffi::DataType t, const Problem& p, int64_t dim,
                     const void* w, ffi::DataType w_t, const void* a, void* out);

}  // namespace gemm
}  // namespace gpu
}  // namespace natten
