"""The benchmarks (``python -m benchmarks``, run from a clone) on tiny sizes.

Timings on a shared machine mean nothing, so nothing here asserts one. Where
the benchmark turns times into medians, ratios, bandwidths, bounds or
verdicts, the tests hand it known times and check the result against figures
worked out by hand from the documented definitions.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import cli, layers, libraries, models, timing

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--shape", "dense=8x16", "--repeats", "2", "--layers", "2", "--no-progress"]
# The bytes one layer must move for a float32 8x16 activation (512 bytes), as
# docs/performance.md defines them: a training forward reads x twice and writes
# y (3 x 512); forward and backward add reading x and dy twice and writing dx
# (8 x 512); eval reads x and writes y (2 x 512).
BYTES_8X16_F32 = {"fwd": 1536, "fwd+bwd": 4096, "eval": 1024}
OPTIONAL = [m for m in ("haiku", "equinox") if importlib.util.find_spec(m) is not None]


@pytest.fixture(scope="module")
def report():
    # through JSON, as a machine reading --json would see it
    return json.loads(json.dumps(cli.run([*TINY, "--dtype", "float32", "--json"])))


def _fake_timer(times_s: dict[str, list[float]], seen: list[set[str]]):
    """Stands in for ``time_interleaved``: the given seconds for each call asked."""

    def fake(calls, repeats, warmup=2):
        seen.append(set(calls))
        return {name: times_s[name] for name in calls}

    return fake


def test_json_report_structure(report):
    assert set(report) >= {"machine", "command", "settings", "bandwidth", "cases", "targets"}
    assert report["command"].startswith("python -m benchmarks --shape dense=8x16")
    settings = report["settings"]
    assert settings == {"repeats": 2, "layers": 2, "libraries": ["bn_jax", "flax"]}
    assert report["bandwidth"]["bytes_per_s"] > 0
    seen = {(c["mode"], c["workload"]) for c in report["cases"]}
    assert seen == {(m, w) for m in ("single", "network") for w in ("fwd", "fwd+bwd", "eval")}
    for c in report["cases"]:
        assert c["shape"] == [8, 16] and c["dtype"] == "float32"
        assert c["layers"] == (2 if c["mode"] == "network" else 1)
        assert set(c["times_ms"]) == {"bn_jax", "flax"}
        for v in [*c["times_ms"].values(), c["floor_ms"], c["bound_ms"], c["minimal_ms"]]:
            assert math.isfinite(v) and v > 0
        if c["workload"] == "eval":  # the floor is eval's fewest-pass program
            assert c["minimal_ms"] == c["floor_ms"]
        if c["workload"] == "fwd+bwd":  # compiled temporary memory, reported on CPU
            assert set(c["temp_bytes"]) == {"bn_jax", "flax"}
            assert all(isinstance(v, int) and v > 0 for v in c["temp_bytes"].values())
        else:
            assert c["temp_bytes"] == {}


def test_bound_is_the_bytes_moved_over_the_measured_bandwidth(report):
    bandwidth = report["bandwidth"]["bytes_per_s"]
    for c in report["cases"]:
        moved = BYTES_8X16_F32[c["workload"]] * (2 if c["mode"] == "network" else 1)
        assert c["bound_ms"] == pytest.approx(1e3 * moved / bandwidth), c


def test_bandwidth_from_given_times(monkeypatch):
    """8 passes over a 16x32 float32 array (2048 bytes): the read loop reads it
    8 times, the copy loop reads and writes it 8 times; the better one counts."""
    seen = []
    fake = {"read": [3e-3, 1e-3, 2e-3], "copy": [1e-3, 1e-3, 5e-3]}
    monkeypatch.setattr(layers, "time_interleaved", _fake_timer(fake, seen))
    bw = layers.measure_bandwidth((16, 32), repeats=3, passes=8)
    assert seen == [{"read", "copy"}]
    assert bw["read_bytes_per_s"] == pytest.approx(8 * 2048 / 2e-3)  # 8.192e6
    assert bw["copy_bytes_per_s"] == pytest.approx(16 * 2048 / 1e-3)  # 32.768e6
    assert bw["bytes_per_s"] == pytest.approx(32.768e6)


@pytest.mark.parametrize(
    ("mode", "workload"), [("single", "fwd"), ("network", "fwd+bwd"), ("network", "eval")]
)
def test_run_case_reports_given_times(monkeypatch, mode, workload):
    """Medians in milliseconds under the right names, and the bound at 1 GB/s."""
    seen = []
    fake = {
        "bn_jax": [3e-3, 1e-3, 2e-3],
        "flax": [4e-3, 4e-3, 9e-3],
        "floor": [1e-3, 1e-3, 1e-3],
        "minimal": [1.5e-3, 1e-3, 2e-3],
    }
    monkeypatch.setattr(layers, "time_interleaved", _fake_timer(fake, seen))
    case = layers.run_case(
        "dense",
        (8, 16),
        "float32",
        mode,
        workload,
        libraries=["bn_jax", "flax"],
        layers=2,
        repeats=3,
        bandwidth=1e9,
    )
    n = 2 if mode == "network" else 1
    expected_calls = {"bn_jax", "flax", "floor"} | ({"minimal"} if workload != "eval" else set())
    assert seen == [expected_calls]
    assert case.layers == n
    assert case.times_ms == pytest.approx({"bn_jax": 2.0, "flax": 4.0})
    assert case.floor_ms == pytest.approx(1.0)
    assert case.minimal_ms == pytest.approx(1.0 if workload == "eval" else 1.5)
    # bytes / (1e9 bytes/s), in ms: 1536 bytes -> 1.536e-3 ms
    assert case.bound_ms == pytest.approx(BYTES_8X16_F32[workload] * n * 1e-6)


def _case(workload, times_ms, minimal_ms, floor_ms, temp_bytes=None):
    """A single-layer dense float32 case with a 0.5 ms bound."""
    return layers.Case(
        shape_name="dense",
        shape=(8, 16),
        dtype="float32",
        mode="single",
        workload=workload,
        layers=1,
        times_ms=times_ms,
        floor_ms=floor_ms,
        bound_ms=0.5,
        temp_bytes=temp_bytes or {},
        minimal_ms=minimal_ms,
    )


FAKE_CASES = [
    _case("fwd", {"bn_jax": 1.0, "flax": 0.9}, minimal_ms=0.95, floor_ms=0.5),
    _case(
        "fwd+bwd",
        {"bn_jax": 2.0, "flax": 2.5},
        minimal_ms=1.6,
        floor_ms=0.5,
        temp_bytes={"bn_jax": 2**20, "flax": 2 * 2**20},
    ),
    _case("eval", {"bn_jax": 1.1, "flax": 1.0}, minimal_ms=1.0, floor_ms=1.0),
    _case("fwd", {"flax": 1.0}, minimal_ms=1.0, floor_ms=1.0),  # no bn_jax: no targets
]


def test_targets_from_given_times():
    """Each target's ratio, limit and verdict, worked out by hand."""
    targets = layers.summarize_targets(FAKE_CASES)
    got = {
        (t["case"].split()[-1], t["target"]): (t["value"], t["met"], t.get("fewest_passes"))
        for t in targets
    }
    assert len(targets) == len(got) == 6
    assert got == {
        ("fwd", "fwd_vs_flax<=1.0"): (pytest.approx(1.0 / 0.9), False, pytest.approx(0.95 / 0.9)),
        ("fwd", "fwd_vs_fewest_passes<=1.15"): (pytest.approx(1.0 / 0.95), True, 1.0),
        ("fwd+bwd", "fwd+bwd_vs_flax<=1.0"): (pytest.approx(0.8), True, pytest.approx(0.64)),
        ("fwd+bwd", "fwd+bwd_vs_fewest_passes<=1.15"): (pytest.approx(1.25), False, 1.0),
        ("fwd+bwd", "temp_bytes<=flax"): (2**20, True, None),
        ("eval", "eval_vs_floor<=1.05"): (pytest.approx(1.1), False, 1.0),
    }


