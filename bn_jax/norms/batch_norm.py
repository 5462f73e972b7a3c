"""Batch Normalization (Ioffe & Szegedy, 2015)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bn_jax._core import checks
from bn_jax._core.normalize import batch_normalize
from bn_jax.norms._common import (
    Initializer,
    NormMixin,
    Params,
    State,
    broadcastable,
    check_training,
    feature_shape,
    functional,
)


class Call(NamedTuple):
    """A validated ``apply`` call of the BatchNorm family."""

    x: jax.Array
    feature_axes: tuple[int, ...]
    shape: tuple[int, ...]  # the feature shape
    scale: jax.Array | None  # broadcastable against x
    bias: jax.Array | None
    out_dtype: jnp.dtype


@dataclasses.dataclass(frozen=True)
class BatchNorm(NormMixin):
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
        self._check_groups_and_dtypes()

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)`` for ``features``.

        Args:
          features: the number of features, a tuple of sizes (one per feature
            axis) or an example input.
          key: PRNG key for random initializers (the defaults need none).
        """
        shape = feature_shape(features, self.axis, self._name)
        return self._init_params(shape, key), self._init_state(shape)

    def _init_state(self, shape: tuple[int, ...]) -> State:
        return self._init_running(shape)

    def _check_running_state(self, state: State) -> None:
        need = set(jax.eval_shape(lambda: self._init_state((1,))))
        have = set(state) if isinstance(state, Mapping) else set()
        if not need <= have:
            raise ValueError(
                f"{self._name}: state has keys {sorted(have)} but needs {sorted(need)}; "
                f"build it with {self._name}.init (momentum=None adds 'count')."
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
        c = self._prepare(params, state, x)
        if not training:
            return self._normalize_running(c.x, state, c.scale, c.bias, c.feature_axes, c.out_dtype)
        reduce_axes = tuple(i for i in range(c.x.ndim) if i not in c.feature_axes)
        return self._train(state, c, mask, reduce_axes)

    # Pieces of ``apply`` shared with the BatchNorm variants: BatchRenorm
    # overrides ``_prepare`` (its state check), ``_train_affine`` and
    # ``_update``; GhostBatchNorm ``_prepare`` and ``_train``;
    # SequenceBatchNorm calls them from its own ``apply``.

    def _prepare(
        self,
        params: Params,
        state: State,
        x: jax.Array,
        *,
        feature_axes: tuple[int, ...] | None = None,
        check_state: bool = True,
    ) -> Call:
        """Validates a call (and ``state``'s shapes when ``check_state``)."""
        checks.check_input(x)
        x = jnp.asarray(x)
        if feature_axes is None:
            feature_axes = checks.resolve_axes(self.axis, x.ndim)
        scale, bias, shape = self._affine(
            params, x, feature_axes, "axis", state if check_state else None
        )
        return Call(
            x,
            feature_axes,
            shape,
            broadcastable(scale, x.ndim, feature_axes),
            broadcastable(bias, x.ndim, feature_axes),
            jnp.dtype(self.dtype or x.dtype),
        )

    def _train(
        self, state: State, c: Call, mask: Any, reduce_axes: tuple[int, ...]
    ) -> tuple[jax.Array, State]:
        """Training mode: ``(y, new_state)`` from the batch statistics over ``reduce_axes``."""
        mask = self._batch_mask(c.x.shape, reduce_axes, mask)
        scale, bias = self._train_affine(state, c, mask, reduce_axes)
        y, mean, var, count = batch_normalize(
            c.x, scale, bias, mask, self._stats_config(reduce_axes, c.out_dtype)
        )
        return y, self._update(state, mean, var, count, c.shape)

    def _train_affine(
        self, state: State, c: Call, mask: jax.Array | None, reduce_axes: tuple[int, ...]
    ) -> tuple[Any, Any]:
        """The scale and bias of a training step (BatchRenorm corrects them here)."""
        return c.scale, c.bias

    def _batch_mask(
        self, x_shape: tuple[int, ...], reduce_axes: tuple[int, ...], mask: Any
    ) -> jax.Array | None:
        """The checked ``mask``; raises for an unbound ``axis_name`` or a single value per
        feature."""
        mask = checks.check_mask(mask, x_shape)
        devices = checks.bound_axis_size(self.axis_name, self.axis_index_groups, self._name)
        if math.prod(x_shape[i] for i in reduce_axes) * devices <= 1:
            raise ValueError(
                f"{self._name}: training with a single value per feature (x.shape="
                f"{tuple(x_shape)}, axis={self.axis!r}) has no meaningful variance; use a "
                f"batch of 2 or more, or training=False."
            )
        return mask


batch_norm = functional(
    BatchNorm,
    "batch_norm",
    "y, state = bn_jax.batch_norm(params, state, x, training=True, momentum=0.9)",
)
