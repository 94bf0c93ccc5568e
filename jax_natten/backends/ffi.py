"""Native backends: the one place that registers and calls the FFI handlers (`cuda/README.md`).

`cpu` runs the host C++ kernels; `naive`, `gemm` and `fused` the CUDA kernels. Every call goes
through `_call`, which gives the FFI call a batching rule: vmapped arguments fold into the batch
dim the kernels already loop over (one launch, not one per vmapped element).
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from .. import sharding

try:
    from .. import _natten_ext as _ext
    _IMPORT_ERROR = None
except ImportError as e:  # the package was not built: only the reference backend works
    _ext, _IMPORT_ERROR = None, e

_REGISTERED: dict = {}  # target name -> platform


def _register():
    if _ext is None:
        return
    for name, platform, capsule in _ext.registrations():
        jax.ffi.register_ffi_target(name, capsule, platform=platform)
        _REGISTERED[name] = platform


_register()


def available(backend: str) -> bool:
    """Whether this build has kernels for `backend` (`cpu`, `naive`, `gemm` or `fused`)."""
    return any(name.startswith(f"natten_{backend}_") for name in _REGISTERED)


def unavailable_reason(backend: str) -> str:
    if _ext is None:
        return f"the native extension is not built ({_IMPORT_ERROR})"
    if backend != "cpu" and not _ext.has_cuda():
        return "this build has no CUDA kernels (built without nvcc, or JAX_NATTEN_CUDA=OFF)"
    return f"this build has no '{backend}' kernels"


def _attrs(params, scale=None, tuning=None) -> dict:
    attrs = dict(kernel_size=np.asarray(params.kernel_size, np.int64),
                 stride=np.asarray(params.stride, np.int64),
                 dilation=np.asarray(params.dilation, np.int64),
                 is_causal=np.asarray(params.is_causal, np.int64))
    if scale is not None:
        attrs["scale"] = np.float32(scale)
    if tuning is not None:  # fused kernels: config.tuning (tiles padded to 3 extents, 0s: choose)
        attrs["q_tile"] = np.asarray(tuning[0], np.int64)
        attrs["kv_tile"] = np.asarray(tuning[1], np.int64)
        attrs["mma"] = np.int64(tuning[3])
    return attrs


def _call(target: str, outs, args, batched, attrs, lead: int = 1):
    """FFI call of `target` with `outs` = [(shape, dtype, has_batch)] and `args`.

    `batched[i]` says whether `args[i]` starts with the batch dims (`lead` of them: vmapped axes
    stack in front of the batch; the kernels see them folded into one); batch-less arguments (rpb)
    and outputs (absent drpb) pass through a vmap unchanged. A vmapped batch-less argument (a
    per-example rpb) cannot fold into the batch, so that case runs one call per vmapped element.
    """
    out_types = [jax.ShapeDtypeStruct(s, d) for s, d, _ in outs]

    @jax.custom_batching.custom_vmap
    def call(*args):
        return sharding.ffi_call(target, out_types, args, attrs, lead)

    @call.def_vmap
    def fold(axis_size, in_batched, *args):
        if any(b and not has_b for b, has_b in zip(in_batched, batched)):
            # e.g. per-example rpb: one call per element (always correct, rarely needed).
            full = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                    for a, b in zip(args, in_batched)]
            res = jax.lax.map(lambda xs: _call(target, outs, xs, batched, attrs, lead), full)
            return tuple(res), (True,) * len(outs)
        # The vmapped axis becomes one more leading batch dim (folded inside the call, so a
        # sharded vmapped or batch axis stays sharded under jit).
        full = [a if b or not has_b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                for a, b, has_b in zip(args, in_batched, batched)]
        inner = [((axis_size,) + tuple(s) if has_b else s, d, has_b) for s, d, has_b in outs]
        res = _call(target, inner, full, batched, attrs, lead + 1)
        return tuple(res), tuple(has_b for _, _, has_b in outs)

    return call(*args)


# The kernels see the padded 3-D layout: q [B, X, Y, Z, H, D], k/v [B, X, Y, Z, KVH, D(v)],
# rpb [H, rx, ry, rz] (or 0 elements), additional kv [B, S, KVH, D(v)] (S may be 0).

def _absent_rpb():
    return jnp.zeros((0,), jnp.float32)


def _drpb_shape(q, rpb):
    """Per-batch partial d-rpb [B, H, rx, ry, rz] (the kernels never reduce across the batch, so
    vmapped batches stay separate); 0 elements when there is no rpb."""
    return (q.shape[0],) + tuple(rpb.shape) if rpb is not None else (0,)


def fna_forward(backend, q, k, v, rpb, add_k, add_v, params, scale, tuning=None):
    """-> o, lse. `tuning`: the fused kernels' (q_tile, kv_tile, deterministic, mma code)
    (config.tuning), None otherwise."""
    rpb = _absent_rpb() if rpb is None else rpb.astype(jnp.float32)
    add_k, add_v = _additional(q, k, v, add_k, add_v)
    outs = [(q.shape[:-1] + (v.shape[-1],), q.dtype, True), (q.shape[:-1], jnp.float32, True)]
    o, lse = _call(f"natten_{backend}_fna_fwd", outs, (q, k, v, rpb, add_k, add_v),
                   (True, True, True, False, True, True), _attrs(params, scale, tuning))
    return o, lse


def fna_backward(backend, q, k, v, rpb, add_k, add_v, o, lse, do, dlse, params, scale,
                 tuning=None):
    """-> dq, dk, dv, drpb (summed over batch; None when absent), dadd_k, dadd_v.

    The fused kernels also take two workspace outputs (handlers allocate nothing): delta =
    rowsum(do * o) - dlse (f32, shape of lse) and a float32 dq accumulator (shape of q), and the
    `deterministic` attribute."""
    has_rpb = rpb is not None
    drpb_shape = _drpb_shape(q, rpb)
    rpb = _absent_rpb() if rpb is None else rpb.astype(jnp.float32)
    add_k, add_v = _additional(q, k, v, add_k, add_v)
    outs = [(q.shape, q.dtype, True), (k.shape, k.dtype, True), (v.shape, v.dtype, True),
            (drpb_shape, jnp.float32, has_rpb),
            (add_k.shape, add_k.dtype, True), (add_v.shape, add_v.dtype, True)]
    args = (q, k, v, rpb, add_k, add_v, o, lse, do.astype(o.dtype), dlse.astype(jnp.float32))
    attrs = _attrs(params, scale, tuning)
    if tuning is not None:
        outs.append((lse.shape, jnp.float32, True))  # delta workspace
        outs.append((q.shape, jnp.float32, True))  # dq workspace (float32 adds, Hopper schedule)
        attrs["deterministic"] = np.int64(bool(tuning[2]))
    dq, dk, dv, drpb, dak, dav, *_ = _call(
        f"natten_{backend}_fna_bwd", outs, args,
        (True, True, True, False, True, True, True, True, True, True), attrs)
    return dq, dk, dv, (drpb.sum(0) if has_rpb else None), dak, dav


def qk_forward(backend, q, k, rpb, add_k, params):
    rpb = _absent_rpb() if rpb is None else rpb.astype(jnp.float32)
    add_k = _zero_tokens(k) if add_k is None else add_k
    width = params.window_size + add_k.shape[1]
    outs = [(q.shape[:-1] + (width,), q.dtype, True)]
    (w,) = _call(f"natten_{backend}_qk_fwd", outs, (q, k, rpb, add_k), (True, True, False, True),
                 _attrs(params))
    return w


def qk_backward(backend, q, k, rpb, add_k, dw, params):
    has_rpb = rpb is not None
    add_k = _zero_tokens(k) if add_k is None else add_k
    outs = [(q.shape, q.dtype, True), (k.shape, k.dtype, True),
            (_drpb_shape(q, rpb), jnp.float32, has_rpb), (add_k.shape, add_k.dtype, True)]
    dq, dk, drpb, dak = _call(f"natten_{backend}_qk_bwd", outs, (q, k, add_k, dw.astype(q.dtype)),
                              (True, True, True, True), _attrs(params))
    return dq, dk, (drpb.sum(0) if has_rpb else None), dak


def av_forward(backend, w, v, add_v, params):
    add_v = _zero_tokens(v) if add_v is None else add_v
    outs = [(w.shape[:-1] + (v.shape[-1],), v.dtype, True)]
    (o,) = _call(f"natten_{backend}_av_fwd", outs, (w, v, add_v), (True, True, True),
                 _attrs(params))
    return o


def av_backward(backend, w, v, add_v, do, params):
    add_v = _zero_tokens(v) if add_v is None else add_v
    outs = [(w.shape, w.dtype, True), (v.shape, v.dtype, True), (add_v.shape, add_v.dtype, True)]
    dw, dv, dav = _call(f"natten_{backend}_av_bwd", outs, (w, v, add_v, do.astype(v.dtype)),
                        (True, True, True, True), _attrs(params))
    return dw, dv, dav


def _zero_tokens(x):
    """Stand-in for absent additional keys/values: [B, 0, KVH, D]."""
    return jnp.zeros((x.shape[0], 0) + x.shape[-2:], x.dtype)


def _additional(q, k, v, add_k, add_v):
    return (_zero_tokens(k) if add_k is None else add_k,
            _zero_tokens(v) if add_v is None else add_v)
