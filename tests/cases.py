"""Problem cases, fresh random inputs and per-backend placement shared by the op tests."""
import dataclasses
import os

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import jax_natten

CUDA_BACKENDS = ("naive", "gemm", "fused")
NATIVE_BACKENDS = ("cpu",) + CUDA_BACKENDS

# Relative-error bounds against float64 (docs/semantics.md §12); gradients get twice these.
TOLERANCE = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    spatial: tuple
    kernel: tuple
    stride: tuple = None
    dilation: tuple = None
    causal: tuple = None
    heads: int = 2
    kv_heads: int = 2
    dim: int = 8
    value_dim: int = None
    rpb: bool = False
    additional: int = 0  # S_add
    batch: int = 2

    @property
    def rank(self):
        return len(self.spatial)

    def kwargs(self):
        r = self.rank
        return dict(kernel_size=self.kernel, stride=self.stride or (1,) * r,
                    dilation=self.dilation or (1,) * r, is_causal=self.causal or (False,) * r)

    def oracle_args(self):
        kw = self.kwargs()
        return kw["kernel_size"], kw["stride"], kw["dilation"], kw["is_causal"]


CASES = [
    # 1-D: borders, even kernel, stride, dilation, causal, GQA/MQA, rpb, additional kv.
    Case("1d-basic", (13,), (5,)),
    Case("1d-even-stride-dil-gqa", (17,), (4,), (3,), (2,), heads=4, kv_heads=2),
    Case("1d-causal-stride-mqa", (15,), (6,), (2,), (1,), (True,), heads=3, kv_heads=1),
    Case("1d-rpb-add", (11,), (3,), rpb=True, additional=3, value_dim=16),
    Case("1d-causal-dil-add", (19,), (4,), (1,), (3,), (True,), additional=2),
    # 2-D
    Case("2d-mixed", (9, 11), (3, 4), (1, 2), (2, 1), (True, False), heads=2, kv_heads=1),
    Case("2d-rpb-add", (7, 10), (5, 5), rpb=True, additional=2),
    Case("2d-blocked-dil", (8, 9), (2, 3), (2, 3), (1, 3)),
    Case("2d-even-rpb-dil", (9, 8), (4, 2), (1, 1), (2, 3), rpb=True, heads=4, kv_heads=2),
    # 3-D
    # value_dim 4: the gemm backend refuses it (head dims must be multiples of 8).
    Case("3d-mixed", (5, 6, 7), (2, 3, 3), (1, 2, 1), (2, 1, 2), (False, True, False),
         heads=4, kv_heads=2, value_dim=4),
    Case("3d-rpb-add", (4, 5, 6), (3, 3, 3), rpb=True, additional=2),
    Case("3d-causal", (6, 5, 4), (3, 2, 4), (2, 1, 3), None, (True, True, True)),
    # Several query / key tiles per axis (tiled kernels: full and masked tiles, pipelines), the
    # head dims the fused kernels are tuned for, more than one tile of additional keys.
    Case("1d-long-d64", (331,), (65,), heads=2, dim=64),
    Case("1d-causal-long-add", (203,), (70,), (1,), (2,), (True,), heads=4, kv_heads=2, dim=32,
         additional=67),
    Case("2d-tiles-rpb-mqa", (37, 29), (13, 9), rpb=True, heads=3, kv_heads=1, dim=32, batch=1),
    Case("2d-stride-dil-d128", (23, 26), (7, 6), (3, 2), (2, 3), (False, True), dim=128,
         value_dim=64, batch=1),
    Case("3d-tiles-d64", (9, 10, 11), (3, 5, 7), (1, 2, 3), (2, 1, 1), heads=2, dim=64,
         value_dim=24, batch=1),
]
CASE_IDS = [c.name for c in CASES]


def fresh_rng():
    """A new seed every run (never a fixed input); it is part of every failure message."""
    seed = int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def make_inputs(case: Case, dtype, rng):
    """Random q, k, v, rpb, additional kv (never zeros), rounded to `dtype`."""
    B, H, KVH, D = case.batch, case.heads, case.kv_heads, case.dim
    Dv = case.value_dim or D
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    x = dict(query=draw(B, *case.spatial, H, D), key=draw(B, *case.spatial, KVH, D),
             value=draw(B, *case.spatial, KVH, Dv))
    if case.rpb:
        x["rpb"] = jnp.asarray(rng.standard_normal((H,) + tuple(2 * k - 1 for k in case.kernel)),
                               jnp.float32)
    if case.additional:
        x["additional_keys"] = draw(B, case.additional, KVH, D)
        x["additional_values"] = draw(B, case.additional, KVH, Dv)
    return x


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not np.isnan(out).any(), "NaN in the output (an unwritten element?)"
    finite = np.isfinite(ref)
    assert (np.isfinite(out) == finite).all(), "infinite entries differ from the reference"
    return np.linalg.norm(out[finite] - ref[finite]) / max(np.linalg.norm(ref[finite]), 1e-30)


def na_fn(rank, suffix=""):
    return getattr(jax_natten, f"na{rank}d{suffix}")


def device_for(backend):
    """Where a backend's kernels run: host kernels on the CPU, CUDA kernels on the GPU."""
    if backend == "cpu":
        return jax.devices("cpu")[0]
    if backend in CUDA_BACKENDS:
        return jax.devices("gpu")[0]
    return jax.devices()[0]


def require(backend):
    """Skip a CUDA backend that this build or machine lacks; a missing host build is a failure."""
    if backend in CUDA_BACKENDS:
        if not jax_natten.backend_available(backend, "gpu"):
            pytest.skip(f"this build has no '{backend}' kernels")
        try:
            jax.devices("gpu")
        except RuntimeError:
            pytest.skip("no GPU")
    elif backend == "cpu":
        assert jax_natten.backend_available("cpu", "cpu"), "the host kernels were not built"


def dtype_for(backend):
    """A dtype `backend` serves, for tests that compare a backend with itself: float32, except on
    the fused kernels, which get float16 (their tensor-core path, the one most users run)."""
    return jnp.float16 if backend == "fused" else jnp.float32


def refusal(backend, dtype, head_dims):
    """The error (a regex) an explicit `backend` raises for this dtype and these head dims, or None
    when it serves them: the tensor-core tiles need head dims that are multiples of 8 (fused: up to
    128, in every dtype)."""
    if backend in ("gemm", "fused") and any(d % 8 for d in head_dims):
        return "multiples of 8"
    if backend == "fused" and any(d > 128 for d in head_dims):
        return "up to 128"
    return None


def on_backend(backend, fn, *args):
    """Run `fn(*args)` jitted on the backend's device."""
    dev = device_for(backend)
    args = jax.device_put(args, dev)
    with jax.default_device(dev):
        return jax.jit(fn)(*args)


def backend_params():
    return [pytest.param(b, marks=pytest.mark.gpu) if b in CUDA_BACKENDS else b
            for b in ("reference",) + NATIVE_BACKENDS]
