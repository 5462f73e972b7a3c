"""DESIGN.md section 6, as a matrix: every listed error, for every normalizer of
``tests/registry.py`` it applies to, raises the documented exception type with
a message that names the argument (and what came), and the accepted bounds
do what they say; the same errors through each ``bn_jax.equinox`` layer
(``tests/equinox_face.py``). Errors are raised before anything is compiled, so
this file is fast."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
from tests import equinox_face as eqx_face
from tests import registry
from tests.registry import NAMES, NORMALIZERS, X_SHAPE


def _build(name, **extra):
    norm = NORMALIZERS[name].build(**extra)
    params, state = norm.init(X_SHAPE[-1])
    return norm, params, state


# Every argument that picks axes, for every normalizer that has it.
AXIS_ARGS = [
    (n, a)
    for n in NAMES
    for a in ("axis", "feature_axis", "feature_axes", "reduction_axes")
    if a in registry.fields(n)
]


@pytest.mark.parametrize("name", NAMES)
def test_feature_size_mismatch(name):
    norm, params, state = _build(name)
    x = jnp.ones((*X_SHAPE[:-1], X_SHAPE[-1] + 1))
    arg = NORMALIZERS[name].feature_arg
    want = rf"params\['scale'\] has shape \(4,\).*feature shape \(5,\) along {arg}=-1"
    for training in (True, False):
        with pytest.raises(ValueError, match=want):
            norm.apply(params, state, x, training=training)


@pytest.mark.parametrize(("name", "arg"), AXIS_ARGS)
def test_axis_out_of_range(name, arg):
    norm = NORMALIZERS[name].build(**{arg: 5})
    params, state = NORMALIZERS[name].build().init(X_SHAPE[-1])
    with pytest.raises(ValueError, match=rf"{arg}=5 is out of range for an input of rank 3"):
        norm.apply(params, state, jnp.ones(X_SHAPE), training=True)


@pytest.mark.parametrize("name", NAMES)
def test_integer_input(name):
    norm, params, state = _build(name)
    for training in (True, False):
        with pytest.raises(TypeError, match=r"x must be a floating-point array, got dtype int32"):
            norm.apply(params, state, jnp.ones(X_SHAPE, jnp.int32), training=training)


@pytest.mark.parametrize("name", registry.with_field("momentum"))
@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_momentum_outside_unit_interval(name, momentum):
    with pytest.raises(ValueError, match=rf"momentum must be in \[0, 1\].*got {momentum}"):
        NORMALIZERS[name].build(momentum=momentum)


@pytest.mark.parametrize("name", registry.with_field("momentum"))
def test_cumulative_momentum_is_accepted(name):
    NORMALIZERS[name].build(momentum=None)


@pytest.mark.parametrize("name", registry.with_field("momentum"))
@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_bounds_keep_or_replace_the_running_statistics(name, momentum):
    """``new = momentum * old + (1 - momentum) * batch`` at its bounds: 1 keeps the
    running statistics bit for bit, 0 replaces them with the batch's (float64 NumPy),
    whatever they were before."""
    entry = NORMALIZERS[name]
    norm = entry.build(momentum=momentum)
    params, state = norm.init(X_SHAPE[-1])
    keys = [k for k in ("mean", "var") if k in state]  # EvoNormB0 keeps a variance only
    rng = np.random.default_rng(2)
    old = {**state}
    for key in keys:  # running statistics far from the batch's
        old[key] = jnp.asarray(rng.uniform(3.0, 4.0, state[key].shape), jnp.float32)
    x = registry.example_x()
    _, new = norm.apply(params, old, x, training=True)
    assert keys, state
    if momentum == 1.0:
        for key in keys:
            np.testing.assert_array_equal(new[key], old[key])
    else:
        # The reference's step starts from init's state; with momentum 0 that cannot matter.
        _, want = entry.reference(x, params, {**entry.config, "momentum": 0.0})
        for key in keys:
            assert not np.allclose(want[key], old[key])  # the check below can tell
            np.testing.assert_allclose(new[key], want[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("epsilon", [0.0, -1e-5, float("inf")])
def test_non_positive_epsilon(name, epsilon):
    with pytest.raises(
        ValueError, match=rf"epsilon must be a positive finite float, got {epsilon}"
    ):
        NORMALIZERS[name].build(epsilon=epsilon)


@pytest.mark.parametrize("name", NAMES)
def test_mask_that_does_not_broadcast(name):
    norm, params, state = _build(name)
    want = re.escape("mask of shape (3, 4, 4) does not broadcast to x's shape (4, 3, 4)")
    with pytest.raises(ValueError, match=want):
        norm.apply(params, state, jnp.ones(X_SHAPE), training=True, mask=jnp.ones((3, 4, 4), bool))


@pytest.mark.parametrize("name", registry.SINGLE_VALUE)
@pytest.mark.parametrize("masked", [False, True])
def test_single_value_per_channel_in_training(name, masked):
    """One value per statistic is an error in training, with or without a mask (a
    mask can only lower the count), and the message names the way out."""
    shape, extra, want = NORMALIZERS[name].single_value
    norm = NORMALIZERS[name].build(**extra)
    params, state = norm.init(shape[-1])
    mask = jnp.ones(shape, bool) if masked else None
    with pytest.raises(ValueError, match=want) as err:
        norm.apply(params, state, jnp.ones(shape), training=True, mask=mask)
    assert "allow_single_value=True" in str(err.value)
    # evaluation with the running statistics is defined for any batch
    if "mean" in state:
        y, _ = norm.apply(params, state, jnp.ones(shape), training=False)
        assert y.shape == shape


@pytest.mark.parametrize("name", registry.with_field("axis_name"))
def test_unbound_axis_name(name):
    norm, params, state = _build(name, axis_name="batch")
    want = (
        rf"{name}: axis_name='batch' is not bound\. Run the training step under "
        r"jax\.shard_map, jax\.pmap or jax\.vmap with axis_name='batch'"
    )
    with pytest.raises(ValueError, match=want):
        norm.apply(params, state, jnp.ones(X_SHAPE), training=True)


def test_virtual_batch_size_not_dividing_the_batch():
    norm, params, state = _build("GhostBatchNorm", virtual_batch_size=3)
    with pytest.raises(
        ValueError, match=r"virtual_batch_size=3 does not divide the per-device batch of 4"
    ):
        norm.apply(params, state, jnp.ones(X_SHAPE), training=True)


def test_num_groups_not_dividing_channels():
    norm = bn_jax.GroupNorm(num_groups=3)
    with pytest.raises(ValueError, match=r"num_groups=3 does not divide the 4 channels"):
        norm.init(4)
    params, state = bn_jax.GroupNorm(num_groups=2).init(4)
    with pytest.raises(ValueError, match=r"num_groups=3 does not divide the 4 channels"):
        norm.apply(params, state, jnp.ones(X_SHAPE), training=True)


# ---------------------------------------------------------------- the Equinox face
# The errors above that apply to a bn_jax.equinox layer, through each layer as an
# Equinox user calls it (tests/equinox_face.py): the same exception type and a
# message that names the argument; an unbound axis name is Equinox's NameError.

EQX = eqx_face.NAMES
EQX_STATEFUL = eqx_face.stateful_variants()


def _eqx_trainings(name):
    return (True, False) if eqx_face.FACES[name].stateful else (True,)


def _eqx_example_shape(name, layer, shape):
    """The shape of one example as the Equinox user passes it, for a core batch of ``shape``."""
    k = len(getattr(layer, "shape", ()))
    return eqx_face.to_examples(name, np.zeros(shape, np.float32), k).shape[1:]


# The constructor argument that sets the feature size of each Equinox layer.
EQX_SIZE_ARG = {"GroupNorm": "channels", "InstanceNorm": "channels", "LayerNorm": "shape",
                "RMSNorm": "shape"}  # fmt: skip


@pytest.mark.parametrize("name", EQX)
def test_equinox_feature_size_mismatch(name):
    """Named in Equinox's terms: the constructor argument and the example's shape as
    passed (no batch axis added, no core ``params['scale']`` / ``axis=``)."""
    layer, state = eqx_face.build(name)
    shape = (*X_SHAPE[:-1], X_SHAPE[-1] + 1)
    arg = EQX_SIZE_ARG.get(name, "input_size")
    size = tuple(layer.shape) if arg == "shape" else X_SHAPE[-1]
    example = _eqx_example_shape(name, layer, shape)
    for training in _eqx_trainings(name):
        with pytest.raises(ValueError) as err:
            eqx_face.apply(name, layer, state, jnp.ones(shape), training=training)
        msg = str(err.value)
        assert f"{arg}={size}" in msg and f"x.shape={example}" in msg, msg
        assert msg.startswith(eqx_face.FACES[name].layer) and "jax.vmap" in msg, msg
        assert "params[" not in msg and "axis=" not in msg, msg


@pytest.mark.parametrize("name", [n for n in EQX if EQX_SIZE_ARG.get(n) != "shape"])
def test_equinox_feature_size_mismatch_message(name):
    layer, state = eqx_face.build(name)
    shape = (*X_SHAPE[:-1], X_SHAPE[-1] + 1)
    example = _eqx_example_shape(name, layer, shape)
    arg = EQX_SIZE_ARG.get(name, "input_size")
    where = (
        "features along its last axis" if name == "SequenceBatchNorm" else "channels along axis 0"
    )
    want = (
        re.escape(
            f"{eqx_face.FACES[name].layer}: {arg}={X_SHAPE[-1]} but the example has "
            f"{X_SHAPE[-1] + 1} {where} (x.shape={example}); Equinox layers take one example"
        )
        + r".*build it with "
        + re.escape(f"{arg}={X_SHAPE[-1] + 1}.")
    )
    with pytest.raises(ValueError, match=want):
        eqx_face.apply(name, layer, state, jnp.ones(shape))


# An example of too low a rank, per layer: (its shape, the expected message).
EQX_LOW_RANK = {
    "BatchNorm": ((), r"^BatchNorm takes one example of shape \(input_size, \*spatial\), got "),
    "SequenceBatchNorm": ((4,), r"^SequenceBatchNorm takes one example of shape \(time, "),
    "GroupNorm": ((), r"^GroupNorm takes one example of shape \(channels, \*spatial\), got "),
}


@pytest.mark.parametrize("name", EQX_LOW_RANK)
def test_equinox_example_without_a_feature_axis(name):
    """An example of too low a rank (e.g. the batch passed unmapped and squeezed)."""
    example, want = EQX_LOW_RANK[name]
    layer, state = eqx_face.build(name, shape=(2, 3, 4) if name == "SequenceBatchNorm" else X_SHAPE)
    with pytest.raises(ValueError, match=want) as err:
        eqx_face.call(layer, state, jnp.ones((2, *example)))
    assert f"x.shape={example}" in str(err.value) and "jax.vmap" in str(err.value)
    if name == "SequenceBatchNorm":
        assert "(or (input_size,) with step=)" in str(err.value)


def test_equinox_group_norm_without_channels_groups_not_dividing():
    """GroupNorm(groups, channels=None) learns the channels from the example: a group
    count that does not divide them is named as the constructor's ``groups``."""
    layer = eqx_face.bnx.GroupNorm(3, channelwise_affine=False)
    with pytest.raises(ValueError) as err:
        eqx_face.call(layer, None, jnp.ones((2, 4, 5)))
    msg = str(err.value)
    want = "GroupNorm: groups=3 does not divide the 4 channels along axis 0 of the example "
    assert msg.startswith(want + "(x.shape=(4, 5))"), msg
    assert "num_groups" not in msg and "feature_axis" not in msg, msg


