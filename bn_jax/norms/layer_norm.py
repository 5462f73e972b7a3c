"""Layer Normalization (Ba, Kiros & Hinton, 2016)."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bn_jax._core import checks
from bn_jax._core.normalize import StatsConfig, batch_normalize
from bn_jax.norms._common import (
    Initializer,
    Params,
    State,
    broadcastable,
    feature_shape,
    get_affine,
    init_affine,
)
from bn_jax.norms.batch_norm import check_training


@dataclasses.dataclass(frozen=True)
class LayerNorm:
    r"""Layer Normalization: normalize each example over its feature axes.

    For every example (every position outside ``reduction_axes``)::

        mu, var = mean(x), mean((x - mu)**2)        # over reduction_axes
        y = (x - mu) / sqrt(var + epsilon) * scale + bias

    ``scale`` and ``bias`` have the shape of ``feature_axes``. There are no
    running statistics: ``state`` is ``{}`` and ``training`` is accepted (and
    ignored) so that every normalizer has the same calling convention.

    When to use it: transformers and recurrent networks, and whenever the
    batch is small, variable or of size one at inference; the output of an
    example never depends on the rest of the batch.

    Args:
      epsilon: added to the variance; must be positive (Flax's default 1e-6).
      dtype: output dtype; ``None`` keeps the input's. Statistics are reduced
        in at least float32.
      param_dtype: dtype of ``scale`` / ``bias``.
      use_bias, use_scale, bias_init, scale_init: as in :class:`BatchNorm`.
      reduction_axes: axes the statistics are taken over (default ``-1``).
      feature_axes: axes of ``scale`` / ``bias`` (default ``-1``).
      axis_name: a mapped axis over which the *reduced* axes are split (model
        or sequence parallelism): statistics are merged across its devices,
        as in ``flax.linen.LayerNorm``. Not needed for data parallelism.
      axis_index_groups: merge within these groups of devices only.
      use_fast_variance: ``E[x^2] - E[x]^2`` instead of the shifted formula.

    Example::

        norm = bn_jax.LayerNorm()
        params, state = norm.init(512)               # state == {}
        y, _ = norm.apply(params, state, x, training=True)

    Reference: J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer
    Normalization", arXiv:1607.06450, 2016.
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = jax.nn.initializers.zeros
    scale_init: Initializer = jax.nn.initializers.ones
    reduction_axes: int | tuple[int, ...] = -1
    feature_axes: int | tuple[int, ...] = -1
    axis_name: Hashable | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    use_fast_variance: bool = False

    def __post_init__(self) -> None:
        checks.check_epsilon(self.epsilon)
        object.__setattr__(self, "reduction_axes", _axes(self.reduction_axes, "reduction_axes"))
        object.__setattr__(self, "feature_axes", _axes(self.feature_axes, "feature_axes"))
        object.__setattr__(
            self,
            "axis_index_groups",
            checks.canonical_groups(self.axis_index_groups, self.axis_name),
        )
        checks.check_float_dtype("dtype", self.dtype)
        checks.check_float_dtype("param_dtype", self.param_dtype, allow_none=False)

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, {})`` for ``features`` (a size, a tuple of sizes or an example)."""
        shape = feature_shape(features, self.feature_axes, type(self).__name__)
        params = init_affine(
            shape,
            use_scale=self.use_scale,
            use_bias=self.use_bias,
            scale_init=self.scale_init,
            bias_init=self.bias_init,
            param_dtype=self.param_dtype,
            key=key,
        )
        return params, {}

    def apply(
        self,
        params: Params,
        state: State,
        x: jax.Array,
        *,
        training: bool,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, State]:
        """Normalizes ``x``; returns ``(y, state)`` with ``state`` unchanged.

        Args:
          params: ``{"scale", "bias"}`` from :meth:`init`.
          state: ``{}``.
          x: floating-point input.
          training: accepted for a uniform calling convention; no effect.
          mask: boolean array broadcastable to ``x``; only True elements enter
            the statistics.

        Raises:
          TypeError: integer input or a non-bool ``training``.
          ValueError: feature-size mismatch, axes out of range, a mask that
            does not broadcast, or an unbound ``axis_name``.
        """
        name = type(self).__name__
        check_training(training, name)
        checks.check_input(x)
        x = jnp.asarray(x)
        reduce_axes = checks.resolve_axes(self.reduction_axes, x.ndim, "reduction_axes")
        feature_axes = checks.resolve_axes(self.feature_axes, x.ndim, "feature_axes")
        scale, bias = get_affine(params, self.use_scale, self.use_bias, name)
        checks.check_features(
            x.shape,
            feature_axes,
            {"params['scale']": scale, "params['bias']": bias},
            self.feature_axes,
        )
        mask = checks.check_mask(mask, x.shape)
        checks.bound_axis_size(self.axis_name, self.axis_index_groups, name)
        cfg = StatsConfig(
            axes=reduce_axes,
            epsilon=float(self.epsilon),
            out_dtype=jnp.dtype(self.dtype or x.dtype),
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            fast_variance=self.use_fast_variance,
        )
        y, _, _, _ = batch_normalize(
            x,
            broadcastable(scale, x.ndim, feature_axes),
            broadcastable(bias, x.ndim, feature_axes),
            mask,
            cfg,
        )
        return y, state


def _axes(axes: Any, name: str) -> int | tuple[int, ...]:
    try:
        return checks.canonical_axis(axes)
    except TypeError:
        raise TypeError(f"{name} must be an int or a tuple of ints, got {axes!r}.") from None


def layer_norm(
    params: Params,
    state: State,
    x: jax.Array,
    *,
    training: bool,
    mask: jax.Array | None = None,
    **config: Any,
) -> tuple[jax.Array, State]:
    """Functional form of :class:`LayerNorm`: ``LayerNorm(**config).apply(...)``.

    Example::

        y, _ = bn_jax.layer_norm(params, {}, x, training=True, epsilon=1e-5)
    """
    return LayerNorm(**config).apply(params, state, x, training=training, mask=mask)
