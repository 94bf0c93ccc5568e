"""The FFI ops: the one place that registers the native handlers, describes their buffers, and calls
them (contract: `cuda/README.md`).

Each op (`FNA_FWD`, `FNA_BWD`, `QK_FWD`, `QK_BWD`, `AV_FWD`, `AV_BWD`) is described once, by an
`FfiOp`: its target name per backend, its operands and its results (and per backend: operands of
its own, residual results saved for the backward, and the workspace results the handlers write
into instead of allocating). From that description come the result
shapes and dtypes of every call, which operands and results carry the batch dim (vmap folding),
and the dim labels the sharding rules are written in (`sharding.py`). The functions of the same
names (`fna_fwd`, ..., `av_bwd`) call the op on the kernel layout.

Every call goes through `_call`, which gives the FFI call a batching rule: vmapped arguments fold
into the batch dim the kernels already loop over (one launch, not one per vmapped element).
"""
from __future__ import annotations

import dataclasses
import pathlib
import warnings

import numpy as np
import jax
import jax.numpy as jnp

from .. import sharding

try:
    from .. import _natten_ext as _ext
    _IMPORT_ERROR = None
except ImportError as e:  # not built, or built for another Python/jaxlib: only "reference" runs
    _ext, _IMPORT_ERROR = None, e


def _missing_extension() -> str:
    """Why the extension is missing, and the fix (an import from the source tree, usually)."""
    package = pathlib.Path(__file__).resolve().parents[1]
    built = sorted(p.name for p in package.glob("_natten_ext*"))
    if built:  # there, but it does not load: say what the loader said
        return (f"the native extension {built[0]} in {package} does not load ({_IMPORT_ERROR}); "
                f"rebuild it for this Python and jaxlib: pip install .")
    source_tree = (package.parent / "pyproject.toml").is_file() and \
        (package.parent / "CMakeLists.txt").is_file()
    where = (f"jax_natten was imported from the source tree {package.parent}, which has no "
             f"build" if source_tree else f"{package} has no _natten_ext module")
    return (f"the native extension is not built: {where}. Install the package (pip install .) "
            f"and import it from another directory (Python puts the current directory first "
            f"on sys.path)")


if _ext is None:
    warnings.warn(f"jax_natten: {_missing_extension()}. Until then only the slow 'reference' "
                  f"backend (pure jax.numpy) runs.", UserWarning,
                  stacklevel=2)

# Limits and codes the kernels and this package share (cuda/include/natten/limits.h, exported by
# the extension); None without the extension, where no native backend runs.
LIMITS: dict | None = _ext.limits() if _ext is not None else None


# ----------------------------------------------------------------------------- op descriptions

@dataclasses.dataclass(frozen=True)
class Buffer:
    """One operand or result of an FFI op.

    `dims`: one label per dim. b: batch, x / y / z: spatial (padded to 3), H: query heads, kv: kv
    heads, d: head dim of q and k, e: head dim of v, w: entries of a weights row (window + S),
    s: additional tokens, r0 / r1 / r2: rpb extents (2k - 1), st: the 2 softmax statistics of a
    row (FIXED_SIZES). A buffer whose first label is `b` is batched. `dtype`: "f32", or the name
    of the operand whose dtype a result has. `optional`: absent buffers are passed / returned
    with shape (0,) (rpb and its gradient, residuals a call does not want, an unused
    workspace).
    """
    name: str
    dims: tuple
    dtype: str = ""
    optional: bool = False

    @property
    def batched(self) -> bool:
        return self.dims[0] == "b"


@dataclasses.dataclass(frozen=True, eq=False)
class FfiOp:
    """An FFI op: `targets` maps each backend that serves it to its target name (the names
    cuda/module.cc registers). Per backend: `backend_operands`, its own operand list where it
    differs from `operands`; `residuals`, results after `results` that only a forward whose
    result feeds a gradient asks for (optional: absent otherwise, and then not written);
    `workspaces`, results its handler writes scratch into (float32, sized here, discarded by the
    caller)."""
    name: str
    targets: dict
    operands: tuple
    results: tuple
    backend_operands: dict = dataclasses.field(default_factory=dict)
    residuals: dict = dataclasses.field(default_factory=dict)
    workspaces: dict = dataclasses.field(default_factory=dict)

    def operands_of(self, backend: str) -> tuple:
        return self.backend_operands.get(backend, self.operands)

    def results_of(self, backend: str) -> tuple:
        return self.results + self.residuals.get(backend, ()) + self.workspaces.get(backend, ())


