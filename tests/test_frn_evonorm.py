"""FilterResponseNorm, EvoNormB0 and EvoNormS0 against timm's PyTorch layers.

The independent reference is timm's implementation (``timm/layers/
filter_response_norm.py`` and ``evo_norm.py``), run in float64 with torch
autograd for the gradients: outputs, gradients with respect to the input and
every parameter, and B0's running variance over training steps and in
evaluation, for float32 and bfloat16 input, under ``jit``, ``vmap`` with an
``axis_name`` and ``shard_map`` on 8 devices. FRN's learned epsilon, which timm
lacks, is checked against a plain float64 torch formula (itself checked against
timm with the epsilon fixed). The float64 NumPy formulas of
``tests/reference.py`` check the same layers in the registry's contract, fuzz
and cross-device matrices.

timm's package ``__init__`` imports torchvision, which does not import beside
the CPU build of torch in the test environment, so ``make test`` installs timm
without its dependencies and the two layer modules are loaded here on their
own, under a private package name (their relative imports need torch only).
timm reduces its statistics in float32 (``x.float()``) even for float64 input,
so these comparisons hold to float32 precision; the float64 references are the
matrices'.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import bn_jax
from tests import registry
from tests.devices import require_devices

torch = pytest.importorskip("torch")

N, C, H, W = 16, 4, 8, 3  # NCHW, as timm's layers take it
N_DEV = 8
MOMENTUM = 0.9  # timm's momentum=0.1


@functools.cache
def timm_layers() -> types.SimpleNamespace:
    """timm's two layer modules, loaded without running ``timm/__init__.py``."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm is not installed (make test installs it with pip --no-deps)")
    package = "_timm_layers"
    if package not in sys.modules:
        stub = types.ModuleType(package)
        stub.__path__ = [str(pathlib.Path(spec.submodule_search_locations[0]) / "layers")]
        sys.modules[package] = stub
    return types.SimpleNamespace(
        frn=importlib.import_module(f"{package}.filter_response_norm"),
        evo=importlib.import_module(f"{package}.evo_norm"),
    )


# ----------------------------------------------------------------- the layers

# name -> (bn_jax normalizer, timm layer factory, timm's parameter name -> ours)
CASES = {
    "FilterResponseNorm": (
        bn_jax.FilterResponseNorm(feature_axes=1, epsilon=1e-5),
        lambda t: t.frn.FilterResponseNormTlu2d(C, eps=1e-5),
        {"weight": "scale", "bias": "bias", "tau": "tau"},
    ),
    "FilterResponseNorm-no_tlu": (
        bn_jax.FilterResponseNorm(feature_axes=1, epsilon=1e-5, use_tau=False),
        lambda t: t.frn.FilterResponseNormAct2d(C, apply_act=False, eps=1e-5),
        {"weight": "scale", "bias": "bias"},
    ),
    "EvoNormB0": (
        bn_jax.EvoNormB0(axis=1, epsilon=1e-3, momentum=MOMENTUM, unbiased_running_var=True),
        lambda t: t.evo.EvoNorm2dB0(C, eps=1e-3, momentum=1 - MOMENTUM),
        {"weight": "scale", "bias": "bias", "v": "v"},
    ),
    "EvoNormS0": (
        bn_jax.EvoNormS0(num_groups=2, feature_axis=1, epsilon=1e-5),
        lambda t: t.evo.EvoNorm2dS0(C, groups=2, eps=1e-5),
        {"weight": "scale", "bias": "bias", "v": "v"},
    ),
}