def _table(text: str) -> list[dict[str, str]]:
    """The rows of an aligned text table (columns apart by two or more spaces)."""
    lines = [line for line in text.splitlines() if line.strip()]
    head = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(head, re.split(r"\s{2,}", line.strip()), strict=True)) for line in lines[2:]]


def test_table_ratios_from_given_times():
    table, _, memory = layers.format_table(FAKE_CASES, ["bn_jax", "flax"]).partition("\n\n")
    fwd, bwd, ev, no_bn = _table(table)
    assert fwd["case"] == "dense float32" and fwd["mode"] == "singlex1"
    assert (fwd["bn_jax ms"], fwd["flax ms"], fwd["bn_jax/flax"]) == ("1.00", "0.900", "1.11")
    assert (fwd["bn_jax/minimal"], fwd["bn_jax/floor"]) == ("1.05", "2.00")
    assert (fwd["bound ms"], fwd["bn_jax/bound"], fwd["flax/bound"]) == ("0.500", "2.00", "1.80")
    assert (bwd["bn_jax/flax"], bwd["bn_jax/minimal"]) == ("0.80", "1.25")
    assert (ev["bn_jax/flax"], ev["bn_jax/floor"]) == ("1.10", "1.10")
    assert (no_bn["bn_jax ms"], no_bn["bn_jax/flax"], no_bn["flax/bound"]) == ("-", "-", "2.00")
    assert memory.splitlines() == [
        "compiled temp memory of fwd+bwd (MiB): bn_jax, flax",
        "  dense float32 singlex1: 1.00  2.00",
    ]


