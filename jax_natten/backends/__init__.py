"""Backends: which one serves a call (`resolve`), and the modules that run each op.

`resolve` checks an explicit backend against the build (`ffi.available`), the device the call
would run on (`_device_reason`: CUDA kernels need a GPU, host kernels the CPU; `target_platform`
overrides the device for cross-lowering), the dtype and the head dims; with `backend=None` it takes
the first backend of the device's preference list that can serve the call and makes a fallback
visible (FallbackWarning to "reference", INFO log otherwise).

    op                       "reference"          "cpu", "fused"   "gemm", "naive"
    attention (na{1,2,3}d)   reference.attention  fna.attention    unfused.attention
    qk (na{1,2,3}d_qk)       reference.qk         unfused.qk (cpu) unfused.qk
    av (na{1,2,3}d_av)       reference.av         unfused.av (cpu) unfused.av

Native ops call their custom calls through `ffi.py`, which describes every custom call's buffers.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import warnings

import jax
import jax.numpy as jnp

from . import ffi, fna, unfused

BACKENDS = ("fused", "gemm", "naive", "cpu", "reference")
CUDA_BACKENDS = ("fused", "gemm", "naive")
_NATIVE_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)

log = logging.getLogger("jax_natten")


class FallbackWarning(UserWarning):
    """`backend=None` chose the slow "reference" backend (pure jax.numpy) because no native
    backend can serve the call; the message says why. Silence it with
    `warnings.filterwarnings("ignore", category=jax_natten.FallbackWarning)`, or pass
    `backend="reference"` to ask for it."""


# ----------------------------------------------------------------------------- the device

_TARGET: contextvars.ContextVar = contextvars.ContextVar("jax_natten_target", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Trace the ops for `platform` ("cpu" or "cuda") instead of the device JAX would run them on.

    For lowering or exporting for a GPU on a machine without one, where an explicit CUDA backend
    is otherwise refused:

        with jax_natten.target_platform("cuda"):
            text = jax.jit(f).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()

    `backend=None` then also picks the backends of that platform. Inside it `backend_available`
    answers for that platform (and what this build has).
    """
    if platform not in ("cpu", "cuda"):
        raise ValueError(f"target_platform: 'cpu' or 'cuda', got {platform!r}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def _device_of(x=None):
    """The device an op on `x` runs on: a concrete array's own device if it is committed to one
    (`jax.device_put`), else JAX's default device (`jax.default_device` if set, else the first
    device of the default backend)."""
    if (x is not None and isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
            and getattr(x, "committed", False)):
        try:
            return next(iter(x.devices()))
        except Exception:  # noqa: BLE001 (deleted or otherwise unusable array: use the default)
            pass
    dev = jax.config.jax_default_device
    if dev is None:
        return jax.devices()[0]
    if isinstance(dev, str):
        return jax.devices(dev)[0]
    return dev


def _platform(x=None) -> str:
    """"cuda" or "cpu" (or another JAX platform name): where the op will run."""
    target = _TARGET.get()
    if target is not None:
        return target
    platform = _device_of(x).platform
    return "cuda" if platform == "gpu" else platform


def _describe(x=None) -> str:
    """The device JAX sees, for error messages: 'cpu:0 (cpu; 8 cpu devices, no GPU)'."""
    if _TARGET.get() is not None:
        return f"the platform {_TARGET.get()!r} of jax_natten.target_platform"
    dev = _device_of(x)
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    n = len(jax.devices(dev.platform))
    seen = f"{n} {dev.platform} device{'s' if n > 1 else ''}"
    seen += f", {len(gpus)} GPU{'s' if len(gpus) > 1 else ''}" if gpus and dev.platform != "gpu" \
        else ""
    seen += ", no GPU" if not gpus else ""
    return f"{dev} ({dev.device_kind}; {seen})"


def _runs_on(backend: str, platform: str) -> bool:
    """Whether `backend`'s kernels run on `platform` ("cuda", "cpu", ...)."""
    if backend in CUDA_BACKENDS:
        return platform == "cuda"
    return backend != "cpu" or platform == "cpu"


def _device_reason(backend: str, x=None) -> str | None:
    """Why `backend` cannot run on the device JAX would run this call on, or None."""
    platform = _platform(x)
    if _runs_on(backend, platform):
        return None
    if backend in CUDA_BACKENDS:
        try:
            has_gpu = bool(jax.devices("gpu"))
        except RuntimeError:
            has_gpu = False
        fix = ("move the inputs to the GPU, or leave the jax.default_device context" if has_gpu
               else "JAX sees no GPU: install a CUDA-enabled JAX (pip install \"jax[cuda13]\") on "
                    "a machine with an NVIDIA GPU; to lower for one from here, use "
                    "jax_natten.target_platform(\"cuda\")")
        return (f"'{backend}' runs CUDA kernels on an NVIDIA GPU, but this call would run on "
                f"{_describe(x)}; {fix}. On this device use backend=None (best available), "
                f"'cpu' or 'reference'")
    return (f"'cpu' runs host kernels, but this call would run on {_describe(x)}; use "
            f"backend=None (best available) there, or put the inputs on the CPU "
            f"(jax.device_put(x, jax.devices('cpu')[0]), jax.default_device)")


# ----------------------------------------------------------------------------- availability

def backend_available(backend: str, device=None) -> bool:
    """Whether `backend` can run here: this build has its kernels (`"reference"` always runs) and
    the device is one they run on (`"cpu"`: the host; `"fused"`, `"gemm"`, `"naive"`: an NVIDIA
    GPU). `device`: a `jax.Device` or a platform name ("cpu", "gpu"); by default JAX's default
    device (`jax.default_device`), or the platform of `jax_natten.target_platform(...)`.

        jax_natten.backend_available("cpu")           # True once the package is installed
        jax_natten.backend_available("fused")         # False without a GPU or CUDA kernels
        jax_natten.backend_available("cpu", "cpu")    # the host kernels, on a GPU machine too

    Whether a given call is served also depends on its dtype and head dims:
    `jax_natten.resolve_backend` tells which backend a call will use. Raises ValueError for a
    name that is not one of `jax_natten.BACKENDS`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "reference":
        return True
    if device is None:
        platform = _platform()
    else:
        platform = device if isinstance(device, str) else device.platform
        platform = "cuda" if platform == "gpu" else platform
    return ffi.available(backend) and _runs_on(backend, platform)



def _unsupported(backend: str, op: str, dtype, head_dims: tuple, x=None) -> str | None:
    """Why `backend` cannot serve this call, or None if it can."""
    if backend == "reference":
        return None
    if backend == "fused" and op != "attention":
        return fna.unsupported(backend, op, head_dims)
    why = _device_reason(backend, x) or (None if ffi.available(backend)
                                          else ffi.unavailable_reason(backend))
    if why is not None:
        return why
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _NATIVE_DTYPES]:
        return f"dtype {jnp.dtype(dtype)} is not supported (float32, float16, bfloat16 are)"
    return fna.unsupported(backend, op, head_dims) or unfused.unsupported(backend, head_dims)


# ----------------------------------------------------------------------------- the choice

_RECORD: contextvars.ContextVar = contextvars.ContextVar("jax_natten_record", default=None)
_WARNED: set = set()


def _preferences(op: str, dtype, x=None) -> tuple:
    if _platform(x) == "cuda":
        if op == "attention":
            # float32: the GEMM kernels are faster on all but small windows (BENCHMARKS.md); the
            # fused float32 kernels need no [N, prod(kernel)] temporaries (backend="fused").
            f32 = jnp.dtype(dtype) == jnp.float32
            return ("gemm", "fused", "reference") if f32 else ("fused", "gemm", "reference")
        return ("gemm", "naive", "reference")
    return ("cpu", "reference")


def resolve(backend, op: str, dtype, head_dims: tuple, x=None) -> str:
    """The backend that serves a call of `op` ("attention", "qk" or "av"): the user's choice
    (checked), or the best available one. `head_dims`: the head dims the op's kernels see (D and
    D_v for attention; D for qk; D_v for av). `x`: an input, whose device decides where the call
    runs when it is a concrete array.

    With `backend=None` a fallback is visible: to another native backend, a log record (logger
    "jax_natten", INFO); to "reference", a FallbackWarning once per op and reason. Every choice is
    logged at DEBUG."""
    if backend is None:
        prefs = _preferences(op, dtype, x)
        skipped = []
        for b in prefs:
            why = _unsupported(b, op, dtype, head_dims, x)
            if why is None:
                break
            skipped.append((b, why))
        if skipped:
            reasons = "; ".join(f"{s!r} cannot serve it: {w}" for s, w in skipped)
            if b == "reference":
                key = (op, reasons)
                if key not in _WARNED:
                    _WARNED.add(key)
                    warnings.warn(f"jax_natten: this {op} call runs on the slow 'reference' "
                                  f"backend (pure jax.numpy), since {reasons}. Pass "
                                  f"backend='reference' to ask for it.", FallbackWarning,
                                  stacklevel=4)
            else:
                log.info("jax_natten: %s call on backend %r: %s", op, b, reasons)
        log.debug("jax_natten: %s call (dtype %s, head dims %s) on backend %r", op,
                  jnp.dtype(dtype), head_dims, b)
        backend = b
    else:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or None")
        why = _unsupported(backend, op, dtype, head_dims, x)
        if why is not None:
            raise ValueError(f"backend {backend!r} cannot serve this call: {why}")
    record = _RECORD.get()
    if record is not None:
        record.append(backend)
    return backend


@contextlib.contextmanager
def recording():
    """Collects the backends `resolve` picks inside the context (for `resolve_backend`)."""
    record = []
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)
