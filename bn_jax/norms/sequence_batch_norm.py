"""Sequence (recurrent) Batch Normalization (Cooijmans et al., 2016)."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn_jax._core import checks
from bn_jax._core.normalize import affine, batch_normalize
from bn_jax.norms._common import (
    Affine,
    Initializer,
    Mask,
    Params,
    State,
    batch_mask,
    check_batch_fields,
    check_int,
    check_state_keys,
    check_training,
    check_x,
    checked_affine,
    feature_shape,
    freeze,
    functional_doc,
    init_params,
    init_running,
    normalize_with,
    other_axes,
    out_dtype,
    running_keys,
    stats_config,
    update_state,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceBatchNorm:
    r"""Recurrent Batch Normalization: separate statistics for every time step.

    For an input with a time axis (``[batch, time, features]`` by default),
    training mode normalizes each time step ``t`` with the statistics of
    that step alone, over every axis except the time and feature axes::

        y[:, t] = (x[:, t] - mu_t) / sqrt(var_t + epsilon) * scale + bias
        running[t] = momentum * running[t] + (1 - momentum) * batch_t,  t < max_steps

    Running statistics have shape ``[max_steps, *features]``; ``scale`` and
    ``bias`` are shared by all steps. Evaluation at step ``t`` uses running
    slot ``min(t, max_steps - 1)``: steps past ``max_steps`` reuse the last
    step's statistics. In training, steps ``t >= max_steps`` are normalized
    with their own batch statistics but leave the running statistics alone,
    so that a whole sequence and a ``lax.scan`` over its steps give the same
    state.

    Two ways to call ``apply``:

    * whole sequence: ``apply(params, state, x, training=...)`` with the time
      along ``time_axis``;
    * one step: ``apply(params, state, x_t, training=..., step=t)`` where
      ``x_t`` is the input with the time axis removed and ``t`` an int or an
      int32 scalar (traced inside ``lax.scan``). ``axis`` and ``time_axis``
      keep referring to the full sequence layout.

    When to use it: BatchNorm inside recurrent networks (the input-to-hidden
    and hidden-to-hidden transforms of an LSTM or GRU), where activation
    statistics change from step to step. Pad variable-length sequences and
    pass a ``mask`` (e.g. of shape ``[batch, time, 1]``) so that padding
    takes no part in the statistics; a step where every sequence is padded
    leaves its running statistics unchanged.

    Args:
      max_steps: number of time steps with their own running statistics
        (keyword only, required).
      time_axis: the time axis of a whole-sequence input (default 1: batch
        first); it may not be a feature axis.
      **BatchNorm's fields**: ``momentum``, ``epsilon``, ``axis``,
        ``axis_name``, ``axis_index_groups``, ``use_scale``, ``use_bias``,
        ``scale_init``, ``bias_init``, ``dtype``, ``param_dtype``,
        ``use_fast_variance``, ``unbiased_running_var``,
        ``allow_single_value`` and ``count_skipped``, with :class:`BatchNorm`'s meaning; ``axis``
        names the feature axes of the whole-sequence layout.

    Conventions: those of :class:`BatchNorm` (``allow_single_value``
    included), per step. The paper also
    recommends initializing ``scale`` to 0.1 in recurrent networks
    (``scale_init=jax.nn.initializers.constant(0.1)``).

    Example::

        norm = bn_jax.SequenceBatchNorm(max_steps=50)
        params, state = norm.init(128)
        y, state = norm.apply(params, state, x, training=True)   # x: [B, T, 128]

        def body(state, xs):                                     # step by step
            t, x_t = xs
            y_t, state = norm.apply(params, state, x_t, training=True, step=t)
            return state, y_t
        state, ys = jax.lax.scan(body, state, (jnp.arange(T), jnp.swapaxes(x, 0, 1)))

    Reference: T. Cooijmans, N. Ballas, C. Laurent, C. Gulcehre and
    A. Courville, "Recurrent Batch Normalization", ICLR 2017 (arXiv 2016).
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
    max_steps: int
    time_axis: int = 1

    def __post_init__(self) -> None:
        check_batch_fields(self)
        freeze(
            self,
            max_steps=check_int("max_steps", self.max_steps, positive=True),
            time_axis=check_int("time_axis", self.time_axis),
        )

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``; state arrays have shape ``[max_steps, *features]``.

        ``features`` may be an example whole-sequence input (see
        :meth:`Normalizer.init`).
        """
        if hasattr(features, "shape") and hasattr(features, "ndim"):
            _layout(self, features.ndim, step_mode=False)  # checks time_axis vs axis
        shape = feature_shape(features, self.axis, "SequenceBatchNorm")
        one = init_running(self, shape)
        state = {k: jnp.repeat(v[None], self.max_steps, 0) for k, v in one.items()}
        return init_params(self, shape, key), state

    def apply(
        self,
        params: Params,
        state: State,
        x: jax.Array,
        *,
        training: bool,
        mask: Mask = None,
        step: int | jax.Array | None = None,
    ) -> tuple[jax.Array, State]:
        """Normalizes a whole sequence, or one step of it; see :meth:`Normalizer.apply`.

        Args:
          params, state, training, mask: as in :meth:`Normalizer.apply`;
            ``state`` arrays have shape ``[max_steps, *features]``, and a mask
            such as ``[batch, time, 1]`` leaves out padded steps.
          x: a whole sequence (time along ``time_axis``) when ``step`` is None,
            otherwise one time step (the sequence layout without its time axis).
          step: the time index of a single-step ``x``: a non-negative int or an
            integer scalar array (may be traced, e.g. inside ``lax.scan``).

        Raises:
          ValueError: also for a ``time_axis`` out of range for ``x``, a time
            axis that is also a feature axis, state of the wrong shape, or a
            single value per feature and step in training (unless
            ``allow_single_value``).
          TypeError: also for a non-integer ``step``.
        """
        training, x = check_training(training, "SequenceBatchNorm"), check_x(x)
        time, feature_axes = _layout(self, x.ndim, step_mode=step is not None)
        if step is not None:  # the feature axes of the step, without the time axis
            feature_axes = tuple(a - (a > time) for a in feature_axes)
        aff = checked_affine(self, params, x, feature_axes, "axis")
        check_state_keys(state, running_keys(self), "SequenceBatchNorm")
        for name in ("mean", "var"):
            if tuple(state[name].shape) != (self.max_steps, *aff.shape):
                raise ValueError(
                    f"SequenceBatchNorm: state[{name!r}] has shape {tuple(state[name].shape)} "
                    f"but max_steps={self.max_steps} and the feature shape {aff.shape} need "
                    f"{(self.max_steps, *aff.shape)}; build the state with "
                    f"SequenceBatchNorm.init."
                )
        out = out_dtype(self, x)
        if step is not None:
            return _apply_step(self, state, x, aff, feature_axes, out, mask, step, training)
        steps = x.shape[time]
        if not training:
            slots = np.minimum(np.arange(steps), self.max_steps - 1)
            mean = _place(state["mean"][slots], x.ndim, (time, *feature_axes))
            var = _place(state["var"][slots], x.ndim, (time, *feature_axes))
            inv = lax.rsqrt(var + jnp.asarray(self.epsilon, var.dtype))
            return affine(x, mean, inv, aff.scale, aff.bias, out), state
        reduce_axes = other_axes(x.ndim, (time, *feature_axes))
        mask = batch_mask(self, x.shape, reduce_axes, mask)
        cfg = stats_config(self, reduce_axes, out)
        y, *stats = batch_normalize(x, aff.scale, aff.bias, mask, cfg)
        k = min(steps, self.max_steps)  # steps past max_steps leave the state alone
        stats = tuple(_take(v, (time, *feature_axes))[:k] for v in stats)
        new = update_state(self, {n: v[:k] for n, v in state.items()}, stats, (k, *aff.shape))
        return y, {name: jnp.asarray(state[name]).at[:k].set(new[name]) for name in state}


def _layout(norm: SequenceBatchNorm, ndim: int, *, step_mode: bool) -> tuple[int, tuple[int, ...]]:
    """(time axis, feature axes) of the full sequence layout of an input of rank ``ndim``."""
    full = ndim + 1 if step_mode else ndim
    if not -full <= norm.time_axis < full:
        what = (
            f"x of rank {ndim} is one time step (step was given), so the sequence has rank {full}"
            if step_mode
            else f"x has rank {ndim}; a single time step needs the step= argument"
        )
        raise ValueError(
            f"SequenceBatchNorm: time_axis={norm.time_axis} is out of range: {what}; valid "
            f"values are {-full}..{full - 1}."
        )
    time = norm.time_axis % full
    feature_axes = checks.resolve_axes(norm.axis, full)
    if time in feature_axes:
        raise ValueError(
            f"SequenceBatchNorm: time_axis={norm.time_axis} is also a feature axis "
            f"(axis={norm.axis!r}); the features and the time must be different axes."
        )
    return time, feature_axes


def _apply_step(
    norm: SequenceBatchNorm,
    state: State,
    x: jax.Array,
    aff: Affine,
    feature_axes: tuple[int, ...],
    out: jnp.dtype,
    mask: Mask,
    step: Any,
    training: bool,
) -> tuple[jax.Array, State]:
    """One time step: BatchNorm with the running statistics of slot ``step``."""
    step = _check_step(step)
    slot = jnp.clip(step, 0, norm.max_steps - 1)
    old = {n: lax.dynamic_index_in_dim(v, slot, 0, keepdims=False) for n, v in state.items()}
    if not training:
        return normalize_with(
            x, old["mean"], old["var"], aff, feature_axes, norm.epsilon, out
        ), state
    reduce_axes = other_axes(x.ndim, feature_axes)
    mask = batch_mask(norm, x.shape, reduce_axes, mask)
    cfg = stats_config(norm, reduce_axes, out)
    y, *stats = batch_normalize(x, aff.scale, aff.bias, mask, cfg)
    new = update_state(norm, old, stats, aff.shape)
    in_range = (step >= 0) & (step < norm.max_steps)
    return y, {
        name: lax.dynamic_update_index_in_dim(v, jnp.where(in_range, new[name], old[name]), slot, 0)
        for name, v in state.items()
    }


def _check_step(step: Any) -> jax.Array:
    if isinstance(step, bool):
        raise TypeError(
            f"SequenceBatchNorm: step must be an int or an integer scalar, got {step!r}."
        )
    if isinstance(step, (int, np.integer)):
        if step < 0:
            raise ValueError(f"SequenceBatchNorm: step must be >= 0, got {step}.")
        return jnp.asarray(step, jnp.int32)
    step = jnp.asarray(step)
    if step.shape != () or not jnp.issubdtype(step.dtype, jnp.integer):
        raise TypeError(
            f"SequenceBatchNorm: step must be an int or an integer scalar array, got an array "
            f"of shape {tuple(step.shape)} and dtype {step.dtype}."
        )
    return step


def _place(v: jax.Array, ndim: int, axes: tuple[int, ...]) -> jax.Array:
    """Broadcastable form of ``v`` whose dimension ``i`` lies along input axis ``axes[i]``."""
    perm = sorted(range(len(axes)), key=lambda i: axes[i])
    shape = [1] * ndim
    for i, a in enumerate(axes):
        shape[a] = v.shape[i]
    return jnp.transpose(v, perm).reshape(shape)


def _take(v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Inverse of ``_place``: the keepdims array ``v`` with its dims ordered as ``axes``."""
    kept = sorted(axes)
    v = v.reshape([v.shape[a] for a in kept])
    return jnp.transpose(v, [kept.index(a) for a in axes])


def sequence_batch_norm(
    params: Params,
    state: State,
    x: jax.Array,
    *,
    training: bool,
    mask: jax.Array | None = None,
    step: int | jax.Array | None = None,
    **config: Any,
) -> tuple[jax.Array, State]:
    return SequenceBatchNorm(**config).apply(
        params, state, x, training=training, mask=mask, step=step
    )


sequence_batch_norm.__doc__ = functional_doc(
    "SequenceBatchNorm",
    "Recurrent Batch Normalization: separate statistics for every time step",
    "y, state = bn_jax.sequence_batch_norm(params, state, x, training=True, max_steps=50)",
    extra_args=(
        "      step: the time index of a single-step ``x`` (see\n"
        "        :meth:`SequenceBatchNorm.apply`); None for a whole sequence.\n"
    ),
)
