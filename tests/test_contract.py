"""One contract, run over every normalizer of ``tests/registry.py`` (optax's
contract-test idea).

For each member of the family and its variants: it satisfies the
``bn_jax.Normalizer`` protocol as a flat, frozen, keyword-only dataclass; its
state has the registry's layout, keeps its shapes and dtypes, works as a
``lax.scan`` carry and survives ``jit`` (every call here is jitted); one
training step matches the float64 reference; bf16 in gives bf16 out (with
float32 state); evaluation before any training step is finite; repeated steps
do not retrace; the config is hashable; ``allow_single_value`` computes what
the reference does where the default raises.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
from bn_jax.norms._common import BatchFields, NormFields
from tests import registry
from tests.registry import NAMES, NORMALIZERS, X_SHAPE

STEP_SHAPE = (X_SHAPE[0], X_SHAPE[2])  # one time step of SequenceBatchNorm
CASES = registry.contract_cases()


class Harness:
    """Jitted train/eval/scan functions for one normalizer, with trace counters."""

    def __init__(self, norm, step_mode):
        self.norm, self.step_mode = norm, step_mode
        self.params, self.state = norm.init(registry.C)
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


# ------------------------------------------------------------- the protocol


def _params_of(fn):
    return list(inspect.signature(fn).parameters.values())


@pytest.mark.parametrize("name", NAMES)
def test_satisfies_the_normalizer_protocol(name):
    """``init`` and ``apply`` take the protocol's parameters (same names, kinds and
    defaults); anything more is keyword-only with a default."""
    entry = NORMALIZERS[name]
    norm = entry.build()
    assert isinstance(norm, bn_jax.Normalizer)
    for method in ("init", "apply"):
        want = _params_of(getattr(bn_jax.Normalizer, method))
        got = _params_of(getattr(entry.cls, method))
        assert [(p.name, p.kind, p.default) for p in got[: len(want)]] == [
            (p.name, p.kind, p.default) for p in want
        ], (name, method)
        for extra in got[len(want) :]:
            assert extra.kind is inspect.Parameter.KEYWORD_ONLY, (name, extra)
            assert extra.default is not inspect.Parameter.empty, (name, extra)


@pytest.mark.parametrize("name", NAMES)
def test_flat_frozen_keyword_only_dataclass(name):
    """No normalizer inherits from another: the only bases are the field declarations
    they share (NormFields, BatchFields), which have no methods; every field is
    keyword-only, so no two normalizers take fields positionally in different orders."""
    cls = NORMALIZERS[name].cls
    assert set(cls.__mro__[1:]) <= {NormFields, BatchFields, object}, cls.__mro__
    for base in (NormFields, BatchFields):
        fields = {f.name for f in dataclasses.fields(base)}
        methods = {k for k, v in vars(base).items() if callable(v) and k not in fields}
        assert not {k for k in methods if not k.startswith("__")}  # fields only
    params = cls.__dataclass_params__
    assert params.frozen
    assert all(f.kw_only for f in dataclasses.fields(cls))
    with pytest.raises(TypeError, match="positional"):
        cls(1e-3, **NORMALIZERS[name].config)


def test_registry_lists_every_normalizer():
    """A normalizer exported by bn_jax but missing from the registry would escape the
    matrix tests."""
    exported = {
        getattr(bn_jax, n)
        for n in bn_jax.__all__
        if isinstance(getattr(bn_jax, n), type) and n != "Normalizer"
    }
    assert exported == {e.cls for e in NORMALIZERS.values()}


@names
def test_init_state_has_the_registry_layout(name):
    norm, _ = CASES[name]
    entry = NORMALIZERS[name.split("-")[0]]
    config = {f.name: getattr(norm, f.name) for f in dataclasses.fields(norm)}
    _, state = norm.init(registry.C)
    assert {k: tuple(v.shape) for k, v in state.items()} == entry.state_layout(config)
    for k, v in state.items():
        assert v.dtype == (jnp.int32 if k in ("count", "step") else jnp.float32), k


def _check_against_reference(entry, norm, x, params, *, tol=1e-5):
    config = {f.name: getattr(norm, f.name) for f in dataclasses.fields(norm)}
    _, state = norm.init(registry.C)
    y, new = jax.jit(lambda p, s, x: norm.apply(p, s, x, training=True))(params, state, x)
    y_ref, state_ref = entry.reference(np.asarray(x, np.float64), params, config)
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=tol, atol=tol)
    assert set(new) == set(state_ref)
    for k, v in state_ref.items():
        np.testing.assert_allclose(np.asarray(new[k], np.float64), v, rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_matches_float64_reference(name):
    entry = NORMALIZERS[name]
    norm = entry.build(momentum=0.9) if "momentum" in registry.fields(name) else entry.build()
    _check_against_reference(entry, norm, registry.example_x(1), registry.example_params(norm))


@pytest.mark.parametrize("name", registry.SINGLE_VALUE)
def test_allow_single_value_computes_as_the_reference(name):
    """One value per statistic: an error by default (tests/test_errors.py); with
    ``allow_single_value=True`` the variance is 0, so the output is the bias (the
    renormalized bias for BatchRenorm; EvoNorm-B0 divides by ``max(sqrt(epsilon),
    v * x + sqrt(epsilon))`` instead of subtracting a mean), as the float64
    reference gives, and the running statistics take the batch's (zero) variance."""
    entry = NORMALIZERS[name]
    shape, extra, _ = entry.single_value
    norm = entry.build(**extra, allow_single_value=True)
    params = registry.example_params(norm)
    x = registry.example_x(2, shape)
    _check_against_reference(entry, norm, x, params)
    y, _ = norm.apply(params, norm.init(registry.C)[1], x, training=True)
    if name not in ("BatchRenorm", "EvoNormB0"):
        np.testing.assert_allclose(y, np.broadcast_to(params["bias"], shape), atol=1e-6)


@names
def test_new_state_has_the_stored_shape_and_dtype_under_an_outer_vmap(name):
    """Under a ``vmap`` without an axis name (an ensemble of models, or per-example
    calls that share one state), each new state value has the stored value's
    shape, dtype and weak type as seen inside the trace, which is what
    Equinox's ``State.set`` compares before it accepts a value."""
    h = harness(name)
    seen = []

    def step(state, x):
        _, new = h.call(h.params, state, x, jnp.int32(1), True)
        seen.append((jax.eval_shape(lambda: state), jax.eval_shape(lambda: new)))
        return new

    xs = jnp.stack([h.x(0), h.x(1)])
    ensemble = jax.tree.map(lambda a: jnp.stack([a, a]), h.state)
    jax.eval_shape(jax.vmap(step), ensemble, xs)  # one state per model
    jax.eval_shape(jax.vmap(step, in_axes=(None, 0)), h.state, xs)  # one shared state
    assert len(seen) == 2
    for old, new in seen:
        assert old == new
