"""Argument normalization and validation: every bad input fails here, before anything is traced.

Everything the kernels see is first brought to one canonical form (`Problem`): per-axis parameter
tuples padded to three spatial axes, extra leading dims folded into the batch. The errors say what was
wrong and what is allowed (docs/semantics.md §11).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Sequence

import numpy as np
import jax
import jax.numpy as jnp

MAX_RANK = 3


@dataclasses.dataclass(frozen=True)
class NAParams:
    """Per-axis NA parameters; hashable so they can be static arguments of jit/custom_vjp."""

    kernel_size: tuple
    stride: tuple
    dilation: tuple
    is_causal: tuple

    @property
    def rank(self) -> int:
        return len(self.kernel_size)

    @property
    def window_size(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def rpb_shape(self) -> tuple:
        return tuple(2 * k - 1 for k in self.kernel_size)

    @property
    def rpb_allowed(self) -> bool:
        return not any(self.is_causal) and all(s == 1 for s in self.stride)

    def padded(self) -> "NAParams":
        """The same problem on three spatial axes: leading axes of length 1 with a window of 1."""
        pad = MAX_RANK - self.rank
        return NAParams((1,) * pad + self.kernel_size, (1,) * pad + self.stride,
                        (1,) * pad + self.dilation, (False,) * pad + self.is_causal)


def _per_axis(name: str, value, rank: int, kind) -> tuple:
    """An int (or bool) or a per-axis sequence of them -> a tuple of length `rank`."""
    def check(v):
        if kind is bool:
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool or a tuple of {rank} bools, got {value!r}")
            return bool(v)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int or a tuple of {rank} ints, got {value!r}")
        return int(v)

    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != rank:
            raise ValueError(f"{name} has {len(value)} entries but the attention is {rank}-D: "
                             f"give an int or a tuple of {rank}, got {value!r}")
        return tuple(check(v) for v in value)
    return (check(value),) * rank


def make_params(rank: int, kernel_size, stride=1, dilation=1, is_causal=False) -> NAParams:
    """Per-axis NA parameters, validated on their own (docs/semantics.md §2-§5)."""
    params = NAParams(_per_axis("kernel_size", kernel_size, rank, int),
                      _per_axis("stride", stride, rank, int),
                      _per_axis("dilation", dilation, rank, int),
                      _per_axis("is_causal", is_causal, rank, bool))
    for ax, (k, s, d) in enumerate(zip(params.kernel_size, params.stride, params.dilation)):
        if k < 2:
            raise ValueError(f"kernel_size must be >= 2 on every axis, got {k} on axis {ax}")
        if d < 1:
            raise ValueError(f"dilation must be >= 1 on every axis, got {d} on axis {ax}")
        if not 1 <= s <= k:
            raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size, got stride {s} "
                             f"with kernel_size {k} on axis {ax}")
    return params


def normalize_params(rank: int, spatial: tuple, kernel_size, stride=1, dilation=1,
                     is_causal=False, layout: str = "") -> NAParams:
    """Validate NA parameters, and against the spatial shape. `layout`: how the input shape was
    read, added to the error (shapes read the wrong way are the usual cause)."""
    params = make_params(rank, kernel_size, stride, dilation, is_causal)
    for ax, (L, k, d) in enumerate(zip(spatial, params.kernel_size, params.dilation)):
        if k * d > L:
            raise ValueError(f"kernel_size * dilation must not exceed the axis length: axis {ax} "
                             f"has length {L} but kernel_size {k} * dilation {d} = {k * d}"
                             + (f". {layout}" if layout else ""))
    return params


def _axes(rank: int) -> str:
    return ", ".join("XYZ"[:rank])


def _read_as(name: str, shape: tuple, rank: int) -> str:
    """How a heads-last input shape is read: 'query shape (2, 9, 4, 8) is read heads-last as
    [B, X, heads, D] = [2, 9, 4, 8]' (extra leading dims fold into B)."""
    n = len(shape) - rank - 2
    b = "x".join(map(str, shape[:n])) if n else "1"
    dims = [b, *map(str, shape[n:])]
    return (f"{name} shape {tuple(shape)} is read heads-last as [B, {_axes(rank)}, heads, D] = "
            f"[{', '.join(dims)}]")


