"""BatchNorm after training: adapt to a new domain (AdaBN), fine-tune frozen, fold.

A small plain-JAX MLP with two BatchNorm layers is trained on a source domain,
then meets a target domain whose inputs are shifted and rescaled (same labels
rule, different "sensor"). The script

1. recalibrates the BatchNorm statistics on unlabeled target inputs
   (AdaBN: ``bn_jax.recalibrate``, layer by layer with ``passes=2``),
2. fine-tunes the Dense layers on a few labelled target examples with the
   BatchNorms frozen (``training=False`` plus ``optax.set_to_zero`` on their
   scale and bias through ``optax.multi_transform``) and checks that the
   BatchNorm scale, bias and running statistics are bit for bit unchanged,
3. folds each BatchNorm into the Dense before it (``bn_jax.fold_into_dense``)
   and checks the folded network gives the same outputs.

Run: python examples/finetune_frozen.py  (a few seconds on a CPU)
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, domains and init")
    parser.add_argument("--epochs", type=int, default=4, help="source-domain training epochs")
    parser.add_argument(
        "--finetune-steps", type=int, default=50, help="frozen-BatchNorm fine-tuning steps"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # answers --help and rejects bad arguments before JAX is imported


import jax
import jax.numpy as jnp
import numpy as np
import optax

import bn_jax

BN = bn_jax.BatchNorm(momentum=0.9)
SIZES = (10, 32, 32, 3)  # input, hidden, hidden, classes
BN_LAYERS = ("bn1", "bn2")


def make_data(rng, n, teacher, *, shift=0.0, scale=1.0):
    """Inputs ``scale * z + shift`` labelled by a fixed linear rule on ``z``."""
    z = rng.normal(size=(n, SIZES[0])).astype(np.float32)
    return (scale * z + shift).astype(np.float32), np.argmax(z @ teacher, -1)


def init(rng):
    params, state = {}, {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):  # noqa: RUF007
        params[f"dense{i}"] = {
            "kernel": (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
            "bias": np.zeros(b, np.float32),
        }
    for name, width in zip(BN_LAYERS, SIZES[1:3], strict=True):
        params[name], state[name] = BN.init(width)
    return params, state


def forward(params, state, x, *, training, taps=False):
    """Returns (logits, new_state), or the BatchNorm inputs when ``taps``."""
    new_state, inputs = {}, {}
    h = x
    for i, name in enumerate(BN_LAYERS):
        h = h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
        inputs[name] = h
        h, new_state[name] = BN.apply(params[name], state[name], h, training=training)
        h = jax.nn.relu(h)
    if taps:
        return inputs
    return h @ params["dense2"]["kernel"] + params["dense2"]["bias"], new_state


def loss_fn(params, state, x, y, training):
    logits, state = forward(params, state, x, training=training)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


def make_step(tx, training):
    @jax.jit
    def step(params, state, opt_state, x, y):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, state), grads = grad_fn(params, state, x, y, training)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    return step


@jax.jit
def accuracy(params, state, x, y):
    logits, _ = forward(params, state, x, training=False)
    return jnp.mean(jnp.argmax(logits, -1) == y)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    teacher = rng.normal(size=(SIZES[0], 3))
    xs, ys = make_data(rng, 2048, teacher)
    # The target "sensor" has per-feature gains and offsets.
    domain = {"shift": rng.normal(0.0, 1.0, SIZES[0]), "scale": rng.uniform(0.5, 2.0, SIZES[0])}
    xt_unlabeled, _ = make_data(rng, 1024, teacher, **domain)
    xt_train, yt_train = make_data(rng, 128, teacher, **domain)
    xt_test, yt_test = make_data(rng, 1024, teacher, **domain)

    # Pre-train everything on the source domain (BatchNorm in training mode).
    params, state = init(rng)
    tx = optax.adam(3e-3)
    step, opt_state = make_step(tx, training=True), tx.init(params)
    for _ in range(args.epochs):
        for i in range(0, len(xs), 128):
            params, state, opt_state, _ = step(
                params, state, opt_state, xs[i : i + 128], ys[i : i + 128]
            )
    print(f"source accuracy (train set)     {accuracy(params, state, xs[:1024], ys[:1024]):.3f}")
    print(f"target accuracy, source stats   {accuracy(params, state, xt_test, yt_test):.3f}")

    # 1. AdaBN: population statistics of the target inputs. The model runs in
    # eval mode, so bn2's inputs depend on bn1's statistics: two passes make
    # both exact (pass 1 settles bn1, pass 2 measures bn2 under it).
    batches = [xt_unlabeled[i : i + 256] for i in range(0, len(xt_unlabeled), 256)]
    taps = lambda st, x: forward(params, st, x, training=False, taps=True)
    state = bn_jax.recalibrate(taps, batches, state=state, passes=len(BN_LAYERS), progress=False)
    print(f"target accuracy, AdaBN stats    {accuracy(params, state, xt_test, yt_test):.3f}")

    # 2. Fine-tune the Dense layers on 128 labelled target examples with the
    # BatchNorms frozen: eval statistics in the forward pass (training=False)
    # and no updates to their scale / bias (set_to_zero, also under weight decay).
    def labels(p):  # "frozen" for every leaf under a BatchNorm, "train" elsewhere
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if path[0].key in BN_LAYERS else "train", p
        )

    tx = optax.multi_transform({"train": optax.adamw(3e-3), "frozen": optax.set_to_zero()}, labels)
    step, opt_state = make_step(tx, training=False), tx.init(params)
    before_params, before_state = params, state
    for _ in range(args.finetune_steps):
        params, state, opt_state, _ = step(params, state, opt_state, xt_train, yt_train)
    for name in BN_LAYERS:
        for tree, old in ((params[name], before_params[name]), (state[name], before_state[name])):
            for key in tree:
                if not np.array_equal(tree[key], old[key]):
                    raise SystemExit(f"{name}/{key} changed during frozen fine-tuning")
    print(f"target accuracy, fine-tuned     {accuracy(params, state, xt_test, yt_test):.3f}")
    print("frozen BatchNorm scale, bias and running statistics: bit for bit unchanged")

    # 3. Fold each BatchNorm into the Dense before it and compare outputs.
    @jax.jit
    def fold(params, state):
        folded = {"dense2": params["dense2"]}
        for i, name in enumerate(BN_LAYERS):
            dense = params[f"dense{i}"]
            kernel, bias = bn_jax.fold_into_dense(
                dense["kernel"], dense["bias"], params[name], state[name], epsilon=BN.epsilon
            )
            folded[f"dense{i}"] = {"kernel": kernel, "bias": bias}
        return folded

    def folded_forward(p, x):  # the network without BatchNorm
        h = jax.nn.relu(x @ p["dense0"]["kernel"] + p["dense0"]["bias"])
        h = jax.nn.relu(h @ p["dense1"]["kernel"] + p["dense1"]["bias"])
        return h @ p["dense2"]["kernel"] + p["dense2"]["bias"]

    @jax.jit
    def folding_error(params, state, x):
        with jax.default_matmul_precision("highest"):
            want, _ = forward(params, state, x, training=False)
            got = folded_forward(fold(params, state), x)
        return jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))

    err = float(folding_error(params, state, xt_test))
    print(f"folded vs unfolded logits: max error {err:.1e} of the largest logit")
    if err > 1e-5:
        raise SystemExit("folding changed the outputs")
    print("ok")


if __name__ == "__main__":
    main()
