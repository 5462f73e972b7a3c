"""bn_jax.linen: a drop-in for flax.linen.BatchNorm over the bn_jax core."""

from __future__ import annotations

import collections
import dataclasses
import functools
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import bn_jax
from bn_jax import linen as bnn
from tests.devices import require_devices

FLAX_BN = functools.partial(nn.BatchNorm, use_fast_variance=False)
OURS_BN = bnn.BatchNorm  # the one-import switch


class ResBlock(nn.Module):
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(self.norm, use_running_average=not train, momentum=0.9)
        y = nn.Conv(x.shape[-1], (3, 3), use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(x.shape[-1], (3, 3), use_bias=False)(y)
        y = norm()(y)
        return nn.relu(x + y)


class SmallResNet(nn.Module):
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(self.norm(use_running_average=not train, momentum=0.9)(x))
        x = ResBlock(self.norm)(x, train)
        x = ResBlock(self.norm)(x, train)
        x = x.mean(axis=(1, 2))
        x = self.norm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(4)(x)


def _data(step: int):
    kx, ky = jax.random.split(jax.random.key(100 + step))
    x = 2.0 + 3.0 * jax.random.normal(kx, (16, 6, 6, 3))
    y = jax.random.randint(ky, (16,), 0, 4)
    return x, y


def _trainer(model: nn.Module, tx: optax.GradientTransformation):
    @jax.jit
    def step(params, batch_stats, opt_state, x, labels):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, upd["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return step


def _train(model, variables, tx, steps):
    step = _trainer(model, tx)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    losses = []
    for i in range(steps):
        x, labels = _data(i)
        params, stats, opt_state, loss = step(params, stats, opt_state, x, labels)
        losses.append(float(loss))
    return {"params": params, "batch_stats": stats}, np.array(losses)


@pytest.fixture(scope="module")
def models():
    flax_model, ours_model = SmallResNet(FLAX_BN), SmallResNet(OURS_BN)
    x, _ = _data(0)
    key = jax.random.key(0)
    init = lambda m: m.init(key, x, train=False)  # eager: cheaper than compiling init
    return {"flax": (flax_model, init(flax_model)), "ours": (ours_model, init(ours_model))}


@pytest.fixture(scope="module")
def trained(models):
    """Both models after the same optax steps from the same initial variables."""
    tx = optax.sgd(0.05, momentum=0.9)
    out = {}
    for name, (model, variables) in models.items():
        out[name] = _train(model, variables, tx, steps=4)
    return out


def _tree_spec(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (jax.tree_util.keystr(path), a.shape, a.dtype), tree
    )


def test_cnn_variable_trees_identical(models):
    (_, v_flax), (_, v_ours) = models["flax"], models["ours"]
    assert jax.tree.structure(v_flax) == jax.tree.structure(v_ours)
    assert _tree_spec(v_flax) == _tree_spec(v_ours)
    bn = v_ours["batch_stats"]
    assert set(bn) == {"BatchNorm_0", "BatchNorm_1", "ResBlock_0", "ResBlock_1"}
    assert set(bn["ResBlock_0"]["BatchNorm_0"]) == {"mean", "var"}
    # same RNG stream for the convolutions: identical initial values too
    chex.assert_trees_all_equal(v_flax, v_ours)


def test_flax_checkpoint_loads_and_gives_same_outputs(models, trained):
    ours_model, ours_init = models["ours"]
    flax_model, _ = models["flax"]
    flax_vars, _ = trained["flax"]
    # serialized with Flax's layer, restored into a tree made by ours
    restored = flax.serialization.from_bytes(ours_init, flax.serialization.to_bytes(flax_vars))
    chex.assert_trees_all_equal(restored, flax_vars)
    assert not np.allclose(restored["batch_stats"]["BatchNorm_0"]["var"], 1.0)

    x, _ = _data(7)
    y_ref = flax_model.apply(flax_vars, x, train=False)
    y = ours_model.apply(restored, x, train=False)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)

    y_ref, s_ref = flax_model.apply(flax_vars, x, train=True, mutable=["batch_stats"])
    y, s = ours_model.apply(restored, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(s, s_ref, rtol=1e-5, atol=1e-6)


def test_optax_training_steps_agree(trained):
    (v_flax, loss_flax), (v_ours, loss_ours) = trained["flax"], trained["ours"]
    np.testing.assert_allclose(loss_ours, loss_flax, rtol=1e-5)
    assert loss_ours[-1] < loss_ours[0]
    chex.assert_trees_all_close(v_ours, v_flax, rtol=2e-4, atol=2e-5)
    # the running statistics moved away from their start
    var = v_ours["batch_stats"]["ResBlock_1"]["BatchNorm_1"]["var"]
    assert not np.allclose(var, 1.0)


# -- adapter == core, bit for bit ------------------------------------------------

# name: (config, input shape, whether a mask is passed)
CONFIGS = {
    "nchw_cumulative_unbiased_masked": (
        {"axis": 1, "momentum": None, "unbiased_running_var": True},
        (4, 3, 5, 2),
        True,
    ),
    "two_axes_fast_bf16_no_bias": (
        {
            "axis": (1, 2),
            "use_fast_variance": True,
            "use_bias": False,
            "epsilon": 1e-3,
            "dtype": jnp.bfloat16,
            "param_dtype": jnp.bfloat16,
        },
        (4, 3, 2),
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adapter_equals_core_bit_for_bit(name):
    cfg, shape, masked = CONFIGS[name]
    x = 1.5 + 2.0 * jax.random.normal(jax.random.key(1), shape)
    if cfg.get("param_dtype") == jnp.bfloat16:
        x = x.astype(jnp.bfloat16)
    mask = (jnp.arange(shape[0]) < 3).reshape((-1,) + (1,) * (len(shape) - 1)) if masked else None
    module = bnn.BatchNorm(**cfg)
    core = bn_jax.BatchNorm(**cfg)
    variables = module.init(jax.random.key(0), x, use_running_average=True)
    params, state = core.init(x)
    chex.assert_trees_all_equal(dict(variables), {"params": params, "batch_stats": state})
    params = jax.tree.map(lambda p: p + 0.25, params)  # non-trivial scale/bias
    variables = {"params": params, "batch_stats": state}

    def adapter(variables, x):
        train = {"use_running_average": False, "mask": mask}
        y, upd = module.apply(variables, x, **train, mutable=["batch_stats"])
        y2, upd = module.apply({**variables, **upd}, x, **train, mutable=True)
        y_eval = module.apply({**variables, **upd}, x, use_running_average=True)
        return y, y2, y_eval, upd["batch_stats"]

    def reference(params, state, x):
        y, state = core.apply(params, state, x, training=True, mask=mask)
        y2, state = core.apply(params, state, x, training=True, mask=mask)
        y_eval, _ = core.apply(params, state, x, training=False)
        return y, y2, y_eval, state

    out = adapter(variables, x)
    chex.assert_trees_all_equal(out, reference(params, state, x))
    if masked:  # the mask did reach the statistics
        _, unmasked = core.apply(params, state, x, training=True)
        assert not np.allclose(out[3]["mean"], unmasked["mean"])


def test_adapter_compiles_to_the_core_program():
    """The Flax shell adds no computation: the same XLA instructions as the core."""
    x = jnp.ones((8, 4, 4, 6))
    module, core = bnn.BatchNorm(use_running_average=False), bn_jax.BatchNorm()
    variables = module.init(jax.random.key(0), x)

    def ops(f):
        hlo = jax.jit(f).lower(variables, x).compile().as_text()
        return collections.Counter(re.findall(r"= \S+ ([\w-]+)\(", hlo))

    adapter = ops(lambda v, x: module.apply(v, x, mutable=["batch_stats"]))
    reference = ops(lambda v, x: core.apply(v["params"], v["batch_stats"], x, training=True))
    assert adapter == reference and sum(reference.values()) > 10


def test_random_initializers_match_flax():
    x = jnp.ones((4, 7))
    kw = {"scale_init": nn.initializers.normal(1.0), "bias_init": nn.initializers.uniform(1.0)}
    v_flax = nn.BatchNorm(use_running_average=True, **kw).init(jax.random.key(3), x)
    v_ours = bnn.BatchNorm(use_running_average=True, **kw).init(jax.random.key(3), x)
    chex.assert_trees_all_equal(v_ours, v_flax)


@pytest.mark.parametrize(
    "kw",
    [
        {"axis": (2, 1)},
        {"param_dtype": jnp.bfloat16},
        {"axis": 1, "use_bias": False},
        {"scale_init": nn.with_partitioning(nn.initializers.ones, ("channels",))},
    ],
    ids=["two_axes", "bf16_params", "nchw_no_bias", "partitioned"],
)
def test_variable_tree_matches_flax_for_options(kw):
    x = jnp.ones((2, 3, 4, 5))
    v_flax = nn.BatchNorm(use_running_average=True, **kw).init(jax.random.key(0), x)
    v_ours = bnn.BatchNorm(use_running_average=True, **kw).init(jax.random.key(0), x)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)  # boxes included
    chex.assert_trees_all_equal(v_ours, v_flax)


def test_init_writes_no_statistics_and_runs_no_collective():
    """Flax's contract: init works outside shard_map even with axis_name set."""
    x = 3.0 + jax.random.normal(jax.random.key(4), (16, 4))
    module = bnn.BatchNorm(use_running_average=False, axis_name="d", momentum=0.5)
    y_init, variables = module.init_with_output(jax.random.key(0), x)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(4))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(4))
    # init output: local batch statistics, as Flax's
    y_flax, _ = FLAX_BN(use_running_average=False).init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y_init, y_flax, rtol=1e-5, atol=1e-5)

    # training then runs under shard_map with the collective: equals the core
    # there, and single-device BatchNorm on the whole batch
    require_devices(8)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    core = bn_jax.BatchNorm(axis_name="d", momentum=0.5)

    def adapter(variables, x):
        y, upd = module.apply(variables, x, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    def reference(variables, x):
        return core.apply(variables["params"], variables["batch_stats"], x, training=True)

    outs = [
        jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P("d"), P())))(
            variables, x
        )
        for f in (adapter, reference)
    ]
    chex.assert_trees_all_equal(outs[0], outs[1])
    y_single, s_single = bn_jax.BatchNorm(momentum=0.5).apply(
        variables["params"], variables["batch_stats"], x, training=True
    )
    np.testing.assert_allclose(outs[0][0], y_single, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(outs[0][1], s_single, rtol=1e-5)


def test_one_example_per_feature_works_as_in_flax_strict_check_opt_in():
    """A batch of one, as in ``model.init(key, jnp.ones((1, n)))``: Flax's result
    (variance 0, output = bias); ``allow_single_value=False`` raises in training
    but still lets ``init`` run on such a dummy batch."""
    x = 1.0 + jax.random.normal(jax.random.key(0), (1, 5))
    bias_init = nn.initializers.normal(1.0)
    ours = bnn.BatchNorm(use_running_average=False, bias_init=bias_init)
    theirs = nn.BatchNorm(use_running_average=False, bias_init=bias_init)
    v_ours, v_flax = (m.init(jax.random.key(0), x) for m in (ours, theirs))
    chex.assert_trees_all_equal(v_ours, v_flax)
    y, upd = ours.apply(v_ours, x, mutable=["batch_stats"])
    y_flax, upd_flax = theirs.apply(v_flax, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, v_ours["params"]["bias"][None], rtol=1e-6)
    chex.assert_trees_all_close((y, upd), (y_flax, upd_flax), rtol=1e-6)

    strict = bnn.BatchNorm(use_running_average=False, allow_single_value=False)
    variables = strict.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="single value per feature"):
        strict.apply(variables, x, mutable=["batch_stats"])