_SPACE = ("b", "x", "y", "z")
_Q = Buffer("q", _SPACE + ("H", "d"))
_K = Buffer("k", _SPACE + ("kv", "d"))
_V = Buffer("v", _SPACE + ("kv", "e"))
_RPB = Buffer("rpb", ("H", "r0", "r1", "r2"), "f32", optional=True)
_ADD_K = Buffer("add_k", ("b", "s", "kv", "d"))
_ADD_V = Buffer("add_v", ("b", "s", "kv", "e"))
_O = Buffer("o", _SPACE + ("H", "e"), "q")
_LSE = Buffer("lse", _SPACE + ("H",), "f32")
_W = Buffer("w", _SPACE + ("H", "w"))
_DRPB = Buffer("drpb", ("b", "H", "r0", "r1", "r2"), "f32", optional=True)  # per batch element
# The fused forward's residuals: per query row (m2, log2_l), its largest base-2 logit and log2 of
# the softmax's sum relative to it (cuda/fna/softmax.cuh, "softmax statistics"), and o unrounded.
_STATS = Buffer("stats", _SPACE + ("H", "st"), "f32", optional=True)
_O32 = Buffer("o32", _O.dims, "f32", optional=True)
# Sizes of the labels that are no dim of any operand and never vary.
FIXED_SIZES = {"st": 2}


def _grad(of: Buffer) -> Buffer:
    """The gradient of an operand: same dims and dtype."""
    return Buffer("d" + of.name, of.dims, of.name)


FNA_FWD = FfiOp(
    "fna_fwd",
    targets={"cpu": "natten_cpu_fna_fwd", "fused": "natten_fused_fna_fwd"},
    operands=(_Q, _K, _V, _RPB, _ADD_K, _ADD_V),
    results=(_O, _LSE),
    # The host backward recomputes everything from o and lse; the fused one forms its weights
    # from the statistics and delta from o32 (a gradient's forward only: fna_fwd(saved=True)).
    residuals={"fused": (_STATS, _O32)})
_PRIMALS = (_Q, _K, _V, _RPB, _ADD_K, _ADD_V)
_COTANGENTS = (Buffer("do", _O.dims), Buffer("dlse", _LSE.dims))
FNA_BWD = FfiOp(
    "fna_bwd",
    targets={"cpu": "natten_cpu_fna_bwd", "fused": "natten_fused_fna_bwd"},
    # Between the primal inputs and the cotangents, what the backend's forward saved (fna_fwd):
    # o and lse, or the fused residuals.
    operands=_PRIMALS + (Buffer("o", _O.dims), Buffer("lse", _LSE.dims)) + _COTANGENTS,
    backend_operands={"fused": _PRIMALS + (Buffer("stats", _STATS.dims), Buffer("o32", _O.dims))
                      + _COTANGENTS},
    results=(_grad(_Q), _grad(_K), _grad(_V), _DRPB, _grad(_ADD_K), _grad(_ADD_V)),
    # delta = rowsum(do * o32) - dlse, per query row; dq_acc: dq in float32, summed in any order
    # (the Hopper schedule; absent where fna.py knows the schedule does not use it).
    workspaces={"fused": (Buffer("delta", _LSE.dims, "f32"),
                          Buffer("dq_acc", _Q.dims, "f32", optional=True))})
QK_FWD = FfiOp(
    "qk_fwd",
    targets={"cpu": "natten_cpu_qk_fwd", "naive": "natten_naive_qk_fwd",
             "gemm": "natten_gemm_qk_fwd"},
    operands=(_Q, _K, _RPB, _ADD_K),
    results=(Buffer("w", _W.dims, "q"),))
