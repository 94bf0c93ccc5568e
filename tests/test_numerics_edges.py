"""Numerics at the edges, on every backend against the float64 oracle (tests/oracle.py):

- softmax weights that sum to 1 for huge, (nearly) equal logits;
- gradients of near one-hot softmax rows (large scale, small windows), where the backward's
  delta = sum(P * dP) cancels against dP;
- zero-size inputs (batch, extra leading dim, heads, head dims, additional tokens);
- a seeded random sweep: hundreds of small configurations (1-3-D, even kernels, stride, dilation,
  causal, GQA/MQA, rpb, additional kv) in three input modes (ordinary, near one-hot, large
  logits with small differences), forward values, lse and every gradient.

Every CUDA variant (naive, gemm, fused with each MMA family and in deterministic mode, float32
included: each test runs every dtype) runs on a GPU only and skips elsewhere. The configurations
come from a fixed seed (the same set every run); the input
values are fresh every run (their seed is in each failure message). JAX_NATTEN_SWEEP sets the
number of configurations (default 240); JAX_NATTEN_SWEEP_REPORT=<file> appends the worst relative
error per variant and dtype as JSON lines.
"""
import contextlib
import dataclasses
import json
import math
import os

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import oracle
from cases import TOLERANCE, fresh_rng, on_backend, rel_err, require
import jax_natten
from jax_natten import ops
from jax_natten.backends import unfused

F32 = jnp.float32
DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}


# ----------------------------------------------------------------------------- variants

def _is_hopper():
    try:
        return jax.devices("gpu")[0].compute_capability.startswith("9.")
    except RuntimeError:
        return False


@contextlib.contextmanager
def _unfused_on_cpu():
    """The unfused composite (qk -> softmax -> av, what "gemm" and "naive" run) on the cpu ops, so
    that CPU CI checks its numerics too."""
    real = ops._attention

    def attention(q, k, v, rpb, add_k, add_v, params, scale, backend, settings=None):
        return unfused.attention(q, k, v, rpb, add_k, add_v, params, scale, "cpu")

    ops._attention = attention
    try:
        yield
    finally:
        ops._attention = real


@contextlib.contextmanager
def _mma(family):
    if family == "wgmma" and not _is_hopper():
        pytest.skip("wgmma needs a Hopper GPU")
    with jax_natten.fused_config(mma=family):
        yield


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    backend: str
    context: object = contextlib.nullcontext
    # The sweep runs every `sweep_every`-th configuration: the variants whose every configuration
    # costs a second of XLA compilation on the CPU take a share (CI time), the others all.
    sweep_every: int = 1
    # The fused kernels form delta = sum(P dP) as rowsum(do * o) from a float32 o, in a kernel
    # of its own: it cannot be exactly the sum of the P and dP that the dq and dk/dv kernels
    # recompute, so near one-hot rows keep its float32 rounding (`errors` allows for it).
    delta_from_o: bool = False
    # P and dS enter the backward's products rounded to the inputs' dtype (the tensor-core
    # kernels, and the unfused composite, whose qk / av ops take them in that dtype): where a
    # gradient sums dS terms that cancel (e.g. keys multiplied by equal queries), that rounding
    # alone leaves eps(dtype) |dS| |q| of error, which `errors` allows for.
    lowp_products: bool = False

    def param(self):
        gpu = self.backend in ("naive", "gemm", "fused")
        marks = [pytest.mark.gpu] if gpu else []
        return pytest.param(self, id=self.name, marks=marks)


VARIANTS = [
    Variant("reference", "reference", sweep_every=6),
    Variant("cpu", "cpu"),
    Variant("cpu-unfused", "cpu", _unfused_on_cpu, sweep_every=3, lowp_products=True),
    Variant("naive", "naive", lowp_products=True),
    Variant("gemm", "gemm", lowp_products=True),
    Variant("fused", "fused", delta_from_o=True, lowp_products=True),
    Variant("fused-mma_sync", "fused", lambda: _mma("mma_sync"), delta_from_o=True,
            lowp_products=True),
    Variant("fused-wgmma", "fused", lambda: _mma("wgmma"), delta_from_o=True, lowp_products=True),
    # The two-kernel backward schedule on Hopper too, and d-rpb from the fixed-order path.
    Variant("fused-deterministic", "fused",
            lambda: jax_natten.fused_config(deterministic=True), delta_from_o=True,
            lowp_products=True),
]
VARIANT_PARAMS = [v.param() for v in VARIANTS]


