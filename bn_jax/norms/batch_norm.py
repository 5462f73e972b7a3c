"""Batch Normalization (Ioffe & Szegedy, 2015)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn_jax._core import checks
from bn_jax._core.normalize import StatsConfig, affine, batch_normalize
from bn_jax._core.running import update_running
from bn_jax.norms._common import (
    Initializer,
    Params,
    State,
    broadcastable,
    feature_shape,
    get_affine,
    init_affine,
)


def check_training(training: Any, layer: str) -> bool:
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(
            f"{layer}.apply: training must be a Python bool (it picks the code path when "
            f"tracing), got {type(training).__name__}; to switch at run time use "
            f"jax.lax.cond over two apply calls."
        )
    return bool(training)


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    r"""Batch Normalization: normalize each feature with statistics of the batch.

    Training mode, per feature ``c`` over every other axis (and every device
    of ``axis_name``)::

        mu, var = mean(x), mean((x - mu)**2)            # biased batch variance
        y = (x - mu) / sqrt(var + epsilon) * scale + bias
        running = momentum * running + (1 - momentum) * batch

    Evaluation mode uses the running statistics instead; it is one
    multiply-add per element and never communicates across devices.

    Args:
      momentum: weight of the old running statistics (Flax convention), in
        ``[0, 1]``; ``None`` keeps the exact cumulative average of every batch
        seen (a per-feature ``count`` joins the state).
      epsilon: added to the variance; must be positive.
      axis: the feature axis or axes (``-1`` for NHWC / ``[batch, features]``,
        ``1`` for NCHW). Statistics are taken over all the other axes.
      axis_name: a mapped axis (``shard_map``, ``pmap``, ``vmap``) whose
        devices share batch statistics: the result equals single-device
        BatchNorm on the concatenated batch. ``None``: this device's batch
        only (under ``jit`` with a batch-sharded global array that already
        *is* the global batch).
      axis_index_groups: synchronize within these groups of device indices
        only (e.g. ``((0, 1, 2, 3), (4, 5, 6, 7))``).
      use_scale, use_bias: learn ``scale`` / ``bias`` (absent from params
        when False).
      scale_init, bias_init: Flax-style initializers ``(key, shape, dtype)``.
      dtype: output dtype; ``None`` keeps the input's. Statistics are always
        reduced in at least float32.
      param_dtype: dtype of ``scale`` / ``bias``; running statistics are kept
        in float32, or ``param_dtype`` if wider.
      use_fast_variance: compute ``E[x^2] - E[x]^2`` (loses all precision
        when ``|mean| >> std``). The default uses a shifted one-pass formula
        that stays accurate.
      unbiased_running_var: running variance tracks ``n / (n - 1)`` times the
        batch variance, as PyTorch does (normalization always uses the biased
        batch variance).

    Conventions:
      * ``momentum=0.99`` here is PyTorch's ``momentum=0.01``.
      * Running statistics start at mean 0 and variance 1 with no debiasing,
        so evaluation before any training step is defined: it returns
        ``x / sqrt(1 + epsilon) * scale + bias``.
      * A channel whose batch statistics are not finite, or that has no
        valid element under ``mask``, keeps its running statistics; the
        output still shows the NaN.
      * Training on a batch with a single value per feature is an error
        (its variance is meaningless), as in PyTorch.

    Example::

        norm = bn_jax.BatchNorm(momentum=0.9)
        params, state = norm.init(64)
        y, state = norm.apply(params, state, x, training=True)
        y_eval, _ = norm.apply(params, state, x, training=False)

    Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating
    Deep Network Training by Reducing Internal Covariate Shift", ICML 2015.
    """

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

    def __post_init__(self) -> None:
        checks.check_momentum(self.momentum)
        checks.check_epsilon(self.epsilon)
        object.__setattr__(self, "axis", checks.canonical_axis(self.axis))
        object.__setattr__(
            self,
            "axis_index_groups",
            checks.canonical_groups(self.axis_index_groups, self.axis_name),
        )
        checks.check_float_dtype("dtype", self.dtype)
        checks.check_float_dtype("param_dtype", self.param_dtype, allow_none=False)

    @property
    def _name(self) -> str:
        return type(self).__name__

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)`` for ``features``.

        Args:
          features: the number of features, a tuple of sizes (one per feature
            axis) or an example input.
          key: PRNG key for random initializers (the defaults need none).
        """
        shape = feature_shape(features, self.axis, self._name)
        params = init_affine(
            shape,
            use_scale=self.use_scale,
            use_bias=self.use_bias,
            scale_init=self.scale_init,
            bias_init=self.bias_init,
            param_dtype=self.param_dtype,
            key=key,
        )
        return params, self._init_state(shape)

    def _init_state(self, shape: tuple[int, ...]) -> State:
        dt = checks.stat_dtype(self.param_dtype)
        state = {"mean": jnp.zeros(shape, dt), "var": jnp.ones(shape, dt)}
        if self.momentum is None:
            state["count"] = jnp.zeros(shape, jnp.int32)
        return state

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
          state: ``{"mean", "var"}`` (and ``"count"``) from :meth:`init`.
          x: floating-point input with the features along ``axis``.
          training: batch statistics and updated state (True) or running
            statistics and the same state (False). Keyword only, no default.
          mask: boolean array broadcastable to ``x``; only True elements
            enter the batch statistics (all elements are normalized).

        Raises:
          TypeError: integer input or a non-bool ``training``.
          ValueError: feature-size mismatch, axis out of range, a mask that
            does not broadcast, a single value per feature in training, or
            an unbound ``axis_name``.
        """
        training = check_training(training, self._name)
        x, feature_axes, shape, scale, bias, out_dtype = self._prepare(params, state, x)
        reduce_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        scale = broadcastable(scale, x.ndim, feature_axes)
        bias = broadcastable(bias, x.ndim, feature_axes)
        if not training:
            y = normalize_with(
                x, state["mean"], state["var"], scale, bias, feature_axes, self.epsilon, out_dtype
            )
            return y, state

        mask = checks.check_mask(mask, x.shape)
        self._check_batch(x.shape, reduce_axes, mask)
        y, mean, var, count = batch_normalize(
            x, scale, bias, mask, self._stats_config(reduce_axes, out_dtype)
        )
        return y, self._update(state, mean, var, count, shape)

    # Pieces of ``apply`` shared with the BatchNorm variants (BatchRenorm,
    # GhostBatchNorm, SequenceBatchNorm); none of them changes behaviour.

    def _prepare(
        self,
        params: Params,
        state: State,
        x: jax.Array,
        *,
        feature_axes: tuple[int, ...] | None = None,
        check_state: bool = True,
    ) -> tuple[jax.Array, tuple[int, ...], tuple[int, ...], Any, Any, jnp.dtype]:
        """Validates a call; returns ``x``, feature axes and shape, scale, bias, out dtype."""
        checks.check_input(x)
        x = jnp.asarray(x)
        if feature_axes is None:
            feature_axes = checks.resolve_axes(self.axis, x.ndim)
        scale, bias = get_affine(params, self.use_scale, self.use_bias, self._name)
        arrays = {"params['scale']": scale, "params['bias']": bias}
        if check_state:
            arrays["state['mean']"] = state["mean"]
            arrays["state['var']"] = state["var"]
        shape = checks.check_features(x.shape, feature_axes, arrays, self.axis)
        out_dtype = jnp.dtype(self.dtype or x.dtype)
        return x, feature_axes, shape, scale, bias, out_dtype

    def _check_batch(
        self, x_shape: tuple[int, ...], reduce_axes: tuple[int, ...], mask: jax.Array | None
    ) -> None:
        """Raises for an unbound ``axis_name`` or a single value per feature."""
        devices = checks.bound_axis_size(self.axis_name, self.axis_index_groups, self._name)
        if mask is None and math.prod(x_shape[i] for i in reduce_axes) * devices <= 1:
            raise ValueError(
                f"{self._name}: training with a single value per feature (x.shape="
                f"{tuple(x_shape)}, axis={self.axis!r}) has no meaningful variance; use a "
                f"batch of 2 or more, or training=False."
            )

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
    ) -> State:
        """Running statistics updated with keepdims-shaped batch statistics."""
        return update_running(
            state,
            mean.reshape(shape),
            var.reshape(shape),
            count.reshape(shape),
            momentum=self.momentum,
            unbiased=self.unbiased_running_var,
        )


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


def batch_norm(
    params: Params,
    state: State,
    x: jax.Array,
    *,
    training: bool,
    mask: jax.Array | None = None,
    **config: Any,
) -> tuple[jax.Array, State]:
    """Functional form of :class:`BatchNorm`: ``BatchNorm(**config).apply(...)``.

    Example::

        y, state = bn_jax.batch_norm(params, state, x, training=True, momentum=0.9)
    """
    return BatchNorm(**config).apply(params, state, x, training=training, mask=mask)
