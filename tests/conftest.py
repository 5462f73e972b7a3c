"""Test setup: 8 fake CPU devices, set before JAX starts its backend."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a function eagerly and under ``jax.jit``."""
    if request.param == "jit":
        return jax.jit
    return lambda f, **_: f
