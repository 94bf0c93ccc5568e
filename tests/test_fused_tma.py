"""The TMA-fed Hopper kernels: the forwards (cuda/fna/forward_tma.cu: its 1-D walk, and its box
walk on 2-D and 3-D problems; forward_ws.cu's TMA variant for those with rpb), which problems they
serve (planned on the host, no GPU
needed), and on a Hopper GPU their outputs and the gradients against the float64 oracle; the
gradients of the 1-D cases at head dims up to 64 come from the TMA backward (backward_tma.cu). The
problems walk the kernels' edges: partial query tiles and key tiles, windows wider than a step or
the whole axis, dilation groups, stride, causal, even kernels, GQA / MQA, rpb (2-D), head dims
that pad to their 64-column blocks, a negative scale."""
import math
import types

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import oracle
from cases import TOLERANCE, Case, fresh_rng, make_inputs, na_fn, on_backend, rel_err, require
import jax_natten

HOPPER = types.SimpleNamespace(compute_capability="9.0")  # devices as fused_tiles reads them
AMPERE = types.SimpleNamespace(compute_capability="8.0")

CASES = [
    Case("basic-partial-tile", (331,), (65,), dim=64),
    Case("dil-stride-gqa-d128", (1200,), (257,), (3,), (4,), heads=4, kv_heads=2, dim=128,
         value_dim=72, batch=1),
    Case("causal-stride-mqa-d40", (517,), (200,), (2,), (1,), (True,), heads=3, kv_heads=1,
         dim=40),
    Case("causal-even-dil-d96", (300,), (128,), (1,), (2,), (True,), dim=96, value_dim=64),
    Case("short-axis", (50,), (13,), dim=64, batch=3),
    Case("whole-axis", (256,), (256,), dim=64),
    Case("blocked", (385,), (32,), (32,), dim=56, value_dim=128),
    Case("dil-gqa-d64", (1000,), (301,), None, (2,), heads=4, kv_heads=2, dim=64, value_dim=48,
         batch=1),
    Case("causal-stride-d64", (643,), (130,), (3,), None, (True,), heads=2, dim=64),
    # Head dims up to 32: the same kernels at head-dim tile 64, the columns past the head dim
    # zero-filled by the TMA.
    Case("d32-gqa", (513,), (129,), heads=4, kv_heads=2, dim=32),
    Case("d16-dil-causal", (400,), (101,), None, (2,), (True,), dim=16, value_dim=32),
]
BOX_CASES = [  # 2-D and 3-D: forward_tma.cu's box walk; with rpb forward_ws.cu's TMA variant
    Case("2d-rpb-gqa", (40, 48), (9, 13), rpb=True, heads=4, kv_heads=2, dim=64),
    Case("2d-stride-dil-causal-d96", (36, 50), (7, 10), (2, 3), (2, 2), (True, False), dim=96,
         value_dim=64),
    Case("2d-large-window-d128", (64, 64), (31, 31), dim=128, batch=1),
    Case("2d-rpb-d128", (20, 26), (5, 7), rpb=True, heads=4, dim=128),
    # Long key walks at head dim 128 with GQA, dilation, stride and causal: the dk / dv walk on
    # two warpgroups (128-key tiles).
    Case("2d-long-walk-gqa-causal-d128", (64, 62), (33, 31), (1, 3), None, (False, True),
         heads=4, kv_heads=2, dim=128, value_dim=96, batch=1),
    Case("2d-long-walk-dil-d128", (62, 90), (31, 45), (1, 2), (1, 2), dim=128, value_dim=96,
         batch=1),
    Case("2d-dil3-mqa-d72", (60, 28), (9, 11), None, (3, 1), heads=3, kv_heads=1, dim=72),
    Case("2d-even-causal-dv48", (48, 44), (12, 10), (1, 2), (1, 2), (False, True), dim=64,
         value_dim=48),
    # The box walk's stacked tiles past the end of x (5 = 3 + 2 parts; 9 = 6 + 3 with the last
    # part partial) and key boxes several x planes deep that reach into the next batch element
    # (batch and x share one map axis).
    Case("3d-partial-tile-gqa", (5, 16, 16), (3, 5, 5), heads=4, kv_heads=2, dim=64),
    Case("3d-keys-cross-batch", (9, 12, 16), (7, 5, 5), (2, 1, 1), (1, 1, 2), dim=64),
    # Small windows: the box walk's 128-key tiles would compute too many scores (tiling.h
    # tma_box_plan): the warp-specialized kernel's TMA variant.
    Case("2d-small-window", (40, 50), (9, 9), dim=64),
    # 3-D: batch and x share one map axis (two batch elements: no box may cross between them).
    Case("3d-d128", (8, 12, 12), (3, 5, 5), dim=128),
    Case("3d-stride-gqa-d96", (6, 16, 20), (3, 7, 9), (1, 2, 3), heads=4, kv_heads=2, dim=96),
]


