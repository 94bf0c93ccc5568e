"""Command line of `python -m jax_natten.benchmark`: parse, run the cells, report."""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from jax_natten.ops import BACKENDS

from . import problems as problems_mod
from . import report, runner
from .problems import Problem

EXAMPLES = """\
examples:
  python -m jax_natten.benchmark --list
  python -m jax_natten.benchmark                                  # default set, every backend here
  python -m jax_natten.benchmark --problems nat-2d-small,1d-causal --backends fused,naive \\
      --baseline naive --passes fwd --json out.json --plot out.png
  python -m jax_natten.benchmark --spatial 56,56 --kernel 7 --dilation 2 --heads 4 --dim 32 \\
      --batch 8 --dtype f32 --backends cpu,reference
  python -m jax_natten.benchmark --op qk,av --memory

Defaults: on a GPU the "shared" problems (six bf16 problems whose sizes match published peer
measurements: see --list) on the CUDA backends this build has plus 'reference'; on a host the
small problems on 'cpu' and 'reference'. --plot needs matplotlib (pip install "jax-natten[plot]").
Useful FLOPs (forward) = 4*B*heads*N*prod(kernel)*D for attention (half for qk or av alone);
forward+backward counts 3.5x that for attention (as the peer scripts do), 3x for qk/av.
"""


def _ints(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _bools(text: str) -> tuple:
    table = {"1": True, "true": True, "t": True, "yes": True,
             "0": False, "false": False, "f": False, "no": False}
    try:
        return tuple(table[v.strip().lower()] for v in text.split(","))
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected comma-separated booleans (1/0, true/false), "
                                         f"got {text!r}")


