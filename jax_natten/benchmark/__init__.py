"""Benchmarks of jax-natten's backends: `python -m jax_natten.benchmark --help`.

problems.py (the problem set) · timing.py (warm-up, batched wall clock, device time) ·
runner.py (one cell: compile, memory check, inputs, time) · report.py (table, JSON, plot, peers) ·
cli.py (the command line).
"""
from .cli import main
from .problems import PROBLEMS, Problem

__all__ = ["main", "PROBLEMS", "Problem"]
