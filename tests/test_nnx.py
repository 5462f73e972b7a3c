"""bn_jax.nnx: a drop-in for flax.nnx.BatchNorm over the bn_jax core."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bn_jax
from bn_jax import nnx as bnnx

FLAX_BN = functools.partial(nnx.BatchNorm, use_fast_variance=False)


def _spec(state):
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (jax.tree_util.keystr(path), a.shape, a.dtype), state
    )


@pytest.mark.parametrize("use_scale", [True, False])
def test_state_tree_matches_flax(use_scale):
    kw = {"use_scale": use_scale, "momentum": 0.9, "param_dtype": jnp.bfloat16}
    ours = bnnx.BatchNorm(6, rngs=nnx.Rngs(0), **kw)
    theirs = FLAX_BN(6, rngs=nnx.Rngs(0), **kw)
    for kind in (nnx.Param, nnx.BatchStat):
        assert _spec(nnx.state(ours, kind)) == _spec(nnx.state(theirs, kind))
    chex.assert_trees_all_equal(nnx.state(ours), nnx.state(theirs))
    if not use_scale:
        assert ours.scale is None and theirs.scale is None
    # momentum=None adds a per-feature count to the running statistics
    cumulative = bnnx.BatchNorm(6, momentum=None, rngs=nnx.Rngs(0))
    assert set(nnx.state(cumulative, nnx.BatchStat)) == {"mean", "var", "count"}


def test_random_initializers_match_flax():
    kw = {"scale_init": nnx.initializers.normal(1.0), "bias_init": nnx.initializers.uniform(1.0)}
    kw["scale_metadata"] = {"tag": "channels"}
    ours = bnnx.BatchNorm(5, rngs=nnx.Rngs(7), **kw)
    theirs = nnx.BatchNorm(5, rngs=nnx.Rngs(7), **kw)
    chex.assert_trees_all_equal(nnx.state(ours), nnx.state(theirs))
    assert ours.scale.get_metadata() == theirs.scale.get_metadata()
    assert ours.scale.get_metadata()["tag"] == "channels"


class MLP(nnx.Module):
    def __init__(self, norm, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(3, 8, rngs=rngs)
        self.bn = norm(8, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x)))))


def _batch(i):
    kx, ky = jax.random.split(jax.random.key(10 + i))
    return 1.0 + 2.0 * jax.random.normal(kx, (16, 3)), jax.random.randint(ky, (16,), 0, 2)


def test_train_eval_switch_modes_and_match_core():
    model = MLP(bnnx.BatchNorm, rngs=nnx.Rngs(0))
    core = bn_jax.BatchNorm(momentum=0.9)
    x = 2.0 + jax.random.normal(jax.random.key(1), (16, 8))
    bn = model.bn
    params = {"scale": bn.scale[...] + 0.5, "bias": bn.bias[...] - 0.25}
    bn.scale[...], bn.bias[...] = params["scale"], params["bias"]
    state = {"mean": bn.mean[...], "var": bn.var[...]}

    model.eval()
    assert bn.use_running_average is True and model.drop.deterministic is True
    y_eval = bn(x)
    chex.assert_trees_all_equal(y_eval, core.apply(params, state, x, training=False)[0])
    chex.assert_trees_all_equal({"mean": bn.mean[...], "var": bn.var[...]}, state)  # unchanged

    model.train()
    assert bn.use_running_average is False and model.drop.deterministic is False
    y1, y2 = bn(x), bn(x * 2.0)
    r1, s1 = core.apply(params, state, x, training=True)
    r2, s2 = core.apply(params, s1, x * 2.0, training=True)
    chex.assert_trees_all_equal((y1, y2), (r1, r2))
    chex.assert_trees_all_equal({"mean": bn.mean[...], "var": bn.var[...]}, s2)

    # the call-time flag wins over the attribute, as in Flax
    y_override = bn(x, use_running_average=True)
    chex.assert_trees_all_equal(y_override, core.apply(params, s2, x, training=False)[0])
    chex.assert_trees_all_equal({"mean": bn.mean[...], "var": bn.var[...]}, s2)

    # nnx.view: an eval-mode view sharing the variables
    view = nnx.view(model, use_running_average=True, deterministic=True)
    assert view.bn.use_running_average is True and bn.use_running_average is False


def test_masked_call_equals_core():
    bn = bnnx.BatchNorm(3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (8, 3))
    mask = jnp.arange(8)[:, None] < 5
    params, state = bn_jax.BatchNorm().init(3)
    y_ref, s_ref = bn_jax.BatchNorm().apply(params, state, x, training=True, mask=mask)
    chex.assert_trees_all_equal(bn(x, mask=mask), y_ref)
    chex.assert_trees_all_equal({"mean": bn.mean[...], "var": bn.var[...]}, s_ref)


def test_missing_mode_is_an_error():
    bn = bnnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"use_running_average.*model\.train\(\)"):
        bn(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="momentum"):
        bnnx.BatchNorm(3, momentum=-0.5, rngs=nnx.Rngs(0))


def _train(norm, steps=3):
    model = MLP(norm, rngs=nnx.Rngs(0))
    model.train()
    opt = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, labels):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, *_batch(i))) for i in range(steps)]
    return model, np.array(losses)


def test_nnx_jit_and_optimizer_agree_with_flax():
    ours, loss_ours = _train(bnnx.BatchNorm)
    theirs, loss_theirs = _train(FLAX_BN)
    np.testing.assert_allclose(loss_ours, loss_theirs, rtol=1e-5)
    for kind in (nnx.Param, nnx.BatchStat):
        chex.assert_trees_all_close(
            nnx.state(ours, kind), nnx.state(theirs, kind), rtol=1e-4, atol=1e-6
        )
    assert not np.allclose(ours.bn.var[...], 1.0)  # statistics did move under nnx.jit
    ours.eval()
    theirs.eval()
    x, _ = _batch(9)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


# The other members of the family: see test_member_wrappers_equal_core in test_linen.py,
# which checks the linen and nnx wrappers together (sharing compiled kernels).
