"""Sequence (recurrent) Batch Normalization (Cooijmans et al., 2016)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn_jax._core import checks
from bn_jax._core.normalize import affine, batch_normalize
from bn_jax._core.running import update_running
from bn_jax.norms._common import Params, State, check_training, functional_doc, normalize_with
from bn_jax.norms.batch_norm import BatchNorm, Call


@dataclasses.dataclass(frozen=True)
class SequenceBatchNorm(BatchNorm):
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
      **kwargs: every option of :class:`BatchNorm` with the same meaning;
        ``axis`` names the feature axes of the whole-sequence layout.

    Conventions: those of :class:`BatchNorm`, per step. The paper also
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

    max_steps: int = dataclasses.field(kw_only=True)
    time_axis: int = dataclasses.field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        m, t = self.max_steps, self.time_axis
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
            raise TypeError(f"max_steps must be a positive int, got {m!r}.")
        if m <= 0:
            raise ValueError(f"max_steps must be a positive int, got {m!r}.")
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"time_axis must be an int, got {t!r}.")
        object.__setattr__(self, "max_steps", int(m))
        object.__setattr__(self, "time_axis", int(t))

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``; state arrays have shape ``[max_steps, *features]``.

        Args:
          features: the number of features, a tuple of sizes (one per feature
            axis) or an example whole-sequence input.
          key: PRNG key for random initializers (the defaults need none).
        """
        if hasattr(features, "shape") and hasattr(features, "ndim"):
            self._layout(features.ndim, step_mode=False)  # checks time_axis vs axis
        return super().init(features, key=key)

    def _init_state(self, shape: tuple[int, ...]) -> State:
        one = super()._init_state(shape)
        return {k: jnp.repeat(v[None], self.max_steps, 0) for k, v in one.items()}

    def _layout(self, ndim: int, *, step_mode: bool) -> tuple[int, tuple[int, ...]]:
        """(time axis, feature axes) of the full sequence layout of rank ``ndim``."""
        full = ndim + 1 if step_mode else ndim
        if not -full <= self.time_axis < full:
            what = (
                f"x of rank {ndim} is one time step (step was given), so the sequence has rank "
                f"{full}"
                if step_mode
                else f"x has rank {ndim}; a single time step needs the step= argument"
            )
            raise ValueError(
                f"{self._name}: time_axis={self.time_axis} is out of range: {what}; valid "
                f"values are {-full}..{full - 1}."
            )
        time = self.time_axis % full
        feature_axes = checks.resolve_axes(self.axis, full)
        if time in feature_axes:
            raise ValueError(
                f"{self._name}: time_axis={self.time_axis} is also a feature axis "
                f"(axis={self.axis!r}); the features and the time must be different axes."
            )
        return time, feature_axes

    def apply(
        self,
        params: Params,
        state: State,
        x: jax.Array,
        *,
        training: bool,
        mask: jax.Array | None = None,
        step: int | jax.Array | None = None,
    ) -> tuple[jax.Array, State]:
        """Normalizes a whole sequence, or one step of it; returns ``(y, new_state)``.

        Args:
          params: ``{"scale", "bias"}`` from :meth:`init`.
          state: ``{"mean", "var"}`` (and ``"count"``) of shape
            ``[max_steps, *features]``.
          x: a whole sequence (time along ``time_axis``) when ``step`` is None,
            otherwise one time step (the sequence layout without its time axis).
          training: batch statistics and updated state (True) or running
            statistics and the same state (False).
          mask: boolean array broadcastable to ``x``; only True elements enter
            the statistics (e.g. ``[batch, time, 1]`` for padded sequences).
          step: the time index of a single-step ``x``: a non-negative int or an
            integer scalar array (may be traced, e.g. inside ``lax.scan``).

        Raises:
          ValueError: as :meth:`BatchNorm.apply`, a ``time_axis`` out of range
            for ``x``, a time axis that is also a feature axis, or state of the
            wrong shape.
          TypeError: as :meth:`BatchNorm.apply`, or a non-integer ``step``.
        """
        training = check_training(training, self._name)
        checks.check_input(x)
        x = jnp.asarray(x)
        step_mode = step is not None
        time, full_axes = self._layout(x.ndim, step_mode=step_mode)
        if step_mode:
            feature_axes = tuple(a - (a > time) for a in full_axes)
        else:
            feature_axes = full_axes
        c = self._prepare(params, state, x, feature_axes=feature_axes, check_state=False)
        x, feature_axes, shape, scale, bias, out_dtype = c
        self._check_running_state(state)
        for name in ("mean", "var"):
            if tuple(state[name].shape) != (self.max_steps, *shape):
                raise ValueError(
                    f"{self._name}: state[{name!r}] has shape {tuple(state[name].shape)} but "
                    f"max_steps={self.max_steps} and the feature shape {shape} need "
                    f"{(self.max_steps, *shape)}; build the state with {self._name}.init."
                )
        if step_mode:
            return self._apply_step(state, c, mask, step, training)

        steps = x.shape[time]
        if not training:
            slots = np.minimum(np.arange(steps), self.max_steps - 1)
            mean = _place(state["mean"][slots], x.ndim, (time, *feature_axes))
            var = _place(state["var"][slots], x.ndim, (time, *feature_axes))
            inv = lax.rsqrt(var + jnp.asarray(self.epsilon, var.dtype))
            return affine(x, mean, inv, scale, bias, out_dtype), state

        reduce_axes = tuple(i for i in range(x.ndim) if i != time and i not in feature_axes)
        mask = self._batch_mask(x.shape, reduce_axes, mask)
        y, mean, var, count = batch_normalize(
            x, scale, bias, mask, self._stats_config(reduce_axes, out_dtype)
        )
        k = min(steps, self.max_steps)
        order = (time, *feature_axes)
        mean, var, count = (_take(v, order)[:k] for v in (mean, var, count))
        old = {name: v[:k] for name, v in state.items()}
        new = update_running(
            old, mean, var, count, momentum=self.momentum, unbiased=self.unbiased_running_var
        )
        return y, {name: state[name].at[:k].set(new[name]) for name in state}

    def _apply_step(
        self, state: State, c: Call, mask: Any, step: Any, training: bool
    ) -> tuple[jax.Array, State]:
        step = _check_step(step, self._name)
        slot = jnp.clip(step, 0, self.max_steps - 1)
        old = {n: lax.dynamic_index_in_dim(v, slot, 0, keepdims=False) for n, v in state.items()}
        if not training:
            mean, var = old["mean"], old["var"]
            y = normalize_with(
                c.x, mean, var, c.scale, c.bias, c.feature_axes, self.epsilon, c.out_dtype
            )
            return y, state
        reduce_axes = tuple(i for i in range(c.x.ndim) if i not in c.feature_axes)
        y, new = self._train(old, c, mask, reduce_axes)
        in_range = (step >= 0) & (step < self.max_steps)
        return y, {
            name: lax.dynamic_update_index_in_dim(
                v, jnp.where(in_range, new[name], old[name]), slot, 0
            )
            for name, v in state.items()
        }


def _check_step(step: Any, layer: str) -> jax.Array:
    if isinstance(step, bool):
        raise TypeError(f"{layer}: step must be an int or an integer scalar, got {step!r}.")
    if isinstance(step, (int, np.integer)):
        if step < 0:
            raise ValueError(f"{layer}: step must be >= 0, got {step}.")
        return jnp.asarray(step, jnp.int32)
    step = jnp.asarray(step)
    if step.shape != () or not jnp.issubdtype(step.dtype, jnp.integer):
        raise TypeError(
            f"{layer}: step must be an int or an integer scalar array, got an array of shape "
            f"{tuple(step.shape)} and dtype {step.dtype}."
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