def _plan(case, **kw):
    return jax_natten.fused_tiles(case.spatial, case.kernel, stride=case.stride or 1,
                                  dilation=case.dilation or 1, is_causal=case.causal or False,
                                  head_dim=case.dim, value_dim=case.value_dim, device=HOPPER, **kw)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tma_forward_serves_these_problems(case):
    require_extension()
    plan = _plan(case)
    rows = 192 if case.dim <= 64 and (case.value_dim or 0) <= 64 else 128  # three / two warpgroups
    assert plan.kernel == "wgmma_tma" and plan.q_tile == (rows,) and plan.kv_tile == (128,)
    with jax_natten.fused_config(mma="wgmma"):
        assert _plan(case).kernel == "wgmma_tma"


@pytest.mark.parametrize("case", BOX_CASES, ids=[c.name for c in BOX_CASES])
def test_box_tma_forward_serves_these_problems(case):
    require_extension()
    plan = _plan(case, rpb=case.rpb)
    if case.rpb or case.name == "2d-small-window":
        assert plan.kernel == "wgmma_ws_tma"
        assert math.prod(plan.q_tile) == 128 and math.prod(plan.kv_tile) == 64
    else:  # a 64-query box per warpgroup (three at head dims up to 64), 128-key boxes
        rows = 192 if case.dim <= 64 and (case.value_dim or 0) <= 64 else 128
        assert plan.kernel == "wgmma_tma"
        assert math.prod(plan.q_tile) == rows and math.prod(plan.kv_tile) == 128


def _plan_with_tiles(case):
    with jax_natten.fused_config(q_tile=(8, 16), kv_tile=(8, 8)):
        return _plan(case)


def test_tma_forward_leaves_the_rest_to_the_box_kernels():
    require_extension()
    base = CASES[0]
    others = {
        "dilation that does not divide the axis": _plan(Case("x", (331,), (65,), None, (2,),
                                                             dim=64)),
        "rpb": _plan(base, rpb=True),
        "additional keys": _plan(base, additional_keys=5),
        "2-D with rpb": _plan(Case("x", (40, 50), (9, 9), dim=64), rpb=True),
        "2-D with additional keys": _plan(Case("x", (40, 50), (9, 9), dim=64),
                                          additional_keys=5),
        "2-D, a user's tiles": _plan_with_tiles(Case("x", (40, 50), (9, 9), dim=64)),
        # (the box walk's masks take key boxes two or more tokens deep on the last axis)
        "3-D, a last axis of one token": _plan(Case("x", (24, 30, 1), (9, 9, 1), dim=64)),
        "float32": jax_natten.fused_tiles((331,), 65, head_dim=64, dtype="float32", device=HOPPER),
        "not Hopper": jax_natten.fused_tiles((331,), 65, head_dim=64, device=AMPERE),
    }
    for why, plan in others.items():
        assert plan.kernel != "wgmma_tma", why
    # 1-D head dims up to 32 run on the TMA kernels as 64-column tiles (tiling.h
    # tma_head_dim_tile); 2-D ones keep the kernels of their own tile.
    assert _plan(Case("x", (331,), (65,), dim=32)).kernel == "wgmma_tma"
    assert _plan(Case("x", (331,), (65,), dim=16, value_dim=32)).kernel == "wgmma_tma"
    assert _plan(Case("x", (56, 56), (7, 7), dim=32)).kernel == "wgmma"
    with jax_natten.fused_config(q_tile=(64,)):
        assert _plan(base).kernel == "mma_sync"  # auto: the other 1-D forwards
    with jax_natten.fused_config(mma="mma_sync"):
        assert _plan(base).kernel == "mma_sync"


