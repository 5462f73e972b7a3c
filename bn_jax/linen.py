"""``flax.linen`` layers over the bn_jax core.

Swap one import and keep the rest of a Flax model::

    import flax.linen as nn
    from bn_jax import linen as bnn        # instead of nn.BatchNorm

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(64, (3, 3))(x)
            x = bnn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            return nn.relu(x)

:class:`BatchNorm`, :class:`LayerNorm`, :class:`RMSNorm`, :class:`GroupNorm`
and :class:`InstanceNorm` subclass the ``flax.linen`` layer of the same name:
they inherit its fields (same order, same defaults, except the stable
``use_fast_variance=False``), take its call arguments, create the same
variables (``params``: ``scale`` / ``bias``; ``batch_stats``: ``mean`` /
``var``) and pass ``isinstance`` checks against it. After Flax's fields come
the options of the bn_jax normalizer that Flax lacks (e.g.
``unbiased_running_var``, ``allow_single_value``). :class:`BatchRenorm`,
:class:`GhostBatchNorm` and :class:`SequenceBatchNorm` take
``use_running_average`` and the options of their normalizer.

Each class's ``__call__`` hands its call to :func:`_call`, which reads the
layer's variables, runs the bn_jax normalizer's ``apply`` and writes the
running statistics back. ``with patch(**overrides):`` makes every
``flax.linen`` norm layer compute with bn_jax, without editing the model.
The deliberate differences from Flax are listed in the documentation's Flax
page.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from flax.linen import dtypes

import bn_jax
from bn_jax import _layers
from bn_jax._linen_tools import fold, recalibrate
from bn_jax.norms._common import Initializer, centered_scale_init
from bn_jax.norms.batch_renorm import Schedule
from bn_jax.norms.filter_response_norm import default_eps_init

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "SequenceBatchNorm",
    "fold",
    "patch",
    "recalibrate",
]


class BatchNorm(nn.BatchNorm):
    """Batch Normalization: drop-in for ``flax.linen.BatchNorm``, computed by
    :class:`bn_jax.BatchNorm`.

    Flax's fields, order and defaults (except the stable
    ``use_fast_variance=False``), call arguments and variables; then the
    options Flax lacks: ``unbiased_running_var``, ``allow_single_value``
    (default True here, as Flax computes one value per feature) and
    ``count_skipped``. ``momentum=None`` keeps an exact cumulative average (a
    ``count`` joins ``batch_stats``). See :class:`bn_jax.BatchNorm` for the
    formula and the conventions, and the Flax page of the documentation for
    every deliberate difference from Flax.
    """

    momentum: float | None = 0.99  # type: ignore[assignment]  # None: a cumulative average
    use_fast_variance: bool = False
    unbiased_running_var: bool = False
    allow_single_value: bool = True
    count_skipped: bool = False

    @nn.compact
    def __call__(
        self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalizes ``x`` with batch statistics (updating the running ones) or the
        running statistics when ``use_running_average`` (this argument or the field)."""
        use_ra = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        return _call(self, bn_jax.BatchNorm, x, not use_ra, mask)


