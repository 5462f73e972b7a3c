"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax

from bn_jax._core.normalize import StatsConfig, batch_normalize
from bn_jax._core.running import update_running
from bn_jax.norms import _common
from bn_jax.norms._common import Mask, Params, Signature, State


@dataclasses.dataclass(frozen=True, kw_only=True)
class GhostBatchNorm(_common.BatchFields):
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

    virtual_batch_size: int

    def __post_init__(self) -> None:
        _common.check_batch_fields(self)
        v = _common.check_int("virtual_batch_size", self.virtual_batch_size, positive=True)
        _common.freeze(self, virtual_batch_size=v)

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``; see :meth:`Normalizer.init`."""
        return _common.init_batch(self, features, key)

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
        x, mask, sig = _common.check_call(
            self, params, state, x, mask, training, sync_in_eval=False
        )
        lay, cfg = _layout(self, sig)
        scale, bias = (
            params[n].reshape(lay.pshape) if n in lay.used else None for n in ("scale", "bias")
        )
        if not training:
            mean, var = (state[n].reshape(lay.pshape) for n in ("mean", "var"))
            return _common.normalize_with(
                x, mean, var, scale, bias, self.epsilon, cfg.out_dtype
            ), state
        v = self.virtual_batch_size
        xg = x.reshape((x.shape[0] // v, v, *x.shape[1:]))  # [virtual batch, example, ...]
        if mask is not None:
            mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
            mask = (
                mask[None] if mask.shape[0] == 1 else mask.reshape((*xg.shape[:2], *mask.shape[1:]))
            )
        scale, bias = (None if a is None else a[None] for a in (scale, bias))
        y, mean, var, count = batch_normalize(xg, scale, bias, mask, cfg)
        # One update with the count-weighted average of the sub-batch statistics
        # (made unbiased there if asked).
        stats = _common.average_stats(
            mean,
            var,
            count,
            unbiased=self.unbiased_running_var,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )
        return y.reshape(x.shape), update_running(state, *stats, momentum=self.momentum)


@functools.lru_cache(maxsize=256)
def _layout(norm: GhostBatchNorm, sig: Signature) -> tuple[_common.Layout, StatsConfig]:
    """BatchNorm's layout (its single-value check is per virtual batch, below) and the
    statistics of each virtual batch on this device."""
    lay = _common.batch_layout(norm, "GhostBatchNorm", sig._replace(training=False))
    if 0 in lay.feature_axes:
        raise ValueError(
            f"GhostBatchNorm: axis={norm.axis!r} includes axis 0, which is the batch axis "
            f"split into virtual batches; put the batch first."
        )
    _common.check_real("GhostBatchNorm", sig)
    v, batch = norm.virtual_batch_size, sig.shape[0]
    if not sig.training:
        return lay, lay.cfg
    if batch % v:
        raise ValueError(
            f"GhostBatchNorm: virtual_batch_size={v} does not divide the per-device batch "
            f"of {batch} examples (x.shape[0]); use a batch that is a multiple of {v} or "
            f"a virtual_batch_size among the divisors of {batch}."
        )
    grouped = (batch // v, v, *sig.shape[1:])
    reduce_g = _common.other_axes(len(grouped), tuple(a + 1 for a in lay.feature_axes), first=1)
    _common.check_single_value(
        math.prod(grouped[i] for i in reduce_g),
        norm.allow_single_value,
        f"GhostBatchNorm: training with virtual_batch_size={v} leaves a single value per "
        f"feature in each virtual batch (x.shape={sig.shape}); use virtual_batch_size >= 2.",
    )
    # Each device normalizes its own virtual batches; only the running update syncs.
    return lay, lay.cfg._replace(
        axes=reduce_g, axis_name=None, axis_index_groups=None, custom_derivative=True
    )


ghost_batch_norm = _common.functional(
    GhostBatchNorm,
    "ghost_batch_norm",
    "y, state = bn_jax.ghost_batch_norm(params, state, x, training=True,\n"
    "                                           virtual_batch_size=16)",
)
