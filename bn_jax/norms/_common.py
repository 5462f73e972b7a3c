"""Helpers the normalizers call by name: config checks, ``init`` pieces, call checks.

Each normalizer's ``apply`` reads top to bottom with these: validate the call
(:func:`check_training`, :func:`check_x`, :func:`checked_affine`), take the
statistics with the core (:func:`bn_jax._core.normalize.batch_normalize` over
:func:`stats_config`), and update the running statistics
(:func:`update_state`). Helpers that take the normalizer itself read only
fields its docstring names, which every caller declares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn_jax._core import checks
from bn_jax._core.normalize import StatsConfig, affine
from bn_jax._core.running import update_running
from bn_jax._core.stats import group_sum

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
Params = dict[str, jax.Array]
State = dict[str, jax.Array]
Mask = jax.Array | None


# ------------------------------------------------------------------- configuration


def freeze(norm: Any, **values: Any) -> None:
    """Stores the canonical ``values`` of fields of the frozen dataclass ``norm``."""
    for name, value in values.items():
        object.__setattr__(norm, name, value)


def check_common_fields(norm: Any) -> None:
    """Validates the fields every normalizer declares.

    Those are ``epsilon``, ``dtype``, ``param_dtype``, ``axis_name`` and
    ``axis_index_groups`` (stored as a hashable tuple of tuples).
    """
    checks.check_epsilon(norm.epsilon)
    groups = checks.canonical_groups(norm.axis_index_groups, norm.axis_name)
    freeze(norm, axis_index_groups=groups)
    checks.check_float_dtype("dtype", norm.dtype)
    checks.check_float_dtype("param_dtype", norm.param_dtype, allow_none=False)


def check_batch_fields(norm: Any) -> None:
    """Validates a BatchNorm-like ``norm``: ``momentum``, ``axis`` and the common fields."""
    checks.check_momentum(norm.momentum)
    freeze(norm, axis=checks.canonical_axis(norm.axis, "axis"))
    check_common_fields(norm)


def check_example_fields(norm: Any) -> None:
    """Validates a LayerNorm-like ``norm``: ``reduction_axes``, ``feature_axes`` and the
    common fields."""
    freeze(
        norm,
        reduction_axes=checks.canonical_axis(norm.reduction_axes, "reduction_axes"),
        feature_axes=checks.canonical_axis(norm.feature_axes, "feature_axes"),
    )
    check_common_fields(norm)


def check_int(name: str, value: Any, *, positive: bool = False) -> int:
    """``value`` as an int (a positive one when ``positive``), or an error naming ``name``."""
    what = "a positive int" if positive else "an int"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be {what}, got {value!r}.")
    if positive and value <= 0:
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return int(value)


# ------------------------------------------------------------------------- init


def feature_shape(
    features: Any, axis: int | tuple[int, ...], layer: str, axis_arg: str = "axis"
) -> tuple[int, ...]:
    """The per-feature shape from ``num_features``, a tuple of sizes or an example array.

    ``axis`` is the value of the layer's feature-axis field, named ``axis_arg``
    in error messages.
    """
    if hasattr(features, "shape") and hasattr(features, "ndim"):
        axes = checks.resolve_axes(axis, features.ndim, axis_arg)
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
            f"{layer}.init got feature sizes {sizes} for {axis_arg}={axis!r}, which names "
            f"{n_axes} feature axes; pass one size per axis or an example input."
        )
    if any(s <= 0 for s in sizes):
        raise ValueError(f"{layer}.init: feature sizes must be positive, got {sizes}.")
    return sizes


def init_params(norm: Any, shape: tuple[int, ...], key: jax.Array | None) -> Params:
    """``{"scale": ..., "bias": ...}`` of ``shape``, with the keys that are in use.

    Reads ``norm.use_scale``, ``scale_init``, ``param_dtype`` and, where the
    normalizer has a bias, ``use_bias`` and ``bias_init``.
    """
    inits = {"scale": norm.scale_init if norm.use_scale else None}
    if has_bias(norm):
        inits["bias"] = norm.bias_init if norm.use_bias else None
    keys = jax.random.split(jax.random.key(0) if key is None else key)
    return {
        name: jnp.asarray(init(k, shape, norm.param_dtype), norm.param_dtype)
        for (name, init), k in zip(inits.items(), keys, strict=False)
        if init is not None
    }


def has_bias(norm: Any) -> bool:
    """Whether the normalizer class of ``norm`` declares a bias (RMSNorm has none)."""
    return "use_bias" in type(norm).__dataclass_fields__


def running_keys(norm: Any) -> tuple[str, ...]:
    """The keys of ``norm``'s running statistics: ``mean``, ``var``, a ``count`` with
    ``momentum=None`` and a ``skipped`` counter with ``count_skipped=True``."""
    keys = ("mean", "var") if norm.momentum is not None else ("mean", "var", "count")
    return (*keys, "skipped") if norm.count_skipped else keys


def init_running(norm: Any, shape: tuple[int, ...]) -> State:
    """Running ``mean`` 0 and ``var`` 1 (in ``norm.param_dtype`` if wider than
    float32), and int32 zeros for the ``count`` and ``skipped`` counters in use."""
    dt = checks.stat_dtype(norm.param_dtype)
    start = {"mean": jnp.zeros(shape, dt), "var": jnp.ones(shape, dt)}
    return {k: start.get(k, jnp.zeros(shape, jnp.int32)) for k in running_keys(norm)}


# ------------------------------------------------------------------ call checks


def check_training(training: Any, layer: str) -> bool:
    """``training`` as a bool; a TypeError unless it is a Python (or NumPy) bool."""
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(
            f"{layer}.apply: training must be a Python bool (it picks the code path when "
            f"tracing), got {type(training).__name__}; to switch at run time use "
            f"jax.lax.cond over two apply calls."
        )
    return bool(training)


def check_x(x: Any) -> jax.Array:
    """``x`` as a JAX array, after ``checks.check_input``."""
    checks.check_input(x)
    return jnp.asarray(x)


def check_state_keys(state: Any, need: Any, layer: str) -> None:
    """Raises unless ``state`` is a dict with every key in ``need``."""
    have = set(state) if isinstance(state, Mapping) else set()
    if not set(need) <= have:
        raise ValueError(
            f"{layer}: state has keys {sorted(have)} but needs {sorted(need)}; "
            f"build it with {layer}.init (momentum=None adds 'count', count_skipped=True "
            f"adds 'skipped')."
        )


class Affine(NamedTuple):
    """``scale`` and ``bias`` broadcastable against ``x`` (None where unused), and the
    feature shape."""

    scale: jax.Array | None
    bias: jax.Array | None
    shape: tuple[int, ...]


def checked_affine(
    norm: Any,
    params: Any,
    x: jax.Array,
    feature_axes: tuple[int, ...],
    axis_arg: str,
    running: State | None = None,
) -> Affine:
    """``norm``'s scale and bias from ``params``, checked against ``x`` (and ``running``).

    ``axis_arg`` names the field of ``norm`` that gives the feature axes
    (``axis``, ``feature_axes``, ...), for the error message; ``running``
    holds running ``mean`` / ``var`` whose shapes must match too.
    """
    layer = type(norm).__name__
    if not isinstance(params, Mapping):
        raise TypeError(f"{layer}: params must be a dict, got {type(params).__name__}.")
    used = {"scale": norm.use_scale, "bias": has_bias(norm) and norm.use_bias}
    arrays = {}
    for name, use in used.items():
        if use and name not in params:
            raise ValueError(
                f"{layer}: params has no {name!r} (keys: {sorted(params)}) but "
                f"use_{name}=True; build params with {layer}.init or set use_{name}=False."
            )
        arrays[f"params[{name!r}]"] = jnp.asarray(params[name]) if use else None
    for name in () if running is None else ("mean", "var"):
        arrays[f"state[{name!r}]"] = running[name]
    shape = checks.check_features(x.shape, feature_axes, arrays, getattr(norm, axis_arg), axis_arg)
    scale, bias = arrays["params['scale']"], arrays["params['bias']"]
    return Affine(
        broadcastable(scale, x.ndim, feature_axes), broadcastable(bias, x.ndim, feature_axes), shape
    )


class Call(NamedTuple):
    """A checked call of a normalizer with running statistics."""

    x: jax.Array
    feature_axes: tuple[int, ...]
    affine: Affine
    out: jnp.dtype  # the output dtype


def check_batch_call(
    norm: Any, params: Any, state: Any, x: Any, training: Any
) -> tuple[bool, Call]:
    """``(training, call)`` for a BatchNorm-like ``norm``, after every check of the call.

    Checks ``training`` and ``x``, that ``state`` has the running statistics
    of ``norm.momentum``, and that params and running statistics match the
    features of ``x`` along ``norm.axis``.
    """
    layer = type(norm).__name__
    training, x = check_training(training, layer), check_x(x)
    feature_axes = checks.resolve_axes(norm.axis, x.ndim)
    check_state_keys(state, running_keys(norm), layer)
    aff = checked_affine(norm, params, x, feature_axes, "axis", running=state)
    return training, Call(x, feature_axes, aff, out_dtype(norm, x))


def running_output(norm: Any, state: State, c: Call) -> jax.Array:
    """Evaluation mode: ``c.x`` normalized with ``state``'s running statistics."""
    return normalize_with(
        c.x, state["mean"], state["var"], c.affine, c.feature_axes, norm.epsilon, c.out
    )


