"""Statistics of complex input, with Flax's ``|x|^2`` variance.

The core normalizers take real input only; the Flax drop-ins also accept
complex input, as Flax's layers do, and compute it here with plain formulas
(no fused derivative: JAX differentiates them)::

    mean = E[x]                       (complex)
    var  = E[|x - mean|^2]            (real; E[|x|^2] - |mean|^2 with fast_variance)
    y    = (x - mean) * rsqrt(var + epsilon) * scale + bias

Across devices the sums and counts are added with one ``psum`` per moment, so
the statistics are those of the whole batch, weighted by count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax._core.stats import group_sum


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|^2`` elementwise (real)."""
    return lax.square(lax.real(x)) + lax.square(lax.imag(x))


def moments(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None = None,
    *,
    use_mean: bool = True,
    fast_variance: bool = False,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(count, mean, var)`` over ``axes``, keepdims-shaped.

    ``mean`` is complex (zero when ``use_mean`` is False), ``var`` real. A
    group with no valid element gets mean 0 and variance 1, so that it is
    passed through unamplified.
    """
    valid = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    xm = jnp.where(valid, x, 0)
    count = group_sum(
        jnp.sum(valid, axes, keepdims=True, dtype=jnp.real(x).dtype), axis_name, axis_index_groups
    )
    safe = jnp.maximum(count, 1)
    if use_mean:
        mean = group_sum(jnp.sum(xm, axes, keepdims=True), axis_name, axis_index_groups) / safe
    else:
        mean = jnp.zeros(count.shape, x.dtype)
    if fast_variance:
        sq = group_sum(jnp.sum(abs_sq(xm), axes, keepdims=True), axis_name, axis_index_groups)
        var = jnp.maximum(sq / safe - abs_sq(mean), 0.0)
    else:
        d = jnp.where(valid, abs_sq(x - mean), 0)
        var = group_sum(jnp.sum(d, axes, keepdims=True), axis_name, axis_index_groups) / safe
    return count, mean, jnp.where(count > 0, var, 1.0)


def normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    epsilon: float,
    out_dtype: Any,
) -> jax.Array:
    """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` in ``out_dtype``."""
    mul = lax.rsqrt(var + epsilon)
    if scale is not None:
        mul = mul * scale
    y = (x - mean) * mul
    if bias is not None:
        y = y + bias
    return y.astype(out_dtype)


def update_running(
    state: dict[str, jax.Array],
    mean: jax.Array,
    var: jax.Array,
    count: jax.Array,
    *,
    momentum: float | None,
) -> dict[str, jax.Array]:
    """Running statistics after a batch: ``momentum * old + (1 - momentum) * batch``.

    The running mean becomes complex (as in Flax); ``momentum=None`` keeps the
    cumulative average with the state's ``count``. A feature whose batch
    statistics are not finite, or that had no valid element, keeps its
    running statistics.
    """
    mean, var, count = (lax.stop_gradient(v) for v in (mean, var, count))
    ok = jnp.isfinite(mean) & jnp.isfinite(var) & (count > 0)
    new = dict(state)
    if momentum is None:
        k = state["count"]
        w = 1.0 / (k + 1).astype(var.dtype)
        new["count"] = jnp.where(ok, k + 1, k).astype(k.dtype)
    else:
        w = 1.0 - momentum
    new["mean"] = jnp.where(ok, (1 - w) * state["mean"] + w * mean, state["mean"])
    new["var"] = jnp.where(ok, (1 - w) * state["var"] + w * var, state["var"])
    return new
