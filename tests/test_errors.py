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
    if not jax_natten.backend_available("cpu"):
        pytest.skip("no host kernels in this build")
    with jax.enable_x64(True):
        q = jnp.asarray(np.asarray(Q), jnp.float64)
        with pytest.raises(ValueError, match=r"float32, float16, bfloat16"):
            jax_natten.na2d(q, q, q, 3, backend="cpu")
        # The default picks a backend that serves float64.
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
