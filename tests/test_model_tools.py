"""Whole-model recalibration and folding: bn_jax.linen / bn_jax.nnx recalibrate and fold.

The models are small ResNets written here in plain flax.linen / flax.nnx, in
the style of Flax's ImageNet example, and the ResNet-18 of tests/models.py,
with Flax's own BatchNorm and with bn_jax's drop-ins. References, computed
without bn_jax:

* training-mode recalibration: Flax's own training step with ``momentum=0``
  and ``use_fast_variance=False`` on each batch gives every BatchNorm's batch
  statistics; pooled over the batches in float64 NumPy (count-weighted).
* evaluation-mode recalibration with as many passes as the network's
  BatchNorm depth: Flax's training step on the whole stream as one batch
  (each layer then normalizes with exactly the population statistics of its
  input, which is the fixed point).
* layers applied twice and masks: a float64 NumPy forward.
* folding: the unfolded model in evaluation mode.

Tolerances: statistics rtol 1e-4 (float32 forward through up to seven
BatchNorms); folded outputs within 1e-5 of the output's scale (float32
rounding of the folded weights).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bn_jax.linen
import bn_jax.nnx
from tests import reference as ref
from tests.devices import require_devices
from tests.models import NNXResNet18, ResNet18

DEPTH = 7  # BatchNorms on the longest path through Net / NNet
SIZES = (8, 8, 5)  # an uneven last batch
RNG = np.random.default_rng(0)
DATA = RNG.normal(1.0, 2.0, size=(sum(SIZES), 8, 8, 3)).astype(np.float32)
BATCHES = np.split(DATA, np.cumsum(SIZES)[:-1])
X_NEW = RNG.normal(0.5, 1.5, size=(3, 8, 8, 3)).astype(np.float32)
X_NEW2 = RNG.normal(0.5, 1.5, size=(3, 16, 16, 3)).astype(np.float32)

# Folded pairs of Net / NNet: every Conv/Dense directly followed by a BatchNorm,
# except the head's first Dense, whose output also feeds a residual add.
LINEN_FOLDED = {
    (("Conv_0",), ("BatchNorm_0",)),
    (("Block_0", "Conv_0"), ("Block_0", "BatchNorm_0")),
    (("Block_0", "Conv_1"), ("Block_0", "BatchNorm_1")),
    (("Block_1", "Conv_0"), ("Block_1", "BatchNorm_0")),
    (("Block_1", "Conv_1"), ("Block_1", "BatchNorm_1")),
    (("Block_1", "conv_proj"), ("Block_1", "norm_proj")),
    (("Dense_1",), ("BatchNorm_2",)),
}
NNX_FOLDED = {  # the BatchNorms replaced, each after its Conv/Linear
    "norm",
    "block1/norm0",
    "block1/norm1",
    "block2/norm0",
    "block2/norm1",
    "block2/norm_proj",
    "norm_dense1",
}
NNX_NOT_FOLDED = ("norm_dense0",)


def _close(out, want, rel):
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(out - want))
    assert err <= rel * np.max(np.abs(want)), (err, np.max(np.abs(want)))


def pooled(stats: list[dict], sizes) -> dict:
    """Pools per-batch {"mean", "var"} trees weighted by batch size, float64 (Chan et al.)."""
    w = np.asarray(sizes, np.float64) / np.sum(sizes)

    def one(node_list):
        means = np.stack([np.asarray(s["mean"], np.float64) for s in node_list])
        vars_ = np.stack([np.asarray(s["var"], np.float64) for s in node_list])
        ww = w.reshape(-1, *([1] * (means.ndim - 1)))
        mean = np.sum(ww * means, 0)
        return {"mean": mean, "var": np.sum(ww * (vars_ + (means - mean) ** 2), 0)}

    def walk(nodes):
        if "mean" in nodes[0]:
            return one(nodes)
        return {k: walk([n[k] for n in nodes]) for k in nodes[0]}

    return walk(stats)


def assert_stats_close(got, want, rtol=1e-4):
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = dict(jax.tree_util.tree_leaves_with_path(want))
    assert {p for p, _ in got_leaves} == set(want_leaves)
    for path, g in got_leaves:
        np.testing.assert_allclose(
            g, want_leaves[path], rtol=rtol, atol=rtol * 0.1, err_msg=jax.tree_util.keystr(path)
        )


# -------------------------------------------------------------------------- linen


class Block(nn.Module):
    """ResNet basic block (Flax ImageNet example style)."""

    features: int
    strides: int = 1
    norm: Any = nn.BatchNorm
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool):
        norm = partial(
            self.norm,
            use_running_average=not train,
            momentum=self.momentum,
            use_fast_variance=False,
        )
        strides = (self.strides, self.strides)
        y = nn.Conv(self.features, (3, 3), strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = norm()(y)
        if x.shape != y.shape:
            x = nn.Conv(self.features, (1, 1), strides, use_bias=False, name="conv_proj")(x)
            x = norm(name="norm_proj")(x)
        return nn.relu(x + y)


class Net(nn.Module):
    norm: Any = nn.BatchNorm
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool):
        norm = partial(
            self.norm,
            use_running_average=not train,
            momentum=self.momentum,
            use_fast_variance=False,
        )
        block = partial(Block, norm=self.norm, momentum=self.momentum)
        x = nn.relu(norm()(nn.Conv(4, (3, 3), use_bias=False)(x)))
        x = block(4)(x, train)
        x = block(8, strides=2)(x, train)
        x = jnp.mean(x, (1, 2))
        h = nn.Dense(6)(x)
        x = nn.relu(norm()(h)) + h  # h also feeds the add: this pair must not fold
        x = norm()(nn.Dense(5)(x))
        return nn.Dense(3)(nn.relu(x))


def random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A non-trivial float32 value for a variable (init gives scale 1, mean 0, var 1).

    Drawn with NumPy into the shapes of ``jax.eval_shape(init)``: compiling
    the random initializers of a model costs far more than the tests.
    """
    if name == "kernel":
        value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
    elif name == "scale":
        value = rng.uniform(0.5, 1.5, shape)
    elif name == "var":
        value = rng.uniform(0.5, 2.0, shape)
    else:  # bias, mean
        value = rng.normal(0, 0.5, shape)
    return value.astype(np.float32)


