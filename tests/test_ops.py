"""Every op and backend against the float64 oracle: forward values, LSE, and gradients."""
import math

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import oracle
from cases import (CASES, CASE_IDS, TOLERANCE, backend_params, fresh_rng, make_inputs, na_fn,
                   on_backend, refusal, rel_err, require)
import jax_natten
from jax_natten.backends import reference

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]


def _oracle_attention(case, x, scale):
    return oracle.attention(x["query"], x["key"], x["value"], *case.oracle_args(), scale=scale,
                            rpb=x.get("rpb"), add_k=x.get("additional_keys"),
                            add_v=x.get("additional_values"))


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _reference_grad(loss, x, cotangents):
    """Gradients of `loss(x, cotangents, backend="reference")` in float64."""
    with jax.enable_x64(True):
        g = jax.jit(jax.grad(lambda x, c: loss(x, c, "reference")))(_f64(x), _f64(cotangents))
        return jax.tree.map(np.asarray, g)


def _check_grads(g, ref, tol, seed):
    assert set(g) == set(ref)
    for name in ref:
        err = rel_err(g[name], ref[name])
        assert err < 2 * tol, f"d{name}: relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", backend_params())
def test_attention_forward(backend, case, dtype):
    require(backend)
    rng, seed = fresh_rng()
    x = make_inputs(case, dtype, rng)
    # Either sign (the kernels fold a negative scale's sign into the scores), drawn per test.
    scale = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.6))
    f = lambda x: na_fn(case.rank)(**x, **case.kwargs(), scale=scale, return_lse=True,
                                   backend=backend)
    refused = refusal(backend, dtype, (case.dim, case.value_dim or case.dim))
    if refused:
        with pytest.raises(ValueError, match=refused):
            f(x)
        return
    out, lse = on_backend(backend, f, x)
    ref_out, ref_lse = _oracle_attention(case, x, scale)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert rel_err(out, ref_out) < TOLERANCE[dtype], f"out (seed {seed})"
    assert rel_err(lse, ref_lse) < TOLERANCE[dtype], f"lse (seed {seed})"


