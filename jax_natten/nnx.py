"""Neighborhood-attention layers for Flax NNX.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jax_natten.nnx import NeighborhoodAttention2D
    >>> layer = NeighborhoodAttention2D(64, 4, kernel_size=7, rel_pos_bias=True, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 16, 16, 64))).shape
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

    Input `[batch, *spatial, in_features]` -> output of the same shape: one fused `qkv` Linear
    (C -> 3C), split into `num_heads` heads of `C // num_heads` channels, `jax_natten.na{rank}d`,
    the `proj` Linear (C -> C), then Dropout(`proj_dropout`).

    Args:
      in_features: C, channels of the input and output.
      num_heads: attention heads; must divide `in_features`.
      kernel_size, stride, dilation, is_causal: int/bool or per-axis tuple (NATTEN semantics).
      qkv_bias: whether the qkv projection has a bias (the output projection always has one).
      rel_pos_bias: learn a relative positional bias `rpb` of shape `[num_heads, 2k-1 per axis]`
        (truncated normal, std 0.02); only for non-causal, stride-1 layers, else ValueError.
      scale: logit scale; default `head_dim ** -0.5`.
      proj_dropout: dropout rate applied to the output projection.
      dtype: computation dtype; default: inferred from input and parameters, as in Flax.
      param_dtype: parameter dtype.
      backend: `jax_natten` backend name, or None for the best available.
      deterministic: default of `__call__`'s `deterministic`; set by `model.train()`/`eval()`.
      kernel_init, bias_init, rpb_init: parameter initializers.
      rngs: `nnx.Rngs`; streams 'params' and (if `proj_dropout > 0`) 'dropout'.
    """

    rank: ClassVar[int] = 0  # set by the 1D/2D/3D subclasses

    def __init__(self, in_features: int, num_heads: int, kernel_size, *, stride=1, dilation=1,
                 is_causal=False, qkv_bias: bool = True, rel_pos_bias: bool = False,
                 scale: float | None = None, proj_dropout: float = 0.0, dtype: Any = None,
                 param_dtype: Any = jnp.float32, backend: str | None = None,
                 deterministic: bool | None = None,
                 kernel_init=nnx.initializers.lecun_normal(),
                 bias_init=nnx.initializers.zeros_init(),
                 rpb_init=common.default_rpb_init,
                 rngs: nnx.Rngs):
        self.config = common.make_config(
            self.rank, num_heads, kernel_size, stride=stride, dilation=dilation,
            is_causal=is_causal, rel_pos_bias=rel_pos_bias, scale=scale, backend=backend)
        self.head_dim = self.config.head_dim(in_features)
        self.in_features = in_features
        self.num_heads = num_heads
        self.proj_dropout = proj_dropout
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.deterministic = deterministic
        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                     bias_init=bias_init, rngs=rngs)
        self.qkv = nnx.Linear(in_features, 3 * in_features, use_bias=qkv_bias, **dense)
        self.proj = nnx.Linear(in_features, in_features, **dense)
        if rel_pos_bias:
            self.rpb = nnx.Param(rpb_init(rngs.params(), self.config.rpb_shape, param_dtype))
        else:
            self.rpb = nnx.data(None)
        self.dropout = nnx.Dropout(proj_dropout, rngs=rngs if proj_dropout > 0 else None)

    def set_view(self, deterministic: bool | None = None):
        """Used by `nnx.view(model, deterministic=...)`: sets the default dropout mode."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
                 rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None) -> jax.Array:
        """`x [batch, *spatial, in_features]` -> same shape.

        `deterministic` (dropout off) overrides the attribute; `rngs` overrides the dropout
        stream given at construction.
        """
        common.check_input(self.config, x, self.in_features)
        rpb = None if self.rpb is None else self.rpb[...]
        y = self.proj(common.attend(self.config, self.qkv(x), rpb))
        if self.proj_dropout > 0:
            deterministic = common.resolve_deterministic(
                type(self).__name__, deterministic, self.deterministic)
            y = self.dropout(y, deterministic=deterministic, rngs=rngs)
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