# ----------------------------------------------------------------------------- one problem

@dataclasses.dataclass(frozen=True)
class Config:
    spatial: tuple
    kernel: tuple
    stride: tuple
    dilation: tuple
    causal: tuple
    heads: int = 1
    kv_heads: int = 1
    dim: int = 16
    value_dim: int = 16
    rpb: bool = False
    additional: int = 0
    batch: int = 1
    mode: str = "plain"  # "plain", "onehot" (large scale) or "offset" (huge logits, exact)
    dtype: str = "f32"
    scale: float = None  # None: drawn per mode

    @property
    def rank(self):
        return len(self.spatial)

    def kwargs(self):
        return dict(kernel_size=self.kernel, stride=self.stride, dilation=self.dilation,
                    is_causal=self.causal)

    def oracle_args(self):
        return self.kernel, self.stride, self.dilation, self.causal


def make_problem(cfg: Config, rng):
    """Inputs, scale and cotangents for `cfg` (fresh values from `rng`, never zeros).

    "offset": every logit is the same huge number (2^12 .. 2^14: q and k hold a constant in
    their first component) plus a small integer, rpb on a 1/8 grid and the scale a power of two,
    so that float32 represents every logit exactly and any error comes from forming the softmax
    (float32 lse at 16384 is off by up to 1e-3: exp(s - lse) would miss the bound)."""
    dtype = DTYPES[cfg.dtype]
    B, H, KVH, D, Dv, S = (cfg.batch, cfg.heads, cfg.kv_heads, cfg.dim, cfg.value_dim,
                           cfg.additional)
    shapes = dict(query=(B, *cfg.spatial, H, D), key=(B, *cfg.spatial, KVH, D),
                  value=(B, *cfg.spatial, KVH, Dv))
    if S:
        shapes.update(additional_keys=(B, S, KVH, D), additional_values=(B, S, KVH, Dv))
    x = {}
    if cfg.mode == "offset":
        big = 2.0 ** rng.integers(6, 8)  # q0 * k0 = 2^12 .. 2^14
        for name, shape in shapes.items():
            if name in ("value", "additional_values"):
                x[name] = rng.standard_normal(shape)
            else:
                a = rng.integers(-2, 3, shape).astype(np.float64)
                a[..., 0] = big
                x[name] = a
        scale = cfg.scale or 2.0 ** -int(rng.integers(1, 3))
    else:
        gain = 2.0 if cfg.mode == "onehot" else 1.0
        for name, shape in shapes.items():
            x[name] = rng.standard_normal(shape) * (gain if "value" not in name else 1.0)
        # "onehot": logits with a standard deviation of 8..24 (gaps of tens between a row's
        # largest logit and the next).
        scale = cfg.scale or (float(rng.uniform(8, 24)) / (gain ** 2 * D ** 0.5)
                              if cfg.mode == "onehot" else float(rng.uniform(0.2, 0.6)))
    x = {n: jnp.asarray(a, dtype) for n, a in x.items()}
    if cfg.rpb:
        r = rng.standard_normal((H,) + tuple(2 * k - 1 for k in cfg.kernel))
        if cfg.mode == "offset":
            r = np.round(r * 8) / 8
        x["rpb"] = jnp.asarray(r, F32)
    out_shape = (B, *cfg.spatial, H, Dv)
    cot = dict(out=jnp.asarray(rng.standard_normal(out_shape), F32))
    if cfg.mode != "onehot":
        # A loss on lse too. Not near one-hot: P * dlse adds a large, exact part to dS that
        # would hide the cancellation of dP - sum(P * dP) there. In "offset" mode it is needed:
        # without it sum_i dS_i = 0, so dq along the keys' shared huge component is exactly 0,
        # and a backend that rounds dS to float16 / bfloat16 before the dS.K product (the
        # unfused and fused tensor-core paths) leaves eps(dtype) |dS| |k_shared| of noise there,
        # up to 5e-2 relative in bfloat16: a property of low-precision dS, not of the softmax.
        cot["lse"] = jnp.asarray(rng.standard_normal(out_shape[:-1]), F32)
    return x, scale, cot


