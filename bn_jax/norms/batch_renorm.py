"""Batch Renormalization (Ioffe, 2017)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn_jax._core.running import update_running
from bn_jax._core.stats import normalizing_var
from bn_jax.norms import _common
from bn_jax.norms._common import Mask, Params, Signature, State

Schedule = Union[float, Callable[[jax.Array], Any]]  # noqa: UP007 (a runtime alias)


def _check_limit(name: str, value: Any, low: float) -> None:
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"{name} must be a number or a callable of the step count (e.g. an optax "
            f"schedule), got {value!r}."
        )
    if not float(value) >= low:  # also rejects NaN
        raise ValueError(f"{name} must be >= {low} (or a callable of the step), got {value!r}.")


def _limit(value: Schedule, step: jax.Array, dtype: Any) -> jax.Array:
    v = value(step) if callable(value) else value
    return lax.stop_gradient(jnp.asarray(v, dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchRenorm(_common.BatchFields):
    r"""Batch Renormalization: BatchNorm whose training output tracks the running statistics.

    Training mode, per feature, with batch statistics ``mu_B, sigma_B`` and
    running statistics ``mu, sigma`` (``sigma = sqrt(var + epsilon)``)::

        r = stop_gradient(clip(sigma_B / sigma, 1 / rmax, rmax))
        d = stop_gradient(clip((mu_B - mu) / sigma, -dmax, dmax))
        y = ((x - mu_B) / sigma_B * r + d) * scale + bias
        running = momentum * running + (1 - momentum) * batch;   step += 1

    The affine correction is applied as an effective ``scale * r`` and bias
    ``bias + scale * d`` inside the same fused normalization as BatchNorm, so
    the backward pass is BatchNorm's with ``scale * r`` (``r`` and ``d`` are
    constants to the gradient). With ``rmax = 1, dmax = 0`` this is exactly
    BatchNorm; unclipped, the training output equals the evaluation output.
    Evaluation mode uses the running statistics, like BatchNorm.

    When to use it: small or non-i.i.d. mini-batches (batch sizes of a few
    examples, or batches drawn from few classes), where the difference
    between batch and population statistics makes BatchNorm's training and
    inference outputs disagree.

    Args:
      rmax: the bound on ``r`` (``>= 1``), a number or a callable of the
        int32 step count (the number of training steps taken so far, kept in
        ``state["step"]``), e.g. ``optax.linear_schedule(1.0, 3.0, 5000)``.
        The paper starts at 1 and ramps up to 3.
      dmax: the bound on ``|d|`` (``>= 0``), a number or a callable of the
        step count; the paper ramps it from 0 up to 5.
      **BatchNorm's fields**: ``momentum``, ``epsilon``, ``axis``,
        ``axis_name``, ``axis_index_groups``, ``use_scale``, ``use_bias``,
        ``scale_init``, ``bias_init``, ``dtype``, ``param_dtype``,
        ``use_fast_variance``, ``unbiased_running_var``,
        ``allow_single_value`` and ``count_skipped``, with :class:`BatchNorm`'s meaning.

    State: ``{"mean", "var", "step"}`` (plus ``"count"`` when
    ``momentum=None``); ``step`` is an int32 scalar.

    Conventions:
      * Those of :class:`BatchNorm` (Flax momentum, start at mean 0 / var 1,
        the non-finite guard, no single-value batches in training unless
        ``allow_single_value=True``, where ``x - mu_B = 0`` leaves the
        output ``d * scale + bias``).
      * ``r`` and ``d`` use the running statistics *before* this step's
        update, and the schedules see the step count before it is
        incremented (0 on the first training step).
      * Schedules are hashed by identity: pass the same function object to
        get the same (jit-cacheable) configuration.

    Example::

        import optax
        norm = bn_jax.BatchRenorm(rmax=optax.linear_schedule(1.0, 3.0, 5000),
                                  dmax=optax.linear_schedule(0.0, 5.0, 5000))
        params, state = norm.init(64)
        y, state = norm.apply(params, state, x, training=True)

    Reference: S. Ioffe, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", NeurIPS 2017.
    """

    rmax: Schedule = 3.0
    dmax: Schedule = 5.0

    def __post_init__(self) -> None:
        _common.check_batch_fields(self)
        _check_limit("rmax", self.rmax, 1.0)
        _check_limit("dmax", self.dmax, 0.0)

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``; ``state`` also holds the int32 ``"step"``."""
        params, state = _common.init_batch(self, features, key)
        return params, {**state, "step": jnp.zeros((), jnp.int32)}

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Normalizes ``x`` (renormalized batch statistics in training, running ones in
        evaluation); see :meth:`Normalizer.apply`. ``state`` carries ``"step"``.

        Raises:
          ValueError: also for a state without ``"step"`` and, as
            :class:`BatchNorm`, a single value per feature in training.
          TypeError: also for complex input.
        """
        x, mask, sig = _common.check_call(
            self, params, state, x, mask, training, sync_in_eval=False
        )
        lay = _layout(self, sig)
        scale, bias = (
            params[n].reshape(lay.pshape) if n in lay.used else None for n in ("scale", "bias")
        )
        mean, var = (state[n].reshape(lay.pshape) for n in ("mean", "var"))
        if not training:
            return _common.normalize_with(
                x, mean, var, scale, bias, self.epsilon, lay.cfg.out_dtype
            ), state
        scale, bias = _renorm_affine(self, lay, state["step"], x, mask, mean, var, scale, bias)
        y, batch_mean, batch_var, count = lay.normalize(x, scale, bias, mask, lay.cfg)
        new_state = update_running(
            state,
            batch_mean,
            batch_var,
            count,
            momentum=self.momentum,
            unbiased=self.unbiased_running_var,
        )
        return y, {**new_state, "step": state["step"] + 1}


@functools.lru_cache(maxsize=256)
def _layout(norm: BatchRenorm, sig: Signature) -> _common.Layout:
    lay = _common.batch_layout(norm, "BatchRenorm", sig)
    state = dict(sig.state or ())  # batch_layout has raised if the state is not a dict
    if "step" not in state:
        raise ValueError(
            f"BatchRenorm: state has no 'step' (keys: {sorted(state)}); build it with "
            f"BatchRenorm.init."
        )
    _common.check_real("BatchRenorm", sig, " (its corrections r and d are clipped)")
    return lay


def _renorm_affine(
    norm: BatchRenorm,
    lay: _common.Layout,
    step: jax.Array,
    x: jax.Array,
    mask: Mask,
    run_mean: jax.Array,
    run_var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """The effective ``(scale * r, bias + scale * d)`` of this training step."""
    cfg = lay.cfg
    # r and d need the batch statistics before normalizing; under jit XLA
    # shares this reduction with the identical one in batch_normalize.
    batch = cfg.moments(lax.stop_gradient(x), mask)
    dt = batch.mean.dtype
    run_std = jnp.sqrt(run_var.astype(dt) + norm.epsilon)
    rmax = _limit(norm.rmax, step, dt)
    dmax = _limit(norm.dmax, step, dt)
    var = normalizing_var(batch, mask)  # the variance batch_normalize uses
    r = jnp.clip(jnp.sqrt(var + norm.epsilon) / run_std, 1.0 / rmax, rmax)
    d = jnp.clip((batch.mean - run_mean.astype(dt)) / run_std, -dmax, dmax)
    r, d = lax.stop_gradient(r), lax.stop_gradient(d)
    new_scale = r if scale is None else scale.astype(dt) * r
    new_bias = d if scale is None else scale.astype(dt) * d
    if bias is not None:
        new_bias = new_bias + bias.astype(dt)
    return new_scale, new_bias


batch_renorm = _common.functional(
    BatchRenorm,
    "batch_renorm",
    "y, state = bn_jax.batch_renorm(params, state, x, training=True, rmax=3.0, dmax=5.0)",
)
