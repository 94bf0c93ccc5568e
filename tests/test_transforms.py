"""jit, vmap (folded into the batch, nested, per-example rpb), grad under vmap, checkpoint."""
import jax
import jax.numpy as jnp
import pytest

from cases import (CASES, backend_params, device_for, dtype_for, fresh_rng, make_inputs,
                   on_backend, rel_err, require)
import jax_natten

CASE = next(c for c in CASES if c.name == "2d-rpb-add")  # rpb + additional kv: every input kind
KW = CASE.kwargs()


def _stack(xs):
    return jax.tree.map(lambda *a: jnp.stack(a), *xs)


def _attn(backend):
    return lambda x: jax_natten.na2d(**x, **KW, backend=backend)


@pytest.mark.parametrize("backend", backend_params())
def test_vmap_matches_loop(backend):
    require(backend)
    rng, seed = fresh_rng()
    xs = [make_inputs(CASE, dtype_for(backend), rng) for _ in range(3)]
    for x in xs[1:]:
        x["rpb"] = xs[0]["rpb"]  # shared rpb: vmap folds the examples into the batch
    shared_rpb = xs[0]["rpb"]
    batched = _stack([{k: v for k, v in x.items() if k != "rpb"} for x in xs])
    f = lambda b: jax.vmap(lambda x: jax_natten.na2d(**x, rpb=shared_rpb, **KW,
                                                     backend=backend))(b)
    out = on_backend(backend, f, batched)
    for i, x in enumerate(xs):
        ref = on_backend(backend, _attn(backend), x)
        assert rel_err(out[i], ref) < 1e-6, f"seed {seed}"


@pytest.mark.parametrize("backend", backend_params())
def test_vmap_per_example_rpb_and_nested(backend):
    require(backend)
    rng, seed = fresh_rng()
    xs = [[make_inputs(CASE, dtype_for(backend), rng) for _ in range(2)] for _ in range(2)]
    batched = _stack([_stack(row) for row in xs])  # [2, 2, ...] incl. a per-example rpb
    out = on_backend(backend, jax.vmap(jax.vmap(_attn(backend))), batched)
    for i in range(2):
        for j in range(2):
            ref = on_backend(backend, _attn(backend), xs[i][j])
            assert rel_err(out[i, j], ref) < 1e-6, f"seed {seed}"


@pytest.mark.parametrize("backend", backend_params())
def test_extra_leading_dims_fold_into_batch(backend):
    require(backend)
    rng, seed = fresh_rng()
    xs = [make_inputs(CASE, dtype_for(backend), rng) for _ in range(3)]
    rpb = xs[0].pop("rpb")
    for x in xs[1:]:
        del x["rpb"]
    batched = _stack(xs)
    out = on_backend(backend, lambda b: jax_natten.na2d(**b, rpb=rpb, **KW, backend=backend),
                     batched)
    for i, x in enumerate(xs):
        ref = on_backend(backend, lambda x: jax_natten.na2d(**x, rpb=rpb, **KW, backend=backend), x)
        assert rel_err(out[i], ref) < 1e-6, f"seed {seed}"


@pytest.mark.parametrize("backend", backend_params())
def test_per_example_grads_under_vmap(backend):
    """vmap(grad): the shared rpb gets one gradient per example, not their sum."""
    require(backend)
    rng, seed = fresh_rng()
    xs = [make_inputs(CASE, dtype_for(backend), rng) for _ in range(3)]
    rpb = xs[0]["rpb"]
    cot = jnp.asarray(rng.standard_normal((CASE.batch, *CASE.spatial, CASE.heads, CASE.dim)),
                      jnp.float32)
    loss = lambda r, x: jnp.sum(jax_natten.na2d(**x, rpb=r, **KW, backend=backend) * cot)
    data = [{k: v for k, v in x.items() if k != "rpb"} for x in xs]
    g = on_backend(backend, jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0)), rpb,
                   _stack(data))
    for i, x in enumerate(data):
        ref = on_backend(backend, jax.grad(loss, argnums=(0, 1)), rpb, x)
        assert rel_err(g[0][i], ref[0]) < 1e-5, f"drpb (seed {seed})"
        for name in ref[1]:
            assert rel_err(g[1][name][i], ref[1][name]) < 1e-5, f"d{name} (seed {seed})"


