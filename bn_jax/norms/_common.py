"""Pieces shared by the normalizers: validation, feature shapes, parameters, input checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn_jax._core import checks
from bn_jax._core.checks import resolve_axes
from bn_jax._core.normalize import StatsConfig, affine
from bn_jax._core.running import update_running
from bn_jax._core.stats import group_sum

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
Params = dict[str, jax.Array]
State = dict[str, jax.Array]


def check_training(training: Any, layer: str) -> bool:
    """``training`` as a bool; a TypeError unless it is a Python (or NumPy) bool."""
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(
            f"{layer}.apply: training must be a Python bool (it picks the code path when "
            f"tracing), got {type(training).__name__}; to switch at run time use "
            f"jax.lax.cond over two apply calls."
        )
    return bool(training)


def canonical_axes(axes: Any, name: str) -> int | tuple[int, ...]:
    """``checks.canonical_axis`` with a TypeError that names the field."""
    try:
        return checks.canonical_axis(axes)
    except TypeError:
        raise TypeError(f"{name} must be an int or a tuple of ints, got {axes!r}.") from None


class NormMixin:
    """Validation, ``init`` and ``apply`` pieces shared by the normalizer dataclasses.

    For frozen dataclasses with the fields ``epsilon``, ``dtype``,
    ``param_dtype``, ``use_scale``, ``scale_init``, ``axis_name``,
    ``axis_index_groups`` and, unless the normalizer has no bias (RMSNorm),
    ``use_bias`` and ``bias_init``. It declares no fields, so each class keeps
    its own field order, defaults and docstring.
    """

    @property
    def _name(self) -> str:
        return type(self).__name__

    @property
    def _use_bias(self) -> bool:
        return getattr(self, "use_bias", False)  # RMSNorm has no bias

    def _canonicalize_axes(self, *names: str) -> None:
        for name in names:
            object.__setattr__(self, name, canonical_axes(getattr(self, name), name))

    def _check_groups_and_dtypes(self) -> None:
        """The common end of ``__post_init__``."""
        object.__setattr__(
            self,
            "axis_index_groups",
            checks.canonical_groups(self.axis_index_groups, self.axis_name),
        )
        checks.check_float_dtype("dtype", self.dtype)
        checks.check_float_dtype("param_dtype", self.param_dtype, allow_none=False)

    def _init_params(self, shape: tuple[int, ...], key: jax.Array | None) -> Params:
        return init_affine(
            shape,
            use_scale=self.use_scale,
            use_bias=self._use_bias,
            scale_init=self.scale_init,
            bias_init=getattr(self, "bias_init", jax.nn.initializers.zeros),
            param_dtype=self.param_dtype,
            key=key,
        )

    def _init_running(self, shape: tuple[int, ...]) -> State:
        """Running ``mean`` 0 and ``var`` 1 (and ``count`` with ``momentum=None``)."""
        dt = checks.stat_dtype(self.param_dtype)
        state = {"mean": jnp.zeros(shape, dt), "var": jnp.ones(shape, dt)}
        if self.momentum is None:
            state["count"] = jnp.zeros(shape, jnp.int32)
        return state

    def _check_running_state(self, state: State) -> None:
        """Hook: raise for a ``state`` without running statistics (default: no check)."""

    def _affine(
        self,
        params: Params,
        x: jax.Array,
        feature_axes: tuple[int, ...],
        axis_arg: str,
        state: State | None = None,
    ) -> tuple[jax.Array | None, jax.Array | None, tuple[int, ...]]:
        """``(scale, bias, feature shape)``, checked against ``x`` (and ``state``).

        ``axis_arg`` is the name of the field that gives the feature axes
        (``axis``, ``feature_axes``, ...), for the error message.
        """
        scale, bias = get_affine(params, self.use_scale, self._use_bias, self._name)
        arrays = {"params['scale']": scale, "params['bias']": bias}
        if state is not None:
            self._check_running_state(state)
            arrays["state['mean']"], arrays["state['var']"] = state["mean"], state["var"]
        shape = checks.check_features(
            x.shape, feature_axes, arrays, getattr(self, axis_arg), axis_arg
        )
        return scale, bias, shape

    def _stats_config(
        self, reduce_axes: tuple[int, ...], out_dtype: jnp.dtype, *, sync: bool = True
    ) -> StatsConfig:
        return StatsConfig(
            axes=reduce_axes,
            epsilon=float(self.epsilon),
            out_dtype=out_dtype,
            axis_name=self.axis_name if sync else None,
            axis_index_groups=self.axis_index_groups if sync else None,
            fast_variance=self.use_fast_variance,
        )

    def _update(
        self,
        state: State,
        mean: jax.Array,
        var: jax.Array,
        count: jax.Array,
        shape: tuple[int, ...],
        *,
        unbiased: bool | None = None,
    ) -> State:
        """Running statistics updated with keepdims-shaped batch statistics.

        ``unbiased`` defaults to ``unbiased_running_var``; pass False for
        statistics that ``average_stats`` already made unbiased.
        """
        return update_running(
            state,
            mean.reshape(shape),
            var.reshape(shape),
            count.reshape(shape),
            momentum=self.momentum,
            unbiased=self.unbiased_running_var if unbiased is None else unbiased,
        )

    def _normalize_running(
        self,
        x: jax.Array,
        state: State,
        scale: Any,
        bias: Any,
        feature_axes: tuple[int, ...],
        out_dtype: Any,
    ) -> tuple[jax.Array, State]:
        """Evaluation mode: ``(y, state)`` normalized with ``state``'s running statistics."""
        y = normalize_with(
            x, state["mean"], state["var"], scale, bias, feature_axes, self.epsilon, out_dtype
        )
        return y, state


