"""What a test needs of the machine it runs on.

``make test`` runs on CPU with 8 fake devices (``tests/conftest.py``); the same
tests also run on a single accelerator (``JAX_PLATFORMS=cuda``), where the
multi-device ones skip and those that pin XLA:CPU's fusion decisions skip.
"""

from __future__ import annotations

import jax
import pytest


def require_devices(n: int) -> None:
    """Skips on an accelerator with fewer than ``n`` devices; fails on CPU, where
    ``conftest.py`` must have made 8 (a silent skip there would hide a broken setup)."""
    if jax.device_count() >= n:
        return
    if jax.default_backend() == "cpu":
        pytest.fail(f"needs {n} devices; tests/conftest.py should have made 8 fake CPU devices")
    pytest.skip(f"needs {n} devices, {jax.device_count()} here")


cpu_only = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="pins XLA:CPU's fusion decisions"
)
