"""BatchNorm against independent references: float64 NumPy and flax.linen."""

from __future__ import annotations

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

import bn_jax
from tests import reference as ref


def rand(shape, seed=0, loc=0.0, scale=1.0, dtype=np.float32):
    return (np.random.RandomState(seed).randn(*shape) * scale + loc).astype(dtype)


def affine_params(norm, features, seed=1):
    params, state = norm.init(features)
    rs = np.random.RandomState(seed)
    params = {k: jnp.asarray(rs.uniform(0.5, 1.5, v.shape), v.dtype) for k, v in params.items()}
    return params, state


# --------------------------------------------------------------------------- references

CASES = [
    ((16, 5), -1),
    ((6, 3, 7), -1),
    ((6, 3, 7), 1),
    ((4, 3, 5, 6), -1),
    ((4, 6, 5, 3), 1),
    ((4, 3, 5, 6), (1, 3)),
    ((2, 3, 2, 4, 5), -1),
    ((2, 3, 2, 4, 5), (-1, 1)),
]


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_train_matches_numpy(shape, axis, masked, maybe_jit):
    norm = bn_jax.BatchNorm(axis=axis, momentum=0.8)
    x = rand(shape, loc=3.0, scale=2.0)
    params, state = affine_params(norm, x)
    mask = None
    if masked:
        mask = np.random.RandomState(2).rand(*shape) > 0.3
    y, new = maybe_jit(lambda p, s, x, m: norm.apply(p, s, x, training=True, mask=m))(
        params, state, x, mask
    )
    want = ref.bn_train(x, params["scale"], params["bias"], axis=axis, mask=mask)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    mean, var, _ = ref.bn_stats(x, axis, mask)
    np.testing.assert_allclose(new["mean"], ref.ema(0.0, mean, 0.8), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], ref.ema(1.0, var, 0.8), rtol=1e-5, atol=1e-6)
    assert y.dtype == jnp.float32 and new["mean"].dtype == jnp.float32


@pytest.mark.parametrize("shape,axis", CASES[::2])
def test_eval_matches_numpy(shape, axis, maybe_jit):
    norm = bn_jax.BatchNorm(axis=axis)
    x = rand(shape, loc=1.0)
    params, state = affine_params(norm, x)
    rs = np.random.RandomState(5)
    state = {
        "mean": jnp.asarray(rs.randn(*state["mean"].shape), jnp.float32),
        "var": jnp.asarray(rs.uniform(0.5, 2, state["var"].shape), jnp.float32),
    }
    y, same = maybe_jit(lambda p, s, x: norm.apply(p, s, x, training=False))(params, state, x)
    want = ref.bn_eval(x, state["mean"], state["var"], params["scale"], params["bias"], axis)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    for k in state:
        np.testing.assert_array_equal(same[k], state[k])


def test_bf16_in_bf16_out_float32_state():
    norm = bn_jax.BatchNorm()
    x = rand((8, 4, 4, 6), loc=2.0).astype(jnp.bfloat16)
    params, state = norm.init(6)
    y, new = jax.jit(lambda p, s, x: norm.apply(p, s, x, training=True))(params, state, x)
    assert y.dtype == jnp.bfloat16
    assert new["mean"].dtype == jnp.float32 and new["var"].dtype == jnp.float32
    # within bf16 rounding of the float32 computation on the same (bf16) values
    y32, new32 = norm.apply(params, state, np.asarray(x, np.float32), training=True)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(new["var"], new32["var"], rtol=1e-6)
    y_eval, _ = norm.apply(params, new, x, training=False)
    assert y_eval.dtype == jnp.bfloat16
    # an explicit output dtype wins
    y_f32, _ = bn_jax.BatchNorm(dtype=jnp.float32).apply(params, state, x, training=True)
    assert y_f32.dtype == jnp.float32


def test_float16_input():
    x = rand((32, 5), loc=1.0).astype(np.float16)
    params, state = bn_jax.BatchNorm().init(5)
    y, _ = bn_jax.batch_norm(params, state, x, training=True)
    assert y.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(y, np.float64), ref.bn_train(x), atol=3e-3)


