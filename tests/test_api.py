"""The public surface: names, docstrings, type hints, the shape of every normalizer,
import hygiene, functional forms, and argument names in error messages."""

import ast
import dataclasses
import inspect
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
from bn_jax import interop
from tests import registry

PACKAGE = pathlib.Path(bn_jax.__file__).parent

# (class, functional form, config) for every normalizer of the registry.
NORMALIZERS = [
    (e.cls, e.functional, {**e.config, "epsilon": 0.5}) for e in registry.NORMALIZERS.values()
]
CLASSES = [c for c, _, _ in NORMALIZERS]
BN_LIKE = [c for c in CLASSES if "momentum" in {f.name for f in dataclasses.fields(c)}]
SHAPE = registry.X_SHAPE
YEAR = re.compile(r"\b(19|20)\d\d\b")


def _ids(items):
    return [c.__name__ for c, *_ in items]


# --------------------------------------------------------------------------- names


def test_all_names_importable_and_documented():
    assert bn_jax.__all__ == sorted(set(bn_jax.__all__))
    for name in bn_jax.__all__:
        obj = getattr(bn_jax, name)
        assert (obj.__doc__ or "").strip(), f"bn_jax.{name} has no docstring"
    assert isinstance(bn_jax.__version__, str) and re.fullmatch(
        r"\d+\.\d+\.\d+.*", bn_jax.__version__
    )


@pytest.mark.parametrize("module", ["bn_jax.interop", "bn_jax.linen", "bn_jax.nnx"])
def test_submodule_all_documented(module):
    mod = __import__(module, fromlist=["__all__"])
    assert (mod.__doc__ or "").strip()
    for name in mod.__all__:
        obj = getattr(mod, name)
        assert (obj.__doc__ or "").strip(), f"{module}.{name} has no docstring"


def test_init_holds_public_names_only():
    """__init__.py: a docstring, one import per line, __version__ and __all__."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    body = tree.body
    assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    imported = set()
    for node in body[1:]:
        if isinstance(node, ast.ImportFrom):
            assert len(node.names) == 1, f"one import per line: {ast.unparse(node)}"
            imported.add(node.names[0].asname or node.names[0].name)
        else:
            assert isinstance(node, ast.Assign), ast.unparse(node)
            (target,) = node.targets
            assert target.id in ("__version__", "__all__")
    assert imported == set(bn_jax.__all__)


def test_py_typed_shipped():
    assert (PACKAGE / "py.typed").is_file()


def test_no_bare_assert_in_library_code():
    """``python -O`` strips ``assert``: the library must raise real errors."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assert):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, found


def test_import_does_not_load_flax_torch_or_extras():
    code = (
        "import sys, bn_jax\n"
        "heavy = ('flax', 'equinox', 'torch', 'tqdm', 'matplotlib', 'optax', 'sklearn')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        cwd=PACKAGE.parent,
        timeout=120,
    )
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------- docstrings and hints


def _unannotated(fn):
    sig = inspect.signature(fn)
    missing = [
        n
        for n, p in sig.parameters.items()
        if n != "self" and p.annotation is inspect.Parameter.empty
    ]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def test_public_functions_are_typed():
    for name in bn_jax.__all__:
        obj = getattr(bn_jax, name)
        if inspect.isfunction(obj):
            assert not _unannotated(obj), (name, _unannotated(obj))
    for name in interop.__all__:
        assert not _unannotated(getattr(interop, name)), name
    for cls in CLASSES:
        for method in (cls.init, cls.apply):
            assert not _unannotated(method), (cls.__name__, method.__name__)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_class_docstring_has_formula_paper_and_sections(cls):
    doc = inspect.getdoc(cls)
    assert "Args:" in doc and "Example::" in doc
    assert "Reference:" in doc and YEAR.search(doc.split("Reference:")[1]), "paper with year"
    assert "epsilon" in doc and "::" in doc.split("Args:")[0], "formula before Args"
    if cls in BN_LIKE:
        assert "Conventions" in doc, f"{cls.__name__}: BN-like layers need a Conventions note"
    for method in ("init", "apply"):
        assert (getattr(cls, method).__doc__ or "").strip(), f"{cls.__name__}.{method}"


# --------------------------------------------------------------- normalizer shape


@pytest.mark.parametrize(("cls", "fn", "config"), NORMALIZERS, ids=_ids(NORMALIZERS))
def test_normalizer_is_frozen_hashable_dataclass(cls, fn, config):
    norm = cls(**config)
    assert dataclasses.is_dataclass(norm)
    assert cls.__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        norm.epsilon = 0.5
    assert hash(norm) == hash(cls(**config)) and norm == cls(**config)
    assert callable(norm.init) and callable(norm.apply)
    apply = inspect.signature(cls.apply).parameters
    assert list(apply)[:4] == ["self", "params", "state", "x"]
    assert apply["training"].kind is inspect.Parameter.KEYWORD_ONLY
    assert apply["training"].default is inspect.Parameter.empty
    functional = inspect.signature(fn).parameters
    assert list(functional)[:3] == ["params", "state", "x"]
    assert functional["training"].kind is inspect.Parameter.KEYWORD_ONLY


