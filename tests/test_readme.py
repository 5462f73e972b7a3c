"""The README's self-contained Python examples run as written, and print what
the README says they print. (The other blocks are fragments that name a
model or a loader of the reader's own.)"""

from __future__ import annotations

import pathlib
import re

import pytest

from tests.devices import cpu_only

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = [b for lang, b in re.findall(r"```(\w*)\n(.*?)```", README, re.S) if lang == "python"]


def block(first_line: str) -> str:
    (found,) = [b for b in BLOCKS if b.splitlines()[0] == first_line]
    return found


@pytest.mark.parametrize(
    "first_line",
    [
        "import jax, jax.numpy as jnp",  # quickstart
        "import jax, jax.numpy as jnp, bn_jax",  # distributed step (defined, not run)
    ],
)
def test_readme_block_runs(first_line):
    exec(compile(block(first_line), "README.md", "exec"), {})


@cpu_only  # the README says "on CPU"
def test_readme_reduction_counts_are_what_it_says(capsys):
    exec(compile(block("import jax, jax.numpy as jnp, re, bn_jax"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.split("\n")
    assert printed[:4] == [
        "BatchNorm fwd 2",
        "BatchNorm grad 4",
        "BatchRenorm fwd 2",
        "BatchRenorm grad 4",
    ]
    # ... which is what the prose above the block claims
    assert "2 reductions in the forward pass and 4 with the\ngradient for both" in README
