"""Survive bad batches: NaN and Inf inputs leave the model where a clean run leaves it.

The recipe has two guards, one per kind of state:

* ``bn_jax.BatchNorm`` never writes non-finite batch statistics into its running
  statistics; with ``count_skipped=True`` the state also counts, per feature,
  the updates it dropped (``state["skipped"]``), for the training log.
* ``optax.apply_if_finite`` drops an optimizer step whose gradient is not finite,
  so the NaN that a bad batch puts into the output and the gradients never
  reaches the parameters or the optimizer's moments.

The script trains ``dense -> BatchNorm -> relu -> dense`` on a stream into which
batches with a NaN or an Inf are injected, logs the skipped steps, checks that
parameters, optimizer state and running statistics are bit-identical to a run
that never saw the bad batches, and shows what happens without the optimizer
guard (the running statistics survive, the weights do not).

Run: python examples/bad_batches.py [--steps 200] [--bad 10] [--seed 0]
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--bad", type=int, default=10, help="bad batches injected (default 10)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="data and init seed (default 0)")
    args = parser.parse_args(argv)
    if not 0 <= args.bad <= args.steps:
        parser.error(f"--bad must be between 0 and --steps ({args.steps}), got {args.bad}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help is instant

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import bn_jax

    features, hidden = 4, 16
    norm = bn_jax.BatchNorm(momentum=0.9, count_skipped=True)

    def init(key):
        k1, k2 = jax.random.split(key)
        bn_params, bn_state = norm.init(hidden)
        params = {
            "w1": jax.random.normal(k1, (features, hidden)) / np.sqrt(features),
            "bn": bn_params,
            "w2": jax.random.normal(k2, (hidden, 1)) / np.sqrt(hidden),
        }
        return params, bn_state

    def loss_fn(params, bn_state, x, t):
        h, bn_state = norm.apply(params["bn"], bn_state, x @ params["w1"], training=True)
        return jnp.mean((jax.nn.relu(h) @ params["w2"] - t) ** 2), bn_state

    def make_step(optimizer):
        @jax.jit
        def step(params, opt_state, bn_state, x, t):
            (loss, bn_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, bn_state, x, t
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, bn_state, loss

        return step

    # A stationary stream, with a NaN or an Inf in a few random batches.
    rng = np.random.default_rng(args.seed)
    xs = rng.normal(1.0, 2.0, (args.steps, args.batch, features)).astype(np.float32)
    ts = np.tanh(xs @ rng.normal(size=(features, 1))).astype(np.float32)
    bad = sorted(int(i) for i in rng.choice(args.steps, args.bad, replace=False))
    for i in bad:
        xs[i, rng.integers(args.batch), rng.integers(features)] = rng.choice([np.nan, np.inf])

    def train(optimizer, steps, log=False):
        step = make_step(optimizer)
        params, bn_state = init(jax.random.key(args.seed))
        opt_state = optimizer.init(params)
        last = float("nan")
        for i in steps:
            params, opt_state, bn_state, loss = step(params, opt_state, bn_state, xs[i], ts[i])
            if np.isfinite(loss):
                last = float(loss)
            elif log:
                skipped = int(bn_state["skipped"].max())
                print(f"step {i:4d}: loss {float(loss)}, update skipped ({skipped} so far)")
        return params, opt_state, bn_state, last

    guarded = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=5)
    print(f"{args.steps} steps, bad batches at steps {bad}")
    params, opt_state, bn_state, loss = train(guarded, range(args.steps), log=True)
    good = [i for i in range(args.steps) if i not in bad]
    ref_params, ref_opt, ref_bn, _ = train(guarded, good)

    def same(a, b):
        return all(
            np.array_equal(u, v, equal_nan=True)
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    finite = all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves((params, bn_state)))
    identical = (
        same(params, ref_params)
        and same(opt_state.inner_state, ref_opt.inner_state)
        and same({k: bn_state[k] for k in ("mean", "var")}, {k: ref_bn[k] for k in ("mean", "var")})
    )
    print(f"last finite loss {loss:.4f}; parameters and running statistics finite: {finite}")
    print(f"skipped per feature: {np.asarray(bn_state['skipped']).tolist()}")
    print(f"optimizer steps dropped: {int(opt_state.total_notfinite)}")
    print(f"bit-identical to the run without the bad batches: {identical}")

    if bad:
        plain, _, plain_bn, _ = train(optax.adam(1e-2), range(bad[0] + 1))
        print(
            f"without apply_if_finite, after step {bad[0]}: weights finite: "
            f"{bool(np.isfinite(np.asarray(plain['w1'])).all())}, running statistics finite: "
            f"{bool(np.isfinite(np.asarray(plain_bn['mean'])).all())}"
        )
    return 0 if finite and identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