def test_text_report_has_a_column_for_each_library(capsys):
    libs = ["bn_jax", "flax", *OPTIONAL]
    argv = [*TINY, "--dtype", "bfloat16", "--mode", "single", "--workload", "eval"]
    cli.run([*argv, *(a for lib in libs for a in ("--library", lib))])
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "\nbandwidth: " in out
    rows = _table(out.split("\n\n")[1])
    assert len(rows) == 1 and rows[0]["case"] == "dense bfloat16"
    for lib in libs:
        assert float(rows[0][f"{lib} ms"]) > 0
        if lib != "bn_jax":
            assert float(rows[0][f"bn_jax/{lib}"]) > 0
    assert "dense bfloat16 single eval: eval_vs_floor<=1.05" in out


def test_bad_arguments_are_reported():
    with pytest.raises(SystemExit, match="--shape expects NAME=AxBxC"):
        cli.run(["--shape", "oops"])
    with pytest.raises(SystemExit, match=r"unknown or unavailable libraries \['nope'\]"):
        cli.run(["--library", "nope"])


def test_module_entry_point_from_the_repository_root():
    cmd = [sys.executable, "-m", "benchmarks", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, cwd=ROOT)
    assert out.stdout.startswith("usage: python -m benchmarks")
    assert "--json" in out.stdout and "--models" in out.stdout


def test_package_holds_no_benchmark_and_imports_no_optax():
    """No module of bn_jax imports optax or the benchmarks (at the top or inside a
    function), and every module imports with the benchmarks unimportable."""
    files = sorted((ROOT / "bn_jax").rglob("*.py"))
    assert len(files) > 10 and not [f.name for f in files if "bench" in f.name]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not {"optax", "benchmarks"} & set(roots), (path, node.lineno)
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['benchmarks'] = None\n"
        "import bn_jax\n"
        "for m in pkgutil.walk_packages(bn_jax.__path__, 'bn_jax.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]