def _attention_loss(case):
    def loss(x, c, backend):
        out, lse = na_fn(case.rank)(**x, **case.kwargs(), return_lse=True, backend=backend)
        return (jnp.sum(out.astype(c["out"].dtype) * c["out"]) + jnp.sum(lse * c["lse"]))
    return loss


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", backend_params())
def test_attention_grad(backend, case, dtype):
    require(backend)
    rng, seed = fresh_rng()
    x = make_inputs(case, dtype, rng)
    out_shape = x["query"].shape[:-1] + x["value"].shape[-1:]
    c = dict(out=jnp.asarray(rng.standard_normal(out_shape), jnp.float32),
             lse=jnp.asarray(rng.standard_normal(out_shape[:-1]), jnp.float32))
    loss = _attention_loss(case)
    if refusal(backend, dtype, (case.dim, case.value_dim or case.dim)):
        return  # the forward test checks the refusal
    g = on_backend(backend, jax.grad(lambda x, c: loss(x, c, backend)), x, c)
    _check_grads(g, _reference_grad(loss, x, c), TOLERANCE[dtype], seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", [b for b in backend_params() if getattr(b, "values", [b])[0] != "fused"])
def test_qk_av(backend, case, dtype):
    """The unfused ops, forward and backward."""
    require(backend)
    rng, seed = fresh_rng()
    x = make_inputs(case, dtype, rng)
    kw = case.kwargs()
    if refusal(backend, dtype, (case.value_dim or case.dim,)):
        w = jnp.asarray(rng.standard_normal(x["query"].shape[:-1] + (math.prod(case.kernel),)),
                        dtype)
        with pytest.raises(ValueError, match="multiples of 8"):
            na_fn(case.rank, "_av")(w, x["value"], **kw, backend=backend)
        return
    qk_args = dict(query=x["query"], key=x["key"], rpb=x.get("rpb"),
                   additional_keys=x.get("additional_keys"))
    w = on_backend(backend, lambda a: na_fn(case.rank, "_qk")(**a, **kw, backend=backend), qk_args)
    ref_w = oracle.qk(x["query"], x["key"], *case.oracle_args(), rpb=x.get("rpb"),
                      add_k=x.get("additional_keys"))
    assert w.dtype == dtype
    assert rel_err(w, ref_w) < TOLERANCE[dtype], f"qk (seed {seed})"

    weights = jnp.asarray(rng.standard_normal(w.shape), dtype)
    av_args = dict(weights=weights, value=x["value"],
                   additional_values=x.get("additional_values"))
    o = on_backend(backend, lambda a: na_fn(case.rank, "_av")(**a, **kw, backend=backend), av_args)
    ref_o = oracle.av(weights, x["value"], *case.oracle_args(), add_v=x.get("additional_values"))
    assert rel_err(o, ref_o) < TOLERANCE[dtype], f"av (seed {seed})"

    # Gradients of both ops; finite cotangents only where the logits are finite.
    c = dict(w=jnp.asarray(rng.standard_normal(w.shape), jnp.float32),
             o=jnp.asarray(rng.standard_normal(o.shape), jnp.float32))

    def loss(a, c, backend):
        w = na_fn(case.rank, "_qk")(a["query"], a["key"], **kw, rpb=a.get("rpb"),
                                    additional_keys=a.get("additional_keys"), backend=backend)
        o = na_fn(case.rank, "_av")(a["weights"], a["value"], **kw,
                                    additional_values=a.get("additional_values"), backend=backend)
        w = jnp.where(jnp.isfinite(w), w, 0).astype(c["w"].dtype)
        return jnp.sum(w * c["w"]) + jnp.sum(o.astype(c["o"].dtype) * c["o"])

    args = {**{k: v for k, v in qk_args.items() if v is not None},
            **{k: v for k, v in av_args.items() if v is not None}}
    g = on_backend(backend, jax.grad(lambda a, c: loss(a, c, backend)), args, c)
    _check_grads(g, _reference_grad(loss, args, c), TOLERANCE[dtype], seed)


def test_reference_chunking_matches(monkeypatch):
    """The reference walks large problems in query chunks; chunked == unchunked."""
    case = CASES[5]
    rng, seed = fresh_rng()
    x = make_inputs(case, jnp.float32, rng)
    f = lambda x: na_fn(case.rank)(**x, **case.kwargs(), return_lse=True, backend="reference")
    whole = jax.jit(f)(x)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1000)
    chunked = jax.jit(f)(x)
    for a, b in zip(whole, chunked):
        assert rel_err(a, b) < 1e-6, f"seed {seed}"


def test_merge_attentions():
    """Attention over window + additional keys == merge of the two parts by LSE."""
    case = CASES[1]
    rng, seed = fresh_rng()
    x = make_inputs(case, jnp.float32, rng)
    S = 5
    ak = jnp.asarray(rng.standard_normal((case.batch, S, case.kv_heads, case.dim)), jnp.float32)
    avv = jnp.asarray(rng.standard_normal((case.batch, S, case.kv_heads, case.dim)), jnp.float32)
    na = na_fn(case.rank)
    full = na(**x, **case.kwargs(), additional_keys=ak, additional_values=avv, return_lse=True)
    part = na(**x, **case.kwargs(), return_lse=True)
    # Dense attention over the additional tokens alone (full precision: no TF32 on GPUs).
    groups = case.heads // case.kv_heads
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("bnhd,bshd->bnhs", x["query"] * case.dim ** -0.5,
                        jnp.repeat(ak, groups, axis=2), precision=hi)
    lse2 = jax.nn.logsumexp(logits, -1)
    out2 = jnp.einsum("bnhs,bshd->bnhd", jax.nn.softmax(logits, -1), jnp.repeat(avv, groups, 2),
                      precision=hi)
    out, lse = jax.jit(jax_natten.merge_attentions)([part[0], out2], [part[1], lse2])
    assert rel_err(out, full[0]) < 1e-5 and rel_err(lse, full[1]) < 1e-5, f"seed {seed}"