def random_variables(model, *args, seed=0, **kwargs):
    """Variables of a linen model with the structure ``model.init`` gives, random values."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(partial(model.init, **kwargs), jax.random.key(0), *args)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: random_value(p[-1].key, s.shape, rng), flax.core.unfreeze(shapes)
    )


def random_nnx(make, seed=0):
    """The nnx model ``make()`` builds, with random values and no initializer compiled."""
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(make)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.RngKey):
            var.set_value(jax.random.key(seed))
        elif isinstance(var, nnx.RngCount):
            var.set_value(jnp.zeros(var.shape, jnp.uint32))
        elif isinstance(var, nnx.Variable):
            var.set_value(jnp.asarray(random_value(path[-1], var.shape, rng)))
    return model


@pytest.fixture(scope="module")
def linen_net():
    model = Net()
    return model, random_variables(model, BATCHES[0], seed=1, train=False)


@partial(jax.jit, static_argnums=0)
def flax_batch_stats(model, variables, x):
    """Every BatchNorm's batch statistics: one plain Flax training step of a momentum-0 model."""
    _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return upd["batch_stats"]


NET_0 = Net(momentum=0.0)  # Net whose running statistics become each batch's


def test_linen_recalibrate_training_mode_pools_batch_statistics(linen_net, capsys):
    model, variables = linen_net
    new = bn_jax.linen.recalibrate(
        model,
        variables,
        BATCHES,
        forward=lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"]),
    )
    assert "recalibrate" in capsys.readouterr().err  # the tqdm bar
    want = pooled([flax_batch_stats(NET_0, variables, b) for b in BATCHES], SIZES)
    assert_stats_close(new["batch_stats"], want)
    jax.tree.map(np.testing.assert_array_equal, new["params"], variables["params"])
    # Not what averaging the per-batch variances gives (the batches differ).
    naive = np.mean(
        [flax_batch_stats(NET_0, variables, b)["BatchNorm_2"]["var"] for b in BATCHES], 0
    )
    assert not np.allclose(naive, new["batch_stats"]["BatchNorm_2"]["var"], rtol=1e-3)


