"""A pure-JAX training loop with bn_jax: no Flax, no optax.

A two-hidden-layer MLP with BatchNorm, trained with SGD + momentum on
scikit-learn's bundled 8x8 digits (no download). It shows the whole contract
of a bn_jax normalizer in plain JAX:

* ``params`` (scale, bias) are trained like any other weights;
* ``state`` (running mean, variance) is threaded through the training step
  and returned updated, never differentiated;
* ``training=True`` for the step, ``training=False`` for evaluation.

    .venv/bin/python examples/pure_jax.py --steps 600
"""

from __future__ import annotations

import argparse
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed for init, split and batches")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # answers --help and rejects bad arguments before JAX is imported


import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import bn_jax

NORM = bn_jax.BatchNorm(momentum=0.9)  # frozen and hashable: safe to close over in jit


def load(seed: int):
    """Digits as float32 in [0, 1], split 80/20 with a fixed permutation."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm].astype(np.int32)
    n_test = len(x) // 5
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def init(key: jax.Array, sizes=(64, 128, 64, 10)):
    """Weights of Dense -> BatchNorm -> relu blocks and a Dense head; BN state."""
    params, state = [], []
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        layer = {"w": jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2.0 / n_in)}
        last = i == len(sizes) - 2
        if last:
            layer["b"] = jnp.zeros(n_out)
            state.append({})
        else:  # no Dense bias before BatchNorm: the BN bias replaces it
            layer["bn"], bn_state = NORM.init(n_out)
            state.append(bn_state)
        params.append(layer)
    return params, state


def forward(params, state, x, *, training: bool):
    """Returns ``(logits, new_state)``."""
    new_state = []
    for layer, s in zip(params[:-1], state[:-1], strict=True):
        x, s = NORM.apply(layer["bn"], s, x @ layer["w"], training=training)
        x = jax.nn.relu(x)
        new_state.append(s)
    head = params[-1]
    return x @ head["w"] + head["b"], [*new_state, {}]


def loss_fn(params, state, x, y):
    logits, new_state = forward(params, state, x, training=True)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    return loss, new_state


@jax.jit
def train_step(params, state, velocity, x, y, lr):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
    velocity = jax.tree.map(lambda v, g: 0.9 * v + g, velocity, grads)
    params = jax.tree.map(lambda p, v: p - lr * v, params, velocity)
    return params, state, velocity, loss


@jax.jit
def accuracy(params, state, x, y):
    logits, _ = forward(params, state, x, training=False)
    return jnp.mean(jnp.argmax(logits, -1) == y)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)

    (x_train, y_train), (x_test, y_test) = load(args.seed)
    params, state = init(jax.random.key(args.seed))
    velocity = jax.tree.map(jnp.zeros_like, params)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = rng.choice(len(x_train), args.batch_size, replace=False)
        params, state, velocity, loss = train_step(
            params, state, velocity, x_train[idx], y_train[idx], args.lr
        )
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            acc = float(accuracy(params, state, x_test, y_test))
            print(f"step {step:5d}  loss {float(loss):.4f}  test accuracy {acc:.4f}")
    acc = float(accuracy(params, state, x_test, y_test))
    print(f"final test accuracy {acc:.4f} ({time.perf_counter() - start:.1f} s)")
    return acc


if __name__ == "__main__":
    main()
