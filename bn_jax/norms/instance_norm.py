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
    NormMixin,
    Params,
    State,
    average_stats,
    broadcastable,
    check_training,
    feature_shape,
    functional,
)


@dataclasses.dataclass(frozen=True)
class InstanceNorm(NormMixin):
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

    Conventions (with ``track_running_stats=True``):
      * ``momentum=0.99`` here is PyTorch's ``momentum=0.01`` (PyTorch's
        default 0.1 is 0.9 here).
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

    def __post_init__(self) -> None:
        checks.check_epsilon(self.epsilon)
        checks.check_momentum(self.momentum)
        self._canonicalize_axes("feature_axes")
        self._check_groups_and_dtypes()

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``; ``state`` is ``{}`` unless ``track_running_stats``."""
        shape = feature_shape(features, self.feature_axes, self._name, "feature_axes")
        state = self._init_running(shape) if self.track_running_stats else {}
        return self._init_params(shape, key), state

    def _check_running_state(self, state: State) -> None:
        if "mean" not in state or "var" not in state:
            raise ValueError(
                f"InstanceNorm: track_running_stats=True but state has keys "
                f"{sorted(state)}; build the state with InstanceNorm.init."
            )

    def apply(
        self,
        params: Params,
        state: State,
        x: jax.Array,
        *,
        training: bool,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, State]:
        """Normalizes ``x``; returns ``(y, new_state)``.

        Args:
          params: ``{"scale", "bias"}`` from :meth:`init`.
          state: ``{}``, or ``{"mean", "var"}`` with ``track_running_stats``.
          x: floating-point input ``[batch, ..., features]``.
          training: with ``track_running_stats``, instance statistics and an
            updated state (True) or running statistics (False); otherwise no
            effect.
          mask: boolean array broadcastable to ``x``; only True elements enter
            the statistics.

        Raises:
          TypeError: integer input or a non-bool ``training``.
          ValueError: feature axes that include axis 0, a feature-size
            mismatch, axes out of range, a mask that does not broadcast, a
            single value per instance and channel, or an unbound ``axis_name``.
        """
        training = check_training(training, self._name)
        checks.check_input(x)
        x = jnp.asarray(x)
        feature_axes = checks.resolve_axes(self.feature_axes, x.ndim, "feature_axes")
        if 0 in feature_axes:
            raise ValueError(
                f"InstanceNorm: feature_axes={self.feature_axes!r} includes axis 0, the batch "
                f"axis; put the batch first."
            )
        track = self.track_running_stats
        scale, bias, shape = self._affine(
            params, x, feature_axes, "feature_axes", state if track else None
        )
        out_dtype = jnp.dtype(self.dtype or x.dtype)
        scale = broadcastable(scale, x.ndim, feature_axes)
        bias = broadcastable(bias, x.ndim, feature_axes)
        if track and not training:
            return self._normalize_running(x, state, scale, bias, feature_axes, out_dtype)

        reduce_axes = tuple(i for i in range(1, x.ndim) if i not in feature_axes)
        mask = checks.check_mask(mask, x.shape)
        devices = checks.bound_axis_size(self.axis_name, self.axis_index_groups, self._name)
        if mask is None and math.prod(x.shape[i] for i in reduce_axes) * devices <= 1:
            raise ValueError(
                f"InstanceNorm: x.shape={tuple(x.shape)} with feature_axes="
                f"{self.feature_axes!r} leaves a single value per instance and channel (no "
                f"spatial axes); its variance is meaningless. Did you mean LayerNorm or "
                f"BatchNorm?"
            )
        cfg = self._stats_config(reduce_axes, out_dtype)
        y, mean, var, count = batch_normalize(x, scale, bias, mask, cfg)
        if not (track and training):
            return y, state
        # Statistics are already merged over axis_name (it splits the spatial
        # axes), so the average over instances needs no further collective.
        mean, var, count = average_stats(mean, var, count, unbiased=self.unbiased_running_var)
        return y, self._update(state, mean, var, count, shape, unbiased=False)


instance_norm = functional(
    InstanceNorm, "instance_norm", "y, _ = bn_jax.instance_norm(params, {}, x, training=True)"
)
