"""BatchNorm in training and eval on real numbers, with the running statistics converging.

Streams batches of 8x8 digit images (scikit-learn's bundled copy, no download)
through ``bn_jax.BatchNorm``, prints how the running mean and variance approach
the population statistics, and compares eval-mode output with training-mode
output.

    python examples/bn_basics.py [--steps 60] [--batch 32] [--momentum 0.9]
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training-mode batches to stream")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--momentum", type=float, default=0.9, help="Flax-convention momentum")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the batch order")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # answers --help and rejects bad arguments before JAX is imported


import jax
import jax.numpy as jnp
import numpy as np

import bn_jax


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    try:
        from sklearn.datasets import load_digits

        data = load_digits().data.astype(np.float32)  # (1797, 64) pixel intensities 0..16
    except ImportError:  # the examples extra brings scikit-learn; fall back to synthetic data
        data = np.random.RandomState(args.seed).gamma(2.0, 3.0, (1797, 64)).astype(np.float32)
    features = data.shape[1]
    pop_mean, pop_var = data.mean(0), data.var(0)

    norm = bn_jax.BatchNorm(momentum=args.momentum)
    params, state = norm.init(features)
    step = jax.jit(lambda s, x: norm.apply(params, s, x, training=True))

    rng = np.random.RandomState(args.seed)
    print(f"{'step':>5} {'|run_mean - pop_mean|':>22} {'|run_var - pop_var|':>20}")
    for t in range(1, args.steps + 1):
        batch = data[rng.choice(len(data), args.batch, replace=False)]
        _, state = step(state, batch)
        if t in (1, 2, 5, 10, 20, 40) or t == args.steps:
            dm = float(jnp.mean(jnp.abs(state["mean"] - pop_mean)))
            dv = float(jnp.mean(jnp.abs(state["var"] - pop_var)))
            print(f"{t:>5} {dm:>22.4f} {dv:>20.4f}")

    batch = data[:256]
    y_train, _ = norm.apply(params, state, batch, training=True)
    y_eval, _ = norm.apply(params, state, batch, training=False)
    live = pop_var > 1e-3  # a few border pixels are always 0
    print(
        f"\ntraining-mode output: mean {float(y_train[:, live].mean()):+.4f}, "
        f"std {float(y_train[:, live].std()):.4f} (batch statistics)"
    )
    print(
        f"eval-mode output:     mean {float(y_eval[:, live].mean()):+.4f}, "
        f"std {float(y_eval[:, live].std()):.4f} (running statistics)"
    )
    gap = float(jnp.abs(y_train - y_eval)[:, live].mean())
    print(f"mean |train - eval| on live pixels: {gap:.4f}")


if __name__ == "__main__":
    main()
