// Neighborhood-attention window math: the one C++ definition, shared by host and device code.
// It mirrors jax_natten/_window.py line for line (docs/semantics.md §2-§5); tests check the two
// agree.
//
// Every kernel sees a 3-D token layout: the Python layer pads rank-1 and rank-2 problems with leading
// axes of length 1 (kernel 1, stride 1, dilation 1, not causal), for which the window is the single
// token 0. All coordinates here are "local": inside one dilation group.
#pragma once

#if defined(__CUDACC__)
#define NATTEN_HD __host__ __device__ __forceinline__
#else
#define NATTEN_HD inline
#endif

namespace natten {

constexpr int kMaxRank = 3;

// Per-axis parameters of one problem, as the FFI attributes deliver them.
struct AxisParams {
  int length;    // L: tokens along the axis
  int kernel;    // k: keys per window
  int stride;    // s: queries per shared window
  int dilation;  // d: number of interleaved groups
  bool causal;   // c: keys only up to the query
};

template <typename T>
NATTEN_HD T imin(T a, T b) { return a < b ? a : b; }
template <typename T>
NATTEN_HD T imax(T a, T b) { return a > b ? a : b; }

// The first axis longer than one token (the last axis where none is): the axis a 1-D problem
// runs along, and the one the fused TMA forward's box walk stacks its parts on.
NATTEN_HD int first_long_axis(const AxisParams (&axes)[kMaxRank]) {
  return axes[0].length > 1 ? 0 : (axes[1].length > 1 ? 1 : 2);
}
// How many axes are longer than one token (1-D problems: at most one).
NATTEN_HD int long_axis_count(const AxisParams (&axes)[kMaxRank]) {
  return (axes[0].length > 1) + (axes[1].length > 1) + (axes[2].length > 1);
}

// a / b for a >= 0, b >= 1 (every count and coordinate here is >= 0, every stride and dilation
// >= 1): unsigned, about half the instructions of a signed division on the GPU.
NATTEN_HD int udiv(int a, int b) {
  return static_cast<int>(static_cast<unsigned>(a) / static_cast<unsigned>(b));
}

// Tokens in dilation group g = x % d (group g holds x = g, g + d, g + 2d, ...).
NATTEN_HD int group_length(int length, int dilation, int group) {
  const int q = udiv(length, dilation);
  return q + (group < length - q * dilation ? 1 : 0);
}

// First key (local coordinate) of the window of local query i in a group of length lg.
NATTEN_HD int window_start(int i, int lg, int kernel, int stride, bool causal) {
  if (causal) {
    int leader = imin(udiv(i, stride) * stride + stride - 1, lg - 1);
    return imax(leader - kernel + 1, 0);
  }
  int leader = imin(udiv(i, stride) * stride + stride / 2, lg - 1);
  return imax(imin(leader - kernel / 2, lg - kernel), 0);
}

// One past the last key (local) of that window: causal windows end at the query itself.
NATTEN_HD int window_end(int i, int lg, int kernel, int stride, bool causal) {
  return causal ? i + 1 : window_start(i, lg, kernel, stride, causal) + kernel;
}

// The window of global query x along one axis, in global coordinates: key t of the window
// (0 <= t < kernel) is start + t * dilation, valid iff t < count.
struct AxisWindow {
  int start;  // global index of window offset 0
  int count;  // valid offsets: kernel when not causal, fewer near a causal query
  int step;   // distance between consecutive keys (the dilation)
  int rpb0;   // relative-position-bias index of offset 0: (j - i) + kernel - 1 in local coordinates
};

NATTEN_HD AxisWindow axis_window(const AxisParams& a, int x) {
  int g = x % a.dilation;
  int i = x / a.dilation;
  int lg = group_length(a.length, a.dilation, g);
  int s = window_start(i, lg, a.kernel, a.stride, a.causal);
  int e = window_end(i, lg, a.kernel, a.stride, a.causal);
  AxisWindow w;
  w.start = g + s * a.dilation;
  w.count = e - s;
  w.step = a.dilation;
  w.rpb0 = s - i + a.kernel - 1;
  return w;
}

// Inverse neighborhood: the local queries [first, last] (inclusive; empty when first > last) whose
// windows hold local key j. A query's window depends on it only through its stride block
// b = i / stride (the block's leader), and start and end never decrease as b grows, so each end
// is the first block where the window's clamp passes j, solved in closed form (no search: the
// backward kernels compute these per key row, and a bisection over the axis cost them a fifth of
// their time on long 1-D axes). tests/test_window.py checks it against the brute-force windows.
struct QueryRange {
  int first;
  int last;
};

NATTEN_HD int blocks_from(int x, int stride) {  // the smallest b >= 0 with b * stride >= x
  return x <= 0 ? 0 : (x + stride - 1) / stride;
}
NATTEN_HD QueryRange inverse_window(int j, int lg, int kernel, int stride, bool causal) {
  QueryRange r;
  if (causal) {
    // end(i) = i + 1 > j from query j on. start_b = max(min(b s + s - 1, lg - 1) - k + 1, 0)
    // passes j once b s + s - 1 >= j + k, unless lg - 1 < j + k (then no window starts past j).
    r.first = j;
    r.last = lg <= j + kernel ? lg - 1
                              : imin(blocks_from(j + kernel - stride + 1, stride) * stride, lg) - 1;
    return r;
  }
  // start_b = clamp(min(b s + s / 2, lg - 1) - k / 2, 0, lg - k), end_b = start_b + k.
  const int h = kernel / 2, half = stride / 2;
  // end_b > j <=> start_b >= t = j - k + 1: every block when t <= 0, else those with
  // b s + s / 2 >= t + k / 2 (t + k / 2 <= lg - 1, and t <= lg - k: the clamps never bind).
  const int t = j - kernel + 1;
  r.first = t <= 0 ? 0 : imin(blocks_from(t + h - half, stride) * stride, lg);
  // start_b <= j until b s + s / 2 > j + k / 2, unless lg - k <= j (then every window starts at
  // or before j).
  r.last = lg - kernel <= j ? lg - 1
                            : imin(blocks_from(j + h + 1 - half, stride) * stride, lg) - 1;
  return r;
}

}  // namespace natten
