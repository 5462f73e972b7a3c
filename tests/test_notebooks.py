"""Executes every notebook top to bottom, so the walkthroughs cannot rot.

The notebooks are stored with their outputs (they render on a code host);
``notebooks/_build.py`` regenerates them from ``notebooks/src/``.
"""

import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_all_notebooks_present():
    names = [p.stem for p in PATHS]
    assert names == [
        "01_batchnorm_from_scratch",
        "02_distributed",
        "03_small_batches",
        "04_inference",
        "05_batch_size",
        "06_distribution_shift",
    ], names


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path, monkeypatch):
    # The kernel starts as a user's would: no fake devices from conftest.py
    # (02_distributed sets its own in its first cell).
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    stored = nbformat.read(path, as_version=4)
    code = [c for c in stored.cells if c.cell_type == "code"]
    # Stored executed, in order, with outputs, so they render without running.
    assert code and [c.execution_count for c in code] == list(range(1, len(code) + 1)), path.name
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], path.name

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    # Raises CellExecutionError (with the cell and traceback) if any cell fails. A
    # study's sweep is one cell of about a minute and a half on a loaded 2-core
    # machine, so a cell may take what the whole notebook may.
    NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    elapsed = time.perf_counter() - start
    assert elapsed < 240, f"{path.name} took {elapsed:.0f} s; keep notebooks under 2 minutes"
