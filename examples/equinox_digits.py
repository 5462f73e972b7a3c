"""An Equinox CNN with bn_jax's BatchNorm, trained on scikit-learn's 8x8 digits.

The model is plain Equinox (``eqx.nn.Conv2d``, ``eqx.nn.BatchNorm``,
``eqx.nn.Linear`` in an ``eqx.nn.Sequential``), built with Equinox's own
layers; ``bn_jax.equinox.convert`` swaps its BatchNorms for bn_jax's drop-in,
keeping the weights and the ``eqx.nn.State``. (``--no-convert`` keeps
Equinox's layer, for comparison.) Training is Equinox's idiom: one example per
call, ``jax.vmap(model, axis_name="batch")`` over the batch, ``eqx.filter_jit``
and ``eqx.filter_value_and_grad`` around it, optax SGD with momentum. The
BatchNorms use ``mode="batch"``; test accuracy is measured in inference mode
(running statistics) during and after training.

    .venv/bin/python examples/equinox_digits.py
    .venv/bin/python examples/equinox_digits.py --help
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--momentum", type=float, default=0.9, help="BatchNorm momentum")
    p.add_argument("--eval-every", type=int, default=100, help="steps between test evaluations")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, init and batch order")
    p.add_argument(
        "--no-convert",
        action="store_true",
        help="keep Equinox's own BatchNorm (to compare with bn_jax's)",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or args.batch_size < 2:
        p.error("--steps and --eval-every must be >= 1 and --batch-size >= 2")
    return args


if __name__ == "__main__":
    parse_args(sys.argv[1:])  # answers --help and rejects bad arguments before JAX is imported

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import bn_jax.equinox as bnx


def make_model(key: jax.Array, momentum: float, batch_norm: Any = eqx.nn.BatchNorm) -> Any:
    """conv-BN-relu x3, global average pooling, linear: Equinox's layers, channels first
    (``batch_norm``: the BatchNorm class)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(1, 16, 3, padding=1, use_bias=False, key=k1),
            batch_norm(16, "batch", momentum=momentum, mode="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, use_bias=False, key=k2),
            batch_norm(32, "batch", momentum=momentum, mode="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Conv2d(32, 32, 3, padding=1, use_bias=False, key=k3),
            batch_norm(32, "batch", momentum=momentum, mode="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(lambda x: jnp.mean(x, axis=(1, 2))),
            eqx.nn.Linear(32, 10, key=k4),
        ]
    )


def load(seed: int) -> tuple[np.ndarray, ...]:
    """Digits as [N, 1, 8, 8] float32 in [0, 1] (channels first); a fixed 80/20 split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm].astype(np.int32)
    n_test = len(x) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def batched(model: Any) -> Any:
    """The model on one example, mapped over a batch that shares BatchNorm statistics."""
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


def make_step(optimizer: optax.GradientTransformation) -> Any:
    """One jitted training step: loss, gradients, optimizer update, new BatchNorm state."""

    def loss_fn(model, state, x, y):
        logits, state = batched(model)(x, state)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    @eqx.filter_jit
    def step(model, state, opt_state, x, y):
        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, opt_state, loss

    return step


@eqx.filter_jit
def accuracy(model: Any, state: eqx.nn.State, x: jax.Array, y: jax.Array) -> jax.Array:
    """Test accuracy in inference mode (the running statistics, no update)."""
    logits, _ = batched(eqx.nn.inference_mode(model))(x, state)
    return jnp.mean(jnp.argmax(logits, -1) == y)


def train(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Trains the model; returns the final model, state, losses and test accuracies."""
    x_train, y_train, x_test, y_test = load(args.seed)
    model, state = eqx.nn.make_with_state(make_model)(jax.random.key(args.seed), args.momentum)
    if not args.no_convert:
        model = bnx.convert(model)  # the same weights and state, computed by bn_jax
    optimizer = optax.sgd(args.lr, momentum=0.9)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    step = make_step(optimizer)
    rng = np.random.default_rng(args.seed)
    losses, accs = [], []
    for i in range(1, args.steps + 1):
        idx = rng.choice(len(x_train), args.batch_size, replace=False)
        model, state, opt_state, loss = step(model, state, opt_state, x_train[idx], y_train[idx])
        losses.append(float(loss))
        if i % args.eval_every == 0 or i == args.steps:
            accs.append((i, float(accuracy(model, state, x_test, y_test))))
            log(
                f"step {i:5d}  loss {np.mean(losses[-args.eval_every :]):.4f}  "
                f"test accuracy (inference mode) {accs[-1][1]:.3f}"
            )
    return {"model": model, "state": state, "losses": losses, "accuracy": accs}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    layer = "eqx.nn.BatchNorm" if args.no_convert else "bn_jax.equinox.BatchNorm"
    print(f"Equinox CNN on digits, BatchNorm: {layer}, batch {args.batch_size}")
    result = train(args)
    print(f"final test accuracy: {result['accuracy'][-1][1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
