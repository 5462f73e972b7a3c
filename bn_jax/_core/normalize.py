"""Normalization with batch statistics, and its fused derivative.

Training mode computes, per statistics group (a channel for BatchNorm),

    mean, var = moments(x)          # over the batch, across devices if asked
    x_hat     = (x - mean) * rsqrt(var + eps)
    y         = x_hat * scale + bias

``batch_normalize`` carries a custom JVP (Ioffe & Szegedy 2015, eq. for the
backward pass, written as a linear map of the tangents):

    a  = scale * rsqrt(var + eps)
    r0 = mean_w(dx),  r1 = mean_w(dx * x_hat)      # one stacked psum across devices
    dy = a * dx + (dbias - a * r0) + x_hat * (dscale - a * r1)

Because JAX transposes this linear map for reverse mode, the backward pass is
exactly two per-channel reductions (``sum(g)``, ``sum(g * x_hat)``), one
all-reduce of those ``2C`` numbers across devices, and one elementwise pass for
``dx``; ``jax.checkpoint`` around the tangent map makes reverse mode keep only
``x`` and the per-channel ``mean`` / ``rsqrt(var + eps)`` instead of
``x_hat``. Forward mode (``jvp``, ``jacfwd``, ``hessian``) works as well, and
second-order reverse mode differentiates the transposed map as ordinary JAX.

Complex input (mean complex, variance ``E[|x - mean|^2]``, as in Flax) takes
the same forward pass and is differentiated by JAX instead: the tangent map
is written for real input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax._core.checks import AxisName, Groups
from bn_jax._core.stats import Moments, group_sum, moments, normalizing_var, private_copies


class StatsConfig(NamedTuple):
    """Static configuration of ``batch_normalize`` (hashable)."""

    axes: tuple[int, ...]  # axes reduced for the statistics
    epsilon: float
    out_dtype: jnp.dtype
    axis_name: AxisName | None = None
    axis_index_groups: Groups = None
    fast_variance: bool = False
    # False where the statistics are pooled over a jax.vmap axis: JAX traces a
    # custom derivative's rule lazily, and where a jit, scan or checkpoint sits
    # between the vmap and the derivative (grad(jit(vmap(f)))), the rule is traced
    # after the vmap is gone and its collective finds the axis unbound. There the
    # forward pass is differentiated by JAX instead.
    custom_derivative: bool = True

    def moments(self, x: jax.Array, mask: jax.Array | None = None) -> Moments:
        """The statistics of ``x`` this configuration describes (over ``axes``, across
        the devices of ``axis_name``)."""
        return moments(
            x,
            self.axes,
            mask,
            fast_variance=self.fast_variance,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )


def affine(
    x: jax.Array,
    mean: jax.Array,
    inv: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    out_dtype: jnp.dtype,
) -> jax.Array:
    """``(x - mean) * (inv * scale) + bias`` in one elementwise pass.

    ``inv * scale`` is folded per channel before touching ``x``. The mean is
    subtracted first rather than folded into the bias: the same single pass,
    but exact when ``|mean| >> std`` where ``x * a + (bias - mean * a)`` would
    round away the signal. Computed in ``mean``'s dtype (float32 or wider;
    complex for complex input).
    """
    dt = mean.dtype
    a = inv.astype(dt) if scale is None else inv.astype(dt) * scale.astype(dt)
    y = (x.astype(dt) - mean) * a
    if bias is not None:
        y = y + bias.astype(dt)
    return y.astype(out_dtype)


def _batch_normalize(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    cfg: StatsConfig,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Normalizes ``x`` with its own statistics over ``cfg.axes``.

    ``scale`` and ``bias`` must broadcast against ``x``. Returns ``(y, mean,
    var, count)``: the output in ``cfg.out_dtype`` and the keepdims-shaped batch
    mean, biased variance and valid-element count (global when
    ``cfg.axis_name`` is set). ``mean`` and ``var`` are differentiable.
    """
    m = moments(
        x,
        cfg.axes,
        mask,
        fast_variance=cfg.fast_variance,
        axis_name=cfg.axis_name,
        axis_index_groups=cfg.axis_index_groups,
    )
    var = normalizing_var(m, mask)
    y = affine(x, m.mean, lax.rsqrt(var + cfg.epsilon), scale, bias, cfg.out_dtype)
    return y, m.mean, var, m.count


batch_normalize = jax.custom_jvp(_batch_normalize, nondiff_argnums=(4,))


