"""Softmax and log-sum-exp of attention logits, with a backward that stays accurate at the edges.

Shared by the reference backend and the unfused attention of the GEMM / naive kernels (the host
and fused kernels do the same per row in C++ / CUDA).

Forward: weights normalized by their own sum (not exp(s - lse): once lse is large its float32
rounding exceeds log(window) and those weights no longer sum to 1).

Backward, for a row with weights P, cotangents dP of the weights and dlse of the lse:
    dS_i = P_i (dP_i - sum_j P_j dP_j + dlse).
Near a one-hot row (one weight ~1, the rest tiny) dP_i - sum_j P_j dP_j is a tiny difference of
two nearly equal numbers, and forming the sum first loses it to rounding: in float32 the error
is ~1e-7 |dP| against a result of size (1 - P_max) |dP|. The same difference is written here
relative to the entry m of the largest weight,
    dP_i - sum_j P_j dP_j = (dP_i - dP_m) - sum_{j != m} P_j (dP_j - dP_m),
which holds exactly (the weights sum to 1) and has no cancellation left: the m term is zero, the
others are small weights times ordinary differences.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def softmax_lse(logits):
    """-> (softmax over the last axis, logsumexp over it). -inf entries get weight 0; every row
    needs one finite entry."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / total, (m + jnp.log(total))[..., 0]


def _fwd(logits):
    p, lse = softmax_lse(logits)
    return (p, lse), p


def _bwd(p, cotangents):
    dp, dlse = cotangents
    m = jnp.argmax(p, axis=-1)[..., None]
    d = dp - jnp.take_along_axis(dp, m, axis=-1)  # dP_i - dP_m: exactly 0 at m
    d = jnp.where(p > 0, d, 0)  # masked entries (weight 0) may carry any cotangent
    r = jnp.sum(p * d, axis=-1, keepdims=True)
    return (p * (d - r + dlse[..., None].astype(p.dtype)),)


softmax_lse.defvjp(_fwd, _bwd)
