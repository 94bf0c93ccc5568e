"""Small fused-attention problems of every rank, forward and backward, for compute-sanitizer
(memcheck and racecheck; run by `.ci/gpu-run` with SANITIZE=1). Each case mixes the features that
change the kernels' paths: borders, even/odd kernels, stride, dilation, causal, GQA, rpb and
additional keys/values; head dims 32 / 64 / 128 pick the three head-dim tiles. Every case runs in
bfloat16 on both MMA families this GPU has (wgmma, in both backward schedules, and mma.sync on
Hopper) and in float32 (`variants`)."""
import os

import jax
import jax.numpy as jnp
import numpy as np

import jax_natten

CASES = [  # rank, spatial, kernel, stride, dilation, causal, heads, kv_heads, D, Dv, rpb, S_add
    (1, (77,), (9,), (2,), (2,), (True,), 4, 2, 32, 32, False, 3),
    (1, (70,), (8,), (1,), (1,), (False,), 2, 2, 64, 64, True, 0),
    # The TMA kernels' 1-D problems (Hopper): the forward at head-dim tiles 64 and 128, the
    # backward at 64; dilation, stride, causal, GQA / MQA.
    (1, (300,), (65,), (1,), (2,), (False,), 4, 2, 64, 48, False, 0),
    (1, (200,), (40,), (3,), (1,), (True,), 2, 1, 128, 96, False, 0),
    (1, (257,), (100,), (3,), (1,), (True,), 2, 1, 64, 64, False, 0),
    # Head dim 32 on them: 64-column tiles, the columns past the head dim zero-filled.
    (1, (300,), (77,), (1,), (2,), (False,), 4, 2, 32, 16, False, 0),
    # Several 192-query tiles whose warpgroups reach different steps (idle turns).
    (1, (1100,), (257,), (1,), (1,), (False,), 2, 1, 64, 64, False, 0),
    # The TMA forward's box walk (Hopper): 2-D on three warpgroups with dilation, stride, causal,
    # GQA and several stacked tiles; 3-D on two (below).
    (2, (40, 37), (9, 6), (1, 2), (2, 1), (True, False), 4, 2, 64, 64, False, 0),
    # The warp-specialized forward's TMA variant (Hopper): 2-D with rpb and dilation.
    (2, (24, 20), (5, 7), (1, 1), (2, 1), (False, False), 2, 1, 64, 64, True, 0),
    (3, (8, 12, 12), (3, 5, 5), (1, 1, 1), (1, 1, 1), (False, True, False), 2, 2, 128, 128, False,
     0),
    # The TMA dq kernel with rpb (head-dim tile 128: d-rpb in shared memory).
    (2, (12, 18), (3, 5), (1, 1), (1, 1), (False, False), 2, 1, 128, 96, True, 0),
    # Long key walks at head dim 128: the dk / dv walk on two warpgroups (128-key tiles).
    (2, (64, 48), (31, 29), (1, 1), (1, 1), (False, False), 2, 1, 128, 128, False, 0),
    (2, (11, 13), (5, 4), (1, 2), (2, 1), (False, True), 2, 1, 64, 32, False, 70),
    (2, (12, 10), (3, 5), (1, 1), (1, 2), (False, False), 2, 2, 32, 32, True, 0),
    (3, (5, 7, 6), (3, 3, 2), (1, 2, 1), (1, 2, 1), (True, False, False), 2, 2, 128, 128, False, 2),
    (3, (4, 6, 7), (3, 5, 3), (1, 1, 1), (1, 1, 2), (False, False, False), 2, 1, 32, 64, True, 0),
]


def variants():
    """(dtype, fused_config) pairs to run: bf16 on each MMA family of this GPU (on Hopper also the
    deterministic backward, a different schedule), then float32. SANITIZE_VARIANTS (a comma list
    of wgmma, deterministic, mma_sync, f32) picks some."""
    hopper = jax.devices("gpu")[0].compute_capability.startswith("9.")
    named = {"mma_sync": (jnp.bfloat16, dict(mma="mma_sync")), "f32": (jnp.float32, {})}
    if hopper:
        named = {"wgmma": (jnp.bfloat16, dict(mma="wgmma")),
                 "deterministic": (jnp.bfloat16, dict(mma="wgmma", deterministic=True)), **named}
    pick = [v for v in os.environ.get("SANITIZE_VARIANTS", "").split(",") if v]
    return [named[v] for v in (pick or named) if v in named]


def cases():
    """CASES, or those whose indices SANITIZE_CASES (a comma list) names: a short device call can
    check the kernels a change touches."""
    pick = [int(i) for i in os.environ.get("SANITIZE_CASES", "").split(",") if i.strip()]
    return [CASES[i] for i in pick] if pick else CASES


def main():
    rng = np.random.default_rng(0)
    for (rank, spatial, k, s, d, c, h, kvh, dim, dim_v, rpb, add), (dtype, settings) in (
            (case, v) for case in cases() for v in variants()):
        draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
        x = dict(query=draw(2, *spatial, h, dim), key=draw(2, *spatial, kvh, dim),
                 value=draw(2, *spatial, kvh, dim_v))
        if rpb:
            x["rpb"] = jnp.asarray(rng.standard_normal((h,) + tuple(2 * i - 1 for i in k)),
                                   jnp.float32)
        if add:
            x["additional_keys"] = draw(2, add, kvh, dim)
            x["additional_values"] = draw(2, add, kvh, dim_v)
        f = getattr(jax_natten, f"na{rank}d")
        loss = lambda x: jnp.sum(f(**x, kernel_size=k, stride=s, dilation=d, is_causal=c,
                                   backend="fused").astype(jnp.float32) ** 2)
        with jax_natten.fused_config(**settings):
            value, grads = jax.jit(jax.value_and_grad(loss))(x)
        assert np.isfinite(float(value)) and all(
            bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
        print(f"ok rank {rank} {spatial} k{k} D{dim}/{dim_v} {jnp.dtype(dtype).name} {settings}",
              flush=True)


if __name__ == "__main__":
    main()
