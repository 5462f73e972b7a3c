"""Every Python block of the README runs as written and prints what the README says."""

from __future__ import annotations

import pathlib
import re

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


def test_flax_drop_in_block_runs(capsys):
    run(block("Flax: change one import"), capsys)


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
