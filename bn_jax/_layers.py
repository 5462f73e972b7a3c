"""What the framework layers share: a normalizer configured from a layer's fields.

A framework layer (:mod:`bn_jax.linen`, :mod:`bn_jax.nnx`) is a class
statement whose fields carry the options of one bn_jax normalizer, under the
normalizer's names. Its ``__call__`` passes the call to its framework's
``_call``, which gets the layer's variables, runs
``normalizer(cls, layer).apply(...)`` and writes the new running statistics
back. One call of a layer therefore reads::

    Layer.__call__  ->  _call (framework variables)  ->  Normalizer.apply  ->  bn_jax._core

:func:`normalizer` builds (and validates) a configuration once per distinct
set of field values. A linen module is re-created on every ``apply`` and an
nnx module's attributes may change between calls, so the cache is keyed by
the values, not by the layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# Drop-in defaults that are not Flax's: the stable variance instead of Flax's
# E[x^2] - E[x]^2, and Flax's behaviour (no error) for a batch with one value
# per feature (the core's PyTorch-like check is opt-in). A Flax layer computed
# by bn_jax (``bn_jax.linen.patch``, ``bn_jax.nnx.convert``) takes them too.
FLAX_DEFAULTS: Mapping[str, Any] = {"use_fast_variance": False, "allow_single_value": True}


@functools.cache
def option_defaults(cls: Any) -> tuple[tuple[str, Any], ...]:
    """``(name, default)`` of each option of the normalizer class ``cls`` (its fields,
    without the initializers, which only the framework layers use)."""
    out = []
    for f in dataclasses.fields(cls):
        if f.init and not f.name.endswith("_init"):
            default = f.default
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            out.append((f.name, None if default is dataclasses.MISSING else default))
    return tuple(out)


def normalizer(cls: Any, layer: Any, changes: Mapping[str, Any]) -> Any:
    """``cls`` configured with ``layer``'s attributes of the same names (the ones it
    lacks keep ``cls``'s defaults), then ``changes``; built once per distinct
    configuration."""
    options = tuple(
        (name, changes[name] if name in changes else getattr(layer, name, default))
        for name, default in option_defaults(cls)
    )
    try:
        return _build(cls, options)
    except TypeError:  # an unhashable value, e.g. device groups given as lists
        return cls(**dict(options))


@functools.lru_cache(maxsize=4096)
def _build(cls: Any, options: tuple[tuple[str, Any], ...]) -> Any:
    return cls(**dict(options))


@functools.lru_cache(maxsize=1024)
def variables(norm: Any, shape: tuple[int, ...]) -> tuple[dict, dict]:
    """The shapes and dtypes of ``norm``'s params and state for an input of ``shape``,
    in creation order (``scale`` before ``bias``, the order Flax draws their keys in)."""
    order: list[list[str]] = []

    def init(x: Any) -> Any:
        params, state = norm.init(x)
        order[:] = [list(params), list(state)]
        return params, state

    params, state = jax.eval_shape(init, jax.ShapeDtypeStruct(shape, jnp.float32))
    return {n: params[n] for n in order[0]}, {n: state[n] for n in order[1]}


def check_overrides(classes: Any, overrides: Mapping[str, Any]) -> None:
    """Raises TypeError for an override that none of the normalizer ``classes`` has
    (the values are checked by each normalizer when it is built)."""
    known = {name for cls in classes for name, _ in option_defaults(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(
            f"unknown bn_jax option(s) {unknown}; the options are the fields of the bn_jax "
            f"normalizers, e.g. axis_name, use_fast_variance, unbiased_running_var."
        )
    if overrides.get("zero_centered_scale"):
        # The layers' stored scale would be read as 1 + scale: a trained (or fresh,
        # all-ones) scale would double the output.
        raise ValueError(
            "zero_centered_scale=True cannot be set on existing layers: their stored scale "
            "would be read as 1 + scale. Build the layer with zero_centered_scale=True (its "
            "scale then starts at 0), or store scale - 1 in a model built that way."
        )


def stored(new: jax.Array, old: jax.Array) -> jax.Array:
    """A running statistic as written back: in the variable's dtype, unless it
    became complex (the running mean of complex input is complex, as in Flax)."""
    if jnp.issubdtype(new.dtype, jnp.complexfloating):
        return new
    return new.astype(old.dtype)
