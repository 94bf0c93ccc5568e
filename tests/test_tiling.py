"""The fused kernels' tile choice (cuda/fna/tiling.h, through the extension) on the host: user tiles
checked, shrunk and filled as documented, the automatic choice equal to a Python reading of the
same cost (the (query tile, key tile) pairs a forward walk visits), and the forward's plan as
jax_natten.fused_tiles reports it (family, tiles, computed-over-useful scores, counted tile by
tile here)."""
import functools
import itertools
import math
import types

import numpy as np
import pytest

import jax_natten
from jax_natten import _window
from jax_natten.backends import ffi

ext = pytest.importorskip("jax_natten._natten_ext")

FWD_Q, KV = 7, 6  # log2 tile sizes of the mma.sync forward (128-token query tiles), key tiles


def _padded(value, rank: int, fill) -> list:
    """A per-axis value (or one for every axis) on 3 axes, leading axes padded like the op's."""
    value = tuple(value) if isinstance(value, tuple) else (value,) * rank
    return [fill] * (3 - rank) + list(value)


def tiling(spatial, kernel, stride=1, dilation=1, causal=False, q_tile=None, kv_tile=None,
           q_max_log=FWD_Q, kv_max_log=KV, halves=False):
    """fna::choose_tiling for a problem of rank len(spatial), padded to 3-D like the op."""
    r = len(spatial)
    tile = lambda t: [0, 0, 0] if t is None else _padded(t, r, 1)
    return ext.fna_tiling(_padded(spatial, r, 1), _padded(kernel, r, 1), _padded(stride, r, 1),
                          _padded(dilation, r, 1), _padded(causal, r, False), tile(q_tile),
                          tile(kv_tile), q_max_log, kv_max_log, halves)