def test_use_running_average_rules_match_flax():
    x = jnp.ones((4, 3))
    variables = bnn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="use_running_average"):
        bnn.BatchNorm().apply(variables, x)
    with pytest.raises(ValueError, match="use_running_average"):
        bnn.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=False)
    # training without a mutable batch_stats fails the way Flax's does
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        nn.BatchNorm(use_running_average=False).apply(variables, x)
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        bnn.BatchNorm(use_running_average=False).apply(variables, x)


def test_config_errors_name_the_argument():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="momentum"):
        bnn.BatchNorm(use_running_average=True, momentum=1.5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="epsilon"):
        bnn.LayerNorm(epsilon=-1.0).init(jax.random.key(0), x)


# -- the other members of the family ----------------------------------------------

# (member, config, input shape, call kwargs)
MEMBERS: dict[str, tuple[dict[str, Any], tuple[int, ...], dict[str, Any]]] = {
    "BatchRenorm": ({"rmax": 2.0, "dmax": 1.0, "momentum": 0.5}, (8, 3), {}),
    "GhostBatchNorm": ({"virtual_batch_size": 4}, (8, 3), {}),
    "SequenceBatchNorm": ({"max_steps": 4, "time_axis": 1}, (3, 4, 2), {}),
    "InstanceNorm": ({"track_running_stats": True, "momentum": 0.5}, (2, 4, 4, 3), {}),
    "InstanceNorm-stateless": ({}, (2, 4, 4, 3), {}),
    "GroupNorm": ({"num_groups": 2}, (2, 3, 4), {}),
    "LayerNorm": ({}, (2, 5), {}),
    "RMSNorm": ({}, (2, 5), {}),
    "LayerNorm-zero_centered": ({"zero_centered_scale": True}, (2, 5), {}),
    "RMSNorm-zero_centered": ({"zero_centered_scale": True}, (2, 5), {}),
    "FilterResponseNorm": ({}, (2, 4, 4, 3), {}),
    "FilterResponseNorm-learned_epsilon": ({"learned_epsilon": True}, (2, 4, 4, 3), {}),
    "EvoNormB0": ({"momentum": 0.5}, (2, 4, 4, 3), {}),
    "EvoNormS0": ({"num_groups": 3}, (2, 4, 4, 3), {}),
}