def test_linen_recalibrate_eval_mode_passes_reach_the_population_statistics(linen_net):
    model, variables = linen_net

    def forward(v, b):
        return model.apply(v, b, train=False)

    exact = bn_jax.linen.recalibrate(
        model, variables, BATCHES, forward=forward, passes=DEPTH, progress=False
    )
    want = flax_batch_stats(NET_0, variables, DATA)
    assert_stats_close(exact["batch_stats"], want)
    # One pass in evaluation mode: the first layer is exact, the deep ones are not.
    one = bn_jax.linen.recalibrate(model, variables, BATCHES, forward=forward, progress=False)
    np.testing.assert_allclose(
        one["batch_stats"]["BatchNorm_0"]["var"], want["BatchNorm_0"]["var"], rtol=1e-4
    )
    assert not np.allclose(
        one["batch_stats"]["BatchNorm_2"]["var"], want["BatchNorm_2"]["var"], rtol=1e-2
    )


def test_linen_fold_matches_eval_model(linen_net):
    model, variables = linen_net
    folded, fvars = bn_jax.linen.fold(model, variables, BATCHES[0], train=False)
    assert set(folded.folded) == LINEN_FOLDED
    # The folded BatchNorms are gone from the variables, the unfolded one is kept.
    assert set(fvars["batch_stats"]) == {"BatchNorm_1"}
    assert "BatchNorm_0" not in fvars["params"] and "BatchNorm_1" in fvars["params"]
    assert fvars["params"]["Block_1"]["conv_proj"]["bias"].shape == (8,)
    want = jax.jit(partial(model.apply, train=False))(variables, X_NEW)
    out = jax.jit(partial(folded.apply, train=False))(fvars, X_NEW)
    _close(out, want, 1e-5)
    with pytest.raises(ValueError, match="folded for evaluation"):
        folded.apply(fvars, X_NEW, train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="ran in training mode"):
        bn_jax.linen.fold(model, variables, X_NEW, train=True)


def test_linen_recalibrate_with_batch_sharded_global_arrays(linen_net):
    require_devices(8)
    model, variables = linen_net
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    batches = [jax.device_put(DATA[i : i + 8], sharding) for i in (0, 8)]

    def forward(v, b):
        return model.apply(v, b, train=True, mutable=["batch_stats"])

    new = bn_jax.linen.recalibrate(model, variables, batches, forward=forward, progress=False)
    want = pooled([flax_batch_stats(NET_0, variables, DATA[i : i + 8]) for i in (0, 8)], (8, 8))
    assert_stats_close(new["batch_stats"], want)


class Twice(nn.Module):
    """One Dense + BatchNorm unit applied twice: shared weights and statistics."""

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        dense = nn.Dense(3)
        bn = nn.BatchNorm(use_running_average=not train)
        x = nn.relu(bn(dense(x), mask=mask))
        return bn(dense(x), mask=mask)


