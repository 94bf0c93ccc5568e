// The Python extension `jax_natten._natten_ext`: the one table of FFI handlers this library
// registers with XLA. Python calls registrations() and hands each capsule to
// jax.ffi.register_ffi_target(name, capsule, platform=platform).
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "fna/tiling.h"  // host-only: the fused kernels' tile choice, exposed for tests
#include "natten/cpu_handlers.h"
#include "natten/limits.h"
#include "natten/tile_mask.h"
#include "natten/window.h"
#ifdef JAX_NATTEN_WITH_CUDA
#include "natten/cuda_handlers.h"
#endif

namespace nb = nanobind;

namespace {

struct Entry {
  const char* target;    // FFI target name, natten_<backend>_<op>
  const char* platform;  // "cpu" or "CUDA"
  XLA_FFI_Handler* handler;
};

const Entry kEntries[] = {
    {"natten_cpu_fna_fwd", "cpu", NattenCpuFnaFwd},
    {"natten_cpu_fna_bwd", "cpu", NattenCpuFnaBwd},
    {"natten_cpu_qk_fwd", "cpu", NattenCpuQkFwd},
    {"natten_cpu_qk_bwd", "cpu", NattenCpuQkBwd},
    {"natten_cpu_av_fwd", "cpu", NattenCpuAvFwd},
    {"natten_cpu_av_bwd", "cpu", NattenCpuAvBwd},
#ifdef JAX_NATTEN_WITH_CUDA
    {"natten_naive_qk_fwd", "CUDA", NattenNaiveQkFwd},
    {"natten_naive_qk_bwd", "CUDA", NattenNaiveQkBwd},
    {"natten_naive_av_fwd", "CUDA", NattenNaiveAvFwd},
    {"natten_naive_av_bwd", "CUDA", NattenNaiveAvBwd},
    {"natten_gemm_qk_fwd", "CUDA", NattenGemmQkFwd},
    {"natten_gemm_qk_bwd", "CUDA", NattenGemmQkBwd},
    {"natten_gemm_av_fwd", "CUDA", NattenGemmAvFwd},
    {"natten_gemm_av_bwd", "CUDA", NattenGemmAvBwd},
    {"natten_fused_fna_fwd", "CUDA", NattenFusedFnaFwd},
    {"natten_fused_fna_bwd", "CUDA", NattenFusedFnaBwd},
#endif
};

// The window math takes these as given; checked here so a test can't divide by zero.
void check_axis(int length, int kernel, int stride, int dilation) {
  if (kernel < 1 || stride < 1 || stride > kernel || dilation < 1 ||
      static_cast<long long>(kernel) * dilation > length)
    throw nb::value_error("need 1 <= stride <= kernel and kernel * dilation <= length");
}

// A padded 3-D problem from per-axis lists (the tiling functions' arguments), checked.
natten::Problem padded_problem(const std::vector<int>& extent, const std::vector<int>& kernel,
                               const std::vector<int>& stride, const std::vector<int>& dilation,
                               const std::vector<bool>& causal) {
  for (const auto* v : {&extent, &kernel, &stride, &dilation})
    if (v->size() != natten::kMaxRank) throw nb::value_error("give 3 entries per axis list");
  if (causal.size() != natten::kMaxRank) throw nb::value_error("give 3 causal flags");
  natten::Problem p;
  for (int a = 0; a < natten::kMaxRank; ++a) {
    check_axis(extent[a], kernel[a], stride[a], dilation[a]);
    p.extent[a] = extent[a];
    p.axis[a] = natten::AxisParams{extent[a], kernel[a], stride[a], dilation[a], causal[a]};
  }
  return p;
}

// (query tile, key tile) log2 extents of a tiling, as Python tuples.
auto tile_logs(const natten::gpu::fna::Tiling& t) {
  return std::make_pair(std::make_tuple(t.qlog[0], t.qlog[1], t.qlog[2]),
                        std::make_tuple(t.kvlog[0], t.kvlog[1], t.kvlog[2]));
}

}  // namespace

