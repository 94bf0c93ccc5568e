"""Batch and head sharding of the FFI calls on 8 host devices (conftest): jit over NamedShardings
(custom_partitioning: no all-gather of q, k, v), shard_map, pmap, vmap, explicit-axes meshes and
Flax modules; results and gradients equal the unsharded ones. Spatial (context) parallelism:
test_parallel.py."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cases import fresh_rng, require
import jax_natten
import multidevice as md

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")


def _spec(a):
    """An array's PartitionSpec padded to its rank."""
    spec = tuple(a.sharding.spec)
    return spec + (None,) * (a.ndim - len(spec))


def _check_sharded(f, x, mesh, specs, seed, rng, no_gather=True):
    """jit(f) and jit(grad) on sharded inputs == unsharded; optionally no all-gather in HLO."""
    cot = md.cotangents(rng, f, x)
    grad = jax.grad(md.loss(f, cot))
    want, want_g = jax.jit(f)(x), jax.jit(grad)(x)
    xs = md.put(x, mesh, specs)
    got, got_g = jax.jit(f)(xs), jax.jit(grad)(xs)
    md.assert_close(got, want, seed, what="out")
    md.assert_close(got_g, want_g, seed, 2e-5, what="grad")
    if no_gather:
        assert "all-gather" not in md.compiled(f, xs), "forward all-gathers"
        assert "all-gather" not in md.compiled(grad, xs), "backward all-gathers"
    return got


def _tokens(batch=None, heads=None):
    return P(batch, None, None, heads)


SPLITS = {"batch": ("data", None), "heads": (None, "model"), "both": ("data", "model")}


# ----------------------------------------------------------------------------- jit + NamedSharding

@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fused_op_batch_head_sharding(backend, split):
    """Fused op fwd/bwd, GQA + rpb + additional kv: batch and/or heads split, no all-gather."""
    require(backend)
    rng, seed = fresh_rng()
    mesh = md.mesh((4, 2), ("data", "model"))
    batch, heads = SPLITS[split]
    f = lambda x: jax_natten.na2d(**x, **md.KW2, return_lse=True, backend=backend)
    tok = _tokens(batch, heads)
    extra = P(batch, None, heads)
    out, lse = _check_sharded(f, md.inputs(rng), mesh, dict(
        query=tok, key=tok, value=tok, rpb=P(heads), additional_keys=extra,
        additional_values=extra), seed, rng)
    if backend == "cpu":  # the results stay split like q
        assert _spec(out) == (batch, None, None, heads, None)
        assert _spec(lse) == (batch, None, None, heads)


def test_unfused_ops_batch_head_sharding():
    """qk and av (each fwd/bwd), with rpb and additional kv, on the host kernels."""
    require("cpu")
    rng, seed = fresh_rng()
    mesh = md.mesh((4, 2), ("data", "model"))
    x = md.inputs(rng)

    def f(x):
        w = jax_natten.na2d_qk(x["query"], x["key"], **md.KW2, rpb=x["rpb"],
                               additional_keys=x["additional_keys"], backend="cpu")
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1)
        return jax_natten.na2d_av(w, x["value"], **md.KW2, additional_values=x["additional_values"],
                                  backend="cpu")

    tok, extra = _tokens("data", "model"), P("data", None, "model")
    _check_sharded(f, x, mesh, dict(query=tok, key=tok, value=tok, rpb=P("model"),
                                    additional_keys=extra, additional_values=extra), seed, rng)


def test_heads_that_cannot_split_and_spatial_splits_stay_correct():
    """4 shards over 2 kv heads, MQA, and an input split along a spatial axis: the partitioner
    replicates what cannot stay split; results and gradients are still exact."""
    require("cpu")
    rng, seed = fresh_rng()
    mesh = md.mesh((4, 2), ("data", "model"))
    f = lambda x: jax_natten.na2d(**x, **md.KW2, backend="cpu")
    x = md.inputs(rng, H=8, KVH=2, S=0, rpb=False)
    _check_sharded(f, x, mesh, dict(query=P(None, None, None, "data")), seed, rng, False)
    x = md.inputs(rng, H=4, KVH=1, S=0, rpb=False)
    _check_sharded(f, x, mesh, dict(query=_tokens("data", "model"), key=P("data"),
                                    value=P("data")), seed, rng, False)
    x = md.inputs(rng, spatial=(8, 10), S=0, rpb=False)
    tok = P("data", "model")
    _check_sharded(f, x, mesh, dict(query=tok, key=tok, value=tok), seed, rng, False)


def test_vmap_under_sharding():
    """vmapped axes fold into the batch inside the partitioned call: a split batch or a split
    vmapped axis stays split (no all-gather)."""
    require("cpu")
    rng, seed = fresh_rng()
    mesh = md.mesh((4, 2), ("data", "model"))
    f = jax.vmap(lambda x: jax_natten.na2d(**x, **md.KW2, backend="cpu"))
    x = {k: jnp.stack([v, 2 * v]) for k, v in md.inputs(rng, S=0, rpb=False).items()}
    spec = P(None, "data", None, None, "model")
    _check_sharded(f, x, mesh, dict(query=spec, key=spec, value=spec), seed, rng)
    spec = P("model", "data")
    _check_sharded(f, x, mesh, dict(query=spec, key=spec, value=spec), seed, rng)


