"""bn_jax.equinox: Equinox's contract, and the deliberate differences against float64.

Equinox's contract (constructor, fields, call signature, state layout, modes,
``inference`` / ``eqx.nn.inference_mode``, ``Sequential``, serialised leaves,
``NameError`` for an unbound axis) is checked against ``equinox.nn``'s own
classes, introspected at the installed version, never against a copy. The
numbers are checked against float64 NumPy references (``tests/reference.py``)
and ``jax.grad`` of a plain formula: never against bn_jax itself.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import warnings
from functools import partial
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import bn_jax

eqx = pytest.importorskip("equinox")
bnx = pytest.importorskip("bn_jax.equinox")

from tests import reference as ref  # noqa: E402
from tests.devices import require_devices  # noqa: E402
from tests.typecheck import mypy_lines, requires_mypy  # noqa: E402

REPO = Path(__file__).parent.parent
EXAMPLE = REPO / "examples" / "equinox_digits.py"
C = 3
PAIRS = [
    (eqx.nn.BatchNorm, bnx.BatchNorm),
    (eqx.nn.LayerNorm, bnx.LayerNorm),
    (eqx.nn.GroupNorm, bnx.GroupNorm),
    (eqx.nn.RMSNorm, bnx.RMSNorm),
]
pairs = pytest.mark.parametrize(("theirs", "ours"), PAIRS, ids=[p[1].__name__ for p in PAIRS])
modes = pytest.mark.parametrize("mode", ["batch", "ema"])


def batched(layer, axis_name="batch"):
    """Equinox's calling convention: the layer on one example, mapped over the batch."""
    return jax.vmap(layer, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def jbatched(layer, axis_name="batch"):
    """``batched``, jitted (one compiled program instead of many eager operations)."""
    return jax.jit(batched(layer, axis_name))


def make_bn(cls, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Equinox's warning for an unspecified mode
        return eqx.nn.make_with_state(cls)(C, "batch", **kw)


def data(seed, shape=(16, C, 2), mean=3.0, std=0.5, dtype=np.float32):
    """Examples of ``C`` channels, channels first, offset by channel."""
    rng = np.random.default_rng(seed)
    offsets = mean + np.arange(shape[1]).reshape(1, -1, *[1] * (len(shape) - 2))
    return (offsets + std * rng.standard_normal(shape)).astype(dtype)


def channels_last(x):
    """``(batch, C, *spatial)`` as ``(batch, *spatial, C)`` for the float64 references."""
    return np.moveaxis(np.asarray(x, np.float64), 1, -1)


def stats64(x):
    """Float64 per-channel batch mean and biased variance of ``(batch, C, *spatial)``."""
    mean, var, _ = ref.bn_stats(channels_last(x))
    return mean, var


def inference_stats(layer, state):
    """The mean and variance an inference call normalizes with, read back from outputs."""
    layer = eqx.nn.inference_mode(layer)
    if getattr(layer, "weight", None) is not None:
        layer = eqx.tree_at(lambda m: (m.weight, m.bias), layer, (jnp.ones(C), jnp.zeros(C)))
    probe = jnp.stack([jnp.zeros(C), jnp.ones(C)])
    y, _ = jbatched(layer)(probe, state)
    y = np.asarray(y, np.float64)
    inv = y[1] - y[0]
    return -y[0] / inv, 1.0 / inv**2 - layer.eps


# ------------------------------------------------------------------ Equinox's contract


def _params(fn):
    return list(inspect.signature(fn).parameters.values())


@pairs
def test_constructor_is_equinox_s_then_keyword_only_options(theirs, ours):
    want, got = _params(theirs.__init__), _params(ours.__init__)
    assert [(p.name, p.kind, p.default) for p in got[: len(want)]] == [
        (p.name, p.kind, p.default) for p in want
    ]
    for extra in got[len(want) :]:
        assert extra.kind is inspect.Parameter.KEYWORD_ONLY, extra
        assert extra.default is not inspect.Parameter.empty, extra


@pairs
def test_call_signature_starts_with_equinox_s(theirs, ours):
    """Equinox's call parameters (names, kinds, defaults) first, then keyword-only
    options. The per-example layers' ``state`` default is a private "no state"
    marker on both sides (Equinox's own is private), so only its presence is compared."""
    want, got = _params(theirs.__call__), _params(ours.__call__)
    assert [(p.name, p.kind) for p in got[: len(want)]] == [(p.name, p.kind) for p in want]
    for w, g in zip(want, got, strict=False):
        if w.name != "state":
            assert g.default == w.default, w.name
        else:
            assert (g.default is inspect.Parameter.empty) == (w.default is inspect.Parameter.empty)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in got[len(want) :])


@pairs
def test_fields_are_equinox_s_then_static_options(theirs, ours):
    """Equinox's fields, in order and static-ness, are a prefix; the options after them
    are static or a ``StateIndex`` that is None unless the option asks for state, so
    a layer's leaves (and serialised files) are Equinox's."""

    def spec(cls):
        return [(f.name, bool(f.metadata.get("static", False))) for f in dataclasses.fields(cls)]

    assert spec(ours)[: len(spec(theirs))] == spec(theirs)
    for name, static in spec(ours)[len(spec(theirs)) :]:
        assert static or name.endswith("_index"), name
    assert issubclass(ours, theirs)
    assert issubclass(ours, eqx.nn.StatefulLayer) == issubclass(theirs, eqx.nn.StatefulLayer)


def _struct(tree):
    return [
        (jax.tree_util.keystr(p), jax.eval_shape(lambda v=v: v))
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
        if eqx.is_array(v)
    ]


@modes
def test_leaves_and_state_layout_are_equinox_s(mode):
    """Same leaves (path, shape, dtype, weak type) in the fresh layer, the model and
    the state from ``make_with_state``; ``delete_init_state`` drops three (the
    initial state), as Equinox's test checks."""
    fresh = {c: c(C, "batch", mode=mode) for c in (eqx.nn.BatchNorm, bnx.BatchNorm)}
    assert _struct(fresh[eqx.nn.BatchNorm]) == _struct(fresh[bnx.BatchNorm])
    (m1, s1), (m2, s2) = make_bn(eqx.nn.BatchNorm, mode=mode), make_bn(bnx.BatchNorm, mode=mode)
    assert _struct(m1) == _struct(m2)
    assert _struct(s1) == _struct(s2)
    assert s1.tree_flatten()[1] == s2.tree_flatten()[1]  # the same markers
    stripped = eqx.nn.delete_init_state(fresh[bnx.BatchNorm])
    assert len(_struct(fresh[bnx.BatchNorm])) == len(_struct(stripped)) + 3
    if mode == "ema":  # finite start: mean 0, var 1 (Equinox: jnp.empty)
        mean, var = s2.get(m2.ema_state_index)
        np.testing.assert_array_equal(mean, 0.0)
        np.testing.assert_array_equal(var, 1.0)


def test_inference_mode_and_the_call_argument():
    bn, state = make_bn(bnx.BatchNorm, mode="batch")
    x = jnp.asarray(data(0))
    _, trained = jbatched(bn)(x, state)
    frozen = eqx.nn.inference_mode(bn)
    assert frozen.inference is True and eqx.nn.inference_mode(frozen, False).inference is False
    before = [np.asarray(v) for v in jax.tree.leaves(trained)]
    _, after = jbatched(frozen)(x, trained)
    for a, b in zip(before, jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    _, after = jbatched(lambda x, s: bn(x, s, inference=True))(x, after)  # the call overrides
    for a, b in zip(before, jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unbound_axis_name_is_a_name_error():
    bn, state = make_bn(bnx.BatchNorm, mode="batch")
    x = jnp.asarray(data(0))
    with pytest.raises(NameError, match=r"axis_name='batch' is not bound.*jax\.vmap"):
        jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x, state)
    state = eqx.nn.make_with_state(bnx.BatchNorm)(C, "batch", mode="batch")[1]
    with pytest.raises(NameError, match=r"axis_name='batch' is not bound"):
        bn(x[0], state)
    y, _ = eqx.nn.inference_mode(bn)(x[0], state)  # inference needs no axis
    assert np.isfinite(np.asarray(y)).all()


def test_every_drop_in_in_sequential():
    """Sequential calls the stateful BatchNorm with the state and the others without."""
    key = jax.random.key(0)
    layers = [
        eqx.nn.Conv1d(C, 4, 1, key=key),
        bnx.BatchNorm(4, "batch", mode="batch"),
        bnx.GroupNorm(2, 4),
        eqx.nn.Lambda(jnp.ravel),
        bnx.LayerNorm(8),
        bnx.RMSNorm(8),
    ]
    seq, state = eqx.nn.make_with_state(eqx.nn.Sequential)(layers)
    assert seq.is_stateful()
    x = jnp.asarray(data(1))
    y, new = jbatched(seq)(x, state)

    def by_hand(x, state):
        h = seq.layers[0](x)
        h, state = seq.layers[1](h, state)
        h = jnp.ravel(seq.layers[2](h))
        return seq.layers[5](seq.layers[4](h)), state

    y2, new2 = jbatched(by_hand)(x, state)
    np.testing.assert_array_equal(y, y2)
    chex.assert_trees_all_equal(new, new2)


# ------------------------------------------------------------------ BatchNorm numerics


def _debiased_ema(batches, momentum):
    """Float64: the zero-debiased moving average of the batch statistics."""
    mean = var = 0.0
    for x in batches:
        m, v = stats64(x)
        mean, var = ref.ema(mean, m, momentum), ref.ema(var, v, momentum)
    t = len(batches)
    return mean / (1 - momentum**t), var / (1 - momentum**t)


def test_batch_mode_inference_is_the_debiased_average_from_the_first_step():
    """Data of mean ~3 and variance 0.25, momentum 0.99: after 1 and 10 steps the
    inference statistics are the debiased moving averages (float64), within 5% of
    the variance of the data seen; Equinox's layer is ~400x and ~40x off there."""
    batches = [data(s, shape=(64, C)) for s in range(10)]
    ours, s_ours = make_bn(bnx.BatchNorm, mode="batch")
    theirs, s_theirs = make_bn(eqx.nn.BatchNorm, mode="batch")
    step_ours, step_theirs = jbatched(ours), jbatched(theirs)
    for t, x in enumerate(batches, start=1):
        _, s_ours = step_ours(jnp.asarray(x), s_ours)
        _, s_theirs = step_theirs(jnp.asarray(x), s_theirs)
        if t in (1, 10):
            mean64, var64 = _debiased_ema(batches[:t], 0.99)
            mean, var = inference_stats(ours, s_ours)
            np.testing.assert_allclose(mean, mean64, rtol=1e-5)
            np.testing.assert_allclose(var, var64, rtol=2e-4)  # 1 - 0.99**t amplifies rounding
            _, seen_var = stats64(np.concatenate(batches[:t]))  # the data's variance
            np.testing.assert_allclose(var, seen_var, rtol=0.05)
            _, var_eqx = inference_stats(theirs, s_theirs)
            assert np.all(var_eqx / var64 > (30 if t == 10 else 300))


@modes
def test_training_step_matches_float64(mode):
    """Output, gradients (``jax.grad`` of the plain formula) and new statistics of one
    training step, with a weight and bias, after a first step."""
    bn, state = make_bn(bnx.BatchNorm, mode=mode, momentum=0.9)
    rng = np.random.default_rng(5)
    w, b = 1 + 0.3 * rng.standard_normal(C), 0.3 * rng.standard_normal(C)
    bn = eqx.tree_at(
        lambda m: (m.weight, m.bias), bn, (jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32))
    )
    x0, x1 = data(0), data(1, mean=1.0, std=2.0)
    _, state = jbatched(bn)(jnp.asarray(x0), state)
    g = rng.standard_normal(x1.shape).astype(np.float32)  # cotangent

    def loss(wb, x):
        layer = eqx.tree_at(lambda m: (m.weight, m.bias), bn, wb)
        y, new = batched(layer)(x, state)
        return jnp.sum(y * g), (y, new)

    (_, (y, new)), ((dw, db), dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        (bn.weight, bn.bias), jnp.asarray(x1)
    )
    m0, v0 = stats64(x0)
    m1, v1 = stats64(x1)
    if mode == "batch":  # batch statistics; hidden = 0.9 * hidden + 0.1 * batch
        use_mean, use_var = m1, v1
        hidden = new.get(bn.batch_state_index)
        want = (ref.ema(ref.ema(0.0, m0, 0.9), m1, 0.9), ref.ema(ref.ema(1.0, v0, 0.9), v1, 0.9))
        np.testing.assert_allclose(np.asarray(hidden, np.float64), want, rtol=1e-5)
        assert int(new.get(bn.batch_counter)) == 2
    else:  # Equinox's "ema": normalize with the updated running statistics
        use_mean, use_var = ref.ema(m0, m1, 0.9), ref.ema(v0, v1, 0.9)
        running = new.get(bn.ema_state_index)
        np.testing.assert_allclose(np.asarray(running, np.float64), (use_mean, use_var), rtol=1e-5)
        assert not bool(new.get(bn.ema_first_time_index))
    x64 = channels_last(x1)
    y_ref = ref.bn_eval(x64, use_mean, use_var, w, b)
    np.testing.assert_allclose(channels_last(y), y_ref, rtol=1e-5, atol=1e-5)

    def plain(w, b, x):  # the normalization written out, differentiated by JAX
        axes = (0, 2)
        bm, bv = jnp.mean(x, axes), jnp.var(x, axes)
        if mode == "ema":
            bm, bv = 0.9 * jnp.asarray(m0) + 0.1 * bm, 0.9 * jnp.asarray(v0) + 0.1 * bv
        xh = (x - bm[None, :, None]) / jnp.sqrt(bv[None, :, None] + 1e-5)
        return jnp.sum((xh * w[None, :, None] + b[None, :, None]) * g)

    gw, gb, gx = jax.grad(plain, argnums=(0, 1, 2))(
        jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32), jnp.asarray(x1)
    )
    np.testing.assert_allclose(dw, gw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, gb, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, gx, rtol=1e-4, atol=1e-4)


