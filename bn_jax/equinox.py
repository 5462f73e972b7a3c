"""Equinox layers over the bn_jax core.

Swap one import and keep the rest of an Equinox model::

    import equinox as eqx
    import bn_jax.equinox as bnx

    model, state = eqx.nn.make_with_state(bnx.BatchNorm)(64, "batch", mode="batch")
    y, state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

:class:`BatchNorm`, :class:`LayerNorm`, :class:`GroupNorm` and
:class:`RMSNorm` subclass the ``equinox.nn`` layer of the same name: its
constructor arguments (same order, same defaults), its fields (same names,
order and static-ness), its call signature, its state layout
(``StateIndex`` objects, ``eqx.nn.State``, modes ``"ema"`` and ``"batch"``),
``inference`` / ``eqx.nn.inference_mode`` and ``Sequential`` behaviour, so
that a model and its serialised leaves keep working and ``isinstance`` checks
against Equinox's classes still pass. bn_jax's options come after Equinox's
arguments, keyword-only, as static fields. :class:`BatchRenorm`,
:class:`GhostBatchNorm` and :class:`SequenceBatchNorm` are Equinox stateful
layers in the same style.
:func:`convert` swaps the norm layers of an existing model;
:func:`recalibrate` recomputes the BatchNorm statistics of a model's state.
The deliberate differences from Equinox are listed on the documentation's
Equinox page.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Literal, TypeVar, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax

import bn_jax
from bn_jax import _layers, _recalibrate
from bn_jax._core import checks
from bn_jax._core.running import update_running
from bn_jax._core.stats import Moments, moments, normalizing_var, vmapped
from bn_jax._model_tools import calls_of
from bn_jax.norms import _common

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "SequenceBatchNorm",
    "convert",
    "recalibrate",
]

State = eqx.nn.State
StateIndex = eqx.nn.StateIndex
_NO_STATE: Any = object()  # "no state passed": the per-example layers then return only y
_Value = TypeVar("_Value")


# ----------------------------------------------------------------- shared pieces


def _names(axis_name: Any) -> Any:
    """Equinox's ``axis_name`` (a name, or a sequence of names) as a hashable value."""
    if isinstance(axis_name, (list, tuple)):
        return tuple(axis_name)
    return axis_name


def _check_bound(axis_name: Any, layer: str) -> None:
    """Raises ``NameError`` (Equinox's type) when ``axis_name`` is not bound."""
    if axis_name is None:
        return
    try:
        lax.axis_size(axis_name)
    except NameError:
        raise NameError(
            f"{layer}: axis_name={axis_name!r} is not bound. Call the layer on one example "
            f"under jax.vmap(..., axis_name={axis_name!r}) (or jax.pmap / jax.shard_map with "
            f"that name), e.g. jax.vmap(model, axis_name={axis_name!r}, in_axes=(0, None), "
            f"out_axes=(0, None))(x, state); inference never needs it."
        ) from None


def _check_example(layer: Any, x: Any, step: Any = None, batch: Any = None) -> None:
    """Checks one example ``x`` against the layer's constructor before the core sees it
    (the core's messages speak of its own arguments and of a batch-first layout, not of
    what an Equinox user wrote); with ``batch``, the core normalizer of a training call
    over the examples of ``axis_name``, also the number of values per statistic."""
    name, shape = type(layer).__name__, tuple(jnp.shape(x))
    if name == "SequenceBatchNorm":
        arg, size, axis, what = "input_size", layer.input_size, -1, "features along its last axis"
        layout = "(input_size,) with step=" if step is not None else "(time, input_size)"
        rank, order = (1 if step is not None else 2), "features last"
        hint = "" if step is not None else " (or (input_size,) with step=)"
    else:
        arg = "channels" if name in ("GroupNorm", "InstanceNorm") else "input_size"
        size, axis, what = getattr(layer, arg), 0, "channels along axis 0"
        layout, rank, order, hint = f"({arg}, *spatial)", 1, "channels first", ""
    if len(shape) < rank:
        raise ValueError(
            f"{name} takes one example of shape {layout}{hint}, got x.shape={shape}; Equinox "
            f"layers take one example: map the layer over the batch with jax.vmap."
        )
    n = shape[axis]
    if size is not None and n != size:
        raise ValueError(
            f"{name}: {arg}={size} but the example has {n} {what} (x.shape={shape}); "
            f"Equinox layers take one example, {order}, of shape {layout}: map the layer "
            f"over the batch with jax.vmap, or build it with {arg}={n}."
        )
    if name == "GroupNorm" and n % layer.groups:
        raise ValueError(
            f"GroupNorm: groups={layer.groups} does not divide the {n} channels along axis 0 "
            f"of the example (x.shape={shape}); pick groups among the divisors of {n}."
        )
    if batch is None or layer.allow_single_value:
        return
    examples = checks.bound_axis_size(batch.axis_name, batch.axis_index_groups, name)
    if name == "SequenceBatchNorm":  # statistics per time step
        values, per = math.prod(shape[1:-1] if step is None else shape[:-1]), " per time step"
    else:
        values, per = math.prod(shape[1:]), ""
    over = f" along axis_name={layer.axis_name!r}" if layer.axis_name is not None else ""
    _check_values(
        layer,
        values * examples,
        f"training on {examples} example{'s' if examples != 1 else ''} of shape {shape}{over}"
        f"{' (statistics' + per + ')' if per else ''}",
        "map the layer over 2 or more examples, or call it with inference=True "
        "(eqx.nn.inference_mode)",
    )


def _check_values(layer: Any, values: int, what: str, fix: str) -> None:
    """Raises when each statistic would see a single value and the layer does not
    ``allow_single_value`` (the core's check, in the layer's terms)."""
    if values > 1 or layer.allow_single_value:
        return
    raise ValueError(
        f"{type(layer).__name__}: {what}, so each statistic sees a single value and its "
        f"variance is meaningless; {fix}, or build the layer with allow_single_value=True "
        f"(variance 0: the output is the bias, as Equinox computes it)."
    )


def _float_dtype(dtype: Any) -> Any:
    """Equinox's default parameter dtype: float32, or float64 under ``jax_enable_x64``."""
    if dtype is not None:
        return jnp.dtype(dtype)
    # jax's Config holds its options as dynamic attributes, which type checkers do not see.
    x64 = jax.config.jax_enable_x64  # type: ignore[attr-defined]
    return jnp.dtype(jnp.float64 if x64 else jnp.float32)


def _params(weight: jax.Array | None, bias: jax.Array | None) -> dict[str, jax.Array]:
    """bn_jax's ``params`` from Equinox's ``weight`` and ``bias`` (absent when None)."""
    params = {}
    if weight is not None:
        params["scale"] = weight
    if bias is not None:
        params["bias"] = bias
    return params


def _index(layer: BatchNorm, index: StateIndex[_Value] | None, name: str) -> StateIndex[_Value]:
    """``index``, one of the state indices that the constructor sets for the layer's mode and
    ``momentum`` only (so Equinox types each as optional); ``name`` is its field."""
    if index is None:
        raise ValueError(
            f"BatchNorm: mode={layer.mode!r} with momentum={layer.momentum!r} keeps state in "
            f"{name}, but the layer's {name} is None; build the layer with its constructor."
        )
    return index


def _set(state: State, index: StateIndex, value: Any) -> State:
    """``state.set`` with ``value`` (a pytree) cast to the stored dtypes (``State.set``
    accepts only the stored shapes and dtypes)."""
    old = state.get(index)
    return state.set(index, jax.tree.map(lambda new, o: new.astype(o.dtype), value, old))


# ------------------------------------------------------------------------ BatchNorm