@functools.lru_cache(maxsize=None)
def _windows(L, k, s, d, c, ql):
    """Per query tile [lo, hi] of 2^ql tokens in every dilation group, and per half of it (the
    first 2^(ql-1) queries, the rest): (start(first query), end(last query)) of the tile and of
    its halves."""
    out = []
    for g in range(d):
        lg = int(_window.group_length(L, d, g))
        span = lambda a, b: (int(_window.window_start(a, lg, k, s, c)),  # noqa: E731
                             int(_window.window_end(b, lg, k, s, c)))
        for lo in range(0, lg, 1 << ql):
            hi = min(lo + (1 << ql), lg) - 1
            halves = [span(f, min(f + (1 << ql) // 2, hi + 1) - 1)
                      for f in range(lo, hi + 1, max(1, (1 << ql) // 2))] if ql else []
            out.append((span(lo, hi), tuple(halves)))
    return tuple(out)


def _walk_cost(axes, qlog, kvlog, halves=False):
    """(query tile, key tile) pairs of the forward walk, counted tile by tile in every dilation
    group: a query tile [lo, hi] walks the key tiles over [start(lo), end(hi)). `halves` (the
    Hopper forward): a 2^(KV + 1)-token tile's halves along its first axis longer than one token
    each compute the key tiles of that walk that meet their own windows, side by side (cost: the
    halves' pairs over 2)."""
    split = halves and sum(qlog) > KV
    axis = next((a for a in range(3) if qlog[a] > 0), 2)
    cost = 0.5 if split else 1
    for a, (ax, ql, kl) in enumerate(zip(axes, qlog, kvlog)):
        tk = 1 << kl
        if split and a == axis:
            cost *= sum(-(-(e - s0) // tk) - (s - s0) // tk
                        for (s0, _), hs in _windows(*ax, ql) for s, e in hs)
        else:
            cost *= sum(-(-(e - s) // tk) for (s, e), _ in _windows(*ax, ql))
    return cost


def _shapes(axes, max_log):
    caps = []
    for L, _, _, d, _ in axes:
        lg, cap = int(_window.group_length(L, d, 0)), 0
        while cap < max_log and (1 << cap) < lg:
            cap += 1
        caps.append(cap)
    return [s for s in itertools.product(*(range(c + 1) for c in caps)) if sum(s) <= max_log]


def _expected(axes, q_max_log, kv_max_log, halves=False):
    """Cheapest (query, key) shapes; ties go to the later candidate; the key tile then grows along
    its first axis to the full size."""
    best = None
    for q in _shapes(axes, q_max_log):
        for kv in _shapes(axes, kv_max_log):
            c = _walk_cost(axes, q, kv, halves)
            if best is None or c <= best[0]:
                best = (c, q, kv)
    _, q, kv = best
    return q, (kv[0] + kv_max_log - sum(kv),) + kv[1:]


def _box_walk_tiles(axes, parts):
    """tiling.h tma_box_tiling (the TMA forward's box walk on 2-D and 3-D problems): a query tile
    is `parts` boxes of exactly 64 queries stacked along the first axis longer than one token
    (all of them inside that axis's group length), key tiles hold exactly 128 keys, two or more
    on the last axis; the cheapest by the (part, key tile) pairs the parts compute,
    each part the key tiles of its tile's walk (from the tile's first window start) that meet its
    own windows. Ties go to the later candidate. Returns (pairs, part's logs, key tile's logs)."""
    stacked = next(a for a in range(3) if axes[a][0] > 1)

    def stacked_pairs(L, k, s, d, c, ql, tk):
        n = 0
        for g in range(d):
            lg = int(_window.group_length(L, d, g))
            start = lambda i: int(_window.window_start(i, lg, k, s, c))  # noqa: E731
            end = lambda i: int(_window.window_end(i, lg, k, s, c))  # noqa: E731
            for lo in range(0, lg, parts << ql):
                origin = start(lo)
                for first in range(lo, min(lo + (parts << ql), lg), 1 << ql):
                    last = min(first + (1 << ql), lg) - 1
                    n += -(-(end(last) - origin) // tk) - (start(first) - origin) // tk
        return n

    stacked_length = int(_window.group_length(axes[stacked][0], axes[stacked][3], 0))
    best = None
    for q in _shapes(axes, KV):
        if sum(q) != KV or parts << q[stacked] > stacked_length:  # (no idle warpgroups)
            continue
        for kv in _shapes(axes, KV + 1):
            if sum(kv) != KV + 1 or kv[2] < 1:  # (the kernel's masks: two tokens on z or more)
                continue
            cost = 1
            for a, (ax, ql, kl) in enumerate(zip(axes, q, kv)):
                if a == stacked:
                    cost *= stacked_pairs(*ax, ql, 1 << kl)
                else:
                    cost *= sum(-(-(e - s) // (1 << kl)) for (s, e), _ in _windows(*ax, ql))
            if best is None or cost <= best[0]:
                best = (cost, q, kv)
    return best


PROBLEMS = [  # (spatial, kernel, stride, dilation, causal)
    ((4096,), 13, 1, 1, False), ((1024,), 65, 1, 1, True), ((56, 56), 7, 1, 1, False),
    ((64, 64), (13, 7), (1, 2), (2, 1), (False, True)), ((30, 17), 5, 5, 1, False),
    ((16, 32, 32), (3, 7, 7), 1, (1, 2, 2), (True, False, False)), ((9, 10, 12), 3, 2, 3, False),
]


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
@pytest.mark.parametrize("q_max_log,halves", [(FWD_Q, False), (FWD_Q, True), (KV, False), (5, False)])
def test_automatic_tiles_are_the_cheapest_walk(problem, q_max_log, halves):
    spatial, kernel, stride, dilation, causal = problem
    r = len(spatial)
    axes = list(zip(_padded(spatial, r, 1), _padded(kernel, r, 1), _padded(stride, r, 1),
                    _padded(dilation, r, 1), _padded(causal, r, False)))
    got = tiling(spatial, kernel, stride, dilation, causal, q_max_log=q_max_log, halves=halves)
    assert got == _expected(axes, q_max_log, KV, halves)
    assert sum(got[0]) <= q_max_log and sum(got[1]) == KV


def test_user_tiles_are_kept_shrunk_and_filled():
    # Kept as given; the key tile grows along its first (here padded) axis to the kernel's 64
    # tokens.
    assert tiling((64, 64), 7, q_tile=(8, 16), kv_tile=(4, 8)) == ((0, 3, 4), (1, 2, 3))
    # A 128-token query tile in a kernel of 64-token tiles: halved along its longest axis.
    assert tiling((64, 64), 7, q_tile=(8, 16), kv_tile=(8, 8), q_max_log=KV) == ((0, 3, 3),
                                                                                  (0, 3, 3))
    # Only the key tile given: the query tile is still chosen by cost.
    q, kv = tiling((64, 64), 7, kv_tile=(8, 8))
    assert kv == (0, 3, 3) and sum(q) <= FWD_Q


@pytest.mark.parametrize("kw, message", [
    (dict(q_tile=(3, 8)), "powers of two"),
    (dict(q_tile=(16, 16)), "at most 128"),
    (dict(kv_tile=(8, 16)), "at most 64"),
])
def test_bad_user_tiles_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        tiling((64, 64), 7, **kw)


def test_tile_limits_are_the_python_ones():
    assert 1 << FWD_Q == ffi.LIMITS["fused_max_q_tile_tokens"]
    assert 1 << KV == ffi.LIMITS["fused_max_kv_tile_tokens"]


# ----------------------------------------------------------------------------- the forward's plan

HOPPER = types.SimpleNamespace(compute_capability="9.0")  # a device as fused_tiles reads it
AMPERE = types.SimpleNamespace(compute_capability="8.0")


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_forward_plan_is_the_kernels_tile_sizes(problem):
    """fused_tiles (the handler's host code) walks the tile sizes each forward kernel computes:
    128-token query tiles on mma.sync and on the warp-specialized wgmma kernel (head-dim tile
    128, whose two warpgroups' halves the chooser counts), 64 on the one-warpgroup wgmma kernel
    (head-dim tiles 32 and 64), float32 64 (32 at head-dim tile 128); key tiles 64 (float32: as
    its query tiles)."""
    spatial, kernel, stride, dilation, causal = problem
    r = len(spatial)
    kw = dict(stride=stride, dilation=dilation, is_causal=causal)
    hopper_family = "wgmma" if sum(s > 1 for s in spatial) > 1 else "mma_sync"
    for device, dtype, dim, family, q_log, kv_log in [
            (HOPPER, "bfloat16", 32, hopper_family, None, KV),
            (HOPPER, "bfloat16", 64, hopper_family, None, KV),
            (HOPPER, "float16", 128, hopper_family, None, KV),
            (AMPERE, "float16", 128, "mma_sync", FWD_Q, KV),
            (HOPPER, "float32", 64, "simt", KV, KV), (HOPPER, "float32", 128, "simt", 5, 5)]:
        warp_specialized = family == "wgmma" and dim > 64
        if q_log is None:
            q_log = KV if family == "wgmma" and not warp_specialized else FWD_Q
        plan = jax_natten.fused_tiles(spatial, kernel, head_dim=dim, dtype=dtype, device=device,
                                      **kw)
        if _tma_serves(spatial, dilation, device, dtype, dim):  # 192 / 128 queries, 128 keys
            assert (plan.mma, plan.kernel) == ("wgmma", "wgmma_tma")
            rows = 192 if dim <= 64 else 128
            long_axis = [n > 1 for n in spatial] if any(n > 1 for n in spatial) else \
                [False] * (r - 1) + [True]
            assert plan.q_tile == tuple(rows if x else 1 for x in long_axis)
            assert plan.kv_tile == tuple(128 if x else 1 for x in long_axis)
            continue
        if plan.kernel == "wgmma_tma":  # the TMA forward's box walk (2-D, 3-D)
            assert device is HOPPER and dtype != "float32" and dim >= 64
            axes = list(zip(_padded(spatial, r, 1), _padded(kernel, r, 1), _padded(stride, r, 1),
                            _padded(dilation, r, 1), _padded(causal, r, False)))
            parts = 3 if dim <= 64 else 2
            _, q, k = _box_walk_tiles(axes, parts)
            stacked = next(a for a in range(3) if axes[a][0] > 1)
            q_ext = [(parts if a == stacked else 1) << x for a, x in enumerate(q)]
            assert plan.q_tile == tuple(q_ext[3 - r:])
            assert plan.kv_tile == tuple(1 << x for x in k[3 - r:])
            continue
        if plan.kernel == "wgmma_ws_tma":  # the box TMA variant: its own checks below
            q, k = tiling(spatial, kernel, stride, dilation, causal, q_max_log=FWD_Q,
                          kv_max_log=KV, halves=True)
            assert device is HOPPER and dtype != "float32" and dim >= 64
            assert sum(n > 1 for n in spatial) >= 2 and k[0] == 0
            assert sum(q) == FWD_Q and sum(k) == KV
            assert plan.q_tile == tuple(1 << x for x in q[3 - r:])
            continue
        q, k = tiling(spatial, kernel, stride, dilation, causal, q_max_log=q_log,
                      kv_max_log=kv_log, halves=warp_specialized)
        assert plan.mma == family
        assert plan.q_tile == tuple(1 << x for x in q[3 - r:])
        assert plan.kv_tile == tuple(1 << x for x in k[3 - r:])


def _tma_serves(spatial, dilation, device, dtype, dim):
    """The TMA forward's 1-D problems (cuda/fna/tiling.h forward_on_tma; tests/test_fused_tma.py),
    at every head dim (up to 32 as 64-column tiles: tma_head_dim_tile)."""
    per_axis = dilation if isinstance(dilation, tuple) else (dilation,) * len(spatial)
    long = [(n, d) for n, d in zip(spatial, per_axis) if n > 1]
    return (device is HOPPER and dtype != "float32" and len(long) <= 1
            and all(n % d == 0 for n, d in long))


def test_forward_plan_follows_fused_config():
    # auto: 1-D problems the TMA forward does not serve (here: rpb) run on mma.sync
    assert jax_natten.fused_tiles((4096,), 65, rpb=True, device=HOPPER).mma == "mma_sync"
    with jax_natten.fused_config(mma="wgmma"):
        assert jax_natten.fused_tiles((4096,), 65, rpb=True, device=HOPPER).mma == "wgmma"
    with jax_natten.fused_config(mma="mma_sync"):
        assert jax_natten.fused_tiles((64, 64), 7, device=HOPPER).mma == "mma_sync"
    with jax_natten.fused_config(q_tile=(4, 16), kv_tile=(8, 8)):
        plan = jax_natten.fused_tiles((64, 64), 7, device=AMPERE)
    assert (plan.q_tile, plan.kv_tile) == ((4, 16), (8, 8))


def _computed_scores(spatial, kernel, stride, dilation, causal, q_tile, kv_tile, additional,
                     halves=False):
    """Scores the forward computes, tile by tile: every query tile (of every combination of
    dilation groups) times the key tiles covering its windows' box, plus the additional keys'
    tiles, whole tiles each. `halves` (the Hopper forwards): a tile of more than 64 tokens is
    split along its first axis longer than one token into parts of 64 rows (one per computing
    warpgroup: two of a 128-token tile, three of the 1-D TMA forward's 192), and each part
    computes the key tiles of that box that meet its own queries' windows (and every
    additional-key tile)."""
    n_parts = math.prod(q_tile) // 64 if halves and math.prod(q_tile) > 64 else 1
    split = next(a for a in range(len(q_tile)) if q_tile[a] > 1) if n_parts > 1 else -1
    per_axis = []  # per axis, per query tile: [(origin, [(start, end) of each part])]
    for a, (L, k, s, d, c, tq) in enumerate(zip(spatial, kernel, stride, dilation, causal,
                                                q_tile)):
        tiles = []
        for g in range(d):
            lg = int(_window.group_length(L, d, g))
            span = lambda x, y: (int(_window.window_start(x, lg, k, s, c)),  # noqa: E731
                                 int(_window.window_end(y, lg, k, s, c)))
            for lo in range(0, lg, tq):
                hi = min(lo + tq, lg) - 1
                step = tq // n_parts
                parts = [span(lo, hi)] if a != split else [
                    span(f, min(f + step, hi + 1) - 1) for f in range(lo, hi + 1, step)]
                tiles.append((span(lo, hi)[0], parts))
        per_axis.append(tiles)
    rows = math.prod(q_tile) // n_parts
    kv_size = math.prod(kv_tile)
    add_tiles = -(-additional // kv_size)
    total = 0
    for combo in itertools.product(*per_axis):
        # Each part (half) of this query tile: the key tiles of the tile's own grid (from its
        # origin per axis) that meet the part's window range.
        counts = [[-(-(e - o) // tk) - (st - o) // tk for st, e in parts]
                  for (o, parts), tk in zip(combo, kv_tile)]
        for part in itertools.product(*counts):
            total += rows * kv_size * (math.prod(part) + add_tiles)
    return total


@pytest.mark.parametrize("problem", PROBLEMS[2:], ids=str)
@pytest.mark.parametrize("additional", [0, 70])
def test_computed_over_useful_counts_every_tile(problem, additional):
    spatial, kernel, stride, dilation, causal = problem
    r = len(spatial)
    per = lambda v: tuple(v) if isinstance(v, tuple) else (v,) * r  # noqa: E731
    plan = jax_natten.fused_tiles(spatial, kernel, stride=stride, dilation=dilation,
                                  is_causal=causal, additional_keys=additional, device=AMPERE)
    computed = _computed_scores(spatial, per(kernel), per(stride), per(dilation), per(causal),
                                plan.q_tile, plan.kv_tile, additional)
    useful = math.prod(spatial) * (math.prod(per(kernel)) + additional)
    assert plan.computed_over_useful == pytest.approx(computed / useful, rel=1e-12)
    assert plan.computed_over_useful >= 1.0


@pytest.mark.parametrize("problem", [p for p in PROBLEMS if sum(x > 1 for x in p[0]) > 1], ids=str)
@pytest.mark.parametrize("additional", [0, 70])
def test_computed_over_useful_counts_the_halves_on_hopper(problem, additional):
    """The warp-specialized Hopper forward's ratio (head dim 128, and its TMA variant at 64)
    counts what each warpgroup's half of a tile computes; the one-warpgroup kernel's (head dim
    64) its 64-token tiles whole."""
    spatial, kernel, stride, dilation, causal = problem
    r = len(spatial)
    per = lambda v: tuple(v) if isinstance(v, tuple) else (v,) * r  # noqa: E731
    useful = math.prod(spatial) * (math.prod(per(kernel)) + additional)
    for dim, halves in [(128, True), (64, False)]:
        plan = jax_natten.fused_tiles(spatial, kernel, stride=stride, dilation=dilation,
                                      is_causal=causal, additional_keys=additional, device=HOPPER,
                                      head_dim=dim)
        assert plan.mma == "wgmma"
        # (The TMA forward's box walk: parts of 64 queries, three at head dim 64, two at 128.)
        halves = halves or plan.kernel in ("wgmma_ws_tma", "wgmma_tma")
        tokens = 128 if halves else 64
        if plan.kernel == "wgmma_tma":
            tokens = 192 if dim <= 64 else 128
        assert math.prod(plan.q_tile) == tokens or plan.kernel != "wgmma_tma"
        assert math.prod(plan.q_tile) <= tokens
        computed = _computed_scores(spatial, per(kernel), per(stride), per(dilation),
                                    per(causal), plan.q_tile, plan.kv_tile, additional,
                                    halves=halves)
        assert plan.computed_over_useful == pytest.approx(computed / useful, rel=1e-12)


@pytest.mark.parametrize("problem", [((1000,), 65, 1, 1, False), ((777,), 129, 3, 1, True),
                                     ((900,), 33, 1, 3, False), ((4096,), 255, 2, 2, True)],
                         ids=str)
def test_computed_over_useful_of_the_1d_tma_forward(problem):
    """The TMA forward's 1-D tiles: 192 queries on three warpgroups of 64 at head dim 64 (each
    computing the 128-key steps its own rows reach), 128 on two at head dim 128."""
    spatial, kernel, stride, dilation, causal = problem
    useful = spatial[0] * kernel
    for dim, rows in [(64, 192), (128, 128)]:
        plan = jax_natten.fused_tiles(spatial, kernel, stride=stride, dilation=dilation,
                                      is_causal=causal, device=HOPPER, head_dim=dim)
        assert (plan.kernel, plan.q_tile, plan.kv_tile) == ("wgmma_tma", (rows,), (128,))
        computed = _computed_scores(spatial, (kernel,), (stride,), (dilation,), (causal,),
                                    plan.q_tile, plan.kv_tile, 0, halves=True)
        assert plan.computed_over_useful == pytest.approx(computed / useful, rel=1e-12)


def test_computed_over_useful_of_the_1d_tma_forward_by_hand():
    # L = 400, k = 65, head dim 64: query tiles [0, 192), [192, 384), [384, 400), split into
    # warpgroup parts of 64 rows. Walk origins (the tiles' first windows' starts) 0, 160, 335; a
    # part [f, l] reaches keys [start(f), end(l)) and computes the 128-key steps of its tile's
    # walk that meet them. Tile 0: [0, 96), [32, 160), [96, 224) -> 1, 2, 2 steps; tile 1, from
    # 160: [160, 288), [224, 352), [288, 400) -> 1, 2, 1; tile 2, from 335: [335, 400) -> 1.
    # 10 steps of 64 x 128 scores for 400 * 65 useful ones.
    plan = jax_natten.fused_tiles((400,), 65, head_dim=64, device=HOPPER)
    assert (plan.kernel, plan.q_tile, plan.kv_tile) == ("wgmma_tma", (192,), (128,))
    assert plan.computed_over_useful == pytest.approx(10 * 64 * 128 / (400 * 65))


def test_computed_over_useful_by_hand():
    # L = 300, k = 65, 128-token query tiles over 64-token key tiles: windows' spans 160, 192, 76
    # keys -> 3 + 3 + 2 key tiles; 8 * 128 * 64 scores for 300 * 65 useful ones.
    plan = jax_natten.fused_tiles((300,), 65, device=AMPERE)
    assert (plan.mma, plan.q_tile, plan.kv_tile) == ("mma_sync", (128,), (64,))
    assert plan.computed_over_useful == pytest.approx(8 * 128 * 64 / (300 * 65))
