"""Helpers the normalizers call by name; each takes explicit values.

Each normalizer's ``apply`` reads top to bottom:

1. :func:`check_call`: the checks every call needs (``training`` a bool, ``x``
   an array, ``params`` and ``state`` dicts, the mask a boolean array) and the
   call's :class:`Signature`, its static shapes.
2. The normalizer's own ``_layout(norm, signature)``, cached per
   configuration and signature (``functools.lru_cache``): the axes, the
   core's :class:`StatsConfig` and every shape check, with its message. It
   runs once per configuration and input shape, not on every call.
3. The core: ``batch_normalize`` (or a statistic of ``bn_jax._core.stats``)
   and ``update_running``.

:class:`BatchFields` declares the fields BatchNorm and its variants share
(fields only: no normalizer subclasses another).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn_jax._core import checks, stats
from bn_jax._core.checks import Groups
from bn_jax._core.normalize import StatsConfig, affine, normalizing_function
from bn_jax._core.stats import group_sum

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
Params = dict[str, jax.Array]
State = dict[str, jax.Array]
Mask = jax.Array | None
Shapes = tuple[tuple[str, tuple[int, ...]], ...]


# ------------------------------------------------------------------- configuration


def freeze(norm: Any, **values: Any) -> None:
    """Stores the canonical ``values`` of fields of the frozen dataclass ``norm``."""
    for name, value in values.items():
        object.__setattr__(norm, name, value)


class CommonFields(Protocol):
    """The fields every normalizer has."""

    @property
    def epsilon(self) -> float: ...
    @property
    def dtype(self) -> Any: ...
    @property
    def param_dtype(self) -> Any: ...
    @property
    def axis_name(self) -> Hashable | None: ...
    @property
    def axis_index_groups(self) -> Groups: ...


class StatsFields(CommonFields, Protocol):
    """The fields of a normalizer whose statistics are ``bn_jax._core`` moments."""

    @property
    def use_fast_variance(self) -> bool: ...


def check_common(norm: CommonFields, **axes: Any) -> None:
    """Validates the fields every normalizer has (in its ``__post_init__``): stores
    ``axis_index_groups`` as a hashable tuple of tuples and each axis field of
    ``axes`` (``name=value``) as an int or a tuple of ints."""
    checks.check_epsilon(norm.epsilon)
    checks.check_float_dtype("dtype", norm.dtype, allow_complex=True)
    checks.check_float_dtype("param_dtype", norm.param_dtype, allow_none=False)
    groups = checks.canonical_groups(norm.axis_index_groups, norm.axis_name)
    freeze(norm, axis_index_groups=groups, **canonical_axes(**axes))


def canonical_axes(**axes: Any) -> dict[str, int | tuple[int, ...]]:
    """Each axis field (``name=value``) as an int or a tuple of ints, or a TypeError
    naming it; for :func:`freeze`."""
    return {name: checks.canonical_axis(value, name) for name, value in axes.items()}


def check_int(name: str, value: Any, *, positive: bool = False) -> int:
    """``value`` as an int (a positive one when ``positive``), or an error naming ``name``."""
    what = "a positive int" if positive else "an int"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be {what}, got {value!r}.")
    if positive and value <= 0:
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return int(value)


def check_groups(layer: str, num_groups: Any, group_size: Any) -> tuple[int | None, int | None]:
    """``(num_groups, group_size)`` checked: exactly one of them set, a positive int."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"{layer} needs exactly one of num_groups and group_size, got "
            f"num_groups={num_groups!r} and group_size={group_size!r}; to give group_size, "
            f"pass num_groups=None as well (num_groups defaults to 32)."
        )
    if num_groups is not None:
        return check_int("num_groups", num_groups, positive=True), None
    return None, check_int("group_size", group_size, positive=True)


def group_count(
    layer: str, channels: int, num_groups: int | None, group_size: int | None, feature_axis: int
) -> int:
    """The number of groups of ``channels`` (``num_groups``, or ``channels /
    group_size``), or a ValueError that says what divides."""
    if group_size is None:
        # check_groups leaves exactly one of the two set, so num_groups is an int here
        arg, divisor = f"num_groups={num_groups}", cast(int, num_groups)
    else:
        arg, divisor = f"group_size={group_size}", group_size
    if channels % divisor:
        raise ValueError(
            f"{layer}: {arg} does not divide the {channels} channels along "
            f"feature_axis={feature_axis}; pick a divisor of {channels}."
        )
    return divisor if group_size is None else channels // divisor


