"""jax-natten: neighborhood attention for JAX (NATTEN semantics, XLA FFI kernels, Flax modules)."""
from .ops import (
    BACKENDS,
    merge_attentions,
    na1d, na1d_av, na1d_qk,
    na2d, na2d_av, na2d_qk,
    na3d, na3d_av, na3d_qk,
)
from .ops import resolve_backend
from .backends import FallbackWarning, backend_available, target_platform
from .config import FusedTiles, fused_config, fused_tiles
from . import parallel  # spatial (context) parallelism: jax_natten.parallel.na1d/na2d/na3d

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "FallbackWarning", "FusedTiles", "backend_available", "fused_config",
    "fused_tiles", "merge_attentions",
    "parallel", "resolve_backend", "target_platform",
    "na1d", "na1d_qk", "na1d_av", "na2d", "na2d_qk", "na2d_av", "na3d", "na3d_qk", "na3d_av",
]
