"""Spatial (context) parallelism: neighborhood attention over spatial axes split across devices.

    out = jax_natten.parallel.na2d(q, k, v, kernel_size, ..., spatial_axes=("sp", None), mesh=mesh)

splits spatial axis 0 over the mesh axis "sp" (each device holds one contiguous block of it) and
returns exactly what `jax_natten.na2d` returns on the unsplit arrays: borders, even kernels, stride,
dilation, causal masking, rpb, GQA and additional keys/values included, forward and backward.
With `mesh=None` the same functions run inside your own `jax.shard_map` (or `pmap`) on the local
blocks, the named axes being manual there; with `mesh` they wrap themselves in a shard_map and take
and return global arrays (`batch_axis` / `head_axis` also split the batch / the heads).

How it works. A query's window depends only on its global coordinates (`_window.py`), and along an
axis the windows of a contiguous block of queries cover a contiguous key range that reaches at most
`halo_left` keys before the block and `halo_right` keys after it; both are computed statically for
the worst device (`halo_sizes`). Each device receives those halos of k and v from its neighbours
with `jax.lax.ppermute` (axis by axis, so 2-D/3-D corners travel with the second exchange; a halo
longer than a block is gathered from several neighbours), then computes its queries against the
extended key block with the exact windows of the global problem, given as per-device index tables
(`_indexed.py`: the reference backend's gather arithmetic with explicit windows). Queries are
never exchanged; autodiff sends the halo gradients back through the transposed ppermutes.

Communication per device and step, per split axis: forward `(halo_left + halo_right) * C *
KVH * (D + Dv) * itemsize` bytes received, where C is the local cross-section (the product of
the other local spatial extents times the local batch); the backward sends as much back. Causal
axes have `halo_right == 0`. Non-causal stride-1 undilated windows need `halo_left = k // 2` and
`halo_right = (k - 1) // 2`, causal ones `(k - 1, 0)`; dilation multiplies that by `d`; with a
stride it depends on where stride groups meet block edges (blocked NA on blocks that are multiples
of the kernel needs no halo), and short blocks need more near the borders, where windows shift
inward (`halo_sizes` gives the exact figure). Per-device memory falls with the number of shards:
each device holds its block plus halos.

Requirements (ValueError otherwise): each split axis's length is divisible by its mesh axis size,
a spatial axis is split over at most one mesh axis and a mesh axis splits at most one spatial
axis; with `mesh`, `batch_axis` must divide the batch and `head_axis` the kv heads. The local
compute is the XLA gather path of the reference backend (any float dtype, any device), not the
native kernels.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import _checks, _indexed, _window

__all__ = ["na1d", "na2d", "na3d", "halo_sizes", "halo_bytes"]


# ----------------------------------------------------------------------------- static plans

@functools.lru_cache(maxsize=256)
def _axis_plan(length: int, shards: int, kernel: int, stride: int, dilation: int, causal: bool):
    """Halos and per-device window tables of one axis split in `shards` contiguous blocks.

    Returns `(halo_left, halo_right, keys, valid, rpb_index)`; the tables are `[shards, block,
    kernel]`: `keys` indexes the device's extended key block `[start - halo_left, start + block +
    halo_right)`, `valid` masks keys past a causal query, `rpb_index` is the relative position.
    """
    keys, valid, rpb_index = _window.axis_neighborhood(length, kernel, stride, dilation, causal)
    block = length // shards
    start = (np.arange(length) // block) * block
    halo_left = int(max(0, (start - keys.min(axis=1)).max()))
    halo_right = int(max(0, (keys.max(axis=1) + 1 - (start + block)).max()))
    ext = keys - (start - halo_left)[:, None]
    shape = (shards, block, kernel)
    return (halo_left, halo_right, ext.astype(np.int32).reshape(shape), valid.reshape(shape),
            rpb_index.astype(np.int32).reshape(shape))


def halo_sizes(length: int, shards: int, kernel_size: int, stride: int = 1, dilation: int = 1,
               is_causal: bool = False) -> tuple:
    """(left, right): keys each device needs from before / after its block along one axis of
    global `length` split in `shards` contiguous blocks (the maximum over devices)."""
    if length % shards:
        raise ValueError(f"an axis of length {length} cannot be split in {shards} equal blocks")
    _checks.normalize_params(1, (length,), kernel_size, stride, dilation, bool(is_causal))
    return _axis_plan(length, shards, kernel_size, stride, dilation, bool(is_causal))[:2]


def halo_bytes(local_kv_shape: Sequence[int], value_dim: int, itemsize: int, axis: int,
               halo: tuple) -> int:
    """Bytes of k and v one device receives in the forward exchange along spatial `axis`:
    `local_kv_shape` is the local key block [B, *spatial, KVH, D] (before extension), `halo`
    the (left, right) of `halo_sizes`. The backward sends the same amount back."""
    B, *spatial, kvh, d = local_kv_shape
    cross = B * math.prod(s for i, s in enumerate(spatial) if i != axis)
    return (halo[0] + halo[1]) * cross * kvh * (d + value_dim) * itemsize


# ----------------------------------------------------------------------------- halo exchange

def _extend(x, dim: int, name, shards: int, left: int, right: int):
    """x's local block along `dim` with `left` rows from the blocks before and `right` after.

    Rows from outside the global axis (at the first/last device) are zeros that no window reads.
    A halo longer than one block comes from several neighbours, one ppermute per hop.
    """
    block = x.shape[dim]
    take = lambda lo, hi: jax.lax.slice_in_dim(x, lo, hi, axis=dim)
    parts = []
    for hop in range(-(-left // block), 0, -1):  # farthest neighbour first
        rows = min(block, left - (hop - 1) * block)
        perm = [(i, i + hop) for i in range(shards - hop)]
        parts.append(jax.lax.ppermute(take(block - rows, block), name, perm))
    parts.append(x)
    for hop in range(1, -(-right // block) + 1):
        rows = min(block, right - (hop - 1) * block)
        perm = [(i, i - hop) for i in range(hop, shards)]
        parts.append(jax.lax.ppermute(take(0, rows), name, perm))
    return jnp.concatenate(parts, axis=dim) if len(parts) > 1 else x


# ----------------------------------------------------------------------------- local compute

def _axis_names(rank: int, spatial_axes) -> tuple:
    """`spatial_axes` (a sequence of mesh axis names / None per spatial axis, or a dict
    {spatial axis: mesh axis name}) -> a tuple of `rank` names / None."""
    if isinstance(spatial_axes, dict):
        bad = [a for a in spatial_axes if not isinstance(a, int) or not 0 <= a < rank]
        if bad:
            raise ValueError(f"spatial_axes keys must be spatial axis indices 0..{rank - 1}, "
                             f"got {bad}")
        names = tuple(spatial_axes.get(a) for a in range(rank))
    elif isinstance(spatial_axes, (str, tuple, list)) or spatial_axes is None:
        names = (spatial_axes,) if isinstance(spatial_axes, str) or spatial_axes is None \
            else tuple(spatial_axes)
        if len(names) != rank:
            raise ValueError(f"spatial_axes needs one mesh axis name (or None) per spatial axis "
                             f"({rank}), got {spatial_axes!r}")
    else:
        raise TypeError(f"spatial_axes must be a sequence of mesh axis names / None or a dict, "
                        f"got {spatial_axes!r}")
    for n in names:
        if n is not None and not isinstance(n, str):
            raise TypeError(f"spatial_axes entries must be one mesh axis name (str) or None, got "
                            f"{n!r}")
    used = [n for n in names if n is not None]
    if len(set(used)) != len(used):
        raise ValueError(f"a mesh axis can split only one spatial axis, got {names}")
    return names


def _shards(name) -> int:
    if name is None:
        return 1
    try:
        return jax.lax.axis_size(name)
    except NameError as e:
        raise ValueError(f"mesh axis {name!r} is not bound here: call jax_natten.parallel inside "
                         f"jax.shard_map over that axis (or pass mesh=...)") from e


def _local_na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
              additional_keys, additional_values, names):
    """The body run on each device: local blocks in, local (out, lse) out."""
    shards = tuple(_shards(n) for n in names)
    lead = query.ndim - rank - 2
    glob = lambda x: None if x is None else jax.ShapeDtypeStruct(
        x.shape[:lead] + tuple(s * n for s, n in zip(x.shape[lead:lead + rank], shards))
        + x.shape[lead + rank:], x.dtype)
    problem = _checks.check_attention(rank, glob(query), glob(key), glob(value), kernel_size,
                                      stride, dilation, is_causal, rpb, additional_keys,
                                      additional_values)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    scale = problem.head_dim ** -0.5 if scale is None else float(scale)
    pad = _checks.MAX_RANK - rank
    params = problem.params.padded()
    names, shards = (None,) * pad + names, (1,) * pad + shards
    local = (1,) * pad + tuple(s // n for s, n in zip(problem.spatial, shards[pad:]))
    to_kernel = lambda x: x.reshape((problem.batch,) + local + x.shape[-2:])
    q, k, v = to_kernel(query), to_kernel(key), to_kernel(value)
    fold = lambda x: None if x is None else x.reshape((problem.batch,) + x.shape[-3:])
    add_k, add_v = fold(additional_keys), fold(additional_values)
    rpb = None if rpb is None else rpb.reshape(rpb.shape[:1] + (1,) * pad + rpb.shape[1:])

    tables = []
    for a in range(_checks.MAX_RANK):
        L = local[a] * shards[a]
        plan = _axis_plan(L, shards[a], params.kernel_size[a], params.stride[a],
                          params.dilation[a], params.is_causal[a])
        left, right = plan[:2]
        if shards[a] > 1:
            k = _extend(k, 1 + a, names[a], shards[a], left, right)
            v = _extend(v, 1 + a, names[a], shards[a], left, right)
            p = jax.lax.axis_index(names[a])
            tables.append([jnp.asarray(t)[p] for t in plan[2:]])
        else:
            tables.append([jnp.asarray(t[0]) for t in plan[2:]])

    # Compose the per-axis tables into flat [N_local, K] windows (row-major, like the reference).
    keys, valid, rpb_index = 0, True, 0
    for a, (ka, va, ra) in enumerate(tables):
        shape = [1] * 6
        shape[a], shape[3 + a] = ka.shape
        keys = keys * k.shape[1 + a] + ka.reshape(shape)
        rpb_index = rpb_index * params.rpb_shape[a] + ra.reshape(shape)
        valid = valid & va.reshape(shape)
    full = local + params.kernel_size
    flat = lambda t: jnp.broadcast_to(t, full).reshape(math.prod(local), params.window_size)
    out, lse = _indexed.attention(
        q.reshape(problem.batch, -1, *q.shape[-2:]), k.reshape(problem.batch, -1, *k.shape[-2:]),
        v.reshape(problem.batch, -1, *v.shape[-2:]), rpb, add_k, add_v, flat(keys), flat(valid),
        flat(rpb_index), scale)
    spatial = tuple(query.shape[lead:lead + rank])
    return (out.reshape(problem.lead + spatial + out.shape[-2:]),
            lse.reshape(problem.lead + spatial + lse.shape[-1:]))


# ----------------------------------------------------------------------------- public API

def _mesh_size(mesh, axis) -> int:
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh axis {axis!r} is not in the mesh (axes {mesh.axis_names})")
    return mesh.shape[axis]


def _parallel_na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                 additional_keys, additional_values, return_lse, spatial_axes, mesh,
                 batch_axis, head_axis):
    names = _axis_names(rank, spatial_axes)
    body = functools.partial(_local_na, rank, kernel_size=kernel_size, stride=stride,
                             dilation=dilation, is_causal=is_causal, scale=scale, names=names)
    if mesh is None:
        if batch_axis is not None or head_axis is not None:
            raise ValueError("batch_axis / head_axis only apply with mesh=...; inside your own "
                             "shard_map the batch and heads are already local")
        out, lse = body(query=query, key=key, value=value, rpb=rpb,
                        additional_keys=additional_keys, additional_values=additional_values)
        return (out, lse) if return_lse else out

    # Global arrays: check the split, then run the body in a shard_map over `mesh`.
    _checks.check_attention(rank, query, key, value, kernel_size, stride, dilation, is_causal,
                            rpb, additional_keys, additional_values)
    lead = query.ndim - rank - 2
    used = [a for a in names + (batch_axis, head_axis) if a is not None]
    if len(set(used)) != len(used):
        raise ValueError(f"spatial_axes, batch_axis and head_axis must use distinct mesh axes, "
                         f"got {names}, {batch_axis!r}, {head_axis!r}")
    for a, n in enumerate(names):
        if n is not None and query.shape[lead + a] % _mesh_size(mesh, n):
            raise ValueError(f"spatial axis {a} has length {query.shape[lead + a]}, not divisible "
                             f"by the size {mesh.shape[n]} of mesh axis {n!r}")
    if batch_axis is not None and query.shape[0] % _mesh_size(mesh, batch_axis):
        raise ValueError(f"batch size {query.shape[0]} is not divisible by the size "
                         f"{mesh.shape[batch_axis]} of mesh axis {batch_axis!r}")
    if head_axis is not None and key.shape[-2] % _mesh_size(mesh, head_axis):
        raise ValueError(f"kv heads ({key.shape[-2]}) are not divisible by the size "
                         f"{mesh.shape[head_axis]} of mesh axis {head_axis!r}")

    batch = (batch_axis,) + (None,) * (lead - 1)
    tokens = P(*batch, *names, head_axis, None)
    extra = P(*batch, None, head_axis, None)
    args = dict(query=query, key=key, value=value, rpb=rpb, additional_keys=additional_keys,
                additional_values=additional_values)
    specs = dict(query=tokens, key=tokens, value=tokens, rpb=P(head_axis),
                 additional_keys=extra, additional_values=extra)
    given = {n: x for n, x in args.items() if x is not None}

    def run(given):
        return body(**{n: given.get(n) for n in args})

    out, lse = jax.shard_map(run, mesh=mesh, in_specs=({n: specs[n] for n in given},),
                             out_specs=(tokens, P(*batch, *names, head_axis)))(given)
    return (out, lse) if return_lse else out


_DOC = """{rank}-D neighborhood attention with spatial axes split across devices (context parallel).

    Same arguments and result as `jax_natten.na{rank}d` (no `backend`: the local compute is the
    XLA gather path), plus:
    spatial_axes: one mesh axis name or None per spatial axis ({axes}), or a dict
        {{spatial axis index: mesh axis name}}: the axes split in contiguous blocks.
    mesh: a `jax.sharding.Mesh`: take and return global arrays, running a shard_map over it.
        None: called inside your own `jax.shard_map`/`pmap` on local blocks.
    batch_axis, head_axis (with mesh only): mesh axes that also split the batch (first dim) /
        the heads (heads and kv heads alike; must divide kv_heads).
    Each device exchanges only halos of k and v with its neighbours (`jax.lax.ppermute`); see the
    module docstring for the communication volume and the requirements.
"""


def _make(rank):
    def na(query, key, value, kernel_size, *, stride=1, dilation=1, is_causal=False, scale=None,
           rpb=None, additional_keys=None, additional_values=None, return_lse=False,
           spatial_axes, mesh: Optional[jax.sharding.Mesh] = None, batch_axis=None,
           head_axis=None):
        return _parallel_na(rank, query, key, value, kernel_size, stride, dilation, is_causal,
                            scale, rpb, additional_keys, additional_values, return_lse,
                            spatial_axes, mesh, batch_axis, head_axis)

    na.__name__ = na.__qualname__ = f"na{rank}d"
    na.__doc__ = _DOC.format(rank=rank, axes=", ".join("XYZ"[3 - rank:]))
    return na


na1d, na2d, na3d = _make(1), _make(2), _make(3)
