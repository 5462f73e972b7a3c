"""Prints the first Python code block under a README heading (for CI)."""

import pathlib
import re
import sys

heading = sys.argv[1]
readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
print(re.search(r"```python\n(.*?)```", section, re.S).group(1), end="")