class PerExampleMixin(NormMixin):
    """Validation and input checks of LayerNorm and RMSNorm (``reduction_axes``,
    ``feature_axes``, statistics of each example)."""

    def __post_init__(self) -> None:
        checks.check_epsilon(self.epsilon)
        self._canonicalize_axes("reduction_axes", "feature_axes")
        self._check_groups_and_dtypes()

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, {})`` for ``features`` (a size, a tuple of sizes or an
        example input); ``params`` holds the ``scale`` / ``bias`` in use."""
        shape = feature_shape(features, self.feature_axes, self._name, "feature_axes")
        return self._init_params(shape, key), {}

    def _prepare(
        self, params: Params, x: jax.Array, training: Any, mask: jax.Array | None
    ) -> tuple[jax.Array, tuple[int, ...], Any, Any, jax.Array | None]:
        """Checks a call; returns ``x``, the reduced axes, broadcastable scale and bias,
        and the mask."""
        check_training(training, self._name)
        checks.check_input(x)
        x = jnp.asarray(x)
        reduce_axes = checks.resolve_axes(self.reduction_axes, x.ndim, "reduction_axes")
        feature_axes = checks.resolve_axes(self.feature_axes, x.ndim, "feature_axes")
        scale, bias, _ = self._affine(params, x, feature_axes, "feature_axes")
        mask = checks.check_mask(mask, x.shape)
        checks.bound_axis_size(self.axis_name, self.axis_index_groups, self._name)
        scale = broadcastable(scale, x.ndim, feature_axes)
        bias = broadcastable(bias, x.ndim, feature_axes)
        return x, reduce_axes, scale, bias, mask


def functional(cls: type, name: str, example: str) -> Callable[..., tuple[jax.Array, State]]:
    """The functional form ``name(params, state, x, *, training, mask=None, **config)``
    of the normalizer ``cls``: ``cls(**config).apply(params, state, x, ...)``."""

    def fn(
        params: Params,
        state: State,
        x: jax.Array,
        *,
        training: bool,
        mask: jax.Array | None = None,
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


def feature_shape(
    features: Any, axis: int | tuple[int, ...], layer: str, axis_arg: str = "axis"
) -> tuple[int, ...]:
    """The per-feature shape from ``num_features``, a tuple of sizes or an example array.

    ``axis`` is the value of the layer's feature-axis field, named ``axis_arg``
    in error messages.
    """
    if hasattr(features, "shape") and hasattr(features, "ndim"):
        axes = resolve_axes(axis, features.ndim, axis_arg)
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
            f"{n_axes} "
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


def normalize_with(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    feature_axes: tuple[int, ...],
    epsilon: float,
    out_dtype: Any,
) -> jax.Array:
    """Eval-mode normalization with given per-feature (e.g. running) statistics.

    ``mean`` / ``var`` are feature-shaped, ``scale`` / ``bias`` already
    broadcastable against ``x``. One multiply-add per element.
    """
    mean = broadcastable(mean, x.ndim, feature_axes)
    var = broadcastable(var, x.ndim, feature_axes)
    inv = lax.rsqrt(var + jnp.asarray(epsilon, var.dtype))
    return affine(x, mean, inv, scale, bias, out_dtype)


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