def test_explicit_axes_mesh():
    """A mesh with Explicit axes (sharding in types, `jax.set_mesh`): outputs and cotangents carry
    the right sharding types, no all-gather."""
    require("cpu")
    rng, seed = fresh_rng()
    mesh = md.mesh((4, 2), ("data", "model"), explicit=True)
    f = lambda x: jax_natten.na2d(**x, **md.KW2, backend="cpu")
    x = md.inputs(rng)
    tok, extra = _tokens("data", "model"), P("data", None, "model")
    specs = dict(query=tok, key=tok, value=tok, rpb=P("model"), additional_keys=extra,
                 additional_values=extra)
    cot = md.cotangents(rng, f, x)
    want, want_g = jax.jit(f)(x), jax.jit(jax.grad(md.loss(f, cot)))(x)
    with jax.set_mesh(mesh):
        xs = md.put(x, mesh, specs)
        cot = [jax.device_put(c, NamedSharding(mesh, tok)) for c in cot]
        grad = jax.grad(md.loss(f, cot))
        got, got_g = jax.jit(f)(xs), jax.jit(grad)(xs)
        assert _spec(got) == ("data", None, None, "model", None)
        assert "all-gather" not in md.compiled(grad, xs)
    md.assert_close(got, want, seed)
    md.assert_close(got_g, want_g, seed, 2e-5)


# ----------------------------------------------------------------------------- shard_map, pmap

def test_shard_map_and_pmap():
    require("cpu")
    rng, seed = fresh_rng()
    x = md.inputs(rng, S=0)
    f = lambda x: jax_natten.na2d(**x, **md.KW2, backend="cpu")
    cot = md.cotangents(rng, f, x)
    grad = jax.grad(md.loss(f, cot))
    want, want_g = jax.jit(f)(x), jax.jit(grad)(x)

    mesh = md.mesh((4, 2), ("data", "model"))
    tok = _tokens("data", "model")
    specs = {"query": tok, "key": tok, "value": tok, "rpb": P("model")}
    sm = jax.shard_map(f, mesh=mesh, in_specs=(specs,), out_specs=tok)
    md.assert_close(jax.jit(sm)(x), want, seed)
    # Per-device grads of the per-device loss; the rpb gradient is summed over "data" by the
    # transpose of its implicit broadcast.
    sm_grad = jax.shard_map(lambda x, c: jax.grad(md.loss(f, [c]))(x), mesh=mesh,
                            in_specs=(specs, tok), out_specs=specs)
    md.assert_close(jax.jit(sm_grad)(x, cot[0]), want_g, seed, 2e-5, what="shard_map grad ")

    split = lambda a: a.reshape((8, a.shape[0] // 8) + a.shape[1:])
    px = {n: split(a) if n != "rpb" else a for n, a in x.items()}
    pm = jax.pmap(f, in_axes=({n: 0 if n != "rpb" else None for n in x},))
    md.assert_close(pm(px).reshape(want.shape), want, seed)
    pm_grad = jax.pmap(lambda x, c: jax.grad(md.loss(f, [c]))(x),
                       in_axes=({n: 0 if n != "rpb" else None for n in x}, 0))
    got_g = pm_grad(px, split(cot[0]))
    for name in ("query", "key", "value"):
        md.assert_close(got_g[name].reshape(want_g[name].shape), want_g[name], seed, 2e-5)
    md.assert_close(got_g["rpb"].sum(0), want_g["rpb"], seed, 2e-5)


# ----------------------------------------------------------------------------- Flax

@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_flax_module_under_sharded_jit(api):
    """A Flax NA layer (rpb) on a batch-split input, replicated params: same output and grads."""
    require("cpu")
    rng, seed = fresh_rng()
    mesh = md.mesh((8,), ("data",))
    x = md.draw(rng, 8, 7, 10, 16)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    kw = dict(num_heads=4, kernel_size=3, dilation=(2, 1), rel_pos_bias=True, backend="cpu")
    if api == "nnx":
        from flax import nnx
        import jax_natten.nnx
        layer = jax_natten.nnx.NeighborhoodAttention2D(in_features=16, rngs=nnx.Rngs(seed), **kw)
        graph, params = nnx.split(layer)
        apply = lambda p, x: nnx.merge(graph, p)(x)
    else:
        import jax_natten.linen
        layer = jax_natten.linen.NeighborhoodAttention2D(**kw)
        params = layer.init(jax.random.key(seed), x)
        apply = layer.apply
    loss = lambda p, x: jnp.sum(jnp.sin(apply(p, x)))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want = step(params, x)
    got = step(params, xs)
    assert "all-gather" not in jax.jit(step).lower(params, xs).compile().as_text()
    md.assert_close(got[1], want[1], seed, 2e-5)
    # The loss sums 8960 terms of both signs, per shard then across: its rounding is bounded
    # relative to the sum of their magnitudes, not to the (cancelling) sum itself.
    magnitude = float(jnp.sum(jnp.abs(jnp.sin(apply(params, x)))))
    assert abs(float(got[0]) - float(want[0])) < 2e-5 * magnitude, (got[0], want[0], seed)
