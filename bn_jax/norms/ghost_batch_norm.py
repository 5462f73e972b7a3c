"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from bn_jax._core import checks
from bn_jax._core.normalize import batch_normalize
from bn_jax.norms._common import Params, State, average_stats, functional
from bn_jax.norms.batch_norm import BatchNorm, Call


@dataclasses.dataclass(frozen=True)
class GhostBatchNorm(BatchNorm):
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
      **kwargs: every option of :class:`BatchNorm`, with the same meaning,
        except that ``axis`` may not include the batch axis 0.

    Cross-device (``axis_name``): virtual batches are contiguous slices of
    one device's batch and are normalized there, with no communication in
    the forward or backward pass (this is the usual meaning of ghost
    batches, and the point of them). The running-statistic update averages
    the sub-batch statistics of *all* devices (one ``psum`` of ``3 C``
    numbers), so every device keeps the same running statistics and the
    result equals single-device GhostBatchNorm on the concatenated batch.
    With ``axis_name=None`` each device keeps its own running statistics.

    Conventions: those of :class:`BatchNorm`. ``virtual_batch_size`` equal
    to the batch is BatchNorm.

    Example::

        norm = bn_jax.GhostBatchNorm(virtual_batch_size=32)
        params, state = norm.init(64)
        y, state = norm.apply(params, state, x, training=True)  # x.shape[0] % 32 == 0

    Reference: E. Hoffer, I. Hubara and D. Soudry, "Train longer, generalize
    better: closing the generalization gap in large batch training of
    neural networks", NeurIPS 2017.
    """

    virtual_batch_size: int = dataclasses.field(kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        v = self.virtual_batch_size
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"virtual_batch_size must be a positive int, got {v!r}.")
        if v <= 0:
            raise ValueError(f"virtual_batch_size must be a positive int, got {v!r}.")
        object.__setattr__(self, "virtual_batch_size", int(v))

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

        Args are those of :meth:`BatchNorm.apply`.

        Raises:
          ValueError: as :meth:`BatchNorm.apply`, and when ``virtual_batch_size``
            does not divide ``x.shape[0]`` or ``axis`` includes axis 0.
        """
        return super().apply(params, state, x, training=training, mask=mask)

    def _prepare(self, params: Params, state: State, x: jax.Array, **kwargs: Any) -> Call:
        c = super()._prepare(params, state, x, **kwargs)
        if 0 in c.feature_axes:
            raise ValueError(
                f"{self._name}: axis={self.axis!r} includes axis 0, which is the batch axis "
                f"split into virtual batches; put the batch first."
            )
        return c

    def _train(
        self, state: State, c: Call, mask: Any, reduce_axes: tuple[int, ...]
    ) -> tuple[jax.Array, State]:
        """Normalizes each virtual batch on its own; one running update for all."""
        x, feature_axes = c.x, c.feature_axes
        v, batch = self.virtual_batch_size, x.shape[0]
        if batch % v:
            raise ValueError(
                f"{self._name}: virtual_batch_size={v} does not divide the per-device batch "
                f"of {batch} examples (x.shape[0]); use a batch that is a multiple of {v} or "
                f"a virtual_batch_size among the divisors of {batch}."
            )
        mask = checks.check_mask(mask, x.shape)
        checks.bound_axis_size(self.axis_name, self.axis_index_groups, self._name)
        k = batch // v
        xg = x.reshape((k, v, *x.shape[1:]))
        g_axes = tuple(a + 1 for a in feature_axes)
        reduce_g = tuple(i for i in range(1, xg.ndim) if i not in g_axes)
        if mask is None and math.prod(xg.shape[i] for i in reduce_g) <= 1:
            raise ValueError(
                f"{self._name}: training with virtual_batch_size={v} leaves a single value per "
                f"feature in each virtual batch (x.shape={tuple(x.shape)}); use "
                f"virtual_batch_size >= 2."
            )
        if mask is not None:
            mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
            mask = mask[None] if mask.shape[0] == 1 else mask.reshape((k, v, *mask.shape[1:]))
        y, mean, var, count = batch_normalize(
            xg,
            None if c.scale is None else c.scale[None],  # broadcastable against xg
            None if c.bias is None else c.bias[None],
            mask,
            self._stats_config(reduce_g, c.out_dtype, sync=False),
        )
        # One update with the count-weighted average of the sub-batch statistics.
        mean, var, total = average_stats(
            mean,
            var,
            count,
            unbiased=self.unbiased_running_var,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )
        # average_stats already made the variance unbiased if asked.
        return y.reshape(x.shape), self._update(state, mean, var, total, c.shape, unbiased=False)


ghost_batch_norm = functional(
    GhostBatchNorm,
    "ghost_batch_norm",
    "y, state = bn_jax.ghost_batch_norm(params, state, x, training=True,\n"
    "                                           virtual_batch_size=16)",
)
