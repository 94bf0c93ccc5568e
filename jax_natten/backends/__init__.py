"""Backends: which one serves a call (`resolve`), and the modules that run each op.

    op                       "reference"          "cpu", "fused"   "gemm", "naive"
    attention (na{1,2,3}d)   reference.attention  fna.attention    unfused.attention
    qk (na{1,2,3}d_qk)       reference.qk         unfused.qk (cpu) unfused.qk
    av (na{1,2,3}d_av)       reference.av         unfused.av (cpu) unfused.av

Native ops call their custom calls through `ffi.py`, which describes every custom call's buffers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import ffi, fna, unfused

BACKENDS = ("fused", "gemm", "naive", "cpu", "reference")
_NATIVE_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def _unsupported(backend: str, op: str, dtype, head_dims: tuple) -> str | None:
    """Why `backend` cannot serve this call, or None if it can."""
    if backend == "reference":
        return None
    if backend == "fused" and op != "attention":
        return fna.unsupported(backend, op, head_dims)
    if not ffi.available(backend):
        return ffi.unavailable_reason(backend)
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _NATIVE_DTYPES]:
        return f"dtype {jnp.dtype(dtype)} is not supported (float32, float16, bfloat16 are)"
    return fna.unsupported(backend, op, head_dims) or unfused.unsupported(backend, head_dims)


def resolve(backend, op: str, dtype, head_dims: tuple) -> str:
    """The backend that serves a call of `op` ("attention", "qk" or "av"): the user's choice
    (checked), or the best available one. `head_dims`: the head dims the op's kernels see (D and
    D_v for attention; D for qk; D_v for av)."""
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