def test_linen_layer_applied_twice_and_masks():
    model = Twice()
    x = RNG.normal(2.0, 1.5, size=(12, 3)).astype(np.float32)
    masks = RNG.random((12, 1)) < 0.7
    variables = random_variables(model, x[:2], seed=2, train=False)
    prm = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    w, b = prm["Dense_0"]["kernel"], prm["Dense_0"]["bias"]

    def bn_inputs(xb, mb):  # float64 forward in training mode: the two inputs of the BatchNorm
        h1 = xb @ w + b
        a1 = np.maximum(ref.bn_train(h1, **prm["BatchNorm_0"], mask=mb), 0)
        return h1, a1 @ w + b

    batches = [(x[:7], masks[:7]), (x[7:], masks[7:])]
    new = bn_jax.linen.recalibrate(
        model,
        variables,
        batches,
        forward=lambda v, b: model.apply(v, b[0], train=True, mask=b[1], mutable=["batch_stats"]),
        progress=False,
    )
    inputs = [np.concatenate(bn_inputs(xb, mb)) for xb, mb in batches]
    full_mask = np.concatenate([np.concatenate([mb, mb]) for _, mb in batches])
    mean, var, _ = ref.bn_stats(np.concatenate(inputs), mask=full_mask)
    got = new["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], var, rtol=1e-5)

    # Both calls of the Dense feed the BatchNorm: it folds; a masked call does not.
    folded, fvars = bn_jax.linen.fold(model, new, x, train=False)
    assert folded.folded == ((("Dense_0",), ("BatchNorm_0",)),)
    _close(folded.apply(fvars, x, train=False), model.apply(new, x, train=False), 1e-5)
    masked, _ = bn_jax.linen.fold(model, new, x, train=False, mask=masks)
    assert masked.folded == ()


def test_linen_errors():
    model = Twice()
    x = np.ones((4, 3), np.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="'batch_stats' collection"):
        bn_jax.linen.recalibrate(model, {"params": variables["params"]}, [x])
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        bn_jax.linen.recalibrate(model, variables, [x], forward=lambda v, b: b, progress=False)
    with pytest.raises(ValueError, match="yielded no batch"):
        bn_jax.linen.recalibrate(model, variables, [], progress=False)
    with pytest.raises(ValueError, match="passes must be an int >= 1, got 0"):
        bn_jax.linen.recalibrate(model, variables, [x], passes=0)
    with pytest.raises(TypeError, match=r"passes must be an int >= 1, got 2\.0 of type float"):
        bn_jax.linen.recalibrate(model, variables, [x], passes=2.0)
    with pytest.raises(ValueError, match="one-shot iterator"):
        bn_jax.linen.recalibrate(model, variables, iter([x]), passes=2)


# ---------------------------------------------------------------------------- nnx


class NBlock(nnx.Module):
    def __init__(self, cin, features, strides, norm, *, rngs):
        conv = partial(nnx.Conv, use_bias=False, rngs=rngs)
        self.conv0 = conv(cin, features, (3, 3), strides=strides)
        self.norm0 = norm(features, rngs=rngs)
        self.conv1 = conv(features, features, (3, 3))
        self.norm1 = norm(features, rngs=rngs)
        if cin != features or strides != 1:
            self.conv_proj = conv(cin, features, (1, 1), strides=strides)
            self.norm_proj = norm(features, rngs=rngs)
        else:
            self.conv_proj = None

    def __call__(self, x):
        y = nnx.relu(self.norm0(self.conv0(x)))
        y = self.norm1(self.conv1(y))
        if self.conv_proj is not None:
            x = self.norm_proj(self.conv_proj(x))
        return nnx.relu(x + y)


class NNet(nnx.Module):
    def __init__(self, norm_cls=nnx.BatchNorm, *, rngs):
        norm = partial(norm_cls, momentum=0.9, use_fast_variance=False)
        self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.norm = norm(4, rngs=rngs)
        self.block1 = NBlock(4, 4, 1, norm, rngs=rngs)
        self.block2 = NBlock(4, 8, 2, norm, rngs=rngs)
        self.dense0 = nnx.Linear(8, 6, rngs=rngs)
        self.norm_dense0 = norm(6, rngs=rngs)
        self.dense1 = nnx.Linear(6, 5, rngs=rngs)
        self.norm_dense1 = norm(5, rngs=rngs)
        self.dropout = nnx.Dropout(0.25, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x)))
        x = self.block2(self.block1(x))
        h = self.dense0(jnp.mean(x, (1, 2)))
        x = nnx.relu(self.norm_dense0(h)) + h  # h also feeds the add: not folded
        x = self.norm_dense1(self.dense1(self.dropout(x)))
        return self.head(nnx.relu(x))


