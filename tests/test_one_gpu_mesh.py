"""The sharded code paths on a mesh of one GPU (the multi-device cases run on 8 host devices in
test_sharding.py): jit over a NamedSharding, shard_map, pmap and spatial parallelism, with every
CUDA backend this build has, equal to the unsharded call."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cases import CUDA_BACKENDS, dtype_for, fresh_rng, rel_err
import jax_natten
from jax_natten import parallel

pytestmark = pytest.mark.gpu
KW = dict(kernel_size=(5, 3), dilation=(1, 2), is_causal=(False, True))


def _gpu_mesh(name):
    return Mesh(np.array(jax.devices("gpu")[:1]), (name,))


def _inputs(rng, dtype=jnp.float32):
    draw = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    return draw(4, 11, 9, 4, 32), draw(4, 11, 9, 2, 32), draw(4, 11, 9, 2, 32)


@pytest.mark.parametrize("backend", [None] + list(CUDA_BACKENDS))
def test_jit_over_one_gpu_mesh(backend):
    if backend is not None and not jax_natten.backend_available(backend):
        pytest.skip(f"this build has no '{backend}' kernels")
    rng, seed = fresh_rng()
    q, k, v = _inputs(rng, dtype_for(backend or "fused"))
    mesh = _gpu_mesh("dp")
    f = lambda q, k, v: jax_natten.na2d(q, k, v, **KW, backend=backend)
    loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2)
    want, want_g = jax.jit(f)(q, k, v), jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    sharded = [jax.device_put(x, NamedSharding(mesh, P("dp"))) for x in (q, k, v)]
    got, got_g = jax.jit(f)(*sharded), jax.jit(jax.grad(loss, (0, 1, 2)))(*sharded)
    assert rel_err(got, want) < 1e-6, f"seed {seed}"
    for a, b in zip(got_g, want_g):
        assert rel_err(a, b) < 1e-6, f"seed {seed}"
    sm = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("dp"), out_specs=P("dp")))
    assert rel_err(sm(q, k, v), want) < 1e-6, f"seed {seed}"
    pm = jax.pmap(f)(q[None], k[None], v[None])[0]
    assert rel_err(pm, want) < 1e-6, f"seed {seed}"


def test_spatial_parallel_on_one_gpu():
    rng, seed = fresh_rng()
    q, k, v = _inputs(rng)
    mesh = _gpu_mesh("sp")
    want = jax_natten.na2d(q, k, v, **KW, backend="reference")
    got = jax.jit(lambda q, k, v: parallel.na2d(q, k, v, **KW, spatial_axes=("sp", None),
                                                mesh=mesh))(q, k, v)
    assert rel_err(got, want) < 1e-5, f"seed {seed}"