def run_variant(variant, cfg, x, scale, cot):
    """(out, lse, grads of sum(out * cot.out) (+ sum(lse * cot.lse))) on `variant`."""
    na = getattr(jax_natten, f"na{cfg.rank}d")

    def fn(x, c):
        def loss(x):
            out, lse = na(**x, **cfg.kwargs(), scale=scale, return_lse=True,
                          backend=variant.backend)
            total = jnp.sum(out.astype(F32) * c["out"])
            return total + (jnp.sum(lse * c["lse"]) if "lse" in c else 0.0), (out, lse)
        (_, (out, lse)), g = jax.value_and_grad(loss, has_aux=True)(x)
        return out, lse, g

    with variant.context():
        return on_backend(variant.backend, fn, x, cot)


def oracle_results(cfg, x, scale, cot, stored=None, delta_error=None):
    kw = dict(scale=scale, rpb=x.get("rpb"), add_k=x.get("additional_keys"),
              add_v=x.get("additional_values"))
    out, lse = oracle.attention(x["query"], x["key"], x["value"], *cfg.oracle_args(), **kw)
    dlse = cot["lse"] if "lse" in cot else np.zeros(np.shape(lse))
    # The op's output has the inputs' dtype, so its cotangent arrives rounded to that dtype.
    dout = jnp.asarray(cot["out"], DTYPES[cfg.dtype])
    grads = oracle.attention_vjp(x["query"], x["key"], x["value"], *cfg.oracle_args(), dout,
                                 dlse, stored=stored, delta_error=delta_error, **kw)
    return out, lse, grads


def _subnormal_rounding(dtype):
    """Rounds the entries below dtype's smallest normal number to dtype (the rest unchanged)."""
    tiny = float(jnp.finfo(dtype).tiny)
    return lambda a: np.where(np.abs(a) < tiny, np.asarray(jnp.asarray(a, dtype), np.float64), a)


def underflow(ref, model, dtype):
    """What the dtype's range (and a fused kernel's float32 delta, when `model` includes it)
    costs, as a relative error no such backend can avoid: the gradient
    `model` computed with P and dS rounded to `dtype` below its smallest normal number (6e-5 in
    float16, 1e-38 in bfloat16 and float32; the tensor-core paths multiply P and dS in the
    inputs' dtype), then rounded to `dtype` itself below that number. Near one-hot rows have
    softmax gradients of 1e-9 and less, which float16 holds only in part or not at all (and
    float32 neither once logits differ by more than ~87); where the whole tensor consists of
    such rows, a plain relative bound would ask for digits the dtype does not have."""
    ref = np.asarray(ref, np.float64)
    model = _subnormal_rounding(dtype)(np.asarray(model, np.float64))
    return rel_err(model, ref)


# Float32 roundings a delta formed from o carries (the sums over D_v and over the window), and
# the dP it is subtracted from (a float32 dot product of its own): each is bounded by ulps of
# the sum of its terms' magnitudes, sum_j P_j sum_d |do_d| |v_jd|, not of the sum's value, which
# cancels (e.g. a causal first query: P = 1 on one key, so dS = dP - delta is rounding alone).
DELTA_ULPS = 8


def _delta_rounding(p, dp_abs):
    return DELTA_ULPS * np.finfo(np.float32).eps * (p * dp_abs).sum(-1, keepdims=True)