class BatchNorm(eqx.nn.BatchNorm):
    r"""Batch Normalization: drop-in for ``equinox.nn.BatchNorm``, computed by bn_jax.

    Called on one example ``x`` of shape ``(input_size, *spatial)`` under
    ``jax.vmap`` (or ``pmap`` / ``shard_map``) with ``axis_name``, it
    normalizes each channel with the statistics of the whole batch (every
    example of the mapped axes, and the spatial positions)::

        mu, var = mean(x), mean((x - mu)**2)      # per channel, over the batch
        y = (x - mu) / sqrt(var + eps) * weight + bias

    Equinox's constructor, fields, call signature and state layout:

    * ``mode="batch"``: training normalizes with the batch statistics and
      keeps Equinox's hidden moving averages (``hidden = momentum * hidden +
      (1 - momentum) * batch``, mean starting at 0 and variance at 1) and a
      step counter; inference uses their zero-debiased values,
      ``mean = hidden_mean / (1 - momentum**t)`` and
      ``var = (hidden_var - momentum**t) / (1 - momentum**t)`` (mean 0 and
      var 1 before any step), which are the moving averages of the batch
      statistics from the first step on.
    * ``mode="ema"`` (Equinox's default, with its warning): running
      statistics that the first training step sets to the batch's; training
      normalizes with the running statistics after this step's update (as
      Equinox does); inference with the running statistics, which start at
      mean 0 and variance 1.

    Differences from Equinox, each a fix (see the Equinox page of the
    documentation, with measured errors): statistics in float32 (or wider)
    for low-precision input, and the output in the input dtype; the
    ``"batch"`` debiasing above (Equinox divides a variance that starts at 1
    as if it started at 0: with ``momentum=0.99`` its inference variance
    is the data's plus 99 after one step); finite inference before any
    training step in
    ``"ema"`` mode; a batch whose statistics are not finite leaves the
    running statistics unchanged; the stable variance; one collective per
    layer (Equinox: two ``pmean``); ``mask=`` at the call; ``momentum`` and
    ``eps`` are checked (``[0, 1]`` or None, positive).

    Args:
      **Equinox's arguments**: ``input_size``, ``axis_name``, ``eps``,
        ``channelwise_affine``, ``momentum``, ``inference``, ``dtype``,
        ``mode``, in Equinox's order and meaning. ``axis_name`` may also
        be a tuple of names (nested vmaps) or None (no cross-example
        statistics). ``momentum=None`` (``mode="batch"`` only) keeps the
        exact cumulative average of the batch statistics, with a per-channel
        count in the state.
      use_fast_variance: ``E[x^2] - E[x]^2`` instead of the stable formula.
      unbiased_running_var: running variance of ``n / (n - 1)`` times the
        batch variance (PyTorch's convention).
      allow_single_value: train on one value per channel (variance 0), as
        Equinox does; False raises instead.
      count_skipped: add a per-channel count of the steps whose statistics
        were not finite to the state.
      axis_index_groups: synchronize within these groups of devices only
        (``pmap`` / ``shard_map``).

    Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating
    Deep Network Training by Reducing Internal Covariate Shift", ICML 2015.
    """

    # Equinox's field, widened: None keeps a cumulative average (mode="batch").
    momentum: float | None = eqx.field(static=True)  # type: ignore[assignment]
    use_fast_variance: bool = eqx.field(static=True, default=False)
    unbiased_running_var: bool = eqx.field(static=True, default=False)
    allow_single_value: bool = eqx.field(static=True, default=True)
    count_skipped: bool = eqx.field(static=True, default=False)
    axis_index_groups: tuple[tuple[int, ...], ...] | None = eqx.field(static=True, default=None)
    count_index: StateIndex[jax.Array] | None = None
    skipped_index: StateIndex[jax.Array] | None = None

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: Literal["ema", "batch", "legacy"] = "legacy",
        *,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        allow_single_value: bool = True,
        count_skipped: bool = False,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        checks.check_epsilon(eps, "eps")
        super().__init__(
            input_size,
            axis_name,
            eps,
            channelwise_affine,
            momentum,  # type: ignore[arg-type]  # Equinox stores it as given; None is ours
            inference,
            dtype,
            mode,
        )
        dt = _float_dtype(dtype)
        if self.mode == "ema":
            if momentum is None:
                raise ValueError(
                    "BatchNorm: momentum=None (the exact cumulative average) needs "
                    "mode='batch'; mode='ema' normalizes with its moving averages in training."
                )
            # Equinox starts from jnp.empty; mean 0 / var 1 makes inference before
            # any training step finite (the layout is unchanged).
            self.ema_state_index = StateIndex((jnp.zeros(input_size, dt), jnp.ones(input_size, dt)))
        counts = jnp.zeros((input_size,), jnp.int32)
        self.count_index = StateIndex(counts) if momentum is None else None
        self.skipped_index = StateIndex(counts) if count_skipped else None
        self.use_fast_variance = use_fast_variance
        self.unbiased_running_var = unbiased_running_var
        self.allow_single_value = allow_single_value
        self.count_skipped = count_skipped
        self.axis_index_groups = checks.canonical_groups(axis_index_groups, axis_name)
        _core_batch_norm(self)  # every option checked now, not at the first call

    def __call__(
        self,
        x: jax.Array,
        state: State,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, State]:
        """Normalizes one example ``x`` of shape ``(input_size, *spatial)``.

        Args:
          x: one example, channels first.
          state: the ``eqx.nn.State`` holding this layer's statistics.
          key: ignored (Equinox's layer interface).
          inference: overrides the ``inference`` field when not None.
          mask: boolean, broadcastable to ``x``: only True elements enter the
            statistics (pooled by count over the whole batch).

        Returns:
          ``(y, new_state)``; ``y`` has ``x``'s shape and dtype.

        Raises:
          NameError: training with an ``axis_name`` that no ``vmap`` / ``pmap``
            / ``shard_map`` binds (as Equinox).
        """
        del key
        training = not (self.inference if inference is None else inference)
        return _batch_norm_call(self, x, state, training, mask)


def _core_batch_norm(layer: BatchNorm) -> bn_jax.BatchNorm:
    """The core BatchNorm a drop-in BatchNorm computes with (channel axis 0)."""
    return _layers.normalizer(
        bn_jax.BatchNorm,
        layer,
        {
            "epsilon": layer.eps,
            "axis": 0,
            "axis_name": _names(layer.axis_name),
            "use_scale": layer.channelwise_affine,
            "use_bias": layer.channelwise_affine,
            "param_dtype": layer.weight.dtype if layer.weight is not None else jnp.float32,
        },
    )


def _batch_norm_call(
    layer: BatchNorm, x: Any, state: State, training: bool, mask: Any
) -> tuple[jax.Array, State]:
    norm = _core_batch_norm(layer)
    params = _params(layer.weight, layer.bias)
    if training:
        _check_bound(norm.axis_name, "BatchNorm")
    _check_example(layer, x, batch=norm if training else None)
    extra = {}
    if layer.count_index is not None:
        extra["count"] = state.get(layer.count_index)
    if layer.skipped_index is not None:
        extra["skipped"] = state.get(layer.skipped_index)
    if layer.mode == "ema":
        return _ema_call(layer, norm, params, x, state, extra, training, mask)
    counter_index = _index(layer, layer.batch_counter, "batch_counter")
    hidden_index = _index(layer, layer.batch_state_index, "batch_state_index")
    counter = state.get(counter_index)
    hidden = state.get(hidden_index)
    mean, var = _debiased(hidden, counter, layer.momentum)
    core_state = {"mean": mean, "var": var, **extra}
    if not training:
        y, _ = norm.apply(params, core_state, x, training=False)
        return y, state
    y, new = norm.apply(params, core_state, x, training=True, mask=mask)
    state = state.set(counter_index, counter + 1)
    new_hidden = _hidden((new["mean"], new["var"]), (mean, var), counter, layer.momentum)
    state = _set(state, hidden_index, new_hidden)
    return y, _set_extra(layer, state, new)


def _set_extra(layer: Any, state: State, new: dict[str, jax.Array]) -> State:
    if layer.count_index is not None:
        state = _set(state, layer.count_index, new["count"])
    if layer.skipped_index is not None:
        state = _set(state, layer.skipped_index, new["skipped"])
    return state


def _debiased(hidden: tuple[jax.Array, jax.Array], counter: jax.Array, momentum: float | None):
    """The mean and variance that Equinox's hidden ``"batch"`` averages stand for.

    After ``t`` updates from the start (0, 1), ``hidden = m**t * start + (1 - m**t)
    * estimate``, where ``estimate`` is the zero-debiased moving average of the
    batch statistics; so ``estimate = (hidden - m**t * start) / (1 - m**t)``, and
    (0, 1) before any update. With ``momentum=None`` the hidden values are the
    cumulative averages themselves.
    """
    dt = checks.stat_dtype(hidden[0].dtype)
    mean, var = (h.astype(dt) for h in hidden)
    if momentum is None:
        return mean, var
    decay = jnp.asarray(momentum, dt) ** counter.astype(dt)
    weight = 1 - decay
    seen = weight > 0
    safe = jnp.where(seen, weight, 1)
    return jnp.where(seen, mean / safe, 0), jnp.where(seen, (var - decay) / safe, 1)


def _hidden(updated, estimate, counter: jax.Array, momentum: float | None):
    """Equinox's hidden averages after this step, from the core's update of the estimate.

    The core updates ``estimate`` to ``u = m * estimate + (1 - m) * batch`` (or
    keeps it for a channel whose statistics are not finite). The hidden
    averages that give the debiased estimate after ``t + 1`` steps are
    ``u + m**(t + 1) * (start - estimate)``: exactly Equinox's
    ``m * hidden + (1 - m) * batch`` for a finite batch, and an unchanged
    estimate for a skipped one.
    """
    if momentum is None:
        return updated
    dt = updated[0].dtype
    decay = jnp.asarray(momentum, dt) ** (counter + 1).astype(dt)
    (u_mean, u_var), (mean, var) = updated, estimate
    return u_mean - decay * mean, u_var + decay * (1 - var)


