"""The examples run: the demo with tiny settings, the pure-JAX and nnx scripts,
the numerics of the accelerator check.

Each runs as a subprocess, as a user would run it. The accuracy thresholds
are far below what the defaults reach, but far above chance (0.1): they fail
if training does not train.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(script, *args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user has
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def table_rows(out):
    """``{variant: [cells]}`` of the per-learning-rate table."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\| (none|BatchNorm|GroupNorm|BatchRenorm) \| (.*) \|$", line)
        if m and m.group(1) not in rows:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_demo_table_plot_and_seed(tmp_path):
    out = tmp_path / "curves.png"
    args = ["--steps", "12", "--eval-every", "6", "--lrs", "0.05,2.0", "--seed", "3"]
    args.append("--no-progress")
    stdout = run("train_digits.py", *args, "--out", str(out))
    rows = table_rows(stdout)
    assert list(rows) == ["none", "BatchNorm", "GroupNorm", "BatchRenorm"], stdout
    for name, cells in rows.items():
        assert len(cells) == 2, (name, cells)  # one cell per learning rate
        for cell in cells:
            acc, steps = re.fullmatch(r"(\S+) \((\w+)\)", cell).groups()
            assert 0.0 <= float(acc) <= 1.0 or acc == "nan", cell
            assert steps == "never" or int(steps) in (0, 6, 12), cell
    assert "| variant | best lr | final test acc | best test acc | steps to 95% |" in stdout
    assert f"plot saved to {out}" in stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Same seed, same results. A variant's runs depend only on the seed (split,
    # shared init, batch order), not on the other variants: rerun the most
    # stateful one alone.
    again = run("train_digits.py", *args, "--variants", "BatchRenorm", "--out", str(out))
    assert table_rows(again)["BatchRenorm"] == rows["BatchRenorm"]
    best = lambda s: [line for line in s.splitlines() if line.startswith("| BatchRenorm | ")]
    assert best(again) == best(stdout)


@pytest.fixture(scope="module")
def demo_module():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLES / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_digits"] = module  # dataclasses (Flax modules) look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["train_digits"]


def test_demo_help(demo_module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_module.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--seed", "--lrs", "--steps", "--batch-size", "--variants", "--out"):
        assert flag in help_text


def test_demo_rejects_unknown_variant(demo_module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_module.parse_args(["--variants", "BatchNorm,LayerNorm"])
    assert exit_info.value.code == 2
    assert "--variants: unknown variant 'LayerNorm'" in capsys.readouterr().err


def final_accuracy(stdout):
    return float(re.search(r"final test accuracy ([0-9.]+)", stdout).group(1))


def test_pure_jax_example_trains():
    stdout = run("pure_jax.py", "--steps", "60")
    assert final_accuracy(stdout) > 0.6, stdout


def test_nnx_example_trains_and_eval_is_batch_independent():
    stdout = run("nnx_model.py", "--steps", "40")
    assert final_accuracy(stdout) > 0.6, stdout
    assert "running mean unchanged: True" in stdout, stdout
    diff = float(re.search(r"max difference ([0-9.e+-]+)", stdout).group(1))
    assert diff < 1e-4, stdout


def test_accelerator_check_numerics_pass_on_this_backend(tmp_path):
    """The numerics half of the accelerator check also holds on this backend; it
    exits non-zero if any error exceeds its tolerance."""
    stdout = run("accelerator_check.py", "--skip-bench", "--out", str(tmp_path))
    rows = [line for line in stdout.splitlines() if "(tol " in line]
    assert len(rows) == 4 and all(" ok (tol " in line for line in rows), stdout
    assert (tmp_path / "numerics.json").exists()