@pytest.mark.parametrize("backend", backend_params())
def test_checkpoint_grad(backend):
    require(backend)
    rng, seed = fresh_rng()
    x = make_inputs(CASE, dtype_for(backend), rng)
    loss = lambda x: jnp.sum(jnp.sin(_attn(backend)(x)))
    g = on_backend(backend, jax.grad(loss), x)
    gc = on_backend(backend, jax.grad(jax.checkpoint(loss)), x)
    for name in g:
        assert rel_err(gc[name], g[name]) < 1e-6, f"d{name} (seed {seed})"


def test_native_extension_built():
    """CPU-only CI must exercise the real FFI path: the host kernels have to be there."""
    assert jax_natten.backend_available("cpu", "cpu"), \
        "jax_natten was installed without its extension"


# ---- autodiff modes: what the native backends support, and a clear error for the rest ----------

def _small():
    rng, seed = fresh_rng()
    q = jax.device_put(jnp.asarray(rng.standard_normal((1, 9, 2, 8)), jnp.float32), _host())
    return q, seed


def _host():
    return jax.devices("cpu")[0]  # where the "cpu" backend runs (a GPU machine too)


@pytest.mark.parametrize("mode", ["jvp", "jacfwd", "grad_of_grad", "hessian"])
def test_unsupported_autodiff_modes_say_so(mode):
    """Forward mode (every backend of the attention op) and second derivatives (native backends):
    NotImplementedError saying what is supported, not JAX's generic errors. Second derivatives
    in reverse mode work on the reference backend."""
    require("cpu")
    q, seed = _small()
    f = lambda q, backend: jnp.sum(jnp.sin(jax_natten.na1d(q, q, q, 3, backend=backend)))
    run = {"jvp": lambda g: jax.jvp(g, (q,), (jnp.ones_like(q),))[1],
           "jacfwd": lambda g: jax.jacfwd(g)(q),
           "grad_of_grad": lambda g: jax.grad(lambda q: jnp.sum(jax.grad(g)(q) ** 2))(q),
           "hessian": lambda g: jax.hessian(g)(q)}[mode]
    backends = ["cpu"] if mode == "grad_of_grad" else ["cpu", "reference"]
    for backend in backends:
        with pytest.raises(NotImplementedError, match=r"forward-mode autodiff .* is not "
                                                      r"supported.*jax.grad.*"
                                                      r"backend='reference'"), \
                jax.default_device(_host()):
            run(lambda q: f(q, backend))
    if mode == "grad_of_grad":
        ref = run(lambda q: f(q, "reference"))
        assert jnp.all(jnp.isfinite(ref)) and float(jnp.abs(ref).max()) > 0, f"seed {seed}"


def test_second_derivatives_on_reference():
    """grad of grad on the reference backend (reverse over reverse through its softmax rule)
    equals a finite difference of the gradient along a random direction."""
    rng, seed = fresh_rng()
    q = jnp.asarray(rng.standard_normal((1, 9, 2, 8)), jnp.float32)
    t = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    with jax.enable_x64(True):
        q64, t64 = q.astype(jnp.float64), t.astype(jnp.float64)
        f = lambda q: jnp.sum(jnp.sin(jax_natten.na1d(q, q, q, 3, backend="reference")))
        g = jax.grad(f)
        hvp = jax.grad(lambda q: jnp.vdot(g(q), t64))(q64)  # H t by reverse over reverse
        eps = 1e-5
        fd = (g(q64 + eps * t64) - g(q64 - eps * t64)) / (2 * eps)
    assert rel_err(hvp, fd) < 1e-5, f"seed {seed}"


