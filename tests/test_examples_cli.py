"""Every example answers ``--help`` before importing JAX, and documents its options."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parent.parent / "examples").glob("*.py"))
HEAVY = ("jax", "jaxlib", "flax", "optax", "numpy", "sklearn", "orbax", "tqdm", "bn_jax")

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


def test_there_are_examples():
    assert len(EXAMPLES) >= 10


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
