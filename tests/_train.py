"""A tiny BatchNorm model and its training step, shared by the reliability tests.

``dense -> BatchNorm -> relu -> dense`` regressing a linear target, trained with
Adam behind ``optax.apply_if_finite`` (the recipe of ``docs/reliability.md``):
a step whose gradient is not finite changes neither the parameters nor the
optimizer's moments, and BatchNorm's guard keeps the running statistics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import bn_jax

D_IN, HIDDEN = 4, 8


class Trainer(NamedTuple):
    norm: bn_jax.BatchNorm
    optimizer: optax.GradientTransformation
    step: Any  # (params, opt_state, bn_state, x, t) -> (params, opt_state, bn_state, loss)


def init(norm: bn_jax.BatchNorm, optimizer: optax.GradientTransformation, seed: int = 0):
    """``(params, opt_state, bn_state)`` of a fresh model."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    bn_params, bn_state = norm.init(HIDDEN)
    params = {
        "w1": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN),
        "bn": bn_params,
        "w2": jax.random.normal(k2, (HIDDEN, 1)) / np.sqrt(HIDDEN),
    }
    return params, optimizer.init(params), bn_state


def guarded_adam(learning_rate: float = 1e-2) -> optax.GradientTransformation:
    """Adam that skips any step whose gradient has a NaN or an Inf."""
    return optax.apply_if_finite(optax.adam(learning_rate), max_consecutive_errors=5)


def loss_fn(norm, params, bn_state, x, t, global_batch):
    h, bn_state = norm.apply(params["bn"], bn_state, x @ params["w1"], training=True)
    y = jax.nn.relu(h) @ params["w2"]
    return jnp.sum((y - t) ** 2) / global_batch, bn_state


def make_trainer(optimizer: optax.GradientTransformation, mesh=None, **bn_options) -> Trainer:
    """A jitted training step on one device, or under ``shard_map`` over ``mesh``
    (axis ``"d"``; batches sharded, everything else replicated)."""
    axis = None if mesh is None else "d"
    norm = bn_jax.BatchNorm(momentum=0.9, axis_name=axis, **bn_options)

    def step(params, opt_state, bn_state, x, t):
        batch = x.shape[0] * (1 if mesh is None else mesh.shape["d"])
        (loss, bn_state), grads = jax.value_and_grad(
            lambda p: loss_fn(norm, p, bn_state, x, t, batch), has_aux=True
        )(params)
        # Replicated params: shard_map already sums their gradient over devices.
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if mesh is not None:
            loss = jax.lax.psum(loss, "d")
        return params, opt_state, bn_state, loss

    if mesh is not None:
        step = jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(), P(), P(), P("d"), P("d")),
            out_specs=(P(), P(), P(), P()),
        )
    return Trainer(norm, optimizer, jax.jit(step))


def stream(steps: int, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` batches of a stationary stream: inputs ``[steps, batch, D_IN]`` with
    per-feature offsets and scales, and a noisy linear target ``[steps, batch, 1]``."""
    rng = np.random.default_rng(seed)
    offset, spread = rng.normal(size=D_IN), rng.uniform(0.5, 2.0, D_IN)
    xs = offset + spread * rng.standard_normal((steps, batch, D_IN))
    ts = xs @ rng.normal(size=(D_IN, 1)) + 0.1 * rng.standard_normal((steps, batch, 1))
    return xs.astype(np.float32), ts.astype(np.float32)


def train(trainer: Trainer, carry, xs, ts, steps=None):
    """Runs ``trainer.step`` over the batches with index in ``steps`` (all by
    default); returns the final ``(params, opt_state, bn_state)``."""
    params, opt_state, bn_state = carry
    for i in range(len(xs)) if steps is None else steps:
        params, opt_state, bn_state, _ = trainer.step(params, opt_state, bn_state, xs[i], ts[i])
        # One step in flight at a time: XLA:CPU's in-process collectives can
        # deadlock when two executions of a multi-device program overlap.
        jax.block_until_ready(params)
    return params, opt_state, bn_state
