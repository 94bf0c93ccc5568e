"""Public neighborhood-attention ops (docs/semantics.md): validation, layout, dispatch, custom_vjp.

Every public call goes: validate (`_checks`) -> fold leading dims into the batch and pad to three
spatial axes -> pick a backend -> run -> unpad. Native backends are differentiated by custom_vjp
rules that call their backward kernels; the reference backend by autodiff.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _checks, config, sharding
from .backends import ffi, reference

BACKENDS = ("fused", "gemm", "naive", "cpu", "reference")
_NATIVE_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


# ----------------------------------------------------------------------------- backend choice

def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


# Head dims the tensor-core tiles of each CUDA backend take (D for qk, D_v for av, both for the
# fused op); the others take any head dim.
_HEAD_DIM_MULTIPLE = {"gemm": 8, "fused": 8}
_HEAD_DIM_MAX = {"fused": 128}
# The fused kernels run float16 / bfloat16 on tensor cores and float32 at full precision on the
# CUDA cores (cuda/fna/simt_f32.cu); the default sends float32 to "gemm" (resolve_backend).
_FUSED_MAX_HEADS = 65535


def _unsupported(backend: str, op: str, dtype, head_dims: tuple) -> str | None:
    """Why `backend` cannot serve this call, or None if it can."""
    if backend == "reference":
        return None
    if backend == "fused" and op != "attention":
        return "'fused' has no unfused qk/av ops: use 'gemm', 'naive', 'cpu' or 'reference'"
    if not ffi.available(backend):
        return ffi.unavailable_reason(backend)
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _NATIVE_DTYPES]:
        return f"dtype {jnp.dtype(dtype)} is not supported (float32, float16, bfloat16 are)"
    multiple, most = _HEAD_DIM_MULTIPLE.get(backend), _HEAD_DIM_MAX.get(backend)
    if multiple and any(d % multiple or (most and d > most) for d in head_dims):
        limit = f"up to {most}" if most else "any size"
        return (f"head dims must be multiples of {multiple} ({multiple}, {2 * multiple}, ..., "
                f"{limit}), got {', '.join(map(str, head_dims))}")
    return None


def resolve_backend(backend, op: str, dtype, head_dims: tuple) -> str:
    """The backend that serves a call: the user's choice (checked), or the best available one.
    `head_dims`: the head dims the op's kernels see (D and D_v; D for qk; D_v for av)."""
    if backend is None:
        if _on_gpu() and op == "attention":
            # float32: the GEMM kernels are faster on all but small windows (BENCHMARKS.md); the
            # fused float32 kernels need no [N, prod(kernel)] temporaries (backend="fused").
            f32 = jnp.dtype(dtype) == jnp.float32
            prefs = ("gemm", "fused", "reference") if f32 else ("fused", "gemm", "reference")
        elif _on_gpu():
            prefs = ("gemm", "naive", "reference")
        else:
            prefs = ("cpu", "reference")
        return next(b for b in prefs if _unsupported(b, op, dtype, head_dims) is None)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or None")
    why = _unsupported(backend, op, dtype, head_dims)
    if why is not None:
        raise ValueError(f"backend {backend!r} cannot serve this call: {why}")
    return backend


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


# ----------------------------------------------------------------------------- differentiable cores
# Arguments are in kernel layout; `params` is padded NAParams (static), like `scale` and `backend`.

# `tuning`: (q_tile, kv_tile, deterministic, mma) of the fused kernels (config.tuning), None for
# "cpu".
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _native_attention(q, k, v, rpb, add_k, add_v, params, scale, backend, tuning):
    return ffi.fna_forward(backend, q, k, v, rpb, add_k, add_v, params, scale, tuning)


def _native_attention_fwd(q, k, v, rpb, add_k, add_v, params, scale, backend, tuning):
    o, lse = ffi.fna_forward(backend, q, k, v, rpb, add_k, add_v, params, scale, tuning)
    return (o, lse), (q, k, v, rpb, add_k, add_v, o, lse)


def _native_attention_bwd(params, scale, backend, tuning, res, cotangents):
    q, k, v, rpb, add_k, add_v, o, lse = res
    do, dlse = cotangents
    dq, dk, dv, drpb, dak, dav = ffi.fna_backward(backend, q, k, v, rpb, add_k, add_v, o, lse, do,
                                                  dlse, params, scale, tuning)
    if backend == "fused" and tuning[2] and rpb is not None:
        drpb = _fixed_order_drpb(q, k, v, rpb, o, lse, do, dlse, params, scale)
    return sharding.like_primals((dq, dk, dv, None if rpb is None else drpb.astype(rpb.dtype),
                                  None if add_k is None else dak, None if add_v is None else dav),
                                 (q, k, v, rpb, add_k, add_v))


_native_attention.defvjp(_native_attention_fwd, _native_attention_bwd)