def _ema_call(
    layer: BatchNorm,
    norm: bn_jax.BatchNorm,
    params: dict[str, jax.Array],
    x: Any,
    state: State,
    extra: dict[str, jax.Array],
    training: bool,
    mask: Any,
) -> tuple[jax.Array, State]:
    """Equinox's ``"ema"`` mode: training normalizes with the running statistics
    after this step's update (the first step's are the batch's)."""
    first_index = _index(layer, layer.ema_first_time_index, "ema_first_time_index")
    running_index = _index(layer, layer.ema_state_index, "ema_state_index")
    stored = state.get(running_index)
    running = dict(zip(("mean", "var"), stored, strict=True))
    running = {k: v.astype(checks.stat_dtype(v.dtype)) for k, v in running.items()}
    stats = {**running, **extra}
    if not training:
        y, _ = norm.apply(params, stats, x, training=False)
        return y, state
    x, mask, sig = _common.check_call(norm, params, stats, x, mask, True)
    lay = _common.batch_layout(norm, "BatchNorm", sig)  # the checks of a training call
    m = lay.cfg.moments(x, mask)
    shape = lay.features
    b_mean, b_var = m.mean.reshape(shape), normalizing_var(m, mask).reshape(shape)
    first = state.get(first_index)
    count = m.count.reshape(shape)
    moving = update_running(
        stats, b_mean, b_var, count, momentum=layer.momentum, unbiased=layer.unbiased_running_var
    )
    copied = update_running(
        stats, b_mean, b_var, count, momentum=0.0, unbiased=layer.unbiased_running_var
    )
    new = jax.tree.map(lambda c, mv: jnp.where(first, c, mv), copied, moving)
    ok = jnp.isfinite(b_mean) & jnp.isfinite(b_var) & (count > 0)
    # The first step normalizes with the batch's statistics (as does a channel whose
    # statistics are not finite: the output shows it); later steps with the running
    # statistics they store (`new`, whose values update_running keeps out of the
    # gradient), the gradient flowing through this batch's share of them as in
    # Equinox: 1 - momentum, times n / (n - 1) for an unbiased running variance.
    weight = 1 - jnp.asarray(layer.momentum, b_mean.dtype)
    k = count.astype(b_var.dtype)
    n_ratio = k / jnp.maximum(k - 1, 1) if layer.unbiased_running_var else 1

    def share(v: jax.Array, factor: Any) -> jax.Array:
        return jnp.where(ok, weight * factor * (v - lax.stop_gradient(v)), 0)

    batch = first | ~(jnp.isfinite(b_mean) & jnp.isfinite(b_var))
    used_mean = jnp.where(batch, b_mean, new["mean"] + share(b_mean, 1))
    used_var = jnp.where(batch, b_var, new["var"] + share(b_var, n_ratio))
    scale, bias = (
        params[n].reshape(lay.pshape) if n in lay.used else None for n in ("scale", "bias")
    )
    y = _common.normalize_with(
        x,
        used_mean.reshape(lay.pshape),
        used_var.reshape(lay.pshape),
        scale,
        bias,
        norm.epsilon,
        lay.cfg.out_dtype,
    )
    state = state.set(first_index, first & ~jnp.all(ok))
    state = _set(state, running_index, (new["mean"], new["var"]))
    return y, _set_extra(layer, state, new)


# ------------------------------------------------------- per-example normalizers


