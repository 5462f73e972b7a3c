"""The one recalibration loop behind every ``recalibrate``: no framework here.

Each face (``bn_jax.recalibrate`` over arrays, ``bn_jax.linen.recalibrate``
over a linen model, ``bn_jax.nnx.recalibrate`` over an nnx model) supplies:

* ``step(carry, batch) -> (moments, carry)``: jitted; the ``(count, mean,
  M2)`` of every BatchNorm input of one batch (a pytree of :class:`Moments`,
  the same structure for every batch, e.g. a dict keyed by layer), computed
  with the statistics in ``carry``;
* ``carry``: what the model runs with (its statistics, its random state);
* ``finish(carry, pooled) -> carry``: writes a pass's pooled statistics into
  ``carry``, usually through :func:`population`, so that the next pass runs
  with them.

:func:`run` does the rest, once for every face: the ``passes`` checks, the
passes, the progress bar, and the count-weighted merge across batches of Chan
et al. (1979)::

    n = n_a + n_b,   mean = mean_a + n_b (mean_b - mean_a) / n,
    M2 = M2_a + M2_b + n_a n_b (mean_b - mean_a)**2 / n

(the core's ``merge_across`` run over a pair axis, so there is one copy of the
formula). A face for another framework is one more ``step`` and ``finish``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from bn_jax._core import checks
from bn_jax._core.stats import Moments, merge_across, moments

Carry = TypeVar("Carry")
Batches = Iterable[Any] | Callable[[], Iterable[Any]]


def check_passes(passes: Any, batches: Batches) -> None:
    """Raises unless ``passes`` is an int >= 1 that ``batches`` can serve."""
    if isinstance(passes, bool) or not isinstance(passes, int):
        raise TypeError(
            f"recalibrate: passes must be an int >= 1, got {passes!r} of type "
            f"{type(passes).__name__}."
        )
    if passes < 1:
        raise ValueError(f"recalibrate: passes must be an int >= 1, got {passes!r}.")
    if passes > 1 and not callable(batches) and iter(batches) is batches:
        raise ValueError(
            f"recalibrate: passes={passes} reads batches more than once, but batches is a "
            f"one-shot iterator; pass a list or a callable that returns a fresh iterable."
        )


def run(
    step: Callable[[Carry, Any], tuple[Any, Carry]],
    carry: Carry,
    batches: Batches,
    *,
    finish: Callable[[Carry, Any], Carry],
    passes: int,
    progress: bool,
    total: int | None,
) -> Carry:
    """Runs ``passes`` passes of ``step`` over ``batches``; ``finish`` ends each pass."""
    check_passes(passes, batches)
    for p in range(passes):
        data = batches() if callable(batches) else batches
        n_batches = total if total is not None else _len(data)
        desc = "recalibrate" if passes == 1 else f"recalibrate {p + 1}/{passes}"
        pooled = None
        for batch in progress_bar(data, total=n_batches, desc=desc, enabled=progress):
            moments, carry = step(carry, batch)
            pooled = moments if pooled is None else merge(pooled, moments)
        if pooled is None:
            raise ValueError("recalibrate: batches yielded no batch.")
        carry = finish(carry, pooled)
    return carry


def feature_moments(
    calls: Sequence[tuple[Any, Any]], axis: int | tuple[int, ...], what: str
) -> Moments:
    """The moments of one BatchNorm's inputs per feature, pooled over its calls.

    ``calls`` holds ``(x, mask)`` for each call (``mask`` None or broadcastable
    to ``x``); the statistics are over every axis but ``axis``, of all calls at
    once (a layer applied to inputs of different batch or spatial sizes gets
    the statistics of everything it saw). ``what`` names the input in errors.
    The result has the feature shape.
    """
    axis = checks.canonical_axis(axis)
    xs, masks = [], []
    fshape: tuple[int, ...] | None = None
    for x, mask in calls:
        checks.check_input(x, f"recalibrate: {what}")
        x = jnp.asarray(x)
        axes = checks.resolve_axes(axis, x.ndim)
        shape = tuple(x.shape[a] for a in axes)
        if fshape is not None and shape != fshape:
            raise ValueError(
                f"recalibrate: {what} has {fshape} features in one call and {shape} in another."
            )
        xs.append(x)
        masks.append(checks.check_mask(mask, x.shape))
        fshape = shape
    if fshape is None:
        raise ValueError(f"recalibrate: no call gave {what}, so it has no statistics.")
    if len(xs) == 1:
        x, mask = xs[0], masks[0]
        axes = checks.resolve_axes(axis, x.ndim)
        front = tuple(i for i in range(x.ndim) if i not in axes)
        return Moments(*(v.reshape(fshape) for v in moments(x, front, mask)))
    # Several calls: lay each out as (elements, features...) and concatenate.
    flat, flat_masks = [], []
    for x, mask in zip(xs, masks, strict=True):
        axes = checks.resolve_axes(axis, x.ndim)
        order = tuple(i for i in range(x.ndim) if i not in axes) + axes
        flat.append(jnp.transpose(x, order).reshape(-1, *fshape))
        m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
        flat_masks.append(jnp.transpose(m, order).reshape(-1, *fshape))
    mask = None if all(m is None for m in masks) else jnp.concatenate(flat_masks)
    return Moments(*(v.reshape(fshape) for v in moments(jnp.concatenate(flat), (0,), mask)))


@jax.jit
def merge(a: Any, b: Any) -> Any:
    """Pools two pytrees of :class:`Moments` with the core's count-weighted merge."""

    def pair(ma, mb):
        stacked = jax.tree.map(lambda u, v: jnp.stack([u, v]), ma, mb)
        merged = jax.vmap(lambda m: merge_across(m, "_pair"), axis_name="_pair")(stacked)
        return Moments(*(v[0] for v in merged))

    return jax.tree.map(pair, a, b, is_leaf=lambda t: isinstance(t, Moments))


