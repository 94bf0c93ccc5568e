"""jax-natten: neighborhood attention for JAX (NATTEN semantics, XLA FFI kernels, Flax modules)."""
from .ops import (
    BACKENDS,
    merge_attentions,
    na1d, na1d_av, na1d_qk,
    na2d, na2d_av, na2d_qk,
    na3d, na3d_av, na3d_qk,
)
from .backends.ffi import available as backend_available
from .config import fused_config
from . import parallel  # spatial (context) parallelism: jax_natten.parallel.na1d/na2d/na3d

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "backend_available", "fused_config", "merge_attentions", "parallel",
    "na1d", "na1d_qk", "na1d_av", "na2d", "na2d_qk", "na2d_av", "na3d", "na3d_qk", "na3d_av",
]
