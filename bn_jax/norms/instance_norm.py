"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bn_jax._core import checks
from bn_jax._core.normalize import batch_normalize
from bn_jax.norms._common import (
    Initializer,
    Mask,
    Params,
    State,
    average_stats,
    check_common_fields,
    check_single_value,
    check_state_keys,
    check_training,
    check_x,
    checked_affine,
    checked_mask,
    feature_shape,
    freeze,
    functional,
    init_params,
    init_running,
    normalize_with,
    other_axes,
    out_dtype,
    running_keys,
    stats_config,
    update_state,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstanceNorm:
    r"""Instance Normalization: normalize each channel of each example on its own.

    For every example ``n`` (axis 0) and feature ``c``, over the remaining
    (spatial, temporal) axes::

        mu, var = mean(x[n, ..., c]), mean((x[n, ..., c] - mu)**2)
        y = (x - mu) / sqrt(var + epsilon) * scale + bias

    With ``track_running_stats=True`` (PyTorch's option) the state holds
    running ``mean`` / ``var`` of shape ``[*features]``, updated in training
    with the average over the batch of the instance statistics
    (``new = momentum * old + (1 - momentum) * avg``, BatchNorm's Flax
    convention), and evaluation normalizes with them instead of the
    instance statistics. Otherwise ``state`` is ``{}`` and ``training`` has
    no effect.

    When to use it: style transfer and image generation, where the contrast
    of each image should be removed; also GroupNorm with one channel per
    group.

    Args:
      epsilon: added to the variance; must be positive (Flax's default 1e-6;
        PyTorch uses 1e-5).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as in
        :class:`BatchNorm` (PyTorch's default ``affine=False`` is
        ``use_scale=False, use_bias=False``).
      feature_axes: the channel axes (default ``-1``; ``1`` for NCHW); may not
        include the batch axis 0.
      axis_name: a mapped axis over which the spatial axes are split, as in
        ``flax.linen.InstanceNorm``.
      axis_index_groups: merge within these groups of devices only.
      use_fast_variance: ``E[x^2] - E[x]^2`` instead of the shifted formula.
      track_running_stats: keep running statistics for evaluation.
      momentum: weight of the old running statistics (PyTorch's 0.1 is 0.9
        here); ``None`` keeps the cumulative average.
      unbiased_running_var: average the unbiased instance variances into the
        running variance, as PyTorch does.
      allow_single_value: normalize an input with a single value per
        instance and channel (no spatial axes) instead of raising.
      count_skipped: with ``track_running_stats``, add an int32 ``skipped``
        to the state that counts, per feature, the running updates dropped
        because the statistics were not finite.

    Conventions:
      * An input with one value per instance and channel (no spatial axes)
        is an error, as in PyTorch; ``allow_single_value=True`` computes it
        instead, as Flax does (variance 0, so the output is ``bias``).
      * With ``track_running_stats=True``: ``momentum=0.99`` here is
        PyTorch's ``momentum=0.01`` (PyTorch's default 0.1 is 0.9 here).
      * The running variance averages the biased instance variances, unless
        ``unbiased_running_var=True`` (PyTorch's convention).
      * Running statistics start at mean 0 and variance 1 with no debiasing,
        so evaluation before any training step returns
        ``x / sqrt(1 + epsilon) * scale + bias``; a channel whose statistics
        are not finite keeps its running statistics.

    Example::

        norm = bn_jax.InstanceNorm(use_scale=False, use_bias=False)
        params, state = norm.init(3)                 # {}, {}
        y, _ = norm.apply(params, state, images, training=True)   # [N, H, W, 3]

    Reference: D. Ulyanov, A. Vedaldi and V. Lempitsky, "Instance
    Normalization: The Missing Ingredient for Fast Stylization",
    arXiv:1607.08022, 2016.
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = jax.nn.initializers.zeros
    scale_init: Initializer = jax.nn.initializers.ones
    feature_axes: int | tuple[int, ...] = -1
    axis_name: Hashable | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    use_fast_variance: bool = False
    track_running_stats: bool = False
    momentum: float | None = 0.99
    unbiased_running_var: bool = False

    allow_single_value: bool = False
    count_skipped: bool = False

    def __post_init__(self) -> None:
        checks.check_momentum(self.momentum)
        freeze(self, feature_axes=checks.canonical_axis(self.feature_axes, "feature_axes"))
        check_common_fields(self)

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``; ``state`` is ``{}`` unless ``track_running_stats``."""
        shape = feature_shape(features, self.feature_axes, "InstanceNorm", "feature_axes")
        state = init_running(self, shape)
        return init_params(self, shape, key), state if self.track_running_stats else {}

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Normalizes each channel of each example (``x``: ``[batch, ..., features]``); see
        :meth:`Normalizer.apply`. With ``track_running_stats``, ``training=False`` uses
        the running statistics; otherwise ``training`` has no effect.

        Raises:
          ValueError: also for feature axes that include axis 0 and, unless
            ``allow_single_value``, a single value per instance and channel.
        """
        training, x = check_training(training, "InstanceNorm"), check_x(x)
        feature_axes = checks.resolve_axes(self.feature_axes, x.ndim, "feature_axes")
        if 0 in feature_axes:
            raise ValueError(
                f"InstanceNorm: feature_axes={self.feature_axes!r} includes axis 0, the batch "
                f"axis; put the batch first."
            )
        track = self.track_running_stats
        if track:
            check_state_keys(state, running_keys(self), "InstanceNorm")
        aff = checked_affine(
            self, params, x, feature_axes, "feature_axes", state if track else None
        )
        out = out_dtype(self, x)
        if track and not training:
            y = normalize_with(x, state["mean"], state["var"], aff, feature_axes, self.epsilon, out)
            return y, state
        reduce_axes = other_axes(x.ndim, feature_axes, first=1)
        mask, devices = checked_mask(self, x.shape, mask)
        check_single_value(
            math.prod(x.shape[i] for i in reduce_axes) * devices,
            self.allow_single_value,
            f"InstanceNorm: x.shape={tuple(x.shape)} with feature_axes={self.feature_axes!r} "
            f"leaves a single value per instance and channel (no spatial axes); its variance "
            f"is meaningless. Did you mean LayerNorm or BatchNorm?",
        )
        cfg = stats_config(self, reduce_axes, out)
        y, mean, var, count = batch_normalize(x, aff.scale, aff.bias, mask, cfg)
        if not (track and training):
            return y, state
        # Statistics are already merged over axis_name (it splits the spatial
        # axes), so the average over instances needs no further collective.
        stats = average_stats(mean, var, count, unbiased=self.unbiased_running_var)
        return y, update_state(self, state, stats, aff.shape, unbiased=False)


instance_norm = functional(
    InstanceNorm, "instance_norm", "y, _ = bn_jax.instance_norm(params, {}, x, training=True)"
)
