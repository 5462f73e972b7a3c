"""Test setup: 8 fake CPU devices, set before JAX starts its backend."""

import os

# LLVM's optimization level 0: the tests' programs are small and compiled once or
# twice each, and XLA:CPU at the default level spends seconds on each random
# number generator (a threefry draw for one new shape: ~5 s at the default, 0.3 s at 0).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest
from hypothesis import settings

# Float32 matmuls and convolutions at full precision on every backend: on GPU
# the default (TF32) differs from a float64 reference by ~1e-3, which would
# hide the normalizers' own errors in the model-level tests. No change on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

# Property tests explore a fixed set of examples: CI never fails on a draw that
# a local run did not see. HYPOTHESIS_PROFILE=explore searches randomly.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a function eagerly and under ``jax.jit``."""
    if request.param == "jit":
        return jax.jit
    return lambda f, **_: f


# Files whose tests run for tens of seconds (example scripts, notebooks,
# multi-process runs): started first, so that `pytest -n 2` does not end on
# one worker finishing them alone.
SLOW_FIRST = (
    "test_demo.py",
    "test_soak.py",
    "test_resume.py",
    "test_notebooks.py",
    "test_multihost.py",
    "test_readme.py",
    "test_flax_adopt.py",
)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in SLOW_FIRST)  # stable: order kept within
