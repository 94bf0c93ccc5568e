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
