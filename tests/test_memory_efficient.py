"""The output-saving LayerNorm / RMSNorm: same values and gradients as the plain
layers without keeping the input, and its accuracy when ``|scale|`` is tiny."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
from bn_jax._core.memory_efficient import (
    layer_norm_saving_output,
    rms_norm_saving_output,
    scale_floor,
)
from bn_jax._core.normalize import StatsConfig
from tests import reference as ref
from tests.devices import require_devices

torch = pytest.importorskip("torch")

EPS = 1e-6
KINDS = ("layer", "rms")


def saving(kind, x, scale, bias, mask=None, axes=(-1,), out_dtype=None, **cfg):
    """The output-saving layer under test, with ``axes`` as the reduced axes."""
    axes = tuple(sorted(a % x.ndim for a in axes))
    c = StatsConfig(axes=axes, epsilon=EPS, out_dtype=jnp.dtype(out_dtype or x.dtype), **cfg)
    if kind == "layer":
        return layer_norm_saving_output(x, scale, bias, mask, c)
    return rms_norm_saving_output(x, scale, mask, c)


def plain(kind, x, scale, bias, mask=None, axes=(-1,), out_dtype=None):
    """The layer as a plain float32 formula differentiated by JAX."""
    dt = jnp.promote_types(jnp.float32, x.dtype)
    xf = x.astype(dt)
    w = jnp.ones_like(xf) if mask is None else jnp.broadcast_to(mask, x.shape).astype(dt)
    count = jnp.sum(w, axes, keepdims=True)
    n = jnp.maximum(count, 1)
    # a row with no valid element is passed through (variance 1)
    if kind == "layer":
        mean = jnp.sum(w * xf, axes, keepdims=True) / n
        var = jnp.where(count > 0, jnp.sum(w * (xf - mean) ** 2, axes, keepdims=True) / n, 1.0)
        y = (xf - mean) / jnp.sqrt(var + EPS)
    else:
        ms = jnp.where(count > 0, jnp.sum(w * xf * xf, axes, keepdims=True) / n, 1.0)
        y = xf / jnp.sqrt(ms + EPS)
    if scale is not None:
        y = y * scale
    if bias is not None and kind == "layer":
        y = y + bias
    return y.astype(out_dtype or x.dtype)


def torch_vjp(kind, x, scale, bias, g, mask=None, axes=(-1,)):
    """``(dx, dscale, dbias)`` in float64 by torch autograd (None where absent)."""
    t = {
        k: None if v is None else torch.tensor(np.asarray(v, np.float64), requires_grad=True)
        for k, v in (("x", x), ("scale", scale), ("bias", bias))
    }
    axes = tuple(a % np.ndim(x) for a in axes)
    xt = t["x"]
    w = torch.ones_like(xt) if mask is None else torch.tensor(np.broadcast_to(mask, x.shape) * 1.0)
    count = w.sum(axes, keepdim=True)
    n = torch.clamp(count, min=1)
    one = torch.ones_like(count)
    if kind == "layer":
        mean = (w * xt).sum(axes, keepdim=True) / n
        var = torch.where(count > 0, (w * (xt - mean) ** 2).sum(axes, keepdim=True) / n, one)
        y = (xt - mean) / torch.sqrt(var + EPS)
    else:
        ms = torch.where(count > 0, (w * xt * xt).sum(axes, keepdim=True) / n, one)
        y = xt / torch.sqrt(ms + EPS)
    if t["scale"] is not None:
        y = y * t["scale"]
    if t["bias"] is not None and kind == "layer":
        y = y + t["bias"]
    (y * torch.tensor(np.asarray(g, np.float64))).sum().backward()
    return tuple(None if v is None else v.grad.numpy() for v in t.values())


def inputs(shape, feature_shape, seed=0, scale_size=1.0, bias_size=0.5):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape) * 3 + 1, jnp.float32)
    sign = np.where(rng.random(feature_shape) < 0.2, -1.0, 1.0)
    scale = jnp.asarray(scale_size * sign * (1 + 0.5 * rng.random(feature_shape)), jnp.float32)
    bias = jnp.asarray(bias_size * rng.normal(size=feature_shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return x, scale, bias, g


def grads(fn, x, scale, bias, g):
    """``(dx, dscale, dbias)`` of ``sum(fn(x, scale, bias) * g)`` (None where absent)."""
    args = {"x": x, "scale": scale, "bias": bias}
    present = {k: v for k, v in args.items() if v is not None}

    def loss(p):
        full = {**args, **p}
        return jnp.sum(fn(full["x"], full["scale"], full["bias"]).astype(jnp.float32) * g)

    out = jax.jit(jax.grad(loss))(present)
    return tuple(out.get(k) for k in args)


def assert_grads_close(got, want, rtol, atol):
    for name, a, b in zip(("dx", "dscale", "dbias"), got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol, err_msg=name)


CASES = [
    # (shape, reduced axes, feature shape, use_scale, use_bias, masked)
    ((4, 6, 32), (-1,), (32,), True, True, False),
    ((4, 6, 32), (-1,), (32,), True, True, True),
    ((4, 6, 32), (-1,), (32,), False, True, True),
    ((4, 6, 32), (-1,), (32,), True, False, False),
    ((4, 6, 32), (-1,), (32,), False, False, True),
    ((3, 5, 4, 8), (-2, -1), (4, 8), True, True, True),  # two reduced and feature axes
    ((3, 5, 8), (-2, -1), (8,), True, True, False),  # fewer feature axes than reduced
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_plain_formula_and_float64(kind, case):
    shape, axes, fshape, use_scale, use_bias, masked = case
    x, scale, bias, g = inputs(shape, fshape)
    scale = scale if use_scale else None
    bias = bias if use_bias and kind == "layer" else None
    mask = None
    if masked:
        mask = jnp.asarray(np.random.default_rng(1).random((*shape[:-1], 1)) < 0.7)
        mask = jnp.broadcast_to(mask, shape)

    def f(fn):
        return lambda x, s, b: fn(kind, x, s, b, mask, axes)

    got = grads(f(saving), x, scale, bias, g)
    want32 = grads(f(plain), x, scale, bias, g)
    want64 = torch_vjp(kind, x, scale, bias, g, None if mask is None else np.asarray(mask), axes)
    assert_grads_close(got, want64, rtol=2e-4, atol=2e-4)
    assert_grads_close(want32, want64, rtol=2e-4, atol=2e-4)  # the float32 yardstick
    # Output-saving gradients are as close to float64 as the plain formula's.
    for a, b, w in zip(got, want32, want64, strict=True):
        if w is not None:
            err, err_plain = (np.max(np.abs(np.asarray(v, np.float64) - w)) for v in (a, b))
            assert err <= 4 * err_plain + 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_plain_layer(kind):
    x, scale, bias, _ = inputs((4, 6, 32), (32,))
    params = {"scale": scale, "bias": bias} if kind == "layer" else {"scale": scale}
    layer = bn_jax.LayerNorm(epsilon=EPS) if kind == "layer" else bn_jax.RMSNorm(epsilon=EPS)
    want, _ = jax.jit(lambda p, x: layer.apply(p, {}, x, training=True))(params, x)
    got = jax.jit(lambda x, s, b: saving(kind, x, s, b))(x, scale, bias)
    np.testing.assert_array_equal(got, want)
    want64 = (
        ref.layer_norm(x, scale, bias, eps=EPS)
        if kind == "layer"
        else ref.rms_norm(x, scale, eps=EPS)
    )
    np.testing.assert_allclose(got, want64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_raises_a_clear_error(kind):
    x, scale, bias, _ = inputs((2, 8), (8,))
    f = functools.partial(saving, kind, scale=scale, bias=bias)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(f, (x,), (jnp.ones_like(x),))


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_input_gives_bfloat16_and_gradients_within_its_rounding(kind):
    x, scale, bias, g = inputs((4, 8, 64), (64,))
    bias = bias if kind == "layer" else None
    xb = x.astype(jnp.bfloat16)
    y = saving(kind, xb, scale, bias)
    assert y.dtype == jnp.bfloat16
    got = grads(lambda x, s, b: saving(kind, x, s, b), xb, scale, bias, g)
    assert got[0].dtype == jnp.bfloat16
    want = torch_vjp(kind, xb.astype(jnp.float32), scale, bias, g)
    # y is stored in bfloat16: x_hat is known to its rounding (2**-9 relative).
    assert_grads_close(got, want, rtol=3e-2, atol=3e-2)
    # Float32 output from bfloat16 input (dtype=float32): float32 accuracy.
    got = grads(lambda x, s, b: saving(kind, x, s, b, out_dtype=jnp.float32), xb, scale, bias, g)
    assert_grads_close((None, *got[1:]), (None, *want[1:]), rtol=1e-4, atol=1e-4)


def _max_errors(kind, scale_size, bias_size=0.5, seed=0):
    """Max |error| vs float64 of ``(dx, dscale[, dbias])``: output-saving, plain float32."""
    x, scale, bias, g = inputs((16, 64), (64,), seed, scale_size, bias_size)
    bias = bias if kind == "layer" else None
    want = torch_vjp(kind, x, scale, bias, g)
    out = []
    for fn in (saving, plain):
        got = grads(lambda x, s, b, fn=fn: fn(kind, x, s, b), x, scale, bias, g)
        out.append(
            [float(np.max(np.abs(a - w))) for a, w in zip(got, want, strict=True) if w is not None]
        )
    return out


@pytest.mark.parametrize("scale_size", [1e-3, 1e-6])
def test_tiny_scale_dscale_error_within_the_documented_bound(scale_size):
    # x_hat is reconstructed to about u * (|x_hat| + |bias| / |scale|), u = eps / 2,
    # so dscale_j = sum_i g_ij * x_hat_ij is off by at most sum_i |g_ij| times that.
    x, scale, bias, g = inputs((16, 64), (64,), 0, scale_size)
    got = grads(lambda x, s, b: saving("layer", x, s, b), x, scale, bias, g)
    want = torch_vjp("layer", x, scale, bias, g)
    x_hat = ref.layer_norm(x, eps=EPS)
    u = np.finfo(np.float32).eps / 2
    bound = 4 * u * np.sum(np.abs(g) * (np.abs(x_hat) + np.abs(bias) / np.abs(scale)), 0)
    assert np.all(np.abs(got[1] - want[1]) <= bound)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-6)  # dx carries scale


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale_size", [1e-3, 1e-6])
def test_tiny_scale_without_bias_is_as_accurate_as_plain(kind, scale_size):
    # No bias: y = x_hat * scale keeps x_hat's relative precision down to the floor.
    errors, plain_errors = _max_errors(kind, scale_size, bias_size=0.0)
    for e, p in zip(errors, plain_errors, strict=True):
        assert e <= 4 * p + 1e-7


def test_tiny_scale_error_grows_as_bias_over_scale():
    e3 = _max_errors("layer", 1e-3)[0][1]
    e6 = _max_errors("layer", 1e-6)[0][1]
    assert 100 < e6 / e3 < 10_000  # ~1000: linear in 1 / |scale|


@pytest.mark.parametrize("kind", KINDS)
def test_zero_scale_gives_finite_gradients_and_zero_dscale_there(kind):
    x, scale, bias, g = inputs((8, 16), (16,))
    scale = scale.at[3].set(0.0).at[5].set(-1e-9)
    bias = bias if kind == "layer" else None
    got = grads(lambda x, s, b: saving(kind, x, s, b), x, scale, bias, g)
    want = torch_vjp(kind, x, scale, bias, g)
    assert all(np.all(np.isfinite(a)) for a in got if a is not None)
    assert got[1][3] == 0.0  # x cannot be recovered from y == bias
    others = np.arange(16) != 3
    others[5] = False  # below the floor: bounded, not exact
    np.testing.assert_allclose(got[1][others], want[1][others], rtol=1e-4, atol=1e-4)
    if bias is not None:
        np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)
    floor = scale_floor(jnp.float32)
    assert abs(got[1][5]) <= 8 * 3 * (1 + 2 / floor * np.finfo(np.float32).eps)


@pytest.mark.parametrize("kind", KINDS)
def test_jit_vmap_scan_remat(kind):
    x, scale, bias, g = inputs((3, 4, 16), (16,))
    bias = bias if kind == "layer" else None

    def f(fn, x, s, b):
        return fn(kind, x, s, b)

    def loss(fn, s, b, x):
        def body(h, _):
            return jax.checkpoint(lambda h: f(fn, h, s, b))(h) * 1.5, None

        h = jax.vmap(lambda xi: f(fn, xi, s, b))(x)  # per-example rows of shape (4, 16)
        h, _ = jax.lax.scan(body, h, None, length=2)
        return jnp.sum(h * g)

    got = jax.jit(jax.grad(functools.partial(loss, saving), argnums=(0, 1, 2)))(scale, bias, x)
    want = jax.jit(jax.grad(functools.partial(loss, plain), argnums=(0, 1, 2)))(scale, bias, x)
    for a, b in zip(got, want, strict=True):
        if b is not None:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_reduced_axis_split_over_devices(kind):
    require_devices(4)
    x, scale, bias, g = inputs((4, 32), (32,))
    bias = bias if kind == "layer" else None

    def loss(fn, x, s, b):
        return jnp.sum(fn(x, s, b) * g)

    whole = jax.grad(lambda *a: loss(lambda x, s, b: saving(kind, x, s, b), *a), (0, 1))(
        x, scale, bias
    )

    def split(v):  # (rows, 32) -> 4 devices of (rows, 8); features (32,) -> (4, 8)
        return v.reshape(4, 8) if v.ndim == 1 else v.reshape(4, 4, 8).transpose(1, 0, 2)

    sharded = jax.vmap(
        jax.grad(lambda x, s, b, g: jnp.sum(saving(kind, x, s, b, axis_name="d") * g), (0, 1)),
        in_axes=(0, 0, None if bias is None else 0, 0),
        axis_name="d",
    )(split(x), split(scale), None if bias is None else split(bias), split(g))
    np.testing.assert_allclose(
        sharded[0].transpose(1, 0, 2).reshape(4, 32), whole[0], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(sharded[1].reshape(32), whole[1], rtol=1e-5, atol=1e-5)


def _layer(kind, **config):
    return (bn_jax.LayerNorm if kind == "layer" else bn_jax.RMSNorm)(epsilon=EPS, **config)


def _front_ends(kind, memory_efficient):
    """``apply(params, x) -> y`` of the core, functional, linen and nnx forms."""
    from flax import nnx

    import bn_jax.linen
    import bn_jax.nnx

    name = "LayerNorm" if kind == "layer" else "RMSNorm"
    core = _layer(kind, memory_efficient=memory_efficient)
    functional = bn_jax.layer_norm if kind == "layer" else bn_jax.rms_norm
    linen = getattr(bn_jax.linen, name)(epsilon=EPS, memory_efficient=memory_efficient)

    def nnx_apply(p, x):
        m = getattr(bn_jax.nnx, name)(
            x.shape[-1], epsilon=EPS, memory_efficient=memory_efficient, rngs=nnx.Rngs(0)
        )
        for k, v in p.items():
            getattr(m, k)[...] = v
        return m(x)

    return {
        "core": lambda p, x: core.apply(p, {}, x, training=True)[0],
        "functional": lambda p, x: functional(
            p, {}, x, training=True, epsilon=EPS, memory_efficient=memory_efficient
        )[0],
        "linen": lambda p, x: linen.apply({"params": p}, x),
        "nnx": nnx_apply,
    }


@pytest.mark.parametrize("kind", KINDS)
def test_memory_efficient_field_through_every_front_end(kind):
    assert not _layer(kind).memory_efficient  # off by default
    x, scale, bias, g = inputs((3, 4, 16), (16,))
    params = {"scale": scale, "bias": bias} if kind == "layer" else {"scale": scale}
    want_y = _layer(kind).apply(params, {}, x, training=True)[0]
    want = jax.grad(lambda p, x: jnp.sum(plain(kind, x, p["scale"], p.get("bias")) * g), (0, 1))(
        params, x
    )
    for name, apply in _front_ends(kind, memory_efficient=True).items():
        np.testing.assert_allclose(apply(params, x), want_y, rtol=1e-6, atol=1e-6, err_msg=name)
        got = jax.grad(lambda p, x, apply=apply: jnp.sum(apply(p, x) * g), (0, 1))(params, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
        # The output-saving VJP is in use: it has no forward mode.
        with pytest.raises(TypeError, match="forward-mode"):
            jax.jvp(lambda x, apply=apply: apply(params, x), (x,), (g,))
    for apply in _front_ends(kind, memory_efficient=False).values():
        jax.jvp(lambda x, apply=apply: apply(params, x), (x,), (g,))  # plain: forward mode works


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_group_norm_memory_efficient_gradients_equal_plain(masked):
    x, scale, bias, g = inputs((2, 5, 5, 8), (8,))
    mask = None
    if masked:
        mask = jnp.asarray(np.random.default_rng(2).random((2, 5, 5, 1)) < 0.7)
    params = {"scale": scale, "bias": bias}

    def grads_of(memory_efficient):
        norm = bn_jax.GroupNorm(num_groups=2, memory_efficient=memory_efficient)

        def loss(p, x):
            return jnp.sum(norm.apply(p, {}, x, training=True, mask=mask)[0] * g)

        return jax.jit(jax.grad(loss, (0, 1)))(params, x)

    got, want = grads_of(True), grads_of(False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="forward-mode"):
        norm = bn_jax.GroupNorm(num_groups=2, memory_efficient=True)
        jax.jvp(lambda x: norm.apply(params, {}, x, training=True)[0], (x,), (g,))
