"""Flax NNX and Linen neighborhood-attention modules (README, "Flax modules")."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_natten
from jax_natten import linen as natten_linen
from jax_natten import nnx as natten_nnx

HEADS, FEATURES = 2, 16

# (rank, layer options, input shape): odd spatial sizes; dilation, per-axis tuples, causal, stride.
CASES = {
    "1d-dilated": (1, dict(kernel_size=5, dilation=2), (2, 13)),
    "1d-causal": (1, dict(kernel_size=4, is_causal=True), (2, 11)),
    "2d-tuple": (2, dict(kernel_size=(3, 5), dilation=(2, 1)), (2, 7, 9)),
    "2d-stride": (2, dict(kernel_size=3, stride=(2, 1)), (2, 7, 9)),
    "3d": (3, dict(kernel_size=3), (1, 5, 7, 3)),
    "3d-causal": (3, dict(kernel_size=(2, 3, 3), is_causal=(True, False, False)), (1, 3, 5, 7)),
}
RPB_OK = [name for name, (_, kw, _) in CASES.items() if not {"stride", "is_causal"} & set(kw)]
# (case, rel_pos_bias) pairs: every case without rpb, and the rpb-capable ones with it.
CONFIGS = [(name, False) for name in CASES] + [(name, True) for name in RPB_OK]
CONFIG_IDS = [f"{name}-{'rpb' if rpb else 'norpb'}" for name, rpb in CONFIGS]


def na_fn(rank):
    return getattr(jax_natten, f"na{rank}d")


def make_input(shape, seed):
    return jax.random.normal(jax.random.key(seed), (*shape, FEATURES), jnp.float32)


def nnx_layer(rank, seed=0, **kw):
    cls = getattr(natten_nnx, f"NeighborhoodAttention{rank}D")
    return cls(HEADS, FEATURES, rngs=nnx.Rngs(seed), **kw)


def linen_layer(rank, **kw):
    return getattr(natten_linen, f"NeighborhoodAttention{rank}D")(num_heads=HEADS, **kw)


def nnx_params(model):
    """The NNX parameters as a Linen-style nested dict: {'qkv': {...}, 'proj': {...}, 'rpb'?}."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """float32 products at full precision on every platform: on GPUs JAX's default lets XLA use
    TF32 (~1e-3), which the 1e-5 comparisons with the hand computation would read as errors."""
    with jax.default_matmul_precision("highest"):
        yield


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def hand_computation(params, x, rank, kw):
    """qkv Dense -> jax_natten.na{rank}d(backend="reference") -> proj Dense."""
    qkv = x @ params["qkv"]["kernel"]
    if "bias" in params["qkv"]:
        qkv = qkv + params["qkv"]["bias"]
    qkv = qkv.reshape(*x.shape[:-1], 3, HEADS, FEATURES // HEADS)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    opts = {n: kw[n] for n in ("stride", "dilation", "is_causal", "scale") if n in kw}
    out = na_fn(rank)(q, k, v, kw["kernel_size"], rpb=params.get("rpb"), backend="reference",
                      **opts)
    out = out.reshape(x.shape) @ params["proj"]["kernel"]
    return out + params["proj"]["bias"] if "bias" in params["proj"] else out


def init_linen(layer, x, seed=0):
    return jax.jit(layer.init)(jax.random.key(seed), x)


def hand(params, x, rank, kw):
    """`hand_computation`, compiled (eager reference ops compile op by op: slow on 2 cores)."""
    return jax.jit(lambda p, x: hand_computation(p, x, rank, kw))(params, x)


@functools.partial(nnx.jit, static_argnames="deterministic")
def call(model, x, deterministic=None, rngs=None):
    """`model(x, ...)` under nnx.jit."""
    return model(x, deterministic=deterministic, rngs=rngs)


@pytest.mark.parametrize("case,rpb", CONFIGS, ids=CONFIG_IDS)
def test_forward_matches_hand_computation(case, rpb):
    """NNX (jit) == qkv Dense -> reference na{rank}d -> proj Dense == Linen with the same params."""
    rank, kw, shape = CASES[case]
    model = nnx_layer(rank, rel_pos_bias=rpb, **kw)
    x = make_input(shape, 1)
    y = call(model, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    params = nnx_params(model)
    assert ("rpb" in params) == rpb
    if rpb:
        kernel = np.broadcast_to(kw["kernel_size"], (rank,))
        assert params["rpb"].shape == (HEADS, *(2 * k - 1 for k in kernel))
    assert rel_err(y, hand(params, x, rank, kw)) < 1e-5
    # Linen: same parameter names/shapes, same output for the same values
    layer = linen_layer(rank, rel_pos_bias=rpb, **kw)
    linen_params = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, linen_params)
    y_linen = jax.jit(layer.apply)({"params": params}, x)
    assert y_linen.shape == x.shape and y_linen.dtype == jnp.float32
    assert rel_err(y_linen, y) < 1e-6


def test_linen_init():
    rank, kw, shape = CASES["3d"]
    layer = linen_layer(rank, rel_pos_bias=True, **kw)
    x = make_input(shape, 2)
    params = init_linen(layer, x)["params"]
    assert sorted(params) == ["proj", "qkv", "rpb"]
    assert params["qkv"]["kernel"].shape == (FEATURES, 3 * FEATURES)
    assert params["rpb"].shape == (HEADS, 5, 5, 5)
    assert 0 < float(jnp.std(params["rpb"])) < 0.03  # truncated normal, std 0.02
    assert rel_err(jax.jit(layer.apply)({"params": params}, x), hand(params, x, rank, kw)) < 1e-5


def test_eager_matches_jit():
    """Everything else runs compiled (fast on 2 cores); the modules also run eagerly."""
    rank, kw, shape = CASES["2d-tuple"]
    model = nnx_layer(rank, rel_pos_bias=True, **kw)
    layer = linen_layer(rank, rel_pos_bias=True, **kw)
    x = make_input(shape, 3)
    y = model(x)
    assert rel_err(y, call(model, x)) < 1e-6
    assert rel_err(layer.apply({"params": nnx_params(model)}, x), y) < 1e-6


def _check_grads(grads, rpb):
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    names = {jax.tree_util.keystr(path) for path, _ in leaves}
    assert any("rpb" in n for n in names) == rpb
    assert len(leaves) == 4 + rpb  # qkv kernel/bias, proj kernel/bias, rpb
    for path, g in leaves:
        g = np.asarray(g)
        assert np.isfinite(g).all(), jax.tree_util.keystr(path)
        assert np.abs(g).max() > 0, jax.tree_util.keystr(path)


GRAD_CONFIGS = [("1d-causal", False), ("2d-tuple", True), ("2d-stride", False), ("3d", True)]


@pytest.mark.parametrize("case,rpb", GRAD_CONFIGS)
def test_nnx_grads(case, rpb):
    rank, kw, shape = CASES[case]
    model = nnx_layer(rank, rel_pos_bias=rpb, **kw)
    x = make_input(shape, 5)
    w = make_input(shape, 6)

    @nnx.jit
    def grads(model, x):
        return nnx.grad(lambda m: jnp.sum(m(x) * w))(model)

    _check_grads(grads(model, x), rpb)


@pytest.mark.parametrize("case,rpb", GRAD_CONFIGS)
def test_linen_grads(case, rpb):
    rank, kw, shape = CASES[case]
    layer = linen_layer(rank, rel_pos_bias=rpb, **kw)
    x = make_input(shape, 7)
    w = make_input(shape, 8)
    params = init_linen(layer, x)["params"]
    g = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) * w)))(params)
    _check_grads(g, rpb)


def test_extra_batch_dims_fold():
    model = nnx_layer(2, kernel_size=3)
    x = jax.random.normal(jax.random.key(9), (2, 3, 5, 7, FEATURES))
    y = call(model, x)
    assert y.shape == x.shape
    assert rel_err(y[1], call(model, x[1])) < 1e-6


def test_no_qkv_bias_and_scale():
    kw = dict(kernel_size=3, scale=0.3)
    model = nnx_layer(2, use_qkv_bias=False, **kw)
    params = nnx_params(model)
    assert "bias" not in params["qkv"] and "bias" in params["proj"]
    x = make_input((2, 5, 7), 10)
    assert rel_err(call(model, x), hand(params, x, 2, kw)) < 1e-5


# ---- dropout -----------------------------------------------------------------------------------

def test_nnx_dropout_train_and_eval():
    kw = dict(kernel_size=3)
    model = nnx_layer(2, dropout_rate=0.5, **kw)
    x = make_input((2, 7, 9), 11)
    clean = hand(nnx_params(model), x, 2, kw)
    with pytest.raises(ValueError, match="deterministic"):
        call(model, x)  # no mode set anywhere, like flax.nnx.MultiHeadAttention
    model.train()
    assert model.deterministic is False
    y1, y2 = call(model, x), call(model, x)  # the dropout rng state advances between calls
    assert not np.allclose(y1, y2)
    dropped = np.asarray(y1) == 0
    assert 0.35 < dropped.mean() < 0.65
    np.testing.assert_allclose(np.asarray(y1)[~dropped], 2 * np.asarray(clean)[~dropped],
                               rtol=1e-5, atol=1e-6)
    # explicit rngs override the stored stream and make it reproducible
    a = call(model, x, rngs=nnx.Rngs(dropout=5))
    b = call(model, x, rngs=nnx.Rngs(dropout=5))
    np.testing.assert_array_equal(a, b)
    model.eval()
    assert model.deterministic is True
    assert rel_err(call(model, x), clean) < 1e-5
    assert not np.allclose(call(model, x, deterministic=False), clean)  # call argument wins
    train_view = nnx.view(model, deterministic=False)  # nnx.view shares the parameters
    assert train_view.deterministic is False and model.deterministic is True
    assert not np.allclose(call(train_view, x), clean)


def test_linen_dropout_train_and_eval():
    kw = dict(kernel_size=3)
    layer = linen_layer(2, dropout_rate=0.5, **kw)
    x = make_input((2, 7, 9), 12)
    variables = init_linen(layer, x)
    clean = hand(variables["params"], x, 2, kw)
    apply = jax.jit(layer.apply, static_argnames="deterministic")
    assert rel_err(apply(variables, x), clean) < 1e-5  # deterministic by default
    assert rel_err(apply(variables, x, deterministic=True), clean) < 1e-5
    y1 = apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    y2 = apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(y1, y2)
    dropped = np.asarray(y1) == 0
    assert 0.35 < dropped.mean() < 0.65
    np.testing.assert_allclose(np.asarray(y1)[~dropped], 2 * np.asarray(clean)[~dropped],
                               rtol=1e-5, atol=1e-6)
    # the attribute sets the default mode
    train_layer = linen_layer(2, dropout_rate=0.5, deterministic=False, **kw)
    y3 = jax.jit(train_layer.apply)(variables, x, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(y3, y1)


# ---- dtypes ------------------------------------------------------------------------------------

def test_dtypes():
    x = make_input((2, 5, 7), 13)
    model = nnx_layer(2, kernel_size=3, rel_pos_bias=True, dtype=jnp.bfloat16)
    assert model.qkv.kernel.dtype == jnp.float32 and model.rpb.dtype == jnp.float32
    y = call(model, x)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, call(nnx_layer(2, kernel_size=3, rel_pos_bias=True), x)) < 3e-2
    model = nnx_layer(2, kernel_size=3, rel_pos_bias=True, param_dtype=jnp.bfloat16)
    assert model.qkv.kernel.dtype == jnp.bfloat16 and model.rpb.dtype == jnp.bfloat16
    assert call(model, x).dtype == jnp.float32  # promoted with the float32 input, as in Flax
    assert call(model, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    layer = linen_layer(2, kernel_size=3, rel_pos_bias=True, dtype=jnp.bfloat16)
    variables = init_linen(layer, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    assert jax.jit(layer.apply)(variables, x).dtype == jnp.bfloat16


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(is_causal=True), dict(is_causal=(False, True)),
                                 dict(stride=2), dict(stride=(1, 3))])
def test_rpb_needs_noncausal_stride1(bad):
    with pytest.raises(ValueError, match="rel_pos_bias"):
        nnx_layer(2, kernel_size=3, rel_pos_bias=True, **bad)
    with pytest.raises(ValueError, match="rel_pos_bias"):
        linen_layer(2, kernel_size=3, rel_pos_bias=True, **bad)  # at construction


def test_heads_must_divide_features():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        natten_nnx.NeighborhoodAttention2D(4, 10, 3, rngs=nnx.Rngs(0))
    layer = natten_linen.NeighborhoodAttention2D(num_heads=4, kernel_size=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        layer.init(jax.random.key(0), jax.random.normal(jax.random.key(1), (1, 5, 5, 10)))


@pytest.mark.parametrize("bad,exc", [
    (dict(kernel_size=(3, 3, 3)), ValueError),  # wrong number of axes
    (dict(kernel_size=1), ValueError),
    (dict(kernel_size=3, stride=4), ValueError),
    (dict(kernel_size=3, dilation=0), ValueError),
    (dict(kernel_size=3.0), TypeError),
    (dict(kernel_size=3, is_causal=1), TypeError),
])
def test_bad_arguments(bad, exc):
    with pytest.raises(exc):
        nnx_layer(2, **bad)
    with pytest.raises(exc):
        linen_layer(2, **bad)


def test_bad_input_shape():
    model = nnx_layer(2, kernel_size=3)
    with pytest.raises(ValueError, match="expects input"):
        call(model, make_input((5, 7), 14))  # no batch dimension
    with pytest.raises(ValueError, match="expects input"):
        call(model, jax.random.normal(jax.random.key(0), (1, 5, 7, FEATURES + 2)))


# ---- Flax conventions: argument order, names, precision ----------------------------------------

def test_nnx_swapped_arguments_are_rejected_with_the_order():
    """(in_features, num_heads) instead of (num_heads, in_features), as flax.nnx.MultiHeadAttention
    orders them: a ValueError that says the order and the fix."""
    with pytest.raises(ValueError, match=r"order is \(num_heads, in_features.*"
                                         r"NeighborhoodAttention2D\(4, 64, \.\.\.\)"):
        natten_nnx.NeighborhoodAttention2D(64, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="in_features must be a positive int"):
        natten_nnx.NeighborhoodAttention1D(4, 16.0, 3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"NeighborhoodAttention2D needs rngs=nnx.Rngs"):
        natten_nnx.NeighborhoodAttention2D(4, 16, 3)
    # keywords work in any order
    layer = natten_nnx.NeighborhoodAttention2D(in_features=16, num_heads=4, kernel_size=3,
                                               rngs=nnx.Rngs(0))
    assert (layer.num_heads, layer.in_features, layer.head_dim) == (4, 16, 4)


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_unknown_keyword_names_the_public_class(api):
    make = nnx_layer if api == "nnx" else linen_layer
    with pytest.raises(TypeError, match=r"NeighborhoodAttention2D.*unexpected keyword argument "
                                        r"'attn_dropout'"):
        make(2, kernel_size=3, attn_dropout=0.1)
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match=r"dropout_rate must be a number in \[0, 1\)"):
            make(2, kernel_size=3, dropout_rate=bad)


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_deprecated_names_still_work(api, monkeypatch):
    from jax_natten import _modules_common
    monkeypatch.setattr(_modules_common, "_WARNED", set())
    x = make_input((2, 5, 7), 15)
    make = nnx_layer if api == "nnx" else linen_layer
    with pytest.warns(FutureWarning) as record:
        old = make(2, kernel_size=3, qkv_bias=False, proj_dropout=0.25)
    assert sorted(str(w.message) for w in record) == [
        "NeighborhoodAttention2D: proj_dropout= is deprecated, use dropout_rate= (as in Flax)",
        "NeighborhoodAttention2D: qkv_bias= is deprecated, use use_qkv_bias= (as in Flax)"]
    new = make(2, kernel_size=3, use_qkv_bias=False, dropout_rate=0.25)
    if api == "nnx":
        assert old.dropout_rate == old.proj_dropout == 0.25
        params_old, params_new = nnx_params(old), nnx_params(new)
    else:
        params_old = init_linen(old, x)["params"]
        params_new = init_linen(new, x)["params"]
        y_old = jax.jit(old.apply)({"params": params_old}, x)  # deterministic by default
        assert rel_err(y_old, hand(params_old, x, 2, dict(kernel_size=3))) < 1e-5
        y_drop = old.apply({"params": params_old}, x, deterministic=False,
                           rngs={"dropout": jax.random.key(3)})
        assert 0.1 < float(jnp.mean(y_drop == 0)) < 0.4  # the old rate, 0.25, is used
    assert jax.tree.map(jnp.shape, params_old) == jax.tree.map(jnp.shape, params_new)
    assert "bias" not in params_old["qkv"]


def test_no_proj_bias():
    kw = dict(kernel_size=3)
    model = nnx_layer(2, use_proj_bias=False, **kw)
    params = nnx_params(model)
    assert "bias" not in params["proj"] and "bias" in params["qkv"]
    x = make_input((2, 5, 7), 16)
    assert rel_err(call(model, x), hand(params, x, 2, kw)) < 1e-5
    layer = linen_layer(2, use_proj_bias=False, **kw)
    assert "bias" not in init_linen(layer, x)["params"]["proj"]


def test_precision_reaches_the_projections():
    """precision is Flax's: it sets the projections' dot precision (visible in the jaxpr)."""
    x = make_input((2, 5, 7), 17)
    hi = jax.lax.Precision.HIGHEST
    model = nnx_layer(2, kernel_size=3, precision=hi)
    assert model.qkv.precision == hi and model.proj.precision == hi
    text = str(jax.make_jaxpr(lambda x: model(x))(x))
    assert text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == 2
    layer = linen_layer(2, kernel_size=3, precision=hi)
    variables = init_linen(layer, x)
    text = str(jax.make_jaxpr(lambda x: layer.apply(variables, x))(x))
    assert text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == 2
    assert rel_err(layer.apply(variables, x), hand(variables["params"], x, 2,
                                                   dict(kernel_size=3))) < 1e-5
