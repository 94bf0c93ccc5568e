"""The window math: Python (`_window.py`) and C++ (`window.h`) against the spec, and each other."""
import numpy as np
import pytest

import oracle
from jax_natten import _window

# (L, k, s, d, causal) over small sizes: borders, even/odd kernels, every stride, dilation groups.
AXES = [(L, k, s, d, c) for L in (1, 2, 5, 8, 13) for k in (1, 2, 3, 4, 7) for d in (1, 2, 3)
        for s in range(1, k + 1) for c in (False, True) if k * d <= L]


def test_python_window_matches_spec():
    for L, k, s, d, c in AXES:
        keys, valid, rel = _window.axis_neighborhood(L, k, s, d, c)
        for x in range(L):
            for t, (key, r) in enumerate(oracle.spec_axis_window(x, L, k, s, d, c)):
                assert valid[x, t] == (key is not None), (L, k, s, d, c, x, t)
                if key is not None:
                    assert keys[x, t] == key and rel[x, t] == r, (L, k, s, d, c, x, t)


def test_every_noncausal_window_is_full_and_inside():
    for L, k, s, d, c in AXES:
        keys, valid, _ = _window.axis_neighborhood(L, k, s, d, c)
        assert ((keys >= 0) & (keys < L)).all()
        assert (keys % d == (np.arange(L) % d)[:, None]).all()  # same dilation group
        if not c:
            assert valid.all()
        else:
            assert (keys[valid] <= np.repeat(np.arange(L), k).reshape(L, k)[valid]).all()


def test_windows_are_monotone():
    """DESIGN: start and end never decrease with the query, per dilation group."""
    for L, k, s, d, c in AXES:
        for g in range(d):
            lg = int(_window.group_length(L, d, g))
            i = np.arange(lg)
            start = _window.window_start(i, lg, k, s, c)
            end = _window.window_end(i, lg, k, s, c)
            assert (np.diff(start) >= 0).all() and (np.diff(end) >= 0).all()


def test_cpp_window_matches_python():
    ext = pytest.importorskip("jax_natten._natten_ext")
    for L, k, s, d, c in AXES:
        keys, valid, rel = _window.axis_neighborhood(L, k, s, d, c)
        for x, (start, count, step, rpb0) in enumerate(ext.axis_windows(L, k, s, d, c)):
            assert count == valid[x].sum() and step == d
            assert start == keys[x, 0] and rpb0 == rel[x, 0], (L, k, s, d, c, x)


def test_cpp_inverse_window_matches_brute_force():
    ext = pytest.importorskip("jax_natten._natten_ext")
    for L, k, s, d, c in AXES:
        if d != 1:
            continue  # the inverse window is per dilation group: local coordinates
        holds = _window.inverse_neighborhood(L, k, s, 1, c)
        for j, (first, last) in enumerate(ext.inverse_windows(L, k, s, c)):
            expect = np.flatnonzero(holds[j])
            got = np.arange(first, last + 1)
            assert np.array_equal(got, expect), (L, k, s, c, j)


def _inverse_by_search(L, k, s, c):
    """Per key: (first query whose window ends past it, last query whose window starts at or
    before it), searched over the monotone window ends (the definition the kernels use)."""
    i = np.arange(L)
    start = _window.window_start(i, L, k, s, c)
    end = _window.window_end(i, L, k, s, c)
    j = np.arange(L)
    return np.searchsorted(end, j, side="right"), np.searchsorted(start, j, side="right") - 1


@pytest.mark.parametrize("causal", [False, True])
def test_cpp_inverse_window_closed_form_every_small_axis(causal):
    """The closed form (natten/window.h) against the search, for every axis of up to 40 tokens:
    every kernel size, every stride up to it, every key."""
    ext = pytest.importorskip("jax_natten._natten_ext")
    for L in range(1, 41):
        for k in range(1, L + 1):
            for s in range(1, k + 1):
                first, last = _inverse_by_search(L, k, s, causal)
                got = np.array(ext.inverse_windows(L, k, s, causal))
                assert np.array_equal(got[:, 0], first), (L, k, s, causal)
                assert np.array_equal(got[:, 1], last), (L, k, s, causal)


def test_cpp_inverse_window_closed_form_long_axes():
    ext = pytest.importorskip("jax_natten._natten_ext")
    rng = np.random.default_rng(7)
    for _ in range(60):
        L = int(rng.integers(100, 5000))
        k = int(rng.integers(1, L + 1))
        s = int(rng.integers(1, k + 1))
        for c in (False, True):
            first, last = _inverse_by_search(L, k, s, c)
            got = np.array(ext.inverse_windows(L, k, s, c))
            assert np.array_equal(got[:, 0], first), (L, k, s, c)
            assert np.array_equal(got[:, 1], last), (L, k, s, c)
