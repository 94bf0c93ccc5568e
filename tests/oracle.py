"""A float64 NumPy oracle written from docs/semantics.md §2-§9, independent of jax_natten.

Literal: the window rules are typed again from that text (not imported) and enumerated per query in
Python, so a mistake in `_window.py` cannot hide itself; only the arithmetic is vectorized.
"""
import functools
import itertools
import math

import numpy as np


def spec_axis_window(x, L, k, s, d, causal):
    """docs/semantics.md §2-§5 for global query x: per offset t, (global key or None past a
    causal query, relative-position index j - i + k - 1 in local coordinates)."""
    g, i = x % d, x // d
    Lg = L // d + (1 if g < L % d else 0)
    if causal:
        leader = min((i // s) * s + s - 1, Lg - 1)
        start = max(leader - k + 1, 0)
        last = i
    else:
        leader = min((i // s) * s + s // 2, Lg - 1)
        start = min(max(leader - k // 2, 0), Lg - k)
        last = start + k - 1
    out = []
    for t in range(k):
        j = start + t
        out.append(((g + d * j) if j <= last else None, j - i + k - 1))
    return out


@functools.lru_cache(maxsize=None)
def windows(spatial, kernel, stride, dilation, causal):
    """Every query's window, row-major over queries and offsets: `(keys [N, K], rel [N, K, rank])`,
    keys[n, t] the flat key index or -1 where the offset lies past a causal query."""
    keys, rels = [], []
    for coord in itertools.product(*[range(L) for L in spatial]):
        axes = [spec_axis_window(x, L, k, s, d, c) for x, L, k, s, d, c in
                zip(coord, spatial, kernel, stride, dilation, causal)]
        for combo in itertools.product(*axes):
            ks = [key for key, _ in combo]
            keys.append(-1 if None in ks else int(np.ravel_multi_index(ks, spatial)))
            rels.append([rel for _, rel in combo])
    N, K = math.prod(spatial), math.prod(kernel)
    return np.array(keys).reshape(N, K), np.array(rels).reshape(N, K, len(kernel))


def _flat(x):
    """[B, *spatial, H, D] -> float64 [B, N, H, D]."""
    x = np.asarray(x, np.float64)
    return x.reshape(x.shape[0], math.prod(x.shape[1:-2]), *x.shape[-2:])


def _per_head(x, heads):
    """kv-head tensor [..., KVH, D] -> one copy per query head [..., H, D] (GQA: h // groups)."""
    return np.repeat(x, heads // x.shape[-2], axis=-2)


def qk(q, k, kernel, stride, dilation, causal, rpb=None, add_k=None):
    """Unscaled logits [B, *spatial, H, prod(k) (+S)], -inf past causal queries."""
    spatial = q.shape[1:1 + len(kernel)]
    keys, rel = windows(tuple(spatial), tuple(kernel), tuple(stride), tuple(dilation),
                        tuple(causal))
    qf = _flat(q)
    kf = _per_head(_flat(k), qf.shape[2])
    out = np.einsum("bnhd,bnkhd->bnhk", qf, kf[:, np.maximum(keys, 0)])
    if rpb is not None:
        rpb = np.asarray(rpb, np.float64)
        bias = rpb[(slice(None),) + tuple(rel[..., a] for a in range(len(kernel)))]  # [H, N, K]
        out = out + bias.transpose(1, 0, 2)[None]
    out = np.where(keys[None, :, None, :] >= 0, out, -np.inf)
    if add_k is not None:
        ak = _per_head(np.asarray(add_k, np.float64), qf.shape[2])
        out = np.concatenate([out, np.einsum("bnhd,bshd->bnhs", qf, ak)], axis=-1)
    return out.reshape(q.shape[:-1] + (out.shape[-1],))


def av(w, v, kernel, stride, dilation, causal, add_v=None):
    spatial = w.shape[1:1 + len(kernel)]
    keys, _ = windows(tuple(spatial), tuple(kernel), tuple(stride), tuple(dilation),
                      tuple(causal))
    wf = _flat(w)
    K = keys.shape[1]
    vf = _per_head(_flat(v), wf.shape[2])
    wk = np.where(keys[None, :, None, :] >= 0, wf[..., :K], 0.0)
    out = np.einsum("bnhk,bnkhd->bnhd", wk, vf[:, np.maximum(keys, 0)])
    if add_v is not None:
        out = out + np.einsum("bnhs,bshd->bnhd", wf[..., K:],
                              _per_head(np.asarray(add_v, np.float64), wf.shape[2]))
    return out.reshape(w.shape[:-1] + (vf.shape[-1],))


def attention(q, k, v, kernel, stride, dilation, causal, scale=None, rpb=None, add_k=None,
              add_v=None):
    """-> (out, lse) in float64."""
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    logits = qk(np.asarray(q, np.float64) * scale, k, kernel, stride, dilation, causal, rpb, add_k)
    m = logits.max(-1, keepdims=True)
    e = np.exp(logits - m)
    lse = np.log(e.sum(-1)) + m[..., 0]
    p = e / e.sum(-1, keepdims=True)
    return av(p, v, kernel, stride, dilation, causal, add_v), lse


def attention_vjp(q, k, v, kernel, stride, dilation, causal, dout, dlse, scale=None, rpb=None,
                  add_k=None, add_v=None, stored=None, delta_error=None):
    """Gradients of sum(out * dout) + sum(lse * dlse) in float64, by the textbook backward:
    P = softmax(logits), dP_t = dout . v_t, dS = P (dP - sum(P dP) + dlse) (formed relative to the
    row's largest weight: no cancellation), then dS and P * dout
    scattered back to q, k, v, rpb and the additional tokens. -> dict named like the op's args.
    `stored`: None, or a function applied to P and dS before they are scattered (a model of
    kernels that keep them in a narrower dtype). `delta_error`: None, or a function of (P,
    |dP|terms: sum over d of |do_d| |v_d| per entry) whose value is added to each row's sum(P dP)
    (a model of kernels that round it, and dP, in float32)."""
    rank = len(kernel)
    spatial = q.shape[1:1 + rank]
    keys, rel = windows(tuple(spatial), tuple(kernel), tuple(stride), tuple(dilation),
                        tuple(causal))
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    B, N, H, _ = qf.shape
    KVH, K = kf.shape[2], keys.shape[1]
    heads_k, heads_v = _per_head(kf, H), _per_head(vf, H)
    valid = keys[None, :, None, :] >= 0
    safe = np.maximum(keys, 0)
    logits = qk(np.asarray(q, np.float64) * scale, k, kernel, stride, dilation, causal, rpb, add_k)
    logits = logits.reshape(B, N, H, logits.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    do = _flat(dout)
    ak_v = None if add_v is None else _per_head(np.asarray(add_v, np.float64), H)

    def window_dots(f):
        """sum_d f(do_d) f(v_td) per window entry t, then per additional value; 0 outside."""
        d = np.einsum("bnhd,bnkhd->bnhk", f(do), f(heads_v[:, safe]))
        if ak_v is not None:
            d = np.concatenate([d, np.einsum("bnhd,bshd->bnhs", f(do), f(ak_v))], axis=-1)
        return np.where(np.isfinite(logits), d, 0.0)

    dp = window_dots(lambda a: a)
    dl = np.asarray(dlse, np.float64).reshape(B, N, H)
    # dP - sum(P dP) relative to the row's largest weight m: (dP - dP_m) - sum(P (dP - dP_m)),
    # the same number (the weights sum to 1) without the cancellation that costs even float64
    # the answer near one-hot rows: with P_m = 1 - 1e-25, dS_m = -sum_{j != m} dS_j ~ 1e-25
    # while dP_m - sum(P dP) rounds to 0 or an ulp of dP (1e-16).
    dp_m = np.take_along_axis(dp, p.argmax(-1)[..., None], -1)
    delta = (p * (dp - dp_m)).sum(-1, keepdims=True)
    if delta_error is not None:
        # What bounds a float32 dot product's rounding: the sum of its terms' magnitudes.
        delta = delta + delta_error(p, window_dots(np.abs))
    ds = p * ((dp - dp_m) - delta + dl[..., None])
    if stored is not None:
        p, ds = stored(p), stored(ds)
    dsw, pw = np.where(valid, ds[..., :K], 0.0), np.where(valid, p[..., :K], 0.0)
    dq = scale * np.einsum("bnhk,bnkhd->bnhd", dsw, heads_k[:, safe])
    dk_h, dv_h = np.zeros_like(heads_k), np.zeros_like(heads_v)
    for t in range(K):  # scatter window offset t of every query to its key
        np.add.at(dk_h, (slice(None), safe[:, t]), scale * dsw[..., t, None] * qf)
        np.add.at(dv_h, (slice(None), safe[:, t]), pw[..., t, None] * do)
    per_kv = lambda x: x.reshape(x.shape[:2] + (KVH, H // KVH) + x.shape[3:]).sum(3)
    grads = {}
    if add_k is not None:
        ak_k = _per_head(np.asarray(add_k, np.float64), H)
        dq = dq + scale * np.einsum("bnhs,bshd->bnhd", ds[..., K:], ak_k)
        grads["additional_keys"] = per_kv(scale * np.einsum("bnhs,bnhd->bshd", ds[..., K:], qf))
        grads["additional_values"] = per_kv(np.einsum("bnhs,bnhd->bshd", p[..., K:], do))
    if rpb is not None:
        drpb = np.zeros(np.shape(rpb))
        idx = tuple(rel[..., a] for a in range(rank))  # each [N, K]
        for h in range(H):
            np.add.at(drpb[h], idx, np.where(valid[0, :, 0], dsw[:, :, h].sum(0), 0.0))
        grads["rpb"] = drpb
    grads["query"] = dq.reshape(q.shape)
    grads["key"] = per_kv(dk_h).reshape(k.shape)
    grads["value"] = per_kv(dv_h).reshape(v.shape)
    return grads