@pytest.mark.parametrize("name", EQX)
def test_equinox_integer_input(name):
    layer, state = eqx_face.build(name)
    for training in _eqx_trainings(name):
        with pytest.raises(TypeError, match=r"x must be a floating-point array, got dtype int32"):
            eqx_face.apply(name, layer, state, jnp.ones(X_SHAPE, jnp.int32), training=training)


@pytest.mark.parametrize("case", EQX_STATEFUL)
@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_equinox_momentum_outside_unit_interval(case, momentum):
    name, options = EQX_STATEFUL[case]
    with pytest.raises(ValueError, match=rf"momentum must be in \[0, 1\].*got {momentum}"):
        eqx_face.build(name, changes={"momentum": momentum}, **options)


@pytest.mark.parametrize("name", EQX)
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("inf")])
def test_equinox_non_positive_eps(name, eps):
    with pytest.raises(ValueError, match=rf"must be a positive finite float, got {eps}"):
        eqx_face.build(name, changes={"epsilon": eps})


@pytest.mark.parametrize("name", EQX)
def test_equinox_eps_error_names_eps(name):
    """The message names the constructor's argument, ``eps``."""
    with pytest.raises(ValueError, match=r"^eps must be a positive finite float, got 0.0"):
        eqx_face.build(name, changes={"epsilon": 0.0})


