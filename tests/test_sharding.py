"""Multi-device NA on 8 host devices (conftest): batch/head sharding under jit (custom_partitioning,
no all-gather), shard_map, pmap, vmap, explicit-axes meshes, Flax modules, and spatial (context)
parallelism (`jax_natten.parallel`): results and gradients equal the unsharded ones."""
import math
import re

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cases import fresh_rng, rel_err, require
import jax_natten
from jax_natten import parallel
import jax_natten._indexed

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")

KW2 = dict(kernel_size=(3, 5), dilation=(2, 1))  # rpb-capable 2-D problem: borders + dilation


def _mesh(shape, names, explicit=False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return Mesh(np.array(jax.devices()[:math.prod(shape)]).reshape(shape), names,
                axis_types=(kind,) * len(names))


def _draw(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _inputs(rng, B=8, spatial=(7, 10), H=4, KVH=2, D=8, Dv=6, S=3, rpb=True):
    x = dict(query=_draw(rng, B, *spatial, H, D), key=_draw(rng, B, *spatial, KVH, D),
             value=_draw(rng, B, *spatial, KVH, Dv))
    if rpb:
        x["rpb"] = _draw(rng, H, *(2 * k - 1 for k in KW2["kernel_size"]))
    if S:
        x["additional_keys"] = _draw(rng, B, S, KVH, D)
        x["additional_values"] = _draw(rng, B, S, KVH, Dv)
    return x


def _loss(f, cot):
    """A scalar of every output (out and lse) with random cotangents."""
    def loss(x):
        out = f(x)
        outs = out if isinstance(out, tuple) else (out,)
        return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(outs, cot))
    return loss


def _cotangents(rng, f, x):
    return [_draw(rng, *o.shape) for o in jax.tree.leaves(jax.eval_shape(f, x))]


def _put(x, mesh, specs):
    return {n: jax.device_put(a, NamedSharding(mesh, specs.get(n, P()))) for n, a in x.items()}


def _compiled(f, *args):
    return jax.jit(f).lower(*args).compile().as_text()


def _assert_close(got, want, seed, bound=1e-5, what=""):
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        err = rel_err(g, w)
        assert err < bound, f"{what}{jax.tree_util.keystr(path)}: rel err {err} (seed {seed})"


def _spec(a):
    """An array's PartitionSpec padded to its rank."""
    spec = tuple(a.sharding.spec)
    return spec + (None,) * (a.ndim - len(spec))


def _check_sharded(f, x, mesh, specs, seed, rng, no_gather=True):
    """jit(f) and jit(grad) on sharded inputs == unsharded; optionally no all-gather in HLO."""
    cot = _cotangents(rng, f, x)
    grad = jax.grad(_loss(f, cot))
    want, want_g = jax.jit(f)(x), jax.jit(grad)(x)
    xs = _put(x, mesh, specs)
    got, got_g = jax.jit(f)(xs), jax.jit(grad)(xs)
    _assert_close(got, want, seed, what="out")
    _assert_close(got_g, want_g, seed, 2e-5, what="grad")
    if no_gather:
        assert "all-gather" not in _compiled(f, xs), "forward all-gathers"
        assert "all-gather" not in _compiled(grad, xs), "backward all-gathers"
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
    mesh = _mesh((4, 2), ("data", "model"))
    batch, heads = SPLITS[split]
    f = lambda x: jax_natten.na2d(**x, **KW2, return_lse=True, backend=backend)
    tok = _tokens(batch, heads)
    extra = P(batch, None, heads)
    out, lse = _check_sharded(f, _inputs(rng), mesh, dict(
        query=tok, key=tok, value=tok, rpb=P(heads), additional_keys=extra,
        additional_values=extra), seed, rng)
    if backend == "cpu":  # the results stay split like q
        assert _spec(out) == (batch, None, None, heads, None)
        assert _spec(lse) == (batch, None, None, heads)


def test_unfused_ops_batch_head_sharding():
    """qk and av (each fwd/bwd), with rpb and additional kv, on the host kernels."""
    require("cpu")
    rng, seed = fresh_rng()
    mesh = _mesh((4, 2), ("data", "model"))
    x = _inputs(rng)

    def f(x):
        w = jax_natten.na2d_qk(x["query"], x["key"], **KW2, rpb=x["rpb"],
                               additional_keys=x["additional_keys"], backend="cpu")
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1)
        return jax_natten.na2d_av(w, x["value"], **KW2, additional_values=x["additional_values"],
                                  backend="cpu")

    tok, extra = _tokens("data", "model"), P("data", None, "model")
    _check_sharded(f, x, mesh, dict(query=tok, key=tok, value=tok, rpb=P("model"),
                                    additional_keys=extra, additional_values=extra), seed, rng)


