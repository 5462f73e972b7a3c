"""Sphinx configuration: autodoc + napoleon for the API, MyST-NB for the pages.

Python cells in the ``.md`` pages are executed at every build, so the output a
page shows is what the code prints today; the notebooks under ``notebooks/``
are rendered with their stored outputs.
"""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The kernels that execute the pages import this checkout's bn_jax, on the CPU.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bn_jax  # noqa: E402

project = "bn_jax"
author = "The bn_jax authors"
copyright = "2026, The bn_jax authors"
release = bn_jax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "notebooks/src", "**/.ipynb_checkpoints"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# Pages run at build time; notebooks keep their stored outputs.
nb_execution_mode = "auto"
nb_execution_excludepatterns = ["notebooks/*"]
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_output_stderr = "warn"  # a page that writes to stderr fails the -W build
nb_merge_streams = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # an "Attributes:" section is a field list, not a second entry

html_theme = "furo"
html_title = f"bn_jax {release}"
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"
