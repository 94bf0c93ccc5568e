"""What the Flax NNX and Linen neighborhood-attention modules share.

`jax_natten.nnx` and `jax_natten.linen` own only the framework glue (parameters, dropout, modes);
the argument checks, the RPB shape and initializer, and the qkv -> heads -> NA -> tokens core live
here once.
"""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp

from . import _checks, ops

#: Relative positional bias initializer: truncated normal (at 2 std), std 0.02 like NATTEN's.
default_rpb_init = jax.nn.initializers.truncated_normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class NAConfig:
    """Static, validated configuration of one neighborhood-attention layer (any channel count)."""

    rank: int
    num_heads: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    rel_pos_bias: bool
    scale: float | None
    backend: str | None

    @property
    def rpb_shape(self) -> tuple[int, ...]:
        """`[num_heads, 2*k_0-1, ..., 2*k_{r-1}-1]`."""
        return (self.num_heads, *(2 * k - 1 for k in self.kernel_size))

    def head_dim(self, features: int) -> int:
        """Channels per head; ValueError unless `num_heads` divides `features`."""
        if features % self.num_heads:
            raise ValueError(f"NeighborhoodAttention{self.rank}D: features ({features}) must be "
                             f"divisible by num_heads ({self.num_heads})")
        return features // self.num_heads


def make_config(rank: int, num_heads: int, kernel_size, *, stride=1, dilation=1, is_causal=False,
                rel_pos_bias=False, scale=None, backend=None) -> NAConfig:
    """Normalizes per-axis arguments; ValueError/TypeError for invalid values or combinations."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    params = _checks.make_params(rank, kernel_size, stride, dilation, is_causal)
    scale = _checks.check_scale(scale)
    if rel_pos_bias and not params.rpb_allowed:
        raise ValueError("rel_pos_bias=True is only defined for non-causal, stride-1 "
                         f"neighborhood attention; got is_causal={params.is_causal}, "
                         f"stride={params.stride}")
    return NAConfig(rank=rank, num_heads=num_heads, kernel_size=params.kernel_size,
                    stride=params.stride, dilation=params.dilation, is_causal=params.is_causal,
                    rel_pos_bias=bool(rel_pos_bias), scale=scale, backend=backend)


def check_features(cfg: NAConfig, in_features) -> None:
    """NNX's `in_features`: a positive int that `num_heads` divides. Arguments passed in the old
    order `(in_features, num_heads)` always fail here (unless both are equal, which is the same
    layer), with a hint."""
    name = f"NeighborhoodAttention{cfg.rank}D"
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise TypeError(f"{name}: in_features must be a positive int, got {in_features!r}; the "
                        "arguments are (num_heads, in_features, kernel_size, ...)")
    if in_features % cfg.num_heads:
        hint = ""
        if cfg.num_heads > in_features:
            hint = (f". The order is (num_heads, in_features, ...), as in "
                    f"flax.nnx.MultiHeadAttention: for {cfg.num_heads} channels in "
                    f"{in_features} heads write {name}({in_features}, {cfg.num_heads}, ...)")
        raise ValueError(f"{name}: in_features ({in_features}) must be divisible by num_heads "
                         f"({cfg.num_heads}){hint}")


def check_rate(name: str, rate) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"{name}: dropout_rate must be a number in [0, 1), got {rate!r}")


# Deprecated keyword -> its new name (the values mean the same).
_RENAMED = {"qkv_bias": "use_qkv_bias", "proj_dropout": "dropout_rate"}


_WARNED: set = set()


def take_deprecated(name: str, given: dict, **current) -> dict:
    """Maps the deprecated keywords in `given` onto their new names; any other unknown keyword is
    a TypeError that names the public class. `current`: the new keywords' values as passed. The
    FutureWarning (shown to users, unlike DeprecationWarning from library frames) is issued once
    per class and keyword: Linen rebuilds a module on every init/apply."""
    out = dict(current)
    for old, value in given.items():
        new = _RENAMED.get(old)
        if new is None:
            raise TypeError(f"{name}() got an unexpected keyword argument {old!r}")
        if (name, old) not in _WARNED:
            _WARNED.add((name, old))
            warnings.warn(f"{name}: {old}= is deprecated, use {new}= (as in Flax)",
                          FutureWarning, stacklevel=3)
        out[new] = value
    return out


def check_input(cfg: NAConfig, x: jax.Array, features: int | None = None) -> int:
    """Checks `x` is `[B, *spatial, C]` (C == `features` if given); returns C."""
    c = x.shape[-1] if x.ndim else None
    if x.ndim < cfg.rank + 2 or (features is not None and c != features):
        axes = ", ".join("XYZ"[:cfg.rank])
        raise ValueError(f"NeighborhoodAttention{cfg.rank}D expects input [B, {axes}, "
                         f"{features if features is not None else 'C'}] (channels last), got "
                         f"shape {tuple(x.shape)}")
    cfg.head_dim(c)
    return c


def resolve_deterministic(name: str, call_value: bool | None, attribute: bool | None,
                          default: bool | None = None) -> bool:
    """`__call__`'s `deterministic` if given, else the module's attribute, else `default`."""
    for value in (call_value, attribute, default):
        if value is not None:
            return bool(value)
    raise ValueError(f"{name}: dropout_rate > 0 needs `deterministic`, passed to __call__ or the "
                     "constructor, or set by model.train() / model.eval()")


def na_function(rank: int):
    """`na1d` / `na2d` / `na3d`."""
    return {1: ops.na1d, 2: ops.na2d, 3: ops.na3d}[rank]


def attend(cfg: NAConfig, qkv: jax.Array, rpb: jax.Array | None) -> jax.Array:
    """Core of the module: fused projection `[B..., *spatial, 3C]` -> `[B..., *spatial, C]`.

    The 3C channels are ordered (q|k|v, head, head_dim), like NATTEN's `qkv` Linear, so its
    weights port by transposing the kernel. Extra leading batch dimensions fold into one.
    """
    features = qkv.shape[-1] // 3
    head_dim = cfg.head_dim(features)
    spatial = qkv.shape[qkv.ndim - 1 - cfg.rank:-1]
    batch = qkv.shape[:qkv.ndim - 1 - cfg.rank]
    qkv = qkv.reshape(-1, *spatial, 3, cfg.num_heads, head_dim)
    q, k, v = (qkv[..., i, :, :] for i in range(3))
    out = na_function(cfg.rank)(
        q, k, v, cfg.kernel_size, stride=cfg.stride, dilation=cfg.dilation,
        is_causal=cfg.is_causal, scale=cfg.scale,
        rpb=None if rpb is None else jnp.asarray(rpb, jnp.float32), backend=cfg.backend)
    return out.reshape(*batch, *spatial, features)
