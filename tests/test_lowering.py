"""The FFI plumbing without a GPU: each native backend lowers forward and backward to its custom
calls, for the "cpu" platform (host kernels) and the "cuda" platform (CUDA kernels)."""
import os
import re

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


# ----------------------------------------------------------------------------- fused residuals
# The structure of the fused custom calls needs no kernels: lowering only emits them. So these
# run on every build, with the fused targets counted as built for the check of the backend.

@pytest.fixture
def fused_targets(monkeypatch):
    from jax_natten.backends import ffi
    if ffi.LIMITS is None:
        pytest.skip("no native extension (the fused limits come from it)")
    registered = dict(ffi._REGISTERED)
    for target in (ffi.FNA_FWD.targets["fused"], ffi.FNA_BWD.targets["fused"]):
        registered.setdefault(target, "CUDA")
    monkeypatch.setattr(ffi, "_REGISTERED", registered)


def _call_types(hlo, target):
    """[(operand types, result types)] of each custom call of `target` in `hlo`."""
    calls = []
    for line in hlo.splitlines():
        if f"@{target}(" in line:
            ins, outs = line[line.rindex(" : (") + 3:].split(" -> ")
            calls.append((re.findall(r"tensor<[^>]*>", ins), re.findall(r"tensor<[^>]*>", outs)))
    return calls


ABSENT = "tensor<0xf32>"


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32], ids=["f16", "f32"])
def test_fused_inference_writes_no_residuals(fused_targets, dtype):
    """Without a gradient the fused forward's residual results (stats, o32) are absent (0
    elements: the kernels write nothing there); in a gradient's forward they have their shapes,
    and the backward takes them (and lse) in place of o."""
    q, kv = Q.astype(dtype), KV.astype(dtype)
    f = lambda q, k, v: jax_natten.na2d(q, k, v, 5, backend="fused")
    [(ins, outs)] = _call_types(_hlo(f, "cuda", q, kv, kv), "natten_fused_fna_fwd")
    assert len(ins) == 6 and len(outs) == 4, (ins, outs)
    assert outs[2:] == [ABSENT, ABSENT], outs

    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    hlo = _hlo(grad, "cuda", q, kv, kv)
    [(_, outs)] = _call_types(hlo, "natten_fused_fna_fwd")
    rows = "2x1x9x7x4"  # [B, X, Y, Z, H] of the kernel layout
    assert outs[1:] == [f"tensor<{rows}xf32>", f"tensor<{rows}x2xf32>",
                        f"tensor<{rows}x8xf32>"], outs
    [(ins, outs)] = _call_types(hlo, "natten_fused_fna_bwd")
    assert len(ins) == 10 and len(outs) == 8, (ins, outs)
    # q, k, v, rpb, add_k, add_v, stats, o32, do, dlse
    assert ins[6:8] == [f"tensor<{rows}x2xf32>", f"tensor<{rows}x8xf32>"], ins


@pytest.mark.parametrize("dtype, settings, used", [
    (jnp.float16, {}, True), (jnp.float16, dict(mma="wgmma"), True),
    (jnp.float16, dict(mma="mma_sync"), False), (jnp.float16, dict(deterministic=True), False),
    (jnp.float32, {}, False)])
def test_fused_dq_workspace_only_where_used(fused_targets, dtype, settings, used):
    """The float32 dq workspace of the fused backward has q's shape only where the Hopper
    single-walk schedule may add into it; elsewhere it is absent."""
    q, kv = Q.astype(dtype), KV.astype(dtype)
    f = lambda q: jnp.sum(jax_natten.na2d(q, kv, kv, 5, backend="fused").astype(jnp.float32))
    with jax_natten.fused_config(**settings):
        [(_, outs)] = _call_types(_hlo(jax.grad(f), "cuda", q), "natten_fused_fna_bwd")
    assert outs[-1] == ("tensor<2x1x9x7x4x8xf32>" if used else ABSENT), outs


def test_fused_residuals_under_vmap(fused_targets):
    """vmap folds the residuals into the batch like o (one call each way), absent ones pass
    through."""
    q = jnp.stack([Q, Q + 1])
    kv = q[..., :2, :]
    f = lambda q, k, v: jax_natten.na2d(q, k, v, 5, backend="fused")
    [(_, outs)] = _call_types(_hlo(jax.vmap(f), "cuda", q, kv, kv), "natten_fused_fna_fwd")
    assert outs[2:] == [ABSENT, ABSENT], outs
    loss = lambda q, k, v: jnp.sum(jax.vmap(f)(q, k, v).astype(jnp.float32))
    hlo = _hlo(jax.grad(loss), "cuda", q, kv, kv)
    [(_, outs)] = _call_types(hlo, "natten_fused_fna_fwd")
    assert outs[2] == "tensor<4x1x9x7x4x2xf32>", outs
    [(ins, _)] = _call_types(hlo, "natten_fused_fna_bwd")
    assert ins[6] == "tensor<4x1x9x7x4x2xf32>", ins
