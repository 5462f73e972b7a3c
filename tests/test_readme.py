"""Every Python block of the README runs as written and prints what the README says."""

from __future__ import annotations

import pathlib
import re

import numpy as np

from tests import reference as ref
from tests.devices import cpu_only

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def section(heading: str) -> str:
    return README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def block(heading: str) -> str:
    return re.search(r"```python\n(.*?)```", section(heading), re.S)[1]


def run(code: str, capsys) -> list[str]:
    exec(compile(code, "README.md", "exec"), {})
    return capsys.readouterr().out.splitlines()


def test_every_python_block_is_checked_below():
    headings = ("Quickstart", "Flax: change one import", "Check the numbers")
    assert sorted(BLOCKS) == sorted(block(h) for h in headings)


def test_quickstart_prints_what_the_readme_says(capsys):
    text = section("Quickstart")
    (printed,) = run(block("Quickstart"), capsys)
    assert f"prints `{printed}`" in " ".join(text.split())


def test_flax_drop_in_block_matches_flax_and_numpy():
    """The block's output is Flax's BatchNorm (stable variance) on the same input and
    variables, and its output and new running statistics are a float64 NumPy training
    step's on the Dense layer's output."""
    import flax.linen as nn

    ns = {}
    exec(compile(block("Flax: change one import"), "README.md", "exec"), ns)
    x, variables, y, updates = ns["x"], ns["variables"], ns["y"], ns["updates"]
    assert y.shape == (4, 16) and float(np.std(y)) > 0.1  # not a degenerate input

    flax_bn = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    flax_model = nn.Sequential([nn.Dense(16), flax_bn, nn.relu])
    y_flax, updates_flax = flax_model.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)

    params = variables["params"]
    h = np.asarray(nn.Dense(16).apply({"params": params["layers_0"]}, x), np.float64)
    scale, bias = params["layers_1"]["scale"], params["layers_1"]["bias"]
    np.testing.assert_allclose(y, np.maximum(ref.bn_train(h, scale, bias), 0), atol=1e-5)
    mean, var, _ = ref.bn_stats(h)
    for got in (updates["batch_stats"]["layers_1"], updates_flax["batch_stats"]["layers_1"]):
        np.testing.assert_allclose(got["mean"], ref.ema(0.0, mean, 0.99), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["var"], ref.ema(1.0, var, 0.99), rtol=1e-5)


def _close(table_value: str, measured: str) -> bool:
    """The table's figure is the measured one at the table's precision."""
    if table_value == "nan":
        return measured == "nan"
    decimals = len(table_value.partition(".")[2])
    return abs(float(table_value) - float(measured)) <= 0.5 * 10.0**-decimals + 1e-12


@cpu_only  # the table says what XLA:CPU compiles
def test_the_comparison_table_is_what_the_block_prints(capsys):
    printed = run(block("Check the numbers"), capsys)
    pattern = (
        r"(\w+): std (\S+), NaN batch -> running mean (\S+), "
        r"pooled mean (\S+) \(exact (\S+)\), temp memory (\S+) MiB"
    )
    measured = {m[1]: m.groups()[1:] for m in map(re.compile(pattern).fullmatch, printed)}
    assert sorted(measured) == ["bn_jax", "flax"], printed

    first_table = re.search(r"(?:^\|.*\n)+", README, re.M)[0]  # the comparison, at the top
    rows = [line for line in first_table.splitlines() if " | " in line]
    table = [r for r in rows if "output std" in r or "NaN" in r or "pooled" in r or "memory" in r]
    assert len(table) == 4, table
    first = lambda cell: re.match(r"[\w.]+", cell.strip())[0]
    for row, column in zip(table, (0, 1, 2, 4), strict=True):
        _, flax_cell, bn_cell = row.strip("|").split("|")[-3:]
        for library, cell in (("flax", flax_cell), ("bn_jax", bn_cell)):
            assert _close(first(cell), measured[library][column]), (row, measured[library])
    # the exact pooled mean quoted in the table's row is the float64 one
    exact_quoted = re.search(r"exact: ([\d.]+)\)", table[2])[1]
    assert _close(exact_quoted, measured["bn_jax"][3])
    # bn_jax's statistics of a NaN batch are the ones it started with
    assert measured["bn_jax"][1] == "0.0"
    # and the versions the table names are the ones that printed it
    import flax
    import jax

    assert f"(Flax {flax.__version__}, jax {jax.__version__}, CPU;" in " ".join(README.split())


def test_relative_links_point_at_files():
    links = re.findall(r"\]\(([\w./-]+)(?:#[\w-]+)?\)", README)
    assert "docs/api.md" in links
    root = pathlib.Path(__file__).resolve().parent.parent
    missing = [link for link in links if not (root / link).exists()]
    assert missing == []