def errors(variant, cfg, x, scale, cot):
    """{"out", "lse", "d<name>"...: (relative error, its bound)} of `variant` against the
    oracle. Bounds: the dtype's, twice that for gradients, plus what the dtype's range costs
    (`underflow`), plus for the fused kernels (and every backend in float32) what a float32
    delta costs near one-hot rows, plus for the paths that multiply P and dS in float16 /
    bfloat16 (`lowp_products`) what rounding them costs: the model then rounds every P and dS to
    the dtype, not only the subnormal ones. That term is ~eps(dtype) relative, except where a
    gradient's dS terms cancel."""
    out, lse, g = run_variant(variant, cfg, x, scale, cot)
    dtype = DTYPES[cfg.dtype]
    ref_out, ref_lse, ref_g = oracle_results(cfg, x, scale, cot)
    stored = _subnormal_rounding(dtype)
    if variant.lowp_products and dtype != F32:
        stored = lambda a: np.asarray(jnp.asarray(a, dtype), np.float64)  # every P and dS
    # The float32 rounding of delta and dP: the fused kernels' delta from a float32 o, and in
    # float32 every backend's, whose dP (and delta) are float32 dot products. Where a row is near
    # one-hot, dP - delta cancels and a gradient that sums dS over queries (d-rpb above all) can
    # be far smaller than its terms: that rounding then bounds its relative error (seen on the
    # host kernels: d-rpb 6.7e-5 against 2e-5 on the 1-D k=2 dilation-3 sweep configuration,
    # where the model allows 2.8e-2).
    f32_delta = variant.delta_from_o or dtype == F32
    _, _, model_g = oracle_results(cfg, x, scale, cot, stored=stored,
                                   delta_error=_delta_rounding if f32_delta else None)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and lse.dtype == F32
    errs = {"out": (rel_err(out, ref_out), tol + underflow(ref_out, ref_out, dtype)),
            "lse": (rel_err(lse, ref_lse), tol)}
    assert set(g) == set(ref_g), (set(g), set(ref_g))
    for name in ref_g:
        errs["d" + name] = (rel_err(g[name], ref_g[name]),
                            2 * tol + underflow(ref_g[name], model_g[name], g[name].dtype))
    return errs


def check(errs, what):
    bad = {k: f"{e:.2e} (bound {b:.2e})" for k, (e, b) in errs.items() if not e < b}
    assert not bad, f"{what}: relative errors over the bound: {bad}"


# ----------------------------------------------------------------------------- reproducers

