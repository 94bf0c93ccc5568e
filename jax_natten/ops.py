"""Public neighborhood-attention ops (docs/semantics.md): validation, layout, dispatch.

Every public call goes: validate (`_checks`) -> fold leading dims into the batch and pad to three
spatial axes -> pick a backend (`backends.resolve`) -> the backend module's op -> unpad:

    na{1,2,3}d    -> _na    -> _attention -> reference.attention | fna.attention | unfused.attention
    na{1,2,3}d_qk -> _na_qk -> _qk        -> reference.qk | unfused.qk
    na{1,2,3}d_av -> _na_av -> _av        -> reference.av | unfused.av

The native ops (backends/fna.py, backends/unfused.py) carry their own custom_vjp rules and call
their custom calls through backends/ffi.py; the reference backend is differentiated by autodiff.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _checks, config
from .backends import BACKENDS, fna, reference, resolve, unfused


# ----------------------------------------------------------------------------- layout

def _to_kernel_layout(x, problem: _checks.Problem):
    """[*lead, *spatial, H, D] -> [B, X, Y, Z, H, D] (leading spatial axes of length 1)."""
    pad = (1,) * (_checks.MAX_RANK - len(problem.spatial))
    return x.reshape((problem.batch,) + pad + problem.spatial + tuple(x.shape[-2:]))


def _from_kernel_layout(x, problem: _checks.Problem, tail: int):
    """[B, X, Y, Z, (tail dims)] -> [*lead, *spatial, (tail dims)]."""
    return x.reshape(problem.lead + problem.spatial + tuple(x.shape[x.ndim - tail:]))


def _fold_additional(x, problem):
    return None if x is None else x.reshape((problem.batch,) + tuple(x.shape[-3:]))


def _pad_rpb(rpb, problem):
    if rpb is None:
        return None
    pad = (1,) * (_checks.MAX_RANK - len(problem.spatial))
    return rpb.reshape(rpb.shape[:1] + pad + rpb.shape[1:])


# ----------------------------------------------------------------------------- dispatch
# Arguments in kernel layout; `params` is padded NAParams. Each op goes to the backend module that
# runs it (backends/__init__.py has the table).

def _attention(q, k, v, rpb, add_k, add_v, params, scale, backend, settings=None):
    """-> (o, lse). `settings`: fna.FusedSettings for "fused", else None."""
    if backend == "reference":
        return reference.attention(q, k, v, rpb, add_k, add_v, params, scale)
    if backend in fna.BACKENDS:
        return fna.attention(q, k, v, rpb, add_k, add_v, params, scale, backend, settings)
    return unfused.attention(q, k, v, rpb, add_k, add_v, params, scale, backend)


def _qk(q, k, rpb, add_k, params, backend):
    if backend == "reference":
        return reference.qk(q, k, rpb, add_k, params)
    return unfused.qk(q, k, rpb, add_k, params, backend)


def _av(w, v, add_v, params, backend):
    if backend == "reference":
        return reference.av(w, v, add_v, params)
    return unfused.av(w, v, add_v, params, backend)


# ----------------------------------------------------------------------------- public API

def _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
        additional_keys, additional_values, return_lse, backend):
    problem = _checks.check_attention(rank, query, key, value, kernel_size, stride, dilation,
                                      is_causal, rpb, additional_keys, additional_values)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    backend = resolve(backend, "attention", query.dtype, (problem.head_dim, problem.value_dim))
    fna.check_heads(backend, problem.heads)
    if scale is None:  # head_dim 0: every logit is 0 whatever the scale
        scale = problem.head_dim ** -0.5 if problem.head_dim else 1.0
    scale = float(scale)
    settings = fna.FusedSettings.of(config.current(), rank)
    if problem.batch == 0 or problem.heads == 0:
        # No query rows: nothing to compute (no kernel runs on an empty problem); the gradients
        # of k, v, rpb and the additional tokens are zeros.
        rows = query.shape[:-1]
        out = jnp.zeros(rows + (problem.value_dim,), query.dtype)
        return (out, jnp.zeros(rows, jnp.float32)) if return_lse else out
    lay = functools.partial(_to_kernel_layout, problem=problem)
    out, lse = _attention(lay(query), lay(key), lay(value), _pad_rpb(rpb, problem),
                          _fold_additional(additional_keys, problem),
                          _fold_additional(additional_values, problem),
                          problem.params.padded(), scale, backend,
                          settings if backend == "fused" else None)
    out = _from_kernel_layout(out, problem, 2)
    return (out, _from_kernel_layout(lse, problem, 1)) if return_lse else out


def _na_qk(rank, query, key, kernel_size, stride, dilation, is_causal, rpb, additional_keys,
           backend):
    problem = _checks.check_attention(rank, query, key, None, kernel_size, stride, dilation,
                                      is_causal, rpb, additional_keys, None)
    backend = resolve(backend, "qk", query.dtype, (problem.head_dim,))
    lay = functools.partial(_to_kernel_layout, problem=problem)
    w = _qk(lay(query), lay(key), _pad_rpb(rpb, problem),
            _fold_additional(additional_keys, problem), problem.params.padded(), backend)
    return _from_kernel_layout(w, problem, 2)


def _na_av(rank, weights, value, kernel_size, stride, dilation, is_causal, additional_values,
           backend):
    problem = _checks.check_weights(rank, weights, value, kernel_size, stride, dilation, is_causal,
                                    additional_values)
    backend = resolve(backend, "av", value.dtype, (problem.value_dim,))
    lay = functools.partial(_to_kernel_layout, problem=problem)
    out = _av(lay(weights), lay(value), _fold_additional(additional_values, problem),
              problem.params.padded(), backend)
    return _from_kernel_layout(out, problem, 2)


_NA_DOC = """{rank}-D neighborhood attention: softmax(scale * q.k + rpb) v over each query's window.

    query: [batch..., {axes}, heads, D]; key/value: [batch..., {axes}, kv_heads, D / D_v]
    (heads % kv_heads == 0). kernel_size, stride, dilation, is_causal: an int/bool or one per axis.
    scale defaults to D ** -0.5. rpb: [heads, {rpb}] relative positional bias (non-causal, stride 1
    only). additional_keys/values: [batch..., S, kv_heads, D / D_v], attended by every query.
    Returns out [batch..., {axes}, heads, D_v], or (out, lse) with lse [batch..., {axes}, heads]
    (natural log, float32) when return_lse. backend: None (best available), "fused", "gemm",
    "naive", "cpu" or "reference".