class LayerNorm(eqx.nn.LayerNorm):
    r"""Layer Normalization: drop-in for ``equinox.nn.LayerNorm``, computed by
    :class:`bn_jax.LayerNorm`.

    Over the whole input ``x`` (of shape ``shape``)::

        y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias

    Equinox's constructor, fields and call: the statistics are reduced in
    float32 (or wider) and the output has ``x``'s dtype, as in Equinox.
    Differences: the stable variance and the ``mask=`` argument; ``eps``
    must be positive.

    Args:
      **Equinox's arguments**: ``shape``, ``eps``, ``use_weight``,
        ``use_bias``, ``dtype``, ``elementwise_affine``.
      use_fast_variance: ``E[x^2] - E[x]^2`` instead of the stable formula.
      memory_efficient: compute the backward pass from the output (see
        :class:`bn_jax.LayerNorm`).

    Reference: J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer
    Normalization", arXiv 2016.
    """

    use_fast_variance: bool = eqx.field(static=True, default=False)
    memory_efficient: bool = eqx.field(static=True, default=False)

    def __init__(
        self,
        shape: int | Sequence[int],
        eps: float = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype: Any = None,
        *,
        elementwise_affine: bool | None = None,
        use_fast_variance: bool = False,
        memory_efficient: bool = False,
    ) -> None:
        checks.check_epsilon(eps, "eps")
        super().__init__(
            shape, eps, use_weight, use_bias, dtype, elementwise_affine=elementwise_affine
        )
        self.use_fast_variance = use_fast_variance
        self.memory_efficient = memory_efficient
        _core_layer_norm(self)

    @overload
    def __call__(
        self, x: jax.Array, *, key: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array: ...

    @overload
    def __call__(
        self,
        x: jax.Array,
        state: State,
        *,
        key: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, State]: ...

    def __call__(
        self,
        x: jax.Array,
        state: State = _NO_STATE,
        *,
        key: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, State]:
        """Normalizes ``x`` (of shape ``shape``); returns ``y``, or ``(y, state)`` when
        a state is passed (unchanged, for Equinox's stateful interface).

        Raises:
          ValueError: ``x.shape`` is not ``shape`` (as Equinox).
        """
        del key
        _check_shape(self.shape, x, "LayerNorm", "layer_norm")
        norm = _core_layer_norm(self)
        y, _ = norm.apply(_params(self.weight, self.bias), {}, x, training=True, mask=mask)
        return y if state is _NO_STATE else (y, state)


def _check_shape(shape: tuple[int, ...], x: Any, layer: str, name: str) -> None:
    if tuple(jnp.shape(x)) != tuple(shape):
        raise ValueError(
            f"{layer}(shape)(x) needs x.shape == shape, got shape={tuple(shape)} and "
            f"x.shape={tuple(jnp.shape(x))}. For a batch, map the layer over it: "
            f"jax.vmap({name})(x)."
        )


def _core_layer_norm(layer: LayerNorm) -> bn_jax.LayerNorm:
    axes = tuple(range(len(layer.shape)))
    return _layers.normalizer(
        bn_jax.LayerNorm,
        layer,
        {
            "epsilon": layer.eps,
            "use_scale": layer.use_weight,
            "use_bias": layer.use_bias,
            "reduction_axes": axes,
            "feature_axes": axes,
            "param_dtype": _param_dtype(layer.weight, layer.bias),
        },
    )


def _param_dtype(*arrays: jax.Array | None) -> Any:
    for a in arrays:
        if a is not None:
            return a.dtype
    return jnp.float32


class RMSNorm(eqx.nn.RMSNorm):
    r"""Root-mean-square normalization: drop-in for ``equinox.nn.RMSNorm``, computed by
    :class:`bn_jax.RMSNorm`.

    Over the whole input ``x`` (of shape ``shape``)::

        y = x / sqrt(mean(x**2) + eps) * weight + bias

    Equinox's constructor (with its ``bias``, which ``bn_jax.RMSNorm`` does not
    have), fields and call; statistics in float32 (or wider), output in
    ``x``'s dtype, as in Equinox. Differences: ``mask=``; ``eps`` must be
    positive.

    Args:
      **Equinox's arguments**: ``shape``, ``eps``, ``use_weight``,
        ``use_bias``, ``dtype``.
      memory_efficient: compute the backward pass from the output (see
        :class:`bn_jax.RMSNorm`).

    Reference: B. Zhang and R. Sennrich, "Root Mean Square Layer
    Normalization", NeurIPS 2019.
    """

    memory_efficient: bool = eqx.field(static=True, default=False)

    def __init__(
        self,
        shape: int | Sequence[int],
        eps: float = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype: Any = None,
        *,
        memory_efficient: bool = False,
    ) -> None:
        checks.check_epsilon(eps, "eps")
        super().__init__(shape, eps, use_weight, use_bias, dtype)
        self.memory_efficient = memory_efficient
        _core_rms_norm(self, jnp.dtype(jnp.float32))

    @overload
    def __call__(
        self, x: jax.Array, *, key: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array: ...

    @overload
    def __call__(
        self,
        x: jax.Array,
        state: State,
        *,
        key: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, State]: ...

    def __call__(
        self,
        x: jax.Array,
        state: State = _NO_STATE,
        *,
        key: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, State]:
        """Rescales ``x`` (of shape ``shape``); returns ``y``, or ``(y, state)`` when a
        state is passed (unchanged).

        Raises:
          ValueError: ``x.shape`` is not ``shape`` (as Equinox).
        """
        del key
        _check_shape(self.shape, x, "RMSNorm", "rms_norm")
        x = jnp.asarray(x)
        if self.bias is None:
            norm = _core_rms_norm(self, None)
            y, _ = norm.apply(_params(self.weight, None), {}, x, training=True, mask=mask)
        else:  # the bias is added in the statistics dtype, then rounded once
            dt = checks.stat_dtype(x.dtype)
            norm = _core_rms_norm(self, dt)
            y, _ = norm.apply(_params(self.weight, None), {}, x, training=True, mask=mask)
            y = (y + self.bias.astype(dt)).astype(x.dtype)
        return y if state is _NO_STATE else (y, state)


def _core_rms_norm(layer: RMSNorm, out: Any) -> bn_jax.RMSNorm:
    axes = tuple(range(len(layer.shape)))
    return _layers.normalizer(
        bn_jax.RMSNorm,
        layer,
        {
            "epsilon": layer.eps,
            "use_scale": layer.use_weight,
            "reduction_axes": axes,
            "feature_axes": axes,
            "dtype": out,
            "param_dtype": _param_dtype(layer.weight, layer.bias),
        },
    )


class GroupNorm(eqx.nn.GroupNorm):
    r"""Group Normalization: drop-in for ``equinox.nn.GroupNorm``, computed by
    :class:`bn_jax.GroupNorm`.

    ``x`` of shape ``(channels, *spatial)`` is split into ``groups`` groups of
    consecutive channels; each is normalized with its own statistics::

        y = (x - mean(x_g)) / sqrt(var(x_g) + eps) * weight + bias   # weight, bias: [channels]

    Equinox's constructor, fields and call; statistics in float32 (or wider),
    output in ``x``'s dtype, as in Equinox. Differences: the stable
    variance, ``mask=``, and a ``ValueError`` naming the problem where the
    input does not fit (Equinox raises what ``reshape`` or ``broadcast_to``
    raise); ``eps`` must be positive.

    Args:
      **Equinox's arguments**: ``groups``, ``channels``, ``eps``,
        ``channelwise_affine``, ``dtype``.
      use_fast_variance: ``E[x^2] - E[x]^2`` instead of the stable formula.
      memory_efficient: compute the backward pass from the output (see
        :class:`bn_jax.GroupNorm`).

    Reference: Y. Wu and K. He, "Group Normalization", ECCV 2018.
    """

    use_fast_variance: bool = eqx.field(static=True, default=False)
    memory_efficient: bool = eqx.field(static=True, default=False)

    def __init__(
        self,
        groups: int,
        channels: int | None = None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        dtype: Any = None,
        *,
        use_fast_variance: bool = False,
        memory_efficient: bool = False,
    ) -> None:
        checks.check_epsilon(eps, "eps")
        super().__init__(groups, channels, eps, channelwise_affine, dtype)
        self.use_fast_variance = use_fast_variance
        self.memory_efficient = memory_efficient
        _core_group_norm(self, 1)

    @overload
    def __call__(
        self, x: jax.Array, *, key: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array: ...

    @overload
    def __call__(
        self,
        x: jax.Array,
        state: State,
        *,
        key: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, State]: ...

    def __call__(
        self,
        x: jax.Array,
        state: State = _NO_STATE,
        *,
        key: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, State]:
        """Normalizes ``x`` of shape ``(channels, *spatial)`` by groups of channels;
        returns ``y``, or ``(y, state)`` when a state is passed (unchanged)."""
        del key
        _check_example(self, x)
        norm = _core_group_norm(self, jnp.ndim(x))
        y, _ = norm.apply(_params(self.weight, self.bias), {}, x, training=True, mask=mask)
        return y if state is _NO_STATE else (y, state)


def _core_group_norm(layer: GroupNorm, ndim: int) -> bn_jax.GroupNorm:
    return _layers.normalizer(
        bn_jax.GroupNorm,
        layer,
        {
            "num_groups": layer.groups,
            "epsilon": layer.eps,
            "use_scale": layer.channelwise_affine,
            "use_bias": layer.channelwise_affine,
            "feature_axis": 0,
            "reduction_axes": tuple(range(max(ndim, 1))),
            "param_dtype": _param_dtype(layer.weight, layer.bias),
        },
    )


# --------------------------------------------------------------- the rest of the family


class BatchRenorm(eqx.nn.StatefulLayer):
    r"""Batch Renormalization as an Equinox stateful layer, computed by
    :class:`bn_jax.BatchRenorm`.

    Called like :class:`BatchNorm`: on one example ``x`` of shape
    ``(input_size, *spatial)`` under ``jax.vmap`` with ``axis_name``, with an
    ``eqx.nn.State``. In training, with batch statistics ``mu_B, sigma_B`` and
    running ones ``mu, sigma``::

        r = stop_gradient(clip(sigma_B / sigma, 1 / rmax, rmax))
        d = stop_gradient(clip((mu_B - mu) / sigma, -dmax, dmax))
        y = ((x - mu_B) / sigma_B * r + d) * weight + bias

    The state (one ``StateIndex``, ``state_index``) holds
    :class:`bn_jax.BatchRenorm`'s state: ``{"mean", "var", "step"}``, from mean
    0 and variance 1; inference normalizes with the running statistics.

    Args:
      **BatchNorm's arguments**: ``input_size``, ``axis_name``, ``eps``,
        ``channelwise_affine``, ``momentum``, ``inference``, ``dtype``, as in
        :class:`BatchNorm` (``momentum`` is the weight of the
        old running statistics; None keeps the cumulative average).
      rmax, dmax: the clipping bounds, numbers or callables of the step
        count (see :class:`bn_jax.BatchRenorm`).
      **BatchNorm's options**: ``use_fast_variance``,
        ``unbiased_running_var``, ``allow_single_value``, ``count_skipped``,
        ``axis_index_groups``, as in :class:`BatchNorm`.

    Reference: S. Ioffe, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", NeurIPS 2017.
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: StateIndex[dict[str, jax.Array]]
    axis_name: Hashable | Sequence[Hashable] | None
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    rmax: Any = eqx.field(static=True)
    dmax: Any = eqx.field(static=True)
    use_fast_variance: bool = eqx.field(static=True)
    unbiased_running_var: bool = eqx.field(static=True)
    allow_single_value: bool = eqx.field(static=True)
    count_skipped: bool = eqx.field(static=True)
    axis_index_groups: tuple[tuple[int, ...], ...] | None = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable] | None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = 0.99,
        inference: bool = False,
        dtype: Any = None,
        *,
        rmax: Any = 3.0,
        dmax: Any = 5.0,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        allow_single_value: bool = True,
        count_skipped: bool = False,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        checks.check_epsilon(eps, "eps")
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.rmax = rmax
        self.dmax = dmax
        self.use_fast_variance = use_fast_variance
        self.unbiased_running_var = unbiased_running_var
        self.allow_single_value = allow_single_value
        self.count_skipped = count_skipped
        self.axis_index_groups = checks.canonical_groups(axis_index_groups, axis_name)
        params, state = _core_batch_renorm(self, _float_dtype(dtype)).init(input_size)
        self.weight, self.bias = params.get("scale"), params.get("bias")
        self.state_index = StateIndex(state)

    def __call__(
        self,
        x: jax.Array,
        state: State,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, State]:
        """Normalizes one example ``x`` of shape ``(input_size, *spatial)``; arguments
        and result as :meth:`BatchNorm.__call__`."""
        del key
        training = not (self.inference if inference is None else inference)
        norm = _core_batch_renorm(self, _param_dtype(self.weight, self.bias))
        return _stateful_call(self, norm, x, state, training, mask, batch_axis=False)


def _core_batch_renorm(layer: BatchRenorm, param_dtype: Any) -> bn_jax.BatchRenorm:
    return _layers.normalizer(
        bn_jax.BatchRenorm,
        layer,
        {
            "epsilon": layer.eps,
            "axis": 0,
            "axis_name": _names(layer.axis_name),
            "use_scale": layer.channelwise_affine,
            "use_bias": layer.channelwise_affine,
            "param_dtype": param_dtype,
        },
    )


def _stateful_call(
    layer: Any,
    norm: Any,
    x: Any,
    state: State,
    training: bool,
    mask: Any,
    *,
    batch_axis: bool,
    **kwargs: Any,
) -> tuple[jax.Array, State]:
    """Runs ``norm`` on one example with the state of ``layer.state_index``.

    With ``batch_axis`` the example gets a leading batch axis of one (the
    normalizer's layout), removed from the output.
    """
    if training:
        _check_bound(norm.axis_name, type(layer).__name__)
    _check_example(layer, x, kwargs.get("step"), batch=norm if training else None)
    x = jnp.asarray(x)
    if batch_axis:
        x = x[None]
    y, new = norm.apply(
        _params(layer.weight, layer.bias),
        state.get(layer.state_index),
        x,
        training=training,
        mask=mask,
        **kwargs,
    )
    if training:
        state = _set(state, layer.state_index, new)
    return (y[0] if batch_axis else y), state


class SequenceBatchNorm(eqx.nn.StatefulLayer):
    r"""Recurrent (per time step) Batch Normalization as an Equinox stateful layer,
    computed by :class:`bn_jax.SequenceBatchNorm`.

    Called on one example under ``jax.vmap`` with ``axis_name``: a whole
    sequence ``x`` of shape ``(time, input_size)``, or one step ``x`` of shape
    ``(input_size,)`` with its index ``step`` (e.g. inside ``lax.scan``). Each
    time step ``t < max_steps`` is normalized with the batch statistics of
    that step and keeps its own running statistics (steps from
    ``max_steps`` on use the last slot's)::

        y[t] = (x[t] - mean_t) / sqrt(var_t + eps) * weight + bias

    The state (``state_index``) holds :class:`bn_jax.SequenceBatchNorm`'s
    ``{"mean", "var"}`` of shape ``(max_steps, input_size)``.

    Args:
      input_size: the number of features.
      max_steps: the number of time steps with their own statistics.
      **BatchRenorm's arguments**: all but ``rmax`` and ``dmax``, with
        their meaning in :class:`BatchRenorm`.

    Reference: T. Cooijmans, N. Ballas, C. Laurent, C. Gulcehre and A.
    Courville, "Recurrent Batch Normalization", ICLR 2017.
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: StateIndex[dict[str, jax.Array]]
    axis_name: Hashable | Sequence[Hashable] | None
    inference: bool
    input_size: int = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    use_fast_variance: bool = eqx.field(static=True)
    unbiased_running_var: bool = eqx.field(static=True)
    allow_single_value: bool = eqx.field(static=True)
    count_skipped: bool = eqx.field(static=True)
    axis_index_groups: tuple[tuple[int, ...], ...] | None = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        max_steps: int,
        axis_name: Hashable | Sequence[Hashable] | None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = 0.99,
        inference: bool = False,
        dtype: Any = None,
        *,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        allow_single_value: bool = True,
        count_skipped: bool = False,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        checks.check_epsilon(eps, "eps")
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.max_steps = max_steps
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.use_fast_variance = use_fast_variance
        self.unbiased_running_var = unbiased_running_var
        self.allow_single_value = allow_single_value
        self.count_skipped = count_skipped
        self.axis_index_groups = checks.canonical_groups(axis_index_groups, axis_name)
        params, state = _core_sequence_batch_norm(self, _float_dtype(dtype)).init(input_size)
        self.weight, self.bias = params.get("scale"), params.get("bias")
        self.state_index = StateIndex(state)

    def __call__(
        self,
        x: jax.Array,
        state: State,
        *,
        step: int | jax.Array | None = None,
        key: jax.Array | None = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, State]:
        """Normalizes one example: a sequence ``(time, input_size)``, or with ``step``
        the step ``(input_size,)``; otherwise as :meth:`BatchNorm.__call__`."""
        del key
        training = not (self.inference if inference is None else inference)
        norm = _core_sequence_batch_norm(self, _param_dtype(self.weight, self.bias))
        return _stateful_call(self, norm, x, state, training, mask, batch_axis=True, step=step)


def _core_sequence_batch_norm(layer: SequenceBatchNorm, param_dtype: Any) -> Any:
    return _layers.normalizer(
        bn_jax.SequenceBatchNorm,
        layer,
        {
            "epsilon": layer.eps,
            "axis_name": _names(layer.axis_name),
            "use_scale": layer.channelwise_affine,
            "use_bias": layer.channelwise_affine,
            "param_dtype": param_dtype,
        },
    )


class GhostBatchNorm(eqx.nn.StatefulLayer):
    r"""Ghost Batch Normalization as an Equinox stateful layer, computed by
    :class:`bn_jax.GhostBatchNorm`.

    Called like :class:`BatchNorm`: on one example ``x`` of shape
    ``(input_size, *spatial)`` under ``jax.vmap`` with ``axis_name``, with an
    ``eqx.nn.State``. The examples of the mapped axis are split into virtual
    batches of ``v = virtual_batch_size`` consecutive examples (lanes
    ``0..v-1``, ``v..2v-1``, ...), and each is normalized with its own
    statistics; the running statistics move once per step towards the
    average of the virtual batches' means and (biased) variances::

        x in virtual batch j -> (x - mu_j) / sqrt(var_j + eps) * weight + bias
        running = momentum * running + (1 - momentum) * mean_j(mu_j, var_j)

    Inference normalizes with the running statistics (mean 0 and variance 1
    before any step). The state (one ``StateIndex``, ``state_index``) holds
    :class:`bn_jax.GhostBatchNorm`'s state, ``{"mean", "var"}`` (plus
    ``"count"`` with ``momentum=None``, ``"skipped"`` with ``count_skipped``),
    unbatched under the ``vmap`` (``out_axes=None``, as for BatchNorm).

    With a tuple of names, the virtual batches are cut from the *last*
    name's axis (the ``vmap`` over examples) and the earlier names (a
    ``shard_map`` / ``pmap`` device axis, an outer ``vmap``) only share the
    running-statistic update, as ``axis_name`` does for
    :class:`bn_jax.GhostBatchNorm`: ``axis_name=("devices", "batch")``
    normalizes virtual batches within each device's examples and keeps the
    same running statistics on every device.

    How it is computed: in training the layer gathers the examples of the
    last axis (``lax.all_gather``; under ``vmap`` that is a relayout, not a
    collective, and the normalizer then runs once on the whole mapped batch,
    not once per example), runs :class:`bn_jax.GhostBatchNorm` on them and
    returns this example's row. If the last name is a device axis
    (``pmap`` / ``shard_map`` with one example per device), the gather is a
    real collective that copies every example to every device: put the
    examples under a ``vmap`` inside and name it last instead.

    Args:
      **BatchNorm's arguments**: ``input_size``, ``axis_name``, ``eps``,
        ``channelwise_affine``, ``momentum``, ``inference``, ``dtype``, as in
        :class:`BatchNorm` (``momentum`` is the weight of the old running
        statistics; None keeps the cumulative average). ``axis_name`` is
        required: the virtual batches are groups of its examples.
      virtual_batch_size: examples per virtual batch (keyword only,
        required); it must divide the size of the last axis of
        ``axis_name``.
      **BatchNorm's options**: ``use_fast_variance``,
        ``unbiased_running_var``, ``allow_single_value`` (per virtual batch:
        ``virtual_batch_size=1`` trains on one value per channel),
        ``count_skipped``, as in :class:`BatchNorm`; ``axis_index_groups``
        groups the devices of the earlier names of ``axis_name`` that share
        the running update.

    Raises:
      ValueError: ``axis_name`` is None or empty, ``axis_index_groups``
        without an earlier name to group, or (at the call) a
        ``virtual_batch_size`` that does not divide the mapped axis.

    Example::

        layer, state = eqx.nn.make_with_state(bnx.GhostBatchNorm)(
            64, "batch", virtual_batch_size=16)
        y, state = jax.vmap(layer, axis_name="batch", in_axes=(0, None),
                            out_axes=(0, None))(x, state)  # x.shape[0] % 16 == 0

    Reference: E. Hoffer, I. Hubara and D. Soudry, "Train longer, generalize
    better: closing the generalization gap in large batch training of neural
    networks", NeurIPS 2017.
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: StateIndex[dict[str, jax.Array]]
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    virtual_batch_size: int = eqx.field(static=True)
    use_fast_variance: bool = eqx.field(static=True)
    unbiased_running_var: bool = eqx.field(static=True)
    allow_single_value: bool = eqx.field(static=True)
    count_skipped: bool = eqx.field(static=True)
    axis_index_groups: tuple[tuple[int, ...], ...] | None = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = 0.99,
        inference: bool = False,
        dtype: Any = None,
        *,
        virtual_batch_size: int,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        allow_single_value: bool = True,
        count_skipped: bool = False,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        checks.check_epsilon(eps, "eps")
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.virtual_batch_size = virtual_batch_size
        self.use_fast_variance = use_fast_variance
        self.unbiased_running_var = unbiased_running_var
        self.allow_single_value = allow_single_value
        self.count_skipped = count_skipped
        _, shared = _ghost_axes(axis_name)
        if axis_index_groups is not None and shared is None:
            raise ValueError(
                f"GhostBatchNorm: axis_index_groups group the devices of the names before "
                f"the last in axis_name (those that share the running statistics); "
                f"axis_name={axis_name!r} has none. Pass e.g. axis_name=('devices', "
                f"{axis_name!r}), or no axis_index_groups."
            )
        self.axis_index_groups = checks.canonical_groups(axis_index_groups, shared)
        params, state = _core_ghost_batch_norm(self, _float_dtype(dtype)).init(input_size)
        self.weight, self.bias = params.get("scale"), params.get("bias")
        self.state_index = StateIndex(state)

    def __call__(
        self,
        x: jax.Array,
        state: State,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, State]:
        """Normalizes one example ``x`` of shape ``(input_size, *spatial)``; arguments
        and result as :meth:`BatchNorm.__call__`.

        Raises:
          NameError: training with an ``axis_name`` that no ``vmap`` / ``pmap`` /
            ``shard_map`` binds (as :class:`BatchNorm`).
          ValueError: ``virtual_batch_size`` does not divide the size of the last
            axis of ``axis_name``.
        """
        del key
        training = not (self.inference if inference is None else inference)
        return _ghost_batch_norm_call(self, x, state, training, mask)


def _ghost_axes(axis_name: Any) -> tuple[Hashable, Any]:
    """GhostBatchNorm's :func:`_example_axes`."""
    why = "its virtual batches are groups of the examples of the mapped axis"
    return _example_axes(axis_name, "GhostBatchNorm", why)


def _example_axes(axis_name: Any, layer: str, why: str) -> tuple[Hashable, Any]:
    """``(examples, shared)``: the name whose examples a layer gathers into one batch
    (the last), and the names before it (None if there are none); ``why`` says what
    the layer needs the examples for."""
    names = _names(axis_name)
    if names is None or names == ():
        raise ValueError(
            f"{layer} needs axis_name: {why}; got axis_name={axis_name!r}. Pass the name "
            f"of the jax.vmap over the examples, e.g. axis_name='batch'."
        )
    if not isinstance(names, tuple):
        return names, None
    shared = names[:-1]
    return names[-1], (shared[0] if len(shared) == 1 else shared or None)


def _core_ghost_batch_norm(layer: GhostBatchNorm, param_dtype: Any) -> bn_jax.GhostBatchNorm:
    """The core GhostBatchNorm on the gathered examples ``(batch, input_size, *spatial)``:
    channel axis 1, synchronized over the names before the last."""
    return _layers.normalizer(
        bn_jax.GhostBatchNorm,
        layer,
        {
            "epsilon": layer.eps,
            "axis": 1,
            "axis_name": _ghost_axes(layer.axis_name)[1],
            "use_scale": layer.channelwise_affine,
            "use_bias": layer.channelwise_affine,
            "param_dtype": param_dtype,
        },
    )


def _ghost_batch_norm_call(
    layer: GhostBatchNorm, x: Any, state: State, training: bool, mask: Any
) -> tuple[jax.Array, State]:
    norm = _core_ghost_batch_norm(layer, _param_dtype(layer.weight, layer.bias))
    examples = _ghost_axes(layer.axis_name)[0]
    _check_example(layer, x)
    if training:
        _check_bound(_names(layer.axis_name), "GhostBatchNorm")
        size, v = lax.axis_size(examples), layer.virtual_batch_size
        if size % v:
            raise ValueError(
                f"GhostBatchNorm: virtual_batch_size={v} does not divide the {size} examples "
                f"of the mapped axis {examples!r} (the last name of axis_name); map the layer "
                f"over a multiple of {v} examples, or use a virtual_batch_size among the "
                f"divisors of {size}."
            )
        _check_values(
            layer,
            v * math.prod(jnp.shape(x)[1:]),
            f"training with virtual_batch_size={v} on examples of shape {tuple(jnp.shape(x))}",
            "use virtual_batch_size >= 2, or call the layer with inference=True "
            "(eqx.nn.inference_mode)",
        )
    return _gathered_call(layer, norm, x, state, training, mask, examples)


def _gathered_call(
    layer: Any, norm: Any, x: Any, state: State, training: bool, mask: Any, examples: Hashable
) -> tuple[jax.Array, State]:
    """Runs the core ``norm`` (batch axis 0) for one example ``x`` of the mapped axis
    ``examples`` with the state of ``layer.state_index``: in inference on the example
    alone; in training on all the examples of the axis, gathered into one batch.
    Returns the example's output and the new state."""
    params, stats = _params(layer.weight, layer.bias), state.get(layer.state_index)
    x = jnp.asarray(x)
    if not training:  # per example: no axis needed
        y, _ = norm.apply(params, stats, x[None], training=False, mask=mask)
        return y[0], state
    # The examples of the mapped axis as one batch: under vmap all_gather is a
    # relayout whose result is unbatched, so the normalizer (and the new state)
    # is computed once, and the state leaves the vmap with out_axes=None. Under
    # shard_map the gathered batch is the same on every device: say so, so that
    # the state is returned replicated (P()).
    to = "varying" if vmapped(examples) else "invarying"
    batch = lax.all_gather(x, examples, to=to)
    if mask is not None:
        mask = checks.check_mask(mask, x.shape)
        mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
        mask = lax.all_gather(mask, examples, to=to)
    y, new = norm.apply(params, stats, batch, training=True, mask=mask)
    y = lax.dynamic_index_in_dim(y, lax.axis_index(examples), keepdims=False)
    return y, _set(state, layer.state_index, new)


class InstanceNorm(eqx.nn.StatefulLayer):
    r"""Instance Normalization as an Equinox layer, computed by :class:`bn_jax.InstanceNorm`.

    Like Equinox's per-example layers (``GroupNorm``): ``x`` of shape
    ``(channels, *spatial)``; each channel is normalized over its spatial
    positions::

        y = (x - mean(x_c)) / sqrt(var(x_c) + eps) * weight + bias

    By default it keeps no running statistics (``GroupNorm(groups=channels)``
    computes the same) and is called as ``layer(x)``; a ``state`` passed in is
    returned unchanged.

    With ``track_running_stats=True`` (PyTorch's option) it is a stateful
    layer, called like :class:`BatchNorm` on one example under ``jax.vmap``
    with ``axis_name``: ``layer(x, state) -> (y, state)``. Training still
    normalizes each example with its own statistics, and moves the running
    statistics (one ``StateIndex``, ``state_index``, holding
    :class:`bn_jax.InstanceNorm`'s ``{"mean", "var"}``, from mean 0 and
    variance 1) towards the average over the mapped examples of their
    instance statistics::

        running = momentum * running + (1 - momentum) * mean_n(mu_n, var_n)

    Inference (``inference=True``, ``eqx.nn.inference_mode``) normalizes with
    the running statistics. In training the layer gathers the examples of the
    axis (under ``vmap`` a relayout, not a collective), runs
    :class:`bn_jax.InstanceNorm` once on them and returns this example's row,
    as :class:`GhostBatchNorm` does; the new state is unbatched
    (``out_axes=None``).

    Args:
      channels: the number of channels (needed when ``channelwise_affine`` or
        ``track_running_stats``).
      eps: added to the variance; must be positive.
      channelwise_affine: learn a per-channel ``weight`` and ``bias``.
      dtype: the dtype of ``weight``, ``bias`` and the running statistics
        (float32 by default).
      use_fast_variance: ``E[x^2] - E[x]^2`` instead of the stable formula.
      track_running_stats: keep running statistics for inference.
      axis_name: with ``track_running_stats``, the name of the ``vmap`` over
        the examples (required; one name).
      momentum: weight of the old running statistics (PyTorch's 0.1 is 0.9
        here); None keeps the cumulative average.
      inference: normalize with the running statistics (with
        ``track_running_stats``).
      unbiased_running_var, allow_single_value, count_skipped: as in
        :class:`bn_jax.InstanceNorm` (``allow_single_value`` is True here,
        as for Equinox's per-example layers).

    Raises:
      ValueError: ``track_running_stats`` without ``channels`` or without
        ``axis_name``, or with several names; ``axis_name`` without
        ``track_running_stats``.

    Example::

        layer, state = eqx.nn.make_with_state(bnx.InstanceNorm)(
            64, track_running_stats=True, axis_name="batch")
        y, state = jax.vmap(layer, axis_name="batch", in_axes=(0, None),
                            out_axes=(0, None))(x, state)

    Reference: D. Ulyanov, A. Vedaldi and V. Lempitsky, "Instance
    Normalization: The Missing Ingredient for Fast Stylization", arXiv 2016.
    """

    channels: int | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    use_fast_variance: bool = eqx.field(static=True)
    weight: jax.Array | None
    bias: jax.Array | None
    # Without running statistics axis_name, inference and state_index are None, so the
    # layer's leaves are those of the per-example layer.
    track_running_stats: bool = eqx.field(static=True, default=False)
    momentum: float | None = eqx.field(static=True, default=0.99)
    unbiased_running_var: bool = eqx.field(static=True, default=False)
    allow_single_value: bool = eqx.field(static=True, default=True)
    count_skipped: bool = eqx.field(static=True, default=False)
    axis_name: Hashable | None = None
    inference: bool | None = None
    state_index: StateIndex[dict[str, jax.Array]] | None = None

    def __init__(
        self,
        channels: int | None = None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        dtype: Any = None,
        *,
        use_fast_variance: bool = False,
        track_running_stats: bool = False,
        axis_name: Hashable | None = None,
        momentum: float | None = 0.99,
        inference: bool = False,
        unbiased_running_var: bool = False,
        allow_single_value: bool = True,
        count_skipped: bool = False,
    ) -> None:
        checks.check_epsilon(eps, "eps")
        if channels is None and (channelwise_affine or track_running_stats):
            need = "channelwise_affine=True" if channelwise_affine else "track_running_stats=True"
            raise ValueError(
                f"InstanceNorm: {need} needs channels (the number of channels of the "
                f"input), got channels=None."
            )
        if track_running_stats:
            why = "its running statistics average the instance statistics of the examples"
            examples, shared = _example_axes(
                axis_name, "InstanceNorm(track_running_stats=True)", why
            )
            if shared is not None:
                raise ValueError(
                    f"InstanceNorm: axis_name must be one name, the jax.vmap over the "
                    f"examples, got axis_name={axis_name!r}."
                )
        elif axis_name is not None:
            raise ValueError(
                f"InstanceNorm: axis_name={axis_name!r} is used only with "
                f"track_running_stats=True (the statistics are per example otherwise)."
            )
        self.channels = channels
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.use_fast_variance = use_fast_variance
        dt = _float_dtype(dtype)
        self.weight = jnp.ones((channels,), dt) if channelwise_affine else None
        self.bias = jnp.zeros((channels,), dt) if channelwise_affine else None
        self.track_running_stats = track_running_stats
        self.momentum = momentum
        self.unbiased_running_var = unbiased_running_var
        self.allow_single_value = allow_single_value
        self.count_skipped = count_skipped
        self.axis_name = examples if track_running_stats else None
        self.inference = inference if track_running_stats else None
        norm = _core_instance_norm(self, dt)  # every option checked now
        self.state_index = StateIndex(norm.init(channels)[1]) if track_running_stats else None

    def is_stateful(self) -> bool:
        """Whether ``eqx.nn.Sequential`` passes the state: with ``track_running_stats``."""
        return self.track_running_stats

    @overload
    def __call__(
        self,
        x: jax.Array,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array: ...

    @overload
    def __call__(
        self,
        x: jax.Array,
        state: State,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, State]: ...

    def __call__(
        self,
        x: jax.Array,
        state: State = _NO_STATE,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, State]:
        """Normalizes ``x`` of shape ``(channels, *spatial)`` per channel; returns ``y``,
        or ``(y, state)`` when a state is passed (unchanged without running statistics).

        Args:
          x: one example, channels first.
          state: the ``eqx.nn.State`` (required with ``track_running_stats``).
          key: ignored (Equinox's layer interface).
          inference: overrides the ``inference`` field when not None (only
            ``track_running_stats`` uses it).
          mask: boolean, broadcastable to ``x``: only True elements enter the
            statistics.

        Raises:
          TypeError: no ``state`` with ``track_running_stats``.
          NameError: training with running statistics and an ``axis_name`` that
            no ``vmap`` / ``pmap`` / ``shard_map`` binds.
        """
        del key
        _check_example(self, x)
        training = not (self.inference if inference is None else inference)
        if self.state_index is None or training:
            _check_values(
                self,
                math.prod(jnp.shape(x)[1:]),
                f"an example of shape {tuple(jnp.shape(x))} has one spatial position",
                "pass examples of shape (channels, *spatial) with 2 or more positions, or "
                "use LayerNorm or BatchNorm",
            )
        if self.state_index is None:
            x = jnp.asarray(x)[None]  # the normalizer's layout: a batch of one example
            norm = _core_instance_norm(self, _param_dtype(self.weight, self.bias))
            y, _ = norm.apply(_params(self.weight, self.bias), {}, x, training=True, mask=mask)
            return y[0] if state is _NO_STATE else (y[0], state)
        if state is _NO_STATE:
            raise TypeError(
                "InstanceNorm with track_running_stats=True needs its state: call "
                "layer(x, state), with the state from eqx.nn.make_with_state."
            )
        if training:
            _check_bound(self.axis_name, "InstanceNorm")
        norm = _core_instance_norm(self, _param_dtype(self.weight, self.bias))
        return _gathered_call(self, norm, x, state, training, mask, self.axis_name)


def _core_instance_norm(layer: InstanceNorm, param_dtype: Any) -> bn_jax.InstanceNorm:
    """The core InstanceNorm on a batch ``(batch, channels, *spatial)``; the layer's
    ``axis_name`` is the batch's, not the core's (which splits the spatial axes)."""
    return _layers.normalizer(
        bn_jax.InstanceNorm,
        layer,
        {
            "epsilon": layer.eps,
            "use_scale": layer.channelwise_affine,
            "use_bias": layer.channelwise_affine,
            "feature_axes": 1,
            "param_dtype": param_dtype,
            "axis_name": None,
        },
    )


# ---------------------------------------------------------------------------- convert

_DROP_INS: dict[type[eqx.Module], type[eqx.Module]] = {
    eqx.nn.BatchNorm: BatchNorm,
    eqx.nn.LayerNorm: LayerNorm,
    eqx.nn.GroupNorm: GroupNorm,
    eqx.nn.RMSNorm: RMSNorm,
}
# Options that change only how a layer computes, not its parameters or state.
_CONVERT_OPTIONS: dict[type[eqx.Module], tuple[str, ...]] = {
    BatchNorm: (
        "use_fast_variance",
        "unbiased_running_var",
        "allow_single_value",
        "axis_index_groups",
    ),
    LayerNorm: ("use_fast_variance", "memory_efficient"),
    GroupNorm: ("use_fast_variance", "memory_efficient"),
    RMSNorm: ("memory_efficient",),
}


def convert(model: Any, **options: Any) -> Any:
    """``model`` with every ``equinox.nn`` BatchNorm, LayerNorm, GroupNorm and RMSNorm
    replaced by its bn_jax drop-in.

    Each drop-in keeps the layer's fields as they are: its weights, its
    ``StateIndex`` objects and their markers, so the model's existing
    ``eqx.nn.State`` (and serialised files of the model and state) work with
    the converted model unchanged. ``options`` set bn_jax options on the
    layers that have them (``use_fast_variance``, ``unbiased_running_var``,
    ``allow_single_value``, ``axis_index_groups``, ``memory_efficient``);
    options that would need new state (``count_skipped``, ``momentum=None``)
    are not accepted here: build those layers with the drop-in instead.

    Args:
      model: any pytree (an Equinox model); it is not modified.
      **options: bn_jax options for the layers that have them.

    Returns:
      The converted model (a new pytree).

    Raises:
      TypeError: an option that no drop-in takes from ``convert``.

    Example::

        model = bn_jax.equinox.convert(model)   # state: unchanged
        y, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                            out_axes=(0, None))(x, state)
    """
    known = {name for names in _CONVERT_OPTIONS.values() for name in names}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"convert: unknown option(s) {unknown}; convert takes {sorted(known)} "
            f"(options that add state, such as count_skipped, need the drop-in built directly)."
        )

    def swap(node: Any) -> Any:
        cls = _DROP_INS.get(type(node))
        return node if cls is None else _converted(node, cls, options)

    return jax.tree.map(swap, model, is_leaf=lambda node: type(node) in _DROP_INS)


def _converted(layer: Any, cls: type[eqx.Module], options: dict[str, Any]) -> Any:
    """The drop-in ``cls`` with the fields of the Equinox ``layer`` and bn_jax's defaults
    for the rest (overridden by ``options``)."""
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING and not hasattr(layer, f.name)
    }
    values = {**defaults, **{k: v for k, v in options.items() if k in _CONVERT_OPTIONS[cls]}}
    if "axis_index_groups" in values:
        values["axis_index_groups"] = checks.canonical_groups(
            values["axis_index_groups"], getattr(layer, "axis_name", None)
        )
    new = object.__new__(cls)
    for f in dataclasses.fields(cls):
        value = values[f.name] if f.name in values else getattr(layer, f.name)
        object.__setattr__(new, f.name, value)
    _core_of(new)  # checks the options
    return new


def _core_of(layer: Any) -> Any:
    if isinstance(layer, BatchNorm):
        return _core_batch_norm(layer)
    if isinstance(layer, LayerNorm):
        return _core_layer_norm(layer)
    if isinstance(layer, RMSNorm):
        return _core_rms_norm(layer, None)
    return _core_group_norm(layer, 1)


# ------------------------------------------------------------------------ recalibrate

_MOMENTS_TAG = "bn_jax.recalibrate"


def recalibrate(
    model: Any,
    state: State,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    forward: Callable[[Any, State, Any], tuple[Any, State]] | None = None,
    passes: int = 1,
    progress: bool = True,
    total: int | None = None,
) -> State:
    r"""A new state whose BatchNorm statistics are exact population statistics.

    The Equinox counterpart of PyTorch's ``torch.optim.swa_utils.update_bn``:
    the model runs on every batch, the input of each :class:`BatchNorm` of
    this module is captured, and its statistics become, per channel over all
    batches, all examples and all calls of the layer::

        mean = sum(x) / n,   var = sum((x - mean)**2) / n    # n: all valid elements

    pooled exactly (count-weighted, not a moving average); ``mask`` is
    honoured, and a layer with ``unbiased_running_var=True`` gets
    ``M2 / (n - 1)``. The result is written in each layer's layout: in
    ``"ema"`` mode as the running statistics; in ``"batch"`` mode as hidden
    averages and a step count that debias to them. Channels that saw no
    valid element keep their statistics. An ``equinox.nn.BatchNorm`` is not
    recalibrated: :func:`convert` the model first.

    What the layers see is what ``forward`` does: in training mode each
    BatchNorm normalizes with its batch statistics (PyTorch's ``update_bn``
    in one pass); with the model in inference mode
    (``eqx.nn.inference_mode``) and ``passes`` set to the BatchNorm depth of
    the network, the statistics are exactly those the inference model sees.

    Args:
      model: the Equinox model (with this module's BatchNorm layers).
      state: its ``eqx.nn.State``; not modified (it stays valid).
      batches: an iterable of batches, or a callable returning a fresh one
        (needed with ``passes > 1`` and a generator).
      forward: ``forward(model, state, batch) -> (output, state)``, run under
        ``eqx.filter_jit``. Default: ``jax.vmap(model, axis_name=name,
        in_axes=(0, None), out_axes=(0, None))(batch, state)`` with the
        BatchNorms' (single) ``axis_name``.
      passes: passes over ``batches``, each with the statistics of the last.
      progress: a tqdm progress bar (when tqdm is installed).
      total: the number of batches, for the progress bar.

    Returns:
      The new ``eqx.nn.State``.

    Raises:
      ValueError: no batches, no BatchNorm called, ``passes`` < 1, a one-shot
        iterator with ``passes > 1``, or no ``forward`` for BatchNorms with
        different ``axis_name``.
      TypeError: a ``passes`` that is not an int.

    Example::

        state = bn_jax.equinox.recalibrate(model, state, train_batches)
    """
    is_norm = lambda node: isinstance(node, BatchNorm)
    found = jtu.tree_flatten_with_path(model, is_leaf=is_norm)[0]
    norms = {jtu.keystr(path): layer for path, layer in found if is_norm(layer)}
    if not norms:
        raise ValueError("recalibrate: the model has no bn_jax.equinox.BatchNorm.")
    if forward is None:
        names = {_names(layer.axis_name) for layer in norms.values()}
        if len(names) != 1:
            raise ValueError(
                f"recalibrate: the BatchNorms use the axis names {sorted(map(repr, names))}; "
                f"pass forward(model, state, batch) -> (output, state) that binds them."
            )
        (name,) = names

        def forward(m, s, batch):
            return jax.vmap(m, axis_name=name, in_axes=(0, None), out_axes=(0, None))(batch, s)

    slots = {path: _slot(path) for path in norms}

    @eqx.filter_jit
    def step_moments(model, state, batch):
        targets = {}
        for path, layer in jtu.tree_flatten_with_path(model, is_leaf=is_norm)[0]:
            if is_norm(layer):
                targets[id(layer)] = (jtu.keystr(path), layer)
        state = _with_slots(state, norms, slots)

        def tap(module, path, call, args, kwargs):
            y, new_state = call(*args, **kwargs)
            x = args[0]
            reduce = tuple(range(1, jnp.ndim(x)))
            mask = checks.check_mask(kwargs.get("mask"), jnp.shape(x))
            norm = _core_batch_norm(module)
            m = moments(
                jnp.asarray(x),
                reduce,
                mask,
                axis_name=norm.axis_name,
                axis_index_groups=norm.axis_index_groups,
            )
            m = Moments(*(v.reshape(jnp.shape(x)[:1]) for v in m))
            old = Moments(*new_state.get(slots[path]))
            seen = _recalibrate.merge({0: old}, {0: m})[0]
            return y, new_state.set(slots[path], tuple(seen))

        with calls_of(targets, tap):
            _, out = forward(model, state, batch)
        return {path: Moments(*out.get(slots[path])) for path in norms}

    def step(carry, batch):
        return step_moments(model, carry, batch), carry

    def finish(carry, pooled):
        return _write_population(carry, norms, pooled)

    return _recalibrate.run(
        step,
        _clone(state),
        batches,
        finish=finish,
        passes=passes,
        progress=progress,
        total=total,
    )


def _slot(path: str) -> StateIndex:
    """A state entry (outside any layer) where recalibration pools a layer's moments."""
    index = StateIndex(None)
    object.__setattr__(index, "marker", (_MOMENTS_TAG, path))  # as make_with_state does
    return index


def _clone(state: State) -> State:
    """A copy of ``state`` (``State.set`` invalidates the object it is called on)."""
    leaves, treedef = jtu.tree_flatten(state)
    return jtu.tree_unflatten(treedef, leaves)


def _with_slots(state: State, norms: dict[str, BatchNorm], slots: dict[str, StateIndex]) -> State:
    """``state`` plus one zeroed ``(count, mean, M2)`` slot per BatchNorm."""
    keys, values = state.tree_flatten()[::-1]
    dt = _float_dtype(None)
    extra_keys = tuple(slots[path].marker for path in norms)
    extra = tuple(
        tuple(jnp.zeros((layer.input_size,), dt) for _ in range(3)) for layer in norms.values()
    )
    return State.tree_unflatten(tuple(keys) + extra_keys, tuple(values) + extra)


def _estimate(layer: BatchNorm, state: State) -> tuple[jax.Array, jax.Array]:
    """The statistics ``layer`` normalizes with in inference, from ``state``."""
    if layer.mode == "ema":
        return state.get(_index(layer, layer.ema_state_index, "ema_state_index"))
    hidden = state.get(_index(layer, layer.batch_state_index, "batch_state_index"))
    counter = state.get(_index(layer, layer.batch_counter, "batch_counter"))
    return _debiased(hidden, counter, layer.momentum)


def _write_population(
    state: State, norms: dict[str, BatchNorm], pooled: dict[str, Moments]
) -> State:
    """``state`` with each BatchNorm's statistics set to its pooled population statistics."""
    if not any(bool(jnp.any(pooled[path].count > 0)) for path in norms):
        raise ValueError("recalibrate: the model called no bn_jax.equinox.BatchNorm.")
    paths = list(norms)
    new = _recalibrate.population(
        [pooled[p] for p in paths],
        [tuple(jnp.asarray(v) for v in _estimate(norms[p], state)) for p in paths],
        unbiased=tuple(norms[p].unbiased_running_var for p in paths),
    )
    state = _clone(state)
    for path, (mean, var) in zip(paths, new, strict=True):
        layer, seen = norms[path], bool(jnp.any(pooled[path].count > 0))
        if layer.mode == "ema":
            running_index = _index(layer, layer.ema_state_index, "ema_state_index")
            if seen:
                first_index = _index(layer, layer.ema_first_time_index, "ema_first_time_index")
                first = state.get(first_index)
                state = state.set(first_index, jnp.zeros_like(first))
            state = _set(state, running_index, (mean, var))
            continue
        counter_index = _index(layer, layer.batch_counter, "batch_counter")
        hidden_index = _index(layer, layer.batch_state_index, "batch_state_index")
        counter = state.get(counter_index)
        steps = jnp.maximum(counter, 1)  # keeps the counter's dtype (and weak type)
        if layer.momentum is None:
            state = _set(state, hidden_index, (mean, var))
            count_index = _index(layer, layer.count_index, "count_index")
            count = state.get(count_index)
            state = state.set(count_index, jnp.maximum(count, 1))
        else:  # hidden averages that debias to (mean, var) after `steps` steps
            decay = jnp.asarray(layer.momentum, mean.dtype) ** steps.astype(mean.dtype)
            hidden = ((1 - decay) * mean, decay + (1 - decay) * var)
            state = _set(state, hidden_index, hidden)
        state = state.set(counter_index, steps)
    return state
