"""Results: speedups over a baseline, the plain-text table, JSON, the bar chart, peer results."""
from __future__ import annotations

import json
import re
from typing import Iterable, Optional

MEASURED = ("ok", "estimate")


def _group_key(r: dict) -> tuple:
    return (r["problem"], r["op"], r["pass"], r["dtype"])


def add_speedups(records: list, baseline: Optional[str]) -> None:
    """Set `speedup` (baseline ms / ms) on every measured record whose group (problem, op, pass,
    dtype) has a measured baseline record; None elsewhere."""
    base = {_group_key(r): r["ms"] for r in records
            if r["backend"] == baseline and r["status"] in MEASURED and r["ms"]}
    for r in records:
        r["baseline"] = baseline
        b = base.get(_group_key(r))
        r["speedup"] = b / r["ms"] if (b and r["status"] in MEASURED and r["ms"]) else None


# ----------------------------------------------------------------------------- table

def _fmt_ms(r: dict) -> str:
    if r["status"] not in MEASURED:
        return r["status"]
    ms = r["ms"]
    s = f"{ms:.3f}" if ms >= 0.01 else f"{ms:.2e}"
    return ("~" if r["status"] == "estimate" else "") + s


def _fmt_tflops(x) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x >= 100 else f"{x:.3g}"


def _mib(r: dict, field: str) -> str:
    m = r.get("memory")
    return "-" if not m else f"{m[field] / 2**20:.1f}"


def _fmt_tiles(t, pass_: str = "fwd") -> str:
    """The fused forward's plan: family, query / key tile extents, computed-over-useful scores;
    for forward+backward also the backward's schedule and its key-tile walk's tiles."""
    if not t:
        return "-"
    ext = lambda e: "x".join(map(str, e))  # noqa: E731
    out = (f"{t.get('kernel', t['mma'])} {ext(t['q_tile'])}/{ext(t['kv_tile'])} "
           f"{t['computed_over_useful']:.2f}x")
    if pass_ == "fwdbwd" and t.get("backward"):
        out += f"; bwd {t['backward']} {ext(t['bwd_q_tile'])}/{ext(t['bwd_kv_tile'])}"
    return out


def _aligned(cols: list, rows: list, left: set, indent: str = ""):
    """The header line, the rule under it and the rows as lines, each column as wide as its widest
    cell: the columns named in `left` flush left, the others right."""
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(cols)]

    def line(cells):
        out = [c.ljust(w) if name in left else c.rjust(w)
               for c, w, name in zip(cells, widths, cols)]
        return (indent + "  ".join(out)).rstrip()

    return line(cols), line(["-" * w for w in widths]), [line(row) for row in rows]


def _baseline(records: list) -> Optional[str]:
    return next((r.get("baseline") for r in records if r.get("baseline")), None)


