"""The fused kernels' own settings (jax_natten.fused_config): tile shapes chosen by the user, and
the deterministic backward. Values are checked against the float64 oracle like every backend."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import oracle
from cases import (CASES, TOLERANCE, fresh_rng, make_inputs, na_fn, on_backend, refusal, rel_err,
                   require)
import jax_natten
from jax_natten import config

CASE = next(c for c in CASES if c.name == "2d-tiles-rpb-mqa")  # rpb, MQA, several tiles


def _attention(x, **kw):
    return jax_natten.na2d(**x, **CASE.kwargs(), return_lse=True, backend="fused", **kw)


@pytest.mark.parametrize("q_tile, kv_tile", [((8, 8), (8, 8)), ((16, 8), (4, 16)),
                                             ((1, 64), (64, 1)), ((2, 4), (1, 1)), (None, (2, 32))])
def test_user_tiles_match_reference(q_tile, kv_tile):
    require("fused")
    rng, seed = fresh_rng()
    x = make_inputs(CASE, jnp.bfloat16, rng)
    with jax_natten.fused_config(q_tile=q_tile, kv_tile=kv_tile):
        out, lse = on_backend("fused", _attention, x)
    ref_out, ref_lse = oracle.attention(x["query"], x["key"], x["value"], *CASE.oracle_args(),
                                        scale=CASE.dim ** -0.5, rpb=x["rpb"])
    assert rel_err(out, ref_out) < TOLERANCE[jnp.bfloat16], f"{q_tile} {kv_tile} (seed {seed})"
    assert rel_err(lse, ref_lse) < TOLERANCE[jnp.bfloat16], f"{q_tile} {kv_tile} (seed {seed})"


def _fused_op_and_loss(name, dtype, **kw):
    """Case `name` on fresh inputs of `dtype`: the fused op f(x) (more keyword arguments `kw`,
    e.g. scale) and the loss sum(f(x) * cot), its cotangent a float32 host array (a constant on
    any device)."""
    case = next(c for c in CASES if c.name == name)
    rng, seed = fresh_rng()
    x = make_inputs(case, dtype, rng)
    out_shape = x["query"].shape[:-1] + x["value"].shape[-1:]
    cot = rng.standard_normal(out_shape).astype(np.float32)
    f = lambda x: na_fn(case.rank)(**x, **case.kwargs(), **kw, backend="fused")
    loss = lambda x: jnp.sum(f(x).astype(jnp.float32) * cot)
    return case, x, cot, f, loss, seed


def _reference(case, x, cot, scale):
    """The float64 oracle's output and gradients (of sum(out * cot)) for case's inputs x."""
    args = (x["query"], x["key"], x["value"], *case.oracle_args())
    out = oracle.attention(*args, scale=scale, rpb=x.get("rpb"))[0]
    grads = oracle.attention_vjp(*args, cot, np.zeros(cot.shape[:-1]), scale=scale,
                                 rpb=x.get("rpb"))
    return out, grads


# Deterministic mode runs another schedule (a dq kernel and a dk/dv walk; fna.cuh) than the
# default on Hopper (one walk adding dq in float32): both head-dim tiles the single walk serves.
@pytest.mark.parametrize("name", ["2d-tiles-rpb-mqa", "3d-tiles-d64"])
def test_deterministic_backward_is_bitwise_reproducible(name):
    require("fused")
    _, x, _, _, loss, seed = _fused_op_and_loss(name, jnp.float16)
    with jax_natten.fused_config(deterministic=True):
        g1 = on_backend("fused", jax.grad(loss), x)
        g2 = on_backend("fused", jax.grad(loss), x)
    g_default = on_backend("fused", jax.grad(loss), x)
    for arg in g1:
        assert np.array_equal(np.asarray(g1[arg]), np.asarray(g2[arg])), arg
        # Both modes compute the same gradient (up to summation order).
        assert rel_err(g1[arg], g_default[arg]) < 2 * TOLERANCE[jnp.float16], f"{arg} ({seed})"


@pytest.mark.parametrize("kw, match", [
    (dict(q_tile=(3, 8)), "powers of two"),
    (dict(kv_tile=(16, 8)), "at most 64"),
    (dict(q_tile=(0,)), "powers of two"),
])
def test_bad_tiles_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        with jax_natten.fused_config(**kw):
            pass


def test_tile_rank_must_match_problem():
    x = jnp.zeros((1, 8, 8, 2, 8), jnp.float16)
    with jax_natten.fused_config(q_tile=(64,)):
        with pytest.raises(ValueError, match="1 extents for a 2-D problem"):
            jax.jit(lambda x: jax_natten.na2d(x, x, x, 3, backend="reference")).lower(x)


def test_config_is_read_at_trace_time_and_restored():
    assert config.current() == config.FusedConfig()
    with jax_natten.fused_config(q_tile=(8, 8), deterministic=True) as cfg:
        assert config.current() is cfg and cfg.q_tile == (8, 8)
    assert config.current() == config.FusedConfig()


def _is_hopper():
    try:
        return jax.devices("gpu")[0].compute_capability.startswith("9.")
    except RuntimeError:
        return False


# The default test suite runs the MMA family `mma="auto"` picks on this GPU; this runs every case
# on each family explicitly (forward against the oracle, gradients against the other family), so a
# Hopper machine checks the mma.sync kernels too.
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_mma_families_match_reference(case):
    require("fused")
    if refusal("fused", jnp.bfloat16, (case.dim, case.value_dim or case.dim)):
        pytest.skip("head dims the fused kernels refuse")
    families = ["mma_sync", "wgmma"] if _is_hopper() else ["mma_sync"]
    rng, seed = fresh_rng()
    x = make_inputs(case, jnp.float16, rng)
    f = lambda x: na_fn(case.rank)(**x, **case.kwargs(), return_lse=True, backend="fused")
    cot = jnp.asarray(rng.standard_normal(x["query"].shape[:-1] + (case.value_dim or case.dim,)),
                      jnp.float32)
    loss = lambda x: jnp.sum(f(x)[0].astype(jnp.float32) * cot)
    ref_out, ref_lse = oracle.attention(x["query"], x["key"], x["value"], *case.oracle_args(),
                                        scale=case.dim ** -0.5, rpb=x.get("rpb"),
                                        add_k=x.get("additional_keys"),
                                        add_v=x.get("additional_values"))
    grads = {}
    for mma in families:
        with jax_natten.fused_config(mma=mma):
            out, lse = on_backend("fused", f, x)
            grads[mma] = on_backend("fused", jax.grad(loss), x)
        assert rel_err(out, ref_out) < TOLERANCE[jnp.float16], f"{mma} out (seed {seed})"
        assert rel_err(lse, ref_lse) < TOLERANCE[jnp.float16], f"{mma} lse (seed {seed})"
    for name in grads[families[0]]:
        for mma in families[1:]:
            err = rel_err(grads[mma][name], grads[families[0]][name])
            assert err < 2 * TOLERANCE[jnp.float16], f"d{name} {mma} (seed {seed})"


# A negative scale: the kernels fold its sign into the scores (the online softmax's running max
# must be the largest logit's), on their unmasked and masked steps, with and without rpb. Each
# forward kernel of both MMA families: the one-warpgroup kernels at head-dim tile 32 (2d-mixed
# without a bias, 2d-tiles-rpb-mqa with one), the box walk on the TMA (3d-tiles-d64), the
# warp-specialized kernel at 128 (2d-stride-dil-d128); the backward's weights likewise.
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["2d-mixed", "2d-tiles-rpb-mqa", "3d-tiles-d64",
                                  "2d-stride-dil-d128"])
def test_negative_scale_matches_reference(name):
    require("fused")
    scale = -0.3
    case, x, cot, f, loss, seed = _fused_op_and_loss(name, jnp.bfloat16, scale=scale)
    ref_out, ref = _reference(case, x, cot, scale)
    tol = TOLERANCE[jnp.bfloat16]
    for mma in ["mma_sync", "wgmma"] if _is_hopper() else ["mma_sync"]:
        with jax_natten.fused_config(mma=mma):
            out = on_backend("fused", f, x)
            grads = on_backend("fused", jax.grad(loss), x)
        assert rel_err(out, ref_out) < tol, f"{mma} out (seed {seed})"
        for key, want in ref.items():
            err = rel_err(grads[key], want)
            assert err < 2 * tol, f"{mma} d{key}: {err:.2e} (seed {seed})"


@pytest.mark.gpu
def test_wgmma_is_refused_off_hopper():
    require("fused")
    if _is_hopper():
        pytest.skip("this GPU runs wgmma")
    x = jnp.zeros((1, 16, 2, 32), jnp.bfloat16)
    with jax_natten.fused_config(mma="wgmma"):
        with pytest.raises(Exception, match="Hopper"):
            on_backend("fused", lambda x: jax_natten.na1d(x, x, x, 3, backend="fused"), x)


def test_bad_mma_is_refused():
    with pytest.raises(ValueError, match="mma must be one of"):
        with jax_natten.fused_config(mma="tensor"):
            pass


# Key tiles of fewer than 64 tokens in 3-D: the kernels grow them along the first axis (tiling.h
# fill_tile); without that, tile rows past the user's tile landed on keys of the next tile. No rpb
# and large windows, so that tiles lie inside every window and skip the per-element test.
@pytest.mark.gpu
@pytest.mark.parametrize("q_tile, kv_tile", [((2, 2, 2), (2, 2, 2)), ((4, 4, 4), (1, 4, 2))])
def test_small_3d_tiles_match_reference(q_tile, kv_tile):
    require("fused")
    case = dict(kernel_size=(5, 6, 7), stride=(1, 1, 1), dilation=(1, 1, 1),
                is_causal=(False, False, False))
    rng, seed = fresh_rng()
    shape = (1, 6, 7, 9, 2, 32)
    x = {n: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for n in ("query", "key", "value")}
    f = lambda x: jax_natten.na3d(**x, **case, return_lse=True, backend="fused")
    with jax_natten.fused_config(q_tile=q_tile, kv_tile=kv_tile):
        out, lse = on_backend("fused", f, x)
        grads = on_backend("fused", jax.grad(lambda x: jnp.sum(f(x)[0].astype(jnp.float32) ** 2)), x)
    ref_out, ref_lse = oracle.attention(x["query"], x["key"], x["value"], case["kernel_size"],
                                        case["stride"], case["dilation"], case["is_causal"],
                                        scale=32 ** -0.5)
    assert rel_err(out, ref_out) < TOLERANCE[jnp.bfloat16], f"out (seed {seed})"
    assert rel_err(lse, ref_lse) < TOLERANCE[jnp.bfloat16], f"lse (seed {seed})"
    ref_grads = on_backend("fused", jax.grad(lambda x: jnp.sum(f(x)[0].astype(jnp.float32) ** 2)), x)
    for name in grads:  # default tiles vs small tiles: the same gradient up to rounding
        assert rel_err(grads[name], ref_grads[name]) < 2 * TOLERANCE[jnp.bfloat16], name


# The single-walk backward (Hopper default) sums d-rpb per CTA in shared memory when the table
# fits; larger tables (here 41^3 = 68921 entries per head, 276 KB) are summed with atomics on
# the output.
# GQA too, so the walk crosses query heads.
@pytest.mark.gpu
def test_large_rpb_gradient_matches_reference():
    require("fused")
    rng, seed = fresh_rng()
    kernel = (21, 21, 21)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    x = dict(query=draw(1, 21, 22, 21, 2, 16), key=draw(1, 21, 22, 21, 1, 16),
             value=draw(1, 21, 22, 21, 1, 16),
             rpb=jnp.asarray(rng.standard_normal((2, 41, 41, 41)), jnp.float32))
    cot = jnp.asarray(rng.standard_normal((1, 21, 22, 21, 2, 16)), jnp.float32)

    def loss(x, c, backend):
        out = jax_natten.na3d(**x, kernel_size=kernel, backend=backend)
        return jnp.sum(out.astype(c.dtype) * c)

    g = on_backend("fused", jax.grad(lambda x, c: loss(x, c, "fused")), x, cot)
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
        ref = jax.jit(jax.grad(lambda x, c: loss(x, c, "reference")))(f64(x), f64(cot))
    for name in ref:
        err = rel_err(g[name], ref[name])
        assert err < 2 * TOLERANCE[jnp.bfloat16], f"d{name}: {err:.2e} (seed {seed})"


# Kernels with more than 48 KB of shared memory opt in per device (cuda/fna/launch.h
# grant_smem): a process driving several GPUs (pmap, sharded jit) launches them on each. The op and
# its gradients on every local GPU, against the float64 oracle; with one GPU this is the plain
# check, with several it is the one that finds a kernel opted in on the first device only.
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["3d-tiles-d64", "2d-stride-dil-d128"])
def test_every_gpu_runs_the_kernels(name):
    require("fused")
    case, x, cot, f, loss, seed = _fused_op_and_loss(name, jnp.bfloat16)
    ref_out, ref = _reference(case, x, cot, case.dim ** -0.5)
    tol = TOLERANCE[jnp.bfloat16]
    for dev in jax.devices("gpu"):
        xd = jax.device_put(x, dev)
        out = jax.jit(f)(xd)
        grads = jax.jit(jax.grad(loss))(xd)
        assert rel_err(out, ref_out) < tol, f"out on {dev} (seed {seed})"
        for key, want in ref.items():
            err = rel_err(grads[key], want)
            assert err < 2 * tol, f"d{key} on {dev}: {err:.2e} (seed {seed})"
