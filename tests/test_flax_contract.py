"""The Flax drop-ins keep Flax's contract: signatures, variables, numbers, graph tools.

Every comparison is with Flax's own layer at the installed version, built with
``use_fast_variance=False`` (the formula bn_jax's default also computes), or
with a float64 formula where Flax is not finite.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bn_jax
from bn_jax import linen as bnn
from bn_jax import nnx as bnnx

FIVE = ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"]
KEY = jax.random.key(0)
# Random initializers: equal initial values then also show that parameters are
# drawn from the RNG streams in Flax's order.
RANDOM_INIT = {"scale_init": nn.initializers.normal(1.0), "bias_init": nn.initializers.uniform(2.0)}

# name: [(constructor options, input shape, mask shape or None)]
CASES = {
    "BatchNorm": [({"momentum": 0.9}, (6, 4, 3), (6, 4, 1)), ({"axis": 1}, (5, 3, 2, 2), None)],
    "LayerNorm": [({}, (3, 4, 6), (3, 4, 6)), ({"reduction_axes": (1, 2)}, (3, 4, 6), None)],
    "RMSNorm": [({}, (3, 4, 6), (3, 4, 6)), ({"reduction_axes": (1, 2)}, (3, 4, 6), None)],
    "GroupNorm": [
        ({"num_groups": 3}, (2, 4, 6), (2, 4, 6)),
        ({"num_groups": None, "group_size": 2}, (2, 3, 5, 6), None),
    ],
    "InstanceNorm": [({}, (2, 5, 6), (2, 5, 6)), ({}, (2, 3, 4, 6), None)],
}
CASE_IDS = [(n, i) for n in FIVE for i in range(len(CASES[n]))]


def _linen_kw(name, kw):
    out = dict(kw, **RANDOM_INIT)
    if name == "RMSNorm":
        del out["bias_init"]
    if name == "BatchNorm":
        out["use_running_average"] = False
    return out


def _data(shape, mask_shape, dtype=jnp.float32):
    kx, km = jax.random.split(jax.random.key(1))
    x = (3.0 + 2.0 * jax.random.normal(kx, shape)).astype(dtype)
    mask = None
    if mask_shape is not None:
        mask = jax.random.bernoulli(km, 0.7, mask_shape)
        mask = mask.at[(0,) * len(mask_shape)].set(True)
    return x, mask


def _linen_run(module, x, mask, steps=2):
    """init, then ``steps`` training applies (batch_stats threaded), outputs and stats."""
    variables = module.init(KEY, x, mask=mask)
    ys = []
    for _ in range(steps):
        y, upd = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
        variables = {**variables, **upd}
        ys.append(y)
    return variables, ys


# -- signatures -------------------------------------------------------------------


def _params(fn):
    """``(name, kind, default)`` of each parameter of ``fn`` (annotations aside)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", FIVE)
def test_linen_fields_are_flax_fields_then_core_extras(name):
    ours, theirs = getattr(bnn, name), getattr(nn, name)
    assert issubclass(ours, theirs) and isinstance(ours(), theirs)
    flax_fields = [f for f in dataclasses.fields(theirs) if f.name not in ("parent", "name")]
    our_fields = [f for f in dataclasses.fields(ours) if f.name not in ("parent", "name")]
    assert [f.name for f in our_fields[: len(flax_fields)]] == [f.name for f in flax_fields]
    for a, b in zip(our_fields, flax_fields, strict=False):
        expected = False if a.name == "use_fast_variance" else b.default
        assert a.default == expected, a.name
    extras = [f.name for f in our_fields[len(flax_fields) :]]
    core = [f.name for f in dataclasses.fields(getattr(bn_jax, name))]
    assert set(extras) - {"use_running_average"} == set(core) - {f.name for f in flax_fields}
    # Flax's call parameters (names, kinds, defaults); InstanceNorm adds a keyword-only
    # use_running_average for its optional running statistics.
    call_ours, call_theirs = (_params(c.__call__) for c in (ours, theirs))
    assert call_ours[: len(call_theirs)] == call_theirs
    assert [p[0] for p in call_ours[len(call_theirs) :]] == (
        ["use_running_average"] if name == "InstanceNorm" else []
    )