def _looks_heads_first(shape: tuple, rank: int, strict: bool = True) -> bool:
    """A heads-first input [B, heads, *spatial, D] read heads-last puts the heads on the first
    spatial axis and the last spatial axis on the heads: a short first "axis" and more "heads".
    `strict` (a warning about an input that is otherwise accepted): at least 16 "heads", more than
    twice the first axis; else (a hint in an error that is raised anyway) more than the first."""
    n = len(shape) - rank - 2
    first, heads = shape[n], shape[-2]
    if strict:
        return first <= 32 and heads >= 16 and heads > 2 * first
    return first <= 32 and heads > first


def _heads_first_hint(shape: tuple, rank: int) -> str:
    return (f"If it is heads-first [B, heads, {_axes(rank)}, D], move the heads axis: "
            f"jnp.moveaxis(x, {len(shape) - rank - 2}, -2)")


_WARNED_HEADS_FIRST: set = set()


def _warn_heads_first(shape: tuple, rank: int) -> None:
    key = (tuple(shape), rank)
    if key in _WARNED_HEADS_FIRST:
        return
    _WARNED_HEADS_FIRST.add(key)
    warnings.warn(f"{_read_as('query', shape, rank)}, which looks heads-first (few positions "
                  f"on the first axis, many heads). {_heads_first_hint(shape, rank)}",
                  UserWarning, stacklevel=5)


def check_scale(scale):
    """`scale`: None, a finite real number, or a scalar array (a traced one too) -> None, a float,
    or the traced scalar."""
    if scale is None:
        return None
    if isinstance(scale, (bool, np.bool_)):
        raise TypeError(f"scale must be a finite real number, got {scale!r}")
    if isinstance(scale, numbers.Real):
        value = float(scale)
    elif hasattr(scale, "shape") and hasattr(scale, "dtype"):
        if tuple(scale.shape) != ():
            raise ValueError(f"scale must be a scalar, got an array of shape {tuple(scale.shape)}")
        if not (jnp.issubdtype(scale.dtype, jnp.floating)
                or jnp.issubdtype(scale.dtype, jnp.integer)):
            raise TypeError(f"scale must be a real scalar, got dtype {scale.dtype}")
        if isinstance(scale, jax.core.Tracer):
            return scale  # traced (jit/grad over the scale): applied to the query in the graph
        value = float(scale)
    else:
        raise TypeError(f"scale must be a finite real number or a scalar array, got "
                        f"{scale!r} ({type(scale).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def _check_float(name: str, x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


@dataclasses.dataclass(frozen=True)
class Problem:
    """Shapes of one validated call, in the folded form [B, *spatial, heads, D]."""

    lead: tuple          # the caller's leading dims, folded into `batch`
    batch: int
    spatial: tuple
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    num_additional: int  # S_add, 0 when there are no additional keys
    params: NAParams


def _split(name: str, x, rank: int):
    if x.ndim < rank + 3:
        raise ValueError(f"{name} must be heads-last [B, {_axes(rank)}, heads, D] (rank >= "
                         f"{rank + 3}; extra leading dims fold into B), like "
                         f"jax.nn.dot_product_attention; got shape {tuple(x.shape)}")
    n = x.ndim - rank - 2
    return tuple(x.shape[:n]), tuple(x.shape[n:n + rank]), x.shape[-2], x.shape[-1]


def check_attention(rank: int, query, key, value, kernel_size, stride, dilation, is_causal,
                    rpb=None, additional_keys=None, additional_values=None) -> Problem:
    """Validate the fused op's arguments. `key` or `value` may be None (qk / av ops)."""
    _check_float("query", query)
    lead, spatial, heads, head_dim = _split("query", query, rank)
    kv_heads, value_dim = None, None
    for name, x in (("key", key), ("value", value)):
        if x is None:
            continue
        _check_float(name, x)
        if x.dtype != query.dtype:
            raise TypeError(f"{name} dtype {x.dtype} differs from query dtype {query.dtype}")
        xl, xs, xh, xd = _split(name, x, rank)
        if (xl, xs) != (lead, spatial):
            raise ValueError(f"{name} shape {tuple(x.shape)} does not match query shape "
                             f"{tuple(query.shape)} in batch and spatial dims")
        if kv_heads is not None and xh != kv_heads:
            raise ValueError(f"key and value must have the same number of heads, got {kv_heads} "
                             f"and {xh}")
        kv_heads = xh
        if name == "key" and xd != head_dim:
            raise ValueError(f"key head_dim {xd} differs from query head_dim {head_dim}")
        if name == "value":
            value_dim = xd
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads "
                         f"({kv_heads}) (GQA/MQA)")
    layout = _read_as("query", tuple(query.shape), rank)
    if _looks_heads_first(tuple(query.shape), rank, strict=False):
        layout += ". " + _heads_first_hint(tuple(query.shape), rank)
    params = normalize_params(rank, spatial, kernel_size, stride, dilation, is_causal, layout)
    if _looks_heads_first(tuple(query.shape), rank):
        _warn_heads_first(tuple(query.shape), rank)
    num_additional = _check_additional(lead, kv_heads, head_dim, value_dim, query.dtype,
                                       additional_keys, additional_values)
    if rpb is not None:
        _check_float("rpb", rpb)
        if not params.rpb_allowed:
            raise ValueError("rpb (relative positional bias) is only defined for non-causal NA "
                             f"with stride 1, got is_causal={params.is_causal}, "
                             f"stride={params.stride}")
        want = (heads,) + params.rpb_shape
        if tuple(rpb.shape) != want:
            raise ValueError(f"rpb must have shape [heads, 2*k-1 per axis] = {want}, "
                             f"got {tuple(rpb.shape)}")
    return Problem(lead, math.prod(lead), spatial, heads, kv_heads, head_dim,
                   value_dim if value_dim is not None else head_dim, num_additional, params)