def checked_mask(norm: Any, x_shape: tuple[int, ...], mask: Any) -> tuple[Mask, int]:
    """``(mask, devices)``: the checked mask, and the number of devices that share the
    statistics over ``norm.axis_name`` (an error if it is not bound)."""
    mask = checks.check_mask(mask, x_shape)
    devices = checks.bound_axis_size(norm.axis_name, norm.axis_index_groups, type(norm).__name__)
    return mask, devices


def other_axes(ndim: int, kept: tuple[int, ...], first: int = 0) -> tuple[int, ...]:
    """The axes ``first..ndim-1`` that are not in ``kept``: the reduced axes."""
    return tuple(i for i in range(first, ndim) if i not in kept)


def check_single_value(values: int, allow: bool, message: str) -> None:
    """Raises ``ValueError(message)`` when a statistic would see one value and not ``allow``.

    ``values`` is the number of positions each statistic is taken over
    (across devices too); a mask can only lower it, so it is not consulted.
    """
    if values <= 1 and not allow:
        raise ValueError(
            f"{message} Pass allow_single_value=True to compute it anyway (variance 0: "
            f"the output is the bias), as Flax does."
        )


def batch_mask(
    norm: Any, x_shape: tuple[int, ...], reduce_axes: tuple[int, ...], mask: Any
) -> Mask:
    """The checked ``mask`` of a BatchNorm-like training step over ``reduce_axes``.

    Raises for an unbound ``norm.axis_name`` and, unless
    ``norm.allow_single_value``, for a single value per feature in the whole
    (multi-device) batch.
    """
    mask, devices = checked_mask(norm, x_shape, mask)
    check_single_value(
        math.prod(x_shape[i] for i in reduce_axes) * devices,
        norm.allow_single_value,
        f"{type(norm).__name__}: training with a single value per feature (x.shape="
        f"{tuple(x_shape)}, axis={norm.axis!r}) has no meaningful variance; use a batch of "
        f"2 or more, or training=False.",
    )
    return mask


