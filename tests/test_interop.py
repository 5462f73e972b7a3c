"""bn_jax.interop: PyTorch BatchNorm weights <-> bn_jax (params, state)."""

from __future__ import annotations

import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

import bn_jax
from bn_jax import interop
from tests import reference as ref

C = 3


def _torch_like_state_dict(prefix="", affine=True, rng=None):
    rng = rng or np.random.default_rng(0)
    sd = {
        prefix + "running_mean": rng.normal(size=C).astype(np.float32),
        prefix + "running_var": rng.uniform(0.5, 2.0, size=C).astype(np.float32),
        prefix + "num_batches_tracked": np.asarray(7, np.int64),
    }
    if affine:
        sd[prefix + "weight"] = rng.normal(size=C).astype(np.float32)
        sd[prefix + "bias"] = rng.normal(size=C).astype(np.float32)
    return sd


def test_import_pulls_in_neither_torch_nor_flax():
    code = (
        "import sys, bn_jax, bn_jax.interop; "
        "print([m for m in ('torch', 'flax', 'bn_jax.linen', 'bn_jax.nnx') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_momentum_conversion():
    assert interop.momentum_from_torch(0.1) == pytest.approx(0.9)
    assert interop.momentum_to_torch(0.99) == pytest.approx(0.01)
    assert interop.momentum_from_torch(None) is None
    assert interop.momentum_to_torch(interop.momentum_from_torch(0.3)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="momentum"):
        interop.momentum_from_torch(1.5)
    with pytest.raises(TypeError, match="momentum"):
        interop.momentum_from_torch("0.1")


@pytest.mark.parametrize("prefix", ["", "features.1", "features.1."])
def test_round_trip(prefix):
    key_prefix = prefix if prefix in ("", "features.1.") else prefix + "."
    sd = _torch_like_state_dict(key_prefix)
    params, state = interop.from_torch(sd, prefix)
    np.testing.assert_array_equal(params["scale"], sd[key_prefix + "weight"])
    np.testing.assert_array_equal(params["bias"], sd[key_prefix + "bias"])
    np.testing.assert_array_equal(state["mean"], sd[key_prefix + "running_mean"])
    np.testing.assert_array_equal(state["var"], sd[key_prefix + "running_var"])
    assert set(state) == {"mean", "var"}
    back = interop.to_torch(params, state, prefix, num_batches_tracked=7)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    # usable by the core as it is
    x = np.random.default_rng(1).normal(size=(4, C, 2, 2)).astype(np.float32)
    y, _ = bn_jax.BatchNorm(axis=1).apply(params, state, x, training=False)
    want = ref.bn_eval(
        x,
        sd[key_prefix + "running_mean"],
        sd[key_prefix + "running_var"],
        sd[key_prefix + "weight"],
        sd[key_prefix + "bias"],
        axis=1,
    )
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_cumulative_count_and_affine_false():
    sd = _torch_like_state_dict(affine=False)
    params, state = interop.from_torch(sd, cumulative=True)
    assert params == {}
    np.testing.assert_array_equal(state["count"], np.full(C, 7))
    assert state["count"].dtype == np.int32
    back = interop.to_torch(params, state)
    assert "weight" not in back and "bias" not in back
    assert int(back["num_batches_tracked"]) == 7
    # only one of scale/bias: the other gets its neutral value
    only_scale = interop.to_torch({"scale": np.full(C, 2.0, np.float32)}, state)
    np.testing.assert_array_equal(only_scale["bias"], np.zeros(C))


def test_errors_name_the_problem():
    sd = _torch_like_state_dict("bn.")
    with pytest.raises(KeyError, match=r"track_running_stats=False.*bn\.running_mean"):
        interop.from_torch(sd, "other")
    del sd["bn.bias"]
    with pytest.raises(ValueError, match=r"bn\.weight and bn\.bias"):
        interop.from_torch(sd, "bn")
    sd = _torch_like_state_dict()
    sd["weight"] = np.ones(C + 1, np.float32)
    with pytest.raises(ValueError, match=r"weight has shape \(4,\)"):
        interop.from_torch(sd)
    with pytest.raises(KeyError, match="'var'"):
        interop.to_torch({}, {"mean": np.zeros(C)})


def test_whole_model_by_prefix():
    sd = {
        "conv.weight": np.zeros((C, 1, 3, 3), np.float32),
        "conv.bias": np.zeros(C, np.float32),
        **_torch_like_state_dict("layer1.0.bn1.", rng=np.random.default_rng(1)),
        **_torch_like_state_dict("layer1.0.bn2.", affine=False, rng=np.random.default_rng(2)),
        "fc.weight": np.zeros((2, C), np.float32),
    }
    layers = interop.from_torch_model(sd)
    assert set(layers) == {"layer1.0.bn1", "layer1.0.bn2"}
    assert set(layers["layer1.0.bn1"][0]) == {"scale", "bias"}
    assert layers["layer1.0.bn2"][0] == {}
    back = interop.to_torch_model(layers)
    assert set(back) == {k for k in sd if "bn" in k}
    for k, v in back.items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(v, sd[k])
    renamed = interop.from_torch_model(sd, rename=lambda n: n.replace(".", "_"))
    assert set(renamed) == {"layer1_0_bn1", "layer1_0_bn2"}
    with pytest.raises(ValueError, match="rename"):
        interop.from_torch_model(sd, rename=lambda n: "same")


def _batches(n, rng):
    return [(2.0 + 3.0 * rng.normal(size=(4, C, 3, 3))).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("torch_momentum", [0.1, None])
def test_continues_as_pytorch_formula(torch_momentum):
    """Against PyTorch's documented update (float64 NumPy), no torch needed."""
    rng = np.random.default_rng(3)
    sd = _torch_like_state_dict()
    params, state = interop.from_torch(sd, cumulative=torch_momentum is None)
    norm = bn_jax.BatchNorm(
        axis=1, momentum=interop.momentum_from_torch(torch_momentum), unbiased_running_var=True
    )
    apply = jax.jit(lambda s, x: norm.apply(params, s, x, training=True))
    mean, var, k = sd["running_mean"], sd["running_var"], int(sd["num_batches_tracked"])
    for x in _batches(3, rng):
        y_ref, mean, var, k = ref.torch_bn_train_step(
            x, mean, var, sd["weight"], sd["bias"], momentum=torch_momentum, num_batches=k
        )
        y, state = apply(state, x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state["mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["var"], var, rtol=1e-5, atol=1e-6)
    out = interop.to_torch(params, state)
    assert int(out["num_batches_tracked"]) == (k if torch_momentum is None else 0)


# -- against PyTorch itself ------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip(
        "torch",
        reason="torch is not installed (pip install torch==2.13.0, a CPU build); "
        "the comparisons against PyTorch itself are skipped",
    )


def _state_dict(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("torch_momentum", [0.1, None])
def test_batchnorm2d_training_then_eval(torch, torch_momentum):
    torch.manual_seed(0)
    tbn = torch.nn.BatchNorm2d(C, momentum=torch_momentum)
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        tbn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    batches = _batches(5, np.random.default_rng(4))
    tbn.train()
    for x in batches[:2]:  # PyTorch trains alone first ...
        tbn(torch.from_numpy(x))
    params, state = interop.from_torch(_state_dict(tbn), cumulative=torch_momentum is None)
    norm = bn_jax.BatchNorm(
        axis=1,
        momentum=interop.momentum_from_torch(torch_momentum),
        epsilon=tbn.eps,
        unbiased_running_var=True,
    )
    w = np.random.default_rng(5).normal(size=batches[0].shape).astype(np.float32)

    @jax.jit
    def step(params, state, x):
        def loss(params, x):
            y, new_state = norm.apply(params, state, x, training=True)
            return (y * w).sum(), (y, new_state)

        (_, (y, new_state)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, x
        )
        return y, new_state, grads

    for x in batches[2:]:  # ... then both continue from the converted state
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = tbn(xt)
        (yt * torch.from_numpy(w)).sum().backward()
        y, state, (g_params, g_x) = step(params, state, x)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state["mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["var"], tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_x, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g_params["scale"], tbn.weight.grad.numpy(), rtol=1e-4)
        np.testing.assert_allclose(g_params["bias"], tbn.bias.grad.numpy(), rtol=1e-4)
        tbn.zero_grad()

    tbn.eval()
    x = batches[0]
    y_eval, _ = norm.apply(params, state, x, training=False)
    np.testing.assert_allclose(y_eval, tbn(torch.from_numpy(x)).detach().numpy(), atol=1e-5)

    # back into a fresh PyTorch layer: same weights, same eval output
    fresh = torch.nn.BatchNorm2d(C, momentum=torch_momentum)
    fresh.load_state_dict(
        {k: torch.from_numpy(v) for k, v in interop.to_torch(params, state).items()}
    )
    fresh.eval()
    np.testing.assert_allclose(
        fresh(torch.from_numpy(x)).detach().numpy(), np.asarray(y_eval), atol=1e-5
    )
    if torch_momentum is None:
        assert int(fresh.num_batches_tracked) == int(tbn.num_batches_tracked) == 5


def test_whole_torch_model_round_trip(torch):
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(C, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3),
        torch.nn.BatchNorm2d(4, affine=False),
    )
    net.train()
    net(torch.randn(4, C, 6, 6))  # move the running statistics
    sd = _state_dict(net)
    layers = interop.from_torch_model(sd)
    assert set(layers) == {"1", "4"}
    merged = {**sd, **interop.to_torch_model(layers)}
    fresh = torch.nn.Sequential(*(type(m)(*_args(m)) for m in net))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        if k.endswith("num_batches_tracked"):  # only read by momentum=None; not carried
            assert int(v) == 0
        else:
            np.testing.assert_array_equal(v.numpy(), sd[k])
    chex.assert_trees_all_equal(layers["4"][0], {})


def _args(m):
    import torch

    if isinstance(m, torch.nn.Conv2d):
        return (m.in_channels, m.out_channels, m.kernel_size)
    if isinstance(m, torch.nn.BatchNorm2d):
        return (m.num_features, m.eps, m.momentum, m.affine)
    return ()
