"""A ``flax.nnx`` model with ``bn_jax.nnx.BatchNorm``: train / eval switch.

An MLP on scikit-learn's bundled 8x8 digits, trained for a few hundred steps
with ``nnx.Optimizer`` and optax. ``bn_jax.nnx.BatchNorm`` takes the arguments
of ``flax.nnx.BatchNorm``, so the model is written as it would be with Flax's
layer; ``model.train()`` makes BatchNorm use (and update) batch statistics,
``model.eval()`` makes it use the running statistics.

    .venv/bin/python examples/nnx_model.py --steps 300
"""

from __future__ import annotations

import argparse
import itertools
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed for init, split and batches")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # answers --help and rejects bad arguments before JAX is imported


import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from bn_jax import nnx as bnnx


class MLP(nnx.Module):
    """Linear -> BatchNorm -> relu, twice, and a linear head."""

    def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
        pairs = list(itertools.pairwise(sizes[:-1]))  # (in, out) of the hidden layers
        self.hidden = nnx.List([nnx.Linear(a, b, use_bias=False, rngs=rngs) for a, b in pairs])
        self.norms = nnx.List([bnnx.BatchNorm(b, momentum=0.9, rngs=rngs) for b in sizes[1:-1]])
        self.head = nnx.Linear(sizes[-2], sizes[-1], rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for linear, norm in zip(self.hidden, self.norms, strict=True):
            x = nnx.relu(norm(linear(x)))
        return self.head(x)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)  # BatchNorm's running stats update in place
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(model(x), -1) == y)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(args.seed).permutation(len(x))
    x, y = x[perm], y[perm].astype(np.int32)
    n_test = len(x) // 5
    x_test, y_test, x_train, y_train = x[:n_test], y[:n_test], x[n_test:], y[n_test:]

    model = MLP((64, 128, 64, 10), rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()  # BatchNorm: batch statistics, running statistics updated
        idx = rng.choice(len(x_train), args.batch_size, replace=False)
        loss = train_step(model, optimizer, x_train[idx], y_train[idx])
        if step % max(1, args.steps // 3) == 0 or step == args.steps:
            model.eval()  # BatchNorm: running statistics, nothing updated
            acc = float(accuracy(model, x_test, y_test))
            print(f"step {step:4d}  loss {float(loss):.4f}  test accuracy {acc:.4f}")

    model.eval()
    mean_before = np.asarray(model.norms[0].mean[...])
    one = model(x_test[:1])  # eval mode: an example's output does not depend on its batch
    in_batch = model(x_test[:64])[:1]
    print(
        "eval mode: one example alone vs inside a batch of 64, max difference "
        f"{float(jnp.abs(one - in_batch).max()):.2e}; running mean unchanged: "
        f"{bool(np.array_equal(mean_before, np.asarray(model.norms[0].mean[...])))}"
    )
    acc = float(accuracy(model, x_test, y_test))
    print(f"final test accuracy {acc:.4f} ({time.perf_counter() - start:.1f} s)")
    return acc


if __name__ == "__main__":
    main()