NB_MODULE(_natten_ext, m) {
  m.doc() = "jax-natten native kernels (XLA FFI handlers)";

  m.def(
      "registrations",
      [] {
        std::vector<std::tuple<std::string, std::string, nb::capsule>> out;
        for (const Entry& e : kEntries)
          out.emplace_back(e.target, e.platform,
                           nb::capsule(reinterpret_cast<void*>(e.handler)));
        return out;
      },
      "[(target_name, platform, capsule)] for jax.ffi.register_ffi_target.");

  // window.h exposed so tests can check it against jax_natten/_window.py.
  m.def(
      "axis_windows",
      [](int length, int kernel, int stride, int dilation, bool causal) {
        check_axis(length, kernel, stride, dilation);
        const natten::AxisParams axis{length, kernel, stride, dilation, causal};
        std::vector<std::tuple<int, int, int, int>> out;
        for (int x = 0; x < length; ++x) {
          const natten::AxisWindow w = natten::axis_window(axis, x);
          out.emplace_back(w.start, w.count, w.step, w.rpb0);
        }
        return out;
      },
      "[(start, count, step, rpb0)] of natten::axis_window for every query of one axis.");

  m.def(
      "inverse_windows",
      [](int length, int kernel, int stride, bool causal) {
        check_axis(length, kernel, stride, 1);
        std::vector<std::pair<int, int>> out;
        for (int j = 0; j < length; ++j) {
          const natten::QueryRange r = natten::inverse_window(j, length, kernel, stride, causal);
          out.emplace_back(r.first, r.last);
        }
        return out;
      },
      "[(first, last)] of natten::inverse_window for every key of one (undilated) axis.");

  // tile_mask.h exposed so tests can check its bit sets against a per-token test.
  m.def(
      "tile_mask",
      [](std::vector<int> logs, std::vector<int> lo, std::vector<int> hi) {
        if (logs.size() != 3 || lo.size() != 3 || hi.size() != 3)
          throw std::invalid_argument("tile_mask: logs, lo and hi take 3 entries each");
        int l[3], a[3], b[3], sum = 0;
        for (int ax = 0; ax < 3; ++ax) {
          l[ax] = logs[ax];
          a[ax] = lo[ax];
          b[ax] = hi[ax];
          sum += l[ax];
          if (l[ax] < 0 || a[ax] < 0 || a[ax] > b[ax] || b[ax] > (1 << l[ax]))
            throw std::invalid_argument("tile_mask: needs 0 <= lo <= hi <= 2^logs per axis");
        }
        if (sum > 6) throw std::invalid_argument("tile_mask: tiles of at most 64 tokens");
        uint64_t rep[3];
        natten::tile_reps(l, rep);
        return natten::tile_mask(l, rep, a, b);
      },
      "natten::tile_mask: bit r set where token r of a tile with extents 2^logs (row-major) "
      "has offsets in [lo, hi) on every axis.");

  // The column masks of tile_mask.h (the TMA forward's box walk) for one thread, the same way.
  m.def(
      "column_bits",
      [](std::vector<int> logs, int quad, std::vector<int> start, std::vector<int> end,
         std::vector<int> origin) {
        if (logs.size() != 3 || start.size() != 3 || end.size() != 3 || origin.size() != 3)
          throw std::invalid_argument("column_bits: logs, start, end, origin take 3 entries each");
        int l[3], sum = 0;
        for (int ax = 0; ax < 3; ++ax) {
          l[ax] = logs[ax];
          sum += l[ax];
          if (l[ax] < 0 || start[ax] > end[ax] || start[ax] < 0 || origin[ax] < 0)
            throw std::invalid_argument("column_bits: needs logs >= 0, 0 <= start <= end");
        }
        if (sum < 4 || sum > 7 || l[2] < 1 || quad < 0 || quad > 3)
          throw std::invalid_argument("column_bits: tiles of 16 to 128 tokens, two or more on "
                                      "the last axis; quad in [0, 4)");
        const natten::ColumnAxes ca = natten::column_axes(l, 1 << (sum - 3));
        const int a[3] = {start[0], start[1], start[2]}, b[3] = {end[0], end[1], end[2]};
        const int o[3] = {origin[0], origin[1], origin[2]};
        int lo[4], hi[4], off[3];
        natten::column_bounds(ca, quad, a, b, lo, hi);
        natten::column_offsets(ca, o, off);
        return natten::column_bits(ca, lo, hi, off, /*skip=*/0u);
      },
      "The columns 8 nb + 2 quad + c (bit nb + 16 c) of a tile with extents 2^logs at local "
      "origin `origin` whose offsets lie in the window [start, end) on every axis.");

  // fna/tiling.h exposed so tests can check the fused kernels' tile choice on the host.
  m.def(
      "fna_tiling",
      [](std::vector<int> extent, std::vector<int> kernel, std::vector<int> stride,
         std::vector<int> dilation, std::vector<bool> causal, std::vector<int64_t> q_tile,
         std::vector<int64_t> kv_tile, int q_max_log, int kv_max_log, bool halves) {
        namespace fna = natten::gpu::fna;
        const natten::Problem p = padded_problem(extent, kernel, stride, dilation, causal);
        fna::Tiling t;
        const natten::ffi::Error e =
            fna::choose_tiling(p, natten::I64Span(q_tile.data(), q_tile.size()),
                               natten::I64Span(kv_tile.data(), kv_tile.size()), q_max_log, t,
                               kv_max_log, halves);
        if (e.failure()) throw nb::value_error(e.message().c_str());
        return tile_logs(t);
      },
      "(query tile, key tile) log2 extents per axis that fna::choose_tiling picks for a padded "
      "3-D problem and the user's tiles (all 0: choose), given the kernel's log2 tile sizes and "
      "whether its query tiles split into two warpgroups' halves (the Hopper forward).");

  // The forward's tile plan (fna/tiling.h), as the handler makes it: which MMA family runs and
  // the tiles it walks, for jax_natten.fused_tiles and the benchmark's report.
  m.def(
      "fna_forward_plan",
      [](std::vector<int> extent, std::vector<int> kernel, std::vector<int> stride,
         std::vector<int> dilation, std::vector<bool> causal, std::vector<int64_t> q_tile,
         std::vector<int64_t> kv_tile, int dt, bool f32, int64_t mma, bool hopper, bool rpb,
         int64_t additional) {
        namespace fna = natten::gpu::fna;
        natten::Problem p = padded_problem(extent, kernel, stride, dilation, causal);
        // (The handler's pick_wgmma, without a device: `hopper` says whether wgmma can run.)
        const bool wgmma_ok = !f32 && (mma == 2 || (mma == 0 && hopper));
        p.has_rpb = rpb;
        p.additional = additional;
        fna::ForwardPlan plan;
        const natten::ffi::Error e = fna::plan_forward(
            p, natten::I64Span(q_tile.data(), q_tile.size()),
            natten::I64Span(kv_tile.data(), kv_tile.size()), dt, f32, mma, wgmma_ok, plan);
        if (e.failure()) throw nb::value_error(e.message().c_str());
        const auto [qlog, kvlog] = tile_logs(plan.tiling);
        const char* family = f32 ? "simt" : plan.wgmma() ? "wgmma" : "mma_sync";
        // A query tile's rows: 2^sum(qlog), but the TMA forward's own count (1-D: on its long
        // axis; its box walk: qlog is one warpgroup's 64-query box, config.py stacks them).
        int q_rows = 1;
        for (int x : plan.tiling.qlog) q_rows <<= x;
        if (plan.kernel == fna::ForwardKernel::kTma) q_rows = fna::tma_fwd_q_rows(plan.dt);
        return std::make_tuple(family, fna::kernel_name(plan.kernel), qlog, kvlog, q_rows);
      },
      nb::arg("extent"), nb::arg("kernel"), nb::arg("stride"), nb::arg("dilation"),
      nb::arg("causal"), nb::arg("q_tile"), nb::arg("kv_tile"), nb::arg("dt"), nb::arg("f32"),
      nb::arg("mma"), nb::arg("hopper"), nb::arg("rpb") = false, nb::arg("additional") = 0,
      "(family, kernel, query tile log2 extents, key tile log2 extents, query tile rows) of the "
      "fused forward for a padded 3-D problem, head-dim tile dt, float32 or not, the `mma` "
      "setting, whether the device is a Hopper GPU (with the sm_90a image), with rpb or not and "
      "the additional keys.");

  // The backward's schedule (fna/tiling.h plan_backward), as the handler picks it, for
  // jax_natten.fused_tiles: the dq workspace is passed where fna.py uses_dq_workspace says.
  m.def(
      "fna_backward_plan",
      [](std::vector<int> extent, std::vector<int> kernel, std::vector<int> stride,
         std::vector<int> dilation, std::vector<bool> causal, std::vector<int64_t> q_tile,
         std::vector<int64_t> kv_tile, int dt, bool f32, int64_t mma, bool hopper, bool rpb,
         int64_t additional, bool deterministic) {
        namespace fna = natten::gpu::fna;
        natten::Problem p = padded_problem(extent, kernel, stride, dilation, causal);
        const bool wgmma = !f32 && (mma == 2 || (mma == 0 && hopper));
        const bool have_dq_acc = !f32 && !deterministic && mma != 1;
        p.has_rpb = rpb;
        p.additional = additional;
        fna::BackwardPlan plan;
        const natten::ffi::Error e = fna::plan_backward(
            p, natten::I64Span(q_tile.data(), q_tile.size()),
            natten::I64Span(kv_tile.data(), kv_tile.size()), dt, f32, wgmma, deterministic,
            have_dq_acc, plan);
        if (e.failure()) throw nb::value_error(e.message().c_str());
        const auto [qlog, kvlog] = tile_logs(plan.kv_tiling);
        return std::make_tuple(fna::backward_name(plan), qlog, kvlog);
      },
      nb::arg("extent"), nb::arg("kernel"), nb::arg("stride"), nb::arg("dilation"),
      nb::arg("causal"), nb::arg("q_tile"), nb::arg("kv_tile"), nb::arg("dt"), nb::arg("f32"),
      nb::arg("mma"), nb::arg("hopper"), nb::arg("rpb") = false, nb::arg("additional") = 0,
      nb::arg("deterministic") = false,
      "(schedule, query tile log2 extents, key tile log2 extents of its key-tile walk) of the "
      "fused backward, arguments as fna_forward_plan's, and the deterministic setting.");

  m.def(
      "limits",
      [] {
        namespace l = natten::limits;
        nb::dict mma;
        mma["auto"] = static_cast<int64_t>(l::kMmaAuto);
        mma["mma_sync"] = static_cast<int64_t>(l::kMmaSync);
        mma["wgmma"] = static_cast<int64_t>(l::kMmaWgmma);
        nb::dict out;
        out["gemm_head_dim_multiple"] = l::kGemmHeadDimMultiple;
        out["fused_head_dim_multiple"] = l::kFusedHeadDimMultiple;
        out["fused_max_head_dim"] = l::kFusedMaxHeadDim;
        out["fused_max_heads"] = l::kFusedMaxHeads;
        out["fused_max_tokens"] = l::kFusedMaxTokens;
        out["fused_max_q_tile_tokens"] = l::kFusedMaxQTileTokens;
        out["fused_max_kv_tile_tokens"] = l::kFusedMaxKvTileTokens;
        out["mma_codes"] = mma;
        return out;
      },
      "Limits and attribute codes the kernels and the Python layer share (natten/limits.h).");

  m.def(
      "has_cuda",
      [] {
#ifdef JAX_NATTEN_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA handlers were compiled in.");

  m.def(
      "ffi_api_version", [] { return std::make_pair(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); },
      "(major, minor) XLA FFI API version of the headers this module was built against.");
}
