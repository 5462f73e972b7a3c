"""Cross-device BatchNorm: equals single-device BatchNorm on the concatenated batch.

Every mapping (``shard_map``, ``pmap``, ``vmap``, ``axis_index_groups``, ``jit``
over a batch-sharded global array) is checked against independent references:
float64 NumPy formulas (``tests/reference.py``) for outputs and running
statistics, and ``jax.grad`` of a plain two-pass formula
(``reference.plain_bn``) for the gradients with respect to ``x``, ``scale`` and
``bias``. The collectives the compiled steps take are pinned in
``tests/test_compiler_contract.py``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bn_jax
from tests import reference as ref
from tests import registry
from tests.devices import require_devices

N_DEV = 8
PER_DEV = 4  # rows per device
C = 5
MOMENTUM = 0.9
EPS = 1e-5


@pytest.fixture(scope="module")
def mesh():
    require_devices(N_DEV)
    return jax.make_mesh((N_DEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.fixture(scope="module")
def data():
    """Global batch (32, 3, 5) with per-channel offsets, a cotangent, params, state."""
    kx, kw = jax.random.split(jax.random.key(42))
    x = jax.random.normal(kx, (N_DEV * PER_DEV, 3, C)) * jnp.linspace(0.5, 3.0, C)
    x = x + jnp.linspace(-2.0, 5.0, C)
    w = jax.random.normal(kw, x.shape)  # cotangent: loss = sum(y * w)
    params = {"scale": jnp.linspace(0.5, 1.5, C), "bias": jnp.linspace(-1.0, 1.0, C)}
    state = {"mean": jnp.linspace(-0.1, 0.1, C), "var": jnp.linspace(0.8, 1.2, C)}
    return x, w, params, state


def reference_step(params, state, x, w, mask=None):
    """(y, new_state, (grad_params, grad_x)) of one device on the whole batch."""
    x64 = np.asarray(x, np.float64)
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    y = ref.bn_train(x64, p64["scale"], p64["bias"], eps=EPS, mask=mask)
    mean, var, _ = ref.bn_stats(x64, mask=mask)
    new_state = {
        "mean": ref.ema(state["mean"], mean, MOMENTUM),
        "var": ref.ema(state["var"], var, MOMENTUM),
    }

    def plain_loss(p, x):
        return jnp.sum(ref.plain_bn(x, p["scale"], p["bias"], mask=mask, eps=EPS) * w)

    grads = jax.grad(plain_loss, argnums=(0, 1))(params, x)
    return y, new_state, grads


def bn_step(norm, params, state, x, w, mask=None):
    """Per-device step: output, new state and grads of the local loss sum(y * w)."""

    def loss(p, x):
        y, new_state = norm.apply(p, state, x, training=True, mask=mask)
        return jnp.sum(y * w), (y, new_state)

    (_, (y, new_state)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new_state, grads


def stacked(tree):
    """Adds a leading device axis so that out_specs=P('d') returns one copy per device."""
    return jax.tree.map(lambda a: a[None], tree)


def assert_close(actual, expected, atol, what):
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(e, np.float64), atol=atol, rtol=0, err_msg=what
        ),
        actual,
        expected,
    )


def assert_same_on_every_device(state_per_device):
    """Running statistics are bit-identical across devices (leading device axis)."""
    for k, v in state_per_device.items():
        v = np.asarray(v)
        assert v.shape[0] == N_DEV, (k, v.shape)
        for i in range(1, N_DEV):
            np.testing.assert_array_equal(v[i], v[0], err_msg=f"state[{k!r}] on device {i}")


def check_against_reference(data, y, state_per_device, grads, mask=None):
    x, w, params, state = data
    y_ref, state_ref, (gp_ref, gx_ref) = reference_step(params, state, x, w, mask)
    gp, gx = grads
    assert_close(np.reshape(y, x.shape), y_ref, 2e-5, "output")
    assert_close(np.reshape(gx, x.shape), gx_ref, 2e-5, "grad wrt x")
    assert_close(gp, gp_ref, 1e-4, "grad wrt scale/bias")
    assert_same_on_every_device(state_per_device)
    assert_close({k: v[0] for k, v in state_per_device.items()}, state_ref, 1e-6, "running stats")


# ---------------------------------------------------------------- mappings


def test_shard_map_matches_single_device(mesh, data):
    x, w, params, state = data
    norm = bn_jax.BatchNorm(axis_name="d", momentum=MOMENTUM, epsilon=EPS)

    def step(params, state, x, w):
        y, new_state, grads = bn_step(norm, params, state, x, w)
        # Gradients wrt the replicated params come out already summed over
        # devices (shard_map transposes their implicit broadcast into a psum).
        return y, new_state, stacked(new_state), grads

    f = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(), P(), P("d"), P("d")),
            out_specs=(P("d"), P(), P("d"), (P(), P("d"))),
        )
    )
    y, replicated, per_device, grads = f(params, state, x, w)
    check_against_reference(data, y, per_device, grads)
    # out_specs=P() is accepted for the state: it is typed as replicated.
    assert_close(replicated, {k: v[0] for k, v in per_device.items()}, 0.0, "replicated state")


def test_grad_of_global_shard_map_function(mesh, data):
    """jax.grad taken outside shard_map, of the global loss."""
    x, w, params, state = data
    norm = bn_jax.BatchNorm(axis_name="d", momentum=MOMENTUM, epsilon=EPS)
    apply = jax.shard_map(
        lambda p, s, x: norm.apply(p, s, x, training=True),
        mesh=mesh,
        in_specs=(P(), P(), P("d")),
        out_specs=(P("d"), P()),
    )

    @jax.jit
    def f(params, x):
        def loss(p, x):
            y, new_state = apply(p, state, x)
            return jnp.sum(y * w), (y, new_state)

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    (_, (y, new_state)), grads = f(params, x)
    per_device = jax.tree.map(lambda a: np.broadcast_to(a, (N_DEV, *a.shape)), new_state)
    check_against_reference(data, y, per_device, grads)


@pytest.mark.parametrize("transform", ["pmap", "vmap"])
def test_pmap_and_vmap_match_single_device(data, transform):
    x, w, params, state = data
    norm = bn_jax.BatchNorm(axis_name="d", momentum=MOMENTUM, epsilon=EPS)

    def step(params, state, x, w):
        y, new_state, (gp, gx) = bn_step(norm, params, state, x, w)
        return y, new_state, (lax.psum(gp, "d"), gx)  # data-parallel gradient sum

    if transform == "pmap":
        require_devices(N_DEV)
        f = jax.pmap(step, axis_name="d", in_axes=(None, None, 0, 0))
    else:
        f = jax.jit(jax.vmap(step, axis_name="d", in_axes=(None, None, 0, 0)))
    xs, ws = (a.reshape(N_DEV, PER_DEV, *a.shape[1:]) for a in (x, w))
    y, per_device, (gp, gx) = f(params, state, xs, ws)
    gp = jax.tree.map(lambda g: g[0], gp)
    check_against_reference(data, y, per_device, (gp, gx))


@pytest.mark.parametrize(
    "groups",
    [((0, 1, 2, 3), (4, 5, 6, 7)), ((0, 2, 4, 6), (1, 3, 5, 7))],
    ids=["halves", "strided"],
)
@pytest.mark.parametrize("transform", ["shard_map", "pmap"])
def test_axis_index_groups_sync_within_groups(mesh, data, groups, transform):
    x, w, params, state = data
    norm = bn_jax.BatchNorm(axis_name="d", axis_index_groups=groups, momentum=MOMENTUM, epsilon=EPS)

    if transform == "shard_map":
        f = jax.jit(
            jax.shard_map(
                lambda p, s, x, w: stacked(bn_step(norm, p, s, x, w)),
                mesh=mesh,
                in_specs=(P(), P(), P("d"), P("d")),
                out_specs=P("d"),
            )
        )
        y, per_device, (gp, gx) = f(params, state, x, w)
        # the replicated params' gradient was summed over all 8 devices
        gp_total = jax.tree.map(lambda g: g[0], gp)
    else:
        xs, ws = (a.reshape(N_DEV, PER_DEV, *a.shape[1:]) for a in (x, w))
        f = jax.pmap(
            lambda p, s, x, w: bn_step(norm, p, s, x, w), axis_name="d", in_axes=(None, None, 0, 0)
        )
        y, per_device, (gp, gx) = f(params, state, xs, ws)
        gp_total = jax.tree.map(lambda g: g.sum(0), gp)

    y = np.reshape(np.asarray(y), (N_DEV, PER_DEV, *x.shape[1:]))
    gx = np.reshape(np.asarray(gx), y.shape)
    per_device = jax.tree.map(np.asarray, per_device)
    gp_ref_total = jax.tree.map(jnp.zeros_like, params)
    for group in groups:
        rows = np.concatenate([np.arange(d * PER_DEV, (d + 1) * PER_DEV) for d in group])
        y_ref, state_ref, (gp_ref, gx_ref) = reference_step(params, state, x[rows], w[rows])
        gp_ref_total = jax.tree.map(jnp.add, gp_ref_total, gp_ref)
        assert_close(y[list(group)].reshape(y_ref.shape), y_ref, 2e-5, f"output, {group}")
        assert_close(gx[list(group)].reshape(y_ref.shape), gx_ref, 2e-5, f"grad x, {group}")
        for d in group:
            assert_close({k: v[d] for k, v in per_device.items()}, state_ref, 1e-6, f"state {d}")
    assert_close(gp_total, gp_ref_total, 1e-4, "grad wrt scale/bias")


def test_tuple_axis_name_on_2d_mesh(data):
    """A batch sharded over two mesh axes syncs over both, still with one gather."""
    require_devices(N_DEV)
    x, w, params, state = data
    mesh2 = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    norm = bn_jax.BatchNorm(axis_name=("data", "fsdp"), momentum=MOMENTUM, epsilon=EPS)
    rows = P(("data", "fsdp"))
    f = jax.shard_map(
        lambda p, s, x, w: (lambda y, s, g: (y, stacked(s), g))(*bn_step(norm, p, s, x, w)),
        mesh=mesh2,
        in_specs=(P(), P(), rows, rows),
        out_specs=(rows, rows, (P(), rows)),
    )
    y, per_device, grads = jax.jit(f)(params, state, x, w)
    check_against_reference(data, y, per_device, grads)


def test_jit_over_batch_sharded_global_array(mesh, data):
    """No axis_name: jit on a global array sharded over the batch is the global batch."""
    x, w, params, state = data
    norm = bn_jax.BatchNorm(momentum=MOMENTUM, epsilon=EPS)  # axis_name=None
    sharding = NamedSharding(mesh, P("d"))
    xs, ws = jax.device_put(x, sharding), jax.device_put(w, sharding)
    assert len(xs.addressable_shards) == N_DEV
    y, new_state, grads = jax.jit(partial(bn_step, norm))(params, state, xs, ws)
    per_device = jax.tree.map(lambda a: np.broadcast_to(a, (N_DEV, *a.shape)), new_state)
    check_against_reference(data, y, per_device, grads)


def test_mask_with_uneven_valid_counts_is_pooled_by_count(mesh, data):
    """Device 0 has no valid element, the others 1..12 of 12: pooled exactly."""
    x, w, params, state = data
    rng = np.random.default_rng(0)
    mask = np.zeros((N_DEV, PER_DEV, 3, 1), bool)
    for d, n_valid in enumerate([0, 1, 3, 12, 5, 7, 2, 11]):
        mask[d].reshape(-1)[rng.choice(PER_DEV * 3, n_valid, replace=False)] = True
    mask = mask.reshape(N_DEV * PER_DEV, 3, 1)
    norm = bn_jax.BatchNorm(axis_name="d", momentum=MOMENTUM, epsilon=EPS)
    f = jax.jit(
        jax.shard_map(
            lambda p, s, x, w, m: (lambda y, s, g: (y, stacked(s), g))(
                *bn_step(norm, p, s, x, w, m)
            ),
            mesh=mesh,
            in_specs=(P(), P(), P("d"), P("d"), P("d")),
            out_specs=(P("d"), P("d"), (P(), P("d"))),
        )
    )
    y, per_device, grads = f(params, state, x, w, mask)
    check_against_reference(data, y, per_device, grads, mask=mask)
    # an unweighted average of per-device masked means (Flax) would differ
    dev_means = [
        ref.bn_stats(
            x[d * PER_DEV : (d + 1) * PER_DEV], mask=mask[d * PER_DEV : (d + 1) * PER_DEV]
        )[0]
        for d in range(1, N_DEV)
    ]
    naive = ref.ema(state["mean"], np.mean(dev_means, 0), MOMENTUM)
    assert np.abs(np.asarray(per_device["mean"][0]) - naive).max() > 1e-2


def test_large_mean_stays_accurate_across_8_devices(mesh):
    """float32, mean 1e4, std 1, a different offset per device: output std within 1e-3 of 1."""
    offsets = jnp.repeat(jnp.arange(N_DEV, dtype=jnp.float32) * 0.3, 64)[:, None]
    x = 1e4 + offsets + jax.random.normal(jax.random.key(1), (N_DEV * 64, 4))

    def output_std(fast):
        norm = bn_jax.BatchNorm(axis_name="d", use_fast_variance=fast)
        params, state = norm.init(4)
        f = jax.shard_map(
            lambda p, s, x: norm.apply(p, s, x, training=True),
            mesh=mesh,
            in_specs=(P(), P(), P("d")),
            out_specs=(P("d"), P()),
        )
        y, new_state = jax.jit(f)(params, state, x)
        return np.std(np.asarray(y, np.float64), 0), new_state

    std, new_state = output_std(fast=False)
    np.testing.assert_allclose(std, 1.0, atol=1e-3)
    _, var64, _ = ref.bn_stats(x)
    np.testing.assert_allclose(new_state["var"], ref.ema(1.0, var64, 0.99), rtol=1e-4)
    # the textbook E[x^2] - E[x]^2 (use_fast_variance=True) cannot do this
    std_fast, _ = output_std(fast=True)
    assert np.abs(std_fast - 1.0).max() > 1e-2


def test_batch_of_one_per_device_is_allowed(mesh):
    """Single-value check counts devices: 1 row on each of 8 devices is a batch of 8."""
    x = jax.random.normal(jax.random.key(3), (N_DEV, C))
    norm = bn_jax.BatchNorm(axis_name="d", epsilon=EPS)
    params, state = norm.init(C)
    f = jax.vmap(
        lambda x: norm.apply(params, state, x[None], training=True),
        axis_name="d",
        out_axes=(0, None),
    )
    y, _ = jax.jit(f)(x)
    assert_close(y.reshape(x.shape), ref.bn_train(x, eps=EPS), 2e-5, "output")


# ------------------------------------------------------- the whole family


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_normalizer_across_devices_equals_one_device(name):
    """With ``axis_name``, 4 devices that each hold a slice of the input give the
    output and state of one device with the whole input: a slice of the batch
    (data parallel), or of a reduced axis of each example (spatial or sequence
    parallel), as the registry says."""
    require_devices(4)
    entry = registry.NORMALIZERS[name]
    kind, extra = entry.split
    if "momentum" in registry.fields(name):  # running statistics that move a lot
        extra = {**extra, "momentum": 0.5}
    synced, single = entry.build(axis_name="d", **extra), entry.build(**extra)
    params = registry.example_params(single)
    _, state = single.init(registry.C)
    if "mean" in state:  # start from running statistics unlike the batch's
        state = {**state, "mean": state["mean"] + 0.5, "var": state["var"] * 2.0}
    shape, spec = (
        ((16, 3, registry.C), P("d")) if kind == "batch" else ((2, 8, registry.C), P(None, "d"))
    )
    x = registry.example_x(3, shape)
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    f = jax.jit(
        jax.shard_map(
            lambda p, s, x: synced.apply(p, s, x, training=True),
            mesh=mesh,
            in_specs=(P(), P(), spec),
            out_specs=(spec, P()),
        )
    )
    y, new = f(params, state, x)
    y1, new1 = jax.jit(lambda p, s, x: single.apply(p, s, x, training=True))(params, state, x)
    assert_close(y, y1, 1e-5, "output")
    assert_close(new, new1, 1e-5, "state")


# ---------------------------------------------------------------- errors, eval


def test_unbound_axis_name_error(mesh, data):
    x, _, params, state = data
    norm = bn_jax.BatchNorm(axis_name="batch")
    with pytest.raises(ValueError, match=r"axis_name='batch' is not bound") as err:
        norm.apply(params, state, x, training=True)
    for word in ("shard_map", "pmap", "vmap", "axis_name=None"):
        assert word in str(err.value)
    wrong_name = jax.shard_map(
        lambda p, s, x: norm.apply(p, s, x, training=True),
        mesh=mesh,
        in_specs=(P(), P(), P("d")),
        out_specs=(P("d"), P()),
    )
    with pytest.raises(ValueError, match=r"axis_name='batch' is not bound.*shard_map"):
        wrong_name(params, state, x)


def test_eval_never_needs_axis_name(data):
    x, _, params, state = data
    norm = bn_jax.BatchNorm(axis_name="batch", epsilon=EPS)  # not bound anywhere here
    y, same = jax.jit(lambda p, s, x: norm.apply(p, s, x, training=False))(params, state, x)
    y_ref = ref.bn_eval(x, state["mean"], state["var"], params["scale"], params["bias"], eps=EPS)
    assert_close(y, y_ref, 2e-5, "eval output")
    assert_close(same, state, 0.0, "eval state")


# ---------------------------------------------------- several names, nested vmaps


def test_tuple_axis_name_under_nested_vmaps(data):
    """``axis_name=("a", "b")`` under ``vmap(vmap(..., axis_name="b"), axis_name="a")``
    pools the statistics over all 2 x 4 lanes: output, gradients and running
    statistics are those of one device with the whole batch (float64 reference),
    and every lane keeps the same running statistics."""
    x, w, params, state = data
    norm = bn_jax.BatchNorm(axis_name=("a", "b"), momentum=MOMENTUM, epsilon=EPS)

    def step(params, state, x, w):
        y, new_state, (gp, gx) = bn_step(norm, params, state, x, w)
        return y, new_state, (lax.psum(gp, ("a", "b")), gx)

    inner = jax.vmap(step, axis_name="b", in_axes=(None, None, 0, 0))
    f = jax.jit(jax.vmap(inner, axis_name="a", in_axes=(None, None, 0, 0)))
    xs, ws = (a.reshape(2, N_DEV // 2, PER_DEV, *a.shape[1:]) for a in (x, w))
    y, per_lane, (gp, gx) = f(params, state, xs, ws)
    per_device = jax.tree.map(lambda a: a.reshape(N_DEV, *a.shape[2:]), per_lane)
    gp = jax.tree.map(lambda g: g[0, 0], gp)
    check_against_reference(data, y, per_device, (gp, gx))


@pytest.mark.parametrize("wrapped", [False, True], ids=["vmap", "scan-jit-checkpoint-vmap"])
@pytest.mark.parametrize("name", registry.NAMES)
def test_every_normalizer_under_nested_vmaps_equals_one_device(name, wrapped):
    """With ``axis_name=("a", "b")`` under two nested ``vmap``s (2 x 2 lanes, each with
    a slice of the input as the registry says), output, gradients with respect to
    the parameters and the input, and the new state equal one device with the
    whole input; the state comes out unbatched (``out_axes=None``), as Equinox
    models return it. ``wrapped`` puts a ``scan``, a ``jit`` and a ``checkpoint``
    between ``grad`` and the ``vmap``s, where JAX traces derivative rules after the
    vmaps' axes are gone."""
    entry = registry.NORMALIZERS[name]
    kind, extra = entry.split
    if "momentum" in registry.fields(name):
        extra = {**extra, "momentum": 0.5}
    if wrapped and "memory_efficient" in registry.fields(name):
        extra = {**extra, "memory_efficient": True}
    nested, single = entry.build(axis_name=("a", "b"), **extra), entry.build(**extra)
    params = registry.example_params(single)
    _, state = single.init(registry.C)
    if "mean" in state:
        state = {**state, "mean": state["mean"] + 0.5, "var": state["var"] * 2.0}
    shape, axis = ((16, 3, registry.C), 0) if kind == "batch" else ((2, 8, registry.C), 1)
    x = registry.example_x(3, shape)
    w = np.random.default_rng(5).standard_normal(shape).astype(np.float32)  # loss = sum(y * w)
    lanes = (*shape[:axis], 2, 2, -1, *shape[axis + 1 :])

    def run_nested(p, x):
        def lane(x):
            return nested.apply(p, state, x, training=True)

        inner = jax.vmap(lane, in_axes=axis, out_axes=(axis, None), axis_name="b")
        outer = jax.vmap(inner, in_axes=axis, out_axes=(axis, None), axis_name="a")
        if wrapped:
            step = jax.jit(jax.checkpoint(outer))
            _, (y, new) = lax.scan(lambda c, xs: (c, step(xs)), None, x.reshape(1, *lanes))
            y, new = jax.tree.map(lambda a: a[0], (y, new))
        else:
            y, new = outer(x.reshape(lanes))
        return y.reshape(shape), new

    def run_single(p, x):
        return single.apply(p, state, x, training=True)

    def loss(run):
        def f(p, x):
            y, new = run(p, x)
            return jnp.sum(y * w), (y, new)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, (y, new)), grads = loss(run_nested)(params, x)
    (_, (y1, new1)), grads1 = loss(run_single)(params, x)
    assert_close(y, y1, 1e-5, "output")
    assert_close(new, new1, 1e-5, "state")
    assert_close(grads, grads1, 1e-4, "gradients")
