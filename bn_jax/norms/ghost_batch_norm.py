"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bn_jax._core.normalize import batch_normalize
from bn_jax.norms._common import (
    Initializer,
    Mask,
    Params,
    State,
    average_stats,
    check_batch_call,
    check_batch_fields,
    check_int,
    check_single_value,
    checked_mask,
    feature_shape,
    freeze,
    functional,
    init_params,
    init_running,
    other_axes,
    running_output,
    stats_config,
    update_state,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GhostBatchNorm:
    r"""Ghost Batch Normalization: BatchNorm over small virtual sub-batches.

    Training mode splits the batch axis (axis 0) into ``k = B / v``
    contiguous virtual batches of ``v = virtual_batch_size`` examples and
    normalizes each with its own statistics::

        x[j*v:(j+1)*v] -> (x - mu_j) / sqrt(var_j + epsilon) * scale + bias
        running = momentum * running + (1 - momentum) * mean_j(mu_j, var_j)

    The running statistics are updated once per step, with the average of
    the sub-batch means and (biased, or unbiased with
    ``unbiased_running_var``) variances, weighted by their valid-element
    counts when a ``mask`` is given. Evaluation mode is BatchNorm's.

    When to use it: large-batch training, where BatchNorm over the whole
    batch loses the regularizing noise of small batches and generalizes
    worse; ghost batches of 16 to 128 examples restore it at no extra cost.

    Args:
      virtual_batch_size: examples per virtual batch (keyword only, required);
        it must divide the per-device batch ``x.shape[0]``.
      **BatchNorm's fields**: ``momentum``, ``epsilon``, ``axis``,
        ``axis_name``, ``axis_index_groups``, ``use_scale``, ``use_bias``,
        ``scale_init``, ``bias_init``, ``dtype``, ``param_dtype``,
        ``use_fast_variance``, ``unbiased_running_var``,
        ``allow_single_value`` and ``count_skipped``, with :class:`BatchNorm`'s meaning, except that
        ``axis`` may not include the batch axis 0.

    Cross-device (``axis_name``): virtual batches are contiguous slices of
    one device's batch and are normalized there, with no communication in
    the forward or backward pass (this is the usual meaning of ghost
    batches, and the point of them). The running-statistic update averages
    the sub-batch statistics of *all* devices (one ``psum`` of ``3 C``
    numbers), so every device keeps the same running statistics and the
    result equals single-device GhostBatchNorm on the concatenated batch.
    With ``axis_name=None`` each device keeps its own running statistics.

    Conventions: those of :class:`BatchNorm`, per virtual batch (so
    ``allow_single_value=True`` allows ``virtual_batch_size=1``).
    ``virtual_batch_size`` equal to the batch is BatchNorm.

    Example::

        norm = bn_jax.GhostBatchNorm(virtual_batch_size=32)
        params, state = norm.init(64)
        y, state = norm.apply(params, state, x, training=True)  # x.shape[0] % 32 == 0

    Reference: E. Hoffer, I. Hubara and D. Soudry, "Train longer, generalize
    better: closing the generalization gap in large batch training of
    neural networks", NeurIPS 2017.
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
    allow_single_value: bool = False
    count_skipped: bool = False
    virtual_batch_size: int

    def __post_init__(self) -> None:
        check_batch_fields(self)
        v = check_int("virtual_batch_size", self.virtual_batch_size, positive=True)
        freeze(self, virtual_batch_size=v)

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``; see :meth:`Normalizer.init`."""
        shape = feature_shape(features, self.axis, "GhostBatchNorm")
        return init_params(self, shape, key), init_running(self, shape)

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Normalizes ``x`` with the statistics of each virtual batch (training) or the
        running ones; see :meth:`Normalizer.apply`.

        Raises:
          ValueError: also when ``virtual_batch_size`` does not divide
            ``x.shape[0]``, ``axis`` includes axis 0, or a virtual batch has a
            single value per feature (unless ``allow_single_value``).
        """
        training, c = check_batch_call(self, params, state, x, training)
        if 0 in c.feature_axes:
            raise ValueError(
                f"GhostBatchNorm: axis={self.axis!r} includes axis 0, which is the batch axis "
                f"split into virtual batches; put the batch first."
            )
        if not training:
            return running_output(self, state, c), state
        x, aff = c.x, c.affine
        v, batch = self.virtual_batch_size, x.shape[0]
        if batch % v:
            raise ValueError(
                f"GhostBatchNorm: virtual_batch_size={v} does not divide the per-device batch "
                f"of {batch} examples (x.shape[0]); use a batch that is a multiple of {v} or "
                f"a virtual_batch_size among the divisors of {batch}."
            )
        mask, _ = checked_mask(self, x.shape, mask)
        xg = x.reshape((batch // v, v, *x.shape[1:]))  # [virtual batch, example, ...]
        reduce_g = other_axes(xg.ndim, tuple(a + 1 for a in c.feature_axes), first=1)
        check_single_value(
            math.prod(xg.shape[i] for i in reduce_g),
            self.allow_single_value,
            f"GhostBatchNorm: training with virtual_batch_size={v} leaves a single value per "
            f"feature in each virtual batch (x.shape={tuple(x.shape)}); use "
            f"virtual_batch_size >= 2.",
        )
        if mask is not None:
            mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
            mask = (
                mask[None] if mask.shape[0] == 1 else mask.reshape((*xg.shape[:2], *mask.shape[1:]))
            )
        cfg = stats_config(self, reduce_g, c.out, sync=False)  # each device its own batches
        scale, bias = (None if a is None else a[None] for a in (aff.scale, aff.bias))
        y, mean, var, count = batch_normalize(xg, scale, bias, mask, cfg)
        # One update with the count-weighted average of the sub-batch statistics.
        stats = average_stats(
            mean,
            var,
            count,
            unbiased=self.unbiased_running_var,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )
        # average_stats already made the variance unbiased if asked.
        return y.reshape(x.shape), update_state(self, state, stats, aff.shape, unbiased=False)


ghost_batch_norm = functional(
    GhostBatchNorm,
    "ghost_batch_norm",
    "y, state = bn_jax.ghost_batch_norm(params, state, x, training=True,\n"
    "                                           virtual_batch_size=16)",
)