def normalizing_function(cfg: StatsConfig) -> Callable[..., tuple[jax.Array, ...]]:
    """``batch_normalize`` (the fused derivative), or, without
    ``cfg.custom_derivative``, the same forward pass for JAX to differentiate."""
    return batch_normalize if cfg.custom_derivative else _batch_normalize


@batch_normalize.defjvp
def _batch_normalize_jvp(cfg, primals, tangents):
    x, scale, bias, mask = primals
    if jnp.iscomplexobj(x):
        forward = lambda x, scale, bias, mask: _batch_normalize(x, scale, bias, mask, cfg)
        return jax.jvp(forward, primals, tangents)
    dx, dscale, dbias, _ = tangents
    y, mean, var, count = batch_normalize(x, scale, bias, mask, cfg)
    inv = lax.rsqrt(var + cfg.epsilon)
    dy, dmean, dvar = _remat_tangent_map(cfg)(x, mean, inv, count, scale, mask, dx, dscale, dbias)
    return (y, mean, var, count), (dy, dmean, dvar, jnp.zeros_like(count))


@lru_cache(maxsize=256)
def _remat_tangent_map(cfg: StatsConfig):
    # One function object per configuration: jax.checkpoint caches its traced
    # jaxpr on the function, so same-shaped layers trace the tangent map once.
    return jax.checkpoint(partial(_tangent_map, cfg), prevent_cse=False)


def _tangent_map(cfg, x, mean, inv, count, scale, mask, dx, dscale, dbias):
    """The derivative of ``batch_normalize`` as a linear map of the tangents."""
    dt = mean.dtype
    # x_hat enters twice: in the reduction r1 and as the multiplier of the
    # per-channel correction. Each use gets its own copy of (x, mean, inv), so
    # that XLA recomputes x_hat inside each fused pass (forward mode: the
    # reduction and the elementwise dy; reverse mode, after transposition:
    # sum(g * x_hat) and the elementwise dx) instead of writing it (or x
    # converted to float32) to memory and reading it back.
    x_hat = (x.astype(dt) - mean) * inv
    x_c, (mean_c, inv_c) = private_copies(x), private_copies((mean, inv))
    x_hat_c = (x_c.astype(dt) - mean_c) * inv_c
    dxf = dx.astype(dt)
    w = dxf if mask is None else jnp.where(mask, dxf, 0)
    s0, s1 = jnp.sum(w, cfg.axes, keepdims=True), jnp.sum(w * x_hat, cfg.axes, keepdims=True)
    if cfg.axis_name is not None:  # one collective for both sums
        s0, s1 = group_sum(jnp.stack([s0, s1]), cfg.axis_name, cfg.axis_index_groups)
    # Unmasked on one device, the count is the static size of the reduction
    # (the array only carries it): dividing by that constant keeps the program small.
    n = math.prod(x.shape[i] for i in cfg.axes)
    if mask is not None or cfg.axis_name is not None or n == 0:
        n = jnp.maximum(count, 1)
    r0, r1 = s0 / n, s1 / n  # mean of dx, mean of dx * x_hat
    a = inv if scale is None else inv * scale.astype(dt)
    db = 0.0 if dbias is None else dbias.astype(dt)
    ds = 0.0 if dscale is None else dscale.astype(dt)
    if not _constant_along(a, cfg.axes):  # scale varies inside a group (GroupNorm, LayerNorm)
        dy = a * (dxf - r0 - x_hat_c * r1) + x_hat_c * ds + db
        return dy.astype(cfg.out_dtype), r0, 2.0 * r1 / inv
    # a, dscale, dbias are per statistics group: fold the corrections per
    # channel so the transpose needs only sum(g) and sum(g * x_hat).
    full, per_channel = (a * dxf, x_hat_c * (ds - a * r1)), db - a * r0
    if jnp.dtype(cfg.out_dtype) != jnp.dtype(dt):
        # Low-precision output: round the two full-size terms to it, each
        # through a private copy. Reverse mode then converts the incoming
        # cotangent to float32 inside each pass that reads it (exactly: it
        # came from that dtype), instead of sharing one float32 copy that
        # XLA:CPU would write to memory. Forward mode rounds twice more.
        rounded = private_copies(tuple(t.astype(cfg.out_dtype) for t in full))
        full = tuple(t.astype(dt) for t in rounded)
    dy = full[0] + per_channel + full[1]
    return dy.astype(cfg.out_dtype), r0, 2.0 * r1 / inv


def _constant_along(a: jax.Array, axes: tuple[int, ...]) -> bool:
    return all(a.shape[i] == 1 for i in axes if i < a.ndim)
