"""`backend="reference"`: pure jax.numpy, the oracle every other backend is tested against.

It gathers each query's neighborhood by static index arrays (from `_window.py`), never an N x N
mask, and walks queries in chunks so the gathered keys stay bounded for large inputs. Arithmetic is
in float32 (float64 for float64 inputs) at full matmul precision. Gradients come from autodiff.

All functions take the padded 3-D layout: q [B, X, Y, Z, H, D], k/v [B, X, Y, Z, KVH, D(v)].
"""
from __future__ import annotations

import functools
import math

import numpy as np
import jax
import jax.numpy as jnp

from .. import _window
from .._softmax import softmax_lse

_HIGHEST = jax.lax.Precision.HIGHEST
# Gathered elements per chunk of queries (~256 MiB of float32): bounds the reference's memory.
_CHUNK_ELEMENTS = 1 << 26


@functools.lru_cache(maxsize=64)
def neighborhood(spatial: tuple, params) -> tuple:
    """Static index arrays for a padded 3-D problem, flattened over tokens and window offsets.

    Returns `(keys [N, K], valid [N, K], rpb_index [N, K])`: the flat key index of window offset t
    of query n, whether it is attended, and the flat index into rpb[h].reshape(-1).
    """
    axes = [_window.axis_neighborhood(L, k, s, d, c) for L, k, s, d, c in
            zip(spatial, params.kernel_size, params.stride, params.dilation, params.is_causal)]
    flat = lambda part, a: _broadcast_flat(part, a, spatial, params.kernel_size)
    keys, rpb_index = 0, 0
    valid = np.ones((math.prod(spatial), params.window_size), bool)
    for a, (axis_keys, axis_valid, axis_rpb) in enumerate(axes):
        # Row-major over (x, y, z) for tokens and over (kx, ky, kz) for offsets.
        keys = keys * spatial[a] + flat(axis_keys, a)
        rpb_index = rpb_index * params.rpb_shape[a] + flat(axis_rpb, a)
        valid = valid & flat(axis_valid, a)
    return keys, valid, rpb_index


def _broadcast_flat(part, axis, spatial, kernel):
    """One axis's [L_a, k_a] table broadcast to all tokens and offsets: [N, K]."""
    shape = [1] * 6
    shape[axis], shape[3 + axis] = part.shape
    return np.broadcast_to(part.reshape(shape), tuple(spatial) + tuple(kernel)).reshape(
        math.prod(spatial), math.prod(kernel))


