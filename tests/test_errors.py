"""Bad input raises ValueError/TypeError with a clear message, before anything runs."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import jax_natten

B, X, Y, H, D = 2, 9, 8, 4, 8


def arr(*shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)


Q = arr(B, X, Y, H, D)
KV = arr(B, X, Y, 2, D)

BAD_CALLS = [
    ("rank", lambda: jax_natten.na2d(arr(B, X, H, D), arr(B, X, H, D), arr(B, X, H, D), 3),
     ValueError, r"rank >= 5"),
    ("int dtype", lambda: jax_natten.na2d(Q.astype(jnp.int32), KV, KV, 3), TypeError,
     r"floating-point"),
    ("mixed dtypes", lambda: jax_natten.na2d(Q, KV.astype(jnp.float16), KV, 3), TypeError,
     r"differs from query dtype"),
    ("spatial mismatch", lambda: jax_natten.na2d(Q, arr(B, X, Y - 1, 2, D), arr(B, X, Y - 1, 2, D),
                                                 3), ValueError, r"does not match query shape"),
    ("head dim mismatch", lambda: jax_natten.na2d(Q, arr(B, X, Y, 2, D + 1), KV, 3), ValueError,
     r"head_dim"),
    ("heads not divisible", lambda: jax_natten.na2d(Q, arr(B, X, Y, 3, D), arr(B, X, Y, 3, D), 3),
     ValueError, r"multiple of key/value heads"),
    ("kernel too large", lambda: jax_natten.na2d(Q, KV, KV, (3, 9)), ValueError,
     r"kernel_size \* dilation must not exceed"),
    ("kernel*dilation too large", lambda: jax_natten.na2d(Q, KV, KV, 3, dilation=(4, 1)),
     ValueError, r"kernel_size 3 \* dilation 4"),
    ("kernel 1", lambda: jax_natten.na2d(Q, KV, KV, 1), ValueError, r"kernel_size must be >= 2"),
    ("stride > kernel", lambda: jax_natten.na2d(Q, KV, KV, 3, stride=4), ValueError,
     r"1 <= stride <= kernel_size"),
    ("stride 0", lambda: jax_natten.na2d(Q, KV, KV, 3, stride=0), ValueError, r"stride"),
    ("dilation 0", lambda: jax_natten.na2d(Q, KV, KV, 3, dilation=0), ValueError, r"dilation"),
    ("tuple length", lambda: jax_natten.na2d(Q, KV, KV, (3, 3, 3)), ValueError,
     r"3 entries but the attention is 2-D"),
    ("float kernel", lambda: jax_natten.na2d(Q, KV, KV, 3.0), TypeError, r"kernel_size must be"),
    ("causal not bool", lambda: jax_natten.na2d(Q, KV, KV, 3, is_causal=1), TypeError,
     r"is_causal must be a bool"),
    ("rpb with causal", lambda: jax_natten.na2d(Q, KV, KV, 3, is_causal=(True, False),
                                                rpb=arr(H, 5, 5)), ValueError, r"only defined"),
    ("rpb with stride", lambda: jax_natten.na2d(Q, KV, KV, 3, stride=2, rpb=arr(H, 5, 5)),
     ValueError, r"stride 1"),
    ("rpb shape", lambda: jax_natten.na2d(Q, KV, KV, 3, rpb=arr(H, 5, 4)), ValueError,
     r"rpb must have shape"),
    ("additional keys alone", lambda: jax_natten.na2d(Q, KV, KV, 3,
                                                      additional_keys=arr(B, 3, 2, D)),
     ValueError, r"given together"),
    ("additional shape", lambda: jax_natten.na2d(Q, KV, KV, 3, additional_keys=arr(B, 3, 4, D),
                                                 additional_values=arr(B, 3, 4, D)),
     ValueError, r"additional_keys must have shape"),
    ("additional count", lambda: jax_natten.na2d(Q, KV, KV, 3, additional_keys=arr(B, 3, 2, D),
                                                 additional_values=arr(B, 4, 2, D)),
     ValueError, r"same number of tokens"),
    ("unknown backend", lambda: jax_natten.na2d(Q, KV, KV, 3, backend="flash"), ValueError,
     r"unknown backend 'flash'"),
    ("fused qk", lambda: jax_natten.na2d_qk(Q, KV, 3, backend="fused"), ValueError,
     r"'fused' has no unfused"),
    ("av width", lambda: jax_natten.na2d_av(arr(B, X, Y, H, 8), KV, 3), ValueError,
     r"prod\(kernel_size\) \+ S_add = 9 \+ 0, got 8"),
    ("merge mismatch", lambda: jax_natten.merge_attentions([Q], []), ValueError,
     r"as many outputs as lses"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_bad_input_raises_under_jit():
    """The checks run at trace time: jit raises the same error, no kernel is compiled."""
    with pytest.raises(ValueError, match=r"1 <= stride <= kernel_size"):
        jax.jit(lambda q: jax_natten.na2d(q, KV, KV, 3, stride=5))(Q)


def test_native_backend_refuses_float64():
    if not jax_natten.backend_available("cpu", "cpu"):
        pytest.skip("no host kernels in this build")
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        q = jnp.asarray(np.asarray(Q), jnp.float64)
        with pytest.raises(ValueError, match=r"float32, float16, bfloat16"):
            jax_natten.na2d(q, q, q, 3, backend="cpu")
        # The default picks a backend that serves float64 (and says so: FallbackWarning).
        with pytest.warns(jax_natten.FallbackWarning):
            from jax_natten import backends
            backends._WARNED.clear()
            assert jax_natten.na2d(q, q, q, 3).dtype == jnp.float64


def test_unavailable_backend_names_reason():
    for backend in ("gemm", "fused"):
        if jax_natten.backend_available(backend):
            continue
        with pytest.raises(ValueError, match=rf"backend '{backend}' cannot serve this call: .+"):
            jax_natten.na2d(Q, KV, KV, 3, backend=backend)


# ---- layout: heads-last, and inputs that look heads-first --------------------------------------

def test_rank_error_states_the_heads_last_layout():
    with pytest.raises(ValueError, match=r"query must be heads-last \[B, X, Y, heads, D\] "
                                         r"\(rank >= 5.*jax.nn.dot_product_attention"):
        jax_natten.na2d(arr(B, X, H, D), arr(B, X, H, D), arr(B, X, H, D), 3)


def test_kernel_size_error_shows_how_the_shape_was_read():
    with pytest.raises(ValueError, match=r"axis 1 has length 8 .* query shape \(2, 9, 8, 4, 8\) "
                                         r"is read heads-last as \[B, X, Y, heads, D\] = "
                                         r"\[2, 9, 8, 4, 8\]$"):
        jax_natten.na2d(Q, KV, KV, (3, 9))
    w = arr(B, X, Y, H, 9)
    with pytest.raises(ValueError, match=r"weights shape .* is read heads-last"):
        jax_natten.na2d_av(w, KV, (3, 9))


def test_heads_first_input_gets_a_hint_in_the_error():
    """[B, heads, L, D] read heads-last: 4 'positions', 12 'heads'; kernel 7 does not fit."""
    q = arr(2, 4, 12, 8)
    with pytest.raises(ValueError, match=r"axis 0 has length 4 .* If it is heads-first "
                                         r"\[B, heads, X, D\], move the heads axis: "
                                         r"jnp.moveaxis\(x, 1, -2\)"):
        jax_natten.na1d(q, q, q, 7)


def test_obviously_heads_first_input_warns_once():
    """[B, heads=8, L=64, D] fits a kernel of 3 when read heads-last (8 positions, 64 heads), so
    it runs, but it warns; moved heads-last, no warning and the right result."""
    from jax_natten import _checks
    _checks._WARNED_HEADS_FIRST.clear()
    q = arr(2, 8, 64, 16)
    with pytest.warns(UserWarning, match=r"looks heads-first.*jnp.moveaxis\(x, 1, -2\)"):
        jax_natten.na1d(q, q, q, 3, backend="reference")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax_natten.na1d(q, q, q, 3, backend="reference")  # warned once per shape
        ql = jnp.moveaxis(q, 1, -2)                          # [2, 64, 8, 16]: heads-last
        out = jax_natten.na1d(ql, ql, ql, 3, backend="reference")
    assert out.shape == (2, 64, 8, 16)


# ---- scale ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale, exc, pattern", [
    ("0.5", TypeError, r"scale must be a finite real number or a scalar array, got '0.5' \(str\)"),
    (True, TypeError, r"scale must be a finite real number"),
    (float("nan"), ValueError, r"scale must be finite, got nan"),
    (float("inf"), ValueError, r"scale must be finite, got inf"),
    (np.ones(2, np.float32), ValueError, r"scale must be a scalar, got an array of shape \(2,\)"),
    (jnp.asarray(1 + 2j), TypeError, r"scale must be a real scalar"),
])
def test_bad_scale(scale, exc, pattern):
    with pytest.raises(exc, match=pattern):
        jax_natten.na2d(Q, KV, KV, 3, scale=scale)


def test_module_scale_is_validated():
    from flax import nnx
    import jax_natten.linen
    import jax_natten.nnx
    with pytest.raises(ValueError, match="scale must be finite"):
        jax_natten.nnx.NeighborhoodAttention2D(4, 16, 3, scale=float("inf"), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="scale must be a finite real number"):
        jax_natten.linen.NeighborhoodAttention2D(num_heads=4, kernel_size=3, scale="x")


def test_scale_number_kinds_agree():
    """A Python float, a NumPy scalar and a concrete 0-d array are the same scale."""
    outs = [jax_natten.na2d(Q, KV, KV, 3, scale=s, backend="reference")
            for s in (0.25, np.float32(0.25), jnp.asarray(0.25))]
    for o in outs[1:]:
        assert jnp.array_equal(o, outs[0])


# ---- the device: explicit backends, backend_available, resolve_backend -------------------------

def _has_gpu():
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.parametrize("backend", ["fused", "gemm", "naive"])
def test_cuda_backend_off_a_gpu_names_the_device(backend):
    """On a machine where JAX sees no GPU, a CUDA backend is a ValueError before anything runs,
    naming the device JAX sees, whether or not the build has CUDA kernels."""
    if _has_gpu():
        pytest.skip("JAX sees a GPU here")
    assert not jax_natten.backend_available(backend)
    with pytest.raises(ValueError, match=rf"backend '{backend}' cannot serve this call: "
                                         rf"'{backend}' runs CUDA kernels on an NVIDIA GPU, but "
                                         r"this call would run on cpu:0 \(cpu; .*no GPU\)"):
        jax_natten.na2d(Q, KV, KV, 3, backend=backend)
    with pytest.raises(ValueError, match=r"would run on cpu:0"):
        jax.jit(lambda q: jax_natten.na2d(q, KV, KV, 3, backend=backend))(Q)


def test_cpu_backend_with_inputs_on_another_platform_names_it():
    """The "cpu" backend's kernels run on the host: a call whose device is not the CPU (here a
    target platform of "cuda") is refused with the device named."""
    with jax_natten.target_platform("cuda"):
        assert not jax_natten.backend_available("cpu")
        with pytest.raises(ValueError, match=r"'cpu' runs host kernels, but this call would run "
                                             r"on"):
            jax_natten.na2d_qk(Q, KV, 3, backend="cpu")


def test_backend_available_reflects_build_and_device():
    assert jax_natten.backend_available("reference")
    if not _has_gpu():
        assert jax_natten.backend_available("cpu")
        assert not any(jax_natten.backend_available(b) for b in ("fused", "gemm", "naive"))
    with pytest.raises(ValueError, match=r"unknown backend 'flash'"):
        jax_natten.backend_available("flash")
    # On a named device: the host kernels run on the CPU only, CUDA kernels on a GPU only.
    assert jax_natten.backend_available("cpu", jax.devices("cpu")[0])
    assert not jax_natten.backend_available("cpu", "gpu")
    assert not jax_natten.backend_available("fused", "cpu")
    with jax_natten.target_platform("cuda"):
        assert not jax_natten.backend_available("cpu")
        assert jax_natten.backend_available("cpu", "cpu")
    doc = jax_natten.backend_available.__doc__
    assert "Whether `backend` can run here" in doc and "resolve_backend" in doc


def test_resolve_backend():
    """The backend of a call, without running it; the same errors as the call."""
    want_native = "cpu" if not _has_gpu() else None
    got = jax_natten.resolve_backend(jax_natten.na2d, Q, KV, KV, 3)
    if want_native:
        assert got == want_native
    assert jax_natten.resolve_backend("na2d_qk", Q, KV, (3, 3)) in ("cpu", "gemm")
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (Q, KV, KV)]
    assert jax_natten.resolve_backend("na2d", *shapes, 3, backend="reference") == "reference"
    with pytest.raises(ValueError, match=r"kernel_size \* dilation must not exceed"):
        jax_natten.resolve_backend("na2d", Q, KV, KV, 30)
    with pytest.raises(ValueError, match=r"op must be one of"):
        jax_natten.resolve_backend("na4d", Q, KV, KV, 3)
    # Arrays committed to the host run there (on a GPU machine too), and resolve_backend says so.
    if jax_natten.backend_available("cpu", "cpu"):
        on_host = [jax.device_put(x, jax.devices("cpu")[0]) for x in (Q, KV, KV)]
        assert jax_natten.resolve_backend("na2d", *on_host, 3) == "cpu"
    from jax_natten import backends
    backends._WARNED.clear()  # the warning comes once per reason and process
    with jax.enable_x64(True):
        q = jnp.asarray(np.asarray(Q), jnp.float64)
        with pytest.warns(jax_natten.FallbackWarning):
            assert jax_natten.resolve_backend("na2d", q, q, q, 3) == "reference"


def test_fallback_to_reference_warns_once_with_the_reason():
    """float64 under x64 on a host: the host kernels do not take it, the default falls back to
    the (much slower) reference backend: a FallbackWarning that says why, once per reason;
    asking for backend="reference" is silent."""
    import warnings
    from jax_natten import backends
    backends._WARNED.clear()
    with jax.enable_x64(True):
        q = jnp.asarray(np.random.default_rng(1).standard_normal((1, 9, 2, 8)), jnp.float64)
        with pytest.warns(jax_natten.FallbackWarning,
                          match=r"runs on the slow 'reference' backend .* dtype float64 is not "
                                r"supported"):
            out = jax_natten.na1d(q, q, q, 3)
        assert out.dtype == jnp.float64
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            jax_natten.na1d(q, q, q, 3)                       # once per reason
            jax_natten.na1d(q, q, q, 3, backend="reference")  # asked for: silent


def test_choice_is_logged(caplog):
    import logging
    with caplog.at_level(logging.DEBUG, logger="jax_natten"):
        backend = jax_natten.resolve_backend("na2d", Q, KV, KV, 3)
    assert any(f"on backend {backend!r}" in r.getMessage() for r in caplog.records)


def test_source_tree_import_warns_with_the_fix(tmp_path):
    """Importing the package from a source tree without a build (the repository root): one
    warning that says so and how to fix it; an explicit native backend's error repeats it."""
    import pathlib
    import shutil
    import subprocess
    import sys
    installed = pathlib.Path(jax_natten.__file__).parent
    tree = tmp_path / "src"
    shutil.copytree(installed, tree / "jax_natten",
                    ignore=shutil.ignore_patterns("_natten_ext*", "__pycache__"))
    (tree / "pyproject.toml").write_text("")
    (tree / "CMakeLists.txt").write_text("")
    code = ("import warnings, jax, jax.numpy as jnp\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import jax_natten\n"
            "print('WARNINGS', len([x for x in w if 'jax_natten' in str(x.message)]))\n"
            "print('MSG', [str(x.message) for x in w if 'jax_natten' in str(x.message)][0])\n"
            "q = jnp.ones((1, 5, 1, 4))\n"
            "try:\n"
            "    jax_natten.na1d(q, q, q, 3, backend='cpu')\n"
            "except ValueError as e:\n"
            "    print('ERROR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    out = res.stdout
    assert res.returncode == 0, res.stderr
    assert "WARNINGS 1" in out, out
    assert f"imported from the source tree {tree}, which has no build" in out
    assert "pip install ." in out and "only the slow 'reference' backend" in out
    assert "ERROR backend 'cpu' cannot serve this call: the native extension is not built" in out
    assert "circular import" not in out


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", ["batch0", "heads0"])
def test_split_ops_on_empty_inputs(backend, case):
    """qk / av with no query rows (batch 0, heads 0) return empty results and gradients of the
    right shapes, like the attention op; no kernel runs on them."""
    if not jax_natten.backend_available(backend):
        pytest.skip(f"{backend} is not built")
    b, h = (0, 2) if case == "batch0" else (2, 0)
    q, k = arr(b, X, h, D), arr(b, X, 1 if h == 0 else 2, D)
    logits = jax_natten.na1d_qk(q, k, 3, backend=backend)
    assert logits.shape == (b, X, h, 3)
    w = jax.nn.softmax(logits, axis=-1)
    out = jax_natten.na1d_av(w, k, 3, backend=backend)
    assert out.shape == (b, X, h, D)
    grads = jax.grad(lambda q, k: jnp.sum(jax_natten.na1d_av(
        jax.nn.softmax(jax_natten.na1d_qk(q, k, 3, backend=backend), -1), k, 3,
        backend=backend)), argnums=(0, 1))(q, k)
    assert grads[0].shape == q.shape and grads[1].shape == k.shape


def test_av_with_zero_value_heads_is_refused():
    with pytest.raises(ValueError, match="multiple of value heads"):
        jax_natten.na1d_av(arr(B, X, 2, 3), arr(B, X, 0, D), 3)