@pytest.mark.parametrize("name", list(MEMBERS))
def test_member_wrappers_equal_core(name):
    """bn_jax.linen.<Member> and bn_jax.nnx.<Member> equal the core, bit for bit."""
    from flax import nnx

    from bn_jax import nnx as bnnx

    cfg, shape, call_kwargs = MEMBERS[name]
    name = name.split("-")[0]
    core = getattr(bn_jax, name)(**cfg)
    x = 1.0 + jax.random.normal(jax.random.key(5), shape)
    params, state = core.init(x)
    y_ref, s_ref = core.apply(params, state, x, training=True, **call_kwargs)
    y_eval_ref, _ = core.apply(params, s_ref, x, training=False, **call_kwargs)

    # linen
    module_cls = getattr(bnn, name)
    stateful = "use_running_average" in {f.name for f in dataclasses.fields(module_cls)}
    train = {"use_running_average": False} if stateful else {}
    module = module_cls(**cfg)
    variables = module.init(jax.random.key(0), x, **train)
    expected = {"params": params} if params else {}
    if state:
        expected["batch_stats"] = state
    chex.assert_trees_all_equal(dict(variables), expected)
    y, upd = module.apply(variables, x, mutable=["batch_stats"], **train, **call_kwargs)
    chex.assert_trees_all_equal(y, y_ref)
    chex.assert_trees_all_equal(dict(upd).get("batch_stats", {}), s_ref)
    if stateful:
        y_eval = module.apply({**variables, **upd}, x, use_running_average=True, **call_kwargs)
        chex.assert_trees_all_equal(y_eval, y_eval_ref)

    # nnx
    layer = getattr(bnnx, name)(shape[-1], rngs=nnx.Rngs(0), **cfg)
    got = {k: v[...] for k, v in nnx.state(layer, nnx.Param).items()}
    chex.assert_trees_all_equal(got, params)
    chex.assert_trees_all_equal(layer(x, **call_kwargs), y_ref)
    got = {k: v[...] for k, v in nnx.state(layer, nnx.BatchStat).items()}
    chex.assert_trees_all_equal(got, s_ref)
    layer.eval()
    chex.assert_trees_all_equal(layer(x, **call_kwargs), y_eval_ref if stateful else y_ref)


def test_example_runs():
    script = pathlib.Path(__file__).parents[1] / "examples" / "flax_resnet_block.py"
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "2", "--batch", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BatchNorm from: bn_jax.linen" in out.stdout
    assert "eval accuracy" in out.stdout