@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_huge_equal_logits_weights_sum_to_one(variant):
    """q = k = 1e4 in bfloat16 (logits 4e8, all equal), v = 1: every output is 1, and d(sum out)
    / dv sums to the number of outputs (it was 5x: exp(s - lse) with lse rounded in float32)."""
    require(variant.backend)
    q = jnp.full((1, 12, 1, 16), 1e4, jnp.bfloat16)
    v = jnp.ones_like(q)
    f = lambda q, v: jax_natten.na1d(q, q, v, 5, backend=variant.backend)
    with variant.context():
        out = on_backend(variant.backend, f, q, v)
        dv = on_backend(variant.backend, jax.grad(lambda q, v: jnp.sum(f(q, v).astype(F32)),
                                                  argnums=1), q, v)
    tol = TOLERANCE[jnp.bfloat16]
    assert rel_err(out, np.ones(out.shape)) < tol, np.asarray(out, np.float64).ravel()[:5]
    total = float(jnp.sum(dv.astype(F32)))
    assert abs(total - out.size) < 2 * tol * out.size, (total, out.size)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_huge_equal_logits_match_oracle(variant, dtype):
    """All logits equal and huge (q = k = c ~ 1e3..8e3: logits up to 2.7e8), fresh random
    values: out is the window mean of v; lse and every gradient against the oracle. c = m 2^e
    with m < 128, so that c is exact in bfloat16 and every logit exact in float32 (else the
    logits themselves differ by float32 rounding, several units at this size)."""
    require(variant.backend)
    rng, seed = fresh_rng()
    cfg = Config((12,), (5,), (1,), (1,), (False,), heads=2, kv_heads=1, dtype=dtype,
                 additional=2)
    x, scale, cot = make_problem(cfg, rng)
    c = float(rng.integers(65, 128)) * 2.0 ** int(rng.integers(4, 7))
    for name in ("query", "key", "additional_keys"):
        x[name] = jnp.full(x[name].shape, c, x[name].dtype)
    check(errors(variant, cfg, x, 0.25, cot), f"{variant.name} c={c:.0f} (seed {seed})")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_near_one_hot_gradients(variant, dtype):
    """The worst case random testing found: 1-D, L=7, k=2, dilation 3, causal, scale 1.3, logits
    of tens: delta = rowsum(do * o) from the rounded o gave float16 dq errors of 0.85."""
    require(variant.backend)
    rng, seed = fresh_rng()
    cfg = Config((7,), (2,), (1,), (3,), (True,), heads=2, kv_heads=2, batch=4, dtype=dtype,
                 mode="onehot", scale=1.3)
    x, scale, cot = make_problem(cfg, rng)
    check(errors(variant, cfg, x, scale, cot), f"{variant.name} (seed {seed})")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_nearly_equal_values_gradients(variant, dtype):
    """Values within 1% of each other (v = 1 + 0.01 noise): dP = do.v is nearly the same for
    every key, so dS = P (dP - delta) is a small difference, and delta = rowsum(do * o) must come
    from an o whose weights sum to 1. The tensor-core forwards multiply P rounded to the inputs'
    dtype into o; while l summed the unrounded weights, o's weights summed to 1 +- eps(dtype) and
    bfloat16 dq / dk were 2-6x over their bound (found by the random sweep: near one-hot rows
    whose two largest weights had nearly equal dP)."""
    require(variant.backend)
    rng, seed = fresh_rng()
    cfg = Config((9,), (5,), (1,), (1,), (False,), heads=2, kv_heads=2, batch=4, dtype=dtype)
    x, scale, cot = make_problem(cfg, rng)
    # No loss on lse: P * dlse would add a large exact part to dS (see make_problem).
    del cot["lse"]
    x["value"] = jnp.asarray(1.0 + 0.01 * rng.standard_normal(x["value"].shape), DTYPES[dtype])
    check(errors(variant, cfg, x, scale, cot), f"{variant.name} (seed {seed})")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_huge_logits_across_key_tiles(variant, dtype):
    """Logits of 2^10..2^12 that rise or fall (the sign of q's second component) along windows
    of 129 keys, so that the fused kernels' online softmax meets a new row maximum in every
    64-key tile (or only in the first) and rescales what it has summed. float32 holds every
    logit exactly ("offset" mode), so only the softmax's own arithmetic can miss the bound."""
    require(variant.backend)
    rng, seed = fresh_rng()
    cfg = Config((200,), (129,), (1,), (1,), (False,), heads=2, kv_heads=1, dtype=dtype,
                 mode="offset", scale=0.25)
    x, scale, cot = make_problem(cfg, rng)
    key = np.asarray(x["key"], np.float64)
    key[..., 1] = (np.arange(200) // 8)[None, :, None]  # a new maximum every 8 keys
    x["key"] = jnp.asarray(key, DTYPES[dtype])
    check(errors(variant, cfg, x, scale, cot), f"{variant.name} (seed {seed})")


ZERO_SIZE = {
    "batch0": dict(q=(0, 12, 2, 8), kv=(0, 12, 2, 8)),
    "lead0": dict(q=(3, 0, 12, 2, 8), kv=(3, 0, 12, 2, 8)),
    "heads0": dict(q=(2, 12, 0, 8), kv=(2, 12, 1, 8)),
    "dim0": dict(q=(2, 12, 2, 0), kv=(2, 12, 2, 0), dv=8),
    "value_dim0": dict(q=(2, 12, 2, 8), kv=(2, 12, 2, 8), dv=0),
    "additional0": dict(q=(2, 12, 2, 8), kv=(2, 12, 2, 8), add=0),
}


@pytest.mark.parametrize("case", list(ZERO_SIZE))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_zero_size(variant, case):
    """Zero-size dims give outputs and gradients of the right (possibly empty) shapes, equal to
    the oracle's where they are not empty (dim 0: uniform weights; value_dim 0: lse and its
    gradients)."""
    require(variant.backend)
    rng, seed = fresh_rng()
    spec = ZERO_SIZE[case]
    dtype = jnp.float16 if variant.backend == "fused" else F32
    draw = lambda shape: jnp.asarray(rng.standard_normal(shape), dtype)
    q = draw(spec["q"])
    kv = spec["kv"]
    x = dict(query=q, key=draw(kv), value=draw(kv[:-1] + (spec.get("dv", kv[-1]),)))
    if "add" in spec:
        x["additional_keys"] = draw(kv[:-3] + (spec["add"],) + kv[-2:])
        x["additional_values"] = draw(kv[:-3] + (spec["add"],) + kv[-2:])
    if variant.backend in ("gemm", "fused") and case in ("dim0", "value_dim0"):
        # Their tensor-core tiles take head dims 8, 16, ...: a ValueError up front.
        with pytest.raises(ValueError, match="multiples of 8"):
            jax_natten.na1d(**x, kernel_size=5, backend=variant.backend)
        return
    lead = q.shape[:-3]
    out_shape = q.shape[:-1] + x["value"].shape[-1:]
    cot = dict(out=jnp.asarray(rng.standard_normal(out_shape), F32),
               lse=jnp.asarray(rng.standard_normal(out_shape[:-1]), F32))

    def fn(x, c):
        def loss(x):
            out, lse = jax_natten.na1d(**x, kernel_size=5, return_lse=True,
                                       backend=variant.backend)
            return jnp.sum(out.astype(F32) * c["out"]) + jnp.sum(lse * c["lse"]), (out, lse)
        (_, (out, lse)), g = jax.value_and_grad(loss, has_aux=True)(x)
        return out, lse, g

    with variant.context():
        out, lse, g = on_backend(variant.backend, fn, x, cot)
    assert out.shape == out_shape and lse.shape == out_shape[:-1]
    assert {n: a.shape for n, a in g.items()} == {n: a.shape for n, a in x.items()}
    # The oracle sees the leading dims folded into the batch.
    fold = lambda a: np.asarray(a, np.float64).reshape((math.prod(lead),) + a.shape[len(lead):])
    xf = {n: fold(a) for n, a in x.items()}
    kw = dict(scale=1.0 if q.shape[-1] == 0 else None, add_k=xf.get("additional_keys"),
              add_v=xf.get("additional_values"))
    args = (xf["query"], xf["key"], xf["value"], (5,), (1,), (1,), (False,))
    ref_out, ref_lse = oracle.attention(*args, **kw)
    ref_g = oracle.attention_vjp(*args, fold(cot["out"]), fold(cot["lse"]), **kw)
    tol = TOLERANCE[dtype]
    assert rel_err(fold(out), ref_out) < tol, f"out (seed {seed})"
    assert rel_err(fold(lse), ref_lse) < tol, f"lse (seed {seed})"
    for name in ref_g:
        assert rel_err(fold(g[name]), ref_g[name]) < 2 * tol, f"d{name} (seed {seed})"


# ----------------------------------------------------------------------------- the sweep

def sweep_configs(count: int, seed: int = 15):
    """`count` small configurations from a fixed seed: the same set on every run."""
    rng = np.random.default_rng(seed)
    modes, dtypes = ("plain", "onehot", "offset"), list(DTYPES)
    configs = []
    for _ in range(count):
        rank = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        kernel, stride, dilation, causal, spatial = [], [], [], [], []
        for _ in range(rank):
            k = int(rng.integers(2, 6 if rank < 3 else 4))
            d = int(rng.choice([1, 1, 2, 3])) if rank < 3 else int(rng.choice([1, 2]))
            kernel.append(k)
            dilation.append(d)
            stride.append(1 if rng.random() < 0.5 else int(rng.integers(1, k + 1)))
            causal.append(bool(rng.random() < 0.25))
            spatial.append(k * d + int(rng.integers(0, 7 if rank < 3 else 3)))
        kv_heads = int(rng.choice([1, 2]))
        groups = int(rng.choice([1, 2]))
        dim = int(rng.choice([8, 16, 32])) if rank == 1 else int(rng.choice([8, 16]))
        rpb_ok = not any(causal) and all(s == 1 for s in stride)
        configs.append(Config(
            tuple(spatial), tuple(kernel), tuple(stride), tuple(dilation), tuple(causal),
            heads=kv_heads * groups, kv_heads=kv_heads, dim=dim,
            value_dim=int(rng.choice([dim, 8, 16])),
            rpb=bool(rpb_ok and rng.random() < 0.5),
            additional=int(rng.integers(1, 4)) if rng.random() < 0.3 else 0,
            batch=int(rng.integers(1, 3)), mode=str(rng.choice(modes)),
            dtype=str(rng.choice(dtypes))))
    return configs


SWEEP = sweep_configs(int(os.environ.get("JAX_NATTEN_SWEEP", "240")))


def _report(variant, worst):
    path = os.environ.get("JAX_NATTEN_SWEEP_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"variant": variant.name,
                                "configs": len(SWEEP[::variant.sweep_every]),
                                "worst": worst}) + "\n")


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_random_sweep(variant):
    """The sweep configurations on `variant`: out, lse and all gradients within the bounds."""
    require(variant.backend)
    rng, seed = fresh_rng()
    worst, failures = {}, []
    for i, cfg in enumerate(SWEEP):
        if i % variant.sweep_every:
            continue
        x, scale, cot = make_problem(cfg, rng)
        for key, (e, bound) in errors(variant, cfg, x, scale, cot).items():
            kind = f"{cfg.dtype} {'fwd' if key in ('out', 'lse') else 'grad'}"
            if e > worst.get(kind, (0.0,))[0]:
                worst[kind] = (e, i, key, bound)
            if not e < bound:
                failures.append(f"config {i} {cfg}: {key} {e:.2e} (bound {bound:.2e})")
    _report(variant, worst)
    assert not failures, (f"{len(failures)} over the bound (inputs seed {seed}):\n"
                          + "\n".join(failures[:20]))