@partial(jax.jit, static_argnames=("unbiased",))
def population(
    moments: Sequence[Moments],
    old: Sequence[tuple[jax.Array, jax.Array] | None],
    unbiased: tuple[bool, ...],
) -> list[tuple[jax.Array, jax.Array]]:
    """The stored ``(mean, var)`` of each pooled input.

    ``var`` is ``M2 / n``, or ``M2 / (n - 1)`` where ``unbiased`` (PyTorch's
    running-variance convention). A feature that saw no valid element keeps
    its old ``(mean, var)`` (``(0, 1)`` where ``old`` is None). The results
    take the old statistics' dtype (the moments' where there are none).
    """
    out = []
    for m, prev, unb in zip(moments, old, unbiased, strict=True):
        if prev is None:
            prev = (jnp.zeros_like(m.mean), jnp.ones_like(m.mean))
        old_mean, old_var = prev
        seen = m.count > 0
        var = m.m2 / jnp.maximum(m.count - 1 if unb else m.count, 1)
        out.append(
            (
                jnp.where(seen, m.mean, old_mean).astype(old_mean.dtype),
                jnp.where(seen, var, old_var).astype(old_mean.dtype),
            )
        )
    return out


def update_layers(
    pooled: Mapping[Any, Moments],
    old: Mapping[Any, Mapping[str, Any]],
    unbiased: Callable[[Any], bool],
) -> dict[Any, dict[str, Any]]:
    """The model faces' ``finish``: each layer's statistics with ``mean`` and ``var`` replaced.

    ``pooled`` and ``old`` are keyed by layer; ``unbiased(key)`` says whether
    that layer keeps the unbiased running variance. Other entries of a
    layer's statistics are kept.
    """
    if not pooled:
        raise ValueError("recalibrate: the model called no BatchNorm layer.")
    keys = list(pooled)
    new = population(
        [pooled[k] for k in keys],
        [(jnp.asarray(old[k]["mean"]), jnp.asarray(old[k]["var"])) for k in keys],
        unbiased=tuple(bool(unbiased(k)) for k in keys),
    )
    return {
        k: {**old[k], "mean": mean, "var": var} for k, (mean, var) in zip(keys, new, strict=True)
    }


def check_layer_stats(stats: Mapping[str, Any], moments: Moments, layer: str) -> None:
    """Raises unless a model layer keeps one ``mean`` and ``var`` per feature of its input."""
    for key in ("mean", "var"):
        if key not in stats:
            raise ValueError(
                f"recalibrate: {layer} has no batch statistic {key!r} (it has {sorted(stats)})."
            )
        if tuple(jnp.shape(stats[key])) != tuple(moments.mean.shape):
            raise ValueError(
                f"recalibrate: {layer} keeps {key!r} of shape {tuple(jnp.shape(stats[key]))} "
                f"but its input has features {tuple(moments.mean.shape)}; only one statistic "
                f"per feature can be recalibrated."
            )


def progress_bar(iterable: Iterable[Any], *, total: int | None, desc: str, enabled: bool) -> Any:
    """``iterable`` with a tqdm bar when ``enabled`` and tqdm is installed (an optional extra)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _len(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None
