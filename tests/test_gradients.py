"""Derivatives of training-mode BatchNorm: values, higher orders, residuals.

Every value is checked against JAX autodiff of a plain formula
(``tests/reference.py::plain_bn``, no bn_jax code), so the custom JVP and its
transposed (fused) backward are compared with an independent derivative. The
shape of the compiled backward pass is pinned in
``tests/test_compiler_contract.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import bn_jax
from bn_jax._core.normalize import StatsConfig, batch_normalize
from tests import reference as ref
from tests.devices import require_devices

EPS = 1e-5


def bn_y(x, scale, bias, *, axis, mask=None):
    params = {}
    if scale is not None:
        params["scale"] = scale
    if bias is not None:
        params["bias"] = bias
    norm = bn_jax.BatchNorm(axis=axis, use_scale=scale is not None, use_bias=bias is not None)
    _, state = norm.init(x)
    y, _ = norm.apply(params, state, x, training=True, mask=mask)
    return y


def make_inputs(shape, axis, seed=0, mask_kind=None, use_scale=True, use_bias=True):
    rng = np.random.default_rng(seed)
    axes = (axis,) if isinstance(axis, int) else axis
    fshape = tuple(shape[a] for a in axes)
    x = jnp.asarray(1.5 + 2.0 * rng.standard_normal(shape), jnp.float32)
    scale = jnp.asarray(1.0 + 0.5 * rng.standard_normal(fshape), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(fshape), jnp.float32)
    mask = None
    if mask_kind == "rows":  # padding-style mask over the leading (batch) axis
        m = np.ones((shape[0],) + (1,) * (len(shape) - 1), bool)
        m[-2:] = False
        mask = jnp.asarray(m)
    elif mask_kind == "full":
        m = rng.random(shape) < 0.7
        m.reshape(-1)[: int(np.prod(fshape)) * 4] = True  # keep every channel populated
        mask = jnp.asarray(m)
    return (
        x,
        scale if use_scale else None,
        bias if use_bias else None,
        mask,
        jnp.asarray(rng.standard_normal(shape), jnp.float32),  # W of the loss sum(y * W)
    )


CASES = [
    # shape, axis, mask, use_scale, use_bias
    ((6, 5), -1, None, True, True),
    ((4, 3, 5), 1, None, True, True),
    ((3, 4, 4, 6), -1, None, True, True),  # NHWC
    ((3, 5, 4, 4), 1, None, True, True),  # NCHW
    ((2, 3, 2, 3, 4), (1, -1), None, True, True),  # rank 5, two feature axes
    ((8, 5), -1, "rows", True, True),
    ((3, 4, 4, 6), -1, "full", True, True),
    ((3, 5, 4, 4), 1, "rows", True, True),
    ((4, 3, 5), 1, None, False, True),
    ((4, 3, 5), 1, None, True, False),
    ((6, 5), -1, None, False, False),
]


def _ids(case):
    shape, axis, mask, s, b = case
    return f"{'x'.join(map(str, shape))}-ax{axis}-{mask}-s{int(s)}b{int(b)}"


def _loss(fn, axis, mask, w):
    def loss(x, scale, bias):
        return jnp.sum(fn(x, scale, bias, axis=axis, mask=mask) * w)

    return loss


def _assert_tree_close(a, b, rtol=2e-4, atol=2e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_grad_matches_plain_formula(case):
    shape, axis, mask_kind, use_scale, use_bias = case
    x, scale, bias, mask, w = make_inputs(shape, axis, 1, mask_kind, use_scale, use_bias)
    argnums = (0,) + ((1,) if use_scale else ()) + ((2,) if use_bias else ())
    got = jax.jit(jax.grad(_loss(bn_y, axis, mask, w), argnums))(x, scale, bias)
    want = jax.jit(jax.grad(_loss(ref.plain_bn, axis, mask, w), argnums))(x, scale, bias)
    _assert_tree_close(got, want)


def test_grad_of_params_dict_through_apply():
    """The gradient users take: wrt the params dict and x, under jit."""
    x, scale, bias, _, w = make_inputs((5, 3, 3, 4), -1, seed=2)
    norm = bn_jax.BatchNorm()
    _, state = norm.init(4)

    def loss(params, x):
        return jnp.sum(norm.apply(params, state, x, training=True)[0] * w)

    def plain_loss(params, x):
        return jnp.sum(ref.plain_bn(x, params["scale"], params["bias"], axis=-1) * w)

    params = {"scale": scale, "bias": bias}
    got = jax.jit(jax.grad(loss, (0, 1)))(params, x)
    want = jax.jit(jax.grad(plain_loss, (0, 1)))(params, x)
    _assert_tree_close(got, want)


@pytest.mark.parametrize(
    "shape, axis, mask_kind",
    [((6, 3), -1, None), ((3, 2, 2, 2), 1, None), ((6, 3), -1, "rows")],
)
def test_check_grads_second_order(shape, axis, mask_kind):
    x, scale, bias, mask, _ = make_inputs(shape, axis, 3, mask_kind)

    def f(x, scale, bias):
        return bn_y(x, scale, bias, axis=axis, mask=mask)

    check_grads(f, (x, scale, bias), order=2, modes=("fwd", "rev"), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "shape, axis, mask_kind",
    [((6, 4), -1, None), ((3, 4, 3, 3), 1, None), ((8, 4), -1, "rows")],
)
def test_gradient_penalty_matches_plain_formula(shape, axis, mask_kind):
    """Second order in reverse mode: grad of ||d loss / d x||^2 (WGAN-GP style)."""
    x, scale, bias, mask, w = make_inputs(shape, axis, 4, mask_kind)

    def penalty(fn):
        loss = _loss(fn, axis, mask, w)

        def gp(x, scale, bias):
            return jnp.sum(jax.grad(loss)(x, scale, bias) ** 2)

        return gp

    got = jax.jit(jax.grad(penalty(bn_y), (0, 1, 2)))(x, scale, bias)
    want = jax.jit(jax.grad(penalty(ref.plain_bn), (0, 1, 2)))(x, scale, bias)
    _assert_tree_close(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "shape, axis, mask_kind",
    [
        ((6, 5), -1, None),
        ((3, 4, 2, 2), 1, None),
        ((2, 3, 2, 4), (1, 3), None),
        ((8, 5), -1, "rows"),
    ],
)
def test_jvp_matches_plain_formula(shape, axis, mask_kind):
    x, scale, bias, mask, _ = make_inputs(shape, axis, 5, mask_kind)
    rng = np.random.default_rng(6)
    tangents = tuple(
        jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for v in (x, scale, bias)
    )

    def f(fn):
        return lambda x, s, b: fn(x, s, b, axis=axis, mask=mask)

    y, ty = jax.jit(lambda p, t: jax.jvp(f(bn_y), p, t))((x, scale, bias), tangents)
    y_ref, ty_ref = jax.jit(lambda p, t: jax.jvp(f(ref.plain_bn), p, t))((x, scale, bias), tangents)
    _assert_tree_close((y, ty), (y_ref, ty_ref))


def test_jacfwd_equals_jacrev_and_plain_formula():
    axis = 1
    x, scale, bias, _, _ = make_inputs((3, 2, 2), axis, 7)

    def f(fn):
        return lambda x: fn(x, scale, bias, axis=axis)

    jf, jr = jax.jit(lambda x: (jax.jacfwd(f(bn_y))(x), jax.jacrev(f(bn_y))(x)))(x)
    want = jax.jit(jax.jacfwd(f(ref.plain_bn)))(x)
    _assert_tree_close(jf, want)
    _assert_tree_close(jr, want)


def test_hessian_matches_plain_formula():
    x, scale, bias, _, w = make_inputs((4, 2), -1, 8)
    got = jax.jit(jax.hessian(_loss(bn_y, -1, None, w)))(x, scale, bias)
    want = jax.jit(jax.hessian(_loss(ref.plain_bn, -1, None, w)))(x, scale, bias)
    _assert_tree_close(got, want, rtol=1e-3, atol=1e-4)


def test_batch_mean_and_var_tangents_are_exact():
    """The core returns differentiable batch statistics (BatchRenorm uses them)."""
    x, _, _, _, _ = make_inputs((6, 4), -1, 9)
    cfg = StatsConfig(axes=(0,), epsilon=EPS, out_dtype=jnp.dtype(jnp.float32))
    tx = jnp.asarray(np.random.default_rng(10).standard_normal(x.shape), jnp.float32)

    def core(x):
        _, mean, var, _ = batch_normalize(x, None, None, None, cfg)
        return mean, var

    def plain(x):
        mean = jnp.mean(x, 0, keepdims=True)
        return mean, jnp.mean((x - mean) ** 2, 0, keepdims=True)

    _assert_tree_close(jax.jvp(core, (x,), (tx,)), jax.jvp(plain, (x,), (tx,)))
    g = jnp.ones((1, 4))
    _assert_tree_close(jax.vjp(core, x)[1]((g, 2 * g)), jax.vjp(plain, x)[1]((g, 2 * g)), atol=1e-4)


def test_shard_map_gradient_is_that_of_the_global_batch():
    """Across devices: the gradient of a sharded loss equals that of the whole batch
    on one device (the collectives it takes: tests/test_compiler_contract.py)."""
    require_devices(8)
    mesh = jax.make_mesh((8,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    c = 6
    x, scale, bias, _, w = make_inputs((16, 3, c), -1, 15)
    norm = bn_jax.BatchNorm(axis_name="b")
    _, state = norm.init(c)

    def loss(params, x):
        f = jax.shard_map(
            lambda p, x: norm.apply(p, state, x, training=True)[0],
            mesh=mesh,
            in_specs=(P(), P("b")),
            out_specs=P("b"),
        )
        return jnp.sum(f(params, x) * w)

    def plain_loss(params, x):
        return jnp.sum(ref.plain_bn(x, params["scale"], params["bias"], axis=-1) * w)

    params = {"scale": scale, "bias": bias}
    grad = jax.jit(jax.grad(loss, (0, 1)))
    _assert_tree_close(grad(params, x), jax.grad(plain_loss, (0, 1))(params, x))


def test_backward_keeps_x_not_x_hat():
    """Reverse mode saves x and per-channel statistics only: among the residuals of
    the linearized function, exactly one array has the activation's shape (x)."""
    shape = (4, 3, 3, 5)
    x, scale, bias, _, _ = make_inputs(shape, -1, 16)

    def residuals(fn):
        f_vjp = jax.vjp(lambda x, s, b: fn(x, s, b, axis=-1), x, scale, bias)[1]
        return jax.tree.leaves(f_vjp)

    big = [v for v in jax.jit(lambda: residuals(bn_y))() if v.shape == shape]
    assert len(big) == 1
    np.testing.assert_array_equal(big[0], x)
    plain = jax.jit(lambda: residuals(ref.plain_bn))()
    assert sum(v.shape == shape for v in plain) > 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_pullback_matches_float64(dtype):
    """Low-precision input and cotangent: dx within the dtype's rounding, and the
    parameter gradients (per-channel sums) to float32 accuracy: the cotangent is
    converted exactly and summed in float32, never in the low precision."""
    x, scale, bias, _, g = make_inputs((8, 6, 6, 16), -1, 21)
    x, g = x.astype(dtype), g.astype(dtype)
    y, pullback = jax.vjp(lambda x, s, b: bn_y(x, s, b, axis=-1), x, scale, bias)
    assert y.dtype == jnp.dtype(dtype)
    dx, dscale, dbias = jax.jit(pullback)(g)
    assert dx.dtype == jnp.dtype(dtype) and dscale.dtype == jnp.float32
    want_dx, want_dscale, want_dbias = ref.bn_train_vjp(x.astype(jnp.float32), scale, g, eps=EPS)
    np.testing.assert_allclose(dbias, want_dbias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dscale, want_dscale, rtol=1e-5, atol=1e-4)
    ulp = float(jnp.finfo(dtype).eps)
    err = np.abs(np.asarray(dx, np.float64) - want_dx) / np.abs(want_dx).max()
    assert err.max() < 2 * ulp, err.max()


