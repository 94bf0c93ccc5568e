"""Batch and head sharding of the FFI calls: `custom_partitioning` with a Shardy sharding rule.

Under `jax.jit` with inputs split over a mesh, XLA cannot look inside a custom call, so by default
it gathers every operand onto every device first. Here each FFI call is wrapped in
`jax.experimental.custom_partitioning`:

- a Shardy `sharding_rule` tells the propagation pass how the operands' dims relate: the batch dims
  are factors shared by every batched operand and result; the query-head dim `H` of q/o/lse/w/dq
  and rpb/drpb is the compound factor `(kv g)` of the kv-head dim `KVH` (factor `kv`, shared with
  k/v/additional kv) and the group size `g = H / KVH`: query head `h` reads kv head `h // g`, so
  splitting `kv` in contiguous blocks splits `H` in matching blocks. Every other dim (spatial,
  head_dim, window width, rpb extents, additional tokens, `g`) needs replication.
- the `partition` callback then fixes the per-device program: it keeps the batch split and the head
  split the first operand arrived with (the heads only when the number of shards divides KVH;
  else the heads are replicated), asks for everything else replicated (XLA reshards whatever
  arrived split along a spatial or head_dim axis), and lowers the same FFI call on per-shard
  shapes. Each device runs the kernel on its own batch/head block: no all-gather of q, k or v.

Order of wrappers (outermost first): `custom_vjp` (backends/fna.py, backends/unfused.py) ->
`custom_vmap` (`backends/ffi.py: _call`) -> `custom_partitioning` (here) -> `jax.ffi.ffi_call`.
vmapped axes arrive as extra leading batch dims (`lead`) and are folded into the kernels' single
batch dim per device, so a split vmapped axis stays split too. Inside `jax.shard_map` / `jax.pmap` (manual mesh axes) the call is emitted as a
plain FFI call on the local blocks: with every axis manual that is all there is to do; with only
some axes manual (`shard_map(..., axis_names=...)`) XLA replicates the call over the others.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Every buffer of a call comes with its dim labels (`ffi_call`'s `layouts`, from the op's
# description in backends/ffi.py): b: the batch dim(s), x/y/z: spatial, H: query heads, kv: kv
# heads, d / e: head dims, w: window width (K + S), s: additional tokens, r0..r2: rpb extents.
_ABSENT = ("n",)  # an absent rpb / drpb: 0 elements, rank 1


def _labels(layout, shape, lead: int) -> tuple:
    """Labels of one array: `b` becomes `b0 .. b{lead-1}`; an absent rpb/drpb is `n`."""
    if "b" in layout:
        layout = tuple(f"b{i}" for i in range(lead)) + layout[1:]
    return layout if len(shape) == len(layout) else _ABSENT


def _is_batch(label: str) -> bool:
    return label[0] == "b"


def _head_counts(in_labels, in_shapes) -> tuple:
    """(H, KVH) of this call."""
    sizes = {}
    for labels, shape in zip(in_labels, in_shapes):
        for lab, n in zip(labels, shape):
            sizes.setdefault(lab, n)
    return sizes["H"], sizes.get("kv", sizes["H"])


def sharding_rule(in_labels, out_labels, heads: int, kv_heads: int) -> str:
    """Einsum-like Shardy rule, e.g. `b0 x y z (kv g) d, b0 x y z kv d, ... -> b0 x y z (kv g) e`.

    The query-head dim is `(kv g)` for GQA, `kv` when H == KVH, and `g` alone for MQA (KVH == 1:
    Shardy forbids size-1 parts of a compound factor; heads are then never split anyway).
    """
    query_heads = "kv" if heads == kv_heads else "g" if kv_heads == 1 else "(kv g)"

    def term(labels):
        return " ".join(query_heads if lab == "H" else lab for lab in labels)

    return f"{', '.join(map(term, in_labels))} -> {', '.join(map(term, out_labels))}"


def _replicated_factors(rule: str) -> tuple:
    """Every factor but the batch dims and kv heads, in order of first appearance (Shardy wants
    special factors sorted by its factor index, which is that order)."""
    seen = []
    for name in rule.replace("(", " ").replace(")", " ").replace(",", " ").split():
        if name not in seen and name not in ("->", "kv") and not _is_batch(name):
            seen.append(name)
    return tuple(seen)


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _candidates(mesh, exclude=()):
    """Ordered tuples of distinct mesh axes (size > 1) that a dim may be split over."""
    axes = [a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in exclude]
    return [c for n in range(1, len(axes) + 1) for c in itertools.permutations(axes, n)]


def _dim_axes(mesh, arg, dim: int, exclude=()) -> tuple:
    """The mesh axes `arg` (global shape + sharding) is split over along `dim`, in contiguous
    blocks. () when that dim is whole on every device, or when its split is not expressible by
    whole mesh axes (Shardy may hand over sub-axes): the dim is then replicated."""
    size = arg.shape[dim]
    norm = lambda idx: idx[dim].indices(size) if idx else (0, size, 1)
    given = {d: norm(i) for d, i in arg.sharding.devices_indices_map(arg.shape).items()}
    if all(v == (0, size, 1) for v in given.values()):
        return ()
    for axes in _candidates(mesh, exclude):
        if size % _size(mesh, axes):
            continue
        spec = [None] * len(arg.shape)
        spec[dim] = axes
        cand = NamedSharding(mesh, PartitionSpec(*spec)).devices_indices_map(arg.shape)
        if all(norm(cand[d]) == v for d, v in given.items()):
            return axes
    return ()


def split_plan(mesh, in_labels, arg_shapes) -> dict:
    """-> {label: mesh axes} for the batch dims and the heads (`H` and `kv` alike).

    Read off the first operand (q, or the weights of av), whose sharding Shardy has already made
    consistent with the others. The heads stay split only where the shards divide KVH evenly.
    """
    first, labels = arg_shapes[0], in_labels[0]
    plan, used = {}, ()
    for dim, lab in enumerate(labels):
        if _is_batch(lab) or lab == "H":
            plan[lab] = _dim_axes(mesh, first, dim, exclude=used)
            used += plan[lab]
    kv = [a.shape[l.index("kv")] for l, a in zip(in_labels, arg_shapes) if "kv" in l]
    kv_heads = kv[0] if kv else first.shape[labels.index("H")]
    if plan["H"] and kv_heads % _size(mesh, plan["H"]):
        plan["H"] = ()
    plan["kv"] = plan["H"]
    return plan


def _spec(labels, plan) -> PartitionSpec:
    def entry(lab):
        axes = plan.get(lab, ())
        return None if not axes else axes[0] if len(axes) == 1 else axes
    return PartitionSpec(*(entry(lab) for lab in labels))


def _in_manual_context() -> bool:
    """Inside shard_map / pmap: some mesh axes are manual."""
    return bool(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))


def _varying(x) -> frozenset:
    """The manual mesh axes `x` varies over (shard_map with check_vma); empty elsewhere."""
    mat = getattr(jax.typeof(x), "mat", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def _with_varying_axes(args, out_types):
    """Inside shard_map with check_vma: operands cast to vary over the union of their varying
    manual axes (an FFI call needs them equal), results typed as varying over it too."""
    vma = frozenset().union(*(_varying(a) for a in args))
    if not vma:
        return args, out_types
    args = [a if _varying(a) == vma else jax.lax.pcast(a, tuple(sorted(vma - _varying(a))),
                                                       to="varying") for a in args]
    kind = jax.sharding.ManualAxisType(varying=vma)
    where = NamedSharding(jax.sharding.get_abstract_mesh(), PartitionSpec())
    return args, [jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=where, manual_axis_type=kind)
                  for o in out_types]


def _explicit_mesh():
    """The current abstract mesh if it has Explicit axes (sharding in types), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not any(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    return mesh


def _explicit_plan(mesh, in_labels, args) -> dict:
    """`split_plan` from the operands' sharding types (Explicit axes): batch and head splits of
    the first operand, kept where they divide evenly."""
    first, labels = args[0], in_labels[0]
    spec = tuple(jax.typeof(first).sharding.spec)
    spec += (None,) * (len(labels) - len(spec))
    axes = lambda e: () if e is None else tuple(e) if isinstance(e, (tuple, list)) else (e,)
    plan = {}
    for dim, lab in enumerate(labels):
        if _is_batch(lab) or lab == "H":
            split = axes(spec[dim])
            plan[lab] = () if first.shape[dim] % _size(mesh, split) else split
    kv = [a.shape[l.index("kv")] for l, a in zip(in_labels, args) if "kv" in l]
    if plan["H"] and (kv[0] if kv else first.shape[labels.index("H")]) % _size(mesh, plan["H"]):
        plan["H"] = ()
    plan["kv"] = plan["H"]
    return plan


def like_primals(cotangents, primals):
    """Give each cotangent its primal's type where types carry placement (custom_vjp checks):

    - a mesh with Explicit axes: the primal's sharding (e.g. drpb summed over a split batch, or dq
      of a q that arrived split along a spatial axis, is resharded);
    - inside shard_map with check_vma: a cotangent varying over more manual axes than its primal
      (e.g. drpb of an rpb shared by every batch shard) is summed over the extra axes, the
      transpose of the primal's implicit broadcast.
    """
    explicit = _explicit_mesh() is not None
    manual = _in_manual_context()
    if not explicit and not manual:
        return cotangents

    def like(ct, p):
        if ct is None or p is None:
            return ct
        if manual:
            extra = _varying(ct) - _varying(p)
            if extra:
                ct = jax.lax.psum(ct, tuple(sorted(extra)))
        if explicit:
            want = jax.typeof(p).sharding.spec
            if jax.typeof(ct).sharding.spec != want:
                ct = jax.sharding.reshard(ct, want)
        return ct

    return type(cotangents)(like(c, p) for c, p in zip(cotangents, primals))


def ffi_call(target: str, out_types, args, attrs, layouts, lead: int = 1):
    """`jax.ffi.ffi_call(target, out_types)(*args, **attrs)`, split over batch and heads under jit.

    `out_types`: global `jax.ShapeDtypeStruct`s; batched operands and results start with `lead`
    batch dims, which are folded into one for the kernel. `layouts`: (operand labels, result
    labels), one tuple of dim labels per buffer (`backends.ffi.FfiOp`). Returns a tuple of results.
    """
    in_layouts, out_layouts = layouts
    in_labels = tuple(_labels(l, a.shape, lead) for l, a in zip(in_layouts, args))
    out_labels = tuple(_labels(l, o.shape, lead) for l, o in zip(out_layouts, out_types))

    def run(out_shapes, *xs, mesh=None):
        """The FFI call on arrays of these shapes, leading batch dims folded into one. `mesh`:
        the Explicit-axes mesh whose sharding types the global (traced, not partitioned) call
        carries; the folded batch dim is typed replicated there (it only feeds type inference)."""
        if lead == 1:
            return tuple(jax.ffi.ffi_call(target, out_shapes)(*xs, **attrs))
        batched = lambda labels: labels != _ABSENT and _is_batch(labels[0])
        fold = lambda shape: (math.prod(shape[:lead]),) + tuple(shape[lead:])

        def folded_spec(spec, ndim):
            spec = tuple(spec) + (None,) * (ndim - len(spec))
            return PartitionSpec(None, *spec[lead:])

        def reshape(x, shape, spec):
            if mesh is None:
                return x.reshape(shape)
            return jax.lax.reshape(x, shape, out_sharding=spec)

        xs = [reshape(x, fold(x.shape), mesh and folded_spec(jax.typeof(x).sharding.spec, x.ndim))
              if batched(l) else x for x, l in zip(xs, in_labels)]
        types = []
        for o, l in zip(out_shapes, out_labels):
            if not batched(l):
                types.append(o)
                continue
            sh = o.sharding if mesh is None else NamedSharding(
                mesh, folded_spec(o.sharding.spec, len(o.shape)))
            types.append(jax.ShapeDtypeStruct(fold(o.shape), o.dtype, sharding=sh,
                                              manual_axis_type=o.manual_axis_type))
        res = jax.ffi.ffi_call(target, types)(*xs, **attrs)
        return tuple(reshape(r, o.shape, mesh and o.sharding.spec) if batched(l) else r
                     for r, o, l in zip(res, out_shapes, out_labels))

    if _in_manual_context():
        args, out_types = _with_varying_axes(args, out_types)
        return run(out_types, *args)
    explicit = _explicit_mesh()
    if explicit is not None:  # results carry their sharding in their types
        plan = _explicit_plan(explicit, in_labels, args)
        out_types = [jax.ShapeDtypeStruct(o.shape, o.dtype,
                                          sharding=NamedSharding(explicit, _spec(l, plan)))
                     for o, l in zip(out_types, out_labels)]

    @custom_partitioning
    def call(*xs):
        return run(out_types, *xs, mesh=explicit)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        if mesh.empty:  # shardings not from a mesh: run replicated on the devices given
            devices = arg_shapes[0].sharding.devices_indices_map(arg_shapes[0].shape)
            mesh, plan = Mesh(np.array(list(devices)), ("devices",)), {}
        else:
            plan = split_plan(mesh, in_labels, arg_shapes)
        arg_shardings = tuple(NamedSharding(mesh, _spec(l, plan)) for l in in_labels)
        out_shardings = tuple(NamedSharding(mesh, _spec(l, plan)) for l in out_labels)
        local_out = [jax.ShapeDtypeStruct(s.shard_shape(o.shape), o.dtype)
                     for s, o in zip(out_shardings, out_types)]
        return mesh, lambda *xs: run(local_out, *xs), out_shardings, arg_shardings

    heads, kv_heads = _head_counts(in_labels, [a.shape for a in args])
    rule = sharding_rule(in_labels, out_labels, heads, kv_heads)
    sizes = {"g": heads // kv_heads} if "(kv g)" in rule else {}
    call.def_partition(partition, sharding_rule=rule, decode_shardings=False,
                       need_replication_factors=_replicated_factors(rule), **sizes)
    return call(*args)
