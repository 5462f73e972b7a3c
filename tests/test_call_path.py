"""What a reader and a type checker meet: the drop-ins' call path and static types.

One eager training call of a drop-in BatchNorm runs a handful of bn_jax
functions (its configuration is built and checked once, not per call) and
reaches the first reduction through at most five bn_jax frames:
``__call__`` -> the framework's ``_call`` -> ``BatchNorm.apply`` ->
``batch_normalize`` -> ``moments``. A type checker sees the drop-ins as the
classes they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import bn_jax
from tests.typecheck import mypy_lines, requires_mypy

ROOT = Path(bn_jax.__file__).parent
REPO = ROOT.parent


def _profile(call):
    """Distinct named bn_jax functions of one call, bn_jax frames on the stack at the
    first reduction (``jnp.sum``), and the number of ``jax.eval_shape`` calls."""
    call()  # warm-up: caches filled, as in a training loop
    seen: set[tuple[str, str]] = set()
    stack: list[bool] = []
    found: dict[str, int] = {"eval_shape": 0}

    def tracer(frame, event, arg):
        code = frame.f_code
        if event == "call":
            ours = code.co_filename.startswith(str(ROOT))
            stack.append(ours)
            if ours and not code.co_name.startswith("<"):
                seen.add((code.co_filename, code.co_name))
            if code.co_name == "eval_shape":
                found["eval_shape"] += 1
            if code.co_name == "sum" and not ours and "depth" not in found:
                found["depth"] = sum(stack[:-1])
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(tracer)
    try:
        call()
    finally:
        sys.setprofile(None)
    return seen, found.get("depth"), found["eval_shape"]


def _linen_call():
    from bn_jax import linen as bnn

    x = jax.random.normal(jax.random.key(0), (8, 4))
    module = bnn.BatchNorm(use_running_average=False)
    variables = module.init(jax.random.key(1), x)
    return lambda: module.apply(variables, x, mutable=["batch_stats"])


def _nnx_call():
    from flax import nnx

    from bn_jax import nnx as bnnx

    x = jax.random.normal(jax.random.key(0), (8, 4))
    layer = bnnx.BatchNorm(4, use_running_average=False, rngs=nnx.Rngs(0))
    return lambda: layer(x)


@pytest.mark.parametrize("make_call", [_linen_call, _nnx_call], ids=["linen", "nnx"])
def test_training_call_is_short(make_call):
    seen, depth, eval_shapes = _profile(make_call())
    names = sorted(f"{Path(f).relative_to(ROOT)}:{n}" for f, n in seen)
    assert len(seen) <= 15, names
    assert depth is not None and depth <= 5, (depth, names)
    assert eval_shapes == 0
    assert any(n.endswith("batch_norm.py:apply") for n in names), names  # the core ran


def test_core_training_call_checks_once_per_configuration():
    """A second call with the same shapes skips every check: the layout is cached."""
    norm = bn_jax.BatchNorm()
    params, state = norm.init(4)
    x = jnp.ones((8, 4))
    seen, _, _ = _profile(lambda: norm.apply(params, state, x, training=True))
    names = {n for _, n in seen}
    assert not names & {"batch_layout", "check_features", "resolve_axes", "check_state_keys"}


SNIPPET = """
from flax import nnx
from bn_jax import linen as bnn
from bn_jax import nnx as bnnx

a = bnn.BatchNorm(use_running_average=False, momentum=0.9)
reveal_type(a)
reveal_type(a.momentum)
b = bnn.BatchNorm(momentun=0.9)
c = bnnx.BatchNorm(4, momentum=None, rngs=nnx.Rngs(0))
reveal_type(c)
d = bnnx.BatchNorm(4, momentun=0.9, rngs=nnx.Rngs(0))
e = bnn.GhostBatchNorm(virtual_batch_size=4, momentum=0.9)
f = bnnx.LayerNorm(4, memory_efficient=True, rngs=nnx.Rngs(0))
"""


@requires_mypy
def test_mypy_sees_the_drop_ins(tmp_path):
    lines, out = mypy_lines(SNIPPET, tmp_path)
    assert 'Revealed type is "bn_jax.linen.BatchNorm"' in lines[7], out
    assert 'Revealed type is "float | None"' in lines[8], out
    assert 'Unexpected keyword argument "momentun"' in lines[9], out
    assert 'Revealed type is "bn_jax.nnx.BatchNorm"' in lines[11], out
    assert 'Unexpected keyword argument "momentun"' in lines[12], out
    flagged = {n for n, line in lines.items() if "error:" in line}
    assert flagged == {9, 12}, out  # correct code (lines 6, 10, 13, 14) passes
