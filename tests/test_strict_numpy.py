"""Every normalizer under JAX's strictest NumPy settings, with warnings as errors.

Many JAX users (Equinox's own test suite among them) run with
``jax_numpy_dtype_promotion="strict"`` (no implicit float32/bfloat16 mixing)
and ``jax_numpy_rank_promotion="raise"`` (no implicit ``(1, C)`` against
``(C,)`` broadcasting). A library that relies on either fails inside their
programs. Each test here runs every normalizer of ``tests/registry.py`` (and
its variants) under both settings and ``warnings.simplefilter("error")``:
float32 and bfloat16 input, training and evaluation, without a mask and with
a mask of lower rank than the input, under ``jit`` and ``grad``, and with
``axis_name`` under ``vmap`` and ``shard_map``. The results must be the ones
the default settings give, bit for bit: the strict settings change what is
allowed, never the numbers. The last test does the same for every
``bn_jax.linen`` and ``bn_jax.nnx`` layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests import registry
from tests.devices import require_devices

CASES = registry.contract_cases()
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
N_DEV = 4


@contextlib.contextmanager
def strict():
    with (
        jax.numpy_dtype_promotion("strict"),
        jax.numpy_rank_promotion("raise"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")
        yield


def lower_rank_mask(shape):
    """A mask over the positions of axis 1 (all but the last valid), of rank
    ``len(shape) - 1``: it broadcasts against ``x`` only by rank promotion."""
    if len(shape) < 3:
        return np.arange(shape[0])[:, None] < shape[0] - 1  # (batch, 1): same rank
    return (np.arange(shape[1]) < shape[1] - 1).reshape(shape[1], *[1] * (len(shape) - 2))


def loss_and_grads(norm, step_mode, params, state, x, training, mask):
    """``(y, new_state, grads wrt (params, x))`` of ``sum(y)`` in float32."""
    extra = {"step": jnp.int32(1)} if step_mode else {}

    def loss(p, x):
        y, new = norm.apply(p, state, x, training=training, mask=mask, **extra)
        return jnp.sum(y.astype(jnp.float32)), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new, grads


def every_mode(norm, step_mode, params, state, x):
    """Training and evaluation, without and with a lower-rank mask: one program."""
    mask = jnp.asarray(lower_rank_mask(x.shape))
    return {
        (training, masked): loss_and_grads(
            norm, step_mode, params, state, x, training, mask if masked else None
        )
        for training in (True, False)
        for masked in (False, True)
    }


def run_strict(make_fn, *args):
    """``make_fn()`` jitted and run under the strict settings, after checking that
    it traces to the same program as under the default settings (so it computes
    the same numbers, bit for bit)."""
    with strict():
        program = str(jax.make_jaxpr(make_fn())(*args))
        out = jax.jit(make_fn())(*args)
    assert program == str(jax.make_jaxpr(make_fn())(*args))
    return out


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_strict_promotion_on_one_device(name, dtype):
    norm, step_mode = CASES[name]
    params, state = norm.init(registry.C)
    shape = (registry.X_SHAPE[0], registry.C) if step_mode else registry.X_SHAPE
    x = jnp.asarray(registry.example_x(0, shape)).astype(DTYPES[dtype])
    make = lambda: functools.partial(every_mode, norm, step_mode)
    out_strict = run_strict(make, params, state, x)
    for (training, _), (y, new, grads) in out_strict.items():
        assert y.dtype == x.dtype
        assert grads[1].dtype == x.dtype
        chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
        if training:
            assert np.isfinite(np.asarray(y, np.float32)).all()


def split_input(name):
    """``(x, mask, spec, vmap_axis)``: the input of the whole batch, a mask, how
    ``shard_map`` splits both over ``N_DEV`` devices, and where ``vmap`` finds the
    device axis after ``to_devices``."""
    kind, _ = registry.NORMALIZERS[name].split
    if kind == "batch":  # a slice of the batch on each device
        x = registry.example_x(4, (4 * N_DEV, 3, registry.C))
        return x, x[..., :1] < x[..., :1].max(), P("d"), 0
    x = registry.example_x(4, (2, 2 * N_DEV, registry.C))  # a slice of axis 1
    return x, x[..., :1] < x[..., :1].max(), P(None, "d"), 1


def to_devices(a, vmap_axis):
    """``a`` with its split axis cut into ``(N_DEV, rows)`` at ``vmap_axis``."""
    shape = (*a.shape[:vmap_axis], N_DEV, -1, *a.shape[vmap_axis + 1 :])
    return a.reshape(shape)


def distributed_modes(norm, params, state, x32, x16, mask):
    """Float32 and bfloat16 training steps, without and with a mask: one program."""
    return {
        (dtype, masked): loss_and_grads(
            norm, False, params, state, x, True, mask if masked else None
        )
        for dtype, x in (("float32", x32), ("bfloat16", x16))
        for masked in (False, True)
    }


@pytest.mark.parametrize("transform", ["vmap", "shard_map"])
@pytest.mark.parametrize("name", registry.NAMES)
def test_strict_promotion_across_devices(name, transform):
    entry = registry.NORMALIZERS[name]
    _, extra = entry.split
    norm = entry.build(axis_name="d", **extra)
    params, state = norm.init(registry.C)
    x, mask, spec, axis = split_input(name)
    inputs = (jnp.asarray(x), jnp.asarray(x).astype(jnp.bfloat16), jnp.asarray(mask))
    fn = functools.partial(distributed_modes, norm, params, state)
    if transform == "vmap":
        make = lambda: jax.vmap(fn, in_axes=axis, axis_name="d")
        inputs = tuple(to_devices(a, axis) for a in inputs)
    else:
        require_devices(N_DEV)
        mesh = jax.make_mesh((N_DEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
        # every output with a leading device axis: each device's copy comes back
        per_device = lambda *a: jax.tree.map(lambda v: v[None], fn(*a))
        make = lambda: jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=P("d"))
    out_strict = run_strict(make, *inputs)
    for (dtype, _), (y, new, _) in out_strict.items():
        assert y.dtype == DTYPES[dtype]
        assert np.isfinite(np.asarray(y, np.float32)).all()
        for k, v in new.items():  # one copy of the state per device, as stored
            assert (v.shape[1:], v.dtype) == (state[k].shape, state[k].dtype), k


# Constructor options for a (4, 3, 6) input, channels last.
FLAX_OPTIONS = {
    "GroupNorm": {"num_groups": 2},
    "EvoNormS0": {"num_groups": 2},
    "GhostBatchNorm": {"virtual_batch_size": 2},
    "SequenceBatchNorm": {"max_steps": 3},
}


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_flax_layers_under_strict_promotion(framework):
    """Every ``bn_jax.linen`` / ``bn_jax.nnx`` layer with bfloat16 input and float32
    parameters, training then evaluation, under the strict settings: Flax's own
    layers raise there (no implicit bfloat16/float32 promotion); ours give the
    output of the default settings, bit for bit, in Flax's promoted dtype."""
    from flax import nnx

    from bn_jax import linen as bnn
    from bn_jax import nnx as bnnx

    x = jax.random.normal(jax.random.key(0), (4, 3, 6), jnp.bfloat16)
    module = bnn if framework == "linen" else bnnx

    def run(name):
        cls, kw = getattr(module, name), FLAX_OPTIONS.get(name, {})
        if framework == "nnx":
            layer = cls(6, rngs=nnx.Rngs(0), **kw)
            y = layer(x)
            layer.eval()
            return y, layer(x)
        if "use_running_average" in {f.name for f in dataclasses.fields(cls)}:
            kw = {**kw, "use_running_average": False}
        layer = cls(**kw)
        variables = layer.init(jax.random.key(0), x)
        y, updates = layer.apply(variables, x, mutable=True)
        return y, layer.apply({**variables, **updates}, x, mutable=True)[0]

    for name in module.__all__:
        if not isinstance(getattr(module, name), type):
            continue
        expected = run(name)
        with strict():
            got = run(name)
        assert got[0].dtype == jnp.float32, name
        chex.assert_trees_all_equal(got, expected, custom_message=name)