QK_BWD = FfiOp(
    "qk_bwd",
    targets={"cpu": "natten_cpu_qk_bwd", "naive": "natten_naive_qk_bwd",
             "gemm": "natten_gemm_qk_bwd"},
    operands=(_Q, _K, _ADD_K, Buffer("dw", _W.dims)),
    results=(_grad(_Q), _grad(_K), _DRPB, _grad(_ADD_K)))
AV_FWD = FfiOp(
    "av_fwd",
    targets={"cpu": "natten_cpu_av_fwd", "naive": "natten_naive_av_fwd",
             "gemm": "natten_gemm_av_fwd"},
    operands=(_W, _V, _ADD_V),
    results=(Buffer("o", _O.dims, "v"),))
AV_BWD = FfiOp(
    "av_bwd",
    targets={"cpu": "natten_cpu_av_bwd", "naive": "natten_naive_av_bwd",
             "gemm": "natten_gemm_av_bwd"},
    operands=(_W, _V, _ADD_V, Buffer("do", _O.dims)),
    results=(_grad(_W), _grad(_V), _grad(_ADD_V)))

OPS = (FNA_FWD, FNA_BWD, QK_FWD, QK_BWD, AV_FWD, AV_BWD)


# ----------------------------------------------------------------------------- registration

_REGISTERED: dict = {}  # target name -> platform


def _register():
    if _ext is None:
        return
    for name, platform, capsule in _ext.registrations():
        jax.ffi.register_ffi_target(name, capsule, platform=platform)
        _REGISTERED[name] = platform


_register()


def available(backend: str) -> bool:
    """Whether this build has kernels for `backend` (`cpu`, `naive`, `gemm` or `fused`)."""
    return any(op.targets.get(backend) in _REGISTERED for op in OPS)


def unavailable_reason(backend: str) -> str:
    if _ext is None:
        return _missing_extension()
    if backend != "cpu" and not _ext.has_cuda():
        return ("this build has no CUDA kernels (built without nvcc or without a CUDA-enabled "
                "JAX, or with JAX_NATTEN_CUDA=OFF; see README, Building)")
    return f"this build has no '{backend}' kernels"


# ----------------------------------------------------------------------------- calls

def window_attrs(params) -> dict:
    """The four attributes every handler takes (padded NAParams)."""
    return dict(kernel_size=np.asarray(params.kernel_size, np.int64),
                stride=np.asarray(params.stride, np.int64),
                dilation=np.asarray(params.dilation, np.int64),
                is_causal=np.asarray(params.is_causal, np.int64))


def _present(buf: Buffer, x) -> bool:
    return not buf.optional or x.ndim == len(buf.dims)


def call(op: FfiOp, backend: str, args, attrs: dict, sizes: dict | None = None,
         absent: tuple = ()):
    """`op` on `backend`'s target with operands `args` (in the order of `op.operands_of`; an
    absent optional operand has shape (0,)). Result shapes come from the labels of
    `op.results_of`: sizes read off the operands, plus FIXED_SIZES, plus `sizes` for labels no
    operand has (w; r0..r2 of a gradient whose bias is no operand). An optional result is absent
    (shape (0,)) when it is named in `absent` or a size it needs is unknown. Returns every
    result, residuals and workspaces included."""
    known = {**FIXED_SIZES, **(sizes or {})}
    dtypes = {}
    operands = op.operands_of(backend)
    for buf, x in zip(operands, args, strict=True):
        dtypes[buf.name] = x.dtype
        if _present(buf, x):
            for label, n in zip(buf.dims, x.shape, strict=True):
                known.setdefault(label, n)
    results = op.results_of(backend)
    outs = []
    for buf in results:
        dtype = jnp.float32 if buf.dtype == "f32" else dtypes[buf.dtype]
        if buf.optional and (buf.name in absent or not all(label in known for label in buf.dims)):
            outs.append(((0,), dtype, False))
        else:
            outs.append((tuple(known[label] for label in buf.dims), dtype, buf.batched))
    layouts = (tuple(b.dims for b in operands), tuple(b.dims for b in results))
    batched = tuple(b.batched for b in operands)
    return _call(op.targets[backend], outs, tuple(args), batched, attrs, layouts)


