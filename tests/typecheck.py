"""mypy on a user's file, as a project that type-checks its code runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent

requires_mypy = pytest.mark.skipif(
    subprocess.run([sys.executable, "-m", "mypy", "--version"], capture_output=True).returncode,
    reason="mypy is not installed (pip install '.[test]')",
)


def mypy_lines(snippet: str, tmp_path: Path) -> tuple[dict[int, str], str]:
    """mypy's messages on ``snippet`` (written to a user file, run from the repository
    root against the installed bn_jax), by line number of the snippet, and its
    whole output for assertion messages."""
    user = tmp_path / "user.py"
    user.write_text(textwrap.dedent(snippet))
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-error-summary", str(user)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MYPY_CACHE_DIR": str(tmp_path / "cache")},
        timeout=600,
    ).stdout
    lines: dict[int, str] = {}
    for line in out.splitlines():
        if "user.py:" in line:
            number = int(line.split("user.py:")[1].split(":")[0])
            lines[number] = lines.get(number, "") + line + "\n"
    return lines, out
