"""Save and restore BatchNorm params and state with orbax-checkpoint, bit for bit.

Trains a plain-JAX model with ``bn_jax.BatchNorm`` for a few steps, saves its
``params``, BatchNorm ``state`` (running mean / var, and the per-feature
``count`` of ``momentum=None``) and optimizer state into a temporary directory
with ``orbax.checkpoint.StandardCheckpointer``, restores them into the same
shapes and dtypes, and checks that every array comes back bit for bit (bf16
parameters and int32 counts included) and that training resumes identically.

Needs orbax-checkpoint (``pip install orbax-checkpoint``; in the test extra).
Run: python examples/checkpoint.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps before saving")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the init")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # answers --help and rejects bad arguments before JAX is imported


import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import bn_jax

BN = bn_jax.BatchNorm(momentum=None)  # exact cumulative average: state has a count


def init(rng):
    bn_params, bn_state = BN.init(16)
    params = {
        "dense0": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)},
        "bn": bn_params,
        "dense1": {"kernel": jnp.asarray(rng.normal(size=(16, 1)) / 4, jnp.float32)},
    }
    return params, {"bn": bn_state}


def loss_fn(params, state, x, y):
    h = (x.astype(jnp.bfloat16) @ params["dense0"]["kernel"]).astype(jnp.float32)
    h, bn_state = BN.apply(params["bn"], state["bn"], h, training=True)
    pred = jax.nn.relu(h) @ params["dense1"]["kernel"]
    return jnp.mean((pred[:, 0] - y) ** 2), {"bn": bn_state}


tx = optax.adam(1e-2)


@jax.jit
def step(params, state, opt_state, x, y):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss


def same_bits(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    x = rng.normal(2.0, 3.0, size=(64, 8)).astype(np.float32)
    y = np.sin(x.sum(-1)).astype(np.float32)
    params, state = init(rng)
    opt_state = tx.init(params)
    for _ in range(args.steps):
        params, state, opt_state, _ = step(params, state, opt_state, x, y)
    tree = {"params": params, "state": state, "opt_state": opt_state}

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"step_{args.steps}"
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path, tree)
            ckpt.wait_until_finished()
            # Restore into the same structure, shapes and dtypes (also shardings).
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
            restored = ckpt.restore(path, target)

    print(f"bn state after {args.steps} steps: count", np.asarray(state["bn"]["count"][:4]), "...")
    if not same_bits(restored, tree):
        raise SystemExit("restored checkpoint differs from the saved one")
    print("restored params, BatchNorm state and optimizer state: bit for bit equal")

    a = step(params, state, opt_state, x, y)
    b = step(restored["params"], restored["state"], restored["opt_state"], x, y)
    if not same_bits(a, b):
        raise SystemExit("training from the restored checkpoint diverged")
    print("one more step from the original and from the restored tree: identical")
    print("ok")


if __name__ == "__main__":
    main()
