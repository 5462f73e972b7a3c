"""``flax.nnx`` layers over the bn_jax core.

Swap one import and keep the rest of an NNX model::

    from flax import nnx
    from bn_jax import nnx as bnnx          # instead of nnx.BatchNorm

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
            self.bn = bnnx.BatchNorm(16, momentum=0.9, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.bn(self.conv(x)))

    model = Block(nnx.Rngs(0))
    model.train()        # batch statistics, running statistics updated
    model.eval()         # running statistics

:class:`BatchNorm`, :class:`LayerNorm`, :class:`RMSNorm`, :class:`GroupNorm`
and :class:`InstanceNorm` subclass the ``flax.nnx`` layer of the same name:
Flax's own constructor makes their attributes and variables (so
``nnx.state``, ``nnx.graphdef``, ``nnx.view``, ``set_attributes``,
``nnx.jit`` / ``scan`` / ``vmap`` see what they see with Flax's layer), they
take Flax's constructor and call arguments (same order and defaults, except
the stable ``use_fast_variance=False``) and pass ``isinstance`` checks. After
Flax's arguments come, keyword-only, the options of the bn_jax normalizer
that Flax lacks. :class:`BatchRenorm`, :class:`GhostBatchNorm` and
:class:`SequenceBatchNorm` take ``num_features``, ``use_running_average``, the
options of their normalizer, ``rngs`` and ``<param>_metadata``.

Each class's ``__call__`` hands its call to :func:`_call`, which reads the
layer's variables, runs the bn_jax normalizer's ``apply`` and writes the
running statistics back. :func:`convert` switches the norm layers of an
existing model to these classes in place, keeping their variables. The
deliberate differences from Flax are listed in the documentation's Flax page.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import canonicalize_dtype
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes
from flax.typing import Dtype, PromoteDtypeFn

import bn_jax
from bn_jax import _layers
from bn_jax._nnx_tools import fold, recalibrate
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
    "convert",
    "fold",
    "recalibrate",
]

M = TypeVar("M", bound=nnx.Module)
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _set_view(self: Any, use_running_average: bool | None = None) -> None:
    """Sets the mode for ``nnx.view``.

    Args:
      use_running_average: if True, normalize with the running statistics; if
        False, with the batch's (and update the running statistics).
    """
    if use_running_average is not None:
        self.use_running_average = use_running_average


class BatchNorm(nnx.BatchNorm):
    """Batch Normalization: drop-in for ``flax.nnx.BatchNorm``, computed by
    :class:`bn_jax.BatchNorm`.

    Flax's constructor arguments, order and defaults (except the stable
    ``use_fast_variance=False``), call arguments, attributes and variables;
    then, keyword-only, the options Flax lacks: ``unbiased_running_var``,
    ``allow_single_value`` (default True here, as Flax computes one value per
    feature) and ``count_skipped``. ``momentum=None`` keeps an exact
    cumulative average (a ``count`` ``BatchStat`` joins ``mean`` and
    ``var``). See :class:`bn_jax.BatchNorm` for the formula and conventions.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = jax.nn.initializers.zeros,
        scale_init: Initializer = jax.nn.initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        unbiased_running_var: bool = False,
        allow_single_value: bool = True,
        count_skipped: bool = False,
    ) -> None:
        # momentum=None (an exact cumulative average) is bn_jax's.
        super().__init__(
            num_features,
            use_running_average=use_running_average,
            axis=axis,
            momentum=momentum,  # type: ignore[arg-type]
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.unbiased_running_var = unbiased_running_var
        self.allow_single_value = allow_single_value
        self.count_skipped = count_skipped
        _add_variables(self, bn_jax.BatchNorm, num_features)

    def __call__(
        self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalizes ``x`` with batch statistics (updating the running ones) or the
        running statistics when ``use_running_average`` (this argument or the
        attribute)."""
        use_ra = _mode(self, use_running_average)
        return _call(self, bn_jax.BatchNorm, x, not use_ra, mask)


class LayerNorm(nnx.LayerNorm):
    """Layer Normalization: drop-in for ``flax.nnx.LayerNorm``, computed by
    :class:`bn_jax.LayerNorm`.

    Flax's constructor arguments, order and defaults (except the stable
    ``use_fast_variance=False``), call arguments, attributes and variables;
    then, keyword-only, ``memory_efficient`` and ``zero_centered_scale`` (see
    :class:`bn_jax.LayerNorm`).
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = jax.nn.initializers.zeros,
        scale_init: Initializer = jax.nn.initializers.ones,
        reduction_axes: int | Sequence[int] = -1,
        feature_axes: int | Sequence[int] = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        memory_efficient: bool = False,
        zero_centered_scale: bool = False,
    ) -> None:
        super().__init__(
            num_features,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=centered_scale_init(scale_init, zero_centered_scale),
            reduction_axes=reduction_axes,
            feature_axes=feature_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.memory_efficient = memory_efficient
        self.zero_centered_scale = zero_centered_scale
        _add_variables(self, bn_jax.LayerNorm, num_features)

    def __call__(self, x: Any, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes each example of ``x`` over ``reduction_axes``."""
        return _call(self, bn_jax.LayerNorm, x, True, mask)


class RMSNorm(nnx.RMSNorm):
    """RMS normalization: drop-in for ``flax.nnx.RMSNorm``, computed by
    :class:`bn_jax.RMSNorm`.

    Flax's constructor arguments, order and defaults, call arguments,
    attributes and variables; then, keyword-only, ``memory_efficient`` and
    ``zero_centered_scale`` (see :class:`bn_jax.RMSNorm`). ``use_fast_variance`` is kept for Flax's
    signature (an RMS has no mean to subtract).
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = jax.nn.initializers.ones,
        reduction_axes: int | Sequence[int] = -1,
        feature_axes: int | Sequence[int] = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        memory_efficient: bool = False,
        zero_centered_scale: bool = False,
    ) -> None:
        super().__init__(
            num_features,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_scale=use_scale,
            scale_init=centered_scale_init(scale_init, zero_centered_scale),
            reduction_axes=reduction_axes,
            feature_axes=feature_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            scale_metadata=scale_metadata,
        )
        self.memory_efficient = memory_efficient
        self.zero_centered_scale = zero_centered_scale
        _add_variables(self, bn_jax.RMSNorm, num_features)

    def __call__(self, x: Any, mask: jax.Array | None = None) -> jax.Array:
        """Rescales each example of ``x`` by its root mean square over ``reduction_axes``."""
        return _call(self, bn_jax.RMSNorm, x, True, mask)


class GroupNorm(nnx.GroupNorm):
    """Group Normalization: drop-in for ``flax.nnx.GroupNorm``, computed by
    :class:`bn_jax.GroupNorm`.

    Flax's constructor arguments, order and defaults (except the stable
    ``use_fast_variance=False``), call arguments, attributes and variables;
    then, keyword-only, ``feature_axis`` (the grouped channel axis, last by
    default as in Flax) and ``memory_efficient`` (see :class:`bn_jax.GroupNorm`).
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = jax.nn.initializers.zeros,
        scale_init: Initializer = jax.nn.initializers.ones,
        reduction_axes: int | Sequence[int] | None = None,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        feature_axis: int = -1,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__(
            num_features,
            num_groups,
            group_size,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            reduction_axes=reduction_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.feature_axis = feature_axis
        self.memory_efficient = memory_efficient
        _add_variables(self, bn_jax.GroupNorm, num_features)

    def __call__(self, x: Any, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes each group of channels of each example of ``x``."""
        return _call(self, bn_jax.GroupNorm, x, True, mask)


class InstanceNorm(nnx.InstanceNorm):
    """Instance Normalization: drop-in for ``flax.nnx.InstanceNorm``, computed by
    :class:`bn_jax.InstanceNorm`.

    Flax's constructor arguments, order and defaults (except the stable
    ``use_fast_variance=False``), call arguments, attributes and variables;
    then, keyword-only, PyTorch's optional running statistics
    (``track_running_stats``, ``momentum``, ``unbiased_running_var``),
    ``allow_single_value`` (default True, as Flax), ``count_skipped`` and
    ``use_running_average`` (used when ``track_running_stats``).
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = jax.nn.initializers.zeros,
        scale_init: Initializer = jax.nn.initializers.ones,
        feature_axes: int | Sequence[int] = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        use_running_average: bool | None = False,
        track_running_stats: bool = False,
        momentum: float | None = 0.99,
        unbiased_running_var: bool = False,
        allow_single_value: bool = True,
        count_skipped: bool = False,
    ) -> None:
        super().__init__(
            num_features,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            feature_axes=feature_axes,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.use_running_average = use_running_average
        self.track_running_stats = track_running_stats
        self.momentum = momentum
        self.unbiased_running_var = unbiased_running_var
        self.allow_single_value = allow_single_value
        self.count_skipped = count_skipped
        _add_variables(self, bn_jax.InstanceNorm, num_features)

    def __call__(
        self, x: Any, *, mask: jax.Array | None = None, use_running_average: bool | None = None
    ) -> jax.Array:
        """Normalizes each channel of each example of ``x``; with
        ``track_running_stats``, ``use_running_average`` picks the running statistics."""
        training = not self.track_running_stats or not _mode(self, use_running_average)
        return _call(self, bn_jax.InstanceNorm, x, training, mask)

    set_view = _set_view


class BatchRenorm(nnx.Module):
    """Batch Renormalization as a ``flax.nnx`` module, computed by
    :class:`bn_jax.BatchRenorm` (its options, plus ``num_features``,
    ``use_running_average``, ``rngs`` and ``<param>_metadata``)."""

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        axis: int | tuple[int, ...] = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = jax.nn.initializers.ones,
        bias_init: Initializer = jax.nn.initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        allow_single_value: bool = True,
        count_skipped: bool = False,
        rmax: Schedule = 3.0,
        dmax: Schedule = 5.0,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        _set_options(self, locals())
        _add_variables(self, bn_jax.BatchRenorm, num_features, rngs, locals())

    def __call__(
        self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalizes ``x`` (renormalized batch statistics, or the running ones when
        ``use_running_average``)."""
        use_ra = _mode(self, use_running_average)
        return _call(self, bn_jax.BatchRenorm, x, not use_ra, mask)

    set_view = _set_view


class GhostBatchNorm(nnx.Module):
    """Ghost Batch Normalization as a ``flax.nnx`` module, computed by
    :class:`bn_jax.GhostBatchNorm` (its options, plus ``num_features``,
    ``use_running_average``, ``rngs`` and ``<param>_metadata``)."""

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        axis: int | tuple[int, ...] = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = jax.nn.initializers.ones,
        bias_init: Initializer = jax.nn.initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        allow_single_value: bool = True,
        count_skipped: bool = False,
        virtual_batch_size: int,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        _set_options(self, locals())
        _add_variables(self, bn_jax.GhostBatchNorm, num_features, rngs, locals())

    def __call__(
        self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalizes ``x`` with the statistics of each virtual batch, or the running
        ones when ``use_running_average``."""
        use_ra = _mode(self, use_running_average)
        return _call(self, bn_jax.GhostBatchNorm, x, not use_ra, mask)

    set_view = _set_view


class SequenceBatchNorm(nnx.Module):
    """Recurrent Batch Normalization as a ``flax.nnx`` module, computed by
    :class:`bn_jax.SequenceBatchNorm` (its options, plus ``num_features``,
    ``use_running_average``, ``rngs`` and ``<param>_metadata``)."""

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        axis: int | tuple[int, ...] = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = jax.nn.initializers.ones,
        bias_init: Initializer = jax.nn.initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        allow_single_value: bool = True,
        count_skipped: bool = False,
        max_steps: int,
        time_axis: int = 1,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        _set_options(self, locals())
        _add_variables(self, bn_jax.SequenceBatchNorm, num_features, rngs, locals())

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
        use_ra = _mode(self, use_running_average)
        return _call(self, bn_jax.SequenceBatchNorm, x, not use_ra, mask, step=step)

    set_view = _set_view


class FilterResponseNorm(nnx.Module):
    """Filter Response Normalization with the TLU as a ``flax.nnx`` module, computed by
    :class:`bn_jax.FilterResponseNorm` (its options, plus ``num_features``, ``rngs``
    and ``<param>_metadata``; ``Param`` s ``scale``, ``bias``, ``tau`` and, with
    ``learned_epsilon``, ``eps``)."""

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_scale: bool = True,
        use_bias: bool = True,
        use_tau: bool = True,
        learned_epsilon: bool = False,
        scale_init: Initializer = jax.nn.initializers.ones,
        bias_init: Initializer = jax.nn.initializers.zeros,
        tau_init: Initializer = jax.nn.initializers.zeros,
        eps_init: Initializer = default_eps_init,
        feature_axes: int | tuple[int, ...] = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        tau_metadata: Mapping[str, Any] = _NO_METADATA,
        eps_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        _set_options(self, locals())
        _add_variables(self, bn_jax.FilterResponseNorm, num_features, rngs, locals())

    def __call__(self, x: Any, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes each channel of each example of ``x``, then applies the TLU."""
        return _call(self, bn_jax.FilterResponseNorm, x, True, mask)


class EvoNormB0(nnx.Module):
    """EvoNorm-B0 as a ``flax.nnx`` module, computed by :class:`bn_jax.EvoNormB0` (its
    options, plus ``num_features``, ``use_running_average``, ``rngs`` and
    ``<param>_metadata``; ``Param`` s ``scale``, ``bias``, ``v``; ``BatchStat``
    ``var``)."""

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        axis: int | tuple[int, ...] = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = jax.nn.initializers.ones,
        bias_init: Initializer = jax.nn.initializers.zeros,
        v_init: Initializer = jax.nn.initializers.ones,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        allow_single_value: bool = True,
        count_skipped: bool = False,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        v_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        _set_options(self, locals())
        _add_variables(self, bn_jax.EvoNormB0, num_features, rngs, locals())

    def __call__(
        self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalizes ``x`` with the batch variance (updating the running one), or the
        running variance when ``use_running_average``."""
        use_ra = _mode(self, use_running_average)
        return _call(self, bn_jax.EvoNormB0, x, not use_ra, mask)

    set_view = _set_view


class EvoNormS0(nnx.Module):
    """EvoNorm-S0 as a ``flax.nnx`` module, computed by :class:`bn_jax.EvoNormS0` (its
    options, plus ``num_features``, ``rngs`` and ``<param>_metadata``; ``Param`` s
    ``scale``, ``bias``, ``v``)."""

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int | None = 32,
        group_size: int | None = None,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer = jax.nn.initializers.ones,
        bias_init: Initializer = jax.nn.initializers.zeros,
        v_init: Initializer = jax.nn.initializers.ones,
        feature_axis: int = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        use_fast_variance: bool = False,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        v_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        _set_options(self, locals())
        _add_variables(self, bn_jax.EvoNormS0, num_features, rngs, locals())

    def __call__(self, x: Any, *, mask: jax.Array | None = None) -> jax.Array:
        """Applies EvoNorm-S0 to each example of ``x``."""
        return _call(self, bn_jax.EvoNormS0, x, True, mask)


# The Flax layers bn_jax computes: the drop-in and the normalizer of each.
_DROP_INS: dict[type[nnx.Module], tuple[type[nnx.Module], type]] = {
    nnx.BatchNorm: (BatchNorm, bn_jax.BatchNorm),
    nnx.LayerNorm: (LayerNorm, bn_jax.LayerNorm),
    nnx.RMSNorm: (RMSNorm, bn_jax.RMSNorm),
    nnx.GroupNorm: (GroupNorm, bn_jax.GroupNorm),
    nnx.InstanceNorm: (InstanceNorm, bn_jax.InstanceNorm),
}
_FAMILY: dict[type[nnx.Module], type] = {
    BatchRenorm: bn_jax.BatchRenorm,
    GhostBatchNorm: bn_jax.GhostBatchNorm,
    SequenceBatchNorm: bn_jax.SequenceBatchNorm,
    FilterResponseNorm: bn_jax.FilterResponseNorm,
    EvoNormB0: bn_jax.EvoNormB0,
    EvoNormS0: bn_jax.EvoNormS0,
}
# Flax's nnx BatchNorm passes its running statistics through promote_dtype too.
_PROMOTES_STATS = (nnx.BatchNorm,)


def _call(module: Any, cls: Any, x: Any, training: bool, mask: Any, **kwargs: Any) -> jax.Array:
    """Runs ``module`` with the normalizer ``cls``: the variables in, the new running
    statistics out.

    Where Flax's layer has ``promote_dtype``, it is called as Flax calls it and
    its promoted input and parameters are used; the output dtype is Flax's
    (``dtype``, else the promoted type of ``x`` and the parameters).
    """
    # Flax's nnx GroupNorm stores both num_groups and group_size; num_groups decides.
    changes = {"group_size": None} if cls is bn_jax.GroupNorm else {}
    norm = _layers.normalizer(cls, module, changes)
    param_specs, state_specs = _layers.variables(norm, jnp.shape(x))
    params = {name: getattr(module, name)[...] for name in param_specs}
    stats = {name: getattr(module, name) for name in state_specs}
    promote = getattr(module, "promote_dtype", None)
    # Flax's rules under JAX's standard promotion, whatever jax_numpy_dtype_promotion
    # says: under "strict", Flax's own layers raise for bfloat16 x with float32
    # parameters; the core promotes explicitly in the same way.
    with jax.numpy_dtype_promotion("standard"):
        if promote is not None:  # Flax's promotion: (x, [mean, var,] scale[, bias])
            names = ("scale", "bias") if _has_bias(cls) else ("scale",)
            running = (
                [stats[n][...] for n in ("mean", "var")]
                if isinstance(module, _PROMOTES_STATS)
                else []
            )
            args = (x, *running, *(params.get(n) for n in names))
            x, *promoted = promote(args, dtype=module.dtype)
            params = dict(zip(names, promoted[len(running) :], strict=True))
            params = {name: value for name, value in params.items() if name in param_specs}
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        dtype = canonicalize_dtype(x, *params.values(), dtype=module.dtype)
    norm = _layers.normalizer(cls, module, {**changes, "dtype": dtype})
    state = {name: v[...] for name, v in stats.items()}
    y, new = norm.apply(params, state, x, training=training, mask=mask, **kwargs)
    if stats and training:
        for name, v in stats.items():
            value = _layers.stored(new[name], v[...])
            if value.dtype == v[...].dtype:
                v[...] = value
            else:  # a complex running mean replaces the real one, as in bn_jax.linen
                v.set_value(value)
    return y


@functools.cache
def _param_names(cls: type) -> tuple[str, ...]:
    """Every parameter the normalizer ``cls`` may have (one per ``*_init`` field), in
    creation order: ``scale``, ``bias``, then the others (``tau``, ``v``, ``eps``)."""
    names = [f.name[: -len("_init")] for f in dataclasses.fields(cls) if f.name.endswith("_init")]
    first = ("scale", "bias") if _has_bias(cls) else ("scale",)
    return (*first, *(n for n in names if n not in first))


@functools.cache
def _has_bias(cls: type) -> bool:
    return "use_bias" in dict(_layers.option_defaults(cls))


def _mode(module: nnx.Module, use_running_average: bool | None) -> bool:
    """``use_running_average`` from the call, else the attribute, as Flax merges them."""
    return first_from(
        use_running_average,
        getattr(module, "use_running_average", None),
        error_msg=(
            f"{type(module).__name__}: no use_running_average was given. Pass it to the "
            f"constructor ({type(module).__name__}(..., use_running_average=False)), at call "
            f"time (layer(x, use_running_average=True)), or switch the model with "
            f"model.train() / model.eval() or nnx.view(model, use_running_average=...)."
        ),
    )


def _set_options(module: nnx.Module, arguments: Mapping[str, Any]) -> None:
    """Stores a family layer's constructor arguments as its attributes (the
    initializers, ``rngs`` and metadata are used by the constructor only, as in Flax)."""
    for name, value in arguments.items():
        if name != "self" and not name.endswith(("_init", "_metadata")) and name != "rngs":
            setattr(module, name, value)


def _add_variables(
    module: Any,
    cls: Any,
    num_features: Any,
    rngs: Any = None,
    arguments: Mapping[str, Any] = _NO_METADATA,
) -> None:
    """Validates ``module``'s options and creates the variables of the normalizer
    ``cls`` that ``module`` does not have yet, as Flax would: one ``rngs.params()``
    key per parameter in creation order, ``nnx.data(None)`` for an unused one.

    Flax's constructor makes those of Flax's layers; this makes the rest (all
    of a family layer's, ``count`` for ``momentum=None``, InstanceNorm's
    running statistics).
    """
    changes = {"group_size": None} if cls is bn_jax.GroupNorm else {}
    norm = _layers.normalizer(cls, module, changes)  # raises for invalid options
    params, state = norm.init(num_features)
    for name in _param_names(cls):
        if name in vars(module):
            continue
        if name not in params:
            setattr(module, name, nnx.data(None))
            continue
        init = arguments[f"{name}_init"]
        value = init(rngs.params(), params[name].shape, params[name].dtype)
        setattr(module, name, nnx.Param(value, **dict(arguments[f"{name}_metadata"])))
    for name, value in state.items():
        if name not in vars(module):
            setattr(module, name, nnx.BatchStat(value))


def convert(model: M, **overrides: Any) -> M:
    """Switches every Flax norm layer of ``model`` to its bn_jax drop-in, in place.

    Each ``flax.nnx`` BatchNorm, LayerNorm, RMSNorm, GroupNorm and
    InstanceNorm of ``model`` (``model`` itself included) becomes the drop-in
    of this module: the same object, with the same ``Param`` / ``BatchStat``
    variables and attributes, computing with bn_jax from now on. The stable
    variance replaces Flax's fast one unless ``use_fast_variance=True`` is
    passed. ``overrides`` set bn_jax options on every converted layer that has
    them (drop-ins already in the model included): e.g.
    ``convert(model, axis_name="batch")`` makes every BatchNorm a
    count-weighted synchronized BatchNorm.

    Args:
      model: an nnx Module.
      **overrides: bn_jax options (fields of the normalizers).

    Returns:
      ``model``, converted.

    Raises:
      TypeError: an override that no norm layer has.
    """
    normalizers = [cls for _, cls in _DROP_INS.values()]
    _layers.check_overrides(normalizers, overrides)
    ours = {drop_in: cls for drop_in, cls in _DROP_INS.values()} | _FAMILY
    module: Any
    for _, module in list(nnx.iter_modules(model)):
        if type(module) in _DROP_INS:
            drop_in, cls = _DROP_INS[type(module)]
            module.__class__ = drop_in
            for name, value in _layers.FLAX_DEFAULTS.items():
                if hasattr(module, name):
                    setattr(module, name, value)
        elif type(module) in ours:
            cls = ours[type(module)]
        else:
            continue
        names = {n for n, _ in _layers.option_defaults(cls)}
        for name, default in _layers.option_defaults(cls):
            value = overrides.get(name, _layers.FLAX_DEFAULTS.get(name, default))
            if name in overrides or not hasattr(module, name):
                setattr(module, name, value)
        if "momentum" in names and not hasattr(module, "use_running_average"):
            module.use_running_average = False
        num_features = getattr(module, "num_features", None) or tuple(module.mean.shape)
        _add_variables(module, cls, num_features)  # e.g. count for momentum=None
    return model