def _fixed_order_drpb(q, k, v, rpb, o, lse, do, dlse, params, scale):
    """d-rpb of the fused op, bit-reproducible (fused_config(deterministic=True)): the fused
    kernels sum it with atomics, so here it comes from the GEMM-based kernels instead, whose
    reductions run in a fixed order. dS = P (do.v - delta) per window entry, P = exp(logits - lse),
    then the qk op's backward w.r.t. rpb sums dS per relative offset. Costs [N, prod(kernel)]
    temporaries: deterministic mode trades memory for reproducibility."""
    f32 = jnp.float32
    logits = _native_qk((q.astype(f32) * scale).astype(q.dtype), k, rpb, None, params, "gemm")
    p = jnp.exp(logits.astype(f32) - lse[..., None])
    dp = _native_qk(do.astype(v.dtype), v, None, None, params, "gemm").astype(f32)  # do . v
    delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1) - dlse
    ds = p * (dp - delta[..., None])
    _, pull = jax.vjp(lambda r: _native_qk(q, k, r, None, params, "gemm"), rpb)
    return pull(ds.astype(q.dtype))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _native_qk(q, k, rpb, add_k, params, backend):
    return ffi.qk_forward(backend, q, k, rpb, add_k, params)


def _native_qk_fwd(q, k, rpb, add_k, params, backend):
    return ffi.qk_forward(backend, q, k, rpb, add_k, params), (q, k, rpb, add_k)


def _native_qk_bwd(params, backend, res, dw):
    q, k, rpb, add_k = res
    dq, dk, drpb, dak = ffi.qk_backward(backend, q, k, rpb, add_k, dw, params)
    return sharding.like_primals((dq, dk, None if rpb is None else drpb.astype(rpb.dtype),
                                  None if add_k is None else dak), (q, k, rpb, add_k))


_native_qk.defvjp(_native_qk_fwd, _native_qk_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _native_av(w, v, add_v, params, backend):
    return ffi.av_forward(backend, w, v, add_v, params)


def _native_av_fwd(w, v, add_v, params, backend):
    return ffi.av_forward(backend, w, v, add_v, params), (w, v, add_v)


def _native_av_bwd(params, backend, res, do):
    w, v, add_v = res
    dw, dv, dav = ffi.av_backward(backend, w, v, add_v, do, params)
    return sharding.like_primals((dw, dv, None if add_v is None else dav), (w, v, add_v))


_native_av.defvjp(_native_av_fwd, _native_av_bwd)


def _qk(q, k, rpb, add_k, params, backend):
    if backend == "reference":
        return reference.qk(q, k, rpb, add_k, params)
    return _native_qk(q, k, rpb, add_k, params, backend)


def _av(w, v, add_v, params, backend):
    if backend == "reference":
        return reference.av(w, v, add_v, params)
    return _native_av(w, v, add_v, params, backend)


def _attention(q, k, v, rpb, add_k, add_v, params, scale, backend, tuning=None):
    if backend == "reference":
        return reference.attention(q, k, v, rpb, add_k, add_v, params, scale)
    if backend in ("cpu", "fused"):
        return _native_attention(q, k, v, rpb, add_k, add_v, params, scale, backend,
                                 tuning if backend == "fused" else None)
    # Unfused backends: qk -> softmax (float32) -> av, each op with its own backward kernels.
    # Scaling q first keeps the bias unscaled: (scale q).k + rpb.
    logits = _qk((q.astype(jnp.float32) * scale).astype(q.dtype), k, rpb, add_k, params, backend)
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    weights = jnp.exp(logits - lse[..., None]).astype(q.dtype)
    return _av(weights, v, add_v, params, backend), lse


# ----------------------------------------------------------------------------- public API

def _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
        additional_keys, additional_values, return_lse, backend):
    problem = _checks.check_attention(rank, query, key, value, kernel_size, stride, dilation,
                                      is_causal, rpb, additional_keys, additional_values)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    backend = resolve_backend(backend, "attention", query.dtype,
                              (problem.head_dim, problem.value_dim))
    if backend == "fused" and query.shape[-2] > _FUSED_MAX_HEADS:
        raise ValueError(f"backend 'fused' takes at most {_FUSED_MAX_HEADS} heads (a CUDA grid "
                         f"dimension), got {query.shape[-2]}")
    scale = problem.head_dim ** -0.5 if scale is None else float(scale)
    cfg = config.current()
    tuning = config.tuning(cfg, rank)
    lay = functools.partial(_to_kernel_layout, problem=problem)
    out, lse = _attention(lay(query), lay(key), lay(value), _pad_rpb(rpb, problem),
                          _fold_additional(additional_keys, problem),
                          _fold_additional(additional_values, problem),
                          problem.params.padded(), scale, backend, tuning)
    out = _from_kernel_layout(out, problem, 2)
    return (out, _from_kernel_layout(lse, problem, 1)) if return_lse else out


def _na_qk(rank, query, key, kernel_size, stride, dilation, is_causal, rpb, additional_keys,
           backend):
    problem = _checks.check_attention(rank, query, key, None, kernel_size, stride, dilation,
                                      is_causal, rpb, additional_keys, None)
    backend = resolve_backend(backend, "qk", query.dtype, (problem.head_dim,))
    lay = functools.partial(_to_kernel_layout, problem=problem)
    w = _qk(lay(query), lay(key), _pad_rpb(rpb, problem),
            _fold_additional(additional_keys, problem), problem.params.padded(), backend)
    return _from_kernel_layout(w, problem, 2)


def _na_av(rank, weights, value, kernel_size, stride, dilation, is_causal, additional_values,
           backend):
    problem = _checks.check_weights(rank, weights, value, kernel_size, stride, dilation, is_causal,
                                    additional_values)
    backend = resolve_backend(backend, "av", value.dtype, (problem.value_dim,))
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