@pytest.mark.parametrize("name", FIVE)
def test_nnx_signature_is_flax_signature_then_core_extras(name):
    ours, theirs = getattr(bnnx, name), getattr(nnx, name)
    assert issubclass(ours, theirs)
    flax_params = list(inspect.signature(theirs.__init__).parameters.values())
    our_params = list(inspect.signature(ours.__init__).parameters.values())
    for a, b in zip(our_params, flax_params, strict=False):
        assert (a.name, a.kind) == (b.name, b.kind)
        assert a.default == (False if a.name == "use_fast_variance" else b.default), a.name
    extras = our_params[len(flax_params) :]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)
    core = {f.name for f in dataclasses.fields(getattr(bn_jax, name))}
    flax_names = {p.name for p in flax_params}
    assert {p.name for p in extras} - {"use_running_average"} == core - flax_names
    call_ours, call_theirs = (inspect.signature(c.__call__) for c in (ours, theirs))
    assert list(call_ours.parameters)[: len(call_theirs.parameters)] == list(call_theirs.parameters)
    # Flax's positional order: GroupNorm(num_features, num_groups, group_size)
    if name == "GroupNorm":
        layer = bnnx.GroupNorm(6, 3, rngs=nnx.Rngs(0))
        assert layer.num_groups == 3


# -- numbers and variables against Flax --------------------------------------------