@modes
def test_inference_before_training_is_finite(mode):
    """Mean 0, var 1 in both modes: ``x / sqrt(1 + eps)`` (Equinox's "ema" divides by
    ``sqrt(eps)`` there)."""
    bn, state = make_bn(bnx.BatchNorm, mode=mode, inference=True)
    x = data(2)
    y, _ = jbatched(bn)(jnp.asarray(x), state)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


@modes
def test_bfloat16_in_both_modes(mode):
    """bf16 in, bf16 out, float32 state; within bf16 rounding of the float32 call."""
    bn, state = make_bn(bnx.BatchNorm, mode=mode)
    step = jbatched(bn)
    x32 = jnp.asarray(data(3)).astype(jnp.bfloat16).astype(jnp.float32)
    y16, s16 = step(x32.astype(jnp.bfloat16), state)
    y32, s32 = step(x32, state)
    assert y16.dtype == jnp.bfloat16
    chex.assert_trees_all_equal_shapes_and_dtypes(s16, state)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=2e-2, rtol=1e-2)
    chex.assert_trees_all_close(s16, s32, rtol=1e-6)


@modes
def test_non_finite_batch_leaves_the_statistics_unchanged(mode):
    """A NaN in one channel: that channel's inference statistics are unchanged (its
    output shows the NaN), the other channels update as usual."""
    bn, state = make_bn(bnx.BatchNorm, mode=mode)
    step = jbatched(bn)
    _, state = step(jnp.asarray(data(0)), state)
    before = inference_stats(bn, state)
    x = data(1)
    x[3, 1, 0] = np.nan
    y, new = step(jnp.asarray(x), state)
    after = inference_stats(bn, new)
    assert np.isnan(np.asarray(y[:, 1])).all() and np.isfinite(np.asarray(y[:, [0, 2]])).all()
    for b, a in zip(before, after, strict=True):
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5)
        assert np.all(np.abs(a[[0, 2]] - b[[0, 2]]) > 1e-4)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(new))


