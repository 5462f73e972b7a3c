"""A Flax ResNet-style network switched to bn_jax's BatchNorm by one import.

The model below is plain ``flax.linen``; the only bn_jax line is the import of
``bnn``. Everything else (``init``, ``apply`` with ``mutable=["batch_stats"]``,
the optax loop, the checkpointable variables) stays as it was.

    python examples/flax_resnet_block.py            # bn_jax.linen.BatchNorm
    python examples/flax_resnet_block.py --flax     # flax.linen.BatchNorm, to compare

The data are synthetic 8x8 images (a class pattern plus noise); the run takes
a few seconds on a CPU, most of it compilation. With ``--flax`` the same script
uses Flax's layer: the variables tree is identical and the losses agree to a
few digits (they differ only by rounding: bn_jax's default variance formula is
the accurate one, Flax's default the fast one).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="Adam steps")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--flax", action="store_true", help="use flax.linen.BatchNorm instead")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # answers --help and rejects bad arguments before JAX is imported


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

if "--flax" in sys.argv:
    import flax.linen as bnn  # Flax's own BatchNorm, for comparison
else:
    from bn_jax import linen as bnn  # the one changed import (was: import flax.linen as bnn)


class ResidualBlock(nn.Module):
    """conv-BN-relu-conv-BN plus a (projected) shortcut, then relu (He et al., 2016)."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = partial(bnn.BatchNorm, use_running_average=not train, momentum=0.9)
        y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = norm(scale_init=nn.initializers.zeros)(y)  # zero-init the residual branch
        if x.shape != y.shape:
            x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x)
            x = norm()(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        x = nn.relu(bnn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = ResidualBlock(16)(x, train)
        x = ResidualBlock(32, strides=2)(x, train)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes of 8x8x3 images: a class-specific pattern plus noise."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(0).normal(size=(4, 8, 8, 3))
    labels = rng.integers(0, 4, n)
    x = patterns[labels] + rng.normal(size=(n, 8, 8, 3))
    return x.astype(np.float32), labels


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    model = ResNet()
    x_train, y_train = make_data(args.steps * args.batch, seed=1)
    x_test, y_test = make_data(512, seed=2)
    variables = jax.jit(partial(model.init, train=False))(jax.random.key(0), x_train[:2])
    print(f"BatchNorm from: {bnn.BatchNorm.__module__}")
    print("variables:", jax.tree.map(jnp.shape, variables["batch_stats"]["ResidualBlock_0"]))

    tx = optax.adam(3e-3)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def accuracy(params, batch_stats, x, y):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return (logits.argmax(-1) == y).mean()

    start = time.perf_counter()
    for i in range(args.steps):
        sl = slice(i * args.batch, (i + 1) * args.batch)
        params, batch_stats, opt_state, loss = train_step(
            params, batch_stats, opt_state, x_train[sl], y_train[sl]
        )
        if i % 20 == 0 or i == args.steps - 1:
            print(f"step {i:3d}  loss {float(loss):.4f}")
    acc = float(accuracy(params, batch_stats, x_test, y_test))
    print(f"eval accuracy {acc:.3f}  ({time.perf_counter() - start:.1f}s including compilation)")


if __name__ == "__main__":
    main()
