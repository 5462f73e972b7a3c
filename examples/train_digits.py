"""Does normalization help? A fair comparison on scikit-learn's 8x8 digits.

One small Flax CNN (three 3x3 convolutions, a normalization layer after each,
global average pooling, a dense head), trained with optax SGD + momentum at a
small batch size, with the normalization layer swapped and nothing else:

* ``none``: no normalization;
* ``BatchNorm``: ``bn_jax.linen.BatchNorm``;
* ``GroupNorm``: ``bn_jax.linen.GroupNorm`` (statistics per example, no batch);
* ``BatchRenorm``: ``bn_jax.linen.BatchRenorm``, its clipping bounds ramped
  from plain BatchNorm (rmax 1, dmax 0) to rmax 3, dmax 5 over the first
  quarter of training, as the paper does.

Every normalization layer uses momentum 0.9 for its running statistics;
GroupNorm uses 4 groups.

Every variant runs on the same learning-rate grid, from the same initial
convolution and dense weights, on the same sequence of batches; the runs of
one variant train side by side (``jax.vmap`` over the learning rates), so each
variant compiles once. Test accuracy is measured in evaluation mode (running
statistics) every ``--eval-every`` steps. The script prints a table (final
test accuracy, and the first step at which test accuracy reached 95%, per
learning rate and at each variant's best learning rate) and saves a plot of
the training curves.

    .venv/bin/python examples/train_digits.py             # what `make demo` runs
    .venv/bin/python examples/train_digits.py --help
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = ("none", "BatchNorm", "GroupNorm", "BatchRenorm")
DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
TARGET = 0.95


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0]
        + " Trains one CNN per normalization variant on a shared learning-rate grid and "
        "prints a comparison table; saves a plot of the training curves.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=800, help="training steps per run")
    p.add_argument(
        "--batch-size", type=int, default=8, help="examples per batch (small on purpose)"
    )
    p.add_argument(
        "--lrs",
        type=lambda s: tuple(float(v) for v in s.split(",")),
        default=DEFAULT_LRS,
        help="comma-separated learning-rate grid, the same for every variant",
    )
    p.add_argument(
        "--variants",
        type=lambda s: tuple(s.split(",")),
        default=VARIANTS,
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    p.add_argument("--eval-every", type=int, default=50, help="steps between test evaluations")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, init and batch order")
    p.add_argument(
        "--out", type=pathlib.Path, default=ROOT / "outputs" / "train_digits.png", help="plot path"
    )
    p.add_argument(
        "--copy-to-docs",
        action="store_true",
        help="also copy the plot to docs/img/train_digits.png (the docs' figure)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {','.join(VARIANTS)}")
    if args.steps < 1 or args.eval_every < 1 or args.batch_size < 2:
        p.error("--steps and --eval-every must be >= 1 and --batch-size >= 2")
    return args


if __name__ == "__main__":
    parse_args(sys.argv[1:])  # answers --help and rejects bad arguments before JAX is imported

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

from bn_jax import linen as bnn


@functools.cache
def renorm_schedules(warmup: int) -> tuple[Callable, Callable]:
    """Batch Renorm's clipping bounds, ramped as in the paper: rmax 1 -> 3, dmax 0 -> 5.

    Cached so that the same warmup gives the same function objects (BatchRenorm
    hashes schedules by identity).
    """
    return optax.linear_schedule(1.0, 3.0, warmup), optax.linear_schedule(0.0, 5.0, warmup)


def norm_layer(name: str, train: bool, warmup: int) -> Callable[[jax.Array], jax.Array]:
    """The normalization layer of a variant, created inside a compact module."""
    if name == "none":
        return lambda x: x
    if name == "BatchNorm":
        return bnn.BatchNorm(use_running_average=not train, momentum=0.9)
    if name == "GroupNorm":
        return bnn.GroupNorm(num_groups=4)
    if name == "BatchRenorm":
        rmax, dmax = renorm_schedules(warmup)
        return bnn.BatchRenorm(use_running_average=not train, momentum=0.9, rmax=rmax, dmax=dmax)
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


class CNN(nn.Module):
    """conv-norm-relu x3, global average pooling, dense: the same for every variant."""

    norm: str
    renorm_warmup: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for features, stride in ((16, 1), (32, 2), (32, 1)):
            x = nn.Conv(features, (3, 3), strides=stride)(x)
            x = norm_layer(self.norm, train, self.renorm_warmup)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean((1, 2)))


def load(seed: int) -> tuple[np.ndarray, ...]:
    """Digits as [N, 8, 8, 1] float32 in [0, 1]; a fixed 80/20 split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm].astype(np.int32)
    n_test = len(x) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def shared_init(seed: int, x: jax.Array) -> dict[str, Any]:
    """Conv and dense weights shared by every variant (normalizers add their own)."""
    return CNN("none").init(jax.random.key(seed), x, train=False)["params"]