def test_a_batch_of_one_trains_as_in_equinox():
    """One example under vmap (one value per channel): variance 0, so the output is
    the bias and the batch variance entering the statistics is 0, as in Equinox."""
    bn, state = make_bn(bnx.BatchNorm, mode="batch", momentum=0.5)
    bn = eqx.tree_at(lambda m: m.bias, bn, jnp.asarray([0.5, -1.0, 2.0]))
    y, new = jbatched(bn)(jnp.asarray(data(0, shape=(1, C))), state)
    np.testing.assert_allclose(y, bn.bias[None], atol=1e-6)
    _, hidden_var = new.get(bn.batch_state_index)
    np.testing.assert_allclose(hidden_var, 0.5, rtol=1e-6)  # 0.5 * 1 + 0.5 * 0
    with pytest.raises(ValueError, match=r"training on 1 example of shape \(3,\)"):
        strict = eqx.nn.make_with_state(bnx.BatchNorm)(
            C, "batch", mode="batch", allow_single_value=False
        )
        jbatched(strict[0])(jnp.asarray(data(0, shape=(1, C))), strict[1])


def test_state_written_by_equinox_reads_as_the_debiased_average():
    """Hidden averages trained by ``eqx.nn.BatchNorm`` ("batch" mode), read by the
    converted layer: the float64 debiased average, where Equinox reads ~40x."""
    theirs, state = make_bn(eqx.nn.BatchNorm, mode="batch")
    batches = [data(s, shape=(32, C)) for s in range(5)]
    for x in batches:
        _, state = jbatched(theirs)(jnp.asarray(x), state)
    mean, var = inference_stats(bnx.convert(theirs), state)
    mean64, var64 = _debiased_ema(batches, 0.99)
    np.testing.assert_allclose(mean, mean64, rtol=1e-5)
    np.testing.assert_allclose(var, var64, rtol=2e-4)


def test_mask_pools_valid_elements_by_count():
    """Examples hold 0 to 2 valid positions: the statistics are those of the valid
    elements of the whole batch (float64)."""
    bn, state = make_bn(bnx.BatchNorm, mode="batch", momentum=0.0)
    x = data(4, shape=(8, C, 2))
    mask = np.zeros((8, 1, 2), bool)
    mask[1, 0, 0] = mask[2] = mask[5, 0, 1] = mask[6] = True
    y, new = jax.jit(
        jax.vmap(
            lambda x, s, m: bn(x, s, mask=m),
            axis_name="batch",
            in_axes=(0, None, 0),
            out_axes=(0, None),
        )
    )(jnp.asarray(x), state, jnp.asarray(mask))
    m64, v64, _ = ref.bn_stats(channels_last(x), mask=np.moveaxis(mask, 1, -1))
    mean, var = inference_stats(bn, new)
    np.testing.assert_allclose(mean, m64, rtol=1e-5)
    np.testing.assert_allclose(var, v64, rtol=1e-4)
    np.testing.assert_allclose(
        channels_last(y), ref.bn_eval(channels_last(x), m64, v64), rtol=1e-4, atol=1e-5
    )


# --------------------------------------------------------------- per-example layers


def _per_example_case(name, dtype):
    rng = np.random.default_rng(7)
    w, b = 1 + 0.3 * rng.standard_normal(4), 0.3 * rng.standard_normal(4)
    x = (2.0 + rng.standard_normal((4, 6))).astype(np.float32)
    if name == "LayerNorm":
        layer = bnx.LayerNorm((4, 6), dtype=dtype)
        wb = (np.broadcast_to(w[:, None], (4, 6)), np.broadcast_to(b[:, None], (4, 6)))
        want = lambda x: ref.layer_norm(
            x, *wb, reduction_axes=(0, 1), feature_axes=(0, 1), eps=1e-5
        )
    elif name == "RMSNorm":
        layer = bnx.RMSNorm((4, 6), dtype=dtype)
        wb = (np.broadcast_to(w[:, None], (4, 6)), np.broadcast_to(b[:, None], (4, 6)))
        want = lambda x: (
            ref.rms_norm(x, wb[0], reduction_axes=(0, 1), feature_axes=(0, 1), eps=1e-5) + wb[1]
        )
    elif name == "GroupNorm":
        layer, wb = bnx.GroupNorm(2, 4, dtype=dtype), (w, b)
        want = lambda x: ref.group_norm(
            x[None], 2, w, b, feature_axis=1, reduction_axes=(1, 2), eps=1e-5
        )[0]
    else:
        layer, wb = bnx.InstanceNorm(4, dtype=dtype), (w, b)
        want = lambda x: ref.instance_norm(x[None], w, b, feature_axes=1, eps=1e-5)[0]
    layer = eqx.tree_at(
        lambda m: (m.weight, m.bias), layer, tuple(jnp.asarray(a, dtype) for a in wb)
    )
    return layer, x, want


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"])
def test_per_example_layers_match_float64(name, dtype):
    """Output against float64 (statistics in float32 for bf16 input, output in the
    input dtype, as Equinox); the state, when passed, comes back as it went in."""
    layer, x, want = _per_example_case(name, dtype)
    x = jnp.asarray(x).astype(dtype)
    y = eqx.filter_jit(layer)(x)
    assert y.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(
        np.asarray(y, np.float64), want(np.asarray(x, np.float64)), rtol=tol, atol=tol
    )
    state = eqx.nn.State(bnx.BatchNorm(C, "batch", mode="batch"))
    y2, same = layer(x, state)
    assert same is state
    np.testing.assert_allclose(
        np.asarray(y2, np.float32), np.asarray(y, np.float32), rtol=1e-6
    )  # eager


def test_shape_errors_name_the_shapes():
    """Equinox's ValueError for a LayerNorm/RMSNorm input of another shape, with the
    shapes and the vmap hint written out (no words run together)."""
    for layer, name in ((bnx.LayerNorm(3), "LayerNorm"), (bnx.RMSNorm(3), "RMSNorm")):
        with pytest.raises(ValueError) as err:
            layer(jnp.ones(4))
        msg = str(err.value)
        assert f"{name}(shape)(x) needs x.shape == shape, got shape=(3,) and x.shape=(4,)" in msg
        assert "jax.vmap(" in msg
    with pytest.raises(ValueError, match=r"groups=3 does not divide the 4 channels along axis 0"):
        bnx.GroupNorm(3, channelwise_affine=False)(jnp.ones((4, 2)))
    with pytest.raises(
        ValueError, match=r"GroupNorm: channels=4 but the example has 6 channels .*\(6, 2\)"
    ):
        bnx.GroupNorm(2, 4)(jnp.ones((6, 2)))
    with pytest.raises(ValueError, match="groups must divide"):  # Equinox's own check
        bnx.GroupNorm(3, 4)
    with pytest.raises(ValueError, match="Invalid mode"):
        bnx.BatchNorm(C, "batch", mode="foo")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\].*got 2.0"):
        bnx.BatchNorm(C, "batch", mode="batch", momentum=2.0)
    with pytest.raises(ValueError, match=r"^eps must be a positive finite float, got 0.0"):
        bnx.LayerNorm(3, eps=0.0)
    with pytest.raises(ValueError, match=r"momentum=None .* needs mode='batch'"):
        bnx.BatchNorm(C, "batch", mode="ema", momentum=None)


