"""The unfused ops (`na*d_qk`, `na*d_av`) on "cpu", "naive" and "gemm", one custom call each way,
and the attention op on "naive" / "gemm", composed of them.

    qk (custom_vjp):  _qk_fwd -> ffi.qk_fwd -> natten_{cpu,naive,gemm}_qk_fwd    -> w
                      _qk_bwd -> ffi.qk_bwd -> natten_{cpu,naive,gemm}_qk_bwd    -> dq, dk, ...
    av (custom_vjp):  _av_fwd -> ffi.av_fwd -> natten_{cpu,naive,gemm}_av_fwd    -> o
                      _av_bwd -> ffi.av_bwd -> natten_{cpu,naive,gemm}_av_bwd    -> dw, dv, ...
    attention:        qk (float32 logits) -> softmax (_softmax.softmax_lse) -> av_f32_weights
                      (JAX differentiates the composition; av_f32_weights' weight gradient
                      comes from the qk kernels, in float32)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import sharding
from .._softmax import softmax_lse
from . import ffi

BACKENDS = ("cpu", "naive", "gemm")  # the qk / av ops
ATTENTION_BACKENDS = ("naive", "gemm")  # the attention op composed of them


def unsupported(backend: str, head_dims: tuple) -> str | None:
    """Why `backend` cannot serve this call for its head dims (None if it can): the "gemm"
    kernels move rows as 16-byte vectors."""
    if backend != "gemm":
        return None
    multiple = ffi.LIMITS["gemm_head_dim_multiple"]
    if any(d % multiple or d == 0 for d in head_dims):
        return (f"head dims must be multiples of {multiple} ({multiple}, {2 * multiple}, ..., "
                f"any size), got {', '.join(map(str, head_dims))}")
    return None


# Arguments in kernel layout; `params` (padded NAParams) and `backend` are static.

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def qk(q, k, rpb, add_k, params, backend, out_dtype=None):
    """-> w: unscaled logits q.k + rpb per window offset, then per additional key; in q's dtype,
    or float32 with `out_dtype=jnp.float32`."""
    return ffi.qk_fwd(backend, q, k, rpb, add_k, params, out_dtype)


def _qk_fwd(q, k, rpb, add_k, params, backend, out_dtype=None):
    return ffi.qk_fwd(backend, q, k, rpb, add_k, params, out_dtype), (q, k, rpb, add_k)


def _qk_bwd(params, backend, out_dtype, res, dw):
    q, k, rpb, add_k = res
    dq, dk, drpb, dak = ffi.qk_bwd(backend, q, k, rpb, add_k, dw, params)
    return sharding.like_primals((dq, dk, None if rpb is None else drpb.astype(rpb.dtype),
                                  None if add_k is None else dak), (q, k, rpb, add_k))


qk.defvjp(_qk_fwd, _qk_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def av(w, v, add_v, params, backend):
    """-> o = sum_t w[..., t] v[key t] (+ additional values)."""
    return ffi.av_fwd(backend, w, v, add_v, params)


def _av_fwd(w, v, add_v, params, backend):
    return ffi.av_fwd(backend, w, v, add_v, params), (w, v, add_v)


def _av_bwd(params, backend, res, do):
    w, v, add_v = res
    dw, dv, dav = ffi.av_bwd(backend, w, v, add_v, do, params)
    return sharding.like_primals((dw, dv, None if add_v is None else dav), (w, v, add_v))


av.defvjp(_av_fwd, _av_bwd)


def f32_logits(q, k, rpb, add_k, params, scale, backend):
    """scale * q.k + rpb in float32 from the qk kernels of `backend` (they accumulate in float32
    and store the logits unrounded: in float16 / bfloat16, large logits would lose their
    differences, and overflow float16 past 65504). The scale multiplies those logits rather than
    q (no rounding of scale * q to q's dtype); the kernels add the bias, divided by the scale
    first so that it comes out unscaled."""
    f32 = jnp.float32
    if scale > 0:
        bias = None if rpb is None else rpb.astype(f32) / scale
        return qk(q, k, bias, add_k, params, backend, f32) * scale  # -inf stays -inf
    # scale * -inf would not stay -inf: scale q instead.
    return qk((q.astype(f32) * scale).astype(q.dtype), k, rpb, add_k, params, backend, f32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def av_f32_weights(w, v, add_v, params, backend):
    """av of float32 weights, rounded to v's dtype for the product, whose weight gradient
    dP[i, t] = do_i . v[key t] stays float32: av's own would come back in the weights' rounded
    dtype, and the softmax's gradient P (dP - sum(P dP)) cancels where dP is nearly constant
    over a row, leaving the rounding of dP (eps(bfloat16) |dP|) as its error. dP is what the qk
    kernels compute with do as the queries and v as the keys, in float32."""
    return av(w.astype(v.dtype), v, add_v, params, backend)


def _av_f32_weights_fwd(w, v, add_v, params, backend):
    return av_f32_weights(w, v, add_v, params, backend), (w, v, add_v)


def _av_f32_weights_bwd(params, backend, res, do):
    w, v, add_v = res
    _, dv, dav = ffi.av_bwd(backend, w.astype(v.dtype), v, add_v, do, params)
    dw = qk(do.astype(v.dtype), v, None, add_v, params, backend, jnp.float32)
    dw = jnp.where(jnp.isneginf(dw), 0.0, dw)  # entries past a causal query
    return sharding.like_primals((dw, dv, None if add_v is None else dav), (w, v, add_v))


av_f32_weights.defvjp(_av_f32_weights_fwd, _av_f32_weights_bwd)


def attention(q, k, v, rpb, add_k, add_v, params, scale, backend):
    """-> (o, lse) as qk (float32 logits) -> softmax -> av. The weights are normalized by their
    own sum and their gradient stays accurate near one-hot rows (_softmax.py); av takes them in
    v's dtype, and their gradient comes back in float32 (av_f32_weights)."""
    weights, lse = softmax_lse(f32_logits(q, k, rpb, add_k, params, scale, backend))
    return av_f32_weights(weights, v, add_v, params, backend), lse
