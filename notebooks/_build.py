"""Builds the notebooks from the cell sources in ``notebooks/src/*.py`` and runs them.

Each source file is plain Python split into cells by lines that start with
``# %%`` (a code cell) or ``# %% [markdown]`` (a markdown cell whose lines
are ``#``-comments). The notebooks are stored executed, with their outputs,
so they render on a code host; ``tests/test_notebooks.py`` runs them again.

    .venv/bin/python notebooks/_build.py            # all notebooks
    .venv/bin/python notebooks/_build.py 01 03      # those whose name starts so
"""

from __future__ import annotations

import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
SRC = HERE / "src"


def cells_from_source(text: str) -> list:
    """Splits a ``# %%`` source into notebook cells."""
    cells, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(
                line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.split("\n")
            )
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif kind == "code" and body:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def merge_streams(outputs: list) -> list:
    """Joins consecutive stdout (or stderr) chunks, which arrive split by timing."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and out.output_type == "stream"
            and prev.output_type == "stream"
            and prev.name == out.name
        ):
            prev.text += out.text
        else:
            merged.append(out)
    return merged


def build(src: pathlib.Path, timeout: int = 300) -> float:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells_from_source(src.read_text())
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    start = time.perf_counter()
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    elapsed = time.perf_counter() - start
    for i, cell in enumerate(nb.cells):  # stable ids and merged streams keep diffs small
        cell["id"] = f"{src.stem[:2]}-{i:02d}"
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
    out = HERE / f"{src.stem}.ipynb"
    nbformat.write(nb, out)
    return elapsed


def main(argv: list[str]) -> None:
    for src in sorted(SRC.glob("*.py")):
        if argv and not any(src.stem.startswith(a) for a in argv):
            continue
        print(f"{src.stem}: {build(src):.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
