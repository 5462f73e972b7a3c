"""Argument and shape validation shared by every normalizer.

All checks run at trace time (on static shapes and hyperparameters) and raise
``ValueError`` / ``TypeError`` whose message names the argument, what was
expected and what arrived.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AxisName = Hashable | tuple[Hashable, ...]
Groups = Sequence[Sequence[int]] | None  # canonical form: a tuple of tuples


def check_momentum(momentum: float | None) -> None:
    """Raises unless ``momentum`` is None or a number in ``[0, 1]``."""
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}.")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (Flax convention: new = momentum * old + "
            f"(1 - momentum) * batch; PyTorch's momentum=0.1 is 0.9 here), got {momentum!r}."
        )


def check_epsilon(epsilon: float, name: str = "epsilon") -> None:
    """Raises unless ``epsilon`` (the argument ``name``) is a positive finite number."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)):
        raise TypeError(f"{name} must be a positive float, got {epsilon!r}.")
    if not float(epsilon) > 0.0 or not math.isfinite(float(epsilon)):
        raise ValueError(f"{name} must be a positive finite float, got {epsilon!r}.")


def canonical_axis(axis: int | Sequence[int], name: str = "axis") -> int | tuple[int, ...]:
    """``axis`` as an int or a tuple of ints (hashable), or a TypeError naming ``name``."""
    error = TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}.")
    if isinstance(axis, bool):
        raise error
    if isinstance(axis, (int, np.integer)):
        return int(axis)
    try:
        axes = tuple(axis)
    except TypeError:
        raise error from None
    if not axes or not all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes
    ):
        raise error
    return tuple(int(a) for a in axes)


def canonical_groups(axis_index_groups: Any, axis_name: Any) -> tuple[tuple[int, ...], ...] | None:
    """Turns ``axis_index_groups`` into a hashable tuple of tuples."""
    if axis_index_groups is None:
        return None
    if axis_name is None:
        raise ValueError(
            "axis_index_groups was given but axis_name is None: groups only make sense "
            "when statistics are synchronized over a named axis."
        )
    try:
        groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    except TypeError:
        raise TypeError(
            f"axis_index_groups must be a sequence of sequences of device indices, "
            f"got {axis_index_groups!r}."
        ) from None
    sizes = {len(g) for g in groups}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            f"axis_index_groups must be non-empty groups of equal size, got {axis_index_groups!r}."
        )
    flat = [i for g in groups for i in g]
    if len(set(flat)) != len(flat):
        raise ValueError(f"axis_index_groups lists a device twice: {axis_index_groups!r}.")
    return groups


def check_float_dtype(
    name: str, dtype: Any, *, allow_none: bool = True, allow_complex: bool = False
) -> None:
    """Raises unless ``dtype`` is a floating-point dtype (or None, or complex, when
    allowed)."""
    if dtype is None:
        if allow_none:
            return
        ok = False  # jnp.dtype(None) would silently be float64
    else:
        try:
            kind = jnp.inexact if allow_complex else jnp.floating
            ok = jnp.issubdtype(jnp.dtype(dtype), kind)
        except TypeError:
            ok = False
    if not ok:
        raise TypeError(f"{name} must be a floating-point dtype, got {dtype!r}.")


def check_input(x: jax.Array, name: str = "x", *, allow_complex: bool = False) -> None:
    """Raises unless ``x`` is a floating-point (or, when allowed, complex) array;
    ``name`` is used in the message."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be a JAX or NumPy array, got {type(x).__name__}.")
    kind = jnp.inexact if allow_complex else jnp.floating
    if not jnp.issubdtype(x.dtype, kind):
        raise TypeError(
            f"{name} must be a floating-point array, got dtype {x.dtype}; "
            f"cast it first, e.g. {name}.astype(jnp.float32)."
        )


def resolve_axes(axis: int | tuple[int, ...], ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Makes (possibly negative) feature axes non-negative and sorted."""
    axes = (axis,) if isinstance(axis, int) else axis
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}={axis!r} is out of range for an input of rank {ndim}; "
                f"valid values are {-ndim}..{ndim - 1}."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} names the same dimension twice (input rank {ndim}).")
    return tuple(sorted(out))


def check_features(
    x_shape: tuple[int, ...],
    feature_axes: tuple[int, ...],
    shapes: dict[str, tuple[int, ...]],
    axis: Any,
    axis_arg: str = "axis",
) -> tuple[int, ...]:
    """Checks that every per-feature array (named, with its shape) matches the
    input's feature shape, which it returns.

    ``axis`` is the user's value of the layer's feature-axis argument, which
    the message names as ``axis_arg`` (``feature_axes`` for LayerNorm, ...).
    """
    feature_shape = tuple(x_shape[a] for a in feature_axes)
    for name, shape in shapes.items():
        if tuple(shape) != feature_shape:
            hint = ""
            if (
                len(feature_axes) == 1
                and len(x_shape) >= 3
                and feature_axes[0] == len(x_shape) - 1
                and len(shape) == 1
                and x_shape[1] == shape[0]
            ):
                hint = f"; channels-first (NCHW) input needs {axis_arg}=1"
            raise ValueError(
                f"{name} has shape {tuple(shape)} but x of shape {tuple(x_shape)} has "
                f"feature shape {feature_shape} along {axis_arg}={axis!r}{hint}."
            )
    return feature_shape


def check_mask(mask: Any, x_shape: tuple[int, ...]) -> jax.Array | None:
    """``mask`` as a boolean array that broadcasts to ``x_shape`` (None stays None)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    try:
        shape = jnp.broadcast_shapes(mask.shape, x_shape)
    except ValueError:
        shape = None
    if shape != tuple(x_shape):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to x's shape "
            f"{tuple(x_shape)}; give True for elements that count in the statistics, "
            f"e.g. a mask of shape {(*x_shape[:-1], 1)} for padded rows."
        )
    if mask.dtype != jnp.bool_:
        mask = mask != 0
    return mask


def bound_axis_size(axis_name: AxisName | None, groups: Groups, layer: str) -> int:
    """Number of devices that share statistics; raises if ``axis_name`` is unbound."""
    if axis_name is None:
        return 1
    try:
        size = lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{layer}: axis_name={axis_name!r} is not bound. Run the training step under "
            f"jax.shard_map, jax.pmap or jax.vmap with axis_name={axis_name!r}, or pass "
            f"axis_name=None for per-device statistics (eval mode never needs it)."
        ) from None
    if groups is not None:
        covered = sorted(i for g in groups for i in g)
        if covered != list(range(size)):
            raise ValueError(
                f"{layer}: axis_index_groups={groups!r} must cover each of the {size} "
                f"devices of axis {axis_name!r} exactly once."
            )
        return len(groups[0])
    return size


def stat_dtype(*dtypes: Any) -> jnp.dtype:
    """At least float32: the dtype statistics are accumulated in."""
    out = jnp.dtype(jnp.float32)
    # Standard promotion on dtypes only, so that this also answers under
    # jax_numpy_dtype_promotion="strict" (which refuses float32 with bfloat16).
    with jax.numpy_dtype_promotion("standard"):
        for d in dtypes:
            if d is not None:
                out = jnp.promote_types(out, d)
    return out