def _choices(allowed: Sequence[str], name: str):
    def parse(text: str) -> list:
        items = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{name}: choose from {', '.join(allowed)} "
                                             f"(comma-separated), got {text!r}")
        return list(dict.fromkeys(items))
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jax_natten.benchmark",
        description="Time jax-natten's neighborhood attention per backend, problem, dtype and\n"
                    "pass (forward, forward+backward); report ms, useful TFLOP/s and speedups.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--list", action="store_true", help="list the built-in problems and exit")
    g.add_argument("--problems", metavar="NAMES",
                   help="comma list of problem names and groups: all, shared (six GPU-sized "
                        "bf16 problems), small (CPU-sized); see --list. Default: shared on a "
                        "GPU, small on a host; only the custom problem when --spatial is given")
    g.add_argument("--backends", metavar="NAMES",
                   help=f"comma list of {', '.join(BACKENDS)}, or 'all'; fused/mma_sync and "
                        "fused/wgmma pin the fused kernels' MMA family, fused/deterministic "
                        "runs the deterministic backward. Default: those "
                        "available on this device")
    g.add_argument("--baseline", default="auto", metavar="BACKEND",
                   help="speedups are over this backend: a backend name, 'peer:<name>', or "
                        "'none'. Default (auto): naive if it measured anything, else reference, "
                        "else the first backend that did")
    g.add_argument("--dtype", type=_choices(tuple(runner.DTYPES), "--dtype"), metavar="DTYPES",
                   help="bf16, f16 or f32 (or a comma list). Default: each problem's own "
                        "(bf16 unless the problem says otherwise)")
    g.add_argument("--op", type=_choices(runner.OPS, "--op"), default=["attention"],
                   metavar="OPS", help="attention (fused op), qk, av, or a comma list "
                                       "(default attention)")
    g.add_argument("--passes", type=_choices(runner.PASSES, "--passes"),
                   default=list(runner.PASSES), metavar="PASSES",
                   help="fwd, fwdbwd, or both (default fwd,fwdbwd)")

    c = p.add_argument_group("a custom problem (added when --spatial is given)")
    c.add_argument("--spatial", type=_ints, metavar="L[,L[,L]]", help="token grid, e.g. 56,56")
    c.add_argument("--kernel", type=_ints, default=(7,), metavar="K[,..]",
                   help="kernel size, one or one per axis (default 7)")
    c.add_argument("--dilation", type=_ints, default=(1,), metavar="D[,..]", help="default 1")
    c.add_argument("--stride", type=_ints, default=(1,), metavar="S[,..]", help="default 1")
    c.add_argument("--causal", type=_bools, default=(False,), metavar="B[,..]",
                   help="1/0 or true/false, one or one per axis (default 0)")
    c.add_argument("--batch", type=int, default=1, help="default 1")
    c.add_argument("--heads", type=int, default=4, help="query heads (default 4)")
    c.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads)")
    c.add_argument("--dim", type=int, default=32, help="head dim (default 32)")
    c.add_argument("--name", default="custom", help="its name in the report (default custom)")

    t = p.add_argument_group("timing")
    t.add_argument("--iters", type=int, default=30, help="timed samples per cell; the median is "
                                                           "reported (default 30)")
    t.add_argument("--warmup", type=int, default=3,
                   help="untimed warm-up samples after compiling (default 3)")
    t.add_argument("--sample-ms", type=float, default=20.0,
                   help="batch back-to-back calls until a sample lasts about this long, to "
                        "amortize dispatch (default 20)")
    t.add_argument("--max-seconds", type=float, default=60.0,
                   help="time budget of one cell's timed runs, estimated from one run: slow "
                        "cells take fewer samples, or report that one run (default 60)")
    t.add_argument("--rotate-mb", type=float, default=128.0,
                   help="rotate among enough input sets (at most 8) to read this many MiB per "
                        "round, so small problems are not timed out of cache (default 128)")
    t.add_argument("--timer", choices=("auto", "wall", "device"), default="auto",
                   help="device: device-side module time from the JAX profiler (GPU only); "
                        "wall: batched wall clock; auto: device on a GPU, else wall")
    t.add_argument("--seed", type=int, default=0, help="random inputs' seed")

    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write one JSON record per cell")
    o.add_argument("--plot", metavar="PATH",
                   help="write a PNG bar chart (needs matplotlib: pip install "
                        "\"jax-natten[plot]\")")
    o.add_argument("--plot-metric", choices=("tflops", "ms", "speedup"), default="tflops",
                   help="what the bars show (default tflops)")
    o.add_argument("--memory", action="store_true",
                   help="add XLA's memory analysis of each compiled step (temp, argument, output "
                        "MiB) to the table (always in the JSON)")
    o.add_argument("--peers", metavar="PATH", action="append", default=[],
                   help="a file of JSON lines from another library's benchmark, one object per "
                        "problem: {\"problem\": NAME, \"<peer>_fwd_ms\": ms, "
                        "\"<peer>_fwdbwd_ms\": ms}; their times join the table as backends "
                        "'peer:<peer>' (repeatable)")
    o.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def custom_problem(args) -> Problem:
    rank = len(args.spatial)

    def axes(v, name):
        if len(v) == 1:
            return v * rank
        if len(v) != rank:
            raise ValueError(f"--{name} has {len(v)} values; give 1 or {rank} (one per axis)")
        return v
    prob = Problem(args.name, args.batch, args.heads, args.spatial, args.dim,
                   axes(args.kernel, "kernel"), dilation=axes(args.dilation, "dilation"),
                   stride=axes(args.stride, "stride"), causal=axes(args.causal, "causal"),
                   kv_heads=args.kv_heads, group="custom", about="from the command line")
    # Let jax_natten's own checks judge it, on shapes only.
    f = runner.function(prob, "attention", "reference", "fwd")
    jax.eval_shape(f, *[jax.ShapeDtypeStruct(s, jnp.float32)
                        for s in runner.arg_shapes(prob, "attention", "fwd")])
    return prob


