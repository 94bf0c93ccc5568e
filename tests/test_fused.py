"""The fused kernels' own settings (jax_natten.fused_config): tile shapes chosen by the user, and
the deterministic backward. Values are checked against the float64 oracle like every backend."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import oracle
from cases import CASES, TOLERANCE, fresh_rng, make_inputs, on_backend, rel_err, require
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


def test_deterministic_backward_is_bitwise_reproducible():
    require("fused")
    rng, seed = fresh_rng()
    x = make_inputs(CASE, jnp.float16, rng)
    cot = jnp.asarray(rng.standard_normal(x["query"].shape[:-1] + (CASE.dim,)), jnp.float32)
    loss = lambda x: jnp.sum(_attention(x)[0].astype(jnp.float32) * cot)
    with jax_natten.fused_config(deterministic=True):
        g1 = on_backend("fused", jax.grad(loss), x)
        g2 = on_backend("fused", jax.grad(loss), x)
    g_default = on_backend("fused", jax.grad(loss), x)
    for name in g1:
        assert np.array_equal(np.asarray(g1[name]), np.asarray(g2[name])), name
        # Both modes compute the same gradient (up to summation order).
        assert rel_err(g1[name], g_default[name]) < 2 * TOLERANCE[jnp.float16], f"{name} ({seed})"


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