def test_backward_schedules():
    """Which backward each problem gets (cuda/fna/tiling.h plan_backward, as the handler runs it):
    the TMA backward for the 1-D cases at head-dim tiles 32 and 64 with its own 128-token tiles,
    the walk with dq elsewhere on Hopper at head-dim tile 64, the two-kernel schedule where the
    walk cannot add dq and at head-dim tile 128 (on the box problems both its dq kernel and its
    dk / dv walk fed by the TMA, with or without rpb)."""
    require_extension()
    for case in CASES:
        plan = _plan(case)
        tile = max(32, 1 << (max(case.dim, case.value_dim or case.dim) - 1).bit_length())
        if tile <= 64:  # (head-dim tile 32: the same kernel at 64, tiling.h tma_head_dim_tile)
            assert (plan.backward, plan.bwd_q_tile, plan.bwd_kv_tile) == ("walk_tma", (128,),
                                                                          (128,)), case.name
        else:  # head-dim tile 128: the dq kernel, then the 64-key walk for dk / dv
            assert (plan.backward, plan.bwd_kv_tile) == ("dq_dkdv", (64,)), case.name
    base = CASES[0]
    assert _plan(base, rpb=True).backward == "walk"  # the box walk (rpb at tile 64)
    two_d = _plan(Case("x", (40, 50), (9, 9), dim=64))  # the box walk, fed by the TMA
    assert two_d.backward == "walk_box_tma" and math.prod(two_d.bwd_kv_tile) == 64
    assert _plan(Case("x", (40, 50), (9, 9), dim=32)).backward == "walk"  # tile 32: cp.async
    # Head-dim tile 128 on the box problems: the TMA dq kernel (the box forward's tiles; with rpb
    # it sums d-rpb), then the walk for dk / dv, q and do copied by the TMA too: on one
    # warpgroup of 64 keys where a key tile's walk is short, on two (128-key tiles) where it is
    # long (tiling.h kLongKeyWalk). A 3-D problem whose x axis (5) the walks' query tiles do not
    # divide (their boxes would cross into the next batch element): neither is fed by the TMA.
    two_d = _plan(Case("x", (40, 50), (9, 9), dim=128))
    assert two_d.backward == "dq_tma_dkdv_tma" and math.prod(two_d.bwd_kv_tile) == 64
    wide = _plan(Case("x", (64, 64), (31, 31), dim=128))
    assert wide.backward == "dq_tma_dkdv_tma" and math.prod(wide.bwd_kv_tile) == 128
    video = _plan(Case("x", (16, 48, 48), (7, 15, 15), dim=128))
    assert video.backward == "dq_tma_dkdv_tma" and math.prod(video.bwd_kv_tile) == 128
    for case in BOX_CASES:  # (the GPU cases that run the two-warpgroup walk)
        if case.name.startswith("2d-long-walk"):
            plan = _plan(case)
            assert plan.backward == "dq_tma_dkdv_tma", case.name
            assert math.prod(plan.bwd_kv_tile) == 128, case.name
    assert _plan(Case("x", (40, 50), (9, 9), dim=128), rpb=True).backward == "dq_tma_dkdv_tma"
    assert _plan(Case("x", (5, 16, 16), (3, 5, 5), dim=128)).backward == "dq_dkdv"
    # (The 3-D cases whose x axis the backward's query tiles do not divide: no TMA there.)
    x_cut = {"3d-partial-tile-gqa", "3d-keys-cross-batch"}
    for case in BOX_CASES:
        plan = _plan(case, rpb=case.rpb)
        want = "walk_box_tma" if max(case.dim, case.value_dim or 0) <= 64 else "dq_tma_dkdv_tma"
        assert plan.backward == ("walk" if case.name in x_cut else want), case.name
        with jax_natten.fused_config(deterministic=True):  # no dq workspace: the dq kernels
            want = "dq_dkdv" if case.name in x_cut else "dq_tma_dkdv_tma"
            assert _plan(case, rpb=case.rpb).backward == want, case.name
    with jax_natten.fused_config(deterministic=True):
        assert _plan(base).backward == "dq_dkdv"
    with jax_natten.fused_config(mma="mma_sync"):
        assert _plan(base).backward == "dq_dkdv"
    with jax_natten.fused_config(kv_tile=(64,)):
        assert _plan(base).backward == "walk"  # a user's tiles: the box walk
    assert jax_natten.fused_tiles((331,), 65, head_dim=64, device=AMPERE).backward == "dq_dkdv"
    assert jax_natten.fused_tiles((331,), 65, head_dim=64, dtype="float32",
                                  device=HOPPER).backward == "simt"