# --------------------------------------------------------------------------- flax reference


@pytest.mark.parametrize("axis,shape", [(-1, (8, 4, 4, 6)), (1, (8, 6, 3, 3)), (-1, (32, 10))])
def test_matches_flax_linen_over_steps(axis, shape):
    momentum = 0.9
    fl = flax_nn.BatchNorm(momentum=momentum, axis=axis, use_fast_variance=False)
    norm = bn_jax.BatchNorm(momentum=momentum, axis=axis)
    x0 = rand(shape)
    variables = fl.init(jax.random.key(0), x0, use_running_average=False)
    params = {
        k: v + 0.1 * np.arange(v.size).reshape(v.shape) for k, v in variables["params"].items()
    }
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    state = dict(variables["batch_stats"])
    f_flax = jax.jit(
        lambda v, x: fl.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    )
    f_ours = jax.jit(lambda p, s, x: norm.apply(p, s, x, training=True))
    for step in range(4):
        x = rand(shape, seed=10 + step, loc=step - 1.5, scale=1.0 + step)
        y_f, upd = f_flax(variables, x)
        y_o, state = f_ours(params, state, x)
        variables = {"params": params, "batch_stats": upd["batch_stats"]}
        np.testing.assert_allclose(y_o, y_f, rtol=1e-5, atol=1e-5)
        for k in ("mean", "var"):
            np.testing.assert_allclose(state[k], upd["batch_stats"][k], rtol=1e-5, atol=1e-7)
    x = rand(shape, seed=99)
    y_f = fl.apply(variables, x, use_running_average=True)
    y_o, _ = norm.apply(params, state, x, training=False)
    np.testing.assert_allclose(y_o, y_f, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- numerics


def test_large_mean_stays_accurate():
    x = rand((256, 16), seed=3, loc=1e4, scale=1.0)
    params, state = bn_jax.BatchNorm().init(16)
    y, new = jax.jit(lambda p, s, x: bn_jax.batch_norm(p, s, x, training=True))(params, state, x)
    std = np.asarray(y, np.float64).std(0)
    np.testing.assert_allclose(std, 1.0, atol=1e-4)
    # elementwise: float32 rounds the mean 1e4 to half an ulp (~4.9e-4); allow one ulp
    ulp = float(np.spacing(np.float32(1e4)))
    np.testing.assert_allclose(y, ref.bn_train(x), rtol=0, atol=ulp)
    # the running variance saw a variance near 1, not garbage
    _, var, _ = ref.bn_stats(x)
    np.testing.assert_allclose(new["var"], ref.ema(1.0, var, 0.99), rtol=1e-4)
    # and the textbook fast formula really is unusable here (why the default differs)
    y_fast, _ = bn_jax.batch_norm(params, state, x, training=True, use_fast_variance=True)
    assert not np.allclose(np.asarray(y_fast, np.float64).std(0), 1.0, atol=1e-2)


def test_fast_variance_matches_on_centered_data():
    x = rand((64, 8), seed=4)
    params, state = bn_jax.BatchNorm().init(8)
    y, _ = bn_jax.batch_norm(params, state, x, training=True, use_fast_variance=True)
    np.testing.assert_allclose(y, ref.bn_train(x), rtol=1e-5, atol=1e-5)


def test_nan_batch_leaves_state_unchanged():
    norm = bn_jax.BatchNorm(momentum=0.5)
    params, state = norm.init(4)
    _, state = norm.apply(params, state, rand((16, 4)), training=True)
    bad = rand((16, 4), seed=1)
    bad[3, :] = np.nan
    y, after = jax.jit(lambda p, s, x: norm.apply(p, s, x, training=True))(params, state, bad)
    assert np.isnan(np.asarray(y)).all()  # the output still shows the NaN
    for k in state:
        np.testing.assert_array_equal(after[k], state[k])
    # one bad channel: the others still update
    one = rand((16, 4), seed=2)
    one[0, 2] = np.inf
    _, after = norm.apply(params, state, one, training=True)
    state, after = jax.tree.map(np.asarray, (state, after))
    mean, var, _ = ref.bn_stats(one[:, [0, 1, 3]])
    np.testing.assert_array_equal(after["mean"][2], state["mean"][2])
    np.testing.assert_array_equal(after["var"][2], state["var"][2])
    np.testing.assert_allclose(
        after["mean"][[0, 1, 3]], ref.ema(state["mean"][[0, 1, 3]], mean, 0.5), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        after["var"][[0, 1, 3]], ref.ema(state["var"][[0, 1, 3]], var, 0.5), rtol=1e-5
    )


def test_fully_masked_channel_keeps_running_stats():
    norm = bn_jax.BatchNorm(momentum=0.5, axis=-1)
    params, state = norm.init(3)
    x = rand((10, 3), loc=2.0)
    mask = np.ones((10, 3), bool)
    mask[:, 1] = False
    mask[7:, 0] = False
    y, new = norm.apply(params, state, x, training=True, mask=mask)
    assert np.isfinite(np.asarray(y)).all()
    assert float(new["mean"][1]) == 0.0 and float(new["var"][1]) == 1.0
    mean, var, n = ref.bn_stats(x, -1, mask)
    assert n[0] == 7
    np.testing.assert_allclose(new["mean"][0], 0.5 * mean[0], rtol=1e-5)
    np.testing.assert_allclose(new["var"][0], 0.5 + 0.5 * var[0], rtol=1e-5)


def test_mask_ignores_garbage_in_padding():
    x = rand((12, 4))
    mask = np.ones((12, 1), bool)
    mask[9:] = False
    x_bad = x.copy()
    x_bad[9:] = np.nan  # padded rows may hold anything
    params, state = bn_jax.BatchNorm().init(4)
    y1, s1 = bn_jax.batch_norm(params, state, x, training=True, mask=mask)
    y2, s2 = bn_jax.batch_norm(params, state, x_bad, training=True, mask=mask)
    np.testing.assert_allclose(y1[:9], y2[:9], rtol=1e-6)
    np.testing.assert_allclose(y1[:9], ref.bn_train(x[:9]), rtol=1e-5, atol=1e-5)
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k])


