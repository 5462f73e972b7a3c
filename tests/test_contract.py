"""One contract, run over every normalizer (optax's contract-test idea).

For each member of the family: the state keeps its shapes and dtypes, it
works as a ``lax.scan`` carry, survives ``jit`` (every call here is jitted), bf16 in gives
bf16 out (with float32 state), evaluation before any training step is
finite, repeated steps do not retrace, and the config is hashable.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax

X_SHAPE = (4, 3, 6)  # [batch, time/space, features]
STEP_SHAPE = (4, 6)  # one time step of SequenceBatchNorm


def _ramp(lo, hi, steps):
    """A warm-up schedule of the step count (what BatchRenorm's paper does to rmax, dmax)."""
    return lambda count: lo + (hi - lo) * jnp.minimum(count / steps, 1.0)


CASES = {
    "BatchNorm": (bn_jax.BatchNorm(momentum=0.9), False),
    "BatchNorm-cumulative": (bn_jax.BatchNorm(momentum=None), False),
    "BatchRenorm": (bn_jax.BatchRenorm(rmax=_ramp(1.0, 3.0, 2), dmax=_ramp(0.0, 5.0, 2)), False),
    "GhostBatchNorm": (bn_jax.GhostBatchNorm(virtual_batch_size=2, momentum=0.9), False),
    "SequenceBatchNorm": (bn_jax.SequenceBatchNorm(max_steps=2, momentum=0.9), False),
    "SequenceBatchNorm-step": (bn_jax.SequenceBatchNorm(max_steps=2, momentum=0.9), True),
    "GroupNorm": (bn_jax.GroupNorm(num_groups=2), False),
    "InstanceNorm": (bn_jax.InstanceNorm(), False),
    "InstanceNorm-tracked": (bn_jax.InstanceNorm(track_running_stats=True, momentum=0.9), False),
    "LayerNorm": (bn_jax.LayerNorm(), False),
    "RMSNorm": (bn_jax.RMSNorm(), False),
}


class Harness:
    """Jitted train/eval/scan functions for one normalizer, with trace counters."""

    def __init__(self, norm, step_mode):
        self.norm, self.step_mode = norm, step_mode
        self.params, self.state = norm.init(X_SHAPE[-1])
        self.shape = STEP_SHAPE if step_mode else X_SHAPE
        self.traces = {"train": 0, "eval": 0}
        self.train = jax.jit(self._counted("train", True))
        self.eval = jax.jit(self._counted("eval", False))
        self.any_dtype = {  # not trace-counted: used with bf16 inputs
            training: jax.jit(functools.partial(self.call, training=training))
            for training in (True, False)
        }

        def body(state, inp):
            x, t = inp
            y, state = self.call(self.params, state, x, t, True)
            return state, y

        self.scan = jax.jit(lambda state, xs, ts: jax.lax.scan(body, state, (xs, ts)))

    def call(self, params, state, x, t, training):
        extra = {"step": t} if self.step_mode else {}
        return self.norm.apply(params, state, x, training=training, **extra)

    def _counted(self, name, training):
        def f(params, state, x, t):
            self.traces[name] += 1  # a Python side effect: runs only when tracing
            return self.call(params, state, x, t, training)

        return f

    def x(self, seed, dtype=np.float32):
        rng = np.random.default_rng(seed)
        return (seed + (1 + seed) * rng.standard_normal(self.shape)).astype(dtype)


@functools.cache
def harness(name):
    return Harness(*CASES[name])


names = pytest.mark.parametrize("name", list(CASES))


def assert_close(a, b, tol=1e-5):
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(
            np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=tol, atol=tol
        ),
        a,
        b,
    )


@names
def test_state_shapes_dtypes_kept_and_no_retrace(name):
    h = harness(name)
    state = h.state
    for i in range(3):
        x = h.x(i)
        y, new = h.train(h.params, state, x, jnp.int32(i))
        chex.assert_trees_all_equal_shapes_and_dtypes(new, h.state)
        chex.assert_shape(y, x.shape)
        assert y.dtype == x.dtype
        assert np.isfinite(np.asarray(y)).all()
        state = new
    y, same = h.eval(h.params, state, h.x(5), jnp.int32(7))
    chex.assert_trees_all_equal_shapes_and_dtypes(same, h.state)
    y, _ = h.eval(h.params, state, h.x(6), jnp.int32(1))
    assert h.traces["train"] == 1, h.traces
    assert h.traces["eval"] == 1, h.traces
    if h.state:  # a stateful member really updated its state
        changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state, h.state)
        assert any(jax.tree.leaves(changed))


@names
def test_scan_carry_equals_python_loop(name):
    h = harness(name)
    xs = np.stack([h.x(i) for i in range(3)])
    ts = jnp.arange(3, dtype=jnp.int32)
    final, ys = h.scan(h.state, xs, ts)
    state = h.state
    for i in range(3):
        y, state = h.train(h.params, state, xs[i], ts[i])
        assert_close(ys[i], y)
    assert_close(final, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(final, h.state)


@names
def test_bf16_in_bf16_out(name):
    h = harness(name)
    x16 = h.x(2).astype(jnp.bfloat16)
    x32 = np.asarray(x16, np.float32)
    t = jnp.int32(2)
    for training in (True, False):
        y16, s16 = h.any_dtype[training](h.params, h.state, x16, t)
        y32, s32 = (h.train if training else h.eval)(h.params, h.state, x32, t)
        assert y16.dtype == jnp.bfloat16
        chex.assert_trees_all_equal_shapes_and_dtypes(s16, h.state)  # state stays float32
        # statistics reduced in float32: only the final rounding to bf16 differs
        np.testing.assert_allclose(
            np.asarray(y16, np.float32), np.asarray(y32), rtol=1e-2, atol=1e-2
        )
        assert_close(s16, s32, 1e-6)


@names
def test_eval_before_training_is_finite(name):
    h = harness(name)
    x = h.x(3)
    y, same = h.eval(h.params, h.state, x, jnp.int32(0))
    assert np.isfinite(np.asarray(y)).all()
    assert_close(same, h.state, 0)
    if "mean" in h.state:  # the start-up regime: mean 0, var 1, no debiasing
        eps = h.norm.epsilon
        np.testing.assert_allclose(np.asarray(y), x / np.sqrt(1 + eps), rtol=1e-5, atol=1e-6)


@names
def test_config_is_hashable_and_frozen(name):
    """Hashable and compared by value: safe to close over or pass as a static argument."""
    norm, _ = CASES[name]
    copy = type(norm)(**{f.name: getattr(norm, f.name) for f in dataclasses.fields(norm)})
    assert copy == norm and hash(copy) == hash(norm) and copy is not norm
    with pytest.raises(dataclasses.FrozenInstanceError):
        norm.epsilon = 1.0