@dataclasses.dataclass(frozen=True, kw_only=True)
class NormFields:
    """The configuration fields most normalizers share: learned ``scale`` and
    ``bias``, dtypes and the devices that share statistics (documented on each
    normalizer). Fields only: no normalizer subclasses another."""

    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = jax.nn.initializers.ones
    bias_init: Initializer = jax.nn.initializers.zeros
    axis_name: Hashable | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchFields(NormFields):
    """The configuration fields of BatchNorm and its variants (documented on
    :class:`bn_jax.BatchNorm`)."""

    momentum: float | None = 0.99
    epsilon: float = 1e-5
    axis: int | tuple[int, ...] = -1
    use_fast_variance: bool = False
    unbiased_running_var: bool = False
    allow_single_value: bool = False
    count_skipped: bool = False


def check_batch_fields(norm: BatchFields) -> None:
    """Validates and canonicalizes the :class:`BatchFields` of ``norm`` (in its
    ``__post_init__``)."""
    checks.check_momentum(norm.momentum)
    check_common(norm, axis=norm.axis)


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


def affine_inits(norm: NormFields) -> dict[str, Initializer | None]:
    """The initializers of ``scale`` and ``bias`` for :func:`init_params` (None where
    ``use_scale`` / ``use_bias`` is False)."""
    return {
        "scale": norm.scale_init if norm.use_scale else None,
        "bias": norm.bias_init if norm.use_bias else None,
    }


def init_affine(norm: NormFields, shape: tuple[int, ...], key: jax.Array | None) -> Params:
    """``{"scale", "bias"}`` of ``shape``, those in use (``use_scale``, ``use_bias``)."""
    return init_params(shape, key, norm.param_dtype, **affine_inits(norm))


def centered_scale_init(scale_init: Initializer, zero_centered_scale: bool) -> Initializer:
    """The initializer of a stored ``scale``: with ``zero_centered_scale`` the layer
    multiplies by ``1 + scale``, so the default ``ones`` becomes ``zeros`` (the same
    starting layer); any other initializer is used as given, for the stored value."""
    if zero_centered_scale and scale_init is jax.nn.initializers.ones:
        return jax.nn.initializers.zeros
    return scale_init


def zero_centered(scale: jax.Array | None, zero_centered_scale: bool) -> jax.Array | None:
    """The multiplier of a layer whose stored scale is ``scale``: ``1 + scale`` (in at
    least float32) with ``zero_centered_scale``, else ``scale``."""
    if scale is None or not zero_centered_scale:
        return scale
    return 1 + scale.astype(checks.stat_dtype(scale.dtype))


def init_params(
    shape: tuple[int, ...], key: jax.Array | None, param_dtype: Any, **inits: Initializer | None
) -> Params:
    """One parameter of ``shape`` per initializer in ``inits`` (an unused parameter
    has None and is left out), in ``param_dtype``, in the order given."""
    keys = jax.random.split(jax.random.key(0) if key is None else key, max(2, len(inits)))
    return {
        name: jnp.asarray(init(k, shape, param_dtype), param_dtype)
        for (name, init), k in zip(inits.items(), keys, strict=False)
        if init is not None
    }


def running_keys(momentum: float | None, count_skipped: bool) -> tuple[str, ...]:
    """The keys of running statistics: ``mean``, ``var``, a ``count`` with
    ``momentum=None`` and a ``skipped`` counter with ``count_skipped=True``."""
    keys = ("mean", "var") if momentum is not None else ("mean", "var", "count")
    return (*keys, "skipped") if count_skipped else keys


def init_running(
    shape: tuple[int, ...], param_dtype: Any, momentum: float | None, count_skipped: bool
) -> State:
    """Running ``mean`` 0 and ``var`` 1 (in ``param_dtype`` if wider than float32),
    and int32 zeros for the ``count`` and ``skipped`` counters in use."""
    dt = checks.stat_dtype(param_dtype)
    start = {"mean": jnp.zeros(shape, dt), "var": jnp.ones(shape, dt)}
    keys = running_keys(momentum, count_skipped)
    return {k: start.get(k, jnp.zeros(shape, jnp.int32)) for k in keys}


# ------------------------------------------------------------------ every call


