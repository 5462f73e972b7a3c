"""Running-statistic updates: exponential or cumulative average, NaN guard.

``momentum`` follows Flax: ``new = momentum * old + (1 - momentum) * batch``
(PyTorch's ``momentum=0.1`` is ``0.9`` here). ``momentum=None`` keeps the exact
cumulative average of every batch seen, ``new = old + (batch - old) / (k + 1)``
with a per-channel count ``k``. A channel whose batch statistics are not finite,
or that had no valid element, keeps its running statistics (and count).

When the state holds ``skipped`` (an int32 array shaped like ``mean``, added by
the normalizers' opt-in ``count_skipped=True``), it counts, per channel, the
updates dropped because the batch statistics were not finite (a NaN or Inf in
the batch). A channel with no valid element is not counted: it had nothing to
skip. Without ``skipped`` the state is exactly Flax's ``{"mean", "var"}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax._core.checks import stat_dtype


def update_running(
    state: dict[str, jax.Array],
    mean: jax.Array,
    var: jax.Array,
    count: jax.Array,
    *,
    momentum: float | None,
    unbiased: bool = False,
) -> dict[str, jax.Array]:
    """Returns ``state`` with ``mean`` / ``var`` (and ``count``, ``skipped``) updated.

    ``mean``, ``var`` (biased) and ``count`` are the batch statistics, of any
    shape with the size of ``state["mean"]`` (keepdims-shaped statistics are
    reshaped). With ``unbiased=True`` the running variance tracks
    ``var * n / (n - 1)`` (PyTorch's convention). A complex batch mean makes
    the running mean complex, as in Flax.
    """
    old_mean, old_var = state["mean"], state["var"]
    shape, dt = old_var.shape, old_var.dtype
    mean, var, count = (lax.stop_gradient(v).reshape(shape) for v in (mean, var, count))
    if unbiased:
        var = var * count / jnp.maximum(count - 1, 1)
    finite = jnp.isfinite(mean) & jnp.isfinite(var)
    ok = finite & (count > 0)
    mean_dt = old_mean.dtype
    if jnp.iscomplexobj(mean):
        mean_dt = stat_dtype(old_mean.dtype, mean.dtype)
    mean, var, old_mean = mean.astype(mean_dt), var.astype(dt), old_mean.astype(mean_dt)
    new = dict(state)
    if momentum is None:
        k = state["count"]
        w = 1.0 / (k + 1).astype(dt)
        keep = 1.0 - w
        new["count"] = jnp.where(ok, k + 1, k).astype(k.dtype)
    else:
        keep, w = jnp.asarray(momentum, dt), jnp.asarray(1.0 - momentum, dt)
    new["mean"] = jnp.where(
        ok, keep.astype(mean_dt) * old_mean + w.astype(mean_dt) * mean, old_mean
    )
    new["var"] = jnp.where(ok, keep * old_var + w * var, old_var)
    if "skipped" in state:
        skipped = state["skipped"]
        new["skipped"] = skipped + jnp.where(finite, 0, 1).astype(skipped.dtype)
    return new