@pytest.mark.parametrize("name, i", CASE_IDS)
def test_linen_equals_flax(name, i):
    kw, shape, mask_shape = CASES[name][i]
    x, mask = _data(shape, mask_shape)
    kw = _linen_kw(name, kw)
    v_ours, y_ours = _linen_run(getattr(bnn, name)(**kw), x, mask)
    v_flax, y_flax = _linen_run(getattr(nn, name)(use_fast_variance=False, **kw), x, mask)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)
    chex.assert_trees_all_equal_shapes_and_dtypes(v_ours, v_flax)
    chex.assert_trees_all_close(v_ours, v_flax, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(y_ours, y_flax, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name, i", CASE_IDS)
def test_nnx_equals_flax(name, i):
    kw, shape, mask_shape = CASES[name][i]
    x, mask = _data(shape, mask_shape)
    kw = _linen_kw(name, kw)
    kw.pop("use_running_average", None)
    if name == "GroupNorm":
        kw = {"num_groups": kw.pop("num_groups"), **kw}

    features = shape[kw.get("axis", -1)]

    def build(cls, **extra):
        return cls(features, **kw, **extra, rngs=nnx.Rngs(3))

    ours, theirs = build(getattr(bnnx, name)), build(getattr(nnx, name), use_fast_variance=False)
    chex.assert_trees_all_equal(nnx.state(ours), nnx.state(theirs))
    for _ in range(2):
        chex.assert_trees_all_close(ours(x, mask=mask), theirs(x, mask=mask), rtol=2e-5, atol=2e-5)
    chex.assert_trees_all_close(nnx.state(ours), nnx.state(theirs), rtol=1e-5, atol=1e-6)
    if name == "BatchNorm":
        ours.eval(), theirs.eval()
        chex.assert_trees_all_close(ours(x), theirs(x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "x_dtype, kw",
    [
        (jnp.bfloat16, {}),  # Flax promotes to float32 with float32 parameters
        (jnp.float16, {"param_dtype": jnp.float16}),
        (jnp.float32, {"dtype": jnp.bfloat16}),
    ],
    ids=["bf16_in", "f16_params", "bf16_out"],
)
@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm"])
def test_output_dtype_and_values_follow_flax(name, x_dtype, kw):
    x, _ = _data((6, 8), None, x_dtype)
    kw = _linen_kw(name, kw)
    (v, (y, _)), (v_f, (y_f, _)) = (
        _linen_run(cls(**kw), x, None) for cls in (getattr(bnn, name), getattr(nn, name))
    )
    assert y.dtype == y_f.dtype
    chex.assert_trees_all_equal_shapes_and_dtypes(v, v_f)
    tol = 2e-2 if jnp.dtype(y.dtype).itemsize == 2 else 1e-5
    np.testing.assert_allclose(np.float32(y), np.float32(y_f), rtol=tol, atol=tol)
    nnx_kw = {k: w for k, w in kw.items() if k != "use_running_average"}
    ours, theirs = (
        c(8, **nnx_kw, rngs=nnx.Rngs(0)) for c in (getattr(bnnx, name), getattr(nnx, name))
    )
    assert ours(x).dtype == theirs(x).dtype


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name", FIVE)
def test_complex_input_as_flax(name, fast):
    """Complex input: Flax's |x|^2 variance; the running mean becomes complex."""
    kr, ki = jax.random.split(jax.random.key(2))
    shape = (4, 3, 6)
    x = (1.0 + jax.random.normal(kr, shape)) + 1j * (2.0 - jax.random.normal(ki, shape))
    x = x.astype(jnp.complex64)
    kw = {"use_fast_variance": fast, "dtype": jnp.complex64}
    if name == "GroupNorm":
        kw["num_groups"] = 2
    if name == "BatchNorm":
        kw["use_running_average"] = False
    v, y = _linen_run(getattr(bnn, name)(**kw), x, None)
    v_f, y_f = _linen_run(getattr(nn, name)(**kw), x, None)
    assert y[0].dtype == y_f[0].dtype == jnp.complex64
    chex.assert_trees_all_equal_shapes_and_dtypes(v, v_f)
    chex.assert_trees_all_close((v, y), (v_f, y_f), rtol=1e-5, atol=2e-6)
    nnx_kw = {k: w for k, w in kw.items() if k != "use_running_average"}
    ours, theirs = (
        c(6, **nnx_kw, rngs=nnx.Rngs(0)) for c in (getattr(bnnx, name), getattr(nnx, name))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ours: no complex-to-real cast of the running mean
        y_ours = ours(x)
    with warnings.catch_warnings():
        # Flax's nnx BatchNorm casts the complex running mean into its float32
        # variable (JAX warns that this will become an error).
        warnings.filterwarnings("ignore", "scatter inputs have incompatible types")
        warnings.filterwarnings("ignore", "Casting complex values to real")
        chex.assert_trees_all_close(y_ours, theirs(x), rtol=1e-5, atol=2e-6)
    if name == "BatchNorm":  # nnx keeps the complex running mean, as linen does
        ours(x)  # the second training step, as _linen_run's
        stats = nnx.state(ours, nnx.BatchStat)
        assert stats["mean"][...].dtype == jnp.complex64
        chex.assert_trees_all_close(
            {k: stats[k][...] for k in ("mean", "var")}, v["batch_stats"], rtol=1e-5, atol=2e-6
        )


def test_promote_dtype_is_called_with_flax_arguments_and_used():
    seen = []

    def promote(args, *, dtype=None):
        seen.append((len(args), dtype))
        return [None if a is None else jnp.asarray(a, jnp.float16) for a in args]

    x, _ = _data((6, 4), None)
    for name, n_args in [("BatchNorm", 5), ("LayerNorm", 3), ("RMSNorm", 2), ("GroupNorm", 3)]:
        kw = {"num_groups": 2} if name == "GroupNorm" else {}
        ours = getattr(bnnx, name)(4, promote_dtype=promote, rngs=nnx.Rngs(0), **kw)
        theirs = getattr(nnx, name)(
            4, promote_dtype=promote, use_fast_variance=False, rngs=nnx.Rngs(0), **kw
        )
        seen.clear()
        y = ours(x)
        assert seen == [(n_args, None)]
        y_f = theirs(x)
        assert y.dtype == y_f.dtype == jnp.float16
        np.testing.assert_allclose(np.float32(y), np.float32(y_f), atol=3e-3)


@pytest.mark.parametrize("name", FIVE)
def test_nnx_metadata_reaches_the_params(name):
    kw = {"scale_metadata": {"tag": "s"}}
    if name != "RMSNorm":
        kw["bias_metadata"] = {"tag": "b"}
    if name == "GroupNorm":
        kw["num_groups"] = 2
    ours, theirs = (getattr(m, name)(4, rngs=nnx.Rngs(0), **kw) for m in (bnnx, nnx))
    assert ours.scale.get_metadata() == theirs.scale.get_metadata()
    assert ours.scale.get_metadata()["tag"] == "s"
    if name != "RMSNorm":
        assert ours.bias.get_metadata()["tag"] == "b"


def test_force_float32_reductions_false_keeps_flax_variable_dtypes():
    x = _data((8, 4), None, jnp.bfloat16)[0]
    kw = {
        "use_running_average": False,
        "param_dtype": jnp.bfloat16,
        "force_float32_reductions": False,
    }
    v, (y, _) = _linen_run(bnn.BatchNorm(**kw), x, None)
    v_f, (y_f, _) = _linen_run(nn.BatchNorm(**kw), x, None)
    chex.assert_trees_all_equal_shapes_and_dtypes(v, v_f)
    assert v["batch_stats"]["var"].dtype == jnp.bfloat16 and y.dtype == y_f.dtype
    np.testing.assert_allclose(np.float32(y), np.float32(y_f), atol=5e-2)


def test_fast_variance_option_gives_flax_default():
    x, mask = _data((6, 4, 3), (6, 4, 1))
    kw = {"use_running_average": False, "use_fast_variance": True}
    v, y = _linen_run(bnn.BatchNorm(**kw), x, mask)
    v_f, y_f = _linen_run(nn.BatchNorm(**kw), x, mask)
    chex.assert_trees_all_close((v, y), (v_f, y_f), rtol=1e-4, atol=1e-4)
    # RMSNorm accepts it (Flax's RMSNorm has the field; it does not change an RMS)
    r = _linen_run(bnn.RMSNorm(use_fast_variance=True), x, None)
    r_f = _linen_run(nn.RMSNorm(use_fast_variance=True), x, None)
    chex.assert_trees_all_close(r, r_f, rtol=1e-5, atol=1e-6)


# -- where Flax works, the drop-ins work ----------------------------------------------


def test_no_error_where_flax_works():
    """One value per feature, InstanceNorm without spatial axes, integer input."""
    one = 1.0 + jax.random.normal(KEY, (1, 3))
    no_spatial = 1.0 + jax.random.normal(KEY, (2, 3, 4))
    for ours, theirs, x in [
        (bnn.BatchNorm(use_running_average=False), nn.BatchNorm(use_running_average=False), one),
        (bnn.InstanceNorm(), nn.InstanceNorm(), no_spatial[:, 0]),
        (bnn.InstanceNorm(feature_axes=(1, 2)), nn.InstanceNorm(feature_axes=(1, 2)), no_spatial),
    ]:
        chex.assert_trees_all_close(
            _linen_run(ours, x, None), _linen_run(theirs, x, None), atol=1e-6
        )
    ints = jnp.arange(12).reshape(4, 3)
    y, y_f = (m.init_with_output(KEY, ints)[0] for m in (bnn.LayerNorm(), nn.LayerNorm()))
    assert y.dtype == y_f.dtype == jnp.float32
    np.testing.assert_allclose(y, y_f, atol=1e-5)
    layer = bnnx.BatchNorm(3, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer(one), nnx.BatchNorm(3, rngs=nnx.Rngs(0))(one), atol=1e-6)
    variables = bnn.SequenceBatchNorm(max_steps=3, use_running_average=False).init(
        KEY, jnp.ones((1, 3, 4))
    )
    assert variables["batch_stats"]["mean"].shape == (3, 4)


def test_feature_mismatch_gives_bn_jax_message_with_nchw_hint():
    module = bnn.BatchNorm(use_running_average=True)
    variables = module.init(KEY, jnp.ones((2, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"channels-first \(NCHW\) input needs axis=1"):
        module.apply(variables, jnp.ones((2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"channels-first \(NCHW\) input needs feature_axes=1"):
        ln = bnn.LayerNorm()
        ln.apply(ln.init(KEY, jnp.ones((2, 4, 4, 3))), jnp.ones((2, 3, 4, 4)))


def test_fully_masked_channel_is_finite_and_not_amplified():
    """Flax returns NaN for a channel with no valid element; bn_jax passes it
    through with mean 0 and variance 1, and keeps its running statistics."""
    x = 5.0 + jax.random.normal(KEY, (6, 2))
    mask = jnp.stack([jnp.ones(6, bool), jnp.zeros(6, bool)], axis=1)
    module = bnn.BatchNorm(use_running_average=False, momentum=0.5)
    variables = module.init(KEY, x)
    y, upd = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
    x64 = np.float64(x)
    np.testing.assert_allclose(y[:, 1], x64[:, 1] / np.sqrt(1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(
        y[:, 0],
        (x64[:, 0] - x64[:, 0].mean()) / np.sqrt(x64[:, 0].var() + 1e-5),
        rtol=1e-4,
        atol=1e-5,
    )
    assert upd["batch_stats"]["mean"][1] == 0.0 and upd["batch_stats"]["var"][1] == 1.0
    y_flax, _ = nn.BatchNorm(use_running_average=False).apply(
        variables, x, mask=mask, mutable=["batch_stats"]
    )
    assert np.isnan(y_flax[:, 1]).all()  # the case this difference is about
    tokens = 1.0 + jax.random.normal(KEY, (2, 3, 4))
    row_mask = jnp.array([[True, True, False]] * 2)[..., None]  # a padded token
    for ln in (bnn.LayerNorm(), bnn.RMSNorm()):
        y, _ = ln.init_with_output(KEY, tokens, mask=row_mask)
        np.testing.assert_allclose(y[:, 2], tokens[:, 2] / np.sqrt(1 + 1e-6), rtol=1e-6)


# -- nnx graph tools ------------------------------------------------------------------


def test_nnx_graph_tools_behave_as_with_flax():
    a = bnnx.LayerNorm(4, rngs=nnx.Rngs(0))
    b = bnnx.LayerNorm(4, scale_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
    assert nnx.graphdef(a) == nnx.graphdef(b)  # initializers do not enter the graph
    bn = bnnx.BatchNorm(3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(bn)
    merged = nnx.merge(graphdef, state)
    assert type(merged) is bnnx.BatchNorm and merged.unbiased_running_var is False
    assert "use_running_average" in nnx.view_info(bn)
    view = nnx.view(bn, use_running_average=True)
    assert view.use_running_average is True and bn.use_running_average is False
    inst = bnnx.InstanceNorm(3, track_running_stats=True, rngs=nnx.Rngs(0))
    assert "use_running_average" in nnx.view_info(inst)
    assert nnx.view(inst, use_running_average=True).use_running_average is True
    # set_attributes reaches the extra options, which then change the computation
    x = jax.random.normal(KEY, (4, 3))
    bn.set_attributes(unbiased_running_var=True)
    bn(x)
    np.testing.assert_allclose(
        bn.var[...], 0.99 + 0.01 * np.var(np.float64(x), 0, ddof=1), rtol=1e-5
    )


def test_nnx_transforms_over_stacked_layers_match_flax():
    """nnx.vmap to build a stack, nnx.scan over it with one value per feature,
    nnx.jit without retracing: as with Flax's layer."""

    def stack(cls):
        @nnx.vmap(in_axes=0, out_axes=0)
        def create(key):
            return cls(3, use_fast_variance=False, rngs=nnx.Rngs(params=key))

        return create(jax.random.split(KEY, 4))

    @nnx.jit
    def forward(layers, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(layer, x):
            return jnp.tanh(layer(x) + x)

        return body(layers, x)

    x = 1.0 + jax.random.normal(KEY, (1, 3))
    ours, theirs = stack(bnnx.BatchNorm), stack(nnx.BatchNorm)
    for _ in range(2):
        chex.assert_trees_all_close(forward(ours, x), forward(theirs, x), atol=1e-6)
    chex.assert_trees_all_close(nnx.state(ours), nnx.state(theirs), atol=1e-6)
    x2 = 1.0 + jax.random.normal(jax.random.key(9), (5, 3))
    traces = []
    step = nnx.jit(lambda m, x: (traces.append(1), m(x))[1])
    layer = bnnx.BatchNorm(3, rngs=nnx.Rngs(0))
    for _ in range(3):
        step(layer, x2)
    assert len(traces) == 1
