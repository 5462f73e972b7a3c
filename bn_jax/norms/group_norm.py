"""Group Normalization (Wu & He, 2018)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax._core import checks
from bn_jax._core.memory_efficient import layer_norm_saving_output
from bn_jax._core.normalize import StatsConfig, normalizing_function
from bn_jax.norms import _common
from bn_jax.norms._common import Mask, Params, Signature, State


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupNorm(_common.NormFields):
    r"""Group Normalization: normalize groups of channels within each example.

    The ``C`` channels along ``feature_axis`` are split into ``G`` contiguous
    groups of ``C / G``; for every example (position outside
    ``reduction_axes``) and group ``g``::

        mu_g, var_g = mean(x), mean((x - mu_g)**2)   # over reduction_axes, channels of g
        y = (x - mu_g) / sqrt(var_g + epsilon) * scale + bias     # scale, bias: [C]

    ``G = 1`` is LayerNorm over all non-batch axes; ``G = C`` is InstanceNorm.
    No running statistics: ``state`` is ``{}``; ``training`` is accepted and
    ignored.

    When to use it: convolutional networks trained with small per-device
    batches (detection, segmentation, video), where batch statistics are
    too noisy; the output of an example never depends on the rest of the
    batch.

    Args:
      num_groups: number of groups ``G`` (Flax and the paper default to 32);
        pass ``num_groups=None`` to give ``group_size`` instead. Exactly one of
        the two is set.
      group_size: channels per group.
      epsilon: added to the variance; must be positive (Flax's default 1e-6).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as in
        :class:`BatchNorm`.
      reduction_axes: axes the statistics are taken over; they must include
        ``feature_axis`` (whose reduction is restricted to each group).
        Default ``None``: every axis except the leading batch axis.
      feature_axis: the channel axis that is grouped and that carries
        ``scale`` / ``bias`` (default ``-1``; ``1`` for NCHW).
      axis_name: a mapped axis over which the reduced axes are split
        (spatial or sequence parallelism), as in ``flax.linen.GroupNorm``.
      axis_index_groups: merge within these groups of devices only.
      use_fast_variance: ``E[x^2] - E[x]^2`` instead of the shifted formula.
      memory_efficient: compute the backward pass from the output and the
        per-group statistics, so that training does not keep ``x`` (pays when
        the next layer keeps the output, e.g. an activation's backward pass).
        Reverse mode only; see the memory-efficient page of the docs.

    Example::

        norm = bn_jax.GroupNorm(num_groups=8)
        params, state = norm.init(64)                # state == {}
        y, _ = norm.apply(params, state, x, training=True)   # x: [N, H, W, 64]

    Reference: Y. Wu and K. He, "Group Normalization", ECCV 2018.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    reduction_axes: int | tuple[int, ...] | None = None
    feature_axis: int = -1
    use_fast_variance: bool = False
    memory_efficient: bool = False

    def __post_init__(self) -> None:
        num_groups, group_size = _common.check_groups("GroupNorm", self.num_groups, self.group_size)
        _common.freeze(self, num_groups=num_groups, group_size=group_size)
        _common.freeze(self, feature_axis=_common.check_int("feature_axis", self.feature_axis))
        if self.reduction_axes is not None:
            try:
                red = checks.canonical_axis(self.reduction_axes)
            except TypeError:
                raise TypeError(
                    f"reduction_axes must be None, an int or a tuple of ints, got "
                    f"{self.reduction_axes!r}."
                ) from None
            _common.freeze(self, reduction_axes=red)
        _common.check_common(self)

    def _groups(self, channels: int) -> int:
        return _common.group_count(
            "GroupNorm", channels, self.num_groups, self.group_size, self.feature_axis
        )

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, {})`` for ``features`` channels (an int or an example input)."""
        if hasattr(features, "shape") and hasattr(features, "ndim"):
            (c,) = checks.resolve_axes(self.feature_axis, features.ndim, "feature_axis")
            channels = features.shape[c]
        elif isinstance(features, (int, np.integer)) and not isinstance(features, bool):
            channels = int(features)
        else:
            raise TypeError(
                f"GroupNorm.init expects the number of channels (an int) or an example input "
                f"array, got {features!r}."
            )
        if channels <= 0:
            raise ValueError(
                f"GroupNorm.init: the number of channels must be positive, got {channels}."
            )
        self._groups(channels)
        return _common.init_affine(self, (channels,), key), {}

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Normalizes each group of channels of each example; ``state`` (``{}``) is returned
        unchanged and ``training`` has no effect. See :meth:`Normalizer.apply`.

        Raises:
          ValueError: also for channels not divisible into groups or
            reduction axes that omit the feature axis.
        """
        x, mask, sig = _common.check_call(self, params, state, x, mask, training)
        lay = _layout(self, sig)
        scale, bias = (
            params[n].reshape(lay.pshape) if n in lay.used else None for n in ("scale", "bias")
        )
        if mask is not None:  # split the channel axis c of the mask too (if it has one)
            c = lay.channel_axis
            mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
            if mask.shape[c] == 1:
                mask = jnp.expand_dims(mask, c + 1)
            else:
                mask = mask.reshape((*mask.shape[:c], *lay.split[c : c + 2], *mask.shape[c + 1 :]))
        xg = x.reshape(lay.split)
        if self.memory_efficient and lay.cfg.custom_derivative:
            y = layer_norm_saving_output(xg, scale, bias, mask, lay.cfg)
        else:
            y = normalizing_function(lay.cfg)(xg, scale, bias, mask, lay.cfg)[0]
        return y.reshape(x.shape), state


class _Layout(NamedTuple):
    channel_axis: int
    split: tuple[int, ...]  # x's shape with the channels split into (groups, per group)
    pshape: tuple[int, ...]  # scale and bias broadcastable against the split input
    used: tuple[str, ...]
    cfg: StatsConfig  # statistics over the split input


@functools.lru_cache(maxsize=256)
def _layout(norm: GroupNorm, sig: Signature) -> _Layout:
    ndim = sig.ndim
    (c,) = checks.resolve_axes(norm.feature_axis, ndim, "feature_axis")
    if norm.reduction_axes is None:
        reduce = tuple(range(1, ndim))
    else:
        reduce = checks.resolve_axes(norm.reduction_axes, ndim, "reduction_axes")
    if c not in reduce:
        raise ValueError(
            f"GroupNorm: reduction_axes={norm.reduction_axes!r} must include "
            f"feature_axis={norm.feature_axis} (axis {c} of an input of rank {ndim}): "
            f"statistics are taken over the channels of each group."
        )
    _common.check_saving_output("GroupNorm", norm.memory_efficient, sig)
    used = tuple(n for n, use in (("scale", norm.use_scale), ("bias", norm.use_bias)) if use)
    _common.check_features(
        "GroupNorm", sig, (c,), used, axis_arg="feature_axis", axis=norm.feature_axis
    )
    channels = sig.shape[c]
    groups = norm._groups(channels)
    # Split the channel axis c into (groups, channels per group) at c, c + 1.
    split = (*sig.shape[:c], groups, channels // groups, *sig.shape[c + 1 :])
    reduce_g = tuple(sorted([a + (a > c) for a in reduce if a != c] + [c + 1]))
    pshape = [1] * (ndim + 1)
    pshape[c], pshape[c + 1] = groups, channels // groups
    cfg = _common.stats_config(norm, reduce_g, sig)
    return _Layout(c, split, tuple(pshape), used, cfg)


group_norm = _common.functional(
    GroupNorm, "group_norm", "y, _ = bn_jax.group_norm(params, {}, x, training=True, num_groups=8)"
)