def require_extension():
    from jax_natten.backends import ffi
    if ffi._ext is None:
        pytest.fail(ffi._missing_extension())


def _on_hopper():
    require("fused")
    if not jax.devices("gpu")[0].compute_capability.startswith("9."):
        pytest.skip("the TMA forward runs on Hopper GPUs")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", CASES + BOX_CASES, ids=[c.name for c in CASES + BOX_CASES])
def test_tma_forward_and_gradients_match_reference(case, dtype):
    _on_hopper()
    rng, seed = fresh_rng()
    x = make_inputs(case, dtype, rng)
    scale = -0.3 if case.name == "short-axis" else case.dim ** -0.5  # the sign-folding path too
    kw = dict(case.kwargs(), scale=scale, return_lse=True, backend="fused")
    out_shape = x["query"].shape[:-1] + x["value"].shape[-1:]
    dout = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    dlse = jnp.asarray(rng.standard_normal(out_shape[:-1]), jnp.float32)

    f = na_fn(case.rank)

    def loss(x):
        out, lse = f(**x, **kw)
        return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(lse * dlse)

    out, lse = on_backend("fused", lambda x: f(**x, **kw), x)
    grads = on_backend("fused", jax.grad(loss), x)
    args = (x["query"], x["key"], x["value"], *case.oracle_args())
    ref_out, ref_lse = oracle.attention(*args, scale=scale, rpb=x.get("rpb"))
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref_out) < tol, f"out (seed {seed})"
    assert rel_err(lse, ref_lse) < tol, f"lse (seed {seed})"
    ref = oracle.attention_vjp(*args, np.asarray(dout), np.asarray(dlse), scale=scale,
                               rpb=x.get("rpb"))
    for name in ref:
        err = rel_err(grads[name], ref[name])
        assert err < 2 * tol, f"d{name}: relative error {err:.2e} (seed {seed})"


DETERMINISTIC_BOX_CASES = [c for c in BOX_CASES
                           if c.name in ("2d-even-causal-dv48", "3d-d128", "2d-rpb-gqa")]


@pytest.mark.gpu
@pytest.mark.parametrize("case", DETERMINISTIC_BOX_CASES,
                         ids=[c.name for c in DETERMINISTIC_BOX_CASES])
def test_tma_dq_kernel_deterministic(case):
    """fused_config(deterministic=True) on box problems: the TMA dq kernel (head-dim tile 64
    here too) and the TMA-fed dk / dv walk; gradients against the oracle, bit-equal across two
    runs."""
    _on_hopper()
    rng, seed = fresh_rng()
    x = make_inputs(case, jnp.bfloat16, rng)
    out_shape = x["query"].shape[:-1] + x["value"].shape[-1:]
    dout = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    f = na_fn(case.rank)
    kw = dict(case.kwargs(), backend="fused")

    def loss(x):
        return jnp.sum(f(**x, **kw).astype(jnp.float32) * dout)

    with jax_natten.fused_config(deterministic=True):
        assert _plan(case, rpb=case.rpb).backward == "dq_tma_dkdv_tma"
        grad = jax.jit(jax.grad(loss))
        first = on_backend("fused", grad, x)
        again = on_backend("fused", grad, x)
    args = (x["query"], x["key"], x["value"], *case.oracle_args())
    ref = oracle.attention_vjp(*args, np.asarray(dout), np.zeros(out_shape[:-1]),
                               scale=case.dim ** -0.5, rpb=x.get("rpb"))
    for name in ref:
        err = rel_err(first[name], ref[name])
        assert err < 2 * TOLERANCE[jnp.bfloat16], f"d{name}: {err:.2e} (seed {seed})"
        assert np.array_equal(np.asarray(first[name]), np.asarray(again[name])), name
