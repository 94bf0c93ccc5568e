"""Spatial (context) parallelism (`jax_natten.parallel`) on 8 host devices (conftest): queries split
along spatial axes with halo exchange, on the reference and native backends; results and gradients
equal the unsharded ones, halo traffic stays bounded. Batch/head sharding: test_sharding.py."""
import math
import re

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cases import fresh_rng
import jax_natten
import jax_natten._indexed
from jax_natten import parallel
import multidevice as md

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")


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
    x = dict(query=md.draw(rng, 2, *spatial, H, 4), key=md.draw(rng, 2, *spatial, KVH, 4),
             value=md.draw(rng, 2, *spatial, KVH, 3))
    if extras.get("rpb"):
        x["rpb"] = md.draw(rng, H, *(2 * k - 1 for k in ks))
    if extras.get("add"):
        x["additional_keys"] = md.draw(rng, 2, extras["add"], KVH, 4)
        x["additional_values"] = md.draw(rng, 2, extras["add"], KVH, 3)
    mesh = md.mesh(mesh_shape, tuple("abc"[:len(mesh_shape)]))
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
    cot = md.cotangents(rng, ref, x)
    want, want_g = jax.jit(ref)(x), jax.jit(jax.grad(md.loss(ref, cot)))(x)
    got, got_g = jax.jit(par)(x), jax.jit(jax.grad(md.loss(par, cot)))(x)
    md.assert_close(got, want, seed, what=f"{name} ")
    md.assert_close(got_g, want_g, seed, 2e-5, what=f"{name} grad ")


def test_spatial_parallel_inside_shard_map_and_pmap():
    """mesh=None: the local-block API inside the caller's shard_map (batch split too) and pmap."""
    rng, seed = fresh_rng()
    kw = dict(kernel_size=(5, 3), dilation=(2, 1), is_causal=(True, False))
    q = md.draw(rng, 4, 16, 10, 2, 8)
    want = jax_natten.na2d(q, q, q, **kw, backend="reference")
    mesh = md.mesh((4, 2), ("sp", "dp"))
    body = lambda q: parallel.na2d(q, q, q, **kw, spatial_axes=("sp", None))
    sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("dp", "sp"), out_specs=P("dp", "sp")))
    md.assert_close(sm(q), want, seed)
    blocks = jnp.stack(jnp.split(q, 4, axis=1))
    out = jax.pmap(lambda q: parallel.na2d(q, q, q, **kw, spatial_axes=("i", None)),
                   axis_name="i")(blocks)
    md.assert_close(jnp.concatenate(list(out), axis=1), want, seed)


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
        mesh = md.mesh((n,), ("sp",))
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
    mesh = md.mesh((4, 2), ("a", "b"))
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
    cot = md.cotangents(rng, ref, x)
    want, want_g = jax.jit(ref)(x), jax.jit(jax.grad(md.loss(ref, cot)))(x)
    hlo = md.compiled(par, x)
    assert "custom-call" in hlo and "all-gather" not in hlo  # the host kernels, halos only
    got, got_g = jax.jit(par)(x), jax.jit(jax.grad(md.loss(par, cot)))(x)
    md.assert_close(got, want, seed, what=f"{name} ")
    md.assert_close(got_g, want_g, seed, 2e-5, what=f"{name} grad ")


def test_spatial_parallel_native_fallback():
    """Blocks that are not multiples of stride * dilation: backend=None falls back to the gather
    path (still exact), an explicit native backend is refused."""
    rng, seed = fresh_rng()
    q = md.draw(rng, 2, 12, 2, 4)
    mesh = md.mesh((4,), ("a",))
    kw = dict(kernel_size=3, dilation=2)  # blocks of 3 tokens, dilation 2
    want = jax_natten.na1d(q, q, q, **kw, backend="reference")
    for backend in (None, "gather"):
        f = lambda q: parallel.na1d(q, q, q, **kw, spatial_axes=("a",), mesh=mesh,
                                    backend=backend)
        assert "custom-call" not in md.compiled(f, q)
        md.assert_close(jax.jit(f)(q), want, seed)
    with pytest.raises(ValueError, match="multiple of stride \\* dilation"):
        parallel.na1d(q, q, q, **kw, spatial_axes=("a",), mesh=mesh, backend="cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        parallel.na1d(q, q, q, **kw, spatial_axes=("a",), mesh=mesh, backend="nope")
