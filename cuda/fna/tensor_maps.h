// Host side of the TMA-fed kernels (forward_tma.cu, forward_ws.cu and backward.cu's TMA
// variants): the tensor maps that describe their operands to the tensor memory accelerator. A
// map is a 128-byte descriptor the driver encodes on the host; it is passed to the kernel as a
// __grid_constant__ parameter. The encoder comes from the driver through the runtime
// (cudaGetDriverEntryPointByVersion), so nothing links against libcuda.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (types only)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

#include <cuda_bf16.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>

#include "args.cuh"
#include "natten/ffi_helpers.h"

namespace natten {
namespace gpu {
namespace fna {

// The maps of one forward call, and of the backward's query side (q and do).
struct TmaMaps {
  CUtensorMap q, k, v;
};
// The box kernels' (forward_ws.cu kTma, backward_dq_tma.cu, backward.cu kTma): q, k, v (and for
// the backward do, and the float32 dq workspace the single walk reduce-adds to) of each dilation
// group (x, y, z) of the problem, group (gx dy + gy) dz + gz.
constexpr int kMaxTmaGroups = 4;
struct BoxTmaMaps {
  CUtensorMap q[kMaxTmaGroups], k[kMaxTmaGroups], v[kMaxTmaGroups], d_o[kMaxTmaGroups],
      dq[kMaxTmaGroups];
};
struct BwdTmaMaps {
  CUtensorMap q, d_o, k, v, dq;  // dq: the float32 workspace the dq tiles are reduce-added to
};

// The map element type of the kernels' 16-bit operand type T.
template <typename T>
constexpr CUtensorMapDataType tma_type() {
  return std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                          : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// A 5-D map (sizes and byte strides innermost first, `box` extents) with 128-byte swizzle: the
// layout the wgmma descriptors expect (natten/wgmma.cuh smem_desc_sw128), boxes 128 bytes wide
// (64 16-bit elements, 32 floats); a tile of more head dims is several boxes side by side.
// Elements outside the tensor are zero-filled on loads and skipped on reduces.
inline ffi::Error encode_map(CUtensorMap& map, const void* base, CUtensorMapDataType type,
                             const cuuint64_t (&dims)[5], const cuuint64_t (&strides)[4],
                             const cuuint32_t (&box)[5]) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  static cudaError_t found = cudaSuccess;
  static std::once_flag once;
  std::call_once(once, [] {
    cudaDriverEntryPointQueryResult status;
    found = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled",
                                             reinterpret_cast<void**>(&encode), 12000,
                                             cudaEnableDefault, &status);
    if (found == cudaSuccess && status != cudaDriverEntryPointSuccess)
      found = cudaErrorNotSupported;
  });
  if (found != cudaSuccess || encode == nullptr)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("natten: the driver has no cuTensorMapEncodeTiled: ") +
                          cudaGetErrorString(found));
  const cuuint32_t unit[5] = {1, 1, 1, 1, 1};
  const CUresult r = encode(&map, type, 5, const_cast<void*>(base), dims, strides, box, unit,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "natten: cuTensorMapEncodeTiled failed (CUresult " + std::to_string(r) + ")");
  return ffi::Error::Success();
}

inline cuuint64_t element_bytes(CUtensorMapDataType type) {
  return type == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 ? 4 : 2;
}

// A 1-D problem's [batch, L, heads, dim] tensor (16-bit elements, or float32) as the 5-D tensor
// the kernels read (or reduce-add) boxes of: (dim, heads, dilation group, local index, batch).
// Token x = group + local * dilation, so the dilation groups are strided views and a box of
// `rows` consecutive local indices of one group is one key or query tile. Needs L % dilation ==
// 0 (every group then has L / dilation tokens and the map's bounds are exactly the group's).
inline ffi::Error encode_token_map(CUtensorMap& map, const void* base, CUtensorMapDataType type,
                                   int64_t batch, int64_t length, int64_t heads, int64_t dim,
                                   int dilation, int rows) {
  const cuuint64_t elem = element_bytes(type);
  const cuuint64_t dims[5] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(dilation),
                              static_cast<cuuint64_t>(length / dilation),
                              static_cast<cuuint64_t>(batch)};
  const cuuint64_t row = static_cast<cuuint64_t>(heads * dim) * elem;  // bytes per token
  const cuuint64_t strides[4] = {static_cast<cuuint64_t>(dim) * elem, row,
                                 row * static_cast<cuuint64_t>(dilation),
                                 row * static_cast<cuuint64_t>(length)};
  const cuuint32_t box[5] = {static_cast<cuuint32_t>(128 / elem), 1, 1,
                             static_cast<cuuint32_t>(rows), 1};
  return encode_map(map, base, type, dims, strides, box);
}