def test_strict_numpy_settings():
    """Every layer under Equinox's test settings (strict promotion, rank promotion
    raises, warnings are errors), with float32 and bfloat16 input."""
    layers = [
        (make_bn(bnx.BatchNorm, mode="batch"), True),
        (make_bn(bnx.BatchNorm, mode="ema"), True),
        ((bnx.LayerNorm((C, 2)), None), False),
        ((bnx.RMSNorm((C, 2)), None), False),
        ((bnx.GroupNorm(C, C), None), False),
        ((bnx.InstanceNorm(C), None), False),
        (eqx.nn.make_with_state(bnx.BatchRenorm)(C, "batch"), True),
        (eqx.nn.make_with_state(bnx.GhostBatchNorm)(C, "batch", virtual_batch_size=4), True),
    ]
    with (
        jax.numpy_dtype_promotion("strict"),
        jax.numpy_rank_promotion("raise"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")
        for dtype in (jnp.float32, jnp.bfloat16):
            x = jnp.asarray(data(0)).astype(dtype)
            for (layer, state), stateful in layers:
                if stateful:
                    run = lambda x, layer=layer, state=state: batched(layer)(x, state)[0]
                else:
                    run = jax.vmap(layer)
                dx = jax.jit(jax.grad(lambda x, run=run: jnp.sum(run(x).astype(jnp.float32))))(x)
                assert dx.dtype == dtype


# ---------------------------------------------------------------------- mappings


def test_tuple_axis_name_under_nested_vmaps_equals_one_batch():
    """``axis_name=("a", "b")`` under two nested vmaps (2 x 8 examples): output,
    gradients and state of one vmap over the 16 examples."""
    nested, state = eqx.nn.make_with_state(bnx.BatchNorm)(C, ("a", "b"), mode="batch")
    flat = eqx.tree_at(lambda m: m.axis_name, nested, "batch")
    x = jnp.asarray(data(6))
    g = jnp.asarray(np.random.default_rng(6).standard_normal(x.shape), jnp.float32)

    def run_nested(x):
        inner = jax.vmap(nested, axis_name="b", in_axes=(0, None), out_axes=(0, None))
        outer = jax.vmap(inner, axis_name="a", in_axes=(0, None), out_axes=(0, None))
        y, new = outer(x.reshape(2, 8, *x.shape[1:]), state)
        return y.reshape(x.shape), new

    def loss(run):
        return jax.jit(
            jax.value_and_grad(
                lambda x: (lambda y, s: (jnp.sum(y * g), (y, s)))(*run(x)), has_aux=True
            )
        )

    (_, (y, new)), dx = loss(run_nested)(x)
    (_, (y1, new1)), dx1 = loss(lambda x: batched(flat)(x, state))(x)
    np.testing.assert_allclose(y, y1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, dx1, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(new, new1, rtol=1e-6)


def test_outer_vmap_without_axis_name_keeps_a_state_per_model():
    """As Equinox's test: an outer vmap without a name around the named one gives one
    state per outer index, each with the stored shape."""
    bn, state = eqx.nn.make_with_state(bnx.BatchNorm)(5, "batch", mode="batch")
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(10, 5, 6)), jnp.float32)
    inner = jax.vmap(bn, axis_name="batch", in_axes=(1, None), out_axes=(1, None))
    y, new = jax.jit(jax.vmap(inner, in_axes=(0, None)))(x, state)
    assert y.shape == x.shape
    mean, var = new.get(bn.batch_state_index)
    assert mean.shape == var.shape == (10, 5) and new.get(bn.batch_counter).shape == (10,)
    for i in (0, 7):  # model i saw x[i] only
        m64, v64 = stats64(np.asarray(x[i]).T[:, :, None])
        np.testing.assert_allclose(mean[i], 0.01 * m64, rtol=1e-5)
        np.testing.assert_allclose(var[i], 0.99 + 0.01 * v64, rtol=1e-6)


def test_shard_map_on_8_devices_with_one_gather():
    """The batch split over 8 devices and vmapped on each (``axis_name=("d", "b")``;
    shard_map needs ``check_vma=False`` for collectives of a vmap inside it, for
    Equinox's layer too): output and statistics of the whole batch (float64), from
    one all-gather of ``3C`` values in the compiled forward step."""
    require_devices(8)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    bn, state = eqx.nn.make_with_state(bnx.BatchNorm)(C, ("d", "b"), mode="batch", momentum=0.5)
    x = data(8, shape=(32, C, 2))

    def per_device(x, s):
        return jax.vmap(bn, axis_name="b", in_axes=(0, None), out_axes=(0, None))(x, s)

    f = jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=(P("d"), P()), out_specs=(P("d"), P()), check_vma=False
        )
    )
    y, new = f(jnp.asarray(x), state)
    m64, v64 = stats64(x)
    np.testing.assert_allclose(
        channels_last(y), ref.bn_eval(channels_last(x), m64, v64), rtol=1e-4, atol=1e-5
    )
    mean, var = inference_stats(bnx.convert(bn), new)
    np.testing.assert_allclose(mean, m64, rtol=1e-5)
    np.testing.assert_allclose(var, v64, rtol=1e-4)
    hlo = f.lower(jnp.asarray(x), state).compile().as_text()
    gathers = [
        line for line in hlo.splitlines() if " all-gather(" in line or " all-gather-start(" in line
    ]
    assert len(gathers) == 1, gathers
    assert "all-reduce(" not in hlo


# ------------------------------------------------------------- convert, checkpoints


def _eqx_model(key, mode="batch"):
    k1, k2 = jax.random.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv1d(C, 4, 1, key=k1),
            eqx.nn.BatchNorm(4, "batch", mode=mode),
            eqx.nn.GroupNorm(2, 4),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.LayerNorm(8),
            eqx.nn.Linear(8, 8, key=k2),
            eqx.nn.RMSNorm(8),
        ]
    )


@modes
def test_convert_keeps_every_leaf_and_the_state(mode):
    """Every Equinox norm layer becomes its drop-in with the same leaves; the model's
    state stays valid; the result equals the model built from the drop-ins."""
    model, state = eqx.nn.make_with_state(_eqx_model)(jax.random.key(0), mode)
    converted = bnx.convert(model)
    types = [type(layer) for layer in converted.layers]
    assert types[1:5] == [bnx.BatchNorm, bnx.GroupNorm, eqx.nn.Lambda, bnx.LayerNorm]
    assert types[-1] is bnx.RMSNorm and type(model.layers[1]) is eqx.nn.BatchNorm
    assert _struct(converted) == _struct(model)
    x = jnp.asarray(data(9))
    y, new = jbatched(converted)(x, state)
    swapped = [
        bnx.BatchNorm(4, "batch", mode=mode),
        bnx.GroupNorm(2, 4),
        None,
        bnx.LayerNorm(8),
        None,
        bnx.RMSNorm(8),
    ]
    built = eqx.nn.Sequential(
        [
            old if new is None else new
            for old, new in zip(model.layers, [None, *swapped], strict=True)
        ]
    )
    y2, new2 = jbatched(built)(x, eqx.nn.State(built))
    np.testing.assert_array_equal(y, y2)
    if mode == "batch":  # the "ema" starts differ: Equinox's jnp.empty, ours (0, 1)
        chex.assert_trees_all_equal(jax.tree.leaves(new), jax.tree.leaves(new2))
    with pytest.raises(TypeError, match=r"convert: unknown option\(s\) \['count_skipped'\]"):
        bnx.convert(model, count_skipped=True)
    fast = bnx.convert(model, use_fast_variance=True)
    assert fast.layers[1].use_fast_variance and fast.layers[4].use_fast_variance


