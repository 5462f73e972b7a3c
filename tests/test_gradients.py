"""Derivatives of training-mode BatchNorm: values, higher orders, structure.

Every value is checked against JAX autodiff of a plain formula written here
(no bn_jax code), so the custom JVP and its transposed (fused) backward are
compared with an independent derivative. The structural tests pin the shape of
the compiled backward pass: two reductions over the activations and one
elementwise pass, one all-reduce across devices.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import bn_jax
from bn_jax._core.normalize import StatsConfig, batch_normalize
from tests import reference as ref
from tests.devices import cpu_only, require_devices

EPS = 1e-5


def plain_bn(x, scale, bias, *, axis, mask=None, eps=EPS):
    """Training-mode BatchNorm as a textbook formula (autodiff does the rest)."""
    axes = (axis,) if isinstance(axis, int) else axis
    feat = {a % x.ndim for a in axes}
    red = tuple(i for i in range(x.ndim) if i not in feat)
    w = jnp.ones(x.shape) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    n = jnp.sum(w, red, keepdims=True)
    mean = jnp.sum(w * x, red, keepdims=True) / n
    var = jnp.sum(w * (x - mean) ** 2, red, keepdims=True) / n
    y = (x - mean) / jnp.sqrt(var + eps)
    shape = [x.shape[i] if i in feat else 1 for i in range(x.ndim)]
    if scale is not None:
        y = y * scale.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


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
    want = jax.jit(jax.grad(_loss(plain_bn, axis, mask, w), argnums))(x, scale, bias)
    _assert_tree_close(got, want)


def test_grad_of_params_dict_through_apply():
    """The gradient users take: wrt the params dict and x, under jit."""
    x, scale, bias, _, w = make_inputs((5, 3, 3, 4), -1, seed=2)
    norm = bn_jax.BatchNorm()
    _, state = norm.init(4)

    def loss(params, x):
        return jnp.sum(norm.apply(params, state, x, training=True)[0] * w)

    def ref(params, x):
        return jnp.sum(plain_bn(x, params["scale"], params["bias"], axis=-1) * w)

    params = {"scale": scale, "bias": bias}
    got = jax.jit(jax.grad(loss, (0, 1)))(params, x)
    want = jax.jit(jax.grad(ref, (0, 1)))(params, x)
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
    want = jax.jit(jax.grad(penalty(plain_bn), (0, 1, 2)))(x, scale, bias)
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
    y_ref, ty_ref = jax.jit(lambda p, t: jax.jvp(f(plain_bn), p, t))((x, scale, bias), tangents)
    _assert_tree_close((y, ty), (y_ref, ty_ref))


def test_jacfwd_equals_jacrev_and_plain_formula():
    axis = 1
    x, scale, bias, _, _ = make_inputs((3, 2, 2), axis, 7)

    def f(fn):
        return lambda x: fn(x, scale, bias, axis=axis)

    jf, jr = jax.jit(lambda x: (jax.jacfwd(f(bn_y))(x), jax.jacrev(f(bn_y))(x)))(x)
    ref = jax.jit(jax.jacfwd(f(plain_bn)))(x)
    _assert_tree_close(jf, ref)
    _assert_tree_close(jr, ref)


def test_hessian_matches_plain_formula():
    x, scale, bias, _, w = make_inputs((4, 2), -1, 8)
    got = jax.jit(jax.hessian(_loss(bn_y, -1, None, w)))(x, scale, bias)
    want = jax.jit(jax.hessian(_loss(plain_bn, -1, None, w)))(x, scale, bias)
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


# ----------------------------------------------------------------------------- structure

SHAPE = (32, 8, 8, 16)  # NHWC, features last


def _vjp_fn(fn):
    def f(x, scale, bias, g):
        _, pullback = jax.vjp(lambda x, s, b: fn(x, s, b, axis=-1), x, scale, bias)
        return pullback(g)

    return f


def _count_big_reductions(jaxpr, shape) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.shape == shape:
            n += 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_big_reductions(inner, shape)
    return n


def test_backward_jaxpr_has_two_reductions():
    """Forward statistics (2) plus the fused backward (2): autodiff of the forward
    formula needs more, which this count would catch."""
    x, scale, bias, _, g = make_inputs(SHAPE, -1, 11)
    ours = jax.make_jaxpr(_vjp_fn(bn_y))(x, scale, bias, g).jaxpr
    plain = jax.make_jaxpr(_vjp_fn(plain_bn))(x, scale, bias, g).jaxpr
    assert _count_big_reductions(ours, SHAPE) == 4
    assert _count_big_reductions(plain, SHAPE) > 4  # the counter sees autodiff's extra sums


def _hlo_passes(text: str, shape) -> tuple[int, int]:
    """(reduce ops anywhere, non-parameter values of ``shape`` in the entry computation)."""
    reduces = len(re.findall(r" reduce\(", text))
    entry = text.split("ENTRY", 1)[1]
    dims = ",".join(map(str, shape))
    big = [
        line
        for line in entry.splitlines()
        if " = " in line
        and re.match(rf"\s*[a-z0-9]+\[{dims}\]", line.split(" = ", 1)[1])
        and "parameter(" not in line
    ]
    return reduces, len(big)


@cpu_only
def test_compiled_backward_is_two_reductions_and_one_elementwise_pass():
    """Optimized HLO of the pullback: 2 + 2 reductions and dx as the only full-size
    array written: x_hat (and x - shift) are recomputed inside the passes, not stored."""
    x, scale, bias, _, g = make_inputs(SHAPE, -1, 12)
    ours = jax.jit(_vjp_fn(bn_y)).lower(x, scale, bias, g).compile().as_text()
    plain = jax.jit(_vjp_fn(plain_bn)).lower(x, scale, bias, g).compile().as_text()
    assert _hlo_passes(ours, SHAPE) == (4, 1)
    reduces, big = _hlo_passes(plain, SHAPE)
    assert reduces > 4 and big > 1  # what a regression to autodiff-of-forward looks like


@cpu_only
def test_compiled_training_forward_is_two_reductions_and_one_pass():
    x, scale, bias, _, _ = make_inputs(SHAPE, -1, 13)
    fwd = jax.jit(lambda x, s, b: bn_y(x, s, b, axis=-1))
    assert _hlo_passes(fwd.lower(x, scale, bias).compile().as_text(), SHAPE) == (2, 1)


def test_private_copies_are_lowered_on_cpu_only():
    """The optimization barriers that keep XLA:CPU's passes apart split fusions on
    GPU (twice the forward time on an H100): lowered for CUDA, the program has
    none (``jax.checkpoint`` runs with ``prevent_cse=False``, so it adds none)."""
    x, scale, bias, _, g = make_inputs(SHAPE, -1, 15)
    step = jax.jit(_vjp_fn(bn_y))

    def barriers(platform):
        exported = jax.export.export(step, platforms=[platform])(x, scale, bias, g)
        return exported.mlir_module().count("stablehlo.optimization_barrier")

    assert barriers("cpu") > barriers("cuda") == 0


def test_backward_memory_no_more_than_autodiff():
    x, scale, bias, _, g = make_inputs(SHAPE, -1, 14)

    def temp(fn):
        compiled = jax.jit(_vjp_fn(fn)).lower(x, scale, bias, g).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp(bn_y) <= temp(plain_bn)


def test_shard_map_backward_one_all_reduce_and_correct():
    """Across devices: one all_gather forward, one all-reduce of 2C values backward,
    and the gradient of the whole global batch."""
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

    def ref(params, x):
        return jnp.sum(plain_bn(x, params["scale"], params["bias"], axis=-1) * w)

    params = {"scale": scale, "bias": bias}
    grad = jax.jit(jax.grad(loss, (0, 1)))
    _assert_tree_close(grad(params, x), jax.grad(ref, (0, 1))(params, x))
    text = grad.lower(params, x).compile().as_text()
    gathers = re.findall(r"= (\S+) all-gather\(", text)
    reduces = re.findall(r"= (\([^)]*\)|\S+) all-reduce\(", text)
    assert len(gathers) == 1, gathers
    assert len(reduces) == 1, reduces
    sizes = [
        int(np.prod([int(d) for d in s.split(",") if d]))
        for s in re.findall(r"f32\[([\d,]*)\]", reduces[0])
    ]
    assert sum(sizes) == 2 * c


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
    plain = jax.jit(lambda: residuals(plain_bn))()
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


@cpu_only
def test_compiled_bf16_backward_writes_no_float32_copy():
    """bfloat16: the pullback writes dx (bfloat16) and no full-size float32 array
    (each pass converts the cotangent itself)."""
    x, scale, bias, _, g = make_inputs(SHAPE, -1, 23)
    x, g = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    text = jax.jit(_vjp_fn(bn_y)).lower(x, scale, bias, g).compile().as_text()
    entry = text.split("ENTRY", 1)[1]
    dims = ",".join(map(str, SHAPE))
    written = [
        line.split(" = ", 1)[1].split("[", 1)[0]
        for line in entry.splitlines()
        if " = " in line
        and re.match(rf"\s*[a-z0-9]+\[{dims}\]", line.split(" = ", 1)[1])
        and "parameter(" not in line
    ]
    assert written == ["bf16"], written


def test_bf16_gradients_close_to_float32():
    x, scale, bias, _, w = make_inputs((4, 4, 4, 8), -1, 17)
    loss = _loss(bn_y, -1, None, w)
    g32 = jax.jit(jax.grad(loss, (0, 1, 2)))(x, scale, bias)
    loss16 = lambda x, s, b: loss(x.astype(jnp.bfloat16), s, b).astype(jnp.float32)
    g16 = jax.jit(jax.grad(loss16, (0, 1, 2)))(x, scale, bias)
    assert g16[0].dtype == jnp.float32  # grad wrt the float32 input before the cast
    for a, b in zip(g16, g32, strict=True):
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(b))))