def check_example_call(
    norm: Any, params: Any, x: Any, training: Any, mask: Any
) -> tuple[jax.Array, tuple[int, ...], Affine, Mask]:
    """``(x, reduce_axes, affine, mask)`` for LayerNorm-like ``norm`` (statistics of each
    example over ``norm.reduction_axes``, scale and bias along ``norm.feature_axes``),
    after every check of the call."""
    check_training(training, type(norm).__name__)
    x = check_x(x)
    reduce_axes = checks.resolve_axes(norm.reduction_axes, x.ndim, "reduction_axes")
    feature_axes = checks.resolve_axes(norm.feature_axes, x.ndim, "feature_axes")
    aff = checked_affine(norm, params, x, feature_axes, "feature_axes")
    mask, _ = checked_mask(norm, x.shape, mask)
    return x, reduce_axes, aff, mask


def out_dtype(norm: Any, x: jax.Array) -> jnp.dtype:
    """The output dtype: ``norm.dtype``, or ``x``'s when that is None."""
    return jnp.dtype(norm.dtype or x.dtype)


# ------------------------------------------------------------------ computation


def stats_config(
    norm: Any, reduce_axes: tuple[int, ...], out: jnp.dtype, *, sync: bool = True
) -> StatsConfig:
    """The core's configuration for statistics over ``reduce_axes`` with ``norm``'s
    ``epsilon``, ``use_fast_variance`` and (when ``sync``) ``axis_name``."""
    return StatsConfig(
        axes=reduce_axes,
        epsilon=float(norm.epsilon),
        out_dtype=out,
        axis_name=norm.axis_name if sync else None,
        axis_index_groups=norm.axis_index_groups if sync else None,
        fast_variance=norm.use_fast_variance,
    )


def normalize_with(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    affine_: Affine,
    feature_axes: tuple[int, ...],
    epsilon: float,
    out: Any,
) -> jax.Array:
    """Eval-mode normalization with given feature-shaped (e.g. running) statistics.

    One multiply-add per element.
    """
    mean = broadcastable(mean, x.ndim, feature_axes)
    var = broadcastable(var, x.ndim, feature_axes)
    inv = lax.rsqrt(var + jnp.asarray(epsilon, var.dtype))
    return affine(x, mean, inv, affine_.scale, affine_.bias, out)