@pytest.mark.parametrize("name", EQX)
def test_equinox_mask_that_does_not_broadcast(name):
    """One mask for every example (not mapped), of a shape that is not the example's."""
    layer, state = eqx_face.build(name)
    xe = eqx_face.to_examples(name, jnp.ones(X_SHAPE), len(getattr(layer, "shape", ())))
    bad = (xe.shape[1] + 1, *xe.shape[2:])
    want = re.escape(f"mask of shape {bad} does not broadcast to x's shape")
    with pytest.raises(ValueError, match=want):
        eqx_face.call(layer, state, xe, jnp.ones(bad, bool), mask_per_example=False)


@pytest.mark.parametrize("case", EQX_STATEFUL)
def test_equinox_unbound_axis_name_is_a_name_error(case):
    """Training under a vmap that does not bind the layer's axis_name: Equinox's
    NameError (the core's is a ValueError), with the way out."""
    name, options = EQX_STATEFUL[case]
    layer, state = eqx_face.build(name, **options)
    xe = eqx_face.to_examples(name, jnp.ones(X_SHAPE))
    want = (
        rf"{eqx_face.FACES[name].layer}: axis_name='batch' is not bound\. Call the layer "
        r"on one example under jax\.vmap\(\.\.\., axis_name='batch'\)"
    )
    with pytest.raises(NameError, match=want):
        eqx_face.call(layer, state, xe, bound=False)