class _Progress:
    """tqdm on a terminal when installed, else one line per finished cell (stderr)."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.done, self.bar = total, quiet, 0, None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, unit="cell", dynamic_ncols=True)
            except ImportError:
                pass

    def start(self, label: str):
        if self.bar is not None:
            self.bar.set_description(label)

    def finish(self, label: str, rec: dict):
        self.done += 1
        if self.quiet:
            return
        if rec["status"] in report.MEASURED:
            what = (f"{'~' if rec['status'] == 'estimate' else ''}{rec['ms']:.4g} ms, "
                    f"{rec['tflops']:.3g} TFLOP/s")
        else:
            what = f"{rec['status']}: {rec['note']}"
        text = f"[{self.done}/{self.total}] {label}: {what}"
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
            self.bar.update()
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns the exit status (1 if any cell failed with an error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The test suite's output poisoning (every output filled with NaN before the kernels run)
    # would be timed with the kernels: it is dropped before any handler reads it (once, at its
    # first call). Left set, it added 0.1-0.4 ms to forward+backward calls on an H100.
    if os.environ.pop("JAX_NATTEN_POISON_OUTPUTS", None) not in (None, "", "0"):
        print("benchmark: JAX_NATTEN_POISON_OUTPUTS unset (output poisoning is not timed)",
              file=sys.stderr)
    if args.list:
        print(problems_mod.listing())
        return 0
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib, or the package's extra: "
                         "pip install \"jax-natten[plot]\")")
    if args.iters < 1 or args.warmup < 0 or args.max_seconds <= 0:
        parser.error("--iters must be >= 1, --warmup >= 0, --max-seconds > 0")

    # problems
    selected = []
    if args.spatial:
        try:
            selected.append(custom_problem(args))
        except (ValueError, TypeError) as e:
            parser.error(f"custom problem: {e}")
    if args.problems or not args.spatial:
        spec = args.problems or ("shared" if runner.has_gpu() else "small")
        try:
            selected += [p for p in problems_mod.select(spec) if p.name not in
                         {q.name for q in selected}]
        except ValueError as e:
            parser.error(str(e))

    # backends
    if args.backends in (None, ""):
        backends = runner.default_backends()
    elif args.backends.strip() == "all":
        backends = list(BACKENDS)
    else:
        backends = list(dict.fromkeys(b.strip() for b in args.backends.split(",") if b.strip()))
        bad = [b for b in backends if not runner.known_backend(b)]
        if bad or not backends:
            parser.error(f"unknown backend(s) {', '.join(bad) or '(none)'}: choose from "
                         f"{', '.join(BACKENDS)} or 'all'")

    opts = runner.Options(iters=args.iters, warmup=args.warmup, max_seconds=args.max_seconds,
                          sample_ms=args.sample_ms, rotate_mb=args.rotate_mb, timer=args.timer,
                          seed=args.seed)
    env = runner.environment()
    cells = [(p, dt, op, ps, b)
             for p in selected
             for dt in (args.dtype or [p.dtype or "bf16"])
             for op in args.op
             for ps in args.passes
             for b in backends]
    progress = _Progress(len(cells), args.quiet)
    cache = runner.InputCache()
    records = []
    try:
        for i, (p, dt, op, ps, b) in enumerate(cells):
            label = " ".join([p.name] + ([op] if len(args.op) > 1 or op != "attention" else [])
                             + [ps, b, dt])
            progress.start(label)
            records.append(runner.run_cell(p, dt, op, ps, b, opts, cache, env))
            progress.finish(label, records[-1])
            if i + 1 == len(cells) or cells[i + 1][0] != p:  # free this problem's inputs
                cache.clear()
                gc.collect()
    finally:
        progress.close()

    if args.peers:
        peer = report.load_peers(args.peers, {p.name: p for p in selected}, env)
        records = _interleave(records, peer)
    baseline = None if args.baseline == "none" else args.baseline
    if baseline == "auto":  # naive, else reference, else the first backend that measured anything
        measured = [b for b in backends if any(r["backend"] == b and r["status"] in
                                               report.MEASURED for r in records)]
        baseline = next((b for b in ("naive", "reference") if b in measured),
                        measured[0] if measured else None)
    report.add_speedups(records, baseline)
    print(report.table(records, memory=args.memory, title=report.header(records, env)))
    backward = report.backward_table(records)
    if backward:
        print("\n" + backward)
    if args.json:
        report.write_json(args.json, records)
        print(f"\nwrote {len(records)} records to {args.json}")
    if args.plot:
        report.plot(args.plot, records, args.plot_metric,
                    report.header(records, env).splitlines()[0])
        print(f"wrote {args.plot}")
    return 1 if any(r["status"] == "error" for r in records) else 0


def _interleave(records: list, peer: list) -> list:
    """Peer records placed after our records of the same problem, op, pass and dtype."""
    out = list(records)
    for r in peer:
        key = (r["problem"], r["op"], r["pass"], r["dtype"])
        last = max((i for i, x in enumerate(out)
                    if (x["problem"], x["op"], x["pass"], x["dtype"]) == key), default=None)
        if last is None:
            last = max((i for i, x in enumerate(out) if x["problem"] == r["problem"]),
                       default=len(out) - 1)
        out.insert(last + 1, r)
    return out