# --------------------------------------------------------------------------- running stats


def test_startup_regime_eval_before_training():
    norm = bn_jax.BatchNorm(epsilon=1e-3)
    params, state = affine_params(norm, 5)
    np.testing.assert_array_equal(state["mean"], np.zeros(5))
    np.testing.assert_array_equal(state["var"], np.ones(5))
    x = rand((7, 5))
    y, _ = norm.apply(params, state, x, training=False)
    want = x / np.sqrt(1 + 1e-3) * np.asarray(params["scale"]) + np.asarray(params["bias"])
    np.testing.assert_allclose(y, want, rtol=1e-6)
    # one step: no debiasing, exactly the EMA from (0, 1)
    _, s1 = norm.apply(params, state, x, training=True)
    mean, var, _ = ref.bn_stats(x)
    np.testing.assert_allclose(s1["var"], 0.99 + 0.01 * var, rtol=1e-6)
    np.testing.assert_allclose(s1["mean"], 0.01 * mean, rtol=1e-5, atol=1e-8)


def test_cumulative_average_with_momentum_none():
    norm = bn_jax.BatchNorm(momentum=None)
    params, state = norm.init(3)
    assert state["count"].dtype == jnp.int32
    step = jax.jit(lambda s, x: norm.apply(params, s, x, training=True)[1])
    batches = [rand((8, 3), seed=i, loc=i, scale=1 + i) for i in range(4)]
    for b in batches:
        state = step(state, b)
    stats = [ref.bn_stats(b) for b in batches]
    np.testing.assert_allclose(state["mean"], np.mean([s[0] for s in stats], 0), rtol=1e-5)
    np.testing.assert_allclose(state["var"], np.mean([s[1] for s in stats], 0), rtol=1e-5)
    np.testing.assert_array_equal(state["count"], [4, 4, 4])


