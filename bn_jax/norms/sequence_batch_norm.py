"""Sequence (recurrent) Batch Normalization (Cooijmans et al., 2016)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bn_jax._core import checks
from bn_jax._core.normalize import StatsConfig, normalizing_function
from bn_jax._core.running import update_running
from bn_jax.norms import _common
from bn_jax.norms._common import Mask, Params, Signature, State


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceBatchNorm(_common.BatchFields):
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

    max_steps: int
    time_axis: int = 1

    def __post_init__(self) -> None:
        _common.check_batch_fields(self)
        _common.freeze(
            self,
            max_steps=_common.check_int("max_steps", self.max_steps, positive=True),
            time_axis=_common.check_int("time_axis", self.time_axis),
        )

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``; state arrays have shape ``[max_steps, *features]``.

        ``features`` may be an example whole-sequence input (see
        :meth:`Normalizer.init`).
        """
        if hasattr(features, "shape") and hasattr(features, "ndim"):
            _axes(self, features.ndim, step_mode=False)  # checks time_axis vs axis
        params, one = _common.init_batch(self, features, key)
        return params, {k: jnp.repeat(v[None], self.max_steps, 0) for k, v in one.items()}

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
        x, mask, sig = _common.check_call(
            self, params, state, x, mask, training, sync_in_eval=False
        )
        lay = _layout(self, sig, step is not None)
        scale, bias = (
            params[n].reshape(lay.pshape) if n in lay.used else None for n in ("scale", "bias")
        )
        if step is not None:
            return _apply_step(self, lay, state, x, scale, bias, mask, step, training)
        steps = x.shape[lay.time]
        if not training:
            slots = np.minimum(np.arange(steps), self.max_steps - 1)
            mean, var = (_place(state[n][slots], x.ndim, lay.time_axes) for n in ("mean", "var"))
            return _common.normalize_with(
                x, mean, var, scale, bias, self.epsilon, lay.cfg.out_dtype
            ), state
        y, *stats = lay.normalize(x, scale, bias, mask, lay.cfg)
        k = min(steps, self.max_steps)  # steps past max_steps leave the state alone
        stats = [_take(v, lay.time_axes)[:k] for v in stats]
        new = update_running(
            {n: v[:k] for n, v in state.items()},
            *stats,
            momentum=self.momentum,
            unbiased=self.unbiased_running_var,
        )
        return y, {name: jnp.asarray(state[name]).at[:k].set(new[name]) for name in state}


class _Layout(NamedTuple):
    time: int  # the time axis of the whole sequence
    time_axes: tuple[int, ...]  # (time, *feature axes) of the whole sequence
    pshape: tuple[int, ...]  # the features broadcastable against x
    used: tuple[str, ...]  # the parameters in use
    cfg: StatsConfig
    normalize: Callable[..., tuple[jax.Array, ...]]  # batch_normalize, or its plain form


@functools.lru_cache(maxsize=256)
def _layout(norm: SequenceBatchNorm, sig: Signature, step_mode: bool) -> _Layout:
    layer = "SequenceBatchNorm"
    time, feature_axes = _axes(norm, sig.ndim, step_mode=step_mode)
    if step_mode:  # the feature axes of the step, without the time axis
        feature_axes = tuple(a - (a > time) for a in feature_axes)
    _common.check_real(layer, sig)
    used = tuple(n for n, use in (("scale", norm.use_scale), ("bias", norm.use_bias)) if use)
    features = _common.check_features(
        layer, sig, feature_axes, used, axis_arg="axis", axis=norm.axis
    )
    _common.check_state_keys(
        layer, sig.state, _common.running_keys(norm.momentum, norm.count_skipped)
    )
    state = dict(sig.state or ())  # check_state_keys has raised if it is not a dict
    for name in ("mean", "var"):
        if state[name] != (norm.max_steps, *features):
            raise ValueError(
                f"{layer}: state[{name!r}] has shape {state[name]} but max_steps="
                f"{norm.max_steps} and the feature shape {features} need "
                f"{(norm.max_steps, *features)}; build the state with {layer}.init."
            )
    time_axes = (time, *feature_axes)
    reduce_axes = _common.other_axes(sig.ndim, feature_axes if step_mode else time_axes)
    _common.check_batch_values(norm, layer, sig, reduce_axes)
    cfg = _common.stats_config(norm, reduce_axes, sig)
    pshape = tuple(sig.shape[a] if a in feature_axes else 1 for a in range(sig.ndim))
    return _Layout(time, time_axes, pshape, used, cfg, normalizing_function(cfg))


def _axes(norm: SequenceBatchNorm, ndim: int, *, step_mode: bool) -> tuple[int, tuple[int, ...]]:
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
    lay: _Layout,
    state: State,
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: Mask,
    step: Any,
    training: bool,
) -> tuple[jax.Array, State]:
    """One time step: BatchNorm with the running statistics of slot ``step``."""
    step = _check_step(step)
    slot = jnp.clip(step, 0, norm.max_steps - 1)
    old = {n: lax.dynamic_index_in_dim(v, slot, 0, keepdims=False) for n, v in state.items()}
    if not training:
        mean, var = (old[n].reshape(lay.pshape) for n in ("mean", "var"))
        return _common.normalize_with(
            x, mean, var, scale, bias, norm.epsilon, lay.cfg.out_dtype
        ), state
    y, *stats = lay.normalize(x, scale, bias, mask, lay.cfg)
    new = update_running(old, *stats, momentum=norm.momentum, unbiased=norm.unbiased_running_var)
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


sequence_batch_norm.__doc__ = _common.functional_doc(
    "SequenceBatchNorm",
    "Recurrent Batch Normalization: separate statistics for every time step",
    "y, state = bn_jax.sequence_batch_norm(params, state, x, training=True, max_steps=50)",
    extra_args=(
        "      step: the time index of a single-step ``x`` (see\n"
        "        :meth:`SequenceBatchNorm.apply`); None for a whole sequence.\n"
    ),
)