def _call(target: str, outs, args, batched, attrs, layouts, lead: int = 1):
    """FFI call of `target` with `outs` = [(shape, dtype, has_batch)] and `args`.

    `batched[i]` says whether `args[i]` starts with the batch dims (`lead` of them: vmapped axes
    stack in front of the batch; the kernels see them folded into one); batch-less arguments (rpb)
    and outputs (absent drpb) pass through a vmap unchanged. A vmapped batch-less argument (a
    per-example rpb) cannot fold into the batch, so that case runs one call per vmapped element.
    """
    out_types = [jax.ShapeDtypeStruct(s, d) for s, d, _ in outs]

    @jax.custom_batching.custom_vmap
    def run(*args):
        return sharding.ffi_call(target, out_types, args, attrs, layouts, lead)

    @run.def_vmap
    def fold(axis_size, in_batched, *args):
        if any(b and not has_b for b, has_b in zip(in_batched, batched)):
            # e.g. per-example rpb: one call per element (always correct, rarely needed).
            full = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                    for a, b in zip(args, in_batched)]
            res = jax.lax.map(lambda xs: _call(target, outs, xs, batched, attrs, layouts, lead),
                              full)
            return tuple(res), (True,) * len(outs)
        # The vmapped axis becomes one more leading batch dim (folded inside the call, so a
        # sharded vmapped or batch axis stays sharded under jit).
        full = [a if b or not has_b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                for a, b, has_b in zip(args, in_batched, batched)]
        inner = [((axis_size,) + tuple(s) if has_b else s, d, has_b) for s, d, has_b in outs]
        res = _call(target, inner, full, batched, attrs, layouts, lead + 1)
        return tuple(res), tuple(has_b for _, _, has_b in outs)

    # Differentiating a custom call itself (second derivatives through a custom_vjp backward)
    # has no rule: say so, instead of JAX's "Differentiation rule for ... not implemented".
    @jax.custom_jvp
    def guarded(*args):
        return run(*args)

    @guarded.defjvp
    def _no_derivative(primals, tangents):
        raise NotImplementedError(HIGHER_ORDER_MESSAGE)

    return guarded(*args)


HIGHER_ORDER_MESSAGE = (
    "jax_natten: forward-mode autodiff (jax.jvp, jax.jacfwd, jax.hessian) is not supported: the "
    "attention ops carry reverse-mode rules (custom_vjp). Use jax.grad, jax.vjp, "
    "jax.value_and_grad or jax.jacrev. Second derivatives in reverse mode (grad of grad, "
    "jax.jacrev(jax.jacrev(f))) need backend='reference'; the native backends ('cpu', 'fused', "
    "'gemm', 'naive') have first derivatives only.")


# ----------------------------------------------------------------------------- the six ops
# Kernel layout (padded to 3-D): q [B, X, Y, Z, H, D], k/v [B, X, Y, Z, KVH, D(v)],
# rpb [H, rx, ry, rz], additional kv [B, S, KVH, D(v)]. Absent rpb / additional kv are passed as
# 0-element buffers. Gradients of rpb come back per batch element and are summed here.

def _absent_rpb():
    return jnp.zeros((0,), jnp.float32)


def _zero_tokens(x):
    """Stand-in for absent additional keys/values: [B, 0, KVH, D]."""
    return jnp.zeros((x.shape[0], 0) + x.shape[-2:], x.dtype)


def _sum_drpb(drpb, has_rpb: bool):
    return drpb.sum(0) if has_rpb else None