// A [batch, X, Y, Z, heads, dim] tensor, dilation group (gx, gy, gz) of it, as the 5-D tensor
// (dim, heads, local z, local y, batch x local x): the group's token (x, y, z) = (gx + dx lx,
// gy + dy ly, gz + dz lz), so the base moves to the group's first token and the local axes
// stride by the dilations; batch and local x fold into one axis (coordinate b X / dx + lx: with
// X % dx == 0 consecutive batch elements continue the same stride). Needs every axis divisible by
// its dilation (every group then spans the map's bounds on z and y exactly), and boxes that do
// not cross from one batch element into the next along x (the kernel's tiles: tiling.h
// forward_on_box_tma). Boxes: 64 columns x 1 head x box_z x box_y x box_x, 128-byte swizzle.
inline ffi::Error encode_group_map(CUtensorMap& map, const void* base, CUtensorMapDataType type,
                                   int64_t batch, const FnaArgs& a, int64_t heads, int64_t dim,
                                   int gx, int gy, int gz, int box_z, int box_y, int box_x) {
  const cuuint64_t elem = element_bytes(type);
  const int dx = a.ax[0].dilation, dy = a.ax[1].dilation, dz = a.ax[2].dilation;
  const cuuint64_t row = static_cast<cuuint64_t>(heads * dim) * elem;  // bytes per token
  const int64_t first_token = (static_cast<int64_t>(gx) * a.Y + gy) * a.Z + gz;
  const char* first = static_cast<const char*>(base) + first_token * row;
  const cuuint64_t dims[5] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(a.ax[2].length / dz),
                              static_cast<cuuint64_t>(a.ax[1].length / dy),
                              static_cast<cuuint64_t>(batch * (a.ax[0].length / dx))};
  const cuuint64_t strides[4] = {static_cast<cuuint64_t>(dim) * elem, row * dz,
                                 row * dy * static_cast<cuuint64_t>(a.Z),
                                 row * dx * static_cast<cuuint64_t>(a.Y) * a.Z};
  const cuuint32_t box[5] = {static_cast<cuuint32_t>(128 / elem), 1,
                             static_cast<cuuint32_t>(box_z), static_cast<cuuint32_t>(box_y),
                             static_cast<cuuint32_t>(box_x)};
  return encode_map(map, first, type, dims, strides, box);
}

// Every dilation group's maps of a box kernel's call: q (and with `grad` do, and the dq workspace
// where p.dq_acc is set: 32-float boxes) in boxes of the query tile (a.qlog), k and v in boxes of
// the key tile (a.kvlog); batch_total elements.
inline ffi::Error encode_box_maps(BoxTmaMaps& maps, const FnaPtrs& p, CUtensorMapDataType type,
                                  int64_t batch_total, const FnaArgs& a, bool grad) {
  const int dx = a.ax[0].dilation, dy = a.ax[1].dilation, dz = a.ax[2].dilation;
  const int qz = 1 << a.qlog[2], qy = 1 << a.qlog[1], qx = 1 << a.qlog[0];
  const int kz = 1 << a.kvlog[2], ky = 1 << a.kvlog[1], kx = 1 << a.kvlog[0];
  for (int gx = 0; gx < dx; ++gx)
    for (int gy = 0; gy < dy; ++gy)
      for (int gz = 0; gz < dz; ++gz) {
        const int g = (gx * dy + gy) * dz + gz;
        NATTEN_TRY(encode_group_map(maps.q[g], p.q, type, batch_total, a, a.heads, a.dim, gx, gy,
                                    gz, qz, qy, qx));
        if (grad)
          NATTEN_TRY(encode_group_map(maps.d_o[g], p.d_o, type, batch_total, a, a.heads,
                                      a.dim_v, gx, gy, gz, qz, qy, qx));
        if (grad && p.dq_acc != nullptr)
          NATTEN_TRY(encode_group_map(maps.dq[g], p.dq_acc, CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
                                      batch_total, a, a.heads, a.dim, gx, gy, gz, qz, qy, qx));
        NATTEN_TRY(encode_group_map(maps.k[g], p.k, type, batch_total, a, a.kv_heads, a.dim, gx,
                                    gy, gz, kz, ky, kx));
        NATTEN_TRY(encode_group_map(maps.v[g], p.v, type, batch_total, a, a.kv_heads, a.dim_v,
                                    gx, gy, gz, kz, ky, kx));
      }
  return ok();
}

}  // namespace fna
}  // namespace gpu
}  // namespace natten
