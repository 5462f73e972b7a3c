"""DESIGN.md section 6, as a matrix: every listed error, for every normalizer it
applies to, raises the documented exception type with a message that names the
argument (and what came). Errors are raised before anything is compiled, so
this file is fast."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import pytest

import bn_jax

# name -> (class, minimal config). Inputs are [batch 4, time/space 3, features 4].
NORMS = {
    "BatchNorm": (bn_jax.BatchNorm, {}),
    "BatchRenorm": (bn_jax.BatchRenorm, {}),
    "GhostBatchNorm": (bn_jax.GhostBatchNorm, {"virtual_batch_size": 2}),
    "SequenceBatchNorm": (bn_jax.SequenceBatchNorm, {"max_steps": 3}),
    "GroupNorm": (bn_jax.GroupNorm, {"num_groups": 2}),
    "InstanceNorm": (bn_jax.InstanceNorm, {"track_running_stats": True}),
    "LayerNorm": (bn_jax.LayerNorm, {}),
    "RMSNorm": (bn_jax.RMSNorm, {}),
}
X_SHAPE = (4, 3, 4)


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


def _with(field):
    return [n for n, (cls, _) in NORMS.items() if field in _fields(cls)]


def _build(name, **extra):
    cls, cfg = NORMS[name]
    norm = cls(**{**cfg, **extra})
    params, state = norm.init(X_SHAPE[-1])
    return norm, params, state


# The argument that places the features (and the one that picks the reduced axes).
FEATURE_ARG = {
    "BatchNorm": "axis",
    "BatchRenorm": "axis",
    "GhostBatchNorm": "axis",
    "SequenceBatchNorm": "axis",
    "GroupNorm": "feature_axis",
    "InstanceNorm": "feature_axes",
    "LayerNorm": "feature_axes",
    "RMSNorm": "feature_axes",
}
AXIS_ARGS = [
    (n, a)
    for n in NORMS
    for a in ("axis", "feature_axis", "feature_axes", "reduction_axes")
    if a in _fields(NORMS[n][0])
]


@pytest.mark.parametrize("name", list(NORMS))
def test_feature_size_mismatch(name):
    norm, params, state = _build(name)
    x = jnp.ones((*X_SHAPE[:-1], X_SHAPE[-1] + 1))
    arg = FEATURE_ARG[name]
    want = rf"params\['scale'\] has shape \(4,\).*feature shape \(5,\) along {arg}=-1"
    for training in (True, False):
        with pytest.raises(ValueError, match=want):
            norm.apply(params, state, x, training=training)


@pytest.mark.parametrize(("name", "arg"), AXIS_ARGS)
def test_axis_out_of_range(name, arg):
    cls, cfg = NORMS[name]
    norm = cls(**cfg, **{arg: 5})
    params, state = NORMS[name][0](**cfg).init(X_SHAPE[-1])
    with pytest.raises(ValueError, match=rf"{arg}=5 is out of range for an input of rank 3"):
        norm.apply(params, state, jnp.ones(X_SHAPE), training=True)


@pytest.mark.parametrize("name", list(NORMS))
def test_integer_input(name):
    norm, params, state = _build(name)
    for training in (True, False):
        with pytest.raises(TypeError, match=r"x must be a floating-point array, got dtype int32"):
            norm.apply(params, state, jnp.ones(X_SHAPE, jnp.int32), training=training)


@pytest.mark.parametrize("name", _with("momentum"))
@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_momentum_outside_unit_interval(name, momentum):
    cls, cfg = NORMS[name]
    with pytest.raises(ValueError, match=rf"momentum must be in \[0, 1\].*got {momentum}"):
        cls(**cfg, momentum=momentum)


@pytest.mark.parametrize("name", _with("momentum"))
@pytest.mark.parametrize("momentum", [0.0, 1.0, None])
def test_momentum_bounds_are_accepted(name, momentum):
    cls, cfg = NORMS[name]
    cls(**cfg, momentum=momentum)


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("epsilon", [0.0, -1e-5, float("inf")])
def test_non_positive_epsilon(name, epsilon):
    cls, cfg = NORMS[name]
    with pytest.raises(
        ValueError, match=rf"epsilon must be a positive finite float, got {epsilon}"
    ):
        cls(**cfg, epsilon=epsilon)


@pytest.mark.parametrize("name", list(NORMS))
def test_mask_that_does_not_broadcast(name):
    norm, params, state = _build(name)
    want = re.escape("mask of shape (3, 4, 4) does not broadcast to x's shape (4, 3, 4)")
    with pytest.raises(ValueError, match=want):
        norm.apply(params, state, jnp.ones(X_SHAPE), training=True, mask=jnp.ones((3, 4, 4), bool))


# Inputs that leave one value per channel for the batch statistics.
SINGLE = {
    "BatchNorm": ((1, 4), {}, r"BatchNorm: training with a single value per feature"),
    "BatchRenorm": ((1, 4), {}, r"BatchRenorm: training with a single value per feature"),
    "GhostBatchNorm": (
        (4, 4),
        {"virtual_batch_size": 1},
        r"virtual_batch_size=1 leaves a single value per feature",
    ),
    "SequenceBatchNorm": ((1, 3, 4), {}, r"single value per feature"),
    "InstanceNorm": ((4, 4), {}, r"feature_axes=-1 leaves a single value per instance"),
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_value_per_channel_in_training(name):
    shape, extra, want = SINGLE[name]
    cls, cfg = NORMS[name]
    norm = cls(**{**cfg, **extra})
    params, state = norm.init(shape[-1])
    with pytest.raises(ValueError, match=want):
        norm.apply(params, state, jnp.ones(shape), training=True)
    # evaluation with the running statistics is defined for any batch
    if name != "InstanceNorm":
        y, _ = norm.apply(params, state, jnp.ones(shape), training=False)
        assert y.shape == shape


@pytest.mark.parametrize("name", _with("axis_name"))
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
