"""Batch Renormalization (Ioffe, 2017)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn_jax._core.stats import moments
from bn_jax.norms._common import Params, State, broadcastable, functional
from bn_jax.norms.batch_norm import BatchNorm, Call

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


@dataclasses.dataclass(frozen=True)
class BatchRenorm(BatchNorm):
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
      **kwargs: every option of :class:`BatchNorm` (``momentum``, ``epsilon``,
        ``axis``, ``axis_name``, ``dtype``, ...), with the same meaning.

    State: ``{"mean", "var", "step"}`` (plus ``"count"`` when
    ``momentum=None``); ``step`` is an int32 scalar.

    Conventions:
      * Those of :class:`BatchNorm` (Flax momentum, start at mean 0 / var 1,
        the non-finite guard, no single-value batches).
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
        super().__post_init__()
        _check_limit("rmax", self.rmax, 1.0)
        _check_limit("dmax", self.dmax, 0.0)

    def _init_state(self, shape: tuple[int, ...]) -> State:
        state = super()._init_state(shape)
        state["step"] = jnp.zeros((), jnp.int32)
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

        Args and errors are those of :meth:`BatchNorm.apply`; ``state`` also
        carries the int32 ``"step"`` counter.
        """
        return super().apply(params, state, x, training=training, mask=mask)

    def _prepare(self, params: Params, state: State, x: jax.Array, **kwargs: Any) -> Call:
        if "step" not in state:
            raise ValueError(
                f"{self._name}: state has no 'step' (keys: {sorted(state)}); build it with "
                f"{self._name}.init."
            )
        return super()._prepare(params, state, x, **kwargs)

    def _train_affine(
        self, state: State, c: Call, mask: jax.Array | None, reduce_axes: tuple[int, ...]
    ) -> tuple[Any, Any]:
        """The effective ``(scale * r, bias + scale * d)`` of this training step."""
        # r and d need the batch statistics before normalizing; under jit XLA
        # shares this reduction with the identical one in batch_normalize.
        x, feature_axes, scale, bias = c.x, c.feature_axes, c.scale, c.bias
        batch = moments(
            lax.stop_gradient(x),
            reduce_axes,
            mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            fast_variance=self.use_fast_variance,
        )
        dt = batch.mean.dtype
        run_mean = broadcastable(state["mean"].astype(dt), x.ndim, feature_axes)
        run_std = jnp.sqrt(
            broadcastable(state["var"].astype(dt), x.ndim, feature_axes) + self.epsilon
        )
        step = state["step"]
        rmax = _limit(self.rmax, step, dt)
        dmax = _limit(self.dmax, step, dt)
        r = jnp.clip(jnp.sqrt(batch.var + self.epsilon) / run_std, 1.0 / rmax, rmax)
        d = jnp.clip((batch.mean - run_mean) / run_std, -dmax, dmax)
        r, d = lax.stop_gradient(r), lax.stop_gradient(d)
        eff_scale = r if scale is None else scale.astype(dt) * r
        eff_bias = d if scale is None else scale.astype(dt) * d
        if bias is not None:
            eff_bias = eff_bias + bias.astype(dt)
        return eff_scale, eff_bias

    def _update(self, state: State, *args: Any, **kwargs: Any) -> State:
        new_state = super()._update(state, *args, **kwargs)
        new_state["step"] = state["step"] + 1
        return new_state


batch_renorm = functional(
    BatchRenorm,
    "batch_renorm",
    "y, state = bn_jax.batch_renorm(params, state, x, training=True, rmax=3.0, dmax=5.0)",
)
