"""The normalization family against independent references.

References: float64 NumPy formulas (tests/reference.py), ``flax.linen`` with
``use_fast_variance=False``, ``jax.grad`` of plain formulas, and
``bn_jax.BatchNorm`` itself where a variant must reduce to it. Across devices
the whole family is checked in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import functools
import math

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
from tests import reference as ref


def rand(shape, seed=0, loc=0.0, scale=1.0):
    return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def rand_affine(norm, features, seed=1):
    """Params from ``norm.init`` with non-trivial scale and bias."""
    params, state = norm.init(features)
    rng = np.random.default_rng(seed)
    params = {
        k: jnp.asarray(1.0 + 0.5 * rng.standard_normal(v.shape), v.dtype) for k, v in params.items()
    }
    return params, state


@functools.cache
def _jitted(norm, training):
    return jax.jit(lambda p, s, x, **kw: norm.apply(p, s, x, training=training, **kw))


def run(norm, params, state, x, *, training, **kw):
    """``norm.apply`` under ``jit`` (one compile per config and shape: far cheaper than eager)."""
    return _jitted(norm, training)(params, state, x, **kw)


def jgrad(f):
    """Jitted gradient with respect to the first two arguments (one compile, not eager ops)."""
    return jax.jit(jax.grad(f, (0, 1)))


def close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol
    )


def flax_apply(module, x, params, mask=None):
    variables = {"params": params}
    return module.apply(variables, jnp.asarray(x), mask=mask)


# ----------------------------------------------------------------------------
# LayerNorm, RMSNorm, GroupNorm, InstanceNorm: per-example statistics
# ----------------------------------------------------------------------------

LN_CASES = [
    # (shape, reduction_axes, feature_axes)
    ((4, 6), -1, -1),
    ((2, 3, 5), -1, -1),
    ((2, 3, 4, 5), (1, 2, 3), -1),
    ((2, 3, 4, 5), (2, 3), (2, 3)),
    ((3, 4, 5), 1, 1),  # non-default: reduce and scale along a middle axis
]


@pytest.mark.parametrize(("shape", "red", "feat"), LN_CASES)
def test_layer_norm_matches_flax_and_numpy(shape, red, feat):
    norm = bn_jax.LayerNorm(reduction_axes=red, feature_axes=feat)
    x = rand(shape, loc=3.0)
    fa = ref.axes_of(len(shape), feat)
    params, state = rand_affine(norm, tuple(shape[a] for a in fa))
    assert state == {}
    y, out_state = jax.jit(lambda p, x: run(norm, p, {}, x, training=True))(params, x)
    assert out_state == {}
    close(y, ref.layer_norm(x, params["scale"], params["bias"], red, feat), rtol=2e-5, atol=2e-5)
    flax_y = flax_apply(
        fnn.LayerNorm(reduction_axes=red, feature_axes=feat, use_fast_variance=False), x, params
    )
    close(y, flax_y, rtol=2e-5, atol=2e-5)


def test_layer_norm_mask_dtype_and_training_ignored():
    norm = bn_jax.LayerNorm()
    x = rand((4, 3, 8))
    mask = np.random.default_rng(2).random((4, 3, 8)) > 0.3
    params, _ = rand_affine(norm, 8)
    y, _ = run(norm, params, {}, x, training=True, mask=mask)
    close(y, ref.layer_norm(x, params["scale"], params["bias"], mask=mask), rtol=2e-5, atol=2e-5)
    y_eval, _ = run(norm, params, {}, x, training=False, mask=mask)
    np.testing.assert_array_equal(y, y_eval)
    yb, _ = run(norm, params, {}, x.astype(jnp.bfloat16), training=False)
    assert yb.dtype == jnp.bfloat16
    close(yb, ref.layer_norm(x.astype(jnp.bfloat16), params["scale"], params["bias"]), 2e-2, 2e-2)


def test_layer_norm_gradient_matches_plain_formula():
    norm = bn_jax.LayerNorm(reduction_axes=(1, 2), feature_axes=2)
    x = rand((3, 4, 5))
    params, _ = rand_affine(norm, 5)
    w = rand((3, 4, 5), seed=7)

    def plain(p, x):
        mu = jnp.mean(x, (1, 2), keepdims=True)
        var = jnp.mean((x - mu) ** 2, (1, 2), keepdims=True)
        return jnp.sum(w * ((x - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]))

    ours = lambda p, x: jnp.sum(w * run(norm, p, {}, x, training=True)[0])
    for a, b in zip(jgrad(ours)(params, x), jgrad(plain)(params, x), strict=True):
        jax.tree.map(lambda u, v: close(u, v, 1e-4, 1e-4), a, b)


@pytest.mark.parametrize(("shape", "red", "feat"), LN_CASES)
def test_rms_norm_matches_flax_and_numpy(shape, red, feat):
    norm = bn_jax.RMSNorm(reduction_axes=red, feature_axes=feat)
    x = rand(shape, loc=1.0)
    fa = ref.axes_of(len(shape), feat)
    params, state = rand_affine(norm, tuple(shape[a] for a in fa))
    assert set(params) == {"scale"} and state == {}
    y, _ = jax.jit(lambda p, x: run(norm, p, {}, x, training=True))(params, x)
    close(y, ref.rms_norm(x, params["scale"], red, feat), rtol=2e-5, atol=2e-5)
    flax_y = flax_apply(
        fnn.RMSNorm(reduction_axes=red, feature_axes=feat, use_fast_variance=False), x, params
    )
    close(y, flax_y, rtol=2e-5, atol=2e-5)


def test_rms_norm_is_not_centered_mask_and_grad():
    norm = bn_jax.RMSNorm()
    x = rand((4, 8), loc=5.0)
    params, _ = rand_affine(norm, 8)
    y, _ = run(norm, params, {}, x, training=False)
    # the mean is kept: a LayerNorm would give mean 0
    assert np.all(np.asarray(y).mean(-1) / np.asarray(params["scale"]).mean() > 0.5)
    mask = np.random.default_rng(3).random((4, 8)) > 0.4
    ym, _ = run(norm, params, {}, x, training=True, mask=mask)
    close(ym, ref.rms_norm(x, params["scale"], mask=mask), 2e-5, 2e-5)
    w = rand((4, 8), seed=4)
    plain = lambda p, x: jnp.sum(
        w * x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p["scale"]
    )
    ours = lambda p, x: jnp.sum(w * run(norm, p, {}, x, training=True)[0])
    for a, b in zip(jgrad(ours)(params, x), jgrad(plain)(params, x), strict=True):
        jax.tree.map(lambda u, v: close(u, v, 1e-4, 1e-4), a, b)


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((2, 4, 4, 8), {"num_groups": 4}),
        ((2, 4, 4, 8), {"num_groups": None, "group_size": 2}),
        ((3, 5, 6), {"num_groups": 3, "reduction_axes": (2,)}),  # channels only (per position)
        ((2, 4, 3, 6), {"num_groups": 2, "reduction_axes": (1, 3)}),
        ((2, 4, 6), {"num_groups": 6}),
    ],
)
def test_group_norm_matches_flax_and_numpy(shape, kwargs):
    norm = bn_jax.GroupNorm(**kwargs)
    x = rand(shape, loc=2.0)
    params, state = rand_affine(norm, shape[-1])
    assert state == {}
    y, _ = jax.jit(lambda p, x: run(norm, p, {}, x, training=True))(params, x)
    groups = kwargs["num_groups"] or shape[-1] // kwargs["group_size"]
    red = kwargs.get("reduction_axes")
    close(
        y,
        ref.group_norm(x, groups, params["scale"], params["bias"], reduction_axes=red),
        2e-5,
        2e-5,
    )
    flax_y = flax_apply(fnn.GroupNorm(**kwargs, use_fast_variance=False), x, params)
    close(y, flax_y, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("shape", "feature_axis", "red"),
    [
        ((2, 8, 3, 3), 1, None),  # NCHW
        ((2, 8, 3, 3), 1, (1, 3)),  # NCHW, statistics over C-group and W only
        ((3, 2, 6, 4), 2, (0, 2)),  # a channel axis in the middle, reducing over the batch too
    ],
)
def test_group_norm_non_default_axes_against_numpy(shape, feature_axis, red):
    """flax.nnx.GroupNorm spreads groups along the wrong axis here; we must not."""
    norm = bn_jax.GroupNorm(num_groups=2, feature_axis=feature_axis, reduction_axes=red)
    x = rand(shape, loc=-1.0, scale=2.0)
    params, _ = rand_affine(norm, shape[feature_axis])
    mask = np.random.default_rng(5).random(shape) > 0.25
    channel_bcast = np.take(mask, [0], axis=feature_axis)  # one value for all channels
    for m in (None, mask, channel_bcast):
        y, _ = run(norm, params, {}, x, training=True, mask=m)
        expect = ref.group_norm(
            x,
            2,
            params["scale"],
            params["bias"],
            feature_axis=feature_axis,
            reduction_axes=red,
            mask=m,
        )
        close(y, expect, 3e-5, 3e-5)


def test_group_norm_gradient_matches_plain_formula():
    norm = bn_jax.GroupNorm(num_groups=2, feature_axis=1)
    x = rand((2, 4, 3))
    params, _ = rand_affine(norm, 4)
    w = rand((2, 4, 3), seed=9)

    def plain(p, x):
        xg = x.reshape(2, 2, 2, 3)
        mu = jnp.mean(xg, (2, 3), keepdims=True)
        var = jnp.mean((xg - mu) ** 2, (2, 3), keepdims=True)
        xh = ((xg - mu) / jnp.sqrt(var + 1e-6)).reshape(x.shape)
        return jnp.sum(w * (xh * p["scale"][:, None] + p["bias"][:, None]))

    ours = lambda p, x: jnp.sum(w * run(norm, p, {}, x, training=True)[0])
    for a, b in zip(jgrad(ours)(params, x), jgrad(plain)(params, x), strict=True):
        jax.tree.map(lambda u, v: close(u, v, 1e-4, 1e-4), a, b)


@pytest.mark.parametrize(
    ("shape", "feat"), [((3, 4, 5, 2), -1), ((3, 2, 4, 5), 1), ((2, 6, 3), (1,))]
)
def test_instance_norm_matches_numpy_and_flax(shape, feat):
    norm = bn_jax.InstanceNorm(feature_axes=feat)
    x = rand(shape, loc=4.0)
    fa = ref.axes_of(len(shape), feat)
    params, state = rand_affine(norm, tuple(shape[a] for a in fa))
    assert state == {}
    y, _ = run(norm, params, {}, x, training=True)
    close(y, ref.instance_norm(x, params["scale"], params["bias"], feat), 2e-5, 2e-5)
    flax_y = flax_apply(fnn.InstanceNorm(feature_axes=feat, use_fast_variance=False), x, params)
    close(y, flax_y, 2e-5, 2e-5)


@pytest.mark.parametrize("unbiased", [False, True])
def test_instance_norm_running_stats(unbiased):
    norm = bn_jax.InstanceNorm(
        track_running_stats=True, momentum=0.9, unbiased_running_var=unbiased
    )
    params, state = norm.init(3)
    assert set(state) == {"mean", "var"}
    x0 = rand((4, 5, 5, 3))
    # eval before training: running stats mean 0, var 1
    y0, same = run(norm, params, state, x0, training=False)
    close(y0, x0 / np.sqrt(1 + 1e-6))
    jax.tree.map(np.testing.assert_array_equal, same, state)
    step = jax.jit(lambda s, x: run(norm, params, s, x, training=True))
    for seed in range(2):
        x = rand((4, 5, 5, 3), seed=seed, loc=seed + 1.0, scale=2.0)
        y, new = step(state, x)
        close(y, ref.instance_norm(x), 2e-5, 2e-5)  # training: instance statistics
        mean, var, n = ref.instance_stats(x)
        if unbiased:
            var = var * n / (n - 1)
        close(new["mean"], ref.ema(state["mean"], mean.mean(0), 0.9), 1e-5, 1e-5)
        close(new["var"], ref.ema(state["var"], var.mean(0), 0.9), 1e-5, 1e-5)
        state = new
    y_eval, _ = run(norm, params, state, x0, training=False)
    close(y_eval, ref.bn_eval(x0, state["mean"], state["var"], eps=1e-6), 2e-5, 2e-5)


# ----------------------------------------------------------------------------
# BatchRenorm
# ----------------------------------------------------------------------------


def _train_steps(norm, params, state, xs, mask=None):
    step = jax.jit(lambda p, s, x: run(norm, p, s, x, training=True, mask=mask))
    ys = []
    for x in xs:
        y, state = step(params, state, x)
        ys.append(y)
    return ys, state


def test_batch_renorm_rmax1_dmax0_is_batch_norm():
    renorm = bn_jax.BatchRenorm(rmax=1.0, dmax=0.0, momentum=0.5)
    bn = bn_jax.BatchNorm(momentum=0.5)
    params, state = rand_affine(renorm, 3)
    xs = [rand((6, 3), seed=s, loc=s) for s in range(3)]  # running stats drift from batch stats
    ys_r, s_r = _train_steps(renorm, params, state, xs)
    bn_state = {k: v for k, v in state.items() if k != "step"}
    ys_b, s_b = _train_steps(bn, params, bn_state, xs)
    for a, b in zip(ys_r, ys_b, strict=True):
        close(a, b, 1e-6, 1e-6)
    close(s_r["mean"], s_b["mean"], 1e-6, 1e-6)
    close(s_r["var"], s_b["var"], 1e-6, 1e-6)
    assert int(s_r["step"]) == 3 and s_r["step"].dtype == jnp.int32
    loss = lambda n, st: lambda p, x: jnp.sum(jnp.sin(n.apply(p, st, x, training=True)[0]))
    g_r = jgrad(loss(renorm, s_r))(params, xs[0])
    g_b = jgrad(loss(bn, s_b))(params, xs[0])
    jax.tree.map(lambda u, v: close(u, v, 1e-5, 1e-5), g_r, g_b)


def test_batch_renorm_unclipped_equals_running_normalization_with_bn_gradient():
    renorm = bn_jax.BatchRenorm(rmax=math.inf, dmax=math.inf, momentum=0.8)
    params, state = rand_affine(renorm, 4)
    xs = [rand((8, 2, 4), seed=s, loc=0.5 * s, scale=1 + s) for s in range(3)]
    _, state = _train_steps(renorm, params, state, xs)  # non-trivial running stats
    x = rand((8, 2, 4), seed=11, loc=2.0, scale=3.0)
    y, _ = run(renorm, params, state, x, training=True)
    expect = ref.bn_eval(x, state["mean"], state["var"], params["scale"], params["bias"])
    close(y, expect, 1e-4, 1e-4)  # the output is normalization by the running statistics
    # ... but its gradient is BatchNorm's (through the batch statistics) with
    # r, d as constants: the gradient of a plain formula with stop_gradient.
    w = rand(x.shape, seed=12)
    sigma = jnp.sqrt(state["var"] + 1e-5)

    def plain(p, x):
        mu = jnp.mean(x, (0, 1))
        sb = jnp.sqrt(jnp.mean((x - mu) ** 2, (0, 1)) + 1e-5)
        r = jax.lax.stop_gradient(sb / sigma)
        d = jax.lax.stop_gradient((mu - state["mean"]) / sigma)
        return jnp.sum(w * (((x - mu) / sb * r + d) * p["scale"] + p["bias"]))

    ours = lambda p, x: jnp.sum(w * run(renorm, p, state, x, training=True)[0])
    g_ours = jgrad(ours)(params, x)
    jax.tree.map(lambda u, v: close(u, v, 1e-4, 1e-4), g_ours, jgrad(plain)(params, x))
    # and it is not the gradient of eval-mode normalization (which ignores the batch)
    eval_loss = lambda p, x: jnp.sum(w * run(renorm, p, state, x, training=False)[0])
    g_eval = jgrad(eval_loss)(params, x)[1]
    assert np.abs(np.asarray(g_ours[1]) - np.asarray(g_eval)).max() > 1e-2


def test_batch_renorm_clipping_and_schedules_against_numpy():
    rmax = lambda step: 1.0 + 0.25 * step  # callables of the step count
    dmax = lambda step: 0.1 * step
    renorm = bn_jax.BatchRenorm(rmax=rmax, dmax=dmax, momentum=0.5)
    params, state = rand_affine(renorm, 3)
    step_fn = jax.jit(lambda s, x: run(renorm, params, s, x, training=True))
    clipped = 0
    for k in range(4):
        x = rand((5, 3), seed=k, loc=3.0 * k, scale=0.2 + 2 * k)
        y, new = step_fn(state, x)
        expect, r, d = ref.batch_renorm_train(
            x, state["mean"], state["var"], rmax(k), dmax(k), params["scale"], params["bias"]
        )
        close(y, expect, 2e-5, 2e-5)
        mean, var, _ = ref.bn_stats(x)
        close(new["mean"], ref.ema(state["mean"], mean, 0.5), 1e-5, 1e-5)
        close(new["var"], ref.ema(state["var"], var, 0.5), 1e-5, 1e-5)
        assert int(new["step"]) == k + 1
        clipped += int(np.sum((r == rmax(k)) | (r == 1 / rmax(k)) | (np.abs(d) == dmax(k))))
        state = new
    assert clipped > 0  # the clipping was exercised
    y_eval, _ = run(renorm, params, state, x, training=False)
    close(
        y_eval,
        ref.bn_eval(x, state["mean"], state["var"], params["scale"], params["bias"]),
        2e-5,
        2e-5,
    )


# ----------------------------------------------------------------------------
# GhostBatchNorm
# ----------------------------------------------------------------------------


def test_ghost_full_batch_is_batch_norm():
    ghost = bn_jax.GhostBatchNorm(virtual_batch_size=8, momentum=0.7)
    bn = bn_jax.BatchNorm(momentum=0.7)
    params, state = rand_affine(ghost, 3)
    xs = [rand((8, 2, 3), seed=s, loc=s) for s in range(2)]
    ys_g, s_g = _train_steps(ghost, params, state, xs)
    ys_b, s_b = _train_steps(bn, params, state, xs)
    for a, b in zip(ys_g, ys_b, strict=True):
        close(a, b, 1e-6, 1e-6)
    jax.tree.map(lambda u, v: close(u, v, 1e-6, 1e-6), s_g, s_b)
    loss = lambda n: lambda p, x: jnp.sum(jnp.sin(n.apply(p, state, x, training=True)[0]))
    jax.tree.map(
        lambda u, v: close(u, v, 1e-5, 1e-5),
        jgrad(loss(ghost))(params, xs[0]),
        jgrad(loss(bn))(params, xs[0]),
    )
    x_eval = rand((5, 2, 3), seed=9)  # eval: any batch size, BatchNorm's result
    close(
        run(ghost, params, s_g, x_eval, training=False)[0],
        run(bn, params, s_b, x_eval, training=False)[0],
        0,
        0,
    )


@pytest.mark.parametrize(("use_mask", "unbiased"), [(False, False), (True, True)])
def test_ghost_is_batch_norm_per_chunk(use_mask, unbiased):
    v, k = 4, 3
    ghost = bn_jax.GhostBatchNorm(virtual_batch_size=v, momentum=0.6, unbiased_running_var=unbiased)
    bn = bn_jax.BatchNorm(momentum=0.6)
    params, state = rand_affine(ghost, 5)
    x = rand((v * k, 2, 5), loc=1.0, scale=3.0)
    mask = (np.random.default_rng(1).random((v * k, 2, 1)) > 0.3) if use_mask else None
    chunks = [slice(j * v, (j + 1) * v) for j in range(k)]
    masks = [None if mask is None else mask[sl] for sl in chunks]
    y, new = run(ghost, params, state, x, training=True, mask=mask)
    means, varis, counts = [], [], []
    for sl, m in zip(chunks, masks, strict=True):
        yj, _ = run(bn, params, state, x[sl], training=True, mask=m)
        close(y[sl], yj, 1e-5, 1e-5)
        close(yj, ref.bn_train(x[sl], params["scale"], params["bias"], mask=m), 2e-5, 2e-5)
        mean, var, n = ref.bn_stats(x[sl], mask=m)
        if unbiased:
            var = var * n / (n - 1)
        means.append(mean * n), varis.append(var * n), counts.append(n)
    n = np.sum(counts, 0)
    close(new["mean"], ref.ema(state["mean"], np.sum(means, 0) / n, 0.6), 1e-5, 1e-5)
    close(new["var"], ref.ema(state["var"], np.sum(varis, 0) / n, 0.6), 1e-5, 1e-5)
    # gradients: those of BatchNorm applied to each chunk separately
    w = rand(x.shape, seed=3)
    ghost_loss = lambda p, x: jnp.sum(w * run(ghost, p, state, x, training=True, mask=mask)[0])

    def chunked_loss(p, x):
        return sum(
            jnp.sum(w[sl] * run(bn, p, state, x[sl], training=True, mask=m)[0])
            for sl, m in zip(chunks, masks, strict=True)
        )

    jax.tree.map(
        lambda u, v_: close(u, v_, 1e-4, 1e-4),
        jgrad(ghost_loss)(params, x),
        jgrad(chunked_loss)(params, x),
    )


# ----------------------------------------------------------------------------
# SequenceBatchNorm
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seq_setup():
    norm = bn_jax.SequenceBatchNorm(max_steps=3, momentum=0.5)
    params, state = rand_affine(norm, 4)
    state = {k: v + jnp.arange(3.0)[:, None] for k, v in state.items()}  # distinct slots
    x = rand((6, 5, 4), loc=2.0)  # 5 steps > max_steps
    return norm, params, state, x


def test_sequence_is_batch_norm_per_step(seq_setup):
    norm, params, state, x = seq_setup
    bn = bn_jax.BatchNorm(momentum=0.5)
    y, new = jax.jit(lambda s, x: run(norm, params, s, x, training=True))(state, x)
    y_eval, same = run(norm, params, new, x, training=False)
    jax.tree.map(np.testing.assert_array_equal, same, new)
    for t in range(x.shape[1]):
        slot = min(t, 2)
        slot_state = {k: v[slot] for k, v in state.items()}
        yt, st = run(bn, params, slot_state, x[:, t], training=True)
        close(y[:, t], yt, 1e-6, 1e-6)
        close(yt, ref.bn_train(x[:, t], params["scale"], params["bias"]), 2e-5, 2e-5)
        if t < 3:  # steps past max_steps leave the running stats alone
            for key in st:
                close(new[key][t], st[key], 1e-6, 1e-6)
        new_slot = {k: v[slot] for k, v in new.items()}
        ye, _ = run(bn, params, new_slot, x[:, t], training=False)
        close(y_eval[:, t], ye, 1e-6, 1e-6)  # eval: steps >= max_steps use the last slot


def test_sequence_scan_step_by_step_equals_whole_sequence(seq_setup):
    norm, params, state, x = seq_setup
    y, new = run(norm, params, state, x, training=True)

    def body(s, inp):
        t, xt = inp
        yt, s = run(norm, params, s, xt, training=True, step=t)
        return s, yt

    steps = jnp.arange(x.shape[1], dtype=jnp.int32)
    s_scan, ys = jax.jit(lambda s, x: jax.lax.scan(body, s, (steps, jnp.swapaxes(x, 0, 1))))(
        state, x
    )
    close(jnp.swapaxes(ys, 0, 1), y, 1e-6, 1e-6)
    jax.tree.map(lambda u, v: close(u, v, 1e-6, 1e-6), s_scan, new)
    # eval step by step (a Python int step too)
    y_eval, _ = run(norm, params, new, x, training=False)
    for t in range(x.shape[1]):
        yt, _ = run(norm, params, new, x[:, t], training=False, step=t)
        close(yt, y_eval[:, t], 1e-6, 1e-6)


def test_sequence_masks_and_time_major(seq_setup):
    norm, params, state, x = seq_setup
    lengths = np.array([5, 3, 2, 5, 1, 4])
    mask = (np.arange(5)[None, :] < lengths[:, None])[..., None]  # [B, T, 1]
    mask[:, 4] = False  # no sequence reaches the last step... except none: all padded
    y, new = run(norm, params, state, x, training=True, mask=mask)
    bn = bn_jax.BatchNorm(momentum=0.5)
    for t in range(3):
        yt, st = run(
            bn, params, {k: v[t] for k, v in state.items()}, x[:, t], training=True, mask=mask[:, t]
        )
        close(y[:, t], yt, 1e-6, 1e-6)
        close(
            yt, ref.bn_train(x[:, t], params["scale"], params["bias"], mask=mask[:, t]), 2e-5, 2e-5
        )
        for key in st:
            close(new[key][t], st[key], 1e-6, 1e-6)
    assert np.isfinite(np.asarray(y)).all()
    # time-major layout with time_axis=0 gives the same thing
    tm = bn_jax.SequenceBatchNorm(max_steps=3, momentum=0.5, time_axis=0)
    y_tm, new_tm = run(
        tm, params, state, np.swapaxes(x, 0, 1), training=True, mask=np.swapaxes(mask, 0, 1)
    )
    close(np.swapaxes(y_tm, 0, 1), y, 1e-6, 1e-6)
    jax.tree.map(lambda u, v: close(u, v, 1e-6, 1e-6), new_tm, new)


def test_sequence_empty_step_keeps_running_stats():
    norm = bn_jax.SequenceBatchNorm(max_steps=4, momentum=0.5)
    params, state = norm.init(2)
    x = rand((3, 4, 2))
    mask = np.ones((3, 4, 1), bool)
    mask[:, 2] = False  # every sequence is padded at step 2
    _, new = run(norm, params, state, x, training=True, mask=mask)
    np.testing.assert_array_equal(new["mean"][2], state["mean"][2])
    np.testing.assert_array_equal(new["var"][2], state["var"][2])
    for t in (0, 1, 3):  # the other steps take the EMA of their own batch statistics
        mean, var, _ = ref.bn_stats(x[:, t])
        close(new["mean"][t], ref.ema(state["mean"][t], mean, 0.5), 1e-5, 1e-6)
        close(new["var"][t], ref.ema(state["var"][t], var, 0.5), 1e-5, 1e-6)


def test_sequence_channels_first_layout():
    """x: [B, C, T] with axis=1, time_axis=2; the state is [max_steps, C]."""
    norm = bn_jax.SequenceBatchNorm(max_steps=2, axis=1, time_axis=2, momentum=0.5)
    params, state = rand_affine(norm, 3)
    assert state["mean"].shape == (2, 3)
    x = rand((4, 3, 3), loc=1.0)
    y, new = run(norm, params, state, x, training=True)
    ref_norm = bn_jax.SequenceBatchNorm(max_steps=2, momentum=0.5)
    y_ref, new_ref = run(ref_norm, params, state, np.swapaxes(x, 1, 2), training=True)
    close(y, np.swapaxes(y_ref, 1, 2), 1e-6, 1e-6)
    jax.tree.map(lambda u, v: close(u, v, 1e-6, 1e-6), new, new_ref)
    # step mode keeps the full layout's axes: x_t is [B, C]
    yt, _ = run(norm, params, new, x[:, :, 1], training=False, step=1)
    close(yt, run(norm, params, new, x, training=False)[0][:, :, 1], 1e-6, 1e-6)


# ----------------------------------------------------------------------------
# Functional forms and errors
# ----------------------------------------------------------------------------


def test_functional_sequence_batch_norm_step_mode():
    """The one functional form with an extra argument (``step``), time-major; the
    other functional forms are checked over the registry in tests/test_api.py."""
    cfg = {"max_steps": 2, "time_axis": 0}
    norm = bn_jax.SequenceBatchNorm(**cfg)
    params, state = rand_affine(norm, 4)
    x = rand((4, 4))  # one time step of [time, batch, features]
    for training in (True, False):
        a = run(norm, params, state, x, training=training, step=1)
        b = jax.jit(
            lambda p, s, x, tr=training: bn_jax.sequence_batch_norm(
                p, s, x, training=tr, step=1, **cfg
            )
        )(params, state, x)
        jax.tree.map(np.testing.assert_array_equal, a, b)
    # the step reached the state: slot 1 moved, slot 0 did not
    _, new = run(norm, params, state, x, training=True, step=1)
    np.testing.assert_array_equal(new["mean"][0], state["mean"][0])
    assert not np.allclose(new["mean"][1], state["mean"][1])


def test_errors_group_norm():
    x = jnp.zeros((2, 3, 6))
    with pytest.raises(ValueError, match=r"num_groups=4 does not divide the 6 channels"):
        bn_jax.GroupNorm(num_groups=4, use_scale=False, use_bias=False).apply(
            {}, {}, x, training=True
        )
    with pytest.raises(ValueError, match=r"num_groups=4 does not divide the 6 channels"):
        bn_jax.GroupNorm(num_groups=4).init(6)
    with pytest.raises(ValueError, match=r"group_size=4 does not divide the 6 channels"):
        bn_jax.GroupNorm(num_groups=None, group_size=4).init(x)
    with pytest.raises(
        ValueError, match=r"exactly one of num_groups and group_size.*num_groups=None"
    ):
        bn_jax.GroupNorm(group_size=2)
    with pytest.raises(ValueError, match=r"exactly one of num_groups and group_size"):
        bn_jax.GroupNorm(num_groups=None)
    with pytest.raises(ValueError, match=r"num_groups must be a positive int, got 0"):
        bn_jax.GroupNorm(num_groups=0)
    with pytest.raises(ValueError, match=r"reduction_axes=\(1,\) must include feature_axis=-1"):
        bn_jax.GroupNorm(num_groups=2, reduction_axes=(1,), use_scale=False, use_bias=False).apply(
            {}, {}, x, training=True
        )
    params, _ = bn_jax.GroupNorm(num_groups=2).init(4)
    with pytest.raises(ValueError, match=r"params\['scale'\] has shape \(4,\)"):
        bn_jax.GroupNorm(num_groups=2).apply(params, {}, x, training=True)
    with pytest.raises(TypeError, match=r"training must be a Python bool"):
        bn_jax.GroupNorm(num_groups=2).apply(
            params, {}, jnp.zeros((2, 4)), training=jnp.bool_(True)
        )


def test_errors_ghost():
    norm = bn_jax.GhostBatchNorm(virtual_batch_size=3)
    params, state = norm.init(2)
    with pytest.raises(
        ValueError, match=r"virtual_batch_size=3 does not divide the per-device batch of 8"
    ):
        norm.apply(params, state, jnp.zeros((8, 2)), training=True)
    norm.apply(params, state, jnp.zeros((8, 2)), training=False)  # eval: any batch
    with pytest.raises(ValueError, match=r"virtual_batch_size must be a positive int, got 0"):
        bn_jax.GhostBatchNorm(virtual_batch_size=0)
    with pytest.raises(TypeError, match=r"virtual_batch_size"):
        bn_jax.GhostBatchNorm()
    with pytest.raises(ValueError, match=r"virtual_batch_size=1 leaves a single value per feature"):
        bn_jax.GhostBatchNorm(virtual_batch_size=1).apply(
            params, state, jnp.zeros((4, 2)), training=True
        )
    with pytest.raises(ValueError, match=r"includes axis 0, which is the batch axis"):
        bn_jax.GhostBatchNorm(virtual_batch_size=1, axis=0).apply(
            params, state, jnp.zeros((2, 4)), training=True
        )
    with pytest.raises(ValueError, match=r"axis_name='d' is not bound"):
        bn_jax.GhostBatchNorm(virtual_batch_size=2, axis_name="d").apply(
            params, state, jnp.zeros((4, 2)), training=True
        )


def test_errors_sequence():
    norm = bn_jax.SequenceBatchNorm(max_steps=3)
    params, state = norm.init(2)
    with pytest.raises(
        ValueError,
        match=r"time_axis=1 is out of range: x has rank 1; a single time step needs the step=",
    ):
        norm.apply(params, state, jnp.zeros((2,)), training=True)
    with pytest.raises(
        ValueError, match=r"time_axis=2 is out of range: x of rank 1 is one time step"
    ):
        bn_jax.SequenceBatchNorm(max_steps=3, time_axis=2).apply(
            params, state, jnp.zeros((2,)), training=True, step=0
        )
    with pytest.raises(ValueError, match=r"time_axis=-1 is also a feature axis \(axis=-1\)"):
        bn_jax.SequenceBatchNorm(max_steps=3, time_axis=-1).apply(
            params, state, jnp.zeros((2, 2)), training=True
        )
    with pytest.raises(ValueError, match=r"step must be >= 0, got -1"):
        norm.apply(params, state, jnp.zeros((4, 2)), training=True, step=-1)
    with pytest.raises(TypeError, match=r"step must be an int or an integer scalar array"):
        norm.apply(params, state, jnp.zeros((4, 2)), training=True, step=jnp.float32(1))
    with pytest.raises(ValueError, match=r"state\['mean'\] has shape \(3, 2\) but max_steps=4"):
        bn_jax.SequenceBatchNorm(max_steps=4).apply(
            params, state, jnp.zeros((4, 5, 2)), training=True
        )
    with pytest.raises(ValueError, match=r"max_steps must be a positive int, got 0"):
        bn_jax.SequenceBatchNorm(max_steps=0)
    with pytest.raises(ValueError, match=r"single value per feature"):
        norm.apply(params, state, jnp.zeros((1, 5, 2)), training=True)


def test_errors_renorm_instance_layer():
    with pytest.raises(ValueError, match=r"rmax must be >= 1.0"):
        bn_jax.BatchRenorm(rmax=0.5)
    with pytest.raises(ValueError, match=r"dmax must be >= 0.0"):
        bn_jax.BatchRenorm(dmax=-1.0)
    with pytest.raises(TypeError, match=r"rmax must be a number or a callable"):
        bn_jax.BatchRenorm(rmax="3")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        bn_jax.BatchRenorm(momentum=1.5)
    renorm = bn_jax.BatchRenorm()
    params, state = renorm.init(2)
    with pytest.raises(ValueError, match=r"state has no 'step'"):
        renorm.apply(
            params, {"mean": state["mean"], "var": state["var"]}, jnp.zeros((4, 2)), training=True
        )
    inorm = bn_jax.InstanceNorm()
    params, _ = inorm.init(3)
    with pytest.raises(ValueError, match=r"single value per instance and channel"):
        inorm.apply(params, {}, jnp.zeros((4, 3)), training=True)
    with pytest.raises(ValueError, match=r"feature_axes=0 includes axis 0, the batch axis"):
        bn_jax.InstanceNorm(feature_axes=0).apply(params, {}, jnp.zeros((3, 4, 4)), training=True)
    with pytest.raises(
        ValueError, match=r"reduction_axes=3 is out of range for an input of rank 2"
    ):
        bn_jax.LayerNorm(reduction_axes=3, use_scale=False, use_bias=False).apply(
            {}, {}, jnp.zeros((2, 2)), training=True
        )
    with pytest.raises(TypeError, match=r"x must be a floating-point array, got dtype int32"):
        bn_jax.RMSNorm().apply(
            {"scale": jnp.ones(2)}, {}, jnp.zeros((2, 2), jnp.int32), training=True
        )
    with pytest.raises(ValueError, match=r"epsilon must be a positive finite float"):
        bn_jax.LayerNorm(epsilon=0.0)
    with pytest.raises(TypeError, match=r"feature_axes must be an int or a tuple of ints"):
        bn_jax.RMSNorm(feature_axes="x")