class Signature(NamedTuple):
    """The static facts of one call that its checks and layout depend on."""

    shape: tuple[int, ...]  # x's
    dtype: Any  # x's
    params: Shapes  # (name, shape) of each parameter
    state: Shapes | None  # (name, shape) of each state entry; None if it is not a dict
    training: bool
    devices: int  # devices that share the statistics over axis_name (1 without)
    vmapped: bool  # the statistics are pooled over a jax.vmap axis

    @property
    def ndim(self) -> int:
        return len(self.shape)


def check_call(
    norm: CommonFields,
    params: Any,
    state: Any,
    x: Any,
    mask: Any,
    training: Any,
    *,
    sync_in_eval: bool = True,
) -> tuple[jax.Array, Mask, Signature]:
    """The checks of every call of ``norm``; returns ``(x, mask, signature)``.

    ``training`` must be a Python bool, ``x`` a floating-point (or complex)
    array, ``params`` a dict and ``mask`` broadcastable to ``x`` (returned as a
    boolean array). ``norm.axis_name`` must be bound where the call
    synchronizes: in training, and in evaluation too unless ``sync_in_eval`` is
    False (a normalizer that evaluates with running statistics).
    """
    layer = type(norm).__name__
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(
            f"{layer}.apply: training must be a Python bool (it picks the code path when "
            f"tracing), got {type(training).__name__}; to switch at run time use "
            f"jax.lax.cond over two apply calls."
        )
    checks.check_input(x, allow_complex=True)
    if not isinstance(params, Mapping):
        raise TypeError(f"{layer}: params must be a dict, got {type(params).__name__}.")
    x = jnp.asarray(x)
    if mask is not None:
        mask = checks.check_mask(mask, x.shape)
    devices, vmapped = 1, False
    if norm.axis_name is not None and (training or sync_in_eval):
        devices = checks.bound_axis_size(norm.axis_name, norm.axis_index_groups, layer)
        vmapped = stats.vmapped(norm.axis_name)
    shapes = None
    if isinstance(state, Mapping):
        shapes = tuple((k, tuple(jnp.shape(v))) for k, v in state.items())
    sig = Signature(
        x.shape,
        x.dtype,
        tuple((k, tuple(jnp.shape(v))) for k, v in params.items()),
        shapes,
        bool(training),
        devices,
        vmapped,
    )
    return x, mask, sig


def check_state_keys(layer: str, state: Shapes | None, need: Sequence[str]) -> None:
    """Raises unless ``state`` (a call's state shapes, None if not a dict) has every key
    in ``need``."""
    have = {k for k, _ in state or ()}
    if state is None or not set(need) <= have:
        got = "is not a dict" if state is None else f"has keys {sorted(have)}"
        raise ValueError(
            f"{layer}: state {got} but needs {sorted(need)}; build it with {layer}.init "
            f"(momentum=None adds 'count', count_skipped=True adds 'skipped')."
        )


def check_features(
    layer: str,
    sig: Signature,
    feature_axes: tuple[int, ...],
    params: Sequence[str],
    state: Sequence[str] = (),
    *,
    axis_arg: str,
    axis: Any,
) -> tuple[int, ...]:
    """The feature shape of ``x`` along ``feature_axes``; raises unless each of the
    ``params`` (which must be present) and ``state`` entries has that shape.

    ``axis`` is the user's value of the layer's feature-axis field, which the
    message names as ``axis_arg``.
    """
    have = dict(sig.params)
    for name in params:
        if name not in have:
            raise ValueError(
                f"{layer}: params has no {name!r} (keys: {sorted(have)}) but this "
                f"configuration uses it; build params with {layer}.init."
            )
    shapes = {f"params[{n!r}]": have[n] for n in params}
    shapes.update({f"state[{n!r}]": dict(sig.state or ())[n] for n in state})
    return checks.check_features(sig.shape, feature_axes, shapes, axis, axis_arg)


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


def other_axes(ndim: int, kept: tuple[int, ...], first: int = 0) -> tuple[int, ...]:
    """The axes ``first..ndim-1`` that are not in ``kept``: the reduced axes."""
    return tuple(i for i in range(first, ndim) if i not in kept)