nnx_apply = nnx.jit(lambda m, x: m(x))


def _nnx_stats(model) -> dict:
    return {
        "/".join(map(str, p)): {"mean": np.asarray(m.mean[...]), "var": np.asarray(m.var[...])}
        for p, m in nnx.iter_modules(model)
        if isinstance(m, nnx.BatchNorm)
    }


def bn_training(model) -> None:
    """BatchNorms on batch statistics, dropout off."""
    model.eval()
    model.set_attributes(use_running_average=False)


def nnx_batch_stats(model, x) -> dict:
    """Every BatchNorm's batch statistics in one plain nnx training step (momentum 0)."""
    copy = nnx.clone(model)
    for _, m in nnx.iter_modules(copy):
        if isinstance(m, nnx.BatchNorm):
            m.momentum = 0.0
    bn_training(copy)
    nnx_apply(copy, x)
    return _nnx_stats(copy)


@pytest.fixture(scope="module")
def nnx_base():
    return random_nnx(lambda: NNet(rngs=nnx.Rngs(0)), seed=3)


@pytest.fixture
def nnx_net(nnx_base):
    return nnx.clone(nnx_base)


def test_nnx_recalibrate_training_mode_pools_batch_statistics(nnx_net):
    model = nnx_net
    before = nnx.state(model, nnx.Param)
    counts = nnx.state(model, nnx.RngCount)
    want = pooled([nnx_batch_stats(model, b) for b in BATCHES], SIZES)
    bn_training(model)
    bn_jax.nnx.recalibrate(model, BATCHES, progress=False)
    assert_stats_close(_nnx_stats(model), want)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), before)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.RngCount), counts)


def test_nnx_recalibrate_eval_mode_passes_reach_the_population_statistics(nnx_net):
    model = nnx_net
    want = nnx_batch_stats(model, DATA)
    model.eval()
    bn_jax.nnx.recalibrate(model, BATCHES, passes=DEPTH, progress=False)
    assert_stats_close(_nnx_stats(model), want)


def test_nnx_recalibrate_advances_dropout_between_batches(nnx_net):
    # With dropout active, batches that are equal must still see different masks.
    model = nnx_net
    model.train()
    same = [BATCHES[0], BATCHES[0]]
    bn_jax.nnx.recalibrate(model, same, progress=False)
    with_dropout = _nnx_stats(model)["norm_dense1"]["var"]
    bn_training(model)
    bn_jax.nnx.recalibrate(model, same, progress=False)
    without = _nnx_stats(model)["norm_dense1"]["var"]
    assert not np.allclose(with_dropout, without, rtol=1e-3)


def test_nnx_fold_matches_eval_model(nnx_net):
    model = nnx_net
    model.eval()
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param, nnx.BatchStat))
    folded = bn_jax.nnx.fold(model, BATCHES[0])
    # The original is untouched.
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param, nnx.BatchStat), before)
    modules = dict(nnx.iter_modules(folded))
    kinds = {"/".join(map(str, p)): type(m).__name__ for p, m in modules.items()}
    folded_norms = {k for k, v in kinds.items() if v == "FoldedBatchNorm"}
    assert folded_norms == NNX_FOLDED
    assert all(kinds[n] == "BatchNorm" for n in NNX_NOT_FOLDED)
    assert modules[("block2", "conv_proj")].bias.shape == (8,)
    assert model.conv.bias is None
    _close(nnx_apply(folded, X_NEW), nnx_apply(model, X_NEW), 1e-5)
    folded.train()
    with pytest.raises(ValueError, match="folded into the layer before it"):
        folded(X_NEW)
    model.train()
    with pytest.raises(ValueError, match="ran in training mode"):
        bn_jax.nnx.fold(model, X_NEW)