def test_sweep_covers_the_edges():
    """The sweep holds what it claims (so that a generator change cannot quietly drop a kind)."""
    has = lambda pred: sum(1 for c in SWEEP if pred(c))
    assert len(SWEEP) >= 100
    assert has(lambda c: any(k % 2 == 0 for k in c.kernel)) > 20
    assert has(lambda c: any(d > 1 for d in c.dilation)) > 20
    assert has(lambda c: any(c.causal)) > 20
    assert has(lambda c: any(s > 1 for s in c.stride)) > 20
    assert has(lambda c: c.heads > c.kv_heads) > 20
    assert has(lambda c: c.rpb) > 10
    assert has(lambda c: c.additional) > 20
    assert has(lambda c: c.rank == 3) > 5
    for mode in ("plain", "onehot", "offset"):
        for dtype in DTYPES:
            assert has(lambda c: c.mode == mode and c.dtype == dtype) > 5


def test_oracle_gradients_match_float64_autodiff():
    """The sweep's gradient oracle (oracle.attention_vjp) against autodiff of the float64
    reference backend, on a problem with every input kind (GQA, rpb, additional kv, dlse)."""
    rng, seed = fresh_rng()
    cfg = Config((9, 8), (4, 3), (1, 1), (2, 1), (False, False), heads=4, kv_heads=2, dim=8,
                 value_dim=16, rpb=True, additional=2, batch=2)
    x, scale, cot = make_problem(cfg, rng)
    ref = oracle.attention_vjp(x["query"], x["key"], x["value"], *cfg.oracle_args(), cot["out"],
                               cot["lse"], scale=scale, rpb=x["rpb"],
                               add_k=x["additional_keys"], add_v=x["additional_values"])
    with jax.enable_x64(True):
        x64 = {n: jnp.asarray(np.asarray(a, np.float64)) for n, a in x.items()}
        c64 = {n: jnp.asarray(np.asarray(a, np.float64)) for n, a in cot.items()}

        def loss(x):
            out, lse = jax_natten.na2d(**x, **cfg.kwargs(), scale=scale, return_lse=True,
                                       backend="reference")
            return jnp.sum(out * c64["out"]) + jnp.sum(lse * c64["lse"])
        g = jax.jit(jax.grad(loss))(x64)
    for name in ref:
        assert rel_err(g[name], ref[name]) < 1e-12, f"d{name} (seed {seed})"
