"""Settings of the fused kernels: tile shapes, deterministic backward, MMA family.

    with jax_natten.fused_config(q_tile=(8, 8), kv_tile=(4, 16)):
        out = jax.jit(f)(q, k, v)       # read when f is traced

`q_tile` / `kv_tile`: the query tile and key tile of the FNA kernels, one power-of-two extent per
spatial axis (e.g. 1-D (128,), 2-D (8, 16), 3-D (4, 4, 8)); query tiles hold at most 128 tokens
(kernels with smaller tiles, the backward, wgmma and float32 ones, halve a larger tile along its
longest axis until it fits), key tiles at most 64 (a smaller key tile grows along its first axis
to the kernel's full tile). `None` (the default) lets the kernels choose: they count the (query
tile, key tile) pairs each candidate shape would visit on the problem at hand and take the fewest.
`deterministic=True` makes the rpb gradient bit-reproducible (per-tile partial sums reduced in a
fixed order instead of atomics); dq, dk, dv and the additional kv gradients are always computed
without atomics, so they are deterministic in every mode.

`mma` picks the matrix instructions of the float16 / bfloat16 kernels (forward and backward):
"auto" (default) runs the Hopper variants (warpgroup MMA, wgmma) on compute capability 9.x GPUs
when the build holds an sm_90a image and the mma.sync (sm_80) variants elsewhere, except for the
forward of 1-D problems, which measured faster on mma.sync (BENCHMARKS.md); "mma_sync"
forces the latter everywhere; "wgmma" requires the former (the call fails with an error on other
GPUs). float32 runs on the CUDA cores either way.

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


# Codes of the `mma` attribute of the fused custom calls (cuda/fna/handlers.cu).
MMA_CODES = {"auto": 0, "mma_sync": 1, "wgmma": 2}


_CURRENT = contextvars.ContextVar("jax_natten_fused_config", default=FusedConfig())

# Query tiles hold up to 128 tokens (kernels with smaller tiles halve them); key tiles up to 64.
MAX_TILE_TOKENS = {"q_tile": 128, "kv_tile": 64}


def _check_tile(name, tile):
    if tile is None:
        return None
    tile = tuple(tile) if isinstance(tile, (tuple, list)) else (tile,)
    for t in tile:
        if not isinstance(t, int) or isinstance(t, bool) or t < 1 or t & (t - 1):
            raise ValueError(f"{name} extents must be powers of two (1, 2, 4, ...), got {tile}")
    if math.prod(tile) > MAX_TILE_TOKENS[name]:
        raise ValueError(f"{name} must hold at most {MAX_TILE_TOKENS[name]} tokens, got {tile} "
                         f"({math.prod(tile)})")
    return tile


@contextlib.contextmanager
def fused_config(*, q_tile=None, kv_tile=None, deterministic=False, mma="auto"):
    """Context manager that sets the fused kernels' tile shapes, deterministic mode and the
    MMA family ("auto", "mma_sync" or "wgmma")."""
    if mma not in MMA_CODES:
        raise ValueError(f"mma must be one of {sorted(MMA_CODES)}, got {mma!r}")
    cfg = FusedConfig(_check_tile("q_tile", q_tile), _check_tile("kv_tile", kv_tile),
                      bool(deterministic), mma)
    token = _CURRENT.set(cfg)
    try:
        yield cfg
    finally:
        _CURRENT.reset(token)


def current() -> FusedConfig:
    return _CURRENT.get()


def tuning(cfg: FusedConfig, rank: int):
    """The static tuning tuple of the fused op: (q_tile, kv_tile, deterministic, mma code)."""
    return padded_tiles(cfg, rank) + (cfg.deterministic, MMA_CODES[cfg.mma])


def padded_tiles(cfg: FusedConfig, rank: int, max_rank: int = 3):
    """(q_tile, kv_tile) as 3 extents each (leading 1s; all 0 = let the kernels choose)."""
    out = []
    for name, tile in (("q_tile", cfg.q_tile), ("kv_tile", cfg.kv_tile)):
        if tile is None:
            out.append((0,) * max_rank)
            continue
        if len(tile) != rank:
            raise ValueError(f"{name} {tile} has {len(tile)} extents for a {rank}-D problem")
        out.append((1,) * (max_rank - rank) + tuple(tile))
    return tuple(out)
