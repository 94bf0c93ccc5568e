"""Settings of the fused kernels: tile shapes, deterministic backward, MMA family.

    with jax_natten.fused_config(q_tile=(8, 8), kv_tile=(4, 16)):
        out = jax.jit(f)(q, k, v)       # read when f is traced

`q_tile` / `kv_tile`: the query tile and key tile of the FNA kernels, one power-of-two extent per
spatial axis (e.g. 1-D (128,), 2-D (8, 16), 3-D (4, 4, 8)); query tiles hold at most 128 tokens
(kernels with smaller tiles, the backward, the float32 ones and the Hopper forward at head dims up
to 64, halve a larger tile along its
longest axis until it fits), key tiles at most 64 (a smaller key tile grows along its first axis
to the kernel's full tile). `None` (the default) lets the kernels choose: they count the (query
tile, key tile) pairs each candidate shape would visit on the problem at hand and take the fewest.
`deterministic=True` makes the whole backward bit-reproducible, at some cost in speed: dq comes
from its own kernel (per query tile, no atomics) instead of being added from every key tile's
walk into a float32 workspace in whatever order the tiles finish (the default Hopper schedule),
and the rpb gradient is reduced in a fixed order (by the GEMM-based kernels) instead of with
atomics. dk, dv and the additional kv gradients never use atomics.

`mma` picks the matrix instructions of the float16 / bfloat16 kernels (forward and backward):
"auto" (default) runs the Hopper variants (warpgroup MMA, wgmma) on compute capability 9.x GPUs
when the build holds an sm_90a image and the mma.sync (sm_80) variants elsewhere. The forward of
1-D problems runs on Hopper's TMA-fed kernel (128-token tiles copied by the tensor memory
accelerator) where it serves them: no rpb or additional keys, an axis length that the dilation
divides, no user tiles (head dims up to 32 run there as 64-column tiles); the other 1-D forwards run on mma.sync under "auto"
(faster than the box wgmma kernel there, BENCHMARKS.md). "mma_sync" forces mma.sync everywhere;
"wgmma" requires the Hopper kernels (the call fails with an error on other GPUs). float32 runs
on the CUDA cores either way. `jax_natten.fused_tiles` says which kernel and tiles a problem gets.

The settings are read when an op is traced (they become static attributes of the custom call),
so a function jitted before entering the context keeps the settings it was traced with.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    q_tile: tuple | None = None
    kv_tile: tuple | None = None
    deterministic: bool = False
    mma: str = "auto"


# The MMA families fused_config(mma=...) names (their attribute codes: backends/fna.py).
MMA_FAMILIES = ("auto", "mma_sync", "wgmma")


_CURRENT = contextvars.ContextVar("jax_natten_fused_config", default=FusedConfig())


def max_tile_tokens(name: str) -> int | None:
    """Tokens a `q_tile` / `kv_tile` may hold (cuda/include/natten/limits.h, read from the
    extension; None without it, where the fused kernels cannot run anyway)."""
    from .backends import ffi
    return None if ffi.LIMITS is None else ffi.LIMITS[f"fused_max_{name}_tokens"]


def _check_tile(name, tile):
    if tile is None:
        return None
    tile = tuple(tile) if isinstance(tile, (tuple, list)) else (tile,)
    for t in tile:
        if not isinstance(t, int) or isinstance(t, bool) or t < 1 or t & (t - 1):
            raise ValueError(f"{name} extents must be powers of two (1, 2, 4, ...), got {tile}")
    most = max_tile_tokens(name)
    if most is not None and math.prod(tile) > most:
        raise ValueError(f"{name} must hold at most {most} tokens, got {tile} "
                         f"({math.prod(tile)})")
    return tile


@contextlib.contextmanager
def fused_config(*, q_tile=None, kv_tile=None, deterministic=False, mma="auto"):
    """Context manager that sets the fused kernels' tile shapes, deterministic mode and the
    MMA family ("auto", "mma_sync" or "wgmma")."""
    if mma not in MMA_FAMILIES:
        raise ValueError(f"mma must be one of {sorted(MMA_FAMILIES)}, got {mma!r}")
    cfg = FusedConfig(_check_tile("q_tile", q_tile), _check_tile("kv_tile", kv_tile),
                      bool(deterministic), mma)
    token = _CURRENT.set(cfg)
    try:
        yield cfg
    finally:
        _CURRENT.reset(token)


def current() -> FusedConfig:
    return _CURRENT.get()


@dataclasses.dataclass(frozen=True)
class FusedTiles:
    """What the fused forward runs on a problem (`fused_tiles`).

    `mma`: "wgmma", "mma_sync" or "simt" (float32, CUDA cores); `kernel`: which forward kernel
    of that family: "simt", "mma_sync", "wgmma" (one warpgroup, 64-token query tiles), "wgmma_ws"
    (warp-specialized, two computing warpgroups on 128-token query tiles), "wgmma_ws_tma" (the
    same fed by the TMA: 2-D and 3-D problems) or "wgmma_tma" (1-D problems, copied by the TMA:
    128-key steps, query tiles of 192 tokens on three computing warpgroups at head dims up to 64,
    of 128 on two above); `q_tile` / `kv_tile`:
    the tile extents per spatial axis, in each dilation group's local coordinates;
    `computed_over_useful`: the scores the kernels compute (every query tile times every key
    tile of its walk, whole tiles, with the additional keys' tiles) over the useful ones (each
    query's window and additional keys), i.e. the forward's tensor work over the useful FLOPs.

    The backward (float16 / bfloat16 through `jax.grad`): `backward` names its schedule: "walk"
    (one walk over key tiles forms dk, dv and dq, dq added to a float32 workspace: Hopper, not
    deterministic, head dims up to 64), "walk_box_tma" (the same with q and do copied and dq
    added by the TMA: 2-D and 3-D problems at head dims 33-64), "walk_tma" (a kernel of its own
    for 1-D problems at head dims up to 64, fed by the TMA), "dq_dkdv" (a dq kernel, then the
    key-tile walk for dk and dv: deterministic mode, mma.sync, head dims above 64), "dq_tma_dkdv"
    (the same with the TMA feeding the dq kernel: Hopper, the "wgmma_ws_tma" forward's
    problems), either with a "_tma" suffix where the TMA feeds the dk / dv walk (Hopper, 2-D and
    3-D problems at head dims above 32), or "simt" (float32); `bwd_q_tile` / `bwd_kv_tile`: the
    query tiles its key-tile walk steps through and the key tiles it owns (128 keys on two
    warpgroups in "dq_tma_dkdv_tma" where the walks are long)."""
    mma: str
    kernel: str
    q_tile: tuple
    kv_tile: tuple
    computed_over_useful: float
    backward: str = ""
    bwd_q_tile: tuple = ()
    bwd_kv_tile: tuple = ()


_WARPGROUP_ROWS = 64  # query rows of one computing warpgroup of the Hopper forward (cuda/fna kRows)


def _axis_pairs(length, kernel, stride, dilation, causal, rows, kvlog, parts=1):
    """(sum over this axis's query tiles of the key tiles each walks, number of query tiles),
    over every dilation group, for query tiles of `rows` tokens: a tile's walk spans
    [start(first query), end(last query)). `parts` > 1: each of that many equal parts of a query
    tile (the Hopper forwards' computing warpgroups) computes only the key tiles of that walk that
    meet its own queries' windows; both sums are then over the parts that hold queries."""
    from . import _window
    tk, part = 1 << kvlog, rows // parts
    pairs = tiles = 0
    for g in range(dilation):
        lg = int(_window.group_length(length, dilation, g))
        for lo in range(0, lg, rows):
            hi = min(lo + rows, lg) - 1
            origin = int(_window.window_start(lo, lg, kernel, stride, causal))
            for first in range(lo, hi + 1, part):
                last = min(first + part, hi + 1) - 1
                a = int(_window.window_start(first, lg, kernel, stride, causal)) - origin
                b = int(_window.window_end(last, lg, kernel, stride, causal)) - origin
                pairs += -(-b // tk) - a // tk
                tiles += 1
    return pairs, tiles


def fused_tiles(spatial, kernel_size, *, stride=1, dilation=1, is_causal=False, head_dim=32,
                value_dim=None, dtype="bfloat16", additional_keys=0, rpb=False,
                device=None) -> FusedTiles:
    """The MMA family and tiles the fused forward (and the schedule the backward) picks for a
    problem under the current
    `fused_config` (the same host code as the kernels' handler: cuda/fna/tiling.h), and its
    computed-over-useful ratio. `device` (default: JAX's first): a Hopper GPU runs wgmma where
    `mma` allows; any other device is planned for as a non-Hopper GPU. `rpb` (a relative
    positional bias is passed) and `additional_keys` matter to the kernel choice: the TMA
    forward serves neither."""
    import jax
    import jax.numpy as jnp
    from .backends import ffi, fna

    if ffi._ext is None:
        raise RuntimeError(f"fused_tiles: {ffi._missing_extension()}")
    rank = len(tuple(spatial))
    per_axis = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank  # noqa: E731
    pad = lambda v, fill: [fill] * (3 - rank) + list(v)  # noqa: E731
    # The problem padded to 3 axes, as the ops pass it: (length, kernel, stride, dilation, causal).
    ints = lambda v: pad([int(x) for x in per_axis(v)], 1)  # noqa: E731
    axes = (ints(tuple(spatial)), ints(kernel_size), ints(stride), ints(dilation),
            pad([bool(x) for x in per_axis(is_causal)], False))
    settings = fna.FusedSettings.of(current(), rank)  # the tiles and family the op would pass
    dims = max(head_dim, value_dim or head_dim)
    dt = max(32, 1 << (int(dims) - 1).bit_length())  # the head-dim tile: 32, 64 or 128
    dev = device or jax.devices()[0]
    hopper = getattr(dev, "compute_capability", "").startswith("9.")
    f32 = jnp.dtype(dtype) == jnp.float32
    mma, kernel, qlog, kvlog, q_rows = ffi._ext.fna_forward_plan(
        *axes, list(settings.q_tile), list(settings.kv_tile), dt, bool(f32),
        ffi.LIMITS["mma_codes"][settings.mma], hopper, bool(rpb), int(additional_keys))
    # The query tile's extents: 2^qlog per axis, but the TMA forward's tiles ("wgmma_tma") hold
    # q_rows tokens (192 at head dims up to 64: three warpgroups; 128 at 128: two): on 1-D
    # problems all on the long axis; on 2-D and 3-D ones (its box walk) qlog is one warpgroup's
    # 64-token box, and the tile stacks one per warpgroup along the first axis longer than one
    # token.
    q_ext = [1 << x for x in qlog]
    if q_rows != math.prod(q_ext):
        if math.prod(q_ext) == _WARPGROUP_ROWS:
            stacked = next(a for a in range(3) if axes[0][a] > 1)
            q_ext[stacked] *= q_rows // _WARPGROUP_ROWS
        else:
            q_ext = [q_rows if x > 0 else 1 for x in qlog]
    # The Hopper forwards' tiles of more than 64 tokens ("wgmma_ws", "wgmma_ws_tma",
    # "wgmma_tma") are warpgroups' parts of 64 rows, split along the tile's first axis longer
    # than one token, each computing only the key tiles its queries reach.
    parts = q_rows // _WARPGROUP_ROWS if mma == "wgmma" and q_rows > _WARPGROUP_ROWS else 1
    split = next(a for a in range(3) if q_ext[a] > 1) if parts > 1 else -1
    pairs, tiles = 1, 1
    for a, axis in enumerate(zip(*axes, q_ext, kvlog)):
        p, t = _axis_pairs(*axis, parts=parts if a == split else 1)
        pairs, tiles = pairs * p, tiles * t
    key_tile = 1 << sum(kvlog)
    add_tiles = -(-int(additional_keys) // key_tile)
    rows = q_rows // parts  # a pair's query rows
    computed = rows * key_tile * (pairs + add_tiles * tiles)
    useful = math.prod(axes[0]) * (math.prod(axes[1]) + int(additional_keys))
    extents = lambda logs: tuple(1 << x for x in logs[3 - rank:])  # noqa: E731
    backward, bq, bkv = ffi._ext.fna_backward_plan(
        *axes, list(settings.q_tile), list(settings.kv_tile), dt, bool(f32),
        ffi.LIMITS["mma_codes"][settings.mma], hopper, bool(rpb), int(additional_keys),
        bool(settings.deterministic))
    return FusedTiles(mma, kernel, tuple(q_ext[3 - rank:]), extents(kvlog), computed / useful,
                      backward, extents(bq), extents(bkv))
