"""Neighborhood attention with explicit windows: a block of queries over a block of keys.

The public ops derive every query's window from the shape of the array they are given. Spatial
parallelism (`parallel.py`) needs the windows of the *global* problem for a local block of queries
whose keys sit in a larger local key block (own block + halos), at offsets that differ per device.
This module takes those windows as index arrays (NumPy or traced jax arrays) and reuses the
reference backend's gather arithmetic (`reference._logits`, `reference._weighted_values`), so
the numerics are the reference's; gradients come from autodiff.

Layout: flat tokens. q [B, N, H, D], k/v [B, M, KVH, D(v)], keys/valid/rpb_index [N, K]: key
`keys[n, t]` (an index into the M key tokens) is window offset t of query n, attended iff
`valid[n, t]`; `rpb_index[n, t]` indexes `rpb[h].reshape(-1)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .backends import reference

# Gathered elements per chunk of queries: the reference backend's budget.
_CHUNK_ELEMENTS = reference._CHUNK_ELEMENTS


def attention(q, k, v, rpb, add_k, add_v, keys, valid, rpb_index, scale):
    """softmax(scale q.k + rpb) v over the given windows (+ additional keys) -> (out, lse f32)."""
    B, N, H, D = q.shape
    K = keys.shape[-1]
    kv_heads = k.shape[-2]
    acc = reference._acc_dtype(q.dtype)

    def chunk(qc, keys_c, valid_c, rpb_c):
        s = reference._logits(qc.astype(acc) * jnp.asarray(scale, acc), k, rpb, add_k, keys_c,
                              valid_c, rpb_c, kv_heads)
        lse = jax.nn.logsumexp(s, axis=-1)
        p = jnp.exp(s - lse[..., None])
        return reference._weighted_values(p, v, add_v, keys_c, valid_c, kv_heads), lse

    keys, valid, rpb_index = jnp.asarray(keys), jnp.asarray(valid), jnp.asarray(rpb_index)
    size = max(1, min(N, _CHUNK_ELEMENTS // max(1, B * K * (D + v.shape[-1]))))
    if size >= N:
        o, lse = chunk(q, keys, valid, rpb_index)
    else:
        n_chunks = -(-N // size)
        pad = n_chunks * size - N

        def split(x, fill):  # [N, ...] -> [n_chunks, size, ...]
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
            return x.reshape((n_chunks, size) + x.shape[1:])

        # Padded queries see key 0 as valid, so they stay finite (no NaN in any gradient).
        qs = jnp.moveaxis(split(jnp.moveaxis(q, 1, 0), 0), 2, 1)  # [n_chunks, B, size, H, D]
        o, lse = jax.lax.map(lambda a: chunk(*a), (qs, split(keys, 0), split(valid, True),
                                                   split(rpb_index, 0)))
        o = jnp.moveaxis(o, 0, 1).reshape((B, -1) + o.shape[3:])[:, :N]
        lse = jnp.moveaxis(lse, 0, 1).reshape((B, -1) + lse.shape[3:])[:, :N]
    return o.astype(q.dtype), lse.astype(jnp.float32)