class LayerNorm(nn.LayerNorm):
    """Layer Normalization: drop-in for ``flax.linen.LayerNorm``, computed by
    :class:`bn_jax.LayerNorm`.

    Flax's fields, order and defaults (except the stable
    ``use_fast_variance=False``), call arguments and variables; then
    ``memory_efficient`` (a backward pass computed from the output) and
    ``zero_centered_scale`` (multiply by ``1 + scale``, ``scale`` starting at 0);
    see :class:`bn_jax.LayerNorm`.
    """

    use_fast_variance: bool = False
    memory_efficient: bool = False
    zero_centered_scale: bool = False

    @nn.compact
    def __call__(self, x: Any, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes each example of ``x`` over ``reduction_axes``."""
        return _call(self, bn_jax.LayerNorm, x, True, mask)


class RMSNorm(nn.RMSNorm):
    """RMS normalization: drop-in for ``flax.linen.RMSNorm``, computed by
    :class:`bn_jax.RMSNorm`.

    Flax's fields, order and defaults, call arguments and variables; then
    ``memory_efficient`` (a backward pass computed from the output) and
    ``zero_centered_scale`` (multiply by ``1 + scale``, ``scale`` starting at 0);
    see :class:`bn_jax.RMSNorm`. ``use_fast_variance`` is kept for Flax's
    signature (an RMS has no mean to subtract).
    """

    use_fast_variance: bool = False
    memory_efficient: bool = False
    zero_centered_scale: bool = False

    @nn.compact
    def __call__(self, x: Any, *, mask: jax.Array | None = None) -> jax.Array:
        """Rescales each example of ``x`` by its root mean square over ``reduction_axes``."""
        return _call(self, bn_jax.RMSNorm, x, True, mask)


class GroupNorm(nn.GroupNorm):
    """Group Normalization: drop-in for ``flax.linen.GroupNorm``, computed by
    :class:`bn_jax.GroupNorm`.

    Flax's fields, order and defaults (except the stable
    ``use_fast_variance=False``), call arguments and variables; then
    ``feature_axis`` (the grouped channel axis, last by default as in Flax) and
    ``memory_efficient`` (see :class:`bn_jax.GroupNorm`).
    """

    use_fast_variance: bool = False
    feature_axis: int = -1
    memory_efficient: bool = False

    @nn.compact
    def __call__(self, x: Any, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes each group of channels of each example of ``x``."""
        return _call(self, bn_jax.GroupNorm, x, True, mask)


class InstanceNorm(nn.InstanceNorm):
    """Instance Normalization: drop-in for ``flax.linen.InstanceNorm``, computed by
    :class:`bn_jax.InstanceNorm`.

    Flax's fields, order and defaults (except the stable
    ``use_fast_variance=False``), call arguments and variables; then
    PyTorch's optional running statistics (``track_running_stats``,
    ``momentum``, ``unbiased_running_var``), ``allow_single_value`` (default
    True, as Flax), ``count_skipped`` and ``use_running_average`` (used when
    ``track_running_stats``).
    """

    use_fast_variance: bool = False
    track_running_stats: bool = False
    momentum: float | None = 0.99
    unbiased_running_var: bool = False
    allow_single_value: bool = True
    count_skipped: bool = False
    use_running_average: bool | None = None

    @nn.compact
    def __call__(
        self, x: Any, *, mask: jax.Array | None = None, use_running_average: bool | None = None
    ) -> jax.Array:
        """Normalizes each channel of each example of ``x``; with
        ``track_running_stats``, ``use_running_average`` picks the running statistics."""
        training = True
        if self.track_running_stats:
            training = not nn.merge_param(
                "use_running_average", self.use_running_average, use_running_average
            )
        return _call(self, bn_jax.InstanceNorm, x, training, mask)


class _BatchFields(nn.Module):
    """The fields of the BatchNorm variants: :class:`bn_jax.BatchNorm`'s, with
    ``use_running_average`` and the drop-in default ``allow_single_value=True``."""

    use_running_average: bool | None = None
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    axis: int | tuple[int, ...] = -1
    axis_name: Hashable | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = jax.nn.initializers.ones
    bias_init: Initializer = jax.nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_fast_variance: bool = False
    unbiased_running_var: bool = False
    allow_single_value: bool = True
    count_skipped: bool = False