def fna_fwd(backend, q, k, v, rpb, add_k, add_v, attrs: dict, saved: bool = False):
    """-> o, lse; with `saved` (a forward whose result feeds a gradient) -> o, lse, saved: the
    tuple `fna_bwd` takes from the forward (FNA_BWD's operands between the primal inputs and the
    cotangents: o, lse on "cpu"; stats, o32 on "fused"). Without it the fused kernels write
    no residuals. `attrs`: the window attributes, scale, and the backend's own."""
    rpb = _absent_rpb() if rpb is None else rpb.astype(jnp.float32)
    add_k = _zero_tokens(k) if add_k is None else add_k
    add_v = _zero_tokens(v) if add_v is None else add_v
    residuals = FNA_FWD.residuals.get(backend, ())
    o, lse, *res = call(FNA_FWD, backend, (q, k, v, rpb, add_k, add_v), attrs,
                        absent=() if saved else tuple(b.name for b in residuals))
    if not saved:
        return o, lse
    outputs = dict(o=o, lse=lse, **{b.name: r for b, r in zip(residuals, res)})
    names = [b.name for b in FNA_BWD.operands_of(backend)[len(_PRIMALS):-len(_COTANGENTS)]]
    return o, lse, tuple(outputs[n] for n in names)


def fna_bwd(backend, q, k, v, rpb, add_k, add_v, saved, do, dlse, attrs: dict,
            absent: tuple = ()):
    """-> dq, dk, dv, drpb (summed over the batch; None without rpb), dadd_k, dadd_v. `saved`:
    what `fna_fwd(..., saved=True)` returned for it; `absent`: optional workspaces the backend's
    schedule does not use (fna.py)."""
    has_rpb = rpb is not None
    rpb = _absent_rpb() if rpb is None else rpb.astype(jnp.float32)
    add_k = _zero_tokens(k) if add_k is None else add_k
    add_v = _zero_tokens(v) if add_v is None else add_v
    dq, dk, dv, drpb, dak, dav, *_workspaces = call(
        FNA_BWD, backend, (q, k, v, rpb, add_k, add_v, *saved, do.astype(q.dtype),
                           dlse.astype(jnp.float32)), attrs, absent=absent)
    return dq, dk, dv, _sum_drpb(drpb, has_rpb), dak, dav


# qk_fwd writing float32 logits whatever q's dtype (the unfused attention's softmax input).
_QK_FWD_F32 = dataclasses.replace(QK_FWD, results=(Buffer("w", _W.dims, "f32"),))


def qk_fwd(backend, q, k, rpb, add_k, params, out_dtype=None):
    """-> w [B, X, Y, Z, H, K + S] (unscaled logits + rpb), in q's dtype or, with
    `out_dtype=jnp.float32`, in float32."""
    rpb = _absent_rpb() if rpb is None else rpb.astype(jnp.float32)
    add_k = _zero_tokens(k) if add_k is None else add_k
    op = _QK_FWD_F32 if out_dtype is not None and jnp.dtype(out_dtype) == jnp.float32 else QK_FWD
    (w,) = call(op, backend, (q, k, rpb, add_k), window_attrs(params),
                sizes={"w": params.window_size + add_k.shape[1]})
    return w


def qk_bwd(backend, q, k, rpb, add_k, dw, params):
    """-> dq, dk, drpb (summed over the batch; None without rpb), dadd_k. `rpb` only says whether
    there is a bias (and its shape): the backward does not read it."""
    add_k = _zero_tokens(k) if add_k is None else add_k
    sizes = {} if rpb is None else dict(zip(("r0", "r1", "r2"), rpb.shape[1:]))
    dq, dk, drpb, dak = call(QK_BWD, backend, (q, k, add_k, dw.astype(q.dtype)),
                             window_attrs(params), sizes=sizes)
    return dq, dk, _sum_drpb(drpb, rpb is not None), dak


def av_fwd(backend, w, v, add_v, params):
    """-> o [B, X, Y, Z, H, Dv] (dtype of v)."""
    add_v = _zero_tokens(v) if add_v is None else add_v
    (o,) = call(AV_FWD, backend, (w, v, add_v), window_attrs(params))
    return o


def av_bwd(backend, w, v, add_v, do, params):
    """-> dw, dv, dadd_v."""
    add_v = _zero_tokens(v) if add_v is None else add_v
    return tuple(call(AV_BWD, backend, (w, v, add_v, do.astype(v.dtype)), window_attrs(params)))