def example(seed: int = 0):
    """``x`` (float32, per-channel offset and spread), a cotangent ``g`` and params."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)) * np.linspace(0.5, 2.0, C)[:, None, None]
    x = (x + np.linspace(-1.0, 1.5, C)[:, None, None]).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    params = {
        "scale": 1.0 + 0.3 * rng.standard_normal(C),
        "bias": 0.3 * rng.standard_normal(C),
        "tau": 0.3 * rng.standard_normal(C),  # the TLU clips part of each channel
        "v": 1.0 + 0.3 * rng.standard_normal(C),
    }
    return x, g, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def timm_step(name, params, xs, g, running_var=None):
    """timm's layer in float64: for each input of ``xs`` one training step (in
    order; B0 updates its running variance), then evaluation on the last one.
    Returns ``(y, grads, running_var, y_eval)`` of the last step, with ``grads``
    of ``sum(y * g)`` keyed by our names (``"x"`` for the input)."""
    _, make, names = CASES[name]
    layer = make(timm_layers()).double()
    with torch.no_grad():
        for tname, p in layer.named_parameters():
            p.copy_(torch.tensor(np.asarray(params[names[tname]], np.float64)))
        if running_var is not None:
            layer.running_var.copy_(torch.tensor(np.asarray(running_var, np.float64)))
    layer.train()
    for x in xs:
        layer.zero_grad()
        xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
        y = layer(xt)
        (y * torch.tensor(np.asarray(g, np.float64))).sum().backward()
    grads = {names[n]: p.grad.numpy() for n, p in layer.named_parameters()}
    grads["x"] = xt.grad.numpy()
    layer.eval()
    with torch.no_grad():
        y_eval = layer(torch.tensor(np.asarray(xs[-1], np.float64))).numpy()
    var = layer.running_var.numpy() if hasattr(layer, "running_var") else None
    return y.detach().numpy(), grads, var, y_eval


def used(norm, params):
    """``params`` restricted to the keys ``norm`` uses."""
    return {k: params[k] for k in norm.init(C)[0]}


@functools.cache
def jitted_step(norm):
    """Jitted ``(y, new_state, grads)`` of one training step, grads of ``sum(y * g)``."""

    def loss(p, x, state, g):
        y, new = norm.apply(p, state, x, training=True)
        return jnp.sum(y.astype(jnp.float32) * g), (y, new)

    def step(p, state, x, g):
        (_, (y, new)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x, state, g)
        return y, new, {**gp, "x": gx}

    return jax.jit(step)


@functools.cache
def jitted_eval(norm):
    return jax.jit(lambda p, s, x: norm.apply(p, s, x, training=False)[0])


@functools.cache
def jitted(norm, training):
    """``norm.apply`` under jit (one compile per shape: far cheaper than eager ops)."""
    return jax.jit(lambda p, s, x: norm.apply(p, s, x, training=training))


def assert_close(got, want, rtol, atol, what):
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=rtol, atol=atol, err_msg=what
    )


# Tolerances: float32 rounding of values of order 1-10 (the layers divide by a
# variance, so an error grows with |x| / std); bfloat16: the rounding of the
# output (2**-8 relative) and of bf16 gradients.
TOL = {
    "float32": {"y": (1e-5, 1e-5), "grad": (1e-4, 1e-4), "var": (1e-6, 1e-6)},
    "bfloat16": {"y": (1e-2, 1e-2), "grad": (2e-2, 2e-2), "var": (1e-6, 1e-6)},
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_timm(name, dtype):
    """Two training steps and an evaluation: outputs, gradients of the input and of
    every parameter, and B0's running variance, against timm's layer in float64 on
    the same (rounded) input."""
    norm = CASES[name][0]
    x0, g, params = example(0)
    x1, _, _ = example(1)
    xs = [jnp.asarray(x, dtype) for x in (x0, x1)]
    p = used(norm, params)
    _, state = norm.init(C)
    step = jitted_step(norm)
    for x in xs:
        y, state, grads = step(p, state, x, g)
    y_ref, grads_ref, var_ref, y_eval_ref = timm_step(name, p, xs, g)
    tol = TOL[dtype]
    assert y.dtype == xs[0].dtype and grads["x"].dtype == xs[0].dtype
    assert_close(y, y_ref, *tol["y"], "output")
    scale = {k: 1 + np.abs(v).max() for k, v in grads_ref.items()}  # sums over 16 * 8 * 3
    for k, v in grads_ref.items():
        rtol, atol = tol["grad"]
        assert_close(grads[k], v, rtol, atol * scale[k], f"gradient of {k}")
    assert set(grads) == set(grads_ref)
    if var_ref is not None:
        assert state["var"].dtype == jnp.float32
        assert_close(state["var"], var_ref, *tol["var"], "running variance")
        assert_close(jitted_eval(norm)(p, state, xs[-1]), y_eval_ref, *tol["y"], "evaluation")


# ---------------------------------------------------------------- across devices


def shard_map_step(norm, spec, mesh):
    """One training step under shard_map: the input split by ``spec``, params and
    state replicated (their gradients come back summed over the devices)."""

    def loss(p, x, state, g):
        y, new = norm.apply(p, state, x, training=True)
        return jnp.sum(y * g), (y, new)

    def step(p, state, x, g):
        (_, (y, new)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x, state, g)
        return y, new, gp, gx

    return jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P(), spec, spec), out_specs=(spec, P(), P(), spec)
        )
    )


def vmap_step(norm, in_axis):
    """One training step under vmap over ``in_axis`` of the input, with the
    data-parallel sum of the parameters' gradients."""

    def step(p, state, x, g):
        def loss(p, x):
            y, new = norm.apply(p, state, x, training=True)
            return jnp.sum(y * g), (y, new)

        (_, (y, new)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x)
        return y, new, lax.psum(gp, "d"), gx

    mapped = jax.vmap(
        step, in_axes=(None, None, in_axis, in_axis), out_axes=(in_axis, None, None, in_axis),
        axis_name="d",
    )  # fmt: skip
    return jax.jit(mapped)


