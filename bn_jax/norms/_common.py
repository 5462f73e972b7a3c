"""Layout helpers shared by the normalizers: feature shapes and parameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax._core.checks import resolve_axes
from bn_jax._core.stats import group_sum

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
Params = dict[str, jax.Array]
State = dict[str, jax.Array]


def feature_shape(features: Any, axis: int | tuple[int, ...], layer: str) -> tuple[int, ...]:
    """The per-feature shape from ``num_features``, a tuple of sizes or an example array."""
    if hasattr(features, "shape") and hasattr(features, "ndim"):
        axes = resolve_axes(axis, features.ndim)
        return tuple(int(features.shape[a]) for a in axes)
    n_axes = 1 if isinstance(axis, int) else len(axis)
    if isinstance(features, (int, np.integer)) and not isinstance(features, bool):
        sizes: tuple[int, ...] = (int(features),)
    elif isinstance(features, (tuple, list)) and all(
        isinstance(f, (int, np.integer)) and not isinstance(f, bool) for f in features
    ):
        sizes = tuple(int(f) for f in features)
    else:
        raise TypeError(
            f"{layer}.init expects the number of features (an int), a tuple of feature sizes "
            f"or an example input array, got {features!r}."
        )
    if len(sizes) != n_axes:
        raise ValueError(
            f"{layer}.init got feature sizes {sizes} for axis={axis!r}, which names {n_axes} "
            f"feature axes; pass one size per axis or an example input."
        )
    if any(s <= 0 for s in sizes):
        raise ValueError(f"{layer}.init: feature sizes must be positive, got {sizes}.")
    return sizes


def init_affine(
    shape: tuple[int, ...],
    *,
    use_scale: bool,
    use_bias: bool,
    scale_init: Initializer,
    bias_init: Initializer,
    param_dtype: Any,
    key: jax.Array | None,
) -> Params:
    """``{"scale": ..., "bias": ...}`` with the keys that are in use."""
    key = jax.random.key(0) if key is None else key
    k_scale, k_bias = jax.random.split(key)
    params: Params = {}
    if use_scale:
        params["scale"] = jnp.asarray(scale_init(k_scale, shape, param_dtype), param_dtype)
    if use_bias:
        params["bias"] = jnp.asarray(bias_init(k_bias, shape, param_dtype), param_dtype)
    return params


def get_affine(
    params: Mapping[str, Any], use_scale: bool, use_bias: bool, layer: str
) -> tuple[jax.Array | None, jax.Array | None]:
    """``(scale, bias)`` from ``params`` (``None`` where unused), with clear errors."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{layer}: params must be a dict, got {type(params).__name__}.")
    out = []
    for name, used in (("scale", use_scale), ("bias", use_bias)):
        if used and name not in params:
            raise ValueError(
                f"{layer}: params has no {name!r} (keys: {sorted(params)}) but "
                f"use_{name}=True; build params with {layer}.init or set use_{name}=False."
            )
        out.append(jnp.asarray(params[name]) if used else None)
    return out[0], out[1]


def broadcastable(v: jax.Array | None, ndim: int, axes: tuple[int, ...]) -> jax.Array | None:
    """Reshapes a per-feature array so it broadcasts against an input of rank ``ndim``."""
    if v is None:
        return None
    shape = [1] * ndim
    for a, s in zip(axes, v.shape, strict=True):
        shape[a] = s
    return jnp.reshape(v, shape)


def average_stats(
    mean: jax.Array,
    var: jax.Array,
    count: jax.Array,
    *,
    unbiased: bool,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Count-weighted average over axis 0 of per-group statistics, for running updates.

    ``mean``, ``var`` (biased) and ``count`` have a leading axis of groups
    (ghost batches, instances). Returns the weighted mean, the weighted mean
    of the variances (each made unbiased first when ``unbiased``) and the
    total count, with axis 0 removed; a group with no valid element has no
    weight. With ``axis_name`` the sums run over every device as well (one
    collective of three arrays). Everything is under ``stop_gradient``.
    """
    mean, var, count = (jax.lax.stop_gradient(a) for a in (mean, var, count))
    if unbiased:
        var = var * count / jnp.maximum(count - 1, 1)
    sums = jnp.stack([jnp.sum(count * mean, 0), jnp.sum(count * var, 0), jnp.sum(count, 0)])
    sums = group_sum(sums, axis_name, axis_index_groups)
    safe = jnp.maximum(sums[2], 1)
    return sums[0] / safe, sums[1] / safe, sums[2]