@modes
def test_equinox_checkpoint_loads_into_the_drop_in_model(mode, tmp_path):
    """``tree_serialise_leaves`` of an Equinox model and state, trained 3 steps, loads
    with ``tree_deserialise_leaves`` into the same model built with the drop-ins."""
    model, state = eqx.nn.make_with_state(_eqx_model)(jax.random.key(1), mode)
    batches = [jnp.asarray(data(s)) for s in range(3)]
    for x in batches:
        _, state = jbatched(model)(x, state)
    eqx.tree_serialise_leaves(tmp_path / "ckpt.eqx", (model, state))

    def make_ours(key, mode):
        m = _eqx_model(key, mode)
        return bnx.convert(
            eqx.tree_at(lambda m: m.layers[1], m, bnx.BatchNorm(4, "batch", mode=mode))
        )

    skeleton = eqx.nn.make_with_state(make_ours)(jax.random.key(2), mode)
    loaded, loaded_state = eqx.tree_deserialise_leaves(tmp_path / "ckpt.eqx", skeleton)
    assert type(loaded.layers[1]) is bnx.BatchNorm
    chex.assert_trees_all_equal(
        eqx.filter(loaded, eqx.is_array), eqx.filter(bnx.convert(model), eqx.is_array)
    )
    chex.assert_trees_all_equal(loaded_state, state)
    y, _ = jbatched(eqx.nn.inference_mode(loaded))(batches[0], loaded_state)
    assert np.isfinite(np.asarray(y)).all()


# --------------------------------------------------------------------- recalibrate


@modes
def test_recalibrate_gives_the_population_statistics(mode):
    """Exact pooled statistics over all batches (float64), written in the mode's layout
    so that inference uses them; the state given is left valid."""
    bn, state = make_bn(bnx.BatchNorm, mode=mode, momentum=0.9)
    step = jbatched(bn)
    for s in range(3):
        _, state = step(jnp.asarray(data(s, mean=0.0)), state)
    batches = [data(10 + s, shape=(8 + 4 * s, C, 2), std=2.0) for s in range(3)]  # uneven sizes
    new = bnx.recalibrate(bn, state, batches, progress=False)
    mean, var = inference_stats(bn, new)
    m64, v64 = stats64(np.concatenate(batches))
    np.testing.assert_allclose(mean, m64, rtol=1e-5)
    np.testing.assert_allclose(var, v64, rtol=1e-4)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    step(jnp.asarray(batches[0]), state)  # still usable
    _, after = step(jnp.asarray(batches[0]), new)  # and training goes on from it
    assert np.isfinite(np.asarray(jax.tree.leaves(after)[1])).all()


def test_recalibrate_errors():
    bn, state = make_bn(bnx.BatchNorm, mode="batch")
    with pytest.raises(ValueError, match="recalibrate: batches yielded no batch"):
        bnx.recalibrate(bn, state, [], progress=False)
    with pytest.raises(TypeError, match=r"passes must be an int >= 1, got 1\.5"):
        bnx.recalibrate(bn, state, [data(0)], passes=1.5, progress=False)
    theirs, s = make_bn(eqx.nn.BatchNorm, mode="batch")
    with pytest.raises(ValueError, match=r"the model has no bn_jax.equinox.BatchNorm"):
        bnx.recalibrate(theirs, s, [data(0)], progress=False)
    two = (bn, eqx.tree_at(lambda m: m.axis_name, bn, "other"))
    with pytest.raises(ValueError, match=r"pass forward\(model, state, batch\)"):
        bnx.recalibrate(two, state, [data(0)], progress=False)


# ------------------------------------------------------------------------- family