def test_heads_that_cannot_split_and_spatial_splits_stay_correct():
    """4 shards over 2 kv heads, MQA, and an input split along a spatial axis: the partitioner
    replicates what cannot stay split; results and gradients are still exact."""
    require("cpu")
    rng, seed = fresh_rng()
    mesh = _mesh((4, 2), ("data", "model"))
    f = lambda x: jax_natten.na2d(**x, **KW2, backend="cpu")
    x = _inputs(rng, H=8, KVH=2, S=0, rpb=False)
    _check_sharded(f, x, mesh, dict(query=P(None, None, None, "data")), seed, rng, False)
    x = _inputs(rng, H=4, KVH=1, S=0, rpb=False)
    _check_sharded(f, x, mesh, dict(query=_tokens("data", "model"), key=P("data"),
                                    value=P("data")), seed, rng, False)
    x = _inputs(rng, spatial=(8, 10), S=0, rpb=False)
    tok = P("data", "model")
    _check_sharded(f, x, mesh, dict(query=tok, key=tok, value=tok), seed, rng, False)


def test_vmap_under_sharding():
    """vmapped axes fold into the batch inside the partitioned call: a split batch or a split
    vmapped axis stays split (no all-gather)."""
    require("cpu")
    rng, seed = fresh_rng()
    mesh = _mesh((4, 2), ("data", "model"))
    f = jax.vmap(lambda x: jax_natten.na2d(**x, **KW2, backend="cpu"))
    x = {k: jnp.stack([v, 2 * v]) for k, v in _inputs(rng, S=0, rpb=False).items()}
    spec = P(None, "data", None, None, "model")
    _check_sharded(f, x, mesh, dict(query=spec, key=spec, value=spec), seed, rng)
    spec = P("model", "data")
    _check_sharded(f, x, mesh, dict(query=spec, key=spec, value=spec), seed, rng)


def test_explicit_axes_mesh():
    """A mesh with Explicit axes (sharding in types, `jax.set_mesh`): outputs and cotangents carry
    the right sharding types, no all-gather."""
    require("cpu")
    rng, seed = fresh_rng()
    mesh = _mesh((4, 2), ("data", "model"), explicit=True)
    f = lambda x: jax_natten.na2d(**x, **KW2, backend="cpu")
    x = _inputs(rng)
    tok, extra = _tokens("data", "model"), P("data", None, "model")
    specs = dict(query=tok, key=tok, value=tok, rpb=P("model"), additional_keys=extra,
                 additional_values=extra)
    cot = _cotangents(rng, f, x)
    want, want_g = jax.jit(f)(x), jax.jit(jax.grad(_loss(f, cot)))(x)
    with jax.set_mesh(mesh):
        xs = _put(x, mesh, specs)
        cot = [jax.device_put(c, NamedSharding(mesh, tok)) for c in cot]
        grad = jax.grad(_loss(f, cot))
        got, got_g = jax.jit(f)(xs), jax.jit(grad)(xs)
        assert _spec(got) == ("data", None, None, "model", None)
        assert "all-gather" not in _compiled(grad, xs)
    _assert_close(got, want, seed)
    _assert_close(got_g, want_g, seed, 2e-5)


# ----------------------------------------------------------------------------- shard_map, pmap

