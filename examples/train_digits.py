"""Train a small neighborhood-attention classifier on scikit-learn's 8x8 digits (no download).

Each pixel is a token on the 8x8 grid: a 3x3 convolution embeds it, then three pre-norm blocks of
2-D neighborhood attention (with relative positional bias; one block dilated) and an MLP mix the
tokens; mean pooling and a linear head classify. Flax NNX + optax; runs on JAX's default device
(CPU here, a GPU when present).

    python examples/train_digits.py                     # ~97-98% test accuracy in well under 3 min
    python examples/train_digits.py --backend reference --epochs 20 --seed 1
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jax_natten
from jax_natten.nnx import NeighborhoodAttention2D


# (kernel, dilation) of the attention blocks: local, dilated (every other pixel, span 5), local.
BLOCKS = [(3, 1), (3, 2), (3, 1)]


def library_attention(dim, heads, kernel_size, dilation, *, backend, rngs):
    """The library's Flax module: 2-D NA with relative positional bias."""
    return NeighborhoodAttention2D(heads, dim, kernel_size, dilation=dilation, rel_pos_bias=True,
                                   backend=backend, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm transformer block: x + NA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, heads, kernel_size, dilation, *, backend, attention, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = attention(dim, heads, kernel_size, dilation, backend=backend, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class DigitsNAT(nnx.Module):
    """[B, 8, 8] images in [0, 1] -> [B, 10] logits."""

    def __init__(self, *, dim=32, heads=4, backend=None, attention=library_attention, rngs):
        self.embed = nnx.Conv(1, dim, kernel_size=(3, 3), rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (8, 8, dim)))
        self.blocks = nnx.List([Block(dim, heads, k, d, backend=backend, attention=attention,
                                      rngs=rngs) for k, d in BLOCKS])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, 10, rngs=rngs)

    def __call__(self, images):
        x = self.embed(images[..., None]) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(axis=(1, 2))))


def load_data():
    """1797 digit images (8x8, scaled to [0, 1]) in a fixed, stratified 80/20 train/test split."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return train_test_split(images, digits.target, test_size=0.2, stratify=digits.target,
                            random_state=0)


def loss_fn(model, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model, optimizer, images, labels):
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model, images):
    return model(images).argmax(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="initialization and shuffling")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--backend", default=None, choices=jax_natten.BACKENDS,
                        help="jax_natten backend (default: the best available)")
    args = parser.parse_args()
    start = time.perf_counter()

    x_train, x_test, y_train, y_test = load_data()

    model = DigitsNAT(backend=args.backend, rngs=nnx.Rngs(args.seed))
    steps_per_epoch = len(x_train) // args.batch_size  # drop the last partial batch: one shape
    total_steps = args.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=max(1, total_steps // 10), decay_steps=total_steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.05), wrt=nnx.Param)

    def accuracy():
        return float(np.mean(np.asarray(predict(model, x_test)) == y_test))

    rng = np.random.default_rng(args.seed)
    print(f"device: {jax.devices()[0]}, backend: {args.backend or 'default'}, "
          f"train {len(x_train)}, test {len(x_test)}")
    bar = tqdm(total=args.epochs * steps_per_epoch, unit="step")
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        losses = []
        for i in range(steps_per_epoch):
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            losses.append(train_step(model, optimizer, x_train[batch], y_train[batch]))
            bar.update()
            if i % 8 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(losses[-1]):.4f}")
        bar.set_postfix(epoch=epoch + 1, loss=f"{float(np.mean(jnp.stack(losses))):.4f}",
                        test_acc=f"{accuracy():.3f}")
    bar.close()
    print(f"final test accuracy: {accuracy():.4f}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
