"""Every example answers ``--help`` before importing JAX, documents its options and
is run by a test that checks its output; ``bn_basics.py``'s output is checked here."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES_DIR = pathlib.Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
HEAVY = ("jax", "jaxlib", "flax", "equinox", "optax", "numpy", "sklearn", "orbax", "tqdm", "bn_jax")

# Runs the script as __main__ with the heavy modules made unimportable, so
# that --help can only succeed if the script parses its arguments first.
RUN_WITHOUT_HEAVY = f"""
import runpy, sys
for name in {HEAVY!r}:
    sys.modules[name] = None
script = sys.argv[1]
sys.argv = [script, "--help"]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def help_runs() -> dict[str, subprocess.CompletedProcess]:
    """``--help`` of every example, all started at once."""
    procs = {
        path.name: subprocess.Popen(
            [sys.executable, "-c", RUN_WITHOUT_HEAVY, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in EXAMPLES
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def test_every_example_runs_in_a_test():
    """Each example is named by a test file that runs it and checks what it prints
    (this file runs every ``--help``, and ``bn_basics.py``)."""
    tests = pathlib.Path(__file__).resolve().parent.glob("*.py")
    sources = "\n".join(f.read_text() for f in tests)
    assert len(EXAMPLES) >= 10
    assert [p.name for p in EXAMPLES if p.name not in sources] == []


def test_bn_basics_running_statistics_converge_and_eval_matches_training():
    """``bn_basics.py``'s table: the running statistics approach the population's
    (observed over seeds 0-2: from 4.39-4.41 / 16.35-16.45 at step 1 to
    0.10-0.15 / 0.73-0.96 at step 60), training-mode output is standardized, and
    eval-mode output is close to it (mean |train - eval| 0.12-0.15)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as a user has
    done = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / "bn_basics.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    table = [
        [float(v) for v in line.split()]
        for line in out.splitlines()
        if re.fullmatch(r"\s*\d+\s+[0-9.]+\s+[0-9.]+", line)
    ]
    steps, mean_gap, var_gap = (np.asarray(col) for col in zip(*table, strict=True))
    assert steps.tolist() == [1, 2, 5, 10, 20, 40, 60], out
    assert np.all(np.isfinite(mean_gap)) and np.all(np.isfinite(var_gap)), out
    assert mean_gap[-1] < 0.1 * mean_gap[0] and var_gap[-1] < 0.1 * var_gap[0], out
    assert mean_gap[0] > 1.0 and var_gap[0] > 1.0, out  # from 0 / 1, far from the data's

    def output(mode):
        m = re.search(rf"{mode}-mode output:\s+mean ([-+0-9.]+), std ([0-9.]+)", out)
        return float(m[1]), float(m[2])

    train_mean, train_std = output("training")
    eval_mean, eval_std = output("eval")
    assert abs(train_mean) < 1e-3 and 0.9 < train_std <= 1.0, out
    assert abs(eval_mean) < 0.05 and abs(eval_std - train_std) < 0.05, out
    gap = float(re.search(r"mean \|train - eval\| on live pixels: ([0-9.]+)", out)[1])
    assert 0 < gap < 0.3, out


@pytest.mark.parametrize("script", [p.name for p in EXAMPLES])
def test_help_answers_before_heavy_imports(script, help_runs):
    run = help_runs[script]
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage: "), run.stdout
    assert "--help" in run.stdout


def _add_argument_calls(path: pathlib.Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text())
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_option_has_help(path, help_runs):
    calls = _add_argument_calls(path)
    assert calls, f"{path.name} defines no options"
    options = [ast.literal_eval(c.args[0]) for c in calls]
    undocumented = [o for o, c in zip(options, calls, strict=True) if "help" not in _keywords(c)]
    assert undocumented == []
    missing = [o for o in options if o not in help_runs[path.name].stdout]
    assert missing == []


def _keywords(call: ast.Call) -> set[str]:
    return {k.arg for k in call.keywords}
