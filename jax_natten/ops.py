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

import contextlib
import functools

import jax
import jax.numpy as jnp

from . import _checks, config
from .backends import BACKENDS, ffi, fna, recording, reference, resolve, unfused


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

def _guarded(f, *args):
    """An op with a custom_vjp (every native op; the reference's attention, whose softmax has
    one): under forward-mode autodiff JAX refuses it with a message that does not say what is
    supported; this one does."""
    try:
        return f(*args)
    except TypeError as e:
        if "forward-mode autodiff" in str(e):
            raise NotImplementedError(ffi.HIGHER_ORDER_MESSAGE) from e
        raise


def _attention(q, k, v, rpb, add_k, add_v, params, scale, backend, settings=None):
    """-> (o, lse). `settings`: fna.FusedSettings for "fused", else None. `scale`: a float, or a
    traced scalar: the native backends take a static scale (a kernel attribute, or a branch on
    its sign), so a traced one multiplies q here (in float32, rounded to q's dtype) and they get
    1.0; its gradient comes through that product."""
    if backend == "reference":
        return _guarded(reference.attention, q, k, v, rpb, add_k, add_v, params, scale)
    if not isinstance(scale, float):
        q, scale = (q.astype(jnp.float32) * scale).astype(q.dtype), 1.0
    if backend in fna.BACKENDS:
        return _guarded(fna.attention, q, k, v, rpb, add_k, add_v, params, scale, backend,
                       settings)
    return _guarded(unfused.attention, q, k, v, rpb, add_k, add_v, params, scale, backend)


def _qk(q, k, rpb, add_k, params, backend):
    if backend == "reference":
        return reference.qk(q, k, rpb, add_k, params)
    return _guarded(unfused.qk, q, k, rpb, add_k, params, backend)


def _av(w, v, add_v, params, backend):
    if backend == "reference":
        return reference.av(w, v, add_v, params)
    return _guarded(unfused.av, w, v, add_v, params, backend)


# ----------------------------------------------------------------------------- public API

def _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
        additional_keys, additional_values, return_lse, backend):
    problem = _checks.check_attention(rank, query, key, value, kernel_size, stride, dilation,
                                      is_causal, rpb, additional_keys, additional_values)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    scale = _checks.check_scale(scale)
    backend = resolve(backend, "attention", query.dtype, (problem.head_dim, problem.value_dim),
                      query)
    fna.check_size(backend, problem)
    if scale is None:  # head_dim 0: every logit is 0 whatever the scale
        scale = problem.head_dim ** -0.5 if problem.head_dim else 1.0
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
    backend = resolve(backend, "qk", query.dtype, (problem.head_dim,), query)
    if problem.batch == 0 or problem.heads == 0:  # no query rows: no kernel runs on them
        width = problem.params.window_size + problem.num_additional
        return jnp.zeros(query.shape[:-1] + (width,), query.dtype)
    lay = functools.partial(_to_kernel_layout, problem=problem)
    w = _qk(lay(query), lay(key), _pad_rpb(rpb, problem),
            _fold_additional(additional_keys, problem), problem.params.padded(), backend)
    return _from_kernel_layout(w, problem, 2)


def _na_av(rank, weights, value, kernel_size, stride, dilation, is_causal, additional_values,
           backend):
    problem = _checks.check_weights(rank, weights, value, kernel_size, stride, dilation, is_causal,
                                    additional_values)
    backend = resolve(backend, "av", value.dtype, (problem.value_dim,), value)
    if problem.batch == 0 or problem.heads == 0:  # no weight rows: no kernel runs on them
        return jnp.zeros(weights.shape[:-1] + (problem.value_dim,), value.dtype)
    lay = functools.partial(_to_kernel_layout, problem=problem)
    out = _av(lay(weights), lay(value), _fold_additional(additional_values, problem),
              problem.params.padded(), backend)
    return _from_kernel_layout(out, problem, 2)