def test_low_precision_forward_mode_tangent_matches_float64():
    """Forward mode in bfloat16 rounds the two full-size tangent terms before
    adding them: still within a few bfloat16 ulps of the float64 tangent."""
    x, scale, bias, _, dx = make_inputs((8, 6, 6, 16), -1, 22)
    x, dx = x.astype(jnp.bfloat16), dx.astype(jnp.bfloat16)
    f = lambda x: bn_y(x, scale, bias, axis=-1)
    _, tangent = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, dx)
    # the Jacobian of the normalization wrt x is symmetric per channel, so the
    # tangent for dx is the pullback's dx for the cotangent dx
    want = ref.bn_train_vjp(x.astype(jnp.float32), scale, dx, eps=EPS)[0]
    err = np.abs(np.asarray(tangent, np.float64) - want) / np.abs(want).max()
    assert err.max() < 4 * float(jnp.finfo(jnp.bfloat16).eps), err.max()


def test_bf16_gradients_close_to_float32():
    x, scale, bias, _, w = make_inputs((4, 4, 4, 8), -1, 17)
    loss = _loss(bn_y, -1, None, w)
    g32 = jax.jit(jax.grad(loss, (0, 1, 2)))(x, scale, bias)
    loss16 = lambda x, s, b: loss(x.astype(jnp.bfloat16), s, b).astype(jnp.float32)
    g16 = jax.jit(jax.grad(loss16, (0, 1, 2)))(x, scale, bias)
    assert g16[0].dtype == jnp.float32  # grad wrt the float32 input before the cast
    for a, b in zip(g16, g32, strict=True):
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(b))))
