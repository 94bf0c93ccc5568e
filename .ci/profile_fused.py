"""One benchmark problem's fused forward+backward, run a few times: the program Nsight Compute
profiles on the GPU machine (`.ci/gpu-run` with PROFILE=<problem>[,<fused variant>]).

    ncu --clock-control none -k regex:fna_bwd --launch-skip 1 --launch-count 1 \\
        python3 .ci/profile_fused.py 1d-long [deterministic]
"""
import sys

import jax
import jax.numpy as jnp

import jax_natten
from jax_natten.benchmark import problems, runner


def main():
    name = sys.argv[1]
    variant = sys.argv[2] if len(sys.argv) > 2 else ""
    (problem,) = problems.select(name)
    shapes = runner.arg_shapes(problem, "attention", "fwdbwd")
    dev = jax.devices()[0]
    args = runner.input_sets(shapes, jnp.bfloat16, dev, 1, 0, name)[0]
    with jax_natten.fused_config(**runner.FUSED_VARIANTS.get(variant, {})):
        f = jax.jit(runner.function(problem, "attention", "fused", "fwdbwd"))
        for _ in range(3):
            jax.block_until_ready(f(*args))
    print("ok", name, variant or "default")


if __name__ == "__main__":
    main()
