// IN launcher (qk_bwd dk, av_bwd dv): see gemm.cuh.
#include "gemm.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace gemm {

ffi::Error launch_in(cudaStream_t stream, ffi::DataType t, const Problem& p, int64_t dim,
                     const void* w, ffi::DataType w_t, const void* a, void* out) {
  GemmArgs g;
  NATTEN_TRY(make_gemm_args(p, dim, /*chunk_dim=*/dim, dtype_code(w_t), g));
  unsigned grid;
  NATTEN_TRY(grid_of(p.batch * p.kv_heads * g.tiles * g.chunks, grid));
  if (grid == 0) return ok();
  return dispatch_float(t, [&](auto tag) -> ffi::Error {
    using T = typename decltype(tag)::type;
    in_kernel<T><<<grid, kCtaThreads, 0, stream>>>(g, w, static_cast<const T*>(a),
                                                   static_cast<T*>(out));
    return check_launch("gemm in_kernel");
  });
}

}  // namespace gemm
}  // namespace gpu
}  // namespace natten
