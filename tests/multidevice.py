"""Helpers of the multi-device tests (test_sharding.py, test_parallel.py): meshes over the 8 host
devices (conftest), random inputs, losses with random cotangents, comparisons."""
import math

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cases import rel_err

KW2 = dict(kernel_size=(3, 5), dilation=(2, 1))  # rpb-capable 2-D problem: borders + dilation


def mesh(shape, names, explicit=False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return Mesh(np.array(jax.devices()[:math.prod(shape)]).reshape(shape), names,
                axis_types=(kind,) * len(names))


def draw(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def inputs(rng, B=8, spatial=(7, 10), H=4, KVH=2, D=8, Dv=6, S=3, rpb=True):
    x = dict(query=draw(rng, B, *spatial, H, D), key=draw(rng, B, *spatial, KVH, D),
             value=draw(rng, B, *spatial, KVH, Dv))
    if rpb:
        x["rpb"] = draw(rng, H, *(2 * k - 1 for k in KW2["kernel_size"]))
    if S:
        x["additional_keys"] = draw(rng, B, S, KVH, D)
        x["additional_values"] = draw(rng, B, S, KVH, Dv)
    return x


def loss(f, cot):
    """A scalar of every output (out and lse) with random cotangents."""
    def loss(x):
        out = f(x)
        outs = out if isinstance(out, tuple) else (out,)
        return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(outs, cot))
    return loss


def cotangents(rng, f, x):
    return [draw(rng, *o.shape) for o in jax.tree.leaves(jax.eval_shape(f, x))]


def put(x, mesh, specs):
    return {n: jax.device_put(a, NamedSharding(mesh, specs.get(n, P()))) for n, a in x.items()}


def compiled(f, *args):
    return jax.jit(f).lower(*args).compile().as_text()


def assert_close(got, want, seed, bound=1e-5, what=""):
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        err = rel_err(g, w)
        assert err < bound, f"{what}{jax.tree_util.keystr(path)}: rel err {err} (seed {seed})"