def _acc_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _over_query_chunks(fn, per_query, per_query_index, tokens: int, work_per_query: int):
    """Run `fn(per_query_chunk, index_chunk)` over chunks of queries, concatenating on axis 1.

    `per_query` arrays have the token axis at 1 ([B, N, ...]); `per_query_index` arrays at 0.
    One chunk when the gathered work fits the budget, else a `lax.map` over padded chunks.
    """
    chunk = max(1, min(tokens, _CHUNK_ELEMENTS // max(1, work_per_query)))
    if chunk >= tokens:
        return fn(per_query, per_query_index)
    n_chunks = -(-tokens // chunk)
    pad = n_chunks * chunk - tokens

    def split(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths) if isinstance(x, jax.Array) else np.pad(x, widths)
        x = x.reshape(x.shape[:axis] + (n_chunks, chunk) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    xs = ([split(x, 1) for x in per_query], [split(np.asarray(i), 0) for i in per_query_index])
    outs = jax.lax.map(lambda a: fn(*a), xs)
    merge = lambda y: jnp.moveaxis(y, 0, 1).reshape(
        (y.shape[1], n_chunks * chunk) + y.shape[3:])[:, :tokens]
    return jax.tree.map(merge, outs)


def _logits(q, k, rpb, add_k, keys, valid, rpb_index, kv_heads):
    """Raw logits q.k (+ rpb) of one chunk of queries, -inf where invalid: [B, n, H, K + S]."""
    B, n, H, D = q.shape
    groups = H // kv_heads
    acc = _acc_dtype(q.dtype)
    qg = q.astype(acc).reshape(B, n, kv_heads, groups, D)
    kg = k.astype(acc)[:, keys]  # [B, n, K, KVH, D]
    s = jnp.einsum("bnhgd,bnkhd->bnhgk", qg, kg, precision=_HIGHEST).reshape(B, n, H, kg.shape[2])
    if rpb is not None:
        bias = rpb.astype(acc).reshape(H, math.prod(rpb.shape[1:]))[:, rpb_index]  # [H, n, K]
        s = s + jnp.transpose(bias, (1, 0, 2))[None]
    s = jnp.where(valid[None, :, None, :], s, -jnp.inf)
    if add_k is not None:
        sa = jnp.einsum("bnhgd,bshd->bnhgs", qg, add_k.astype(acc), precision=_HIGHEST)
        s = jnp.concatenate([s, sa.reshape(B, n, H, sa.shape[-1])], axis=-1)
    return s


def _weighted_values(w, v, add_v, keys, valid, kv_heads):
    """sum_t w[t] v[key t] (+ additional values) for one chunk of queries: [B, n, H, Dv]."""
    B, n, H, _ = w.shape
    K = keys.shape[-1]
    groups = H // kv_heads
    acc = _acc_dtype(jnp.promote_types(w.dtype, v.dtype))
    wk = jnp.where(valid[None, :, None, :], w[..., :K].astype(acc), 0)
    wk = wk.reshape(B, n, kv_heads, groups, K)
    vg = v.astype(acc)[:, keys]  # [B, n, K, KVH, Dv]
    o = jnp.einsum("bnhgk,bnkhd->bnhgd", wk, vg, precision=_HIGHEST)
    if add_v is not None:
        wa = w[..., K:].astype(acc).reshape(B, n, kv_heads, groups, w.shape[-1] - K)
        o = o + jnp.einsum("bnhgs,bshd->bnhgd", wa, add_v.astype(acc), precision=_HIGHEST)
    return o.reshape(B, n, H, o.shape[-1])


def _flat(x):
    """[B, X, Y, Z, H, D] -> [B, N, H, D] (shapes spelled out: any dim may be 0)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:4]), *x.shape[-2:])


def qk(q, k, rpb, add_k, params):
    """Unscaled logits with rpb, -inf past causal queries: [B, X, Y, Z, H, K + S] in q's dtype."""
    spatial = q.shape[1:4]
    keys, valid, rpb_index = neighborhood(spatial, params)
    kv_heads = k.shape[-2]
    fn = lambda qs, idx: (_logits(qs[0], _flat(k), rpb, add_k, *idx, kv_heads),)
    (s,) = _over_query_chunks(fn, [_flat(q)], [keys, valid, rpb_index], keys.shape[0],
                              q.shape[0] * keys.shape[1] * q.shape[-1])
    return s.astype(q.dtype).reshape(q.shape[:-1] + (s.shape[-1],))


def av(w, v, add_v, params):
    """Weights [B, X, Y, Z, H, K + S] times the neighborhood values: [B, X, Y, Z, H, Dv]."""
    spatial = w.shape[1:4]
    keys, valid, _ = neighborhood(spatial, params)
    kv_heads = v.shape[-2]
    fn = lambda ws, idx: (_weighted_values(ws[0], _flat(v), add_v, *idx, kv_heads),)
    (o,) = _over_query_chunks(fn, [_flat(w)], [keys, valid], keys.shape[0],
                              w.shape[0] * keys.shape[1] * v.shape[-1])
    return o.astype(v.dtype).reshape(w.shape[:-1] + (v.shape[-1],))


def attention(q, k, v, rpb, add_k, add_v, params, scale):
    """Fused NA: softmax(scale q.k + rpb) v over window + additional keys; -> (out, lse f32)."""
    spatial = q.shape[1:4]
    keys, valid, rpb_index = neighborhood(spatial, params)
    kv_heads = k.shape[-2]
    acc = _acc_dtype(q.dtype)

    def fn(qs, idx):
        keys_c, valid_c, rpb_c = idx
        s = _logits(qs[0].astype(acc) * jnp.asarray(scale, acc), _flat(k), rpb, add_k, keys_c,
                    valid_c, rpb_c, kv_heads)
        p, lse = softmax_lse(s)  # normalized weights, accurate near one-hot rows (_softmax.py)
        return _weighted_values(p, _flat(v), add_v, keys_c, valid_c, kv_heads), lse

    work = q.shape[0] * keys.shape[1] * (q.shape[-1] + v.shape[-1])
    o, lse = _over_query_chunks(fn, [_flat(q)], [keys, valid, rpb_index], keys.shape[0], work)
    out_shape = q.shape[:-1]
    return (o.astype(q.dtype).reshape(out_shape + (v.shape[-1],)),
            lse.astype(jnp.float32).reshape(out_shape))