def test_unbiased_running_var():
    norm = bn_jax.BatchNorm(momentum=0.0, unbiased_running_var=True)
    params, state = norm.init(4)
    x = rand((6, 4))
    y, new = norm.apply(params, state, x, training=True)
    np.testing.assert_allclose(new["var"], np.var(x.astype(np.float64), 0, ddof=1), rtol=1e-5)
    # normalization itself still uses the biased variance
    np.testing.assert_allclose(y, ref.bn_train(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- gradients


def test_gradients_match_plain_formula():
    x = rand((6, 3, 3, 4), loc=1.0, scale=2.0)
    w = rand(x.shape, seed=7)
    norm = bn_jax.BatchNorm()
    params, state = affine_params(norm, 4)

    def plain(p, x):
        mean = x.mean((0, 1, 2))
        var = ((x - mean) ** 2).mean((0, 1, 2))
        return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]

    ours = jax.grad(lambda p, x: jnp.sum(norm.apply(p, state, x, training=True)[0] * w), (0, 1))
    theirs = jax.grad(lambda p, x: jnp.sum(plain(p, x) * w), (0, 1))
    g_ours, g_ref = ours(params, x), theirs(params, x)
    assert float(jnp.abs(g_ref[1]).max()) > 1e-2  # a loss whose x-gradient is not ~0
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    jax.tree.map(chex_close, g_ours, g_ref)


# --------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    a=st.floats(0.01, 100.0),
    b=st.floats(-1e3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_invariant_to_positive_affine_input(a, b, seed):
    x = rand((32, 3), seed=seed)
    params, state = bn_jax.BatchNorm(epsilon=1e-12).init(3)
    f = _train_fn_tiny_eps()
    y1 = f(params, state, x)
    y2 = f(params, state, (a * x.astype(np.float64) + b).astype(np.float32))
    # rounding a*x+b to float32 moves each value by up to half an ulp of |b|: in std units
    ulp = float(np.spacing(np.float32(abs(b) + 4 * a))) / a
    np.testing.assert_allclose(y1, y2, atol=2e-5 + 2 * ulp)


@settings(max_examples=25, deadline=None)
@given(
    loc=st.floats(-1e3, 1e3),
    scale=st.floats(0.1, 100.0),
    seed=st.integers(0, 2**16),
)
def test_training_output_has_zero_mean_unit_variance(loc, scale, seed):
    x = rand((64, 4), seed=seed, loc=loc, scale=scale)
    params, state = bn_jax.BatchNorm(epsilon=1e-12).init(4)
    y = np.asarray(_train_fn_tiny_eps()(params, state, x), np.float64)
    # float32 cannot hold the mean closer than half an ulp of |loc|: allow that, in std units
    ulp = float(np.spacing(np.float32(abs(loc) + 4 * scale))) / scale
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5 + ulp)
    np.testing.assert_allclose(y.var(0), 1.0, atol=1e-4 + ulp)


_FN = {}


def _train_fn_tiny_eps():
    if "f" not in _FN:
        norm = bn_jax.BatchNorm(epsilon=1e-12)
        _FN["f"] = jax.jit(lambda p, s, x: norm.apply(p, s, x, training=True)[0])
    return _FN["f"]


# --------------------------------------------------------------------------- transformations


def test_state_as_scan_carry_and_jit_no_retrace():
    norm = bn_jax.BatchNorm(momentum=0.5)
    params, state = norm.init(3)
    xs = rand((5, 8, 3), loc=4.0)

    def body(s, x):
        y, s = norm.apply(params, s, x, training=True)
        return s, y.mean()

    final, _ = jax.lax.scan(body, state, xs)
    manual = state
    for x in xs:
        _, manual = norm.apply(params, manual, x, training=True)
    for k in final:
        np.testing.assert_allclose(final[k], manual[k], rtol=1e-6)
        assert final[k].dtype == state[k].dtype and final[k].shape == state[k].shape

    traces = []

    @jax.jit
    def step(s, x):
        traces.append(1)
        return norm.apply(params, s, x, training=True)[1]

    s = state
    for x in xs:
        s = step(s, x)
    assert len(traces) == 1


def test_config_is_hashable_static_argument():
    a, b = bn_jax.BatchNorm(momentum=0.9), bn_jax.BatchNorm(momentum=0.9)
    assert a == b and hash(a) == hash(b)
    grouped = bn_jax.BatchNorm(axis_name="d", axis_index_groups=[[0, 1], [2, 3]])
    hash(grouped)
    assert grouped.axis_index_groups == ((0, 1), (2, 3))
    with pytest.raises(dataclasses_frozen_error()):
        a.momentum = 0.5

    f = jax.jit(lambda norm, p, s, x: norm.apply(p, s, x, training=True)[0], static_argnums=0)
    params, state = a.init(2)
    f(a, params, state, rand((4, 2)))


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_state_round_trips_flax_serialization_bit_exact():
    norm = bn_jax.BatchNorm(momentum=None)
    params, state = norm.init(5)
    _, state = norm.apply(params, state, rand((9, 5), loc=3.0), training=True)
    tree = {"params": params, "state": state}
    restored = serialization.from_bytes(tree, serialization.to_bytes(tree))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), restored, tree)
    jax.tree.map(lambda a, b: None if a.dtype == b.dtype else pytest.fail("dtype"), restored, tree)


