"""The FFI plumbing without a GPU: each native backend lowers forward and backward to its custom
calls, for the "cpu" platform (host kernels) and the "cuda" platform (CUDA kernels)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_natten

Q = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 7, 4, 8)), jnp.float16)
KV = Q[..., :2, :]
RPB = jnp.full((4, 9, 9), 0.1, jnp.float32)

# CI sets JAX_NATTEN_EXPECT_CUDA=1 where nvcc is present: a build without CUDA kernels then fails.
EXPECT_CUDA = os.environ.get("JAX_NATTEN_EXPECT_CUDA") == "1"


def _hlo(fn, platform, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _require(backend):
    if not jax_natten.backend_available(backend):
        if EXPECT_CUDA and backend == "naive":
            pytest.fail(f"JAX_NATTEN_EXPECT_CUDA=1 but the build has no '{backend}' kernels")
        pytest.skip(f"this build has no '{backend}' kernels")


@pytest.mark.parametrize("backend, platform", [("cpu", "cpu"), ("naive", "cuda"),
                                               ("gemm", "cuda"), ("fused", "cuda")])
def test_attention_lowers_to_custom_calls(backend, platform):
    _require(backend)
    f = lambda q, k, v, r: jax_natten.na2d(q, k, v, 5, rpb=r, backend=backend)
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32))
    fwd = _hlo(f, platform, Q, KV, KV, RPB)
    bwd = _hlo(jax.grad(loss, argnums=(0, 1, 2, 3)), platform, Q, KV, KV, RPB)
    if backend in ("cpu", "fused"):
        assert f"natten_{backend}_fna_fwd" in fwd
        assert f"natten_{backend}_fna_bwd" in bwd
    else:  # unfused: qk -> softmax -> av
        for op in ("qk_fwd", "av_fwd"):
            assert f"natten_{backend}_{op}" in fwd
        for op in ("qk_bwd", "av_bwd"):
            assert f"natten_{backend}_{op}" in bwd


@pytest.mark.parametrize("backend, platform", [("cpu", "cpu"), ("naive", "cuda"),
                                               ("gemm", "cuda")])
def test_qk_av_lower_to_custom_calls(backend, platform):
    _require(backend)
    qk = lambda q, k: jax_natten.na2d_qk(q, k, (3, 4), dilation=(2, 1), backend=backend)
    w = jnp.zeros(Q.shape[:-1] + (12,), Q.dtype) + 0.5
    av = lambda w, v: jax_natten.na2d_av(w, v, (3, 4), dilation=(2, 1), backend=backend)
    assert f"natten_{backend}_qk_fwd" in _hlo(qk, platform, Q, KV)
    assert f"natten_{backend}_av_fwd" in _hlo(av, platform, w, KV)
    gqk = jax.grad(lambda q, k: jnp.sum(qk(q, k).astype(jnp.float32)), argnums=(0, 1))
    gav = jax.grad(lambda w, v: jnp.sum(av(w, v).astype(jnp.float32)), argnums=(0, 1))
    assert f"natten_{backend}_qk_bwd" in _hlo(gqk, platform, Q, KV)
    assert f"natten_{backend}_av_bwd" in _hlo(gav, platform, w, KV)