def test_list_arguments_are_canonicalized_to_hashable_tuples():
    norms = [
        bn_jax.BatchNorm(axis=[1], axis_name="d", axis_index_groups=[[0, 1], [2, 3]]),
        bn_jax.LayerNorm(reduction_axes=[1, 2], feature_axes=[2]),
        bn_jax.GroupNorm(num_groups=2, reduction_axes=[1, 2]),
        bn_jax.InstanceNorm(feature_axes=[2]),
    ]
    for norm in norms:
        hash(norm)
    assert norms[0].axis == (1,) and norms[0].axis_index_groups == ((0, 1), (2, 3))


@pytest.fixture(scope="module")
def data():
    kx, kb, km = jax.random.split(jax.random.key(0), 3)
    x = 2.0 + 3.0 * jax.random.normal(kx, SHAPE, jnp.float32)
    mask = jax.random.bernoulli(km, 0.8, (*SHAPE[:2], 1))
    return x, mask, kb


@pytest.mark.parametrize(("cls", "fn", "config"), NORMALIZERS, ids=_ids(NORMALIZERS))
def test_functional_form_matches_class(cls, fn, config, data):
    x, mask, kb = data
    norm = cls(**config)
    params, state = norm.init(x)
    params = {  # non-trivial parameters, so a dropped scale or bias would show
        k: v + (0.5 if k == "scale" else 0.0) + 0.1 * jax.random.normal(kb, v.shape)
        for k, v in params.items()
    }
    want_y, want_state = norm.apply(params, state, x, training=True, mask=mask)
    got_y, got_state = fn(params, state, x, training=True, mask=mask, **config)
    np.testing.assert_array_equal(got_y, want_y)
    jax.tree.map(np.testing.assert_array_equal, got_state, want_state)
    want_eval, _ = norm.apply(params, want_state, x, training=False)
    got_eval, same = fn(params, want_state, x, training=False, **config)
    np.testing.assert_array_equal(got_eval, want_eval)
    jax.tree.map(np.testing.assert_array_equal, same, want_state)
    # The config reaches the normalizer: another epsilon gives another output.
    other_y, _ = dataclasses.replace(norm, epsilon=1e-3).apply(params, state, x, training=True)
    assert not np.allclose(other_y, got_y)


# ------------------------------------------------------- argument names in errors


def test_errors_name_the_argument():
    x = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="param_dtype must be a floating-point dtype, got None"):
        bn_jax.BatchNorm(param_dtype=None)
    with pytest.raises(ValueError, match=r"feature_axes=5 is out of range for an input of rank 2"):
        bn_jax.LayerNorm(feature_axes=5).init(x)
    with pytest.raises(ValueError, match=r"feature_axes=5 is out of range"):
        bn_jax.InstanceNorm(feature_axes=5).init(x)
    with pytest.raises(ValueError, match=r"feature_axis=3 is out of range"):
        bn_jax.GroupNorm(num_groups=1, feature_axis=3).init(x)
    with pytest.raises(ValueError, match=r"for feature_axes=\(0, 1\), which names 2"):
        bn_jax.RMSNorm(feature_axes=(0, 1)).init(5)
    norm = bn_jax.LayerNorm()
    with pytest.raises(ValueError, match=r"has feature shape \(3,\) along feature_axes=-1"):
        norm.apply(norm.init(4)[0], {}, x, training=True)
    norm = bn_jax.GroupNorm(num_groups=1)
    with pytest.raises(ValueError, match=r"along feature_axis=-1"):
        norm.apply(norm.init(4)[0], {}, x, training=True)
    norm = bn_jax.BatchNorm()
    with pytest.raises(ValueError, match=r"along axis=-1; channels-first \(NCHW\) input needs"):
        norm.apply(*norm.init(4), jnp.ones((2, 4, 5, 3)), training=True)
    with pytest.raises(TypeError, match=r"recalibrate: passes must be an int >= 1, got '2'"):
        bn_jax.recalibrate(None, [x], passes="2", progress=False)
    with pytest.raises(ValueError, match=r"recalibrate: passes must be an int >= 1, got 0"):
        bn_jax.recalibrate(None, [x], passes=0, progress=False)


SINGLE_VALUE = [registry.NORMALIZERS[n].cls for n in registry.SINGLE_VALUE]


@pytest.mark.parametrize("cls", SINGLE_VALUE, ids=lambda c: c.__name__)
def test_allow_single_value_is_a_documented_field(cls):
    assert "allow_single_value" in {f.name for f in dataclasses.fields(cls)}
    doc = inspect.getdoc(cls)
    assert "allow_single_value" in doc.split("Conventions:")[1], cls.__name__
