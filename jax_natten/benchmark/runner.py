"""One benchmark cell (problem x dtype x op x pass x backend): build, compile, check, time, record.

A cell never raises: a backend that cannot serve the problem (jax_natten's ValueError/TypeError),
a CUDA backend without a GPU, a predicted or real out-of-memory, or any other failure becomes a
record with `status` "skipped", "oom" or "error" and a `note` that says why.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import time
import zlib
from typing import Optional

import jax
import jax.numpy as jnp

import jax_natten
from jax_natten import config
from jax_natten.ops import BACKENDS
from jax_natten.backends import ffi

from . import timing
from .problems import Problem

DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}
OPS = ("attention", "qk", "av")
PASSES = ("fwd", "fwdbwd")
CUDA_BACKENDS = ("fused", "gemm", "naive")
# Useful FLOPs of forward+backward over forward: attention recomputes the logits in its backward
# (1 + 2.5, as the peer scripts count); qk and av have two gradient products each (1 + 2).
FWDBWD_FACTOR = {"attention": 3.5, "qk": 3.0, "av": 3.0}

_OPS = {1: (jax_natten.na1d, jax_natten.na1d_qk, jax_natten.na1d_av),
        2: (jax_natten.na2d, jax_natten.na2d_qk, jax_natten.na2d_av),
        3: (jax_natten.na3d, jax_natten.na3d_qk, jax_natten.na3d_av)}


@dataclasses.dataclass
class Options:
    iters: int = 30
    warmup: int = 3
    max_seconds: float = 60.0
    sample_ms: float = 20.0
    rotate_mb: float = 128.0
    max_input_sets: int = 8
    timer: str = "auto"         # auto | wall | device
    seed: int = 0


# ----------------------------------------------------------------------------- devices

def has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def default_backends() -> list:
    """Every backend this build and this machine can run: CUDA ones on a GPU, else the host one."""
    if has_gpu():
        native = [b for b in CUDA_BACKENDS if ffi.available(b)]
    else:
        native = ["cpu"] if ffi.available("cpu") else []
    return native + ["reference"]


# Variants of the fused backend the CLI takes as 'fused/<variant>' -> their fused_config.
FUSED_VARIANTS = {"auto": {}, "mma_sync": dict(mma="mma_sync"), "wgmma": dict(mma="wgmma"),
                  "deterministic": dict(deterministic=True)}


def split_backend(backend: str):
    """'fused/mma_sync' -> ('fused', 'mma_sync'): a backend pinned to one fused configuration
    (FUSED_VARIANTS: an MMA family, or the deterministic backward); plain names -> (name, '')."""
    base, _, variant = backend.partition("/")
    return base, variant


def known_backend(backend: str) -> bool:
    base, variant = split_backend(backend)
    return base in BACKENDS and (not variant or (base == "fused" and variant in FUSED_VARIANTS))


def device_for(backend: str):
    """Where `backend` runs: host kernels on the CPU device, everything else on the default one."""
    if backend == "cpu":
        return jax.devices("cpu")[0]
    if backend in CUDA_BACKENDS and not has_gpu():
        return None
    return jax.devices()[0]


def device_name(dev) -> str:
    if dev.platform == "cpu":
        cpu = platform.processor() or platform.machine()
        return f"cpu ({os.cpu_count()} cores{', ' + cpu if cpu else ''})"
    return dev.device_kind


def free_bytes(dev) -> Optional[int]:
    """Memory free for a new computation on `dev`, or None if unknown."""
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if dev.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def environment() -> dict:
    import jaxlib
    return dict(jax_version=jax.__version__, jaxlib_version=jaxlib.__version__,
                jax_natten_version=jax_natten.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host=platform.node())


# ----------------------------------------------------------------------------- functions, inputs

def function(problem: Problem, op: str, backend: str, pass_: str):
    """The function a cell times. fwdbwd returns the output and the input cotangents, given a
    random output cotangent as the last argument."""
    na, na_qk, na_av = _OPS[problem.rank]
    kw = dict(kernel_size=problem.kernel, stride=problem.stride, dilation=problem.dilation,
              is_causal=problem.causal, backend=backend)
    f = {"attention": lambda q, k, v: na(q, k, v, **kw),
         "qk": lambda q, k: na_qk(q, k, **kw),
         "av": lambda w, v: na_av(w, v, **kw)}[op]
    if pass_ == "fwd":
        return f

    def fwdbwd(*args):
        *primals, cotangent = args
        out, vjp = jax.vjp(f, *primals)
        return out, vjp(cotangent)
    return fwdbwd


def arg_shapes(problem: Problem, op: str, pass_: str) -> list:
    lead = (problem.batch,) + problem.spatial
    q = lead + (problem.heads, problem.head_dim)
    kv = lead + (problem.kv_heads, problem.head_dim)
    w = lead + (problem.heads, problem.window)
    shapes = {"attention": [q, kv, kv], "qk": [q, kv], "av": [w, kv]}[op]
    if pass_ == "fwdbwd":
        shapes.append(w if op == "qk" else q)  # the output cotangent
    return shapes


def input_sets(shapes: list, dtype, dev, n_sets: int, seed: int, salt: str) -> list:
    """`n_sets` tuples of fresh standard-normal arrays on `dev` (never zeros)."""
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(salt.encode()))
    sets = []
    with jax.default_device(dev):
        for i in range(n_sets):
            ks = jax.random.split(jax.random.fold_in(key, i), len(shapes))
            sets.append(tuple(jax.random.normal(k, s, dtype) for k, s in zip(ks, shapes)))
    jax.block_until_ready(sets)
    return sets


def n_input_sets(bytes_per_set: int, rotate_bytes: float, max_sets: int) -> int:
    """Enough input sets that one pass over them is `rotate_bytes` (bigger than the L2 cache),
    at most `max_sets`; one set when a single set is that big already."""
    return max(1, min(max_sets, math.ceil(rotate_bytes / max(bytes_per_set, 1))))


# ----------------------------------------------------------------------------- one cell

def _memory(compiled) -> Optional[dict]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every platform implements it)
        return None
    if m is None:
        return None
    fields = ("temp", "argument", "output", "alias", "generated_code")
    return {f"{f}_bytes": int(getattr(m, f"{f}_size_in_bytes", 0) or 0) for f in fields}


def _is_oom(e: BaseException) -> bool:
    msg = str(e).lower()
    return any(s in msg for s in ("resource_exhausted", "out of memory", "failed to allocate"))


def _short(e: BaseException) -> str:
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


class InputCache:
    """The input sets of the cell being run, reused by every backend on the same device."""

    def __init__(self):
        self.key, self.sets = None, {}

    def get(self, key, dev):
        if key != self.key:
            self.key, self.sets = key, {}
        return self.sets.get(dev)

    def put(self, key, dev, sets):
        self.get(key, dev)
        self.sets[dev] = sets

    def clear(self):
        self.key, self.sets = None, {}


def _fused_tiles(problem: Problem, dtype, variant: str, dev) -> Optional[dict]:
    """The fused forward's MMA family, tiles and computed-over-useful scores on this problem
    (config.fused_tiles under the variant's settings), or None where they cannot be planned."""
    try:
        with config.fused_config(**FUSED_VARIANTS.get(variant, {})):
            plan = config.fused_tiles(problem.spatial, problem.kernel, stride=problem.stride,
                                      dilation=problem.dilation, is_causal=problem.causal,
                                      head_dim=problem.head_dim, dtype=dtype, device=dev)
    except (RuntimeError, ValueError):
        return None
    return dataclasses.asdict(plan)


def run_cell(problem: Problem, dtype_name: str, op: str, pass_: str, backend: str,
             opts: Options, cache: InputCache, env: Optional[dict] = None) -> dict:
    flops = problem.useful_flops(op) * (FWDBWD_FACTOR[op] if pass_ == "fwdbwd" else 1.0)
    rec = {"problem": problem.name, "op": op, "pass": pass_, "backend": backend,
           "dtype": dtype_name, "status": "ok", "note": "", "ms": None, "tflops": None,
           "flops": flops, "shape": problem.shape(), "spec": problem.as_dict()}
    rec.update(env or environment())

    backend, variant = split_backend(backend)
    dev = device_for(backend)
    if dev is None:
        rec.update(status="skipped", device=None,
                   note=f"backend {backend!r} needs a CUDA GPU and JAX sees none")
        return rec
    rec.update(device=device_name(dev), platform=dev.platform)
    dtype = DTYPES[dtype_name]
    shapes = arg_shapes(problem, op, pass_)
    sharding = jax.sharding.SingleDeviceSharding(dev)
    structs = [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]

    try:
        # Both are read at trace time: the fused settings, and the device (jax_natten refuses
        # a backend that does not run on the device of the call).
        with config.fused_config(**FUSED_VARIANTS.get(variant, {})), jax.default_device(dev):
            lowered = jax.jit(function(problem, op, backend, pass_)).lower(*structs)
    except (ValueError, TypeError) as e:  # jax_natten refuses: the backend can't serve this
        rec.update(status="skipped", note=str(e).strip().splitlines()[0][:400])
        return rec
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", note=_short(e))
        return rec
    try:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        rec["compile_s"] = round(time.perf_counter() - t0, 4)
    except Exception as e:  # noqa: BLE001
        rec.update(status="oom" if _is_oom(e) else "error", note=_short(e))
        return rec
    mem = _memory(compiled)
    rec["memory"] = mem

    itemsize = jnp.dtype(dtype).itemsize
    set_bytes = sum(math.prod(s) for s in shapes) * itemsize
    cache_key = (problem.name, dtype_name, op, pass_)
    sets = cache.get(cache_key, dev)
    n_sets = len(sets) if sets else n_input_sets(set_bytes, opts.rotate_mb * 2**20,
                                                 opts.max_input_sets)
    rec["input_sets"] = n_sets

    # Out-of-memory, predicted from XLA's memory analysis: skip instead of crashing the host.
    free = free_bytes(dev)
    out_bytes = mem["output_bytes"] if mem else set_bytes
    if mem is not None and free is not None:
        need = mem["temp_bytes"] + mem["output_bytes"] + (0 if sets else set_bytes * n_sets)
        if need > 0.9 * free:
            rec.update(status="oom", note=f"needs ~{need / 2**30:.2f} GiB (XLA memory analysis), "
                                          f"{free / 2**30:.2f} GiB free: not run")
            return rec
        spare = 0.9 * free - need
    else:
        spare = 2 * 2**30
    max_cps = int(max(1, min(200, spare // max(out_bytes, 1))))

    try:
        if not sets:
            sets = input_sets(shapes, dtype, dev, n_sets, opts.seed, "/".join(cache_key))
            cache.put(cache_key, dev, sets)
        timer = opts.timer
        if timer == "auto":
            timer = "device" if dev.platform == "gpu" else "wall"
        t = timing.measure(compiled, sets, iters=opts.iters, warmup=opts.warmup,
                           max_seconds=opts.max_seconds, sample_ms=opts.sample_ms,
                           max_calls_per_sample=max_cps, timer=timer)
    except Exception as e:  # noqa: BLE001
        cache.clear()
        rec.update(status="oom" if _is_oom(e) else "error", note=_short(e))
        return rec

    if backend == "fused" and op == "attention":
        rec["fused_tiles"] = _fused_tiles(problem, dtype, variant, dev)
    rec.update(status="estimate" if t.estimate else "ok", note=t.note, ms=t.ms,
               tflops=flops / (t.ms * 1e-3) / 1e12, wall_ms=t.wall_ms, min_ms=t.min_ms,
               spread=None if math.isnan(t.spread) else t.spread, samples=t.samples,
               calls_per_sample=t.calls_per_sample, timer=t.timer, device_ms=t.device_ms)
    return rec
