"""The fused attention op (`na1d` / `na2d` / `na3d`) on the backends that run it as one custom call
each way: "cpu" (host kernels, cuda/cpu/) and "fused" (FNA CUDA kernels, cuda/fna/).

    attention (custom_vjp)
      primal:   attention      -> ffi.fna_fwd -> natten_{cpu,fused}_fna_fwd   -> o, lse
      forward:  _attention_fwd -> ffi.fna_fwd -> natten_{cpu,fused}_fna_fwd   -> o, lse, saved
      backward: _attention_bwd -> ffi.fna_bwd -> natten_{cpu,fused}_fna_bwd   -> dq, dk, dv, ...
                (+ fixed_order_drpb under fused_config(deterministic=True))

`saved` is what the backend's backward takes from its forward: o and lse ("cpu"), or the fused
forward's residuals (its softmax statistics and o in float32, plus lse), which the fused kernels
write only in the custom_vjp's forward rule: a call without a gradient writes none of them.

Here too is what only the "fused" backend has: its limits, and `FusedSettings`, the frozen form of
`jax_natten.fused_config` that travels as a static argument from the public op to the custom
calls' attributes.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import jax
import jax.numpy as jnp

from .. import config, sharding
from .._softmax import softmax_lse
from . import ffi, unfused

BACKENDS = ("cpu", "fused")


# ----------------------------------------------------------------------------- "fused" only

@dataclasses.dataclass(frozen=True)
class FusedSettings:
    """`fused_config` for one call, as the fused custom calls take it (hashable: a static argument
    of the custom_vjp). Tiles have 3 extents (leading 1s for lower ranks); all 0: the kernels
    choose."""
    q_tile: tuple
    kv_tile: tuple
    mma: str
    deterministic: bool

    @classmethod
    def of(cls, cfg: config.FusedConfig, rank: int) -> "FusedSettings":
        tiles = []
        for name, tile in (("q_tile", cfg.q_tile), ("kv_tile", cfg.kv_tile)):
            if tile is None:
                tiles.append((0,) * 3)
                continue
            if len(tile) != rank:
                raise ValueError(f"{name} {tile} has {len(tile)} extents for a {rank}-D problem")
            tiles.append((1,) * (3 - rank) + tuple(tile))
        return cls(tiles[0], tiles[1], cfg.mma, cfg.deterministic)

    def attrs(self) -> dict:
        """Attributes of natten_fused_fna_fwd (cuda/README.md); the backward adds
        `deterministic`."""
        return dict(q_tile=np.asarray(self.q_tile, np.int64),
                    kv_tile=np.asarray(self.kv_tile, np.int64),
                    mma=np.int64(ffi.LIMITS["mma_codes"][self.mma]))


def unsupported(backend: str, op: str, head_dims: tuple) -> str | None:
    """Why "fused" cannot serve this call (None if it can, or for other backends)."""
    if backend != "fused":
        return None
    if op != "attention":
        return "'fused' has no unfused qk/av ops: use 'gemm', 'naive', 'cpu' or 'reference'"
    multiple, most = ffi.LIMITS["fused_head_dim_multiple"], ffi.LIMITS["fused_max_head_dim"]
    if any(d % multiple or d == 0 or d > most for d in head_dims):
        return (f"head dims must be multiples of {multiple} ({multiple}, {2 * multiple}, ..., "
                f"up to {most}), got {', '.join(map(str, head_dims))}")
    return None


def check_size(backend: str, problem):
    """The fused kernels put heads on a CUDA grid dimension and index the tokens of a batch
    element in 32 bits: a ValueError beyond those sizes (the handlers check the same limits)."""
    if backend != "fused":
        return
    lim = ffi.LIMITS
    if problem.heads > lim["fused_max_heads"]:
        raise ValueError(f"backend 'fused' takes at most {lim['fused_max_heads']} heads (a CUDA "
                         f"grid dimension), got {problem.heads}")
    tokens = math.prod(problem.spatial)
    if tokens > lim["fused_max_tokens"]:
        raise ValueError(f"backend 'fused' takes fewer than 2**31 tokens per batch element, got "
                         f"{tokens}")


def uses_dq_workspace(settings: FusedSettings, dtype, head_dims: tuple) -> bool:
    """Whether the fused backward's schedule may add dq into its float32 workspace (dq_acc):
    only the Hopper single-walk schedule does, which runs for float16 / bfloat16, not in
    deterministic mode, not on mma.sync, at head dims up to 64 (cuda/fna/handlers.cu, FusedBwd,
    `single_walk`). Elsewhere the workspace is passed with 0 elements (the handler then runs the
    two-kernel schedule whatever the device)."""
    return (jnp.dtype(dtype) != jnp.float32 and not settings.deterministic
            and settings.mma != "mma_sync" and max(head_dims) <= 64)


def fixed_order_drpb(q, k, v, rpb, add_k, add_v, do, dlse, params, scale):
    """d-rpb of the fused op, bit-reproducible (fused_config(deterministic=True)): the fused
    kernels sum it with atomics, so here it comes from the GEMM-based kernels instead, whose
    reductions run in a fixed order. dS = P (do.v - delta) per window entry, P the row's softmax,
    then the qk op's backward w.r.t. rpb sums dS per relative offset. Costs [N, prod(kernel)]
    temporaries: deterministic mode trades memory for reproducibility. dS comes from the
    backward of _softmax.softmax_lse (normalized P, no rowsum(do * o) from the rounded o)."""
    f32 = jnp.float32
    # The additional keys share each row's softmax: their logits and do . v entries are part of
    # P and delta, though rpb does not reach them.
    logits = unfused.f32_logits(q, k, rpb, add_k, params, scale, "gemm")
    dp = unfused.qk(do.astype(v.dtype), v, None, add_v, params, "gemm", f32)  # do . v
    _, softmax_pull = jax.vjp(softmax_lse, logits)
    (ds,) = softmax_pull((dp, dlse.astype(f32)))
    _, pull = jax.vjp(lambda r: unfused.qk(q, k, r, add_k, params, "gemm"), rpb)
    return pull(ds.astype(q.dtype))[0]


# ----------------------------------------------------------------------------- the op
# Arguments in kernel layout; `params` (padded NAParams), `scale`, `backend` and `settings`
# (FusedSettings for "fused", None for "cpu") are static.

def _attrs(params, scale, settings) -> dict:
    attrs = ffi.window_attrs(params)
    attrs["scale"] = np.float32(scale)
    if settings is not None:
        attrs.update(settings.attrs())
    return attrs


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def attention(q, k, v, rpb, add_k, add_v, params, scale, backend, settings):
    """-> (o, lse): softmax(scale q.k + rpb) v over each window and the additional keys."""
    return ffi.fna_fwd(backend, q, k, v, rpb, add_k, add_v, _attrs(params, scale, settings))


def _attention_fwd(q, k, v, rpb, add_k, add_v, params, scale, backend, settings):
    o, lse, saved = ffi.fna_fwd(backend, q, k, v, rpb, add_k, add_v,
                                _attrs(params, scale, settings), saved=True)
    return (o, lse), (q, k, v, rpb, add_k, add_v, saved)


def _attention_bwd(params, scale, backend, settings, res, cotangents):
    q, k, v, rpb, add_k, add_v, saved = res
    do, dlse = cotangents
    attrs = _attrs(params, scale, settings)
    absent = ()
    if settings is not None:
        attrs["deterministic"] = np.int64(settings.deterministic)
        if not uses_dq_workspace(settings, q.dtype, (q.shape[-1], v.shape[-1])):
            absent = ("dq_acc",)
    dq, dk, dv, drpb, dak, dav = ffi.fna_bwd(backend, q, k, v, rpb, add_k, add_v, saved, do,
                                             dlse, attrs, absent=absent)
    if settings is not None and settings.deterministic and rpb is not None:
        drpb = fixed_order_drpb(q, k, v, rpb, add_k, add_v, do, dlse, params, scale)
    return sharding.like_primals((dq, dk, dv, None if rpb is None else drpb.astype(rpb.dtype),
                                  None if add_k is None else dak, None if add_v is None else dav),
                                 (q, k, v, rpb, add_k, add_v))


attention.defvjp(_attention_fwd, _attention_bwd)
