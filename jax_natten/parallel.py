"""Spatial (context) parallelism: neighborhood attention over spatial axes split across devices.

    out = jax_natten.parallel.na2d(q, k, v, kernel_size, ..., spatial_axes=("sp", None), mesh=mesh)

splits spatial axis 0 over the mesh axis "sp" (each device holds one contiguous block of it) and
returns exactly what `jax_natten.na2d` returns on the unsplit arrays: borders, even kernels, stride,
dilation, causal masking, rpb, GQA and additional keys/values included, forward and backward.
With `mesh=None` the same functions run inside your own `jax.shard_map` (or `pmap`) on the local
blocks, the named axes being manual there; with `mesh` they wrap themselves in a shard_map and take
and return global arrays (`batch_axis` / `head_axis` also split the batch / the heads).

How it works (gather path; the native path is below). A query's window depends only on its
global coordinates (`_window.py`), and along an axis the windows of a contiguous block of queries
cover a contiguous key range that reaches at most `halo_left` keys before the block and
`halo_right` keys after it; both are computed statically for the worst device (`halo_sizes`). Each device receives those halos of k and v from its neighbours
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

Native kernels (`backend`). When every split axis's block is a multiple of `stride * dilation`,
the local compute is the regular op `jax_natten.na{r}d(..., backend=backend)` (None: the best
available, e.g. `cpu` on the host, `fused` on a GPU) run on an *extended block*: k and v with
`native_halo(k, s, d, causal)` rows on each side (non-causal `d * (k // 2 - s // 2)` before and
`d * (ceil(k / 2) - ceil(s / 2))` after, causal `d * (k - s)` before and none after, each rounded
up to a multiple of `s * d`: enough that the window clamps of the op's local window math never
bind for the device's own queries; stride 1 gives the gather path's halos), q padded with zeros
there (those queries' outputs are dropped), then the device's own queries are sliced out. Every
device's block has the same shape, so at the global borders it is shifted inward (the first
device's starts at 0, the last one's ends at the axis end) and those devices fetch `left + right`
rows from one side only: every device receives `left + right` rows per split axis, like the
gather path. `_native_plan` checks the extended windows against the global ones at trace time.
Elsewhere `backend=None` falls back to the gather path and an explicit native backend raises
ValueError; `backend="gather"` asks for the gather path. Gradients: autodiff through the slices
and ppermutes around the op's custom_vjp (its backward kernels).

Requirements (ValueError otherwise): each split axis's length is divisible by its mesh axis size,
a spatial axis is split over at most one mesh axis and a mesh axis splits at most one spatial
axis; with `mesh`, `batch_axis` must divide the batch and `head_axis` the kv heads. The gather
path (`_indexed.py`) is the XLA gather arithmetic of the reference backend (any float dtype, any
device).
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

__all__ = ["na1d", "na2d", "na3d", "halo_sizes", "halo_bytes", "native_halo"]


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


def native_halo(kernel: int, stride: int, dilation: int, causal: bool) -> tuple:
    """(left, right): the halos, in tokens, that make an interior device's extended block
    `[lo - left, hi + right)` reproduce the global windows of its queries with the window math run
    in local coordinates (the native-kernel path). Per dilation group, a block starting at a
    multiple of `stride * dilation` and a query's stride-group leader `(i // s) * s + s // 2`
    (non-causal) / `+ s - 1` (causal): the left clamp `max(leader - k // 2, 0)` (causal
    `leader - k + 1`) must not bind for the block's first stride group, the right clamps
    `min(leader, Lg - 1)` and `Lg - k` not for its last. That needs `k // 2 - s // 2` /
    `ceil(k / 2) - ceil(s / 2)` group tokens (non-causal; causal `k - s` / 0), times `d`, rounded
    up to a multiple of `s * d` so that the extended block stays aligned."""
    k, s, d = kernel, stride, dilation
    if causal:
        left, right = max(0, k - s), 0
    else:
        left, right = max(0, k // 2 - s // 2), max(0, -(-k // 2) - -(-s // 2))
    m = s * d
    return tuple(-(-(h * d) // m) * m for h in (left, right))


@functools.lru_cache(maxsize=256)
def _native_plan(length: int, shards: int, kernel: int, stride: int, dilation: int,
                 causal: bool):
    """The extended blocks of the native path along one axis, or None where it cannot serve.

    Every device runs the op on `extent` tokens `[start_p, start_p + extent)`: its block with
    `native_halo` around it, clipped to the axis by shifting inward at the borders (same shape on
    every device). Returns `(extent, fetch_left, fetch_right, starts, halo)`: the exchange
    fetches `fetch_left` / `fetch_right` rows, each piece only to the devices that read it
    (interior ones read `halo = native_halo(...)`); every device's extended windows are checked
    here against the global ones."""
    block = length // shards
    if block % (stride * dilation):
        return None
    left, right = native_halo(kernel, stride, dilation, causal)
    extent = min(block + left + right, length)
    lo = np.arange(shards) * block
    starts = np.clip(lo - left, 0, length - extent)
    fetch_left = int((lo - starts).max())
    fetch_right = int((starts + extent - lo - block).max())
    glob = _window.axis_neighborhood(length, kernel, stride, dilation, causal)
    ext = _window.axis_neighborhood(extent, kernel, stride, dilation, causal)
    for p in range(shards):
        own = slice(lo[p] - starts[p], lo[p] - starts[p] + block)
        mine = slice(lo[p], lo[p] + block)
        if not (np.array_equal(ext[0][own] + starts[p], glob[0][mine])
                and np.array_equal(ext[1][own], glob[1][mine])
                and np.array_equal(ext[2][own], glob[2][mine])):
            return None
    return extent, fetch_left, fetch_right, tuple(int(a) for a in starts), (left, right)


# ----------------------------------------------------------------------------- halo exchange

def _ppermute(x, name, perm):
    return jax.lax.ppermute(x, name, perm) if perm else jnp.zeros_like(x)


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


def _fetch(x, dim: int, name, shards: int, first: int, last: int, cuts, needs):
    """Rows `[lo + first, lo + last)` along `dim` (`lo`: the device's block start), in pieces
    split at block boundaries and at the offsets `cuts`, each piece sent by one ppermute only to
    the devices `r` with `needs(r, a, b)` for its offsets `[a, b)` (the others get zeros they
    never read): the native path's extended blocks, whose border devices need more rows than
    the interior ones."""
    block = x.shape[dim]
    edges = sorted({first, last, *(c for c in cuts if first < c < last),
                    *range(-(-first // block) * block, last, block)})
    parts = []
    for a, b in zip(edges, edges[1:]):
        hop = a // block
        piece = jax.lax.slice_in_dim(x, a - hop * block, b - hop * block, axis=dim)
        if hop == 0:
            parts.append(piece)
            continue
        perm = [(r + hop, r) for r in range(shards) if 0 <= r + hop < shards and needs(r, a, b)]
        parts.append(_ppermute(piece, name, perm))
    return jnp.concatenate(parts, axis=dim) if len(parts) > 1 else parts[0]


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


def _local_native(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                  additional_keys, additional_values, names, plans, backend):
    """The native path on each device: extend k and v by their halos (exchanged), q by zeros,
    run the regular op on the extended blocks and keep the device's own queries."""
    lead = query.ndim - rank - 2
    q, k, v = query, key, value
    own = []
    for a, (name, plan) in enumerate(zip(names, plans)):
        if plan is None:
            continue
        shards = _shards(name)
        extent, fetch_left, fetch_right, starts, halo = plan
        dim, block = lead + a, query.shape[lead + a]
        lo = [p * block for p in range(shards)]

        def needs(r, a, b, starts=starts, extent=extent, lo=lo):
            return a < starts[r] + extent - lo[r] and starts[r] - lo[r] < b

        # Interior devices read `native_halo` rows each side, border ones more: separate pieces.
        cuts = (-halo[0], block + halo[1])
        k, v = (_fetch(x, dim, name, shards, -fetch_left, block + fetch_right, cuts, needs)
                for x in (k, v))
        widths = [(0, 0)] * q.ndim
        widths[dim] = (fetch_left, fetch_right)
        q = jnp.pad(q, widths)
        p = jax.lax.axis_index(name)
        offset = jnp.asarray(np.array(starts) - np.array(lo) + fetch_left, jnp.int32)[p]
        q, k, v = (jax.lax.dynamic_slice_in_dim(x, offset, extent, axis=dim) for x in (q, k, v))
        own.append((dim, jnp.asarray(np.array(lo) - np.array(starts), jnp.int32)[p], block))
    from . import ops
    out, lse = ops._na(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb,
                       additional_keys, additional_values, True, backend)
    for dim, offset, block in own:
        out = jax.lax.dynamic_slice_in_dim(out, offset, block, axis=dim)
        lse = jax.lax.dynamic_slice_in_dim(lse, offset, block, axis=dim)
    return out, lse


def _local_na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
              additional_keys, additional_values, names, backend=None):
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
    if backend != "gather":
        prm = problem.params
        plans = [None if n == 1 else _native_plan(
            L, n, prm.kernel_size[a], prm.stride[a], prm.dilation[a], prm.is_causal[a])
            for a, (L, n) in enumerate(zip(problem.spatial, shards))]
        bad = [a for a, (n, pl) in enumerate(zip(shards, plans)) if n > 1 and pl is None]
        if not bad:
            return _local_native(rank, query, key, value, kernel_size, stride, dilation,
                                 is_causal, scale, rpb, additional_keys, additional_values,
                                 names, plans, backend)
        if backend is not None:
            a = bad[0]
            raise ValueError(
                f"backend {backend!r}: the native kernels need each split axis's block to be a "
                f"multiple of stride * dilation (spatial axis {a}: block "
                f"{problem.spatial[a] // shards[a]}, stride {prm.stride[a]}, dilation "
                f"{prm.dilation[a]}); use backend=None or 'gather' for the XLA gather path")
    scale = _checks.check_scale(scale)  # a number, or a traced scalar (used as an array)
    scale = problem.head_dim ** -0.5 if scale is None else scale
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
                 batch_axis, head_axis, backend=None):
    names = _axis_names(rank, spatial_axes)
    if backend is not None and backend != "gather":
        from . import ops
        if backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS}, "
                             f"'gather' or None")
    body = functools.partial(_local_na, rank, kernel_size=kernel_size, stride=stride,
                             dilation=dilation, is_causal=is_causal, scale=scale, names=names,
                             backend=backend)
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

    Same arguments and result as `jax_natten.na{rank}d`, plus:
    backend: None (the native kernels, best available, where every split block is a multiple of
        stride * dilation, else the XLA gather path), a backend of `na{rank}d` (ValueError where
        the blocks do not allow it) or "gather" (the XLA gather path).
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
           head_axis=None, backend=None):
        return _parallel_na(rank, query, key, value, kernel_size, stride, dilation, is_causal,
                            scale, rpb, additional_keys, additional_values, return_lse,
                            spatial_axes, mesh, batch_axis, head_axis, backend)

    na.__name__ = na.__qualname__ = f"na{rank}d"
    na.__doc__ = _DOC.format(rank=rank, axes=", ".join("XYZ"[3 - rank:]))
    return na


na1d, na2d, na3d = _make(1), _make(2), _make(3)
