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

// Tokens in dilation group g = x % d (group g holds x = g, g + d, g + 2d, ...).
NATTEN_HD int group_length(int length, int dilation, int group) {
  return length / dilation + (group < length % dilation ? 1 : 0);
}

// First key (local coordinate) of the window of local query i in a group of length lg.
NATTEN_HD int window_start(int i, int lg, int kernel, int stride, bool causal) {
  if (causal) {
    int leader = imin((i / stride) * stride + stride - 1, lg - 1);
    return imax(leader - kernel + 1, 0);
  }
  int leader = imin((i / stride) * stride + stride / 2, lg - 1);
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
// windows hold local key j. Exists because start and end never decrease as the query grows.
struct QueryRange {
  int first;
  int last;
};

NATTEN_HD QueryRange inverse_window(int j, int lg, int kernel, int stride, bool causal) {
  // Windows are monotone in i, so binary-search both ends over [0, lg).
  int lo = 0, hi = lg;  // first i with end(i) > j
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (window_end(mid, lg, kernel, stride, causal) > j) hi = mid; else lo = mid + 1;
  }
  int first = lo;
  lo = 0; hi = lg;  // first i with start(i) > j, minus one
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (window_start(mid, lg, kernel, stride, causal) > j) hi = mid; else lo = mid + 1;
  }
  QueryRange r;
  r.first = first;
  r.last = lo - 1;
  return r;
}

}  // namespace natten
