"""Smoke test of ``python -m benchmarks``: tiny sizes, few repeats, structure only.

Timings on a shared CI machine mean nothing, so nothing here asserts one.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from benchmarks import cli, layers, libraries

TINY = ["--shape", "dense=8x16", "--repeats", "2", "--layers", "2", "--no-progress"]


@pytest.fixture(scope="module")
def report():
    # through JSON, as a machine reading --json would see it
    return json.loads(json.dumps(cli.run([*TINY, "--dtype", "float32", "--json"])))


def test_json_report_structure(report):
    assert set(report) >= {"machine", "command", "settings", "bandwidth", "cases", "targets"}
    settings = report["settings"]
    assert set(settings) == {"repeats", "layers", "libraries"}
    assert (settings["repeats"], settings["layers"]) == (2, 2)
    libs = settings["libraries"]
    assert libs[:2] == ["bn_jax", "flax"]
    bw = report["bandwidth"]
    assert bw["bytes_per_s"] == max(bw["read_bytes_per_s"], bw["copy_bytes_per_s"]) > 0
    seen = {(c["mode"], c["workload"]) for c in report["cases"]}
    assert seen == {(m, w) for m in layers.MODES for w in layers.WORKLOADS}
    for c in report["cases"]:
        assert c["shape"] == [8, 16] and c["dtype"] == "float32"
        assert c["layers"] == (2 if c["mode"] == "network" else 1)
        assert set(c["times_ms"]) == set(libs)
        for v in [*c["times_ms"].values(), c["floor_ms"], c["bound_ms"], c["minimal_ms"]]:
            assert math.isfinite(v) and v > 0
        if c["workload"] == "eval":  # the floor is eval's fewest-pass program
            assert c["minimal_ms"] == c["floor_ms"]
        units = layers.BYTES_UNITS[c["workload"]] * c["layers"] * 8 * 16 * 4
        assert c["bound_ms"] == pytest.approx(1e3 * units / bw["bytes_per_s"])
        if c["workload"] == "fwd+bwd":
            assert set(c["temp_bytes"]) == set(libs)
        else:
            assert c["temp_bytes"] == {}


def test_targets_report_value_limit_and_verdict(report):
    targets = report["targets"]
    names = {t["target"].split("<=")[0] for t in targets}
    assert names == {
        "fwd_vs_flax",
        "fwd+bwd_vs_flax",
        "fwd_vs_fewest_passes",
        "fwd+bwd_vs_fewest_passes",
        "eval_vs_floor",
        "temp_bytes",
    }
    for t in targets:
        assert isinstance(t["met"], bool)
        if t["value"] is not None:
            assert t["met"] == (t["value"] <= t["limit"])
        if not t["target"].startswith("temp_bytes"):
            assert t["fewest_passes"] > 0


def test_text_table(capsys):
    cli.run([*TINY, "--dtype", "bfloat16", "--mode", "single", "--workload", "eval"])
    out = capsys.readouterr().out
    assert "bandwidth:" in out
    cols = ("bn_jax ms", "flax ms", "bn_jax/flax", "minimal ms", "floor ms", "bound ms")
    for col in (*cols, "bn_jax/minimal", "bn_jax/bound"):
        assert col in out
    assert "dense bfloat16" in out and "eval_vs_floor" in out


def test_bad_shape_is_reported():
    with pytest.raises(SystemExit, match="--shape expects NAME=AxBxC"):
        cli.run(["--shape", "oops"])


def test_module_entry_point():
    cmd = [sys.executable, "-m", "benchmarks", "--help"]
    root = pathlib.Path(__file__).resolve().parent.parent
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, cwd=root)
    assert "python -m benchmarks" in out.stdout and "--json" in out.stdout


def test_network_mode_materializes_each_layer_for_gpu():
    """One barrier between each pair of layers, for every library and the floor,
    in the program lowered for CUDA (where XLA would otherwise fuse the chain)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((8, 16))
    n_layers = 3
    for name in ("bn_jax", "flax"):
        lib = libraries.BUILDERS[name](x)
        fn, n = layers.make_workload(lib, "fwd", "network", n_layers)
        params, state = lib.init(x)
        args = ([params] * n, [state] * n, x, x)
        text = jax.export.export(fn, platforms=["cuda"])(*args).mlir_module()
        assert text.count("stablehlo.optimization_barrier") == n_layers - 1, name
    floor, n = layers.make_floor("network", n_layers)
    a = jnp.ones((n, 16))
    text = jax.export.export(floor, platforms=["cuda"])(a, a, x).mlir_module()
    assert text.count("stablehlo.optimization_barrier") == n_layers - 1


