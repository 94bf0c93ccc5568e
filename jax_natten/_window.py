"""Neighborhood-attention window math: the one Python definition (docs/semantics.md §2-§5).

`cuda/include/natten/window.h` is its C++ twin; `tests/test_window.py` checks the two agree and that
both agree with a brute-force reading of the semantics document. Everything here is NumPy on static
shapes: the windows depend only on sizes and parameters, never on data, so they are computed at
trace time.
"""
from __future__ import annotations

import numpy as np


def group_length(length: int, dilation: int, group):
    """Tokens in dilation group `group` (tokens x with x % dilation == group)."""
    return length // dilation + (np.asarray(group) < length % dilation).astype(np.int64)


def window_start(i, lg, kernel: int, stride: int, causal: bool):
    """First key (local coordinate) of the window of local query `i` in a group of length `lg`."""
    i = np.asarray(i, np.int64)
    if causal:
        leader = np.minimum((i // stride) * stride + stride - 1, lg - 1)
        return np.maximum(leader - kernel + 1, 0)
    leader = np.minimum((i // stride) * stride + stride // 2, lg - 1)
    return np.maximum(np.minimum(leader - kernel // 2, lg - kernel), 0)


def window_end(i, lg, kernel: int, stride: int, causal: bool):
    """One past the last key (local) of that window; a causal window ends at the query."""
    i = np.asarray(i, np.int64)
    if causal:
        return i + 1
    return window_start(i, lg, kernel, stride, causal) + kernel


def axis_neighborhood(length: int, kernel: int, stride: int = 1, dilation: int = 1,
                      causal: bool = False):
    """Windows of every query along one axis, in global coordinates.

    Returns `(keys, valid, rpb_index)`, each `[length, kernel]`: `keys[x, t]` is the global index of
    window offset `t` of query `x`, `valid[x, t]` says whether that key is attended (false only past
    a causal query; `keys` is then clamped to a real token), and `rpb_index[x, t]` is the relative
    position `(j - i) + kernel - 1` in local coordinates used to index the positional bias.
    """
    x = np.arange(length, dtype=np.int64)
    g = x % dilation
    i = x // dilation
    lg = group_length(length, dilation, g)
    start = window_start(i, lg, kernel, stride, causal)
    end = window_end(i, lg, kernel, stride, causal)
    t = np.arange(kernel, dtype=np.int64)
    local = start[:, None] + t[None, :]
    valid = local < end[:, None]
    local = np.minimum(local, end[:, None] - 1)
    keys = g[:, None] + local * dilation
    rpb_index = local - i[:, None] + kernel - 1
    return keys, valid, rpb_index


def inverse_neighborhood(length: int, kernel: int, stride: int = 1, dilation: int = 1,
                         causal: bool = False):
    """For every key along one axis, the global queries whose windows hold it, as a boolean
    `[length (keys), length (queries)]` matrix. Used by tests; kernels use the range form."""
    keys, valid, _ = axis_neighborhood(length, kernel, stride, dilation, causal)
    holds = np.zeros((length, length), bool)
    for x in range(length):
        holds[keys[x][valid[x]], x] = True
    return holds