@pytest.mark.parametrize("mapping", ["shard_map", "vmap"])
@pytest.mark.parametrize("name", ["FilterResponseNorm", "EvoNormB0", "EvoNormS0"])
def test_across_8_devices_matches_timm_on_the_whole_input(name, mapping):
    """With ``axis_name`` over 8 devices: EvoNormB0 splits the batch (its batch
    variance and running variance are the whole batch's, ``n`` counted over all
    devices); FRN and S0 split the spatial axis H (their statistics are merged over
    the devices). Output, gradients and state equal timm's on the whole input."""
    require_devices(N_DEV)
    norm = CASES[name][0]
    norm = type(norm)(**{**norm.__dict__, "axis_name": "d"})
    x, g, params = example(2)
    p = used(norm, params)
    _, state = norm.init(C)
    axis = 0 if name == "EvoNormB0" else 2
    if mapping == "shard_map":
        mesh = jax.make_mesh((N_DEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
        spec = P("d") if axis == 0 else P(None, None, "d")
        y, new, gp, gx = shard_map_step(norm, spec, mesh)(p, state, x, g)
    else:
        split = (*x.shape[:axis], N_DEV, x.shape[axis] // N_DEV, *x.shape[axis + 1 :])
        y, new, gp, gx = vmap_step(norm, axis)(p, state, x.reshape(split), g.reshape(split))
        y, gx = y.reshape(x.shape), gx.reshape(x.shape)
    y_ref, grads_ref, var_ref, _ = timm_step(name, p, [x], g)
    assert_close(y, y_ref, 1e-5, 1e-5, "output")
    assert_close(gx, grads_ref["x"], 1e-4, 1e-4, "gradient of x")
    for k, v in gp.items():
        assert_close(v, grads_ref[k], 1e-4, 1e-4 * (1 + np.abs(grads_ref[k]).max()), k)
    if var_ref is not None:
        assert_close(new["var"], var_ref, 1e-6, 1e-6, "running variance")


# ------------------------------------------------------------- what timm lacks


def torch_frn(x, scale, bias, tau, eps_learned, eps):
    """FRN + TLU written out in torch (NCHW), with the paper's learned epsilon
    ``eps + |eps_learned|`` when given."""
    view = (1, -1, 1, 1)
    eps = eps if eps_learned is None else eps + eps_learned.abs().view(view)
    y = x * torch.rsqrt(x.square().mean(dim=(2, 3), keepdim=True) + eps)
    return torch.maximum(y * scale.view(view) + bias.view(view), tau.view(view))


def torch_grads(fn, x, g, params):
    """``(y, grads of sum(y * g))`` of ``fn(x, **params)`` in float64 torch."""
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    pt = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in params.items()}
    y = fn(xt, **pt)
    (y * torch.tensor(np.asarray(g, np.float64))).sum().backward()
    return y.detach().numpy(), {"x": xt.grad.numpy(), **{k: v.grad.numpy() for k, v in pt.items()}}


def test_plain_torch_frn_is_timms():
    """The torch formula that checks the learned epsilon is timm's FRN without it (to
    float32 precision: timm takes the mean square in float32 even for float64 input)."""
    x, g, params = example(3)
    p = {k: params[k] for k in ("scale", "bias", "tau")}
    y, grads = torch_grads(lambda x, **p: torch_frn(x, **p, eps_learned=None, eps=1e-5), x, g, p)
    y_ref, grads_ref, _, _ = timm_step("FilterResponseNorm", p, [x], g)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for k, v in grads_ref.items():
        np.testing.assert_allclose(grads[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_learned_epsilon_matches_the_paper(dtype):
    """``epsilon + |eps|`` with a learned ``eps`` (of either sign): output and
    gradients, including that of ``eps``, on a 1x1 map where it matters most."""
    norm = bn_jax.FilterResponseNorm(feature_axes=1, epsilon=1e-6, learned_epsilon=True)
    params, _ = norm.init(C)
    assert np.allclose(params["eps"], 1e-4)  # TensorFlow Addons' starting value
    _, g, p = example(4)
    p = {**{k: p[k] for k in ("scale", "bias", "tau")}, "eps": jnp.array([0.3, -0.1, 2.0, 0.05])}
    x = np.random.default_rng(5).standard_normal((N, C, 1, 1)).astype(np.float32)
    g = g[:, :, :1, :1]
    y, _, grads = jitted_step(norm)(p, {}, jnp.asarray(x, dtype), g)
    y_ref, grads_ref = torch_grads(
        lambda x, eps, **q: torch_frn(x, **q, eps_learned=eps, eps=1e-6), x=np.asarray(
            jnp.asarray(x, dtype), np.float64), g=g, params=p,
    )  # fmt: skip
    tol = TOL[dtype]
    assert_close(y, y_ref, *tol["y"], "output")
    for k, v in grads_ref.items():
        rtol, atol = tol["grad"]
        assert_close(grads[k], v, rtol, atol * (1 + np.abs(v).max()), f"gradient of {k}")


# ---------------------------------------------------------------- conventions


def test_b0_state_and_running_variance_conventions():
    """B0 keeps only a running variance (1 at the start, biased by default, timm's
    n/(n-1) with ``unbiased_running_var``), and evaluation before training uses it."""
    x, _, _ = example(6)
    biased = bn_jax.EvoNormB0(axis=1, momentum=0.5)
    unbiased = bn_jax.EvoNormB0(axis=1, momentum=0.5, unbiased_running_var=True)
    p, state = biased.init(C)
    assert set(p) == {"scale", "bias", "v"} and set(state) == {"var"}
    np.testing.assert_array_equal(state["var"], np.ones(C))
    var = np.asarray(x, np.float64).var(axis=(0, 2, 3))
    n = N * H * W
    _, s_b = jitted(biased, True)(p, state, x)
    _, s_u = jitted(unbiased, True)(p, state, x)
    np.testing.assert_allclose(s_b["var"], 0.5 + 0.5 * var, rtol=1e-5)
    np.testing.assert_allclose(s_u["var"], 0.5 + 0.5 * var * n / (n - 1), rtol=1e-5)
    # evaluation before training: var_b = 1
    y, same = jitted(biased, False)(p, state, x)
    np.testing.assert_array_equal(same["var"], state["var"])
    x64 = np.asarray(x, np.float64)
    inst = np.sqrt(x64.var(axis=(2, 3), keepdims=True) + 1e-5)
    want = x64 / np.maximum(np.sqrt(1 + 1e-5), x64 + inst)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_b0_non_finite_batch_leaves_the_running_variance():
    """A NaN in one channel: that channel keeps its running variance and counts the
    skip; the others update; the output still shows the NaN."""
    norm = bn_jax.EvoNormB0(axis=1, momentum=0.9, count_skipped=True)
    x, _, _ = example(7)
    x = x.copy()
    x[3, 2, 1, 1] = np.nan
    params, state = norm.init(C)
    y, new = jax.jit(lambda p, s, x: norm.apply(p, s, x, training=True))(params, state, x)
    np.testing.assert_array_equal(new["skipped"], [0, 0, 1, 0])
    assert new["var"][2] == 1.0 and np.all(np.asarray(new["var"])[[0, 1, 3]] != 1.0)
    assert np.isnan(np.asarray(y[:, 2])).any() and np.isfinite(np.asarray(y[:, 0])).all()


def test_frn_and_s0_are_per_example():
    """FRN and S0 never look across the batch: an example's output is the same
    alone or in a batch, and training and evaluation agree."""
    x, _, params = example(8)
    for name in ("FilterResponseNorm", "EvoNormS0"):
        norm = CASES[name][0]
        p = used(norm, params)
        y, _ = jitted(norm, True)(p, {}, x)
        y_one, _ = jitted(norm, True)(p, {}, x[5:6])
        y_eval, _ = jitted(norm, False)(p, {}, x)
        np.testing.assert_allclose(y[5:6], y_one, rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(y, y_eval, err_msg=name)


def test_frn_on_dense_features_is_close_to_sign_without_learned_epsilon():
    """On ``[batch, features]`` input (no spatial axes) the mean square is ``x**2``:
    FRN gives ``x / sqrt(x**2 + epsilon)``, nearly ``sign(x)``, the case the paper's
    learned epsilon is for."""
    x = np.array([[2.0, -0.5, 1e-3, 0.0]], np.float32)
    norm = bn_jax.FilterResponseNorm(use_tau=False)
    y, _ = norm.apply(norm.init(4)[0], {}, x, training=True)
    np.testing.assert_allclose(y, x / np.sqrt(x.astype(np.float64) ** 2 + 1e-6), rtol=1e-6)


@pytest.mark.parametrize(
    ("build", "want"),
    [
        (lambda: bn_jax.EvoNormS0(num_groups=3).init(4), r"num_groups=3 does not divide the 4"),
        (
            lambda: bn_jax.EvoNormS0(num_groups=None, group_size=3).init(4),
            r"group_size=3 does not divide the 4 channels",
        ),
        (lambda: bn_jax.EvoNormS0(num_groups=2, group_size=2), r"exactly one of num_groups"),
        (
            lambda: bn_jax.FilterResponseNorm(feature_axes=0).apply(
                {}, {}, jnp.ones((4, 3)), training=True
            ),
            r"feature_axes=0 includes axis 0, the batch axis",
        ),
        (
            lambda: bn_jax.EvoNormB0(axis=(0, 1)).apply(
                *bn_jax.EvoNormB0(axis=(0, 1)).init((4, 3)), jnp.ones((4, 3, 2)), training=True
            ),
            r"axis=\(0, 1\) includes axis 0, the batch axis",
        ),
        (
            lambda: bn_jax.EvoNormS0(num_groups=1, feature_axis=0).apply(
                *bn_jax.EvoNormS0(num_groups=1, feature_axis=0).init(4),
                jnp.ones((4, 3)),
                training=True,
            ),
            r"feature_axis=0 is axis 0, the batch axis",
        ),
        (
            lambda: bn_jax.EvoNormS0(num_groups=2).apply(
                {"scale": jnp.ones(4), "bias": jnp.zeros(4)}, {}, jnp.ones((2, 4)), training=True
            ),
            r"EvoNormS0: params has no 'v' \(keys: \['bias', 'scale'\]\)",
        ),
        (
            lambda: bn_jax.FilterResponseNorm().apply(
                {**bn_jax.FilterResponseNorm().init(4)[0], "tau": jnp.ones(3)},
                {},
                jnp.ones((2, 5, 4)),
                training=True,
            ),
            r"params\['tau'\] has shape \(3,\) but x of shape \(2, 5, 4\) has feature shape",
        ),
    ],
)
def test_errors_name_the_argument(build, want):
    with pytest.raises(ValueError, match=want):
        build()


# ------------------------------------------------------------ Flax layers


def test_flax_layers_use_every_initializer_and_nnx_metadata():
    """Each parameter comes from its own ``*_init`` field (linen and nnx), nnx's
    ``<param>_metadata`` reaches it, and B0's running variance is a ``BatchStat``."""
    from flax import nnx

    from bn_jax import linen as bnn
    from bn_jax import nnx as bnnx

    x = jnp.ones((2, 3, 3, 4))
    const = jax.nn.initializers.constant
    inits = {
        "FilterResponseNorm": {"tau_init": const(0.7), "eps_init": const(0.2)},
        "EvoNormB0": {"v_init": const(2.0)},
        "EvoNormS0": {"v_init": const(3.0), "num_groups": 2},
    }
    extra = {"FilterResponseNorm": {"learned_epsilon": True}, "EvoNormB0": {}, "EvoNormS0": {}}
    for name, kw in inits.items():
        want = {k.removesuffix("_init"): v(None, (4,)) for k, v in kw.items() if "_init" in k}
        module = getattr(bnn, name)(**kw, **extra[name])
        train = {"use_running_average": False} if name == "EvoNormB0" else {}
        variables = module.init(jax.random.key(0), x, **train)
        for k, v in want.items():
            np.testing.assert_array_equal(variables["params"][k], v, err_msg=f"linen {name} {k}")
        metadata = {f"{k}_metadata": {"tag": k} for k in want}
        layer = getattr(bnnx, name)(4, rngs=nnx.Rngs(0), **kw, **extra[name], **metadata)
        for k, v in want.items():
            np.testing.assert_array_equal(getattr(layer, k)[...], v, err_msg=f"nnx {name} {k}")
            assert getattr(layer, k).get_metadata()["tag"] == k
    layer = bnnx.EvoNormB0(4, rngs=nnx.Rngs(0))
    assert set(nnx.state(layer, nnx.BatchStat)) == {"var"}
    assert set(nnx.state(layer, nnx.Param)) == {"scale", "bias", "v"}


# ------------------------------------------------------------ zero-centered scale


ZERO_CENTERED = [
    (name, memory_efficient)
    for name in ("LayerNorm", "RMSNorm")
    for memory_efficient in (False, True)
]


@pytest.mark.parametrize(("name", "memory_efficient"), ZERO_CENTERED)
def test_zero_centered_scale_is_the_plain_layer_with_scale_plus_one(name, memory_efficient):
    """``zero_centered_scale=True`` with stored ``scale`` gives the outputs and the
    gradients (of ``x``, ``scale``, ``bias``) of the plain layer with ``scale + 1``;
    ``init`` stores zeros (the default ``ones`` is the effective scale)."""
    cls = getattr(bn_jax, name)
    centered = cls(zero_centered_scale=True, memory_efficient=memory_efficient)
    plain = cls(memory_efficient=memory_efficient)
    params, _ = centered.init(6)
    np.testing.assert_array_equal(params["scale"], np.zeros(6))
    rng = np.random.default_rng(9)
    params = {k: jnp.asarray(0.4 * rng.standard_normal(6), jnp.float32) for k in params}
    shifted = {**params, "scale": params["scale"] + 1}
    x = jnp.asarray(1.0 + 2.0 * rng.standard_normal((3, 4, 6)), jnp.float32)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def grads(norm, p):
        def loss(p, x):
            return jnp.sum(norm.apply(p, {}, x, training=True)[0] * g)

        return jax.jit(jax.grad(loss, (0, 1)))(p, x)

    (gp_c, gx_c), (gp_p, gx_p) = grads(centered, params), grads(plain, shifted)
    y_c = jitted(centered, True)(params, {}, x)[0]
    y_p = jitted(plain, True)(shifted, {}, x)[0]
    np.testing.assert_array_equal(y_c, y_p)
    entry = registry.NORMALIZERS[name]  # and the float64 formula with 1 + scale
    y_ref, _ = entry.reference(np.asarray(x, np.float64), params, {"zero_centered_scale": True})
    np.testing.assert_allclose(y_c, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx_c, gx_p, rtol=1e-6, atol=1e-6)
    for k in params:
        np.testing.assert_allclose(gp_c[k], gp_p[k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert np.abs(np.asarray(gp_c["scale"])).max() > 0.1  # the gradients are not trivially 0


def test_zero_centered_scale_in_the_flax_layers():
    """The linen and nnx drop-ins store 0 and compute the core's zero-centered layer,
    which a loaded Gemma-style checkpoint (stored scale) then reproduces; an explicit
    ``scale_init`` initializes the stored value as given."""
    from flax import nnx

    from bn_jax import linen as bnn
    from bn_jax import nnx as bnnx

    x = jnp.asarray(np.random.default_rng(10).standard_normal((2, 5)), jnp.float32)
    stored = {"scale": jnp.linspace(-0.5, 0.5, 5)}
    for name in ("LayerNorm", "RMSNorm"):
        core = getattr(bn_jax, name)(zero_centered_scale=True)
        p = {**core.init(5)[0], **stored}
        want = core.apply(p, {}, x, training=True)[0]
        module = getattr(bnn, name)(zero_centered_scale=True)
        variables = module.init(jax.random.key(0), x)
        np.testing.assert_array_equal(variables["params"]["scale"], np.zeros(5))
        got = module.apply({"params": {**variables["params"], **stored}}, x)
        np.testing.assert_array_equal(got, want)
        layer = getattr(bnnx, name)(5, zero_centered_scale=True, rngs=nnx.Rngs(0))
        np.testing.assert_array_equal(layer.scale[...], np.zeros(5))
        layer.scale[...] = stored["scale"]
        np.testing.assert_array_equal(layer(x), want)
        custom = getattr(bnnx, name)(
            5,
            zero_centered_scale=True,
            scale_init=jax.nn.initializers.constant(0.25),
            rngs=nnx.Rngs(0),
        )
        np.testing.assert_array_equal(custom.scale[...], np.full(5, 0.25))
