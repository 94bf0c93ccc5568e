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
    # target_platform: trace for that platform whatever device JAX has (a CPU-only machine).
    with jax_natten.target_platform(platform):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _require(backend):
    with jax_natten.target_platform("cpu" if backend == "cpu" else "cuda"):
        built = jax_natten.backend_available(backend)  # this build has the kernels
    if not built:
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


@pytest.mark.parametrize("mma, code", [("auto", 0), ("mma_sync", 1), ("wgmma", 2)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_fused_settings_reach_the_custom_calls(mma, code, dtype):
    """fused_config's MMA family and tiles become attributes of both fused custom calls, in every
    dtype the fused kernels take (float32 included)."""
    _require("fused")
    q = Q.astype(dtype)
    f = lambda q: jax_natten.na2d(q, q, q, 3, backend="fused")
    with jax_natten.fused_config(mma=mma, q_tile=(8, 8), deterministic=True):
        fwd = _hlo(f, "cuda", q)
        bwd = _hlo(jax.grad(lambda q: jnp.sum(f(q).astype(jnp.float32))), "cuda", q)
    for hlo, target in ((fwd, "natten_fused_fna_fwd"), (bwd, "natten_fused_fna_bwd")):
        call = next(line for line in hlo.splitlines() if target in line)
        assert f"mma = {code} : i64" in call, call
        assert "q_tile = dense<[1, 8, 8]>" in call, call
    assert "deterministic = 1 : i64" in next(line for line in bwd.splitlines()
                                             if "natten_fused_fna_bwd" in line)