def table(records: list, *, memory: bool = False, title: str = "") -> str:
    """An aligned plain-text table, one row per cell, notes as numbered footnotes."""
    baseline = _baseline(records)
    show_op = len({r["op"] for r in records}) > 1
    cols = ["problem"] + (["op"] if show_op else []) + ["pass", "backend", "dtype", "ms", "±%",
                                                         "TFLOP/s"]
    if baseline:
        cols.append(f"vs {baseline}")
    if memory:
        cols += ["temp MiB", "args MiB", "out MiB"]
    tiles = any(r.get("fused_tiles") for r in records)
    if tiles:
        cols.append("tiles q/kv")
    cols.append("note")
    notes: list = []
    rows = []
    for r in records:
        note = ""
        if r.get("note"):
            if r["note"] not in notes:
                notes.append(r["note"])
            note = f"[{notes.index(r['note']) + 1}]"
        spread = r.get("spread")
        row = [r["problem"]] + ([r["op"]] if show_op else []) + [
            r["pass"], r["backend"], r["dtype"], _fmt_ms(r),
            "-" if spread is None or r["status"] not in MEASURED else f"{100 * spread:.0f}",
            _fmt_tflops(r.get("tflops"))]
        if baseline:
            row.append("-" if r.get("speedup") is None else f"{r['speedup']:.2f}x")
        if memory:
            row += [_mib(r, "temp_bytes"), _mib(r, "argument_bytes"), _mib(r, "output_bytes")]
        if tiles:
            row.append(_fmt_tiles(r.get("fused_tiles"), r["pass"]))
        row.append(note)
        rows.append(row)
    head, rule, body = _aligned(cols, rows, {"problem", "op", "pass", "backend", "dtype",
                                             "tiles q/kv", "note"})
    out = [title] if title else []
    shapes = {}
    for r in records:
        shapes.setdefault(r["problem"], r.get("shape", ""))
    w = max(len(p) for p in shapes) if shapes else 0
    out += [f"  {p:<{w}}  {s}" for p, s in shapes.items()]
    out += ["", head, rule]
    prev = None
    for r, row in zip(records, body):
        if prev is not None and r["problem"] != prev:
            out.append("")
        prev = r["problem"]
        out.append(row)
    if notes:
        out.append("")
        out += [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
    return "\n".join(out)


def backward_table(records: list) -> str:
    """The backward alone, where a backend measured both passes of a problem: bwd = fwd+bwd - fwd
    (ms), its cost in forwards (bwd/fwd: FlashAttention-class backwards take ~2-2.5) and, with a
    baseline that measured both, the baseline's bwd over this one. Empty if no such pair."""
    measured = {(r["problem"], r["op"], r["backend"], r["dtype"], r["pass"]): r["ms"]
                for r in records if r["status"] in MEASURED and r["ms"]}

    def backward_ms(problem, op, backend, dtype):
        fwd = measured.get((problem, op, backend, dtype, "fwd"))
        both = measured.get((problem, op, backend, dtype, "fwdbwd"))
        return (None, None) if fwd is None or both is None else (both - fwd, fwd)

    baseline = _baseline(records)
    rows, seen = [], set()
    for r in records:
        key = (r["problem"], r["op"], r["backend"], r["dtype"])
        bwd, fwd = backward_ms(*key)
        if key in seen or bwd is None:
            continue
        seen.add(key)
        base, _ = backward_ms(key[0], key[1], baseline, key[3]) if baseline else (None, None)
        rows.append([key[0], key[2], key[3], f"{bwd:.3f}", f"{bwd / fwd:.2f}",
                     f"{base / bwd:.2f}x" if base and base > 0 and bwd > 0 else "-"])
    if not rows:
        return ""
    cols = ["backward", "backend", "dtype", "bwd ms", "bwd/fwd",
            f"vs {baseline}" if baseline else "vs -"]
    head, rule, body = _aligned(cols, rows, {"backward", "backend", "dtype"}, indent="  ")
    return "\n".join([head, rule] + body)


def header(records: list, env: dict) -> str:
    devices = sorted({r["device"] for r in records if r.get("device")})
    timers = sorted({r["timer"] for r in records if r.get("timer") in ("wall", "device")})
    return (f"jax-natten benchmark | {', '.join(devices) or 'no device'} "
            f"| jax {env['jax_version']} | jax-natten {env['jax_natten_version']} | {env['date']}\n"
            f"ms: median per call ({' and '.join(timers) or 'no'} timer); ±%: interquartile range "
            f"of the wall-clock samples over their median; ~: one run only")


# ----------------------------------------------------------------------------- JSON

def write_json(path: str, records: list) -> None:
    with open(path, "w") as f:
        json.dump(records, f, indent=1, default=str)
        f.write("\n")


# ----------------------------------------------------------------------------- peers

_PEER_KEY = re.compile(r"^(?P<peer>.+)_(?P<pass>fwd|fwdbwd)_ms$")


def load_peers(paths: Iterable[str], problems: dict, env: dict) -> list:
    """Records from peer JSON lines (`--peers`: bf16, attention), for the problems
    in `problems` (name -> Problem). Each `<peer>_<pass>_ms` key becomes backend 'peer:<peer>'."""
    from .runner import FWDBWD_FACTOR
    out = []
    for path in paths:
        device = None
        with open(path) as f:
            for text in f:
                text = text.strip()
                if not text.startswith("{"):
                    continue
                d = json.loads(text)
                if "devices" in d:
                    device = ", ".join(d["devices"])
                p = problems.get(d.get("problem"))
                if p is None:
                    continue
                for key, value in d.items():
                    m = _PEER_KEY.match(key)
                    if not m or not isinstance(value, (int, float)):
                        continue
                    pass_ = m["pass"]
                    flops = p.useful_flops() * (FWDBWD_FACTOR["attention"] if pass_ == "fwdbwd"
                                                else 1.0)
                    r = dict(problem=p.name, op="attention", backend=f"peer:{m['peer']}",
                             dtype="bf16", status="ok", note=f"peer result read from {path}",
                             ms=float(value), tflops=flops / (float(value) * 1e-3) / 1e12,
                             flops=flops, shape=p.shape(), spec=p.as_dict(), timer="peer",
                             device=device)
                    r["pass"] = pass_
                    r.update(env)
                    out.append(r)
    return out


# ----------------------------------------------------------------------------- plot

def plot(path: str, records: list, metric: str = "tflops", title_text: str = "") -> None:
    """A grouped bar chart (one group per problem/op/pass/dtype, one bar per backend) as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, backends = [], []
    for r in records:
        if _group_key(r) not in groups:
            groups.append(_group_key(r))
        if r["backend"] not in backends:
            backends.append(r["backend"])
    value = {(_group_key(r), r["backend"]): r.get(metric) for r in records
             if r["status"] in MEASURED}
    label = {"tflops": "useful TFLOP/s (higher is better)", "ms": "ms per call (lower is better)",
             "speedup": f"speedup over {records[0].get('baseline') if records else '?'}"}[metric]
    width = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(min(18.0, max(6.0, 0.35 * len(groups) * max(len(backends), 2)
                                                  + 2)), 5.0))
    for j, b in enumerate(backends):
        xs, ys = [], []
        for i, g in enumerate(groups):
            v = value.get((g, b))
            if v is not None:
                xs.append(i + (j - (len(backends) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=b)
    ax.set_xticks(range(len(groups)))
    many = len(groups) > 12
    ax.set_xticklabels([f"{g[0]}{' ' if many else chr(10)}{g[2]}"
                        + (f" {g[1]}" if g[1] != "attention" else "") + f" {g[3]}"
                        for g in groups], fontsize=7 if many else 8,
                       rotation=45 if many else 0, ha="right" if many else "center")
    if metric == "ms":
        ax.set_yscale("log")
    ax.set_ylabel(label)
    ax.set_title(title_text, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