def test_milliseconds_keep_three_significant_figures():
    assert [layers._fmt_ms(v) for v in (0.6604, 4.637, 95.43, None)] == [
        "0.660",
        "4.64",
        "95.4",
        "-",
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("other", ["equinox", "haiku"])
def test_optional_adapters_normalize_like_bn_jax(other, dtype):
    """The benchmark's Equinox and Haiku adapters compute the same training-mode
    BatchNorm (so their timings compare like with like), in bfloat16 too."""
    pytest.importorskip(other)
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = (3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 3, 3, 8))).astype(dtype)
    outs = {}
    for name in ("bn_jax", other):
        lib = libraries.BUILDERS[name](x)
        params, state = lib.init(x)
        y, _ = jax.jit(lambda p, s, x, lib=lib: lib.apply(p, s, x, True))(params, state, x)
        assert y.shape == x.shape
        outs[name] = np.asarray(y.astype(jnp.float32))
    tol = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(outs[other], outs["bn_jax"], rtol=tol, atol=tol)


@pytest.mark.parametrize("workload", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("mode", ["single", "network"])
def test_minimal_program_makes_the_fewest_passes(workload, mode):
    """The fewest-pass reference: per layer 2 reductions forward (+2 backward) and
    nothing else full-size written but each layer's output (and dx)."""
    import re

    import jax
    import jax.numpy as jnp

    x = jnp.ones((64, 32))
    fn = layers.make_minimal(workload, mode, layers=3)
    n_layers = 3 if mode == "network" else 1
    y, stats = fn(x, x)
    assert y.shape == x.shape and y.dtype == x.dtype and len(stats) == n_layers
    text = jax.jit(fn).lower(x, x).as_text()
    per_layer = 2 if workload == "fwd" else 4
    assert len(re.findall(r"stablehlo.reduce\b", text)) == per_layer * n_layers
    assert layers.make_minimal("eval", mode, 3) is None


def test_models_report_structure():
    """``--models`` on the tiny MLP row: one entry per library and metric, through JSON."""
    from benchmarks import models as bench_models

    argv = ["--models", "--tiny", "--model", "bn_mlp", "--repeats", "1", "--compiles", "1"]
    report = json.loads(json.dumps(cli.run([*argv, "--json"])))
    assert report["settings"] == {
        "repeats": 1,
        "compiles": 1,
        "tiny": True,
        "libraries": ["bn_jax", "flax"],
    }
    (row,) = report["models"]
    assert row["model"] == "bn_mlp" and row["input_shape"] == [16, 32]
    fields = ("step_ms", "compile_s", "compile_cpu_s", "temp_bytes", "hlo_ops", "stablehlo_ops")
    for field in fields:
        assert set(row[field]) == {"bn_jax", "flax"}, field
        for v in row[field].values():
            assert v is None or v > 0, (field, v)
    result = bench_models.ModelResult(**{**row, "input_shape": tuple(row["input_shape"])})
    table = bench_models.format_models([result], ["bn_jax", "flax"])
    labels = ("step ms", "compile s", "compile CPU s", "temp MiB", "HLO ops", "StableHLO ops")
    for label in (*labels, "bn_jax/flax"):
        assert label in table


def test_model_registry_builds_every_row_with_each_library():
    """Each registered model, tiny, gives logits for its labels with bn_jax's drop-in,
    Flax's layer and no normalization; the two libraries' variables have the same tree."""
    import jax

    from benchmarks import models as bench_models

    assert {"resnet18", "resnet50", "bn_mlp"} <= set(bench_models.MODELS)
    for name, builder in bench_models.MODELS.items():
        trees = {}
        for lib in bench_models.MODEL_LIBRARIES:
            m = builder(lib, True)
            variables = jax.eval_shape(
                lambda m=m: m.module.init(jax.random.key(0), m.x, train=False)
            )
            logits = jax.eval_shape(lambda v, m=m: m.module.apply(v, m.x, train=False), variables)
            assert logits.shape[0] == m.labels.shape[0], (name, lib)
            trees[lib] = jax.tree.structure(variables)
        assert trees["bn_jax"] == trees["flax"], name
    with pytest.raises(SystemExit, match="unknown models"):
        cli.run(["--models", "--model", "nope"])
