"""Benchmark jax-natten: `python -m jax_natten.benchmark [options]` (`--help` for all of them).

Each cell (problem x dtype x op x pass x backend) is jitted and compiled (compile time excluded),
warmed up, then timed: back-to-back calls batched until a sample lasts ~20 ms, median of 30
samples, inputs fresh standard-normal and rotated among several sets when they would fit in cache;
on a GPU the device-side module time from the JAX profiler is reported (wall clock kept beside it).
Backends that cannot serve a problem, or would run out of memory, are skipped with a note.

Usage:
    python -m jax_natten.benchmark --list                       # the built-in problems
    python -m jax_natten.benchmark                              # defaults for this device
    python -m jax_natten.benchmark --problems shared --backends fused,gemm,naive,reference \\
        --baseline naive --json bench.json --plot bench.png
    python -m jax_natten.benchmark --problems 1d-4k-f32 --backends cpu,reference --dtype f32
    python -m jax_natten.benchmark --spatial 56,56 --kernel 7 --dilation 2 --batch 8 \\
        --passes fwd --iters 50
    python -m jax_natten.benchmark --op qk,av --memory          # unfused ops, XLA memory use
    python -m jax_natten.benchmark --problems shared --peers peers_torch.jsonl   # with peers
"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
