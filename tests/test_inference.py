"""Folding, recalibration, frozen fine-tuning and checkpoints (bn_jax.inference).

References are float64 NumPy (tests/reference.py) and flax.linen models.
Tolerances: float32 folding agrees with the float64 Dense/Conv + BatchNorm
to 2e-5 of the output's scale; bf16 kernels to 1e-2 of the output's scale
(one bf16 rounding of each folded weight, 2^-9 relative); recalibrated
statistics to rtol 1e-5 (float32 accumulation).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import bn_jax
from tests import reference as ref
from tests.devices import require_devices

ROOT = Path(__file__).resolve().parents[1]


def _bn_vars(rng, c, *, scale=True, bias=True):
    """BatchNorm params and non-trivial running statistics (float32)."""
    params = {}
    if scale:
        params["scale"] = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(np.float32)
    if bias:
        params["bias"] = rng.normal(0.0, 1.0, c).astype(np.float32)
    state = {
        "mean": rng.normal(3.0, 2.0, c).astype(np.float32),
        "var": rng.uniform(0.1, 4.0, c).astype(np.float32),
    }
    return params, state


def _close(out, want, rel):
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(out - want))
    assert err <= rel * np.max(np.abs(want)), (err, np.max(np.abs(want)))


# ----------------------------------------------------------------------------- folding


@pytest.mark.parametrize(
    "layer_bias,use_scale,use_bias",
    [(True, True, True), (False, True, True), (True, False, False), (False, False, True)],
)
def test_fold_into_dense_matches_dense_then_bn_eval(layer_bias, use_scale, use_bias):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    w = rng.normal(size=(5, 6)).astype(np.float32)
    b = rng.normal(size=6).astype(np.float32) if layer_bias else None
    params, state = _bn_vars(rng, 6, scale=use_scale, bias=use_bias)
    z = x.astype(np.float64) @ w + (0.0 if b is None else b)
    want = ref.bn_eval(z, state["mean"], state["var"], params.get("scale"), params.get("bias"))

    k2, b2 = bn_jax.fold_into_dense(w, b, params, state, epsilon=1e-5)
    assert k2.dtype == jnp.float32 and b2.dtype == jnp.float32 and b2.shape == (6,)
    y = jnp.dot(x, k2, precision="highest") + b2
    _close(y, want, 2e-5)
    # The BatchNorm in eval mode, run by the library, agrees too.
    bn = bn_jax.BatchNorm(use_scale=use_scale, use_bias=use_bias)
    y_bn, _ = bn.apply(params, state, jnp.asarray(z, jnp.float32), training=False)
    _close(y, y_bn, 2e-5)


def test_fold_into_dense_feature_axis_for_torch_layout():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    w_t = rng.normal(size=(6, 5)).astype(np.float32)  # PyTorch Linear: (out, in)
    b = rng.normal(size=6).astype(np.float32)
    params, state = _bn_vars(rng, 6)
    want = ref.bn_eval(x.astype(np.float64) @ w_t.T + b, state["mean"], state["var"], **params)
    k2, b2 = bn_jax.fold_into_dense(w_t, b, params, state, feature_axis=0)
    _close(np.asarray(x, np.float64) @ np.asarray(k2, np.float64).T + np.asarray(b2), want, 2e-5)


def test_fold_into_dense_bf16_kernel():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(32, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(16, 8)) / 4, jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=8), jnp.bfloat16)
    params, state = _bn_vars(rng, 8)
    k2, b2 = bn_jax.fold_into_dense(w, b, params, state)
    assert k2.dtype == jnp.bfloat16 and b2.dtype == jnp.bfloat16
    # Folded in float32, rounded once: each weight within one bf16 ulp (2^-8 relative).
    f = params["scale"].astype(np.float64) / np.sqrt(state["var"].astype(np.float64) + 1e-5)
    exact = np.asarray(w, np.float64) * f
    assert np.all(np.abs(np.asarray(k2, np.float64) - exact) <= 2.0**-8 * np.abs(exact))
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    want = ref.bn_eval(z, state["mean"], state["var"], **params)
    y = jnp.dot(x, k2, preferred_element_type=jnp.float32) + b2.astype(jnp.float32)
    _close(y, want, 1e-2)


@pytest.mark.parametrize("dtype,rel", [(jnp.float32, 2e-5), (jnp.bfloat16, 1e-2)])
def test_fold_into_conv_matches_conv_then_bn_eval(dtype, rel):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), dtype)
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)) / 3, dtype)  # HWIO
    params, state = _bn_vars(rng, 4)
    z = ref.conv2d_nhwc(np.asarray(x, np.float64), np.asarray(k, np.float64))
    want = ref.bn_eval(z, state["mean"], state["var"], **params)

    k2, b2 = bn_jax.fold_into_conv(k, None, params, state)
    assert k2.dtype == dtype and k2.shape == k.shape and b2.shape == (4,)
    y = jax.lax.conv_general_dilated(
        x,
        k2,
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest",
        preferred_element_type=jnp.float32,
    ) + b2.astype(jnp.float32)
    _close(y, want, rel)


def test_fold_errors_name_the_argument():
    rng = np.random.default_rng(4)
    params, state = _bn_vars(rng, 6)
    w = np.ones((5, 7), np.float32)
    with pytest.raises(ValueError, match=r"state\['mean'\] has shape \(6,\).*\(7,\) output"):
        bn_jax.fold_into_dense(w, None, params, state)
    with pytest.raises(ValueError, match=r"rank >= 3.*use fold_into_dense"):
        bn_jax.fold_into_conv(np.ones((5, 6), np.float32), None, params, state)
    with pytest.raises(ValueError, match="state has no 'var'"):
        bn_jax.fold_into_dense(np.ones((5, 6), np.float32), None, params, {"mean": state["mean"]})
    with pytest.raises(TypeError, match="kernel must be a floating-point array"):
        bn_jax.fold_into_dense(np.ones((5, 6), np.int32), None, params, state)
    with pytest.raises(ValueError, match="feature_axis=2 is out of range"):
        bn_jax.fold_into_dense(np.ones((5, 6), np.float32), None, params, state, feature_axis=2)


class Block(nn.Module):
    bn: bool

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), use_bias=not self.bn)(x)
        if self.bn:
            x = nn.BatchNorm(use_running_average=True)(x)
        return nn.relu(x)


class Net(nn.Module):
    """Conv -> BN -> relu -> mean -> Dense -> BN (the BatchNorms nested at two depths)."""

    bn: bool = True

    @nn.compact
    def __call__(self, x):
        x = Block(self.bn, name="block")(x).mean((1, 2))
        x = nn.Dense(3, use_bias=not self.bn)(x)
        if self.bn:
            x = nn.BatchNorm(use_running_average=True, use_scale=False)(x)
        return x


def test_fold_batch_norms_on_flax_variables():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 5, 5, 2)), jnp.float32)
    variables = jax.jit(Net().init)(jax.random.key(0), x)
    # Non-trivial BatchNorm parameters and running statistics.
    p1, s1 = _bn_vars(rng, 4)
    p2, s2 = _bn_vars(rng, 3, scale=False)
    variables["params"]["block"]["BatchNorm_0"] = p1
    variables["params"]["BatchNorm_0"] = p2
    variables["batch_stats"] = {"block": {"BatchNorm_0": s1}, "BatchNorm_0": s2}
    before = jax.tree.map(np.array, variables)

    folded = bn_jax.fold_batch_norms(
        variables, [("block/Conv_0", "block/BatchNorm_0"), (("Dense_0",), "BatchNorm_0")]
    )
    assert "batch_stats" not in folded
    assert set(folded["params"]) == {"block", "Dense_0"}
    assert set(folded["params"]["block"]) == {"Conv_0"}
    jax.tree.map(np.testing.assert_array_equal, variables, before)  # input untouched
    y_ref = jax.jit(Net().apply)(variables, x)
    y = jax.jit(Net(bn=False).apply)(folded, x)
    _close(y, y_ref, 2e-5)
    # The folded tree is exactly what the model without BatchNorm expects.
    want_shapes = jax.tree.map(jnp.shape, jax.eval_shape(Net(bn=False).init, jax.random.key(1), x))
    assert jax.tree.map(jnp.shape, folded) == want_shapes

    with pytest.raises(ValueError, match="batch_norm path 'BatchNorm_9' is not in 'batch_stats'"):
        bn_jax.fold_batch_norms(variables, {"Dense_0": "BatchNorm_9"})
    with pytest.raises(ValueError, match="has no 'kernel'"):
        bn_jax.fold_batch_norms(variables, {"block": "BatchNorm_0"})


def flax_bn_inputs(model, params):
    """fn(batch_stats, x) -> the input of every linen BatchNorm, nested like batch_stats."""

    def fn(batch_stats, x):
        taps = {}

        def tap(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
                *parents, name = context.module.path
                node = taps
                for p in parents:
                    node = node.setdefault(p, {})
                node[name] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(tap):
            model.apply({"params": params, "batch_stats": batch_stats}, x)
        return taps

    return fn


def test_recalibrate_flax_linen_model_with_interceptor():
    rng = np.random.default_rng(12)
    data = rng.normal(0.5, 2.0, size=(20, 5, 5, 2)).astype(np.float32)
    variables = jax.jit(Net().init)(jax.random.key(0), data[:2])
    p_block, _ = _bn_vars(rng, 4)
    variables["params"]["block"]["BatchNorm_0"] = p_block
    batches = [data[i : i + 8] for i in range(0, 20, 8)]  # 8, 8, 4
    fn = flax_bn_inputs(Net(), variables["params"])
    new = bn_jax.recalibrate(fn, batches, state=variables["batch_stats"], passes=2, progress=False)

    prm = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    conv = ref.conv2d_nhwc(data, prm["block"]["Conv_0"]["kernel"])
    m1, v1, _ = ref.bn_stats(conv)
    h = np.maximum(ref.bn_eval(conv, m1, v1, **prm["block"]["BatchNorm_0"]), 0).mean((1, 2))
    m2, v2, _ = ref.bn_stats(h @ prm["Dense_0"]["kernel"])
    got = new["block"]["BatchNorm_0"]
    np.testing.assert_allclose(got["mean"], m1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], v1, rtol=1e-5)
    np.testing.assert_allclose(new["BatchNorm_0"]["mean"], m2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["BatchNorm_0"]["var"], v2, rtol=1e-4)


# ------------------------------------------------------------------------ recalibrate


def test_recalibrate_pools_exactly_with_uneven_last_batch(capsys):
    rng = np.random.default_rng(6)
    # Batches with different means, so averaging per-batch variances would be wrong.
    sizes = (16, 16, 13)
    convs = [rng.normal(50.0 + 3 * i, 2.0, size=(n, 3, 3, 4)) for i, n in enumerate(sizes)]
    denses = [rng.normal(-5.0 * i, 1.0 + i, size=(n, 5)) for i, n in enumerate(sizes)]
    batches = [
        {"conv": c.astype(np.float32), "dense": d.astype(np.float32)}
        for c, d in zip(convs, denses, strict=True)
    ]
    out = bn_jax.recalibrate(None, batches)
    assert "recalibrate" in capsys.readouterr().err  # the tqdm bar
    for name, data in (("conv", convs), ("dense", denses)):
        mean, var, n = ref.bn_stats(np.concatenate(data))
        assert out[name]["mean"].dtype == jnp.float32
        np.testing.assert_allclose(out[name]["mean"], mean, rtol=1e-5)
        np.testing.assert_allclose(out[name]["var"], var, rtol=1e-5)
        naive = np.mean([ref.bn_stats(d)[1] for d in data], 0)
        assert not np.allclose(naive, var, rtol=1e-2)
    unbiased = bn_jax.recalibrate(
        lambda b: b["dense"], iter(batches), unbiased=True, progress=False
    )
    _, var, n = ref.bn_stats(np.concatenate(denses))
    np.testing.assert_allclose(unbiased["var"], var * n / (n - 1), rtol=1e-5)


def test_recalibrate_masks_keep_empty_channels():
    rng = np.random.default_rng(7)
    xs = [rng.normal(2.0 * i, 1.0, size=(n, 3, 4)).astype(np.float32) for i, n in enumerate((8, 5))]
    masks = [rng.random((n, 3, 4)) < 0.6 for n in (8, 5)]
    for m in masks:
        m[..., 0] = False  # channel 0 never has a valid element
    state = {
        "mean": np.full(4, 9.0, np.float32),
        "var": np.full(4, 7.0, np.float32),
        "count": np.zeros(4, np.int32),
    }
    out = bn_jax.recalibrate(
        lambda s, b: (b[0], b[1]),
        list(zip(xs, masks, strict=True)),
        state=state,
        masked=True,
        progress=False,
    )
    mean, var, _ = ref.bn_stats(np.concatenate(xs), mask=np.concatenate(masks))
    np.testing.assert_allclose(out["mean"][1:], mean[1:], rtol=1e-5)
    np.testing.assert_allclose(out["var"][1:], var[1:], rtol=1e-5)
    assert out["mean"][0] == 9.0 and out["var"][0] == 7.0
    np.testing.assert_array_equal(out["count"], state["count"])  # other keys kept
    # Without state, an empty channel gets the start-up values (0, 1).
    fresh = bn_jax.recalibrate(None, list(zip(xs, masks, strict=True)), masked=True, progress=False)
    assert fresh["mean"][0] == 0.0 and fresh["var"][0] == 1.0


def test_recalibrate_whole_model_layer_by_layer():
    rng = np.random.default_rng(8)
    w1 = rng.normal(size=(4, 6)).astype(np.float32)
    w2 = rng.normal(size=(6, 5)).astype(np.float32)
    p1, _ = _bn_vars(rng, 6)
    bn = bn_jax.BatchNorm()
    data = rng.normal(1.0, 2.0, size=(50, 4)).astype(np.float32)

    def bn_inputs(state, x):  # the model in eval mode, returning each BatchNorm's input
        h1 = x @ w1
        a1, _ = bn.apply(p1, state["bn1"], h1, training=False)
        return {"bn1": h1, "bn2": jax.nn.relu(a1) @ w2}

    state0 = {"bn1": bn.init(6)[1], "bn2": bn.init(5)[1]}
    batches = lambda: (data[i : i + 16] for i in range(0, 50, 16))

    h1 = data.astype(np.float64) @ w1
    m1, v1, _ = ref.bn_stats(h1)

    def bn2_stats(mean1, var1):
        return ref.bn_stats(np.maximum(ref.bn_eval(h1, mean1, var1, **p1), 0) @ w2)[:2]

    exact = bn_jax.recalibrate(bn_inputs, batches, state=state0, passes=2, progress=False)
    one = bn_jax.recalibrate(bn_inputs, batches, state=state0, passes=1, progress=False)
    for got in (exact, one):
        np.testing.assert_allclose(got["bn1"]["mean"], m1, rtol=1e-5)
        np.testing.assert_allclose(got["bn1"]["var"], v1, rtol=1e-5)
    # Two passes: layer 2 sees layer 1's recalibrated statistics (layer by layer).
    m2, v2 = bn2_stats(m1, v1)
    np.testing.assert_allclose(exact["bn2"]["mean"], m2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(exact["bn2"]["var"], v2, rtol=1e-4)
    # One pass: layer 2 was measured under layer 1's old statistics (0, 1).
    m2_old, v2_old = bn2_stats(np.zeros(6), np.ones(6))
    np.testing.assert_allclose(one["bn2"]["mean"], m2_old, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one["bn2"]["var"], v2_old, rtol=1e-4)
    assert not np.allclose(v2, v2_old, rtol=1e-2)


@pytest.mark.parametrize("mapping", ["shard_map", "pmap", "global"])
def test_recalibrate_across_8_devices(mapping):
    require_devices(8)
    rng = np.random.default_rng(9)
    sizes = (16, 16, 8)  # uneven last batch, still one slice per device
    xs = [
        rng.normal(10.0 * i, 1.0 + i, size=(n, 3, 4)).astype(np.float32)
        for i, n in enumerate(sizes)
    ]
    # Uneven valid counts per device: the merge must weight by count.
    masks = [
        rng.random((n, 3, 1)) < 0.3 + 0.6 * (np.arange(n) % 8 / 7)[:, None, None] for n in sizes
    ]
    fn = lambda b: (b["x"], b["mask"])
    axis_name = "data"
    if mapping in ("shard_map", "global"):
        mesh = jax.make_mesh((8,), ("data",))
        map_fn = lambda f: jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P())
        # make_mesh gives Explicit axes: place each batch sharded over "data" first.
        shard = jax.sharding.NamedSharding(mesh, P("data"))
        batches = [
            jax.device_put({"x": x, "mask": m}, shard) for x, m in zip(xs, masks, strict=True)
        ]
        if mapping == "global":  # jit over batch-sharded global arrays: nothing to add
            map_fn = axis_name = None
    else:
        map_fn = lambda f: jax.pmap(f, axis_name="data", out_axes=None)
        batches = [
            {"x": x.reshape(8, -1, 3, 4), "mask": m.reshape(8, -1, 3, 1)}
            for x, m in zip(xs, masks, strict=True)
        ]
    out = bn_jax.recalibrate(
        fn, batches, masked=True, axis_name=axis_name, map_fn=map_fn, progress=False
    )
    mean, var, _ = ref.bn_stats(np.concatenate(xs), mask=np.concatenate(masks))
    np.testing.assert_allclose(out["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(out["var"], var, rtol=1e-5)


def test_recalibrate_errors():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="passes=2 needs state"):
        bn_jax.recalibrate(None, [x], passes=2)
    with pytest.raises(ValueError, match="passes must be an int >= 1, got 0"):
        bn_jax.recalibrate(None, [x], passes=0)
    with pytest.raises(TypeError, match=r"passes must be an int >= 1, got 1\.0 of type float"):
        bn_jax.recalibrate(None, [x], passes=1.0)
    with pytest.raises(TypeError, match="passes must be an int >= 1, got True of type bool"):
        bn_jax.recalibrate(None, [x], passes=True)
    state = {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match="one-shot iterator; pass a list or a callable"):
        bn_jax.recalibrate(lambda s, b: b, iter([x]), state=state, passes=2)
    with pytest.raises(ValueError, match="batches yielded no batch"):
        bn_jax.recalibrate(None, [], progress=False)
    with pytest.raises(TypeError, match=r"masked=True expects fn to return \(inputs, masks\)"):
        bn_jax.recalibrate(None, [x], masked=True, progress=False)
    with pytest.raises(ValueError, match=r"axis_name='data' is not bound.*shard_map"):
        bn_jax.recalibrate(None, [x], axis_name="data", progress=False)
    with pytest.raises(ValueError, match=r"state\['mean'\] has shape \(2,\)"):
        bad = {"mean": np.zeros(2, np.float32), "var": np.ones(2, np.float32)}
        bn_jax.recalibrate(lambda s, b: b, [x], state=bad, progress=False)
    with pytest.raises(TypeError, match="must be a floating-point array"):
        bn_jax.recalibrate(None, [np.ones((4, 3), np.int32)], progress=False)


# -------------------------------------------------------------- freezing, checkpoints


def test_finetune_with_frozen_batch_norm():
    rng = np.random.default_rng(10)
    bn = bn_jax.BatchNorm()
    bn_params, bn_state = _bn_vars(rng, 8)
    params = {
        "dense1": {"kernel": jnp.asarray(rng.normal(size=(4, 8)) / 2, jnp.float32)},
        "bn": jax.tree.map(jnp.asarray, bn_params),
        "dense2": {"kernel": jnp.asarray(rng.normal(size=(8, 3)) / 3, jnp.float32)},
    }
    state = {"bn": jax.tree.map(jnp.asarray, bn_state)}
    x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 32))

    def loss_fn(params, state, x, y):
        h = x @ params["dense1"]["kernel"]
        h, new_bn = bn.apply(params["bn"], state["bn"], h, training=False)  # frozen statistics
        logits = jax.nn.relu(h) @ params["dense2"]["kernel"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"bn": new_bn}

    def labels(p):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if path[0].key == "bn" else "train", p
        )

    tx = optax.multi_transform({"train": optax.adamw(1e-2), "frozen": optax.set_to_zero()}, labels)

    @jax.jit
    def step(params, state, opt_state):
        (_, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, grads

    p, s, o = params, state, tx.init(params)
    for _ in range(3):
        p, s, o, grads = step(p, s, o)
    # BatchNorm had gradients (so an unmasked optimizer would move it) ...
    assert np.any(np.asarray(grads["bn"]["scale"]) != 0)
    # ... but scale, bias and running statistics are bit for bit unchanged.
    jax.tree.map(np.testing.assert_array_equal, p["bn"], params["bn"])
    jax.tree.map(np.testing.assert_array_equal, s, state)
    for k in ("dense1", "dense2"):
        assert not np.allclose(p[k]["kernel"], params[k]["kernel"])


def test_orbax_round_trip_is_bit_exact(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    bn = bn_jax.BatchNorm(momentum=None, param_dtype=jnp.bfloat16)
    params, state = bn.init(6)
    rng = np.random.default_rng(11)
    params = {"scale": jnp.asarray(rng.normal(size=6), jnp.bfloat16), "bias": params["bias"]}
    x = jnp.asarray(rng.normal(3.0, 2.0, size=(10, 6)), jnp.float32)
    _, state = bn.apply(params, state, x, training=True)
    tree = {"params": params, "state": state}

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "step_1", tree)
    ckpt.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = ckpt.restore(tmp_path / "step_1", target)
    ckpt.close()

    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert state["count"].dtype == jnp.int32 and params["scale"].dtype == jnp.bfloat16


# -------------------------------------------------------------------------- examples


@pytest.mark.parametrize("script", ["finetune_frozen.py", "checkpoint.py"])
def test_example_runs(script):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout.splitlines()[-1]