class BatchRenorm(_BatchFields):
    """Batch Renormalization as a ``flax.linen`` module, computed by
    :class:`bn_jax.BatchRenorm` (same fields, plus ``use_running_average``)."""

    rmax: Schedule = 3.0
    dmax: Schedule = 5.0

    @nn.compact
    def __call__(
        self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalizes ``x`` (renormalized batch statistics, or the running ones when
        ``use_running_average``)."""
        use_ra = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        return _call(self, bn_jax.BatchRenorm, x, not use_ra, mask)


class GhostBatchNorm(_BatchFields):
    """Ghost Batch Normalization as a ``flax.linen`` module, computed by
    :class:`bn_jax.GhostBatchNorm` (same fields, plus ``use_running_average``;
    ``virtual_batch_size`` is required)."""

    virtual_batch_size: int = dataclasses.field(kw_only=True)

    @nn.compact
    def __call__(
        self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalizes ``x`` with the statistics of each virtual batch, or the running
        ones when ``use_running_average``."""
        use_ra = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        return _call(self, bn_jax.GhostBatchNorm, x, not use_ra, mask)


class SequenceBatchNorm(_BatchFields):
    """Recurrent Batch Normalization as a ``flax.linen`` module, computed by
    :class:`bn_jax.SequenceBatchNorm` (same fields, plus ``use_running_average``;
    ``max_steps`` is required)."""

    max_steps: int = dataclasses.field(kw_only=True)
    time_axis: int = 1

    @nn.compact
    def __call__(
        self,
        x: Any,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
        step: int | jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes a whole sequence, or the time step ``step`` of one (see
        :meth:`bn_jax.SequenceBatchNorm.apply`)."""
        use_ra = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        return _call(self, bn_jax.SequenceBatchNorm, x, not use_ra, mask, step=step)


class FilterResponseNorm(nn.Module):
    """Filter Response Normalization with the TLU as a ``flax.linen`` module, computed by
    :class:`bn_jax.FilterResponseNorm` (same fields; parameters ``scale``, ``bias``,
    ``tau`` and, with ``learned_epsilon``, ``eps``)."""

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    use_bias: bool = True
    use_tau: bool = True
    learned_epsilon: bool = False
    scale_init: Initializer = jax.nn.initializers.ones
    bias_init: Initializer = jax.nn.initializers.zeros
    tau_init: Initializer = jax.nn.initializers.zeros
    eps_init: Initializer = default_eps_init
    feature_axes: int | tuple[int, ...] = -1
    axis_name: Hashable | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None

    @nn.compact
    def __call__(self, x: Any, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes each channel of each example of ``x``, then applies the TLU."""
        return _call(self, bn_jax.FilterResponseNorm, x, True, mask)


class EvoNormB0(_BatchFields):
    """EvoNorm-B0 as a ``flax.linen`` module, computed by :class:`bn_jax.EvoNormB0`
    (same fields, plus ``use_running_average``; parameters ``scale``, ``bias``, ``v``;
    ``batch_stats``: ``var``)."""

    v_init: Initializer = jax.nn.initializers.ones

    @nn.compact
    def __call__(
        self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalizes ``x`` with the batch variance (updating the running one), or the
        running variance when ``use_running_average``."""
        use_ra = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        return _call(self, bn_jax.EvoNormB0, x, not use_ra, mask)


class EvoNormS0(nn.Module):
    """EvoNorm-S0 as a ``flax.linen`` module, computed by :class:`bn_jax.EvoNormS0`
    (same fields; parameters ``scale``, ``bias``, ``v``)."""

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = jax.nn.initializers.ones
    bias_init: Initializer = jax.nn.initializers.zeros
    v_init: Initializer = jax.nn.initializers.ones
    feature_axis: int = -1
    axis_name: Hashable | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    use_fast_variance: bool = False

    @nn.compact
    def __call__(self, x: Any, *, mask: jax.Array | None = None) -> jax.Array:
        """Applies EvoNorm-S0 to each example of ``x``."""
        return _call(self, bn_jax.EvoNormS0, x, True, mask)


# The Flax layers bn_jax computes, and the normalizer of each.
_NORMALIZERS: dict[type[nn.Module], type] = {
    nn.BatchNorm: bn_jax.BatchNorm,
    nn.LayerNorm: bn_jax.LayerNorm,
    nn.RMSNorm: bn_jax.RMSNorm,
    nn.GroupNorm: bn_jax.GroupNorm,
    nn.InstanceNorm: bn_jax.InstanceNorm,
}
_DROP_INS = (BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm)
_PATCH: dict[str, Any] = {}  # the overrides while patch() is active


def _call(module: Any, cls: Any, x: Any, training: bool, mask: Any, **kwargs: Any) -> jax.Array:
    """Runs ``module`` (a layer of this module, or a Flax layer under :func:`patch`)
    with the normalizer ``cls``: the variables in, the new running statistics out.

    The output dtype is Flax's: ``dtype``, else the promoted type of ``x`` and
    the parameters; integer input is normalized in float32. While
    initializing, no collective runs and one value per feature is allowed
    (``init``'s example input is often a dummy ``jnp.ones((1, C))``).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    initializing = module.is_initializing()
    changes = dict(_PATCH)
    if not isinstance(module, _DROP_INS + _FAMILY):  # a Flax layer under patch()
        changes = {**_layers.FLAX_DEFAULTS, **changes}
    if initializing:
        changes.update(axis_name=None, axis_index_groups=None, allow_single_value=True)
    norm = _layers.normalizer(cls, module, changes)
    param_specs, state_specs = _layers.variables(norm, x.shape)
    params = {}
    for name, spec in param_specs.items():
        if module.has_variable("params", name):  # shapes are checked by the core
            params[name] = meta.unbox(module.get_variable("params", name))
        else:
            init = getattr(module, f"{name}_init")
            if name == "scale":
                init = centered_scale_init(init, getattr(module, "zero_centered_scale", False))
            params[name] = module.param(name, init, spec.shape, spec.dtype)
    float32_stats = getattr(module, "force_float32_reductions", True)
    stats = {
        name: module.variable("batch_stats", name, _initial, norm, x, name, float32_stats)
        for name in state_specs
    }
    # Flax's rule under JAX's standard promotion, whatever jax_numpy_dtype_promotion
    # says: under "strict", Flax's own layers raise for bfloat16 x with float32
    # parameters; the core promotes explicitly in the same way.
    with jax.numpy_dtype_promotion("standard"):
        dtype = dtypes.canonicalize_dtype(x, *params.values(), dtype=module.dtype)
    if dtype != norm.dtype:
        norm = _layers.normalizer(cls, module, {**changes, "dtype": dtype})
    state = {name: v.value for name, v in stats.items()}
    y, new = norm.apply(params, state, x, training=training, mask=mask, **kwargs)
    if stats and training and not initializing:
        for name, v in stats.items():
            v.value = _layers.stored(new[name], v.value)
    return y


def _initial(norm: Any, x: jax.Array, name: str, float32_stats: bool) -> jax.Array:
    """The initial value of the running statistic ``name``; in ``param_dtype`` with
    Flax's ``force_float32_reductions=False``."""
    value = norm.init(jax.ShapeDtypeStruct(x.shape, jnp.float32))[1][name]
    if not float32_stats and jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(norm.param_dtype)
    return value


_FAMILY = (
    BatchRenorm,
    GhostBatchNorm,
    SequenceBatchNorm,
    FilterResponseNorm,
    EvoNormB0,
    EvoNormS0,
)


@contextlib.contextmanager
def patch(**overrides: Any) -> Iterator[None]:
    """Computes every ``flax.linen`` norm layer with bn_jax inside the ``with`` block.

    ``flax.linen.BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and
    ``InstanceNorm`` (and the drop-ins of this module) run bn_jax's
    normalizers, with the same variables, so a model and its checkpoints are
    used unchanged. The stable variance replaces Flax's fast one unless
    ``use_fast_variance=True`` is passed. ``overrides`` set bn_jax options for
    every layer that has them, whatever the model says: e.g.
    ``patch(axis_name="batch")`` makes every BatchNorm a count-weighted
    synchronized BatchNorm (PyTorch's ``SyncBatchNorm.convert_sync_batchnorm``).

    Example::

        with bn_jax.linen.patch(axis_name="batch"):
            y, updates = jax.shard_map(step, mesh=mesh, in_specs=..., out_specs=...)(...)

    Tracing happens inside the block: call (or first ``jit``-compile) the
    model there. Patches do not nest.

    Raises:
      TypeError: an override that no norm layer has.
      RuntimeError: ``patch`` is already active.
    """
    _layers.check_overrides(_NORMALIZERS.values(), overrides)
    if _PATCH:
        raise RuntimeError("bn_jax.linen.patch is already active; patches do not nest.")
    drop_ins = {flax_cls: ours for flax_cls, ours in zip(_NORMALIZERS, _DROP_INS, strict=True)}
    saved = {flax_cls: vars(flax_cls)["__call__"] for flax_cls in _NORMALIZERS}
    try:
        for flax_cls, ours in drop_ins.items():
            flax_cls.__call__ = vars(ours)["__call__"]  # type: ignore[method-assign]
        _PATCH.update(overrides, __active__=True)
        yield
    finally:
        _PATCH.clear()
        for flax_cls, call in saved.items():
            flax_cls.__call__ = call  # type: ignore[method-assign]