def test_init_layouts_and_options():
    p, s = bn_jax.BatchNorm(axis=(1, 3)).init(np.zeros((2, 3, 4, 5)))
    assert p["scale"].shape == (3, 5) and s["mean"].shape == (3, 5)
    p, s = bn_jax.BatchNorm(axis=(1, 3)).init((3, 5))
    assert p["bias"].shape == (3, 5)
    p, _ = bn_jax.BatchNorm(use_scale=False).init(4)
    assert set(p) == {"bias"}
    p, _ = bn_jax.BatchNorm(use_bias=False, use_scale=False).init(4)
    assert p == {}
    p, s = bn_jax.BatchNorm(param_dtype=jnp.bfloat16).init(4)
    assert p["scale"].dtype == jnp.bfloat16 and s["var"].dtype == jnp.float32
    p, _ = bn_jax.BatchNorm(scale_init=jax.nn.initializers.constant(2.0)).init(3)
    np.testing.assert_array_equal(p["scale"], [2.0, 2.0, 2.0])
    # no scale, no bias: plain standardization
    norm = bn_jax.BatchNorm(use_scale=False, use_bias=False)
    p, s = norm.init(3)
    x = rand((10, 3))
    y, _ = norm.apply(p, s, x, training=True)
    np.testing.assert_allclose(y, ref.bn_train(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        ({"momentum": 1.5}, ValueError, ["momentum", "1.5"]),
        ({"momentum": -0.1}, ValueError, ["momentum"]),
        ({"momentum": "0.9"}, TypeError, ["momentum"]),
        ({"epsilon": 0.0}, ValueError, ["epsilon"]),
        ({"epsilon": -1e-5}, ValueError, ["epsilon"]),
        ({"axis": 1.5}, TypeError, ["axis"]),
        ({"axis": ()}, TypeError, ["axis"]),
        ({"dtype": jnp.int32}, TypeError, ["dtype"]),
        ({"axis_index_groups": [[0, 1]]}, ValueError, ["axis_index_groups", "axis_name"]),
        ({"axis_name": "d", "axis_index_groups": [[0, 1], [2]]}, ValueError, ["axis_index_groups"]),
    ],
)
def test_config_errors(kwargs, exc, words):
    with pytest.raises(exc) as info:
        bn_jax.BatchNorm(**kwargs)
    for w in words:
        assert w in str(info.value)


def _apply_error(x, *, training=True, features=None, mask=None, **config):
    norm = bn_jax.BatchNorm(**config)
    params, state = norm.init(features if features is not None else x.shape[-1])
    return norm.apply(params, state, x, training=training, mask=mask)