def test_reverse_mode_works_on_native():
    require("cpu")
    q, seed = _small()
    f = lambda q, backend: jnp.sum(jnp.sin(jax_natten.na1d(q, q, q, 3, backend=backend)))
    with jax.default_device(_host()):
        g = jax.grad(lambda q: f(q, "cpu"))(q)
        want = jax.grad(lambda q: f(q, "reference"))(q)
        assert rel_err(g, want) < 1e-5, f"seed {seed}"
        assert rel_err(jax.jacrev(lambda q: f(q, "cpu"))(q), want) < 1e-5, f"seed {seed}"


# ---- scale: validated; a traced scale is supported ---------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
def test_traced_scale(backend):
    """A scale that is traced (jit argument, differentiated) gives the result of the same Python
    number, and its gradient matches the reference's (float32; every backend)."""
    require(backend)
    rng, seed = fresh_rng()
    with jax.default_device(device_for(backend)):
        q, k, v = (jnp.asarray(rng.standard_normal((2, 11, 4, 8)), jnp.float32) for _ in range(3))
        s = float(rng.uniform(0.2, 0.6))
        f = lambda s, backend: jax_natten.na1d(q, k, v, 5, scale=s, backend=backend)
        got = jax.jit(f, static_argnums=1)(jnp.float32(s), backend)
        assert rel_err(got, f(s, backend)) < 1e-5, f"seed {seed}"
        loss = lambda s, backend: jnp.sum(jnp.sin(f(s, backend)))
        ds = jax.grad(loss)(jnp.float32(s), backend)
        want = jax.grad(loss)(jnp.float32(s), "reference")
        magnitude = _scale_grad_magnitude(lambda s: f(s, "reference"), jnp.float32(s))
    assert abs(float(ds) - float(want)) <= 2e-5 * magnitude, f"seed {seed}"


def _scale_grad_magnitude(attention, s):
    """sum |cos(out) * dout/ds|: the size of the terms of d/ds sum(sin(out)). That gradient is a
    sum of terms of both signs that can cancel (seed 3806774883 of the test below: 0.0176 from
    terms summing to 163), so two paths' float32 roundings are compared relative to this, not to
    the cancelled sum. (jacrev: the ops are custom_vjp, so forward mode is refused.)"""
    return float(jnp.sum(jnp.abs(jnp.cos(attention(s)) * jax.jacrev(attention)(s))))


def _has_gpu():
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.parametrize("backend", [None, "gather"])
def test_traced_scale_in_spatial_parallelism(backend):
    """jax_natten.parallel takes the same scale: a traced one on the native and gather paths."""
    import numpy as np
    from jax.sharding import Mesh
    if len(jax.devices("cpu")) < 2:
        pytest.skip("needs 2 host devices")
    if _has_gpu():
        # Seen 2026-12-04 on the H200 machine (jax 0.11.2 + CUDA 13 plugin): the host compile of
        # this shard_map segfaulted a test worker. Not yet reproduced or understood; CPU CI runs
        # the test. Issue notes track it.
        pytest.skip("segfaults in XLA's host compile on the GPU machine (under investigation)")
    rng, seed = fresh_rng()
    mesh = Mesh(np.array(jax.devices("cpu")[:2]), ("sp",))
    with jax.default_device(_host()):
        q = jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32)
        s = jnp.float32(rng.uniform(0.2, 0.6))
        f = lambda s: jax_natten.parallel.na1d(q, q, q, 3, scale=s, spatial_axes=("sp",),
                                               mesh=mesh, backend=backend)
        ref = lambda s: jax_natten.na1d(q, q, q, 3, scale=s, backend="reference")
        assert rel_err(jax.jit(f)(s), ref(s)) < 1e-5, f"seed {seed}"
        g, want = (jax.grad(lambda s: jnp.sum(jnp.sin(h(s))))(s) for h in (f, ref))
        magnitude = _scale_grad_magnitude(ref, s)
    assert abs(float(g) - float(want)) <= 2e-5 * magnitude, f"seed {seed}"