@pytest.mark.parametrize(
    "case", {c: v for c, v in EQX_STATEFUL.items() if v[0] in registry.SINGLE_VALUE}
)
@pytest.mark.parametrize("masked", [False, True])
def test_equinox_single_value_per_channel_with_allow_single_value_false(case, masked):
    """Equinox trains on one value per channel (the drop-ins' default); with
    ``allow_single_value=False`` that is the core's error."""
    name, options = EQX_STATEFUL[case]
    shape, extra, _ = NORMALIZERS[name].single_value
    layer, state = eqx_face.build(
        name, shape=shape, changes={**extra, "allow_single_value": False}, **options
    )
    mask = jnp.ones(shape, bool) if masked else None
    with pytest.raises(ValueError, match=EQX_SINGLE_VALUE[name]) as err:
        eqx_face.apply(name, layer, state, jnp.ones(shape), mask=mask)
    msg = str(err.value)
    assert f"shape {_eqx_example_shape(name, layer, shape)}" in msg, msg
    assert "allow_single_value=True" in msg and "training=False" not in msg, msg
    if name != "InstanceNorm":
        assert "inference=True" in msg, msg


# The single-value message of each Equinox layer, in its terms (the example's shape is
# asserted separately).
EQX_SINGLE_VALUE = {
    "BatchNorm": r"^BatchNorm: training on 1 example of shape .* along axis_name='batch', so "
                 r"each statistic sees a single value",
    "BatchRenorm": r"^BatchRenorm: training on 1 example of shape .* along axis_name='batch'",
    "GhostBatchNorm": r"^GhostBatchNorm: training with virtual_batch_size=1 on examples of "
                      r"shape .*use virtual_batch_size >= 2",
    "SequenceBatchNorm": r"^SequenceBatchNorm: training on 1 example of shape .* along "
                         r"axis_name='batch' \(statistics per time step\)",
    "InstanceNorm": r"^InstanceNorm: an example of shape .* has one spatial position, so each "
                    r"statistic sees a single value",
}  # fmt: skip


def test_equinox_single_value_per_channel_per_example_instance_norm():
    """InstanceNorm without running statistics: the same check, on each example."""
    shape = NORMALIZERS["InstanceNorm"].single_value[0]
    layer, _ = eqx_face.build("InstanceNorm", shape=shape, changes={"allow_single_value": False})
    with pytest.raises(ValueError, match=EQX_SINGLE_VALUE["InstanceNorm"]) as err:
        eqx_face.apply("InstanceNorm", layer, None, jnp.ones(shape))
    assert f"shape {shape[1:]}" in str(err.value)


@pytest.mark.parametrize("name", [n for n in EQX if "virtual_batch_size" in registry.fields(n)])
def test_equinox_virtual_batch_size_not_dividing_the_batch(name):
    layer, state = eqx_face.build(name, changes={"virtual_batch_size": 3})
    with pytest.raises(ValueError, match=r"virtual_batch_size=3 does not divide the\b.*\b4\b"):
        eqx_face.apply(name, layer, state, jnp.ones(X_SHAPE))


def test_equinox_groups_not_dividing_channels():
    with pytest.raises(ValueError, match=r"\bgroups\b.*\bchannels\b"):
        eqx_face.build("GroupNorm", changes={"num_groups": 3})