@pytest.mark.parametrize("name", ["BatchRenorm", "SequenceBatchNorm"])
def test_family_layers_equal_the_normalizer_on_the_whole_batch(name):
    """Under vmap over examples, output and state equal the bn_jax normalizer applied
    to the whole batch, over two training steps and in inference."""
    rng = np.random.default_rng(11)
    if name == "BatchRenorm":  # examples (C, 2): channels first, the normalizer's last
        layer, state = eqx.nn.make_with_state(bnx.BatchRenorm)(
            C, "batch", momentum=0.5, rmax=1.5, dmax=0.5
        )
        norm = bn_jax.BatchRenorm(momentum=0.5, rmax=1.5, dmax=0.5)
        xs = [(2 + rng.standard_normal((8, C, 2))).astype(np.float32) for _ in range(2)]
        to_core, from_core = (lambda x: np.moveaxis(x, 1, -1)), (lambda y: np.moveaxis(y, -1, 1))
    else:  # examples (time, C), as the normalizer's layout per example
        layer, state = eqx.nn.make_with_state(bnx.SequenceBatchNorm)(C, 2, "batch", momentum=0.5)
        norm = bn_jax.SequenceBatchNorm(max_steps=2, momentum=0.5)
        xs = [(2 + rng.standard_normal((8, 3, C))).astype(np.float32) for _ in range(2)]
        to_core = from_core = np.asarray
    params, core_state = norm.init(C)
    step, core_step = jbatched(layer), jax.jit(partial(norm.apply, training=True))
    for x in xs:
        y, state = step(jnp.asarray(x), state)
        y_core, core_state = core_step(params, core_state, jnp.asarray(to_core(x)))
        np.testing.assert_allclose(y, from_core(np.asarray(y_core)), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state.get(layer.state_index), core_state, rtol=1e-6)
    y, _ = jbatched(eqx.nn.inference_mode(layer))(jnp.asarray(xs[0]), state)
    y_core, _ = jax.jit(partial(norm.apply, training=False))(params, core_state, to_core(xs[0]))
    np.testing.assert_allclose(y, from_core(np.asarray(y_core)), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- GhostBatchNorm

GHOST_W, GHOST_B = np.array([1.5, 0.5, -1.0], np.float32), np.array([0.0, 1.0, -2.0], np.float32)


def make_ghost(axis_name="batch", virtual_batch_size=4, **kw):
    """A GhostBatchNorm with a non-trivial weight and bias, and its state."""
    layer, state = eqx.nn.make_with_state(bnx.GhostBatchNorm)(
        C, axis_name, momentum=0.5, virtual_batch_size=virtual_batch_size, **kw
    )
    layer = eqx.tree_at(lambda m: (m.weight, m.bias), layer, (GHOST_W, GHOST_B))
    return layer, state


@eqx.filter_jit
def _ghost_step(layer, x, state, g, mask):
    """Equinox's way: the layer on one example under ``vmap(axis_name="batch")``;
    ``(y, new_state, d/d(weight, bias, x) of sum(y * g))``."""

    def loss(wbx):
        model = eqx.tree_at(lambda m: (m.weight, m.bias), layer, wbx[:2])
        run = jax.vmap(
            lambda x, m, s: model(x, s, mask=m),
            axis_name="batch",
            in_axes=(0, 0, None),
            out_axes=(0, None),
        )
        y, new = run(wbx[2], mask, state)
        return jnp.sum(y * g), (y, new)

    grads, (y, new) = jax.grad(loss, has_aux=True)((layer.weight, layer.bias, x))
    return y, new, grads


@partial(jax.jit, static_argnums=0)
def _core_ghost_step(norm, params, x, state, g, mask):
    """The core normalizer on the whole batch: ``(y, new_state, d/d(scale, bias, x))``."""

    def loss(sbx):
        y, new = norm.apply(
            {"scale": sbx[0], "bias": sbx[1]}, state, sbx[2], training=True, mask=mask
        )
        return jnp.sum(y * g), (y, new)

    grads, (y, new) = jax.grad(loss, has_aux=True)((params["scale"], params["bias"], x))
    return y, new, grads


def _plain_ghost(w, b, x, mask, v):
    """Ghost BatchNorm as a textbook formula (``ref.plain_bn`` on each run of ``v``
    examples), for ``jax.grad`` references."""
    parts = []
    for i in range(0, x.shape[0], v):
        m = None if mask is None else mask[i : i + v]
        parts.append(ref.plain_bn(x[i : i + v], w, b, axis=1, mask=m))
    return jnp.concatenate(parts)


def test_ghost_batch_norm_equals_the_core_and_float64():
    """Under ``eqx.filter_jit`` + ``vmap(axis_name="batch")``, over two steps (the
    second masked): output, gradients wrt weight, bias and x, and the new (unbatched)
    state equal :class:`bn_jax.GhostBatchNorm` on the whole batch, float64 Ghost
    BatchNorm (each run of 4 examples normalized on its own; the running statistics
    move towards the count-weighted average of the runs' statistics), and
    ``jax.grad`` of the textbook formula."""
    layer, state = make_ghost()
    norm = bn_jax.GhostBatchNorm(virtual_batch_size=4, axis=1, momentum=0.5)
    params = {"scale": jnp.asarray(GHOST_W), "bias": jnp.asarray(GHOST_B)}
    core_state = norm.init(C)[1]
    state64 = {"mean": np.zeros(C), "var": np.ones(C)}
    rng = np.random.default_rng(20)
    masks = [None, rng.random((16, 1, 2)) > 0.3]  # per example (1, 2): broadcast over C
    for step, mask in enumerate(masks):
        x = data(21 + step)
        g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
        y, state, grads = _ghost_step(layer, jnp.asarray(x), state, g, mask)
        y_core, core_state, grads_core = _core_ghost_step(
            norm, params, jnp.asarray(x), core_state, g, mask
        )
        y64, state64 = ref.ghost_batch_norm_step(
            x,
            GHOST_W,
            GHOST_B,
            state64,
            axis=1,
            eps=1e-5,
            momentum=0.5,
            virtual_batch_size=4,
            mask=mask,
        )
        new = state.get(layer.state_index)
        assert new["mean"].shape == (C,)  # unbatched: it left the vmap with out_axes=None
        np.testing.assert_allclose(y, y_core, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(new, core_state, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(grads, grads_core, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-5)
        for k in ("mean", "var"):
            np.testing.assert_allclose(new[k], state64[k], rtol=1e-5, err_msg=k)
        plain = jax.jit(
            jax.grad(lambda w, b, x, m, g: jnp.sum(_plain_ghost(w, b, x, m, 4) * g), (0, 1, 2))
        )
        expected = plain(params["scale"], params["bias"], jnp.asarray(x), mask, g)
        for got, want in zip(grads, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_ghost_batch_norm_inference_uses_the_running_statistics():
    """Inference (the field, ``eqx.nn.inference_mode`` or the call argument) normalizes
    each example with the state's statistics (mean 0 and var 1 before training), needs
    no bound axis and leaves the state as it is."""
    layer, state = make_ghost()
    x = data(24)
    frozen = eqx.nn.inference_mode(layer)
    y, same = jbatched(frozen)(jnp.asarray(x), state)
    start = ref.bn_eval(x, np.zeros(C), np.ones(C), GHOST_W, GHOST_B, axis=1)
    np.testing.assert_allclose(y, start, rtol=1e-6)
    _, state, _ = _ghost_step(layer, jnp.asarray(x), state, jnp.ones(x.shape), None)
    stats = state.get(layer.state_index)
    want = ref.bn_eval(x, stats["mean"], stats["var"], GHOST_W, GHOST_B, axis=1)
    y, same = jbatched(frozen)(jnp.asarray(x), state)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(same, state)
    y, same = jbatched(lambda x, s: layer(x, s, inference=True))(jnp.asarray(x), state)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(same, state)
    y0, _ = frozen(jnp.asarray(x[0]), state)  # one example, no vmap
    np.testing.assert_allclose(y0, want[0], rtol=1e-5, atol=1e-6)


def test_ghost_batch_norm_in_sequential_and_bfloat16():
    """In ``eqx.nn.Sequential`` it is called with the state, as by hand; bf16 input
    gives bf16 output within bf16 rounding of the float32 call, and a float32 state."""
    key = jax.random.key(3)
    layers = [
        eqx.nn.Conv1d(C, 4, 1, key=key),
        bnx.GhostBatchNorm(4, "batch", virtual_batch_size=4),
        eqx.nn.Lambda(jnp.ravel),
        bnx.LayerNorm(8),
    ]
    seq, state = eqx.nn.make_with_state(eqx.nn.Sequential)(layers)
    assert seq.is_stateful()
    x = jnp.asarray(data(25))
    y, new = jbatched(seq)(x, state)

    def by_hand(x, state):
        h, state = seq.layers[1](seq.layers[0](x), state)
        return seq.layers[3](jnp.ravel(h)), state

    y2, new2 = jbatched(by_hand)(x, state)
    np.testing.assert_array_equal(y, y2)
    chex.assert_trees_all_equal(new, new2)

    layer, state = make_ghost()
    step = jbatched(layer)
    x32 = jnp.asarray(data(26)).astype(jnp.bfloat16).astype(jnp.float32)
    y16, s16 = step(x32.astype(jnp.bfloat16), state)
    y32, s32 = step(x32, state)
    assert y16.dtype == jnp.bfloat16
    chex.assert_trees_all_equal_shapes_and_dtypes(s16, state)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=3e-2, rtol=1e-2)
    chex.assert_trees_all_close(s16, s32, rtol=1e-6)


def test_ghost_batch_norm_on_devices_and_nested_vmaps():
    """Virtual batches are runs of the last name's examples; earlier names share the
    running update. On 8 devices with 4 examples each (``("d", "b")``, runs of 2) and
    under two nested vmaps, output and state are float64 Ghost BatchNorm of the whole
    batch, and the compiled step has one all-reduce (the running update) and no
    gather. With one example per device (``"d"``, runs of 4, shard_map's default
    checks) the state comes back replicated."""
    require_devices(8)
    x = data(27, shape=(32, C, 2))
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    fresh = {"mean": np.zeros(C), "var": np.ones(C)}

    def check(y, new, v, x=x):
        y64, s64 = ref.ghost_batch_norm_step(
            x, GHOST_W, GHOST_B, fresh, axis=1, eps=1e-5, momentum=0.5, virtual_batch_size=v
        )
        np.testing.assert_allclose(np.asarray(y).reshape(x.shape), y64, rtol=1e-4, atol=1e-5)
        for k in ("mean", "var"):
            np.testing.assert_allclose(new[k], s64[k], rtol=1e-5, err_msg=k)

    layer, state = make_ghost(("d", "b"), virtual_batch_size=2)
    per_device = jax.vmap(layer, axis_name="b", in_axes=(0, None), out_axes=(0, None))
    f = jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=(P("d"), P()), out_specs=(P("d"), P()), check_vma=False
        )
    )
    y, new = f(jnp.asarray(x), state)
    check(y, new.get(layer.state_index), 2)
    hlo = f.lower(jnp.asarray(x), state).compile().as_text()
    assert " all-gather(" not in hlo and " all-gather-start(" not in hlo
    assert len([line for line in hlo.splitlines() if " all-reduce(" in line]) == 1, hlo

    layer, state = make_ghost(("a", "b"), virtual_batch_size=2)
    inner = jax.vmap(layer, axis_name="b", in_axes=(0, None), out_axes=(0, None))
    outer = jax.vmap(inner, axis_name="a", in_axes=(0, None), out_axes=(0, None))
    y, new = jax.jit(outer)(jnp.asarray(x).reshape(8, 4, C, 2), state)
    check(y, new.get(layer.state_index), 2)

    layer, state = make_ghost("d")
    one = jax.shard_map(
        lambda x, s: (lambda y, s: (y[None], s))(*layer(x[0], s)),
        mesh=mesh,
        in_specs=(P("d"), P()),
        out_specs=(P("d"), P()),
    )
    y, new = jax.jit(one)(jnp.asarray(x[:8]), state)
    check(y, new.get(layer.state_index), 4, x=x[:8])


def test_ghost_batch_norm_errors():
    layer, state = make_ghost()
    x = jnp.asarray(data(28, shape=(6, C, 2)))
    with pytest.raises(
        ValueError,
        match=r"virtual_batch_size=4 does not divide the 6 examples of the mapped axis "
        r"'batch' \(the last name of axis_name\)",
    ):
        batched(layer)(x, state)
    with pytest.raises(NameError, match=r"GhostBatchNorm: axis_name='batch' is not bound"):
        layer(x[0], state)
    with pytest.raises(ValueError, match=r"GhostBatchNorm needs axis_name.*got axis_name=None"):
        bnx.GhostBatchNorm(C, None, virtual_batch_size=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"virtual_batch_size must be a positive int, got 0"):
        bnx.GhostBatchNorm(C, "batch", virtual_batch_size=0)
    with pytest.raises(
        ValueError,
        match=r"axis_index_groups group the devices of the names "
        r"before the last in axis_name.*axis_name='batch' has none",
    ):
        bnx.GhostBatchNorm(C, "batch", virtual_batch_size=2, axis_index_groups=[[0, 1]])


def test_recalibrate_leaves_a_ghost_batch_norm_as_it_is():
    """``recalibrate`` recomputes the BatchNorm statistics of a model that also has a
    GhostBatchNorm (which has no Equinox counterpart and keeps its state)."""
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            bnx.BatchNorm(C, "batch", mode="batch"),
            bnx.GhostBatchNorm(C, "batch", virtual_batch_size=4),
        ]
    )
    batches = [data(29), data(30)]
    new = bnx.recalibrate(model, state, batches, progress=False)
    mean, var = inference_stats(model.layers[0], new)
    m64, v64 = stats64(np.concatenate(batches))
    np.testing.assert_allclose(mean, m64, rtol=1e-5)
    np.testing.assert_allclose(var, v64, rtol=1e-4)
    index = model.layers[1].state_index
    chex.assert_trees_all_equal(new.get(index), state.get(index))


