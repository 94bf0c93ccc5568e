"""Neighborhood-attention layers for Flax NNX.

The arguments follow `flax.nnx.MultiHeadAttention`: `num_heads` first, then `in_features`, then
the neighborhood (`kernel_size`), `dropout_rate`, `use_*_bias`, `precision`, `rngs`.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jax_natten.nnx import NeighborhoodAttention2D
    >>> layer = NeighborhoodAttention2D(4, 64, kernel_size=7, rel_pos_bias=True,
    ...                                 rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 16, 16, 64))).shape        # [B, X, Y, in_features]
    (2, 16, 16, 64)
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jax_natten import _modules_common as common

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttention(nnx.Module):
    """Multi-head neighborhood attention over `rank` spatial axes (Flax NNX).

    Input `[B, *spatial, in_features]` (extra leading dims fold into B) -> output of the same
    shape: one fused `qkv` Linear (C -> 3C), split into `num_heads` heads of `C // num_heads`
    channels, `jax_natten.na{rank}d` (heads-last), the `proj` Linear (C -> C), then dropout on
    the result.

    Args:
      num_heads: attention heads; must divide `in_features` (first, as in
        `flax.nnx.MultiHeadAttention`).
      in_features: C, channels of the input and output.
      kernel_size, stride, dilation, is_causal: int/bool or one per spatial axis. Per axis:
        `kernel_size >= 2`, `1 <= stride <= kernel_size`, and on every input
        `kernel_size * dilation <= length`.
      use_qkv_bias: whether the qkv projection has a bias (NATTEN's `qkv_bias`).
      use_proj_bias: whether the output projection has a bias.
      rel_pos_bias: learn a relative positional bias `rpb` of shape `[num_heads, 2k-1 per axis]`
        (truncated normal, std 0.02); only for non-causal, stride-1 layers, else ValueError.
      scale: logit scale, a finite number; default `head_dim ** -0.5`.
      dropout_rate: dropout on the output projection (NATTEN's `proj_drop`). The attention
        weights are not dropped out: the fused kernels never form them.
      dtype: computation dtype; default: inferred from input and parameters, as in Flax.
      param_dtype: parameter dtype.
      precision: `jax.lax.Precision` of the two projections (as in Flax); the attention itself
        accumulates in float32 (no TF32).
      backend: `jax_natten` backend name, or None for the best available.
      deterministic: default of `__call__`'s `deterministic`; set by `model.train()`/`eval()`.
      kernel_init, bias_init, rpb_init: parameter initializers.
      rngs: `nnx.Rngs`; streams 'params' and (if `dropout_rate > 0`) 'dropout'.

    Deprecated spellings `qkv_bias=` and `proj_dropout=` still work (FutureWarning, once).
    """

    rank: ClassVar[int] = 0  # set by the 1D/2D/3D subclasses

    def __init__(self, num_heads: int, in_features: int, kernel_size, *, stride=1, dilation=1,
                 is_causal=False, use_qkv_bias: bool = True, use_proj_bias: bool = True,
                 rel_pos_bias: bool = False, scale: float | None = None,
                 dropout_rate: float = 0.0, dtype: Any = None, param_dtype: Any = jnp.float32,
                 precision: Any = None, backend: str | None = None,
                 deterministic: bool | None = None,
                 kernel_init=nnx.initializers.lecun_normal(),
                 bias_init=nnx.initializers.zeros_init(),
                 rpb_init=common.default_rpb_init,
                 rngs: nnx.Rngs | None = None, **deprecated):
        name = type(self).__name__
        renamed = common.take_deprecated(name, deprecated, use_qkv_bias=use_qkv_bias,
                                         dropout_rate=dropout_rate)
        use_qkv_bias, dropout_rate = renamed["use_qkv_bias"], renamed["dropout_rate"]
        if rngs is None:
            raise TypeError(f"{name} needs rngs=nnx.Rngs(...) (streams 'params' and, with "
                            "dropout, 'dropout'), as other flax.nnx layers do")
        self.config = common.make_config(
            self.rank, num_heads, kernel_size, stride=stride, dilation=dilation,
            is_causal=is_causal, rel_pos_bias=rel_pos_bias, scale=scale, backend=backend)
        common.check_features(self.config, in_features)
        common.check_rate(name, dropout_rate)
        self.head_dim = in_features // num_heads
        self.in_features = in_features
        self.num_heads = num_heads
        self.dropout_rate = dropout_rate
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.deterministic = deterministic
        dense = dict(dtype=dtype, param_dtype=param_dtype, precision=precision,
                     kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
        self.qkv = nnx.Linear(in_features, 3 * in_features, use_bias=use_qkv_bias, **dense)
        self.proj = nnx.Linear(in_features, in_features, use_bias=use_proj_bias, **dense)
        if rel_pos_bias:
            self.rpb = nnx.Param(rpb_init(rngs.params(), self.config.rpb_shape, param_dtype))
        else:
            self.rpb = nnx.data(None)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate > 0 else None)

    @property
    def proj_dropout(self) -> float:
        """Deprecated name of `dropout_rate`."""
        return self.dropout_rate

    def set_view(self, deterministic: bool | None = None):
        """Used by `nnx.view(model, deterministic=...)`: sets the default dropout mode."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
                 rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None) -> jax.Array:
        """`x [B, *spatial, in_features]` -> same shape.

        `deterministic` (dropout off) overrides the attribute; `rngs` overrides the dropout
        stream given at construction.
        """
        common.check_input(self.config, x, self.in_features)
        rpb = None if self.rpb is None else self.rpb[...]
        y = self.proj(common.attend(self.config, self.qkv(x), rpb))
        if self.dropout_rate > 0:
            deterministic = common.resolve_deterministic(
                type(self).__name__, deterministic, self.deterministic)
            y = self.dropout(y, deterministic=deterministic, rngs=rngs)
        return y


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention: `NeighborhoodAttention1D(num_heads, in_features, kernel_size,
    ..., rngs=...)`, input `[B, X, in_features]` -> same shape.

    The arguments are those of `_NeighborhoodAttention` (`help()` lists them), e.g.
    `NeighborhoodAttention1D(4, 64, kernel_size=7, is_causal=True, rngs=nnx.Rngs(0))`.
    """

    rank: ClassVar[int] = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention: `NeighborhoodAttention2D(num_heads, in_features, kernel_size,
    ..., rngs=...)`, input `[B, X, Y, in_features]` -> same shape.

    The arguments are those of `_NeighborhoodAttention` (`help()` lists them), e.g.
    `NeighborhoodAttention2D(4, 64, kernel_size=(7, 7), dilation=2, rngs=nnx.Rngs(0))`.
    """

    rank: ClassVar[int] = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention: `NeighborhoodAttention3D(num_heads, in_features, kernel_size,
    ..., rngs=...)`, input `[B, X, Y, Z, in_features]` -> same shape.

    The arguments are those of `_NeighborhoodAttention` (`help()` lists them), e.g.
    `NeighborhoodAttention3D(4, 64, kernel_size=(3, 7, 7), is_causal=(True, False, False),
    rngs=nnx.Rngs(0))`.
    """

    rank: ClassVar[int] = 3
