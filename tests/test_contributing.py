"""CONTRIBUTING.md's recipe for a new normalizer is code that works: run as it is
written there, ``MyNorm`` satisfies the contract and computes its formula."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
from tests import reference as ref
from tests import registry

CONTRIBUTING = pathlib.Path(__file__).parent.parent / "CONTRIBUTING.md"


@pytest.fixture(scope="module")
def recipe():
    text = CONTRIBUTING.read_text()
    section = text.split("## Add a normalizer", 1)[1]
    block = re.search(r"```python\n(.*?)\n\s*```", section, re.S).group(1)
    namespace = {"__name__": "my_norm"}
    code = compile(inspect.cleandoc(block), str(CONTRIBUTING), "exec", dont_inherit=True)
    exec(code, namespace)
    return namespace


def test_recipe_is_a_flat_normalizer(recipe):
    cls = recipe["MyNorm"]
    assert cls.__mro__ == (cls, object)
    assert isinstance(cls(), bn_jax.Normalizer)
    assert cls.__dataclass_params__.frozen
    assert all(f.kw_only for f in dataclasses.fields(cls))
    for method in ("init", "apply"):
        want = inspect.signature(getattr(bn_jax.Normalizer, method)).parameters
        got = inspect.signature(getattr(cls, method)).parameters
        assert [(p.name, p.kind, p.default) for p in got.values()] == [
            (p.name, p.kind, p.default) for p in want.values()
        ]


def test_recipe_computes_its_formula(recipe):
    """MyNorm normalizes over its feature axes: LayerNorm's float64 reference."""
    norm = recipe["MyNorm"]()
    params = registry.example_params(norm)
    x = registry.example_x(4)
    y, state = jax.jit(lambda p, x: norm.apply(p, {}, x, training=True))(params, x)
    want = ref.layer_norm(x, params["scale"], params["bias"], eps=norm.epsilon)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5)
    assert state == {} and y.dtype == jnp.float32
    y_fn, _ = jax.jit(lambda p, x: recipe["my_norm"](p, {}, x, training=True))(params, x)
    np.testing.assert_array_equal(y_fn, y)
    with pytest.raises(ValueError, match=r"MyNorm: axis_name='d' is not bound"):
        recipe["MyNorm"](axis_name="d").apply(params, {}, x, training=True)