class NTwice(nnx.Module):
    def __init__(self, *, rngs):
        self.dense = nnx.Linear(3, 3, rngs=rngs)
        self.norm = nnx.BatchNorm(3, use_fast_variance=False, rngs=rngs)

    def __call__(self, x, mask=None):
        x = nnx.relu(self.norm(self.dense(x), mask=mask))
        return self.norm(self.dense(x), mask=mask)


def test_nnx_layer_applied_twice_and_masks():
    model = NTwice(rngs=nnx.Rngs(1))
    x = RNG.normal(2.0, 1.5, size=(12, 3)).astype(np.float32)
    masks = RNG.random((12, 1)) < 0.7
    model.norm.scale[...] = np.array([1.5, -0.5, 2.0], np.float32)
    w, b = (
        np.asarray(model.dense.kernel[...], np.float64),
        np.asarray(model.dense.bias[...], np.float64),
    )
    scale = np.asarray(model.norm.scale[...], np.float64)

    def bn_inputs(xb, mb):
        h1 = xb @ w + b
        return h1, np.maximum(ref.bn_train(h1, scale, np.zeros(3), mask=mb), 0) @ w + b

    batches = [(x[:7], masks[:7]), (x[7:], masks[7:])]
    model.train()
    bn_jax.nnx.recalibrate(model, batches, forward=lambda m, b: m(b[0], mask=b[1]), progress=False)
    inputs = np.concatenate([np.concatenate(bn_inputs(xb, mb)) for xb, mb in batches])
    full_mask = np.concatenate([np.concatenate([mb, mb]) for _, mb in batches])
    mean, var, _ = ref.bn_stats(inputs, mask=full_mask)
    np.testing.assert_allclose(model.norm.mean[...], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.norm.var[...], var, rtol=1e-5)

    model.eval()
    kernel = np.array(model.dense.kernel[...])
    model.dense.kernel.set_value(kernel.copy())  # a NumPy value: in-place writes would show
    folded = bn_jax.nnx.fold(model, x)
    np.testing.assert_array_equal(model.dense.kernel[...], kernel)
    assert type(folded.norm).__name__ == "FoldedBatchNorm"
    _close(folded(x), model(x), 1e-5)
    assert type(bn_jax.nnx.fold(model, x, mask=masks).norm) is nnx.BatchNorm


def test_nnx_errors():
    model = NTwice(rngs=nnx.Rngs(1))
    x = np.ones((4, 3), np.float32)
    before = jax.tree.map(np.array, nnx.state(model))
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        bn_jax.nnx.recalibrate(model, [x], forward=lambda m, b: b, progress=False)
    with pytest.raises(ValueError, match="yielded no batch"):
        bn_jax.nnx.recalibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="passes must be an int >= 1, got 0"):
        bn_jax.nnx.recalibrate(model, [x], passes=0)
    with pytest.raises(TypeError, match="passes must be an int >= 1, got '2' of type str"):
        bn_jax.nnx.recalibrate(model, [x], passes="2")
    with pytest.raises(ValueError, match="one-shot iterator"):
        bn_jax.nnx.recalibrate(model, iter([x]), passes=2)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)  # unchanged


class UnbiasedBatchNorm(nn.BatchNorm):
    """A BatchNorm subclass that keeps PyTorch's unbiased running variance."""

    unbiased_running_var: bool = True


class TwoNorms(nn.Module):
    @nn.compact
    def __call__(self, x):
        return UnbiasedBatchNorm(use_running_average=False)(x), nn.BatchNorm(
            use_running_average=False
        )(x)