def test_shard_map_and_pmap():
    require("cpu")
    rng, seed = fresh_rng()
    x = _inputs(rng, S=0)
    f = lambda x: jax_natten.na2d(**x, **KW2, backend="cpu")
    cot = _cotangents(rng, f, x)
    grad = jax.grad(_loss(f, cot))
    want, want_g = jax.jit(f)(x), jax.jit(grad)(x)

    mesh = _mesh((4, 2), ("data", "model"))
    tok = _tokens("data", "model")
    specs = {"query": tok, "key": tok, "value": tok, "rpb": P("model")}
    sm = jax.shard_map(f, mesh=mesh, in_specs=(specs,), out_specs=tok)
    _assert_close(jax.jit(sm)(x), want, seed)
    # Per-device grads of the per-device loss; the rpb gradient is summed over "data" by the
    # transpose of its implicit broadcast.
    sm_grad = jax.shard_map(lambda x, c: jax.grad(_loss(f, [c]))(x), mesh=mesh,
                            in_specs=(specs, tok), out_specs=specs)
    _assert_close(jax.jit(sm_grad)(x, cot[0]), want_g, seed, 2e-5, what="shard_map grad ")

    split = lambda a: a.reshape((8, a.shape[0] // 8) + a.shape[1:])
    px = {n: split(a) if n != "rpb" else a for n, a in x.items()}
    pm = jax.pmap(f, in_axes=({n: 0 if n != "rpb" else None for n in x},))
    _assert_close(pm(px).reshape(want.shape), want, seed)
    pm_grad = jax.pmap(lambda x, c: jax.grad(_loss(f, [c]))(x),
                       in_axes=({n: 0 if n != "rpb" else None for n in x}, 0))
    got_g = pm_grad(px, split(cot[0]))
    for name in ("query", "key", "value"):
        _assert_close(got_g[name].reshape(want_g[name].shape), want_g[name], seed, 2e-5)
    _assert_close(got_g["rpb"].sum(0), want_g["rpb"], seed, 2e-5)


# ----------------------------------------------------------------------------- Flax

@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_flax_module_under_sharded_jit(api):
    """A Flax NA layer (rpb) on a batch-split input, replicated params: same output and grads."""
    require("cpu")
    rng, seed = fresh_rng()
    mesh = _mesh((8,), ("data",))
    x = _draw(rng, 8, 7, 10, 16)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    kw = dict(num_heads=4, kernel_size=3, dilation=(2, 1), rel_pos_bias=True, backend="cpu")
    if api == "nnx":
        from flax import nnx
        import jax_natten.nnx
        layer = jax_natten.nnx.NeighborhoodAttention2D(16, rngs=nnx.Rngs(seed), **kw)
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
    _assert_close(got, want, seed, 2e-5)


# ----------------------------------------------------------------------------- spatial parallelism

# (name, spatial, kernel, stride, dilation, causal, mesh shape, spatial_axes, extras)
SPATIAL = [
    ("1d", (24,), 5, 1, 1, False, (4,), ("a",), {}),
    ("1d-causal-dil-stride", (24,), 4, 3, 2, True, (4,), ("a",), {}),
    ("1d-halo-over-blocks", (16,), 7, 2, 2, False, (8,), ("a",), {"rpb": False}),
    ("2d-mixed", (8, 12), (3, 4), (1, 2), (2, 1), (True, False), (2, 4), ("a", "b"), {}),
    ("2d-rpb-add-gqa", (12, 8), (5, 3), 1, (1, 2), False, (4, 2), ("a", "b"),
     {"rpb": True, "add": 2, "heads": (4, 2)}),
    ("3d-mixed", (4, 6, 8), (2, 3, 3), (1, 2, 1), (2, 1, 2), (False, True, False), (2, 2, 2),
     ("a", "b", "c"), {"heads": (4, 2)}),
    ("3d-one-axis-chunked", (8, 5, 6), 3, 1, 1, (True, False, False), (4,), ("a", None, None),
     {"chunk": 7 * 2 * 27 * 7}),  # the local queries run in padded chunks of 7
]


def _spatial_problem(case):
    """Random inputs of a spatial case, the unsharded reference, and the split call for a backend.
    -> (name, x, ref, par(backend), seed)."""
    name, spatial, kernel, stride, dilation, causal, mesh_shape, axes, extras = case
    rng, seed = fresh_rng()
    rank = len(spatial)
    H, KVH = extras.get("heads", (2, 2))
    kw = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * rank
    x = dict(query=_draw(rng, 2, *spatial, H, 4), key=_draw(rng, 2, *spatial, KVH, 4),
             value=_draw(rng, 2, *spatial, KVH, 3))
    if extras.get("rpb"):
        x["rpb"] = _draw(rng, H, *(2 * k - 1 for k in ks))
    if extras.get("add"):
        x["additional_keys"] = _draw(rng, 2, extras["add"], KVH, 4)
        x["additional_values"] = _draw(rng, 2, extras["add"], KVH, 3)
    mesh = _mesh(mesh_shape, tuple("abc"[:len(mesh_shape)]))
    na = getattr(jax_natten, f"na{rank}d")
    pna = getattr(parallel, f"na{rank}d")
    ref = lambda x: na(**x, **kw, return_lse=True, backend="reference")
    par = lambda backend: lambda x: pna(**x, **kw, return_lse=True, spatial_axes=axes, mesh=mesh,
                                        backend=backend)
    return name, x, ref, par, rng, seed


@pytest.mark.parametrize("case", SPATIAL, ids=[c[0] for c in SPATIAL])
def test_spatial_parallel_matches_unsharded(case, monkeypatch):
    if "chunk" in case[-1]:
        monkeypatch.setattr(jax_natten._indexed, "_CHUNK_ELEMENTS", case[-1]["chunk"])
    name, x, ref, split, rng, seed = _spatial_problem(case)
    par = split("gather")  # the XLA gather path (native: below)
    cot = _cotangents(rng, ref, x)
    want, want_g = jax.jit(ref)(x), jax.jit(jax.grad(_loss(ref, cot)))(x)
    got, got_g = jax.jit(par)(x), jax.jit(jax.grad(_loss(par, cot)))(x)
    _assert_close(got, want, seed, what=f"{name} ")
    _assert_close(got_g, want_g, seed, 2e-5, what=f"{name} grad ")


def test_spatial_parallel_inside_shard_map_and_pmap():
    """mesh=None: the local-block API inside the caller's shard_map (batch split too) and pmap."""
    rng, seed = fresh_rng()
    kw = dict(kernel_size=(5, 3), dilation=(2, 1), is_causal=(True, False))
    q = _draw(rng, 4, 16, 10, 2, 8)
    want = jax_natten.na2d(q, q, q, **kw, backend="reference")
    mesh = _mesh((4, 2), ("sp", "dp"))
    body = lambda q: parallel.na2d(q, q, q, **kw, spatial_axes=("sp", None))
    sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("dp", "sp"), out_specs=P("dp", "sp")))
    _assert_close(sm(q), want, seed)
    blocks = jnp.stack(jnp.split(q, 4, axis=1))
    out = jax.pmap(lambda q: parallel.na2d(q, q, q, **kw, spatial_axes=("i", None)),
                   axis_name="i")(blocks)
    _assert_close(jnp.concatenate(list(out), axis=1), want, seed)


