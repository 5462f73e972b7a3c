"""Adopting bn_jax in an existing Flax model: ``bn_jax.linen.patch``, ``bn_jax.nnx.convert``.

On a ResNet-18 and a pre-LN transformer written with plain Flax
(``tests/models.py``), the patched or converted model gives the same outputs
and running statistics as the model written with bn_jax's drop-ins, and the
same as Flax's layers with ``use_fast_variance=False`` to float tolerance, in
training and eval, eagerly, under ``jit`` and under ``shard_map`` with
``axis_name``.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bn_jax import linen as bnn
from bn_jax import nnx as bnnx
from tests import models
from tests.devices import require_devices

TOL = {"rtol": 1e-4, "atol": 1e-4}
IMAGES = 2.0 + 1.5 * jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
TOKENS = jax.random.randint(jax.random.key(2), (8, 5), 0, 11)
PAD = jnp.arange(5)[None, :] < jnp.array([5, 4, 3, 5, 2, 5, 5, 1])[:, None]


def _perturb(tree, seed=3):
    """Random offsets on every leaf, so that no layer is hidden by its initial value
    (the ResNet's zero-initialized last scale of each block). NumPy draws them:
    an eager ``jax.random`` call per leaf shape would compile a program each."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: (
            a + (0.3 * rng.normal(size=a.shape)).astype(a.dtype)
            if jnp.issubdtype(a.dtype, jnp.floating)
            else a
        ),
        tree,
    )


def _mesh():
    require_devices(8)
    return jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))


# -- linen: patch ---------------------------------------------------------------------

LINEN = {
    "resnet18": (models.ResNet18, "norm_cls", nn.BatchNorm, bnn.BatchNorm, IMAGES),
    "transformer_ln": (models.Transformer, "norm_cls", nn.LayerNorm, bnn.LayerNorm, TOKENS),
    "transformer_rms": (models.Transformer, "norm_cls", nn.RMSNorm, bnn.RMSNorm, TOKENS),
}


def _linen_models(name, **kw):
    cls, field, flax_norm, ours, x = LINEN[name]
    flax_ref = functools.partial(flax_norm, use_fast_variance=False)
    plain, dropin, reference = (cls(**{field: n}, **kw) for n in (flax_norm, ours, flax_ref))
    return plain, dropin, reference, x


def _linen_call(model, variables, x, train):
    if isinstance(model, models.ResNet18):
        if train:
            y, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return y, upd["batch_stats"]
        return model.apply(variables, x, train=False), variables["batch_stats"]
    return model.apply(variables, x, mask=PAD), {}


def _linen_jit(model, variables, x):
    """``_linen_call`` in training and in eval, compiled as one fresh program,
    traced where it is called (inside or outside ``patch``)."""

    def both(variables, x):
        return tuple(_linen_call(model, variables, x, train) for train in (True, False))

    return jax.jit(both)(variables, x)


@pytest.mark.parametrize("name", list(LINEN))
def test_patch_equals_dropins_and_flax(name):
    plain, dropin, reference, x = _linen_models(name)
    variables = _perturb(plain.init(jax.random.key(0), x[:2]))
    expected = _linen_jit(dropin, variables, x)
    chex.assert_trees_all_close(expected, _linen_jit(reference, variables, x), **TOL)
    with bnn.patch():
        patched = _linen_jit(plain, variables, x)
        if name == "transformer_rms":  # eagerly too (op by op: the smallest model)
            eager = tuple(_linen_call(plain, variables, x, train) for train in (True, False))
            chex.assert_trees_all_close(eager, expected, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(patched, expected)
    # outside the block the model is Flax's again (its fast variance rounds differently)
    if name == "resnet18":
        assert not np.array_equal(_linen_jit(plain, variables, x)[0][0], patched[0][0])


def test_patch_axis_name_makes_resnet_batchnorm_synchronized():
    """patch(axis_name=...) on a model written without it: count-weighted sync BN
    under shard_map, equal to single-device BatchNorm on the whole batch."""
    mesh = _mesh()
    plain, dropin, _, x = _linen_models("resnet18")
    variables = _perturb(plain.init(jax.random.key(0), x[:2]))
    expected = _linen_call(dropin, variables, x, True)  # one device, whole batch

    def step(variables, x):
        return _linen_call(plain, variables, x, True)

    sharded = jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
    )
    with bnn.patch(axis_name="batch"):
        y, stats = sharded(variables, x)
    chex.assert_trees_all_close((y, stats), expected, **TOL)
    _, _, sync_ref, _ = _linen_models("resnet18", axis_name="batch")
    flax_sync = jax.jit(
        jax.shard_map(
            lambda v, x: _linen_call(sync_ref, v, x, True),
            mesh=mesh,
            in_specs=(P(), P("batch")),
            out_specs=(P("batch"), P()),
        )
    )(variables, x)
    chex.assert_trees_all_close((y, stats), flax_sync, **TOL)