def make_runner(name: str, data: tuple[np.ndarray, ...], base_params: dict[str, Any], steps: int):
    """Jitted ``init(lrs)``, ``train_chunk(state, idx, lrs)``, ``evaluate(state)`` for a variant."""
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)
    model = CNN(name, renorm_warmup=max(1, steps // 4))
    variables = model.init(jax.random.key(0), x_train[:2], train=False)
    # Same conv / dense weights as every other variant; norm params from their own init.
    params = {**variables["params"], **base_params}
    stats = variables.get("batch_stats", {})
    tx = optax.sgd(1.0, momentum=0.9)  # scaled by each run's learning rate below

    def loss_fn(params, stats, xb, yb):
        logits, updates = model.apply(
            {"params": params, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, updates.get("batch_stats", {})

    def one_run(carry, idx, lr):
        def step(carry, i):
            params, stats, opt = carry
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, stats, x_train[i], y_train[i]
            )
            updates, opt = tx.update(grads, opt, params)
            params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
            return (params, stats, opt), loss

        return jax.lax.scan(step, carry, idx)

    @jax.jit
    def init(lrs):
        one = (params, stats, tx.init(params))
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (len(lrs), *a.shape)), one)

    @jax.jit
    def train_chunk(carry, idx, lrs):
        return jax.vmap(one_run, in_axes=(0, None, 0))(carry, idx, lrs)

    @jax.jit
    def evaluate(carry):
        def acc(params, stats):
            logits = model.apply({"params": params, "batch_stats": stats}, x_test, train=False)
            return jnp.mean(jnp.argmax(logits, -1) == y_test)

        return jax.vmap(acc)(carry[0], carry[1])

    return init, train_chunk, evaluate


def train_variant(name, data, base_params, order, lrs, eval_every, progress) -> dict[str, Any]:
    """Trains one variant at every learning rate; returns its curves."""
    init, train_chunk, evaluate = make_runner(name, data, base_params, len(order))
    lrs = jnp.asarray(lrs, jnp.float32)
    carry = init(lrs)
    steps, accs, losses = [0], [np.asarray(evaluate(carry))], []
    bar = tqdm(total=len(order), desc=f"{name:>11}", unit="step", disable=not progress, ncols=90)
    start = time.perf_counter()
    for begin in range(0, len(order), eval_every):
        idx = order[begin : begin + eval_every]
        carry, loss = train_chunk(carry, jnp.asarray(idx), lrs)
        steps.append(begin + len(idx))
        accs.append(np.asarray(evaluate(carry)))
        losses.append(np.asarray(loss).mean(1))
        bar.update(len(idx))
        bar.set_postfix(best_acc=f"{accs[-1].max():.3f}")
    bar.close()
    return {
        "steps": np.asarray(steps),
        "acc": np.stack(accs, 1),  # [lr, eval]
        "loss": np.stack(losses, 1),  # [lr, chunk]: mean training loss per chunk
        "seconds": time.perf_counter() - start,
    }


def steps_to(acc: np.ndarray, steps: np.ndarray, target: float = TARGET) -> int | None:
    """First evaluated step with accuracy >= target, or None."""
    hit = np.nonzero(acc >= target)[0]
    return int(steps[hit[0]]) if hit.size else None


def summarize(results: dict[str, dict[str, Any]], lrs: Sequence[float]) -> str:
    """The comparison table, per learning rate and at each variant's best."""
    fmt_steps = lambda s: "never" if s is None else str(s)
    lines = [
        f"Final test accuracy (steps to reach {TARGET:.0%} test accuracy) per learning rate:",
        "",
        "| variant | " + " | ".join(f"lr={lr:g}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for name, r in results.items():
        cells = [
            f"{r['acc'][i, -1]:.3f} ({fmt_steps(steps_to(r['acc'][i], r['steps']))})"
            for i in range(len(lrs))
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "At each variant's best learning rate (highest final accuracy):",
        "",
        f"| variant | best lr | final test acc | best test acc | steps to {TARGET:.0%} |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        i = int(np.argmax(r["acc"][:, -1]))
        s = steps_to(r["acc"][i], r["steps"])
        lines.append(
            f"| {name} | {lrs[i]:g} | {r['acc'][i, -1]:.3f} | {r['acc'][i].max():.3f} "
            f"| {fmt_steps(s)} |"
        )
    if "none" in results and "BatchNorm" in results:
        none, bn = results["none"]["acc"][:, -1], results["BatchNorm"]["acc"][:, -1]
        failed = [i for i in range(len(lrs)) if not none[i] >= 0.5]  # NaN counts as failed
        lines.append("")
        if failed:
            lines.append(
                "Where the unnormalized model failed (< 50% test accuracy): "
                + "; ".join(
                    f"lr={lrs[i]:g}: none {none[i]:.3f}, BatchNorm {bn[i]:.3f}" for i in failed
                )
                + "."
            )
        else:
            lines.append(
                "The unnormalized model trained (>= 50%) at every learning rate of the grid."
            )
    return "\n".join(lines)


def high_lr_index(results: dict[str, dict[str, Any]], lrs: Sequence[float]) -> int:
    """The smallest learning rate at which the unnormalized model failed, else the largest."""
    if "none" in results:
        failed = [i for i, a in enumerate(results["none"]["acc"][:, -1]) if not a >= 0.5]
        if failed:
            return failed[0]
    return len(lrs) - 1


def plot(results: dict[str, dict[str, Any]], lrs: Sequence[float], path: pathlib.Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
    hi = high_lr_index(results, lrs)
    for name, r in results.items():
        best = int(np.argmax(r["acc"][:, -1]))
        (line,) = axes[0].plot(r["steps"], r["acc"][best], label=f"{name} (lr={lrs[best]:g})")
        axes[1].plot(r["steps"], r["acc"][hi], color=line.get_color(), label=name)
        axes[2].semilogx(lrs, r["acc"][:, -1], "o-", color=line.get_color(), label=name)
    axes[0].set_title("test accuracy, each at its best lr")
    axes[1].set_title(f"test accuracy at lr={lrs[hi]:g}")
    axes[2].set_title("final test accuracy vs learning rate")
    for ax in axes[:2]:
        ax.set_xlabel("training step")
        ax.axhline(TARGET, color="gray", lw=0.8, ls="--")
    axes[2].set_xlabel("learning rate (SGD, momentum 0.9)")
    for ax in axes:
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left" if ax is axes[2] else "lower right")
    axes[0].set_ylabel("test accuracy")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    start = time.perf_counter()
    data = load(args.seed)
    n_train = len(data[0])
    print(
        f"digits: {n_train} train / {len(data[2])} test images (8x8); batch {args.batch_size}, "
        f"{args.steps} steps (~{args.steps * args.batch_size / n_train:.1f} epochs); "
        f"lr grid {list(args.lrs)}; seed {args.seed}; {jax.default_backend()} backend"
    )
    # The same batches, in the same order, for every variant and learning rate.
    rng = np.random.default_rng(args.seed)
    epochs = -(-args.steps * args.batch_size // n_train)
    order = np.concatenate([rng.permutation(n_train) for _ in range(epochs)])
    order = order[: args.steps * args.batch_size].reshape(args.steps, args.batch_size)
    base_params = shared_init(args.seed, jnp.asarray(data[0][:2]))
    results = {}
    for name in args.variants:
        results[name] = train_variant(
            name, data, base_params, order, args.lrs, args.eval_every, not args.no_progress
        )
    print()
    print(summarize(results, args.lrs))
    title = (
        f"8x8 digits, same CNN with each normalization, batch {args.batch_size}, "
        f"{args.steps} steps, seed {args.seed}"
    )
    plot(results, args.lrs, args.out, title)
    print(f"\nplot saved to {args.out}")
    if args.copy_to_docs:
        dest = ROOT / "docs" / "img" / "train_digits.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.out, dest)
        print(f"copied to {dest}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
