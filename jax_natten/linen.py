"""Neighborhood-attention layers for Flax Linen.

    >>> import jax, jax.numpy as jnp
    >>> from jax_natten.linen import NeighborhoodAttention2D
    >>> layer = NeighborhoodAttention2D(num_heads=4, kernel_size=7, rel_pos_bias=True)
    >>> x = jnp.ones((2, 16, 16, 64))
    >>> params = layer.init(jax.random.key(0), x)
    >>> layer.apply(params, x).shape
    (2, 16, 16, 64)
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_natten import _modules_common as common

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood attention over `rank` spatial axes (Flax Linen).

    Input `[batch, *spatial, C]` -> output of the same shape: one fused `qkv` Dense (C -> 3C),
    split into `num_heads` heads of `C // num_heads` channels, `jax_natten.na{rank}d`, the `proj`
    Dense (C -> C), then Dropout(`proj_dropout`, rng stream 'dropout').

    Attributes:
      num_heads: attention heads; must divide C (checked on the first call).
      kernel_size, stride, dilation, is_causal: int/bool or per-axis tuple (NATTEN semantics).
      qkv_bias: whether the qkv projection has a bias (the output projection always has one).
      rel_pos_bias: learn a relative positional bias `rpb` of shape `[num_heads, 2k-1 per axis]`
        (truncated normal, std 0.02); only for non-causal, stride-1 layers, else ValueError at
        construction.
      scale: logit scale; default `head_dim ** -0.5`.
      proj_dropout: dropout rate applied to the output projection.
      dtype: computation dtype; default: inferred from input and parameters, as in Flax.
      param_dtype: parameter dtype.
      backend: `jax_natten` backend name, or None for the best available.
      deterministic: default of `__call__`'s `deterministic` when that is None (then True).
      kernel_init, bias_init, rpb_init: parameter initializers.
    """

    num_heads: int
    kernel_size: Any
    stride: Any = 1
    dilation: Any = 1
    is_causal: Any = False
    qkv_bias: bool = True
    rel_pos_bias: bool = False
    scale: float | None = None
    proj_dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    backend: str | None = None
    deterministic: bool | None = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    rpb_init: Callable = common.default_rpb_init

    rank: ClassVar[int] = 0  # set by the 1D/2D/3D subclasses

    def __post_init__(self):
        self.config  # validate the configuration when the module is built
        super().__post_init__()

    @property
    def config(self) -> common.NAConfig:
        return common.make_config(
            self.rank, self.num_heads, self.kernel_size, stride=self.stride,
            dilation=self.dilation, is_causal=self.is_causal, rel_pos_bias=self.rel_pos_bias,
            scale=self.scale, backend=self.backend)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """`x [batch, *spatial, C]` -> same shape. `deterministic=False` turns dropout on
        (needs the 'dropout' rng); None defers to the attribute, then True."""
        cfg = self.config
        features = common.check_input(cfg, x)
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=self.kernel_init, bias_init=self.bias_init)
        qkv = nn.Dense(3 * features, use_bias=self.qkv_bias, name="qkv", **dense)(x)
        rpb = (self.param("rpb", self.rpb_init, cfg.rpb_shape, self.param_dtype)
               if cfg.rel_pos_bias else None)
        y = nn.Dense(features, name="proj", **dense)(common.attend(cfg, qkv, rpb))
        if self.proj_dropout > 0:
            deterministic = common.resolve_deterministic(
                type(self).__name__, deterministic, self.deterministic, default=True)
            y = nn.Dropout(self.proj_dropout, name="dropout")(y, deterministic=deterministic)
        return y


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention, input `[batch, L, C]`; see `_NeighborhoodAttention`."""

    rank: ClassVar[int] = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention, input `[batch, H, W, C]`; see `_NeighborhoodAttention`."""

    rank: ClassVar[int] = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention, input `[batch, T, H, W, C]`; see `_NeighborhoodAttention`."""

    rank: ClassVar[int] = 3
