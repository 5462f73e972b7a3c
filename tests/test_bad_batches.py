"""Bad batches end to end: NaN and Inf batches injected at random steps of a run.

The guarantee tested here (and stated in ``docs/reliability.md``): with
BatchNorm's guard and ``optax.apply_if_finite``, a training run into which
batches holding a NaN or an Inf are injected ends with finite parameters, and
with parameters, optimizer state and running statistics bit-identical to the run
that never saw those batches; ``count_skipped=True`` counts the dropped updates.
Under ``shard_map`` the bad value sits on one device only. Without the optimizer
guard the running statistics still survive, but the parameters do not. The
stateful ``bn_jax.equinox`` layers (``tests/equinox_face.py``) keep the guard.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bn_jax
from tests import _train, equinox_face, registry
from tests.devices import require_devices

EXAMPLE = Path(__file__).parent.parent / "examples" / "bad_batches.py"
STEPS, BATCH = 50, 32
N_BAD = 6


def bad_run(seed: int, devices: int = 1):
    """The stream with ``N_BAD`` batches poisoned at random steps (one NaN, +Inf or
    -Inf each, on a random row of one device's shard); returns the batches and the
    poisoned step indices."""
    xs, ts = _train.stream(STEPS, BATCH, seed)
    rng = np.random.default_rng(seed + 100)
    bad = sorted(rng.choice(STEPS, N_BAD, replace=False))
    rows_per_device = BATCH // devices
    for i in bad:
        device = rng.integers(devices)
        row = device * rows_per_device + rng.integers(rows_per_device)
        xs[i, row, rng.integers(_train.D_IN)] = rng.choice([np.nan, np.inf, -np.inf])
    return xs, ts, [int(i) for i in bad]


def assert_trees_equal(a, b):
    chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))


def check_bad_batches_are_skipped(mesh, seed):
    trainer = _train.make_trainer(_train.guarded_adam(), mesh, count_skipped=True)
    xs, ts, bad = bad_run(seed, devices=1 if mesh is None else mesh.shape["d"])
    good = [i for i in range(STEPS) if i not in bad]
    start = _train.init(trainer.norm, trainer.optimizer)

    params, opt_state, bn_state = _train.train(trainer, start, xs, ts)
    ref_params, ref_opt, ref_bn = _train.train(trainer, start, xs, ts, steps=good)

    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves((params, bn_state)))
    assert_trees_equal(params, ref_params)
    assert_trees_equal(opt_state.inner_state, ref_opt.inner_state)
    assert int(opt_state.total_notfinite) == N_BAD and int(ref_opt.total_notfinite) == 0
    np.testing.assert_array_equal(bn_state["mean"], ref_bn["mean"])
    np.testing.assert_array_equal(bn_state["var"], ref_bn["var"])
    # every hidden channel saw the bad value (the first dense layer mixes features)
    np.testing.assert_array_equal(bn_state["skipped"], np.full(_train.HIDDEN, N_BAD))
    np.testing.assert_array_equal(ref_bn["skipped"], np.zeros(_train.HIDDEN))
    # and the run did train: the statistics moved away from their start
    assert not np.allclose(bn_state["mean"], 0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_device_run_ends_where_the_clean_run_ends(seed):
    check_bad_batches_are_skipped(None, seed)


def test_shard_map_run_with_the_bad_value_on_one_device():
    require_devices(8)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    check_bad_batches_are_skipped(mesh, seed=2)


def test_without_the_optimizer_guard_only_the_running_statistics_survive():
    trainer = _train.make_trainer(optax.adam(1e-2), count_skipped=True)
    xs, ts, bad = bad_run(seed=3)
    start = _train.init(trainer.norm, trainer.optimizer)
    params, _, bn_state = _train.train(trainer, start, xs, ts, steps=range(bad[0] + 1))
    _, _, ref_bn = _train.train(trainer, start, xs, ts, steps=range(bad[0]))
    assert not np.isfinite(np.asarray(params["w1"])).all()  # NaN reached the weights
    np.testing.assert_array_equal(bn_state["mean"], ref_bn["mean"])  # the stats did not
    np.testing.assert_array_equal(bn_state["var"], ref_bn["var"])
    np.testing.assert_array_equal(bn_state["skipped"], np.ones(_train.HIDDEN))


def test_skipped_counts_only_the_channels_that_saw_the_bad_value():
    norm = bn_jax.BatchNorm(momentum=0.9, count_skipped=True)
    params, state = norm.init(3)
    assert state["skipped"].dtype == jnp.int32 and state["skipped"].shape == (3,)
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    x[2, 1] = np.inf
    mask = np.ones((5, 3), bool)
    mask[:, 2] = False  # channel 2 has no valid element: nothing to skip
    y, new = jax.jit(lambda s, x: norm.apply(params, s, x, training=True, mask=mask))(state, x)
    np.testing.assert_array_equal(new["skipped"], [0, 1, 0])
    np.testing.assert_array_equal(new["mean"][1:], state["mean"][1:])
    np.testing.assert_array_equal(new["var"][1:], state["var"][1:])
    assert not np.array_equal(new["mean"][0], state["mean"][0])
    assert not np.isfinite(np.asarray(y[:, 1])).all()  # the output still shows it


def test_counter_is_opt_in_and_flax_state_loads():
    """Without ``count_skipped`` the state is Flax's; with it, a state lacking the
    counter is refused with a message that says how to build one."""
    plain = bn_jax.BatchNorm()
    _, state = plain.init(4)
    assert set(state) == {"mean", "var"}
    counted = bn_jax.BatchNorm(count_skipped=True)
    params, _ = counted.init(4)
    with pytest.raises(ValueError, match=r"state has keys \['mean', 'var'\] but needs"):
        counted.apply(params, state, jnp.ones((2, 4)), training=True)


def test_example_runs_the_recipe(capsys):
    spec = importlib.util.spec_from_file_location("bad_batches", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--steps", "30", "--bad", "3", "--batch", "16"]) == 0
    out = capsys.readouterr().out
    assert out.count("update skipped") == 3
    assert "parameters and running statistics finite: True" in out
    assert "bit-identical to the run without the bad batches: True" in out
    assert "weights finite: False, running statistics finite: True" in out


EQX_STATEFUL = equinox_face.stateful_variants()


@pytest.mark.parametrize("case", EQX_STATEFUL)
def test_equinox_layer_skips_the_statistics_a_nan_reaches(case):
    """Each stateful bn_jax.equinox layer, called as Equinox users call it: after a
    clean step, a batch with one NaN leaves the statistics it reaches (those an
    inference call normalizes with) unchanged and counts the skip; the others move.
    The NaN sits at time step 0 / spatial position 0 of example 1, feature 1."""
    name, options = EQX_STATEFUL[case]
    layer, state = equinox_face.build(
        name, changes={"momentum": 0.9, "count_skipped": True}, **options
    )
    _, state = equinox_face.apply(name, layer, state, registry.example_x(0))
    before = equinox_face.inference_state(layer, state)
    x = registry.example_x(1)
    x[1, 0, 1] = np.nan
    y, new = equinox_face.apply(name, layer, state, x)
    after = equinox_face.inference_state(layer, new)

    reached = np.zeros(np.shape(before["mean"]), bool)  # (features,) or (max_steps, features)
    reached[(0,) * (reached.ndim - 1) + (1,)] = True
    for key in ("mean", "var"):
        b, a = np.asarray(before[key]), np.asarray(after[key])
        np.testing.assert_allclose(a[reached], b[reached], rtol=1e-6, err_msg=key)
        assert np.all(np.abs(a[~reached] - b[~reached]) > 1e-4), key
    np.testing.assert_array_equal(after["skipped"], reached.astype(np.int32))
    assert np.isnan(np.asarray(y[1, 0, 1]))  # the output still shows it
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(new))