_NA_DOC = """{rank}-D neighborhood attention: each query attends to the keys in a window around it.

    out = softmax(scale * q.k + rpb) v over each query's window (and the additional keys), with
    NATTEN's semantics. Layout is heads-last, like jax.nn.dot_product_attention:

      query      [B, {axes}, heads, D]       (extra leading dims fold into B)
      key        [B, {axes}, kv_heads, D]    heads % kv_heads == 0 (GQA/MQA)
      value      [B, {axes}, kv_heads, D_v]
      returns    out [B, {axes}, heads, D_v], or (out, lse) with return_lse=True,
                 lse [B, {axes}, heads] (natural-log sum of exponentials, float32)

    Args:
      kernel_size, stride, dilation, is_causal: an int/bool, or one per spatial axis. Per axis:
        kernel_size >= 2, 1 <= stride <= kernel_size, dilation >= 1 and
        kernel_size * dilation <= the axis length. Non-causal windows shift inward at borders
        (every query sees kernel_size keys per axis); causal windows end at the query.
      scale: a finite number, or a scalar array (traced too); default D ** -0.5.
      rpb: relative positional bias [heads, {rpb}] (non-causal, stride-1 NA only).
      additional_keys / additional_values: [B, S, kv_heads, D] / [B, S, kv_heads, D_v], keys every
        query also attends to, in the same softmax (give both or neither).
      backend: None (the best available: see jax_natten.resolve_backend), "fused", "gemm",
        "naive" (CUDA), "cpu" (host) or "reference" (pure jax.numpy, any float dtype).

    Raises ValueError / TypeError before anything runs for bad shapes, dtypes or parameters, and
    for an explicit backend that cannot serve the call or does not run on this device.
    Differentiable in reverse mode (jax.grad, jax.vjp) for query, key, value, rpb, the
    additional keys/values and a traced scale; second derivatives need backend="reference";
    forward mode (jax.jvp) is not supported (NotImplementedError).

    Example:
      q = k = v = jax.random.normal(jax.random.key(0), ({example}), jnp.float32)
      out = jax_natten.na{rank}d(q, k, v, kernel_size={kernel})      # shape {shape}
"""

_QK_DOC = """{rank}-D neighborhood logits q.k + rpb (unscaled) of each query with its window's keys.

      query [B, {axes}, heads, D], key [B, {axes}, kv_heads, D] (heads-last; GQA allowed)
      returns [B, {axes}, heads, prod(kernel_size) (+ S)], in query's dtype

    Entry t of the last axis is window offset t, row-major over the kernel axes, from the window
    start; entries past a causal query are -inf; the logits of additional_keys [B, S, kv_heads, D]
    follow. kernel_size, stride, dilation, is_causal, rpb: as for na{rank}d (constraints included).
    backend: None, "gemm", "naive", "cpu" or "reference" ("fused" has no split ops).
    softmax over the last axis then na{rank}d_av gives na{rank}d (with the query pre-scaled).

    Example:
      w = jax_natten.na{rank}d_qk(q, k, kernel_size={kernel})        # [..., heads, {window}]
      out = jax_natten.na{rank}d_av(jax.nn.softmax(w * q.shape[-1] ** -0.5), v, {kernel})
"""

_AV_DOC = """{rank}-D neighborhood aggregation: out = sum_t weights[..., t] * value[key t].

      weights [B, {axes}, heads, prod(kernel_size) (+ S)], as na{rank}d_qk returns them
      value   [B, {axes}, kv_heads, D_v] (heads-last; GQA allowed)
      returns [B, {axes}, heads, D_v]

    Entries past a causal query are ignored. additional_values [B, S, kv_heads, D_v] go with the
    last S weights. kernel_size, stride, dilation, is_causal: as for na{rank}d (constraints
    included). backend: None, "gemm", "naive", "cpu" or "reference".
"""

_EXAMPLE = {1: ("2, 1024, 4, 32", "7", "(2, 1024, 4, 32)", "7"),
            2: ("2, 32, 32, 4, 32", "(7, 7)", "(2, 32, 32, 4, 32)", "49"),
            3: ("2, 8, 16, 16, 4, 32", "(3, 5, 5)", "(2, 8, 16, 16, 4, 32)", "75")}