# ------------------------------------------------------------ InstanceNorm running stats


def make_instance(**kw):
    """An InstanceNorm with running statistics, a non-trivial weight and bias, and its state."""
    layer, state = eqx.nn.make_with_state(bnx.InstanceNorm)(
        C, track_running_stats=True, axis_name="batch", momentum=0.5, **kw
    )
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (GHOST_W, GHOST_B)), state


@eqx.filter_jit
def _instance_step(layer, x, state, mask):
    """Equinox's way: the layer on one example under ``vmap(axis_name="batch")``."""
    return jax.vmap(
        lambda x, m, s: layer(x, s, mask=m),
        axis_name="batch",
        in_axes=(0, None if mask is None else 0, None),
        out_axes=(0, None),
    )(x, mask, state)


@partial(jax.jit, static_argnums=0)
def _core_instance_step(norm, params, state, x, mask):
    return norm.apply(params, state, x, training=True, mask=mask)


def test_instance_norm_running_stats_equal_the_core_and_float64():
    """``track_running_stats=True`` under ``eqx.filter_jit`` + ``vmap(axis_name="batch")``,
    over two steps (the second masked): each example is normalized with its own
    statistics, and the output and the new (unbatched) running statistics equal
    :class:`bn_jax.InstanceNorm` (``track_running_stats=True``) on the whole batch
    and float64 Instance Normalization (running statistics moving towards the
    count-weighted average over the examples of their instance statistics)."""
    layer, state = make_instance()
    assert layer.is_stateful()
    norm = bn_jax.InstanceNorm(track_running_stats=True, feature_axes=1, momentum=0.5, epsilon=1e-5)
    params = {"scale": jnp.asarray(GHOST_W), "bias": jnp.asarray(GHOST_B)}
    core_state = norm.init(C)[1]
    state64 = {"mean": np.zeros(C), "var": np.ones(C)}
    rng = np.random.default_rng(40)
    for step, mask in enumerate([None, rng.random((16, 1, 3)) > 0.3]):
        x = data(41 + step, shape=(16, C, 3), std=1.0 + step)
        y, state = _instance_step(layer, jnp.asarray(x), state, mask)
        y_core, core_state = _core_instance_step(norm, params, core_state, jnp.asarray(x), mask)
        y64, state64 = ref.instance_norm_step(
            x, GHOST_W, GHOST_B, state64, feature_axes=1, eps=1e-5, momentum=0.5, mask=mask
        )
        new = state.get(layer.state_index)
        assert new["mean"].shape == (C,)  # unbatched: it left the vmap with out_axes=None
        np.testing.assert_allclose(y, y_core, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(new, core_state, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-5)
        for k in ("mean", "var"):
            np.testing.assert_allclose(new[k], state64[k], rtol=1e-5, err_msg=k)
    # Per example, as without running statistics.
    plain = jax.vmap(
        eqx.tree_at(lambda m: (m.weight, m.bias), bnx.InstanceNorm(C), (GHOST_W, GHOST_B))
    )
    np.testing.assert_allclose(y, plain(jnp.asarray(x), mask=mask), rtol=1e-5, atol=1e-5)


def test_instance_norm_inference_uses_the_running_statistics():
    """Inference (the field, ``eqx.nn.inference_mode`` or the call argument) normalizes
    each example with the running statistics (mean 0 and var 1 before training),
    needs no bound axis and leaves the state as it is."""
    layer, state = make_instance()
    x = data(43)
    frozen = eqx.nn.inference_mode(layer)
    assert frozen.inference and not layer.inference
    y, _ = jbatched(frozen)(jnp.asarray(x), state)
    np.testing.assert_allclose(
        y, ref.bn_eval(x, np.zeros(C), np.ones(C), GHOST_W, GHOST_B, axis=1), rtol=1e-6
    )
    _, state = _instance_step(layer, jnp.asarray(data(44)), state, None)
    stats = state.get(layer.state_index)
    want = ref.bn_eval(x, stats["mean"], stats["var"], GHOST_W, GHOST_B, axis=1)
    for run in (frozen, lambda x, s: layer(x, s, inference=True)):
        y, same = jbatched(run)(jnp.asarray(x), state)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_equal(same, state)
    y0, _ = frozen(jnp.asarray(x[0]), state)  # one example, no vmap
    np.testing.assert_allclose(y0, want[0], rtol=1e-5, atol=1e-6)


def test_instance_norm_without_running_stats_is_unchanged():
    """The default layer keeps its leaves (weight and bias only), is called without a
    state, and ``Sequential`` calls it so; with running statistics ``Sequential``
    passes the state, as by hand, and bf16 input gives bf16 output within bf16
    rounding of the float32 call, with a float32 state."""
    off = bnx.InstanceNorm(C)
    assert not off.is_stateful() and off.state_index is None and off.inference is None
    assert len(jax.tree.leaves(off)) == 2
    x = jnp.asarray(data(45))
    assert jax.vmap(off)(x).shape == x.shape
    seq = eqx.nn.Sequential([bnx.InstanceNorm(C), eqx.nn.Lambda(jnp.ravel)])
    assert not seq.is_stateful()
    np.testing.assert_array_equal(jax.vmap(seq)(x), jax.vmap(off)(x).reshape(16, -1))

    key = jax.random.key(4)
    layers = [
        eqx.nn.Conv1d(C, 4, 1, key=key),
        bnx.InstanceNorm(4, track_running_stats=True, axis_name="batch"),
        eqx.nn.Lambda(jnp.ravel),
    ]
    seq, state = eqx.nn.make_with_state(eqx.nn.Sequential)(layers)
    assert seq.is_stateful()
    y, new = jbatched(seq)(x, state)

    def by_hand(x, state):
        h, state = seq.layers[1](seq.layers[0](x), state)
        return jnp.ravel(h), state

    y2, new2 = jbatched(by_hand)(x, state)
    np.testing.assert_array_equal(y, y2)
    chex.assert_trees_all_equal(new, new2)

    layer, state = make_instance()
    x32 = jnp.asarray(data(46)).astype(jnp.bfloat16).astype(jnp.float32)
    y16, s16 = jbatched(layer)(x32.astype(jnp.bfloat16), state)
    y32, s32 = jbatched(layer)(x32, state)
    assert y16.dtype == jnp.bfloat16
    chex.assert_trees_all_equal_shapes_and_dtypes(s16, state)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=3e-2, rtol=1e-2)
    chex.assert_trees_all_close(s16, s32, rtol=1e-6)