def update_state(
    norm: Any,
    state: State,
    stats: tuple[jax.Array, jax.Array, jax.Array],
    shape: tuple[int, ...],
    *,
    unbiased: bool | None = None,
) -> State:
    """``state`` updated with the batch ``(mean, var, count)`` (any shape of ``shape``'s size).

    Uses ``norm.momentum``; ``unbiased`` defaults to
    ``norm.unbiased_running_var`` (pass False for statistics that
    :func:`average_stats` already made unbiased).
    """
    mean, var, count = (v.reshape(shape) for v in stats)
    if unbiased is None:
        unbiased = norm.unbiased_running_var
    return update_running(state, mean, var, count, momentum=norm.momentum, unbiased=unbiased)


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
    mean, var, count = (lax.stop_gradient(a) for a in (mean, var, count))
    if unbiased:
        var = var * count / jnp.maximum(count - 1, 1)
    sums = jnp.stack([jnp.sum(count * mean, 0), jnp.sum(count * var, 0), jnp.sum(count, 0)])
    sums = group_sum(sums, axis_name, axis_index_groups)
    safe = jnp.maximum(sums[2], 1)
    return sums[0] / safe, sums[1] / safe, sums[2]


# ------------------------------------------------------------- functional forms


def functional(cls: type, name: str, example: str) -> Callable[..., tuple[jax.Array, State]]:
    """The functional form ``name(params, state, x, *, training, mask=None, **config)``
    of the normalizer ``cls``: ``cls(**config).apply(params, state, x, ...)``."""

    def fn(
        params: Params,
        state: State,
        x: jax.Array,
        *,
        training: bool,
        mask: Mask = None,
        **config: Any,
    ) -> tuple[jax.Array, State]:
        return cls(**config).apply(params, state, x, training=training, mask=mask)

    layer = cls.__name__
    summary = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".")
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = cls.__module__
    fn.__doc__ = functional_doc(layer, summary, example)
    return fn


def functional_doc(layer: str, summary: str, example: str, extra_args: str = "") -> str:
    """The docstring of the functional form of the normalizer class ``layer``."""
    return (
        f"{summary} (functional form of :class:`{layer}`).\n\n"
        f"    ``{layer}(**config).apply(params, state, x, training=..., mask=...)``; see\n"
        f"    :class:`{layer}` for the formula, the conventions and the paper.\n\n"
        f"    Args:\n"
        f"      params: the parameters from ``{layer}(**config).init``.\n"
        f"      state: the state from ``{layer}(**config).init``.\n"
        f"      x: floating-point input.\n"
        f"      training: keyword only; as in :meth:`{layer}.apply`.\n"
        f"      mask: boolean array broadcastable to ``x``; only True elements enter\n"
        f"        the statistics.\n"
        f"{extra_args}"
        f"      **config: the fields of :class:`{layer}` (validated on every call).\n\n"
        f"    Returns:\n"
        f"      ``(y, new_state)``, as :meth:`{layer}.apply`.\n\n"
        f"    Example::\n\n        {example}\n    "
    )


# ------------------------------------------- parameters beyond scale and bias


def named_params(
    inits: Mapping[str, Initializer | None],
    shape: tuple[int, ...],
    key: jax.Array | None,
    dtype: Any,
) -> Params:
    """One ``shape``-d parameter per name of ``inits`` whose initializer is not None,
    in ``dtype``, each from its own key (split from ``key``, or from
    ``jax.random.key(0)`` without one). For normalizers with parameters besides
    ``scale`` and ``bias`` (FRN's ``tau``, EvoNorm's ``v``)."""
    keys = jax.random.split(jax.random.key(0) if key is None else key, len(inits))
    return {
        name: jnp.asarray(init(k, shape, dtype), dtype)
        for (name, init), k in zip(inits.items(), keys, strict=True)
        if init is not None
    }


def checked_params(
    norm: Any,
    inits: Mapping[str, Any],
    params: Any,
    x: jax.Array,
    feature_axes: tuple[int, ...],
    axis_arg: str,
    running: Mapping[str, jax.Array] | None = None,
) -> dict[str, jax.Array | None]:
    """The parameters ``norm`` uses (the names of ``inits`` whose value is not None)
    from ``params``, checked against ``x``'s feature shape along ``feature_axes``
    (``axis_arg`` names the field that gives them), as are the ``running`` state
    arrays, and made broadcastable against ``x``; None for the names not in use."""
    layer = type(norm).__name__
    if not isinstance(params, Mapping):
        raise TypeError(f"{layer}: params must be a dict, got {type(params).__name__}.")
    arrays: dict[str, Any] = {}
    for name, init in inits.items():
        if init is not None and name not in params:
            raise ValueError(
                f"{layer}: params has no {name!r} (keys: {sorted(params)}) but this "
                f"configuration uses it; build params with {layer}.init."
            )
        arrays[f"params[{name!r}]"] = None if init is None else jnp.asarray(params[name])
    for name, value in (running or {}).items():
        arrays[f"state[{name!r}]"] = value
    checks.check_features(x.shape, feature_axes, arrays, getattr(norm, axis_arg), axis_arg)
    return {
        name: broadcastable(arrays[f"params[{name!r}]"], x.ndim, feature_axes) for name in inits
    }