def _permute_bytes(hlo: str) -> int:
    """Bytes received per device by the collective-permutes of a compiled (per-device) HLO."""
    size = {"f32": 4, "bf16": 2, "f16": 2}
    total = 0
    for dtype, dims in re.findall(r"= (f32|bf16|f16)\[([\d,]*)\][^ ]* collective-permute\(", hlo):
        total += size[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def test_spatial_parallel_halo_traffic_and_memory():
    """Only halos travel (collective-permute bytes == halo_bytes, no all-gather), and the
    per-device memory of a 3-D problem falls as the devices grow."""
    B, S, H, D = 1, (16, 8, 8), 2, 16
    q = jnp.ones((B, *S, H, D), jnp.float32)  # k, v distinct below: no CSE of their halos
    memory = []
    for n in (1, 2, 4, 8):
        mesh = _mesh((n,), ("sp",))
        qs = jax.device_put(q, NamedSharding(mesh, P(None, "sp")))
        f = lambda q: parallel.na3d(q, q + 1, 2 * q, (3, 3, 3), dilation=(2, 1, 1),
                                    spatial_axes=("sp", None, None), mesh=mesh,
                                    backend="gather")
        compiled = jax.jit(f).lower(qs).compile()
        hlo = compiled.as_text()
        assert "all-gather" not in hlo
        halo = parallel.halo_sizes(S[0], n, 3, dilation=2)
        # k // 2 * dilation, except with 2-row blocks: the last block's windows shift inward.
        assert halo == {1: (0, 0), 2: (2, 2), 4: (2, 2), 8: (4, 4)}[n]
        want = parallel.halo_bytes((B, S[0] // n, *S[1:], H, D), D, 4, 0, halo)
        assert _permute_bytes(hlo) == want, (n, _permute_bytes(hlo), want)
        m = compiled.memory_analysis()
        memory.append(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    assert all(b < 0.7 * a for a, b in zip(memory, memory[1:])), memory


def test_spatial_parallel_errors():
    q = jnp.ones((2, 15, 8, 2, 4))
    mesh = _mesh((4, 2), ("a", "b"))
    with pytest.raises(ValueError, match="not divisible"):
        parallel.na2d(q, q, q, 3, spatial_axes=("a", None), mesh=mesh)
    with pytest.raises(ValueError, match="distinct mesh axes"):
        parallel.na2d(q, q, q, 3, spatial_axes=(None, "a"), mesh=mesh, batch_axis="a")
    with pytest.raises(ValueError, match="one spatial axis"):
        parallel.na2d(q, q, q, 3, spatial_axes=("a", "a"), mesh=mesh)
    with pytest.raises(ValueError, match="not bound"):
        parallel.na2d(q, q, q, 3, spatial_axes=(None, "a"))
    with pytest.raises(ValueError, match="one mesh axis name"):
        parallel.na2d(q, q, q, 3, spatial_axes=("a",), mesh=mesh)
    with pytest.raises(ValueError, match="kernel_size"):  # checks run on the global problem
        parallel.na2d(q, q, q, 9, spatial_axes=(None, "a"), mesh=mesh)


# ----------------------------------------------------------------------------- native local compute

def test_native_halo_windows_brute_force():
    """The extended-block windows (window math in local coordinates) equal the global windows of
    every device's own queries, for the halos of `parallel.native_halo`, whenever the blocks are
    multiples of stride * dilation: checked here independently of the plan's own check."""
    from jax_natten import _window
    checked = 0
    for L in range(2, 25):
        for n in (2, 3, 4, 6, 8):
            if L % n:
                continue
            block = L // n
            for k in range(1, 8):
                for s in range(1, k + 1):
                    for d in range(1, 4):
                        if block % (s * d) or L // d < k:
                            continue
                        for causal in (False, True):
                            hl, hr = parallel.native_halo(k, s, d, causal)
                            E = min(block + hl + hr, L)
                            glob = _window.axis_neighborhood(L, k, s, d, causal)
                            ext = _window.axis_neighborhood(E, k, s, d, causal)
                            for p in range(n):
                                lo = p * block
                                a = int(np.clip(lo - hl, 0, L - E))
                                own = slice(lo - a, lo - a + block)
                                assert np.array_equal(ext[0][own] + a, glob[0][lo:lo + block])
                                assert np.array_equal(ext[1][own], glob[1][lo:lo + block])
                                assert np.array_equal(ext[2][own], glob[2][lo:lo + block])
                            assert parallel._native_plan(L, n, k, s, d, causal) is not None
                            checked += 1
    assert checked > 1000


# (name, spatial, kernel, stride, dilation, causal, mesh shape, spatial_axes, extras)
NATIVE = [
    ("1d", (24,), 5, 1, 1, False, (4,), ("a",), {"rpb": True}),
    ("1d-causal-dil-stride", (24,), 4, 3, 2, True, (4,), ("a",), {}),
    ("1d-halo-over-blocks", (16,), 7, 1, 2, False, (8,), ("a",), {}),
    ("2d-mixed", (8, 12), (3, 4), (1, 2), (2, 1), (True, False), (4, 2), ("a", "b"),
     {"add": 2, "heads": (4, 2)}),
    ("3d-mixed", (4, 6, 8), (2, 3, 3), (1, 1, 2), (2, 1, 1), (False, True, False), (2, 2, 2),
     ("a", "b", "c"), {"heads": (4, 2)}),
]


@pytest.mark.parametrize("case", NATIVE, ids=[c[0] for c in NATIVE])
def test_spatial_parallel_native_matches_unsharded(case):
    """backend="cpu": the host kernels on extended blocks, results and gradients == unsharded."""
    name, x, ref, split, rng, seed = _spatial_problem(case)
    par = split("cpu")
    cot = _cotangents(rng, ref, x)
    want, want_g = jax.jit(ref)(x), jax.jit(jax.grad(_loss(ref, cot)))(x)
    hlo = _compiled(par, x)
    assert "custom-call" in hlo and "all-gather" not in hlo  # the host kernels, halos only
    got, got_g = jax.jit(par)(x), jax.jit(jax.grad(_loss(par, cot)))(x)
    _assert_close(got, want, seed, what=f"{name} ")
    _assert_close(got_g, want_g, seed, 2e-5, what=f"{name} grad ")


def test_spatial_parallel_native_fallback():
    """Blocks that are not multiples of stride * dilation: backend=None falls back to the gather
    path (still exact), an explicit native backend is refused."""
    rng, seed = fresh_rng()
    q = _draw(rng, 2, 12, 2, 4)
    mesh = _mesh((4,), ("a",))
    kw = dict(kernel_size=3, dilation=2)  # blocks of 3 tokens, dilation 2
    want = jax_natten.na1d(q, q, q, **kw, backend="reference")
    for backend in (None, "gather"):
        f = lambda q: parallel.na1d(q, q, q, **kw, spatial_axes=("a",), mesh=mesh,
                                    backend=backend)
        assert "custom-call" not in _compiled(f, q)
        _assert_close(jax.jit(f)(q), want, seed)
    with pytest.raises(ValueError, match="multiple of stride \\* dilation"):
        parallel.na1d(q, q, q, **kw, spatial_axes=("a",), mesh=mesh, backend="cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        parallel.na1d(q, q, q, **kw, spatial_axes=("a",), mesh=mesh, backend="nope")