def broadcast_shape(ndim: int, axes: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape that puts ``sizes`` along ``axes`` of a rank-``ndim`` input, 1 elsewhere."""
    shape = [1] * ndim
    for a, s in zip(axes, sizes, strict=True):
        shape[a] = s
    return tuple(shape)


def check_real(layer: str, sig: Signature, why: str = "") -> None:
    """Raises for complex input to a normalizer that takes real input only."""
    if jnp.issubdtype(sig.dtype, jnp.complexfloating):
        raise TypeError(
            f"{layer} takes real input{why}: x has dtype {sig.dtype}. Complex input works with "
            f"BatchNorm, LayerNorm, RMSNorm, GroupNorm and InstanceNorm."
        )


def check_saving_output(layer: str, memory_efficient: bool, sig: Signature) -> None:
    """Raises for complex input to a memory-efficient layer (its backward pass is
    written for real input)."""
    if memory_efficient:
        check_real(f"{layer}(memory_efficient=True)", sig, "; use memory_efficient=False")


def out_dtype(dtype: Any, sig: Signature) -> jnp.dtype:
    """The output dtype: ``dtype``, or ``x``'s when that is None."""
    return jnp.dtype(dtype or sig.dtype)


def stats_config(norm: StatsFields, axes: tuple[int, ...], sig: Signature) -> StatsConfig:
    """The core's configuration for statistics over ``axes`` with ``norm``'s
    epsilon, output dtype, devices and variance formula."""
    return StatsConfig(
        axes,
        float(norm.epsilon),
        out_dtype(norm.dtype, sig),
        norm.axis_name,
        norm.axis_index_groups,
        norm.use_fast_variance,
        custom_derivative=not sig.vmapped,
    )


# --------------------------------------------------------- BatchNorm and variants


class Layout(NamedTuple):
    """What a BatchNorm-like ``apply`` needs to know about a call, checked once."""

    feature_axes: tuple[int, ...]
    features: tuple[int, ...]  # the shape of params and running statistics
    pshape: tuple[int, ...]  # ``features`` broadcastable against x
    cfg: StatsConfig  # the batch statistics: reduced axes, epsilon, output dtype, devices
    used: tuple[str, ...]  # the parameters in use ("scale", "bias")
    normalize: Callable[..., tuple[jax.Array, ...]]  # batch_normalize, or its plain form


@functools.lru_cache(maxsize=512)
def batch_layout(norm: BatchFields, layer: str, sig: Signature) -> Layout:
    """The :class:`Layout` of a BatchNorm-like call: statistics of each feature along
    ``norm.axis`` over every other axis and device; state with running statistics."""
    feature_axes = checks.resolve_axes(norm.axis, sig.ndim)
    check_state_keys(layer, sig.state, running_keys(norm.momentum, norm.count_skipped))
    used = tuple(n for n, use in (("scale", norm.use_scale), ("bias", norm.use_bias)) if use)
    features = check_features(
        layer, sig, feature_axes, used, ("mean", "var"), axis_arg="axis", axis=norm.axis
    )
    reduce_axes = other_axes(sig.ndim, feature_axes)
    check_batch_values(norm, layer, sig, reduce_axes)
    cfg = stats_config(norm, reduce_axes, sig)
    pshape = broadcast_shape(sig.ndim, feature_axes, features)
    return Layout(feature_axes, features, pshape, cfg, used, normalizing_function(cfg))


def init_batch(norm: BatchFields, features: Any, key: jax.Array | None) -> tuple[Params, State]:
    """A BatchNorm-like normalizer's ``(params, state)`` for ``features`` along
    ``norm.axis``: scale and bias, and running statistics (mean 0, var 1, and the
    counters in use)."""
    shape = feature_shape(features, norm.axis, type(norm).__name__)
    state = init_running(shape, norm.param_dtype, norm.momentum, norm.count_skipped)
    return init_affine(norm, shape, key), state


def check_batch_values(
    norm: BatchFields, layer: str, sig: Signature, reduce_axes: tuple[int, ...]
) -> None:
    """In training, raises for a single value per feature over ``reduce_axes`` and the
    devices, unless ``norm.allow_single_value``."""
    if sig.training:
        check_single_value(
            math.prod(sig.shape[i] for i in reduce_axes) * sig.devices,
            norm.allow_single_value,
            f"{layer}: training with a single value per feature (x.shape={sig.shape}, "
            f"axis={norm.axis!r}) has no meaningful variance; use a batch of 2 or more, or "
            f"training=False.",
        )


def normalize_with(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    epsilon: float,
    out: Any,
) -> jax.Array:
    """Eval-mode normalization with given (e.g. running) statistics that broadcast
    against ``x``: one multiply-add per element."""
    inv = lax.rsqrt(var + jnp.asarray(epsilon, var.dtype))
    return affine(x, mean, inv, scale, bias, out)


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