def test_instance_norm_running_stats_errors():
    layer, state = make_instance()
    x = jnp.asarray(data(47))
    with pytest.raises(NameError, match=r"InstanceNorm: axis_name='batch' is not bound"):
        layer(x[0], state)
    with pytest.raises(TypeError, match=r"track_running_stats=True needs its state"):
        layer(x[0])
    with pytest.raises(
        ValueError,
        match=r"InstanceNorm\(track_running_stats=True\) needs axis_name.*got axis_name=None",
    ):
        bnx.InstanceNorm(C, track_running_stats=True)
    with pytest.raises(ValueError, match=r"axis_name must be one name.*\('d', 'batch'\)"):
        bnx.InstanceNorm(C, track_running_stats=True, axis_name=("d", "batch"))
    with pytest.raises(ValueError, match=r"axis_name='batch' is used only with track_running"):
        bnx.InstanceNorm(C, axis_name="batch")
    with pytest.raises(ValueError, match=r"track_running_stats=True needs channels"):
        bnx.InstanceNorm(channelwise_affine=False, track_running_stats=True, axis_name="b")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\].*got 1.5"):
        bnx.InstanceNorm(C, track_running_stats=True, axis_name="batch", momentum=1.5)


@pytest.mark.parametrize("cls", [bnx.BatchRenorm, bnx.GhostBatchNorm])
def test_family_constructors_start_with_equinox_batch_norm_s(cls):
    """Equinox BatchNorm's arguments but ``mode`` (names, kinds, defaults), then
    keyword-only options."""
    want = [p for p in _params(eqx.nn.BatchNorm.__init__) if p.name != "mode"]
    got = _params(cls.__init__)
    assert [(p.name, p.kind, p.default) for p in got[: len(want)]] == [
        (p.name, p.kind, p.default) for p in want
    ]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in got[len(want) :])


# ------------------------------------------------------------------------- typing

SNIPPET = """
import equinox as eqx
import bn_jax.equinox as bnx

a = bnx.BatchNorm(4, "batch", mode="batch", unbiased_running_var=True)
reveal_type(a)
reveal_type(a.batch_state_index)
b = bnx.BatchNorm(4, "batch", momentun=0.9)
c = bnx.LayerNorm(4, use_weight=False)
reveal_type(c.weight)
d = bnx.GroupNorm(2, 4, channelwise_afine=False)
model, state = eqx.nn.make_with_state(bnx.BatchNorm)(4, "batch", mode="batch")
reveal_type(model)
g = bnx.GhostBatchNorm(4, "batch", virtual_batch_size=2)
reveal_type(g.state_index)
h = bnx.GhostBatchNorm(4, "batch", virtual_batch=2)
"""


@requires_mypy
def test_mypy_sees_the_equinox_drop_ins(tmp_path):
    lines, out = mypy_lines(SNIPPET, tmp_path)
    assert 'Revealed type is "bn_jax.equinox.BatchNorm"' in lines[6], out
    assert "StateIndex[tuple[" in lines[7], out
    assert 'Unexpected keyword argument "momentun"' in lines[8], out
    assert "Array | None" in lines[10], out
    assert 'Unexpected keyword argument "channelwise_afine"' in lines[11], out
    assert 'Revealed type is "bn_jax.equinox.BatchNorm"' in lines[13], out
    assert "StateIndex[dict[str, " in lines[15], out
    assert 'Unexpected keyword argument "virtual_batch"' in lines[16], out
    flagged = {n for n, line in lines.items() if "error:" in line}
    assert flagged == {8, 11, 16}, out


# ------------------------------------------------------------------------ example


def test_converted_cnn_trains_as_the_one_built_with_the_drop_in():
    """The example's Equinox CNN, built with Equinox's BatchNorm and converted, trains
    under ``eqx.filter_jit`` + ``vmap(axis_name="batch")`` exactly as the same CNN
    built with the drop-in (weights and state equal after every step), and differs
    from Equinox's own layer."""
    spec = importlib.util.spec_from_file_location("equinox_digits", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    x, y, _, _ = example.load(0)
    key = jax.random.key(0)
    runs = {
        "converted": bnx.convert(eqx.nn.make_with_state(example.make_model)(key, 0.9)),
        "built": eqx.nn.make_with_state(example.make_model)(key, 0.9, bnx.BatchNorm),
        "equinox": eqx.nn.make_with_state(example.make_model)(key, 0.9),
    }
    optimizer = optax.sgd(0.05, momentum=0.9)
    step = example.make_step(optimizer)
    out = {}
    for name, (model, state) in runs.items():
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        for i in range(3):
            batch = slice(8 * i, 8 * i + 8)
            model, state, opt_state, _ = step(model, state, opt_state, x[batch], y[batch])
        out[name] = (eqx.filter(model, eqx.is_array), state)
    chex.assert_trees_all_equal(jax.tree.leaves(out["converted"]), jax.tree.leaves(out["built"]))
    differ = jax.tree.map(
        lambda a, b: not np.array_equal(a, b),
        jax.tree.leaves(out["converted"][0]),
        jax.tree.leaves(out["equinox"][0]),
    )
    assert any(differ)  # Equinox's layer computes otherwise (statistics, debiasing)


def test_training_call_is_short():
    """A training call of the drop-in reaches the first reduction through five bn_jax
    frames (``__call__`` -> ``_batch_norm_call`` -> ``BatchNorm.apply`` ->
    ``batch_normalize`` -> ``moments``), as the Flax drop-ins do, and the core's
    ``apply`` computes it."""
    from tests.test_call_path import _profile

    bn, state = make_bn(bnx.BatchNorm, mode="batch")
    x = jnp.asarray(data(0, shape=(8, C)))
    seen, depth, _ = _profile(lambda: batched(bn)(x, jax.tree.map(jnp.asarray, state)))
    names = sorted(f"{Path(f).name}:{n}" for f, n in seen)
    assert depth is not None and depth <= 5, (depth, names)
    assert "batch_norm.py:apply" in names
    assert sum(n.startswith("equinox.py:") for n in names) <= 12, names
