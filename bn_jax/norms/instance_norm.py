"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax

from bn_jax._core import checks
from bn_jax._core.normalize import StatsConfig, normalizing_function
from bn_jax._core.running import update_running
from bn_jax.norms import _common
from bn_jax.norms._common import Mask, Params, Signature, State


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstanceNorm(_common.NormFields):
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
    feature_axes: int | tuple[int, ...] = -1
    use_fast_variance: bool = False
    track_running_stats: bool = False
    momentum: float | None = 0.99
    unbiased_running_var: bool = False

    allow_single_value: bool = False
    count_skipped: bool = False

    def __post_init__(self) -> None:
        checks.check_momentum(self.momentum)
        _common.check_common(self, feature_axes=self.feature_axes)

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``; ``state`` is ``{}`` unless ``track_running_stats``."""
        shape = _common.feature_shape(features, self.feature_axes, "InstanceNorm", "feature_axes")
        params = _common.init_affine(self, shape, key)
        if not self.track_running_stats:
            return params, {}
        return params, _common.init_running(
            shape, self.param_dtype, self.momentum, self.count_skipped
        )

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
        track = self.track_running_stats
        x, mask, sig = _common.check_call(
            self, params, state, x, mask, training, sync_in_eval=not track
        )
        pshape, used, cfg = _layout(self, sig)
        scale, bias = (params[n].reshape(pshape) if n in used else None for n in ("scale", "bias"))
        if track and not training:
            mean, var = (state[n].reshape(pshape) for n in ("mean", "var"))
            return _common.normalize_with(
                x, mean, var, scale, bias, self.epsilon, cfg.out_dtype
            ), state
        y, mean, var, count = normalizing_function(cfg)(x, scale, bias, mask, cfg)
        if not (track and training):
            return y, state
        # Statistics are already merged over axis_name (it splits the spatial
        # axes), so the average over instances needs no further collective.
        stats = _common.average_stats(mean, var, count, unbiased=self.unbiased_running_var)
        return y, update_running(state, *stats, momentum=self.momentum)


@functools.lru_cache(maxsize=256)
def _layout(
    norm: InstanceNorm, sig: Signature
) -> tuple[tuple[int, ...], tuple[str, ...], StatsConfig]:
    layer = "InstanceNorm"
    feature_axes = checks.resolve_axes(norm.feature_axes, sig.ndim, "feature_axes")
    if 0 in feature_axes:
        raise ValueError(
            f"InstanceNorm: feature_axes={norm.feature_axes!r} includes axis 0, the batch "
            f"axis; put the batch first."
        )
    track = norm.track_running_stats
    if track:
        _common.check_state_keys(
            layer, sig.state, _common.running_keys(norm.momentum, norm.count_skipped)
        )
    used = tuple(n for n, use in (("scale", norm.use_scale), ("bias", norm.use_bias)) if use)
    features = _common.check_features(
        layer,
        sig,
        feature_axes,
        used,
        ("mean", "var") if track else (),
        axis_arg="feature_axes",
        axis=norm.feature_axes,
    )
    reduce_axes = _common.other_axes(sig.ndim, feature_axes, first=1)
    if sig.training or not track:
        _common.check_single_value(
            math.prod(sig.shape[i] for i in reduce_axes) * sig.devices,
            norm.allow_single_value,
            f"InstanceNorm: x.shape={sig.shape} with feature_axes={norm.feature_axes!r} "
            f"leaves a single value per instance and channel (no spatial axes); its variance "
            f"is meaningless. Did you mean LayerNorm or BatchNorm?",
        )
    cfg = _common.stats_config(norm, reduce_axes, sig)
    return _common.broadcast_shape(sig.ndim, feature_axes, features), used, cfg


instance_norm = _common.functional(
    InstanceNorm, "instance_norm", "y, _ = bn_jax.instance_norm(params, {}, x, training=True)"
)
