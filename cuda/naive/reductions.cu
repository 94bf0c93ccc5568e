// The reductions of the backward ops that the naive and the gemm handlers share (declared in
// kernels.cuh): the additional-token gradients and the rpb gradient, in a fixed order (no atomics).
// One file, so each kernel instance is compiled once.
#include "kernels.cuh"

namespace natten {
namespace gpu {
namespace naive {

// qk_bwd: dadd_k from dw and q (dtype t), and drpb when the call has a bias.
ffi::Error launch_qk_bwd_reductions(cudaStream_t stream, const Params& p, ffi::DataType t,
                                    bool has_rpb, const void* dw, const void* q, void* dadd_k,
                                    float* drpb) {
  return dispatch_float(t, [&](auto tag) -> ffi::Error {
    using T = typename decltype(tag)::type;
    NATTEN_TRY((launch_additional_reduce<T, T, T>(stream, p, dw, q, dadd_k)));
    if (has_rpb) NATTEN_TRY(launch_rpb_grad<T>(stream, p, dw, drpb));
    return ok();
  });
}

// av_bwd: dadd_v from w (dtype wt) and do (dtype vt).
ffi::Error launch_av_bwd_reduction(cudaStream_t stream, const Params& p, ffi::DataType wt,
                                   ffi::DataType vt, const void* w, const void* d_o, void* dadd_v) {
  return dispatch_float(wt, [&](auto wtag) -> ffi::Error {
    return dispatch_float(vt, [&](auto vtag) -> ffi::Error {
      using TW = typename decltype(wtag)::type;
      using TV = typename decltype(vtag)::type;
      return launch_additional_reduce<TW, TV, TV>(stream, p, w, d_o, dadd_v);
    });
  });
}

}  // namespace naive
}  // namespace gpu
}  // namespace natten
