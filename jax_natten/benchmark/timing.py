"""Timing one compiled function: warm-up, batched wall-clock samples, device-side time on a GPU.

Wall clock: each sample runs `calls_per_sample` back-to-back calls (dispatch overlaps the device
work, so Python and launch overhead amortize) and blocks on all their outputs; the per-call time is
the sample time over the call count; the result is the median over samples. Calls rotate through
the input sets so that repeated runs do not read the same buffers out of cache.

Device time (GPU only, `timer="device"`): the same calls run under the JAX profiler, and the device
spans of the compiled module ("XLA Modules" line of the GPU plane) give one duration per call; the
median of those is reported. Traces without that line (jax 0.11.2 with the CUDA 13 plugin records
only the kernels, on "Stream #N" lines) give the kernels' busy time over the number of calls. It is checked against the wall clock (a device span cannot be longer
than the wall-clock time per call) and dropped, with a note, if it fails that or finds no events.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import statistics
import tempfile
import time
from typing import Callable, Optional, Sequence

import jax


@dataclasses.dataclass
class Timing:
    ms: float                 # the reported time per call (median), milliseconds
    wall_ms: float            # the wall-clock median per call
    min_ms: float             # fastest wall-clock sample, per call
    spread: float             # wall-clock (p75 - p25) / median
    samples: int              # wall-clock samples taken
    calls_per_sample: int
    timer: str                # "wall" or "device"
    estimate: bool = False    # True: over --max-seconds, ms is from one or two runs only
    device_ms: Optional[float] = None
    device_events: int = 0
    note: str = ""


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def plan(t_one: float, *, iters: int, warmup: int, max_seconds: float, sample_ms: float,
         max_calls_per_sample: int) -> tuple:
    """(calls_per_sample, warmup samples, samples, note) fitting the time budget.

    `t_one`: seconds of one warm call. Each sample lasts about `sample_ms` (more calls per sample
    for fast functions); the whole measurement about (warmup + iters) samples, cut down to fit
    `max_seconds`: first to one call per sample and no further warm-up, then to fewer samples.
    """
    t_one = max(t_one, 1e-7)
    cps = max(1, min(max_calls_per_sample, math.ceil(sample_ms / 1e3 / t_one)))
    if (warmup + iters) * cps * t_one <= max_seconds:
        return cps, warmup, iters, ""
    fit = int(max_seconds // t_one)
    if fit >= iters:                # fits with one call per sample and less warm-up
        return 1, min(warmup, fit - iters), iters, ""
    return 1, 0, max(fit, 0), f"{max(fit, 0)} samples of {iters} (--max-seconds {max_seconds:g})"


def measure(fn: Callable, arg_sets: Sequence[tuple], *, iters: int = 30, warmup: int = 3,
            max_seconds: float = 60.0, sample_ms: float = 20.0, max_calls_per_sample: int = 200,
            timer: str = "wall", module_name: Optional[str] = None,
            clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Time `fn(*arg_sets[i % len(arg_sets)])`; `fn` is compiled already (no compile inside)."""
    n_sets = len(arg_sets)
    counter = [0]

    def call():
        args = arg_sets[counter[0] % n_sets]
        counter[0] += 1
        return fn(*args)

    # Two warm calls, one at a time: the second is the estimate of one call's cost.
    jax.block_until_ready(call())
    t0 = clock()
    jax.block_until_ready(call())
    t_one = clock() - t0

    cps, warm, n, note = plan(t_one, iters=iters, warmup=warmup, max_seconds=max_seconds,
                              sample_ms=sample_ms, max_calls_per_sample=max_calls_per_sample)
    if n < 3:  # too slow for a median: report the one timed run
        ms = t_one * 1e3
        return Timing(ms=ms, wall_ms=ms, min_ms=ms, spread=float("nan"), samples=1,
                      calls_per_sample=1, timer="wall", estimate=True,
                      note=f"one run only: {t_one:.3g} s per call is over --max-seconds "
                           f"{max_seconds:g} / 3")

    for _ in range(warm):
        jax.block_until_ready([call() for _ in range(cps)])
    per_call = []
    for _ in range(n):
        t0 = clock()
        outs = [call() for _ in range(cps)]
        jax.block_until_ready(outs)
        per_call.append((clock() - t0) / cps)
        del outs
    wall = statistics.median(per_call)
    result = Timing(ms=wall * 1e3, wall_ms=wall * 1e3, min_ms=min(per_call) * 1e3,
                    spread=(_quantile(per_call, 0.75) - _quantile(per_call, 0.25)) / wall,
                    samples=n, calls_per_sample=cps, timer="wall", note=note)

    if timer == "device":
        calls = min(n * cps, 400)  # within the budget, as n * cps * t_one is
        try:
            durations = _device_durations(call, calls, module_name)
        except Exception as e:  # noqa: BLE001 (profiler missing, a trace already running, ...)
            durations, why = [], f"device timer failed ({type(e).__name__}: {e})"
        else:
            why = "device timer found no module events"
        if len(durations) >= max(3, calls // 2):
            dev = statistics.median(durations)
            result.device_ms, result.device_events = dev * 1e3, len(durations)
            if dev <= wall * 1.05 + 20e-6:
                result.ms, result.timer = dev * 1e3, "device"
            else:
                why = (f"device time {dev * 1e3:.4g} ms exceeds the wall clock "
                       f"{wall * 1e3:.4g} ms: kept the wall clock")
                result.note = "; ".join(x for x in (result.note, why) if x)
        else:
            result.note = "; ".join(x for x in (result.note, why + ": wall clock") if x)
    return result


def _device_durations(call: Callable, calls: int, module_name: Optional[str]) -> list:
    """Run `calls` back-to-back calls under the profiler; device seconds of each module run."""
    with tempfile.TemporaryDirectory(prefix="jax_natten_bench_") as logdir:
        jax.profiler.start_trace(logdir)
        try:
            last = None
            for _ in range(calls):
                last = call()
            jax.block_until_ready(last)
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return []
        data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
        durations = module_durations(data, module_name)
        if not durations:  # no module spans in this trace: the kernels' busy time per call
            busy = kernel_busy_seconds(data)
            durations = [busy / calls] * calls if busy > 0 else []
        return durations


def kernel_busy_seconds(data) -> float:
    """Total duration of the kernels on the GPU planes' stream lines ("Stream #N(...)")."""
    return sum(ev.duration_ns * 1e-9 for plane in data.planes
               if plane.name.startswith("/device:GPU")
               for line in plane.lines if line.name.startswith("Stream")
               for ev in line.events)


def module_durations(data, module_name: Optional[str] = None) -> list:
    """Seconds of every 'XLA Modules' event on the GPU planes of a ProfileData (optionally only
    modules whose name starts with `module_name`)."""
    out = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name != "XLA Modules":
                continue
            for ev in line.events:
                if module_name and not ev.name.startswith(module_name):
                    continue
                out.append(ev.duration_ns * 1e-9)
    return out