def test_error_feature_mismatch_suggests_channels_first():
    with pytest.raises(ValueError) as info:
        _apply_error(rand((2, 8, 4, 4)), features=8)
    msg = str(info.value)
    assert "params['scale']" in msg and "(8,)" in msg and "axis=1" in msg


def test_error_axis_out_of_range():
    with pytest.raises(ValueError, match=r"axis=3 is out of range .* rank 2"):
        _apply_error(rand((4, 5)), axis=3, features=5)


def test_error_integer_input():
    with pytest.raises(TypeError, match=r"x must be a floating-point array, got dtype int32"):
        _apply_error(np.ones((4, 3), np.int32))


def test_error_mask_does_not_broadcast():
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not broadcast"):
        _apply_error(rand((4, 5)), mask=np.ones(3, bool))


def test_error_single_value_per_channel():
    with pytest.raises(ValueError, match=r"single value per feature"):
        _apply_error(rand((1, 5)))
    _apply_error(rand((1, 5)), training=False)  # eval is fine


def test_error_unbound_axis_name():
    with pytest.raises(ValueError) as info:
        _apply_error(rand((4, 5)), axis_name="batch")
    msg = str(info.value)
    assert "axis_name='batch'" in msg and "shard_map" in msg and "pmap" in msg
    _apply_error(rand((4, 5)), axis_name="batch", training=False)  # eval never syncs


def test_error_training_must_be_bool():
    norm = bn_jax.BatchNorm()
    params, state = norm.init(3)
    with pytest.raises(TypeError, match="training must be a Python bool"):
        jax.jit(lambda t: norm.apply(params, state, rand((4, 3)), training=t))(True)


def test_error_missing_param_and_bad_init():
    norm = bn_jax.BatchNorm()
    _, state = norm.init(3)
    with pytest.raises(ValueError, match=r"params has no 'scale'"):
        norm.apply({"bias": jnp.zeros(3)}, state, rand((4, 3)), training=True)
    with pytest.raises(ValueError, match=r"axis=\(1, 2\)"):
        bn_jax.BatchNorm(axis=(1, 2)).init(3)
    with pytest.raises(TypeError, match=r"BatchNorm.init expects"):
        norm.init("three")


def test_error_state_missing_running_statistics():
    norm = bn_jax.BatchNorm(momentum=None)
    params, state = norm.init(3)
    for missing in ("mean", "var", "count"):
        broken = {k: v for k, v in state.items() if k != missing}
        with pytest.raises(ValueError, match=rf"state has keys .* needs .*'{missing}'"):
            norm.apply(params, broken, rand((4, 3)), training=True)


def test_error_single_value_per_channel_even_with_mask():
    # a mask can only lower the count: one value per feature stays an error
    with pytest.raises(ValueError, match=r"single value per feature"):
        _apply_error(rand((1, 5)), mask=np.ones((1, 5), bool))


def test_remat_and_vmap_over_independent_models():
    norm = bn_jax.BatchNorm(momentum=0.5)
    params, state = affine_params(norm, 4)
    x = rand((3, 6, 4), loc=2.0)  # 3 independent models, batch 6 each
    w = rand(x.shape, seed=9)

    def loss(p, s, x, w):
        y, s = norm.apply(p, s, x, training=True)
        return jnp.sum(y * w), s

    g_plain = jax.grad(loss, has_aux=True)(params, state, x[0], w[0])[0]
    g_remat = jax.grad(jax.checkpoint(loss), has_aux=True)(params, state, x[0], w[0])[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_remat, g_plain)

    # vmap with no axis_name: each model keeps its own statistics
    ys, states = jax.vmap(lambda x: norm.apply(params, state, x, training=True))(x)
    for i in range(3):
        want = ref.bn_train(x[i], params["scale"], params["bias"])
        np.testing.assert_allclose(ys[i], want, rtol=1e-5, atol=1e-5)
        mean, var, _ = ref.bn_stats(x[i])
        np.testing.assert_allclose(states["mean"][i], ref.ema(0.0, mean, 0.5), rtol=1e-5)
        np.testing.assert_allclose(states["var"][i], ref.ema(1.0, var, 0.5), rtol=1e-5)