def _check_additional(lead, kv_heads, head_dim, value_dim, dtype, add_k, add_v) -> int:
    """Additional keys [*lead, S, kv_heads, D] and values [*lead, S, kv_heads, Dv]; -> S."""
    for name, x, d in (("additional_keys", add_k, head_dim),
                       ("additional_values", add_v, value_dim)):
        if x is None:
            continue
        _check_float(name, x)
        if x.dtype != dtype:
            raise TypeError(f"{name} dtype {x.dtype} differs from query dtype {dtype}")
        if (x.ndim != len(lead) + 3 or tuple(x.shape[:len(lead)]) != lead
                or x.shape[-2] != kv_heads or (d is not None and x.shape[-1] != d)):
            want = f"[{', '.join(map(str, lead))}, S_add, {kv_heads}, {d if d else 'D'}]"
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if add_k is not None and add_v is not None and add_k.shape[-3] != add_v.shape[-3]:
        raise ValueError(f"additional_keys and additional_values must hold the same number of "
                         f"tokens, got {add_k.shape[-3]} and {add_v.shape[-3]}")
    if add_k is None and add_v is None:
        return 0
    return (add_k if add_k is not None else add_v).shape[-3]


def check_weights(rank: int, weights, value, kernel_size, stride, dilation, is_causal,
                  additional_values=None) -> Problem:
    """Validate the av op: weights [B, *spatial, heads, prod(kernel) + S_add], value."""
    _check_float("weights", weights)
    _check_float("value", value)
    lead, spatial, heads, width = _split("weights", weights, rank)
    vl, vs, kv_heads, value_dim = _split("value", value, rank)
    if (vl, vs) != (lead, spatial):
        raise ValueError(f"value shape {tuple(value.shape)} does not match weights shape "
                         f"{tuple(weights.shape)} in batch and spatial dims")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"weights heads ({heads}) must be a multiple of value heads "
                         f"({kv_heads}) (GQA/MQA)")
    params = normalize_params(rank, spatial, kernel_size, stride, dilation, is_causal,
                              _read_as("weights", tuple(weights.shape), rank))
    num_additional = _check_additional(lead, kv_heads, None, value_dim, value.dtype, None,
                                       additional_values)
    if width != params.window_size + num_additional:
        raise ValueError(f"weights last dim must be prod(kernel_size) + S_add = "
                         f"{params.window_size} + {num_additional}, got {width}")
    return Problem(lead, math.prod(lead), spatial, heads, kv_heads, None, value_dim,
                   num_additional, params)


def check_merge(outputs, lses):
    if len(outputs) != len(lses) or not outputs:
        raise ValueError(f"merge_attentions needs as many outputs as lses (at least one), got "
                         f"{len(outputs)} outputs and {len(lses)} lses")
    for o, l in zip(outputs, lses):
        _check_float("output", o)
        _check_float("lse", l)
        if tuple(o.shape[:-1]) != tuple(l.shape) or tuple(o.shape) != tuple(outputs[0].shape):
            raise ValueError("every output must have one shape [..., heads, D] and every lse the "
                             f"shape [..., heads]; got {tuple(o.shape)} and {tuple(l.shape)}")
