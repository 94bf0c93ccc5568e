// PN launcher (qk_fwd, av_bwd dw): see gemm.cuh.
#include "gemm.cuh"
#include "launch.h"

namespace natten {
namespace gpu {
namespace gemm {

ffi::Error launch_pn(cudaStream_t stream, ffi::DataType t, const Problem& p, int64_t dim,
                     const void* a, const void* kv, const void* add_kv, const float* rpb,
                     void* out, ffi::DataType out_t, float fill) {
  GemmArgs g;
  NATTEN_TRY(make_gemm_args(p, dim, /*chunk_dim=*/kBN, dtype_code(out_t), g));
  unsigned grid;
  NATTEN_TRY(grid_of(p.batch * p.heads * g.tiles, grid));
  if (grid == 0 || g.p.W == 0) return ok();
  return dispatch_float(t, [&](auto tag) -> ffi::Error {
    using T = typename decltype(tag)::type;
    pn_kernel<T><<<grid, kCtaThreads, 0, stream>>>(
        g, static_cast<const T*>(a), static_cast<const T*>(kv), static_cast<const T*>(add_kv), rpb,
        out, fill);
    return check_launch("gemm pn_kernel");
  });
}

}  // namespace gemm
}  // namespace gpu
}  // namespace natten