def _make(rank):
    axes = ", ".join("XYZ"[:rank])
    rpb = ", ".join(f"2*k{i}-1" for i in range(rank))
    example, kernel, shape, window = _EXAMPLE[rank]

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
        f.__doc__ = doc.format(rank=rank, axes=axes, rpb=rpb, example=example, kernel=kernel,
                               shape=shape, window=window)
    return na, na_qk, na_av


na1d, na1d_qk, na1d_av = _make(1)
na2d, na2d_qk, na2d_av = _make(2)
na3d, na3d_qk, na3d_av = _make(3)


def merge_attentions(outputs, lses):
    """Merge attention over disjoint key sets by their LSEs: -> (out, lse).

    outputs: a sequence of [..., heads, D] (one shape); lses: the matching [..., heads]
    natural-log LSEs (as na{1,2,3}d(..., return_lse=True) returns them). Returns out in the
    dtype of outputs[0] and lse in float32: the attention over the union of the key sets.

    Example:
      o1, l1 = jax_natten.na2d(q, k, v, 7, return_lse=True)
      o2, l2 = other_attention(q, extra_k, extra_v)   # any attention with its LSE
      out, lse = jax_natten.merge_attentions([o1, o2], [l1, l2])
    """
    outputs, lses = list(outputs), list(lses)
    _checks.check_merge(outputs, lses)
    lse_all = jnp.stack([l.astype(jnp.float32) for l in lses])
    lse = jax.nn.logsumexp(lse_all, axis=0)
    weights = jnp.exp(lse_all - lse)[..., None]
    out = sum(w * o.astype(jnp.float32) for w, o in zip(weights, outputs))
    return out.astype(outputs[0].dtype), lse


_OPS = {f"na{r}d{suffix}": f for r, fs in ((1, (na1d, na1d_qk, na1d_av)),
                                             (2, (na2d, na2d_qk, na2d_av)),
                                             (3, (na3d, na3d_qk, na3d_av)))
        for suffix, f in zip(("", "_qk", "_av"), fs)}


def resolve_backend(op, *args, **kwargs) -> str:
    """The backend a call `op(*args, **kwargs)` will run on, without running it.

    `op`: one of the ops (`jax_natten.na2d`, `na2d_qk`, ...) or its name ("na2d"); `args` and
    `kwargs`: the call's arguments, arrays or `jax.ShapeDtypeStruct`s. The same checks run as in
    the call itself: bad arguments raise the same errors, and with `backend=None` the same
    fallback warning. Every choice is also logged (logger "jax_natten", DEBUG).

        jax_natten.resolve_backend(jax_natten.na2d, q, k, v, 7)           # e.g. 'cpu'
        jax_natten.resolve_backend("na1d", q, k, v, 7, backend="fused")   # ValueError off a GPU

    The device is that of the first array committed to one (`jax.device_put`), else JAX's
    default device (`jax.default_device`), or that of `target_platform`.
    """
    fn = _OPS.get(op) if isinstance(op, str) else op
    if fn not in _OPS.values():
        raise ValueError(f"resolve_backend: op must be one of {sorted(_OPS)} (or the function), "
                         f"got {op!r}")
    # Arrays (and shape structs) are traced; everything else (kernel_size, ...) stays static.
    leaves, tree = jax.tree.flatten((args, kwargs))
    is_array = [hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves]

    def call(*arrays):
        it = iter(arrays)
        a, kw = jax.tree.unflatten(tree, [next(it) if arr else x
                                          for x, arr in zip(leaves, is_array)])
        return fn(*a, **kw)

    # eval_shape traces the arrays, so their placement must be passed on as the default device:
    # a call on arrays committed to a device (jax.device_put) runs there.
    committed = [x for x in leaves if isinstance(x, jax.Array)
                 and not isinstance(x, jax.core.Tracer) and getattr(x, "committed", False)]
    place = (jax.default_device(next(iter(committed[0].devices()))) if committed
             else contextlib.nullcontext())
    with recording() as chosen, place:
        jax.eval_shape(call, *[x for x, arr in zip(leaves, is_array) if arr])
    return chosen[0]
