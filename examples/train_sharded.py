"""Data-parallel (and optionally head-parallel) training of a small NA model over every device.

The same digits classifier as `train_digits.py` (8x8 pixels as tokens, 2-D neighborhood attention
blocks), trained with the batch split over a `Mesh` axis "data" by `NamedSharding`: `jax.jit`
compiles one program per device, the NA custom calls run on each device's batch block
(jax_natten's custom_partitioning rule: no all-gather of q/k/v), and XLA all-reduces the
gradients. With `--model-parallel M` the mesh is (devices / M, M) and the attention blocks split
their heads over the "model" axis as well (Megatron-style: q/k/v projections split by output
columns, i.e. by heads; the output projection by input rows), so NA runs on each device's heads.

    # 8 simulated devices on a CPU (set before JAX starts), data parallel, then 4 x 2:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_sharded.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_sharded.py \\
        --model-parallel 2
    python examples/train_sharded.py            # every visible GPU (or the one CPU device)

Multi-host (several machines / processes, e.g. GPU nodes or a TPU pod slice): start the same
script on every host and call `jax.distributed.initialize()` first (the coordinator address,
process count and id come from the cluster environment or its arguments). `jax.devices()` then
lists the devices of all hosts and the mesh below spans them; each process must feed only the
batch rows its local devices hold, e.g. build the global batch with
`jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_rows)` instead of
`jax.device_put`, and keep `--batch-size` divisible by the number of data shards. Nothing else
changes: the NA ops are partitioned the same way whatever the device count.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_natten
# The model, data and steps of the single-device example (this script's folder is on sys.path).
from train_digits import DigitsNAT, library_attention, load_data, predict, train_step


class HeadParallelNA(nnx.Module):
    """2-D NA with separate q/k/v projections whose columns (heads) split over mesh axis
    "model", and an output projection split by rows: every device attends with its own heads."""

    def __init__(self, dim, heads, kernel_size, dilation, *, backend, rngs):
        cols = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
        rows = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("model", None))
        bias = nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",))
        self.q, self.k, self.v = (nnx.Linear(dim, dim, kernel_init=cols, bias_init=bias,
                                             rngs=rngs) for _ in range(3))
        self.proj = nnx.Linear(dim, dim, kernel_init=rows, rngs=rngs)
        self.rpb = nnx.Param(0.02 * jax.random.normal(rngs.params(), (heads, 2 * kernel_size - 1,
                                                                      2 * kernel_size - 1)),
                             sharding=("model", None, None))
        self.heads, self.kernel_size, self.dilation, self.backend = \
            heads, kernel_size, dilation, backend

    def __call__(self, x):
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # [..., C] -> [..., H, D]
        out = jax_natten.na2d(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                              self.kernel_size, dilation=self.dilation, rpb=self.rpb[...],
                              backend=self.backend)
        return self.proj(out.reshape(x.shape))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--model-parallel", type=int, default=1, metavar="M",
                        help="split the attention heads over M devices too (M divides 4)")
    parser.add_argument("--backend", default=None, choices=jax_natten.BACKENDS)
    args = parser.parse_args()
    start = time.perf_counter()

    devices = np.array(jax.devices())
    m = args.model_parallel
    if len(devices) % m or 4 % m:
        raise SystemExit(f"--model-parallel {m} must divide the device count ({len(devices)}) "
                         "and the 4 heads")
    mesh = Mesh(devices.reshape(-1, m), ("data", "model"))
    data = NamedSharding(mesh, P("data"))
    if args.batch_size % mesh.shape["data"]:
        raise SystemExit(f"--batch-size must be divisible by the {mesh.shape['data']} data shards")

    x_train, x_test, y_train, y_test = load_data()
    n_test = len(x_test) // mesh.shape["data"] * mesh.shape["data"]  # evenly split test batch
    x_test, y_test = x_test[:n_test], y_test[:n_test]

    steps_per_epoch = len(x_train) // args.batch_size
    total = args.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, total // 10), total)

    @nnx.jit
    def create():
        """Model and optimizer, each parameter placed by its partitioning annotation
        (replicated unless annotated)."""
        model = DigitsNAT(attention=HeadParallelNA if m > 1 else library_attention,
                          backend=args.backend, rngs=nnx.Rngs(args.seed))
        optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.05),
                                  wrt=nnx.Param)
        state = nnx.state((model, optimizer))
        nnx.update((model, optimizer),
                   jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
        return model, optimizer

    with jax.set_mesh(mesh):
        model, optimizer = create()
        put = lambda x: jax.device_put(x, data)
        x_test_d, y_test_d = put(x_test), y_test
        compiled = train_step.lower(model, optimizer, put(x_train[:args.batch_size]),
                                    put(y_train[:args.batch_size])).compile().as_text()
        print(f"mesh {dict(mesh.shape)} on {devices[0].platform}, backend "
              f"{args.backend or 'default'}; collectives per step: "
              + ", ".join(f"{op} {compiled.count(f' {op}(')}"
                          for op in ("all-reduce", "all-gather", "reduce-scatter",
                                     "collective-permute")))
        rng = np.random.default_rng(args.seed)
        for epoch in range(args.epochs):
            order = rng.permutation(len(x_train))
            losses = []
            for i in range(steps_per_epoch):
                batch = order[i * args.batch_size:(i + 1) * args.batch_size]
                losses.append(train_step(model, optimizer, put(x_train[batch]),
                                         put(y_train[batch])))
            acc = float(np.mean(np.asarray(predict(model, x_test_d)) == y_test_d))
            print(f"epoch {epoch + 1}: loss {float(np.mean(jnp.stack(losses))):.4f}, "
                  f"test accuracy {acc:.3f}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
