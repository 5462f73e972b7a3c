"""Batch Normalization (Ioffe & Szegedy, 2015)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from bn_jax._core.running import update_running
from bn_jax.norms import _common
from bn_jax.norms._common import Mask, Params, State


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchNorm(_common.BatchFields):
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
      allow_single_value: train on a batch with one value per feature
        instead of raising (see Conventions).
      count_skipped: add an int32 ``skipped`` to the state that counts, per
        feature, the training steps whose batch statistics were not finite
        (their running update was dropped), for a training log. Off by
        default, so that the state is Flax's ``{"mean", "var"}``.

    Conventions:
      * ``momentum=0.99`` here is PyTorch's ``momentum=0.01``.
      * Running statistics start at mean 0 and variance 1 with no debiasing,
        so evaluation before any training step is defined: it returns
        ``x / sqrt(1 + epsilon) * scale + bias``.
      * A channel whose batch statistics are not finite, or that has no
        valid element under ``mask``, keeps its running statistics; the
        output still shows the NaN.
      * Training on a batch with a single value per feature is an error
        (its variance is meaningless), as in PyTorch;
        ``allow_single_value=True`` computes it instead, as Flax does
        (variance 0, so the output is ``bias``).

    Example::

        norm = bn_jax.BatchNorm(momentum=0.9)
        params, state = norm.init(64)
        y, state = norm.apply(params, state, x, training=True)
        y_eval, _ = norm.apply(params, state, x, training=False)

    Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating
    Deep Network Training by Reducing Internal Covariate Shift", ICML 2015.
    """

    def __post_init__(self) -> None:
        _common.check_batch_fields(self)

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``; see :meth:`Normalizer.init`."""
        return _common.init_batch(self, features, key)

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Normalizes ``x`` with batch (training) or running statistics; see
        :meth:`Normalizer.apply`.

        Raises:
          ValueError: also for a single value per feature in training, unless
            ``allow_single_value``.
        """
        x, mask, sig = _common.check_call(
            self, params, state, x, mask, training, sync_in_eval=False
        )
        lay = _common.batch_layout(self, "BatchNorm", sig)
        scale, bias = (
            params[n].reshape(lay.pshape) if n in lay.used else None for n in ("scale", "bias")
        )
        if not training:
            mean, var = (state[n].reshape(lay.pshape) for n in ("mean", "var"))
            return _common.normalize_with(
                x, mean, var, scale, bias, self.epsilon, lay.cfg.out_dtype
            ), state
        y, mean, var, count = lay.normalize(x, scale, bias, mask, lay.cfg)
        return y, update_running(
            state, mean, var, count, momentum=self.momentum, unbiased=self.unbiased_running_var
        )


batch_norm = _common.functional(
    BatchNorm,
    "batch_norm",
    "y, state = bn_jax.batch_norm(params, state, x, training=True, momentum=0.9)",
)