def test_interleaving_rotates_the_order():
    assert [timing.rotation(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    order = []
    calls = {n: (lambda n=n: order.append(n)) for n in ("a", "b", "c")}
    times = timing.time_interleaved(calls, repeats=4, warmup=1)
    assert order == list("abc" + "abc" + "bca" + "cab" + "abc")  # warm-up, then 4 repeats
    assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(s >= 0 for t in times.values() for s in t)


def test_network_mode_materializes_each_layer_for_gpu():
    """One barrier between each pair of layers, for every library and the floor,
    in the program lowered for CUDA (where XLA would otherwise fuse the chain)."""
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
    x = jnp.ones((64, 32))
    fn = layers.make_minimal(workload, mode, layers=3)
    n_layers = 3 if mode == "network" else 1
    y, stats = fn(x, x)
    assert y.shape == x.shape and y.dtype == x.dtype and len(stats) == n_layers
    text = jax.jit(fn).lower(x, x).as_text()
    per_layer = 2 if workload == "fwd" else 4
    assert len(re.findall(r"stablehlo.reduce\b", text)) == per_layer * n_layers
    assert layers.make_minimal("eval", mode, 3) is None


def test_models_tiny_run_reports_each_library():
    """``--models`` on the tiny MLP row: finite, positive step and compile times,
    compiled memory and program sizes for bn_jax and Flax, through JSON."""
    argv = ["--models", "--tiny", "--model", "bn_mlp", "--repeats", "1", "--compiles", "1"]
    report = json.loads(json.dumps(cli.run([*argv, "--json"])))
    assert report["command"] == "python -m benchmarks " + " ".join(argv) + " --json"
    assert report["settings"] == {
        "repeats": 1,
        "compiles": 1,
        "tiny": True,
        "libraries": ["bn_jax", "flax"],
    }
    (row,) = report["models"]
    assert row["model"] == "bn_mlp" and row["input_shape"] == [16, 32]
    for field in ("step_ms", "compile_s", "compile_cpu_s"):
        assert set(row[field]) == {"bn_jax", "flax"}, field
        assert all(math.isfinite(v) and v > 0 for v in row[field].values()), (field, row)
    for field in ("temp_bytes", "hlo_ops", "stablehlo_ops"):
        assert set(row[field]) == {"bn_jax", "flax"}, field
        assert all(isinstance(v, int) and v > 0 for v in row[field].values()), (field, row)


def test_models_table_ratios_from_given_values():
    result = models.ModelResult(
        "bn_mlp",
        (16, 32),
        step_ms={"bn_jax": 10.0, "flax": 20.0},
        compile_s={"bn_jax": 3.0, "flax": 2.0},
        compile_cpu_s={"bn_jax": 1.0, "flax": 4.0},
        temp_bytes={"bn_jax": None, "flax": 2**20},
        hlo_ops={"bn_jax": 90, "flax": 100},
        stablehlo_ops={"bn_jax": 50, "flax": 40},
    )
    rows = _table(models.format_models([result], ["bn_jax", "flax"]))
    got = {r["metric"]: (r["bn_jax"], r["flax"], r["bn_jax/flax"]) for r in rows}
    assert got == {
        "step ms": ("10.0", "20.0", "0.50"),
        "compile s": ("3.00", "2.00", "1.50"),
        "compile CPU s": ("1.00", "4.00", "0.25"),
        "temp MiB": ("-", "1.0", "-"),
        "HLO ops": ("90", "100", "0.90"),
        "StableHLO ops": ("50", "40", "1.25"),
    }
    assert {(r["model"], r["input"]) for r in rows} == {("bn_mlp", "16x32")}


def test_model_registry_builds_every_row_with_each_library():
    """Each registered model, tiny, gives logits for its labels with bn_jax's drop-in,
    Flax's layer and no normalization; the two libraries' variables have the same tree."""
    assert {"resnet18", "resnet50", "bn_mlp", "transformer_ln", "transformer_rms"} <= set(
        models.MODELS
    )
    for name, builder in models.MODELS.items():
        trees = {}
        for lib in models.MODEL_LIBRARIES:
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