def test_patch_rejects_unknown_options_and_restores_flax():
    with pytest.raises(TypeError, match="unknown bn_jax option"):
        with bnn.patch(axis_nmae="batch"):
            pass
    saved = vars(nn.LayerNorm)["__call__"]
    with pytest.raises(ZeroDivisionError):
        with bnn.patch():
            assert vars(nn.LayerNorm)["__call__"] is not saved
            raise ZeroDivisionError
    assert vars(nn.LayerNorm)["__call__"] is saved


def test_zero_centered_scale_is_refused_on_existing_layers():
    """``zero_centered_scale`` changes what a stored scale means (``1 + scale``), so
    neither ``patch`` nor ``convert`` sets it: a Flax layer's scale of ones would
    double its output. The model is left as it was."""
    message = r"zero_centered_scale=True cannot be set on existing layers"
    with pytest.raises(ValueError, match=message):
        with bnn.patch(zero_centered_scale=True):
            pass
    layer = nnx.LayerNorm(4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        bnnx.convert(layer, zero_centered_scale=True)
    assert type(layer) is nnx.LayerNorm
    x = jnp.arange(8.0).reshape(2, 4)
    with bnn.patch(zero_centered_scale=False):  # the default is accepted; no patch left active
        y = nn.LayerNorm().init_with_output(jax.random.key(0), x)[0]
    chex.assert_trees_all_close(
        y,
        nn.LayerNorm(use_fast_variance=False).init_with_output(jax.random.key(0), x)[0],
        atol=1e-6,
    )


# -- nnx: convert ---------------------------------------------------------------------

NNX = {
    "resnet18": (models.NNXResNet18, nnx.BatchNorm, bnnx.BatchNorm, IMAGES),
    "transformer_ln": (models.NNXTransformer, nnx.LayerNorm, bnnx.LayerNorm, TOKENS),
}


def _nnx_models(name, **kw):
    cls, flax_norm, ours, x = NNX[name]
    flax_ref = functools.partial(flax_norm, use_fast_variance=False)
    built = [cls(norm_cls=n, rngs=nnx.Rngs(0), **kw) for n in (flax_norm, ours, flax_ref)]
    state = _perturb(nnx.state(built[0]))
    for m in built:
        nnx.update(m, state)
    return *built, x


def _nnx_call(model, x):
    if isinstance(model, models.NNXResNet18):
        return model(x)
    return model(x, mask=PAD)


@pytest.mark.parametrize("name", list(NNX))
def test_convert_equals_dropins_and_flax(name):
    plain, dropin, reference, x = _nnx_models(name)
    variables = nnx.state(plain)
    converted = bnnx.convert(plain)
    assert converted is plain
    norms = [m for _, m in nnx.iter_modules(plain) if isinstance(m, NNX[name][1])]
    assert norms and all(type(m) is NNX[name][2] for m in norms)
    chex.assert_trees_all_equal(nnx.state(plain), variables)  # variables kept
    step = nnx.jit(_nnx_call)
    for mode in ("train", "eval"):
        for m in (plain, dropin, reference):
            getattr(m, mode)()
        y = _nnx_call(plain, x)
        chex.assert_trees_all_equal(y, _nnx_call(dropin, x))
        chex.assert_trees_all_close(y, _nnx_call(reference, x), **TOL)
        jitted = [step(m, x) for m in (plain, dropin, reference)]
        chex.assert_trees_all_close(jitted[0], jitted[1], rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(jitted[0], jitted[2], **TOL)
    chex.assert_trees_all_close(nnx.state(plain), nnx.state(dropin), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(nnx.state(plain), nnx.state(reference), **TOL)


def test_convert_axis_name_makes_resnet_batchnorm_synchronized():
    mesh = _mesh()
    plain, dropin, _, x = _nnx_models("resnet18")
    bnnx.convert(plain, axis_name="batch", unbiased_running_var=True)
    assert plain.bn_init.axis_name == "batch" and plain.bn_init.unbiased_running_var is True
    dropin.set_attributes(unbiased_running_var=True)
    graphdef, state = nnx.split(plain)

    def step(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), nnx.state(model)

    y, new_state = jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
    )(state, x)
    y_single = dropin(x)  # one device, whole batch
    chex.assert_trees_all_close(y, y_single, **TOL)
    chex.assert_trees_all_close(new_state, nnx.state(dropin), **TOL)