def test_linen_recalibrate_keeps_each_layers_variance_convention():
    x = RNG.normal(1.0, 2.0, size=(10, 3)).astype(np.float32)
    model = TwoNorms()
    variables = model.init(jax.random.key(0), x)
    new = bn_jax.linen.recalibrate(
        model,
        variables,
        [x[:6], x[6:]],
        forward=lambda v, b: model.apply(v, b, mutable=["batch_stats"]),
        progress=False,
    )
    _, var, n = ref.bn_stats(x)
    np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["var"], var, rtol=1e-5)
    np.testing.assert_allclose(
        new["batch_stats"]["UnbiasedBatchNorm_0"]["var"], var * n / (n - 1), rtol=1e-5
    )


# ------------------------------------------- ResNet-18, Flax's layers and bn_jax's drop-ins

IMAGES = RNG.normal(1.0, 2.0, size=(8, 16, 16, 3)).astype(np.float32)
RESNET_BATCHES = (IMAGES[:4], IMAGES[4:])
RESNET_NORMS = 20  # stem, two per basic block, three projections: each after a conv


def _momentum_zero(norm_cls):
    """``norm_cls`` whose running statistics become each batch's (momentum 0)."""
    return lambda *args, **kwargs: norm_cls(*args, **{**kwargs, "momentum": 0.0})


@pytest.mark.parametrize("norm_cls", [nn.BatchNorm, bn_jax.linen.BatchNorm], ids=["flax", "bn_jax"])
def test_linen_resnet18_recalibrate_and_fold(norm_cls):
    model = ResNet18(norm_cls=norm_cls)
    variables = random_variables(model, IMAGES[:4], seed=4, train=False)
    new = bn_jax.linen.recalibrate(
        model,
        variables,
        RESNET_BATCHES,
        forward=lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"]),
        progress=False,
    )
    # Reference: Flax's own BatchNorm (accurate variance), one training step per batch.
    flax_model = ResNet18(norm_cls=_momentum_zero(partial(nn.BatchNorm, use_fast_variance=False)))
    want = pooled([flax_batch_stats(flax_model, variables, b) for b in RESNET_BATCHES], (4, 4))
    assert_stats_close(new["batch_stats"], want)

    folded, fvars = bn_jax.linen.fold(model, new, IMAGES[:4], train=False)
    assert len(folded.folded) == RESNET_NORMS and "batch_stats" not in fvars
    want = jax.jit(partial(model.apply, train=False))(new, X_NEW2)
    _close(jax.jit(partial(folded.apply, train=False))(fvars, X_NEW2), want, 1e-5)


@pytest.mark.parametrize("norm_cls", [nnx.BatchNorm, bn_jax.nnx.BatchNorm], ids=["flax", "bn_jax"])
def test_nnx_resnet18_recalibrate_and_fold(norm_cls):
    model = random_nnx(lambda: NNXResNet18(norm_cls=norm_cls, rngs=nnx.Rngs(0)), seed=5)
    # Reference: the same variables in the model built with Flax's own BatchNorm.
    flax_model = nnx.eval_shape(
        lambda: NNXResNet18(
            norm_cls=partial(nnx.BatchNorm, use_fast_variance=False), rngs=nnx.Rngs(0)
        )
    )
    nnx.update(flax_model, nnx.state(model))
    want = pooled([nnx_batch_stats(flax_model, b) for b in RESNET_BATCHES], (4, 4))
    model.train()
    bn_jax.nnx.recalibrate(model, RESNET_BATCHES, progress=False)
    assert_stats_close(_nnx_stats(model), want)

    model.eval()
    folded = bn_jax.nnx.fold(model, IMAGES[:4])
    kinds = [type(m).__name__ for _, m in nnx.iter_modules(folded)]
    assert kinds.count("FoldedBatchNorm") == RESNET_NORMS and "BatchNorm" not in kinds
    _close(nnx_apply(folded, X_NEW2), nnx_apply(model, X_NEW2), 1e-5)