"""

_QK_DOC = """{rank}-D neighborhood logits q.k (unscaled, + rpb) of every query with its window.

    Returns [batch..., {axes}, heads, prod(kernel_size) (+ S_add)]: entry t is window offset t,
    row-major over the kernel axes, from the window start; entries past a causal query are -inf;
    logits of additional keys follow.
"""

_AV_DOC = """{rank}-D neighborhood aggregation: out = sum_t weights[..., t] * value[key t] (+ additional).

    weights: [batch..., {axes}, heads, prod(kernel_size) (+ S_add)] as returned by na{rank}d_qk
    (entries past a causal query are ignored); value: [batch..., {axes}, kv_heads, D_v].
"""


def _make(rank):
    axes = ", ".join("XYZ"[3 - rank:])
    rpb = ", ".join(f"2*k{i}-1" for i in range(rank))

    def na(query, key, value, kernel_size, *, stride=1, dilation=1, is_causal=False, scale=None,
           rpb=None, additional_keys=None, additional_values=None, return_lse=False,
           backend=None):
        return _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                   additional_keys, additional_values, return_lse, backend)

    def na_qk(query, key, kernel_size, *, stride=1, dilation=1, is_causal=False, rpb=None,
              additional_keys=None, backend=None):
        return _na_qk(rank, query, key, kernel_size, stride, dilation, is_causal, rpb,
                      additional_keys, backend)

    def na_av(weights, value, kernel_size, *, stride=1, dilation=1, is_causal=False,
              additional_values=None, backend=None):
        return _na_av(rank, weights, value, kernel_size, stride, dilation, is_causal,
                      additional_values, backend)

    for f, doc, suffix in ((na, _NA_DOC, ""), (na_qk, _QK_DOC, "_qk"), (na_av, _AV_DOC, "_av")):
        f.__name__ = f.__qualname__ = f"na{rank}d{suffix}"
        f.__doc__ = doc.format(rank=rank, axes=axes, rpb=rpb)
    return na, na_qk, na_av


na1d, na1d_qk, na1d_av = _make(1)
na2d, na2d_qk, na2d_av = _make(2)
na3d, na3d_qk, na3d_av = _make(3)


def merge_attentions(outputs, lses):
    """Merge attention over disjoint key sets by their LSEs: -> (out, lse).

    outputs: sequence of [..., heads, D]; lses: matching [..., heads] natural-log LSEs.
    """
    outputs, lses = list(outputs), list(lses)
    _checks.check_merge(outputs, lses)
    lse_all = jnp.stack([l.astype(jnp.float32) for l in lses])
    lse = jax.nn.logsumexp(lse_all, axis=0)
    weights = jnp.exp(lse_all - lse)[..., None]
    out = sum(w * o.astype(jnp.float32) for w, o in zip(weights, outputs))
    return out.astype(outputs[0].dtype), lse
