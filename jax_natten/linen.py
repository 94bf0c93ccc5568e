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

    Input `[B, *spatial, C]` (extra leading dims fold into B) -> output of the same shape: one
    fused `qkv` Dense (C -> 3C), split into `num_heads` heads of `C // num_heads` channels,
    `jax_natten.na{rank}d` (heads-last), the `proj` Dense (C -> C), then dropout on the result
    (rng stream 'dropout').

    Attributes:
      num_heads: attention heads; must divide C (checked on the first call).
      kernel_size, stride, dilation, is_causal: int/bool or one per spatial axis. Per axis:
        `kernel_size >= 2`, `1 <= stride <= kernel_size`, and on every input
        `kernel_size * dilation <= length`.
      use_qkv_bias: whether the qkv projection has a bias (NATTEN's `qkv_bias`).
      use_proj_bias: whether the output projection has a bias.
      rel_pos_bias: learn a relative positional bias `rpb` of shape `[num_heads, 2k-1 per axis]`
        (truncated normal, std 0.02); only for non-causal, stride-1 layers, else ValueError at
        construction.
      scale: logit scale, a finite number; default `head_dim ** -0.5`.
      dropout_rate: dropout on the output projection (NATTEN's `proj_drop`). The attention
        weights are not dropped out: the fused kernels never form them.
      dtype: computation dtype; default: inferred from input and parameters, as in Flax.
      param_dtype: parameter dtype.
      precision: `jax.lax.Precision` of the two projections (as in Flax); the attention itself
        accumulates in float32 (no TF32).
      backend: `jax_natten` backend name, or None for the best available.
      deterministic: default of `__call__`'s `deterministic` when that is None (then True).
      kernel_init, bias_init, rpb_init: parameter initializers.
      qkv_bias, proj_dropout: deprecated spellings of `use_qkv_bias`, `dropout_rate`
        (FutureWarning, once).
    """

    num_heads: int
    kernel_size: Any
    stride: Any = 1
    dilation: Any = 1
    is_causal: Any = False
    use_qkv_bias: bool = True
    use_proj_bias: bool = True
    rel_pos_bias: bool = False
    scale: float | None = None
    dropout_rate: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    backend: str | None = None
    deterministic: bool | None = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    rpb_init: Callable = common.default_rpb_init
    qkv_bias: bool | None = None        # deprecated: use_qkv_bias
    proj_dropout: float | None = None   # deprecated: dropout_rate

    rank: ClassVar[int] = 0  # set by the 1D/2D/3D subclasses

    def __post_init__(self):
        given = {k: getattr(self, k) for k in ("qkv_bias", "proj_dropout")
                 if getattr(self, k) is not None}
        if given:
            common.take_deprecated(type(self).__name__, given, use_qkv_bias=self.use_qkv_bias,
                                   dropout_rate=self.dropout_rate)
        self.config  # validate the configuration when the module is built
        common.check_rate(type(self).__name__, self._dropout_rate)
        super().__post_init__()

    @property
    def _use_qkv_bias(self) -> bool:
        return self.use_qkv_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def _dropout_rate(self) -> float:
        return self.dropout_rate if self.proj_dropout is None else self.proj_dropout

    @property
    def config(self) -> common.NAConfig:
        return common.make_config(
            self.rank, self.num_heads, self.kernel_size, stride=self.stride,
            dilation=self.dilation, is_causal=self.is_causal, rel_pos_bias=self.rel_pos_bias,
            scale=self.scale, backend=self.backend)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """`x [B, *spatial, C]` -> same shape. `deterministic=False` turns dropout on
        (needs the 'dropout' rng); None defers to the attribute, then True."""
        cfg = self.config
        features = common.check_input(cfg, x)
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                     kernel_init=self.kernel_init, bias_init=self.bias_init)
        qkv = nn.Dense(3 * features, use_bias=self._use_qkv_bias, name="qkv", **dense)(x)
        rpb = (self.param("rpb", self.rpb_init, cfg.rpb_shape, self.param_dtype)
               if cfg.rel_pos_bias else None)
        y = nn.Dense(features, use_bias=self.use_proj_bias, name="proj",
                     **dense)(common.attend(cfg, qkv, rpb))
        rate = self._dropout_rate
        if rate > 0:
            deterministic = common.resolve_deterministic(
                type(self).__name__, deterministic, self.deterministic, default=True)
            y = nn.Dropout(rate, name="dropout")(y, deterministic=deterministic)
        return y


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention, input `[B, X, C]`; see `_NeighborhoodAttention`."""

    rank: ClassVar[int] = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention, input `[B, X, Y, C]`; see `_NeighborhoodAttention`."""

    rank: ClassVar[int] = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention, input `[B, X, Y, Z, C]`; see `_NeighborhoodAttention`."""

    rank: ClassVar[int] = 3
