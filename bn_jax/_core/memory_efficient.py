"""LayerNorm and RMSNorm whose backward pass is computed from the output.

Autodiff of a normalization keeps its input ``x`` for the backward pass. In a
transformer the matmul that reads the normalized output ``y`` keeps ``y``
anyway, so ``x`` is a second activation of the same size kept only for the
norm. Given its per-row statistics each layer is invertible (NVIDIA Apex's
``FusedLayerNorm(memory_efficient=True)`` uses the same identity)::

    x_hat = (y - bias) / scale          # LayerNorm
    x_hat = y / scale                   # RMSNorm

so a custom VJP whose residuals are ``y``, the per-row ``inv = rsqrt(var +
eps)`` (``rsqrt(mean(x**2) + eps)`` for RMSNorm) and the parameters gives the
same gradients without ``x``. With ``g`` the cotangent of ``y``, ``h = g *
scale``, ``w`` the mask (1 without one), ``P = g * (y - bias)`` (``= h *
x_hat``) and means over the reduced axes divided by the number ``n`` of valid
elements::

    LayerNorm:  dx = inv * (h - w * (mean(h) + x_hat * mean(P)))
    RMSNorm:    dx = inv * (h - w * x_hat * mean(P))              # P = g * y
    dscale = sum(P) / scale,  dbias = sum(g)       # over the non-feature axes

``x_hat`` enters only the ``dx`` pass, as ``y * c - bias * c`` with ``c =
mean(P) / scale``: it is never written to memory.

Keeping ``x`` dead also needs XLA not to recompute ``y`` from ``x`` inside
the backward fusions (cheap elementwise producers are duplicated into their
consumers, which keeps ``x`` alive until the backward pass). ``y`` is
therefore produced behind a boundary XLA keeps: an ``optimization_barrier``,
except on CPU, where XLA removes barriers before fusion
(``cse_barrier_expander``); there ``y`` is produced by a ``lax.cond`` whose
predicate is always true but not known to the compiler.

Accuracy: ``y`` carries the rounding of its dtype (``u = eps / 2`` of it), so
the reconstructed ``x_hat`` is off by about ``u * (|x_hat| + |bias| /
|scale|)``: float rounding while ``|scale|`` is not small next to ``|bias|``,
growing as ``|bias| / |scale|`` below that. ``|scale|`` is floored at the
``eps`` of ``y``'s dtype in the division (Apex floors at the layer's epsilon),
which keeps the error finite and below about ``|x_hat| + |bias| / 2``. Where
``scale`` is exactly 0 the output is ``bias`` and ``x`` cannot be recovered
from it: that feature's ``dscale`` comes out 0 (the plain layer gives
``sum(g * x_hat)``), so a scale that starts at zero does not learn.

GroupNorm uses ``layer_norm_saving_output`` on its input split into groups.

Only reverse mode is defined (``jax.vjp``, ``jax.grad``); forward mode
(``jax.jvp``, ``jax.jacfwd``) raises JAX's ``TypeError`` for custom VJPs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax._core.checks import stat_dtype
from bn_jax._core.normalize import StatsConfig, affine
from bn_jax._core.stats import group_sum, mean_square, normalizing_var


def layer_norm_saving_output(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mask: jax.Array | None,
    cfg: StatsConfig,
) -> jax.Array:
    """``(x - mean) * rsqrt(var + eps) * scale + bias`` over ``cfg.axes``, whose
    VJP keeps ``y`` instead of ``x``.

    The forward pass is the plain LayerNorm's (same statistics, same output).

    Args:
      x: floating-point input.
      scale, bias: arrays that broadcast against ``x``, or None.
      mask: boolean array broadcastable to ``x`` (only True elements enter the
        statistics), or None.
      cfg: the reduced axes, epsilon, output dtype and cross-device axis.

    Returns:
      ``y`` in ``cfg.out_dtype``.
    """
    return _layer_norm(x, scale, bias, mask, cfg, jnp.dtype(x.dtype))


def rms_norm_saving_output(
    x: jax.Array,
    scale: jax.Array | None,
    mask: jax.Array | None,
    cfg: StatsConfig,
) -> jax.Array:
    """``x * rsqrt(mean(x**2) + eps) * scale`` over ``cfg.axes``, whose VJP keeps
    ``y`` instead of ``x``.

    Args:
      x: floating-point input.
      scale: an array that broadcasts against ``x``, or None.
      mask: boolean array broadcastable to ``x`` (only True elements enter the
        mean square), or None.
      cfg: the reduced axes, epsilon, output dtype and cross-device axis
        (``cfg.fast_variance`` is not used).

    Returns:
      ``y`` in ``cfg.out_dtype``.
    """
    return _rms_norm(x, scale, mask, cfg, jnp.dtype(x.dtype))


def scale_floor(dtype: Any) -> float:
    """The least ``|scale|`` the reconstruction divides by: the ``eps`` of ``y``'s dtype.

    Below it, the rounding of ``y`` (relative ``eps / 2``) divided by
    ``|scale|`` would exceed ``|bias|``; see the module docstring.
    """
    return float(jnp.finfo(dtype).eps)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _layer_norm(x, scale, bias, mask, cfg, in_dtype):
    return _layer_norm_forward(x, scale, bias, mask, cfg, in_dtype)[0]


def _layer_norm_forward(x, scale, bias, mask, cfg, in_dtype):
    m = cfg.moments(x, mask)
    var = normalizing_var(m, mask)
    inv = lax.rsqrt(var + cfg.epsilon)
    y = _kept(lambda: affine(x, m.mean, inv, scale, bias, cfg.out_dtype), inv, x.shape, cfg)
    return y, (y, inv, m.count, scale, bias, mask)


def _layer_norm_backward(cfg, in_dtype, residuals, g):
    y, inv, count, scale, bias, mask = residuals
    dt = inv.dtype
    gf, yf = g.astype(dt), y.astype(dt)
    h = gf if scale is None else gf * scale.astype(dt)
    p = gf * (yf if bias is None else yf - bias.astype(dt))  # g * x_hat * scale
    sums = jnp.stack([jnp.sum(h, cfg.axes, keepdims=True), jnp.sum(p, cfg.axes, keepdims=True)])
    sums = group_sum(sums, cfg.axis_name, cfg.axis_index_groups)
    n = jnp.maximum(count, 1)
    r0, r1 = sums[0] / n, sums[1] / n
    dx = _input_cotangent(inv, h, r0, yf, scale, bias, r1, mask, y.dtype, in_dtype)
    dscale = None if scale is None else _sum_to(p, scale) * _reciprocal(scale, y.dtype)
    dbias = None if bias is None else _sum_to(gf, bias)
    return dx, _cast_like(dscale, scale), _cast_like(dbias, bias), None


_layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rms_norm(x, scale, mask, cfg, in_dtype):
    return _rms_norm_forward(x, scale, mask, cfg, in_dtype)[0]


def _rms_norm_forward(x, scale, mask, cfg, in_dtype):
    ms, count = mean_square(
        x, cfg.axes, mask, axis_name=cfg.axis_name, axis_index_groups=cfg.axis_index_groups
    )
    inv = lax.rsqrt(ms + cfg.epsilon)

    def output():
        y = x.astype(inv.dtype) * inv
        return (y if scale is None else y * scale.astype(inv.dtype)).astype(cfg.out_dtype)

    y = _kept(output, inv, x.shape, cfg)
    return y, (y, inv, count, scale, mask)


def _rms_norm_backward(cfg, in_dtype, residuals, g):
    y, inv, count, scale, mask = residuals
    dt = inv.dtype
    gf, yf = g.astype(dt), y.astype(dt)
    h = gf if scale is None else gf * scale.astype(dt)
    p = gf * yf  # g * x_hat * scale
    r1 = group_sum(jnp.sum(p, cfg.axes, keepdims=True), cfg.axis_name, cfg.axis_index_groups)
    r1 = r1 / jnp.maximum(count, 1)
    dx = _input_cotangent(inv, h, None, yf, scale, None, r1, mask, y.dtype, in_dtype)
    dscale = None if scale is None else _sum_to(p, scale) * _reciprocal(scale, y.dtype)
    return dx, _cast_like(dscale, scale), None


_rms_norm.defvjp(_rms_norm_forward, _rms_norm_backward)


def _kept(
    output: Callable[[], jax.Array], inv: jax.Array, shape: tuple[int, ...], cfg: StatsConfig
) -> jax.Array:
    """``output()``, produced behind a boundary that XLA does not fuse across.

    Without one, XLA duplicates the elementwise producer of ``y`` into the
    backward fusions that read ``y``, which then read ``x`` instead and keep it
    alive. XLA:CPU removes optimization barriers before fusion, so there the
    boundary is a conditional on ``not inv[0] < 0``: always true (``inv`` is a
    reciprocal square root; NaN compares False) but not known to the compiler.
    """
    if inv.size == 0:
        return output()

    def on_cpu():
        keep = jnp.logical_not(inv.reshape(-1)[0] < 0)
        return lax.cond(keep, output, lambda: jnp.full(shape, jnp.nan, cfg.out_dtype))

    return lax.platform_dependent(cpu=on_cpu, default=lambda: lax.optimization_barrier(output()))


def _input_cotangent(inv, h, r0, y, scale, bias, r1, mask, y_dtype, in_dtype):
    """``inv * (h - w * (r0 + x_hat * r1))`` with ``x_hat * r1`` computed as
    ``y * c - bias * c``, ``c = r1 / scale``, inside the one elementwise pass."""
    c = r1 if scale is None else r1 * _reciprocal(scale, y_dtype)
    correction = y * c
    if bias is not None:
        correction = correction - bias.astype(c.dtype) * c
    if r0 is not None:
        correction = correction + r0
    if mask is not None:
        correction = jnp.where(mask, correction, 0)
    return (inv * (h - correction)).astype(in_dtype)


def _reciprocal(scale: jax.Array, y_dtype: Any) -> jax.Array:
    """``1 / scale`` in at least float32, with ``|scale|`` floored at ``scale_floor``."""
    s = scale.astype(stat_dtype(scale.dtype))
    floor = scale_floor(y_dtype)
    return 1 / jnp.where(jnp.abs(s) >= floor, s, jnp.where(s < 0, -floor, floor))


def _sum_to(v: jax.Array, like: jax.Array) -> jax.Array:
    """``v`` summed down to the shape of ``like``, which broadcasts against ``v``."""
    lead = v.ndim - like.ndim
    axes = tuple(i for i in range(v.ndim) if i < lead or like.shape[i - lead] == 1)
    return jnp.sum(v, axes).reshape(like.shape)


def _cast_like(v: jax.Array | None, like: jax.Array | None) -> jax.Array | None:
    return None if v is None or like is None else v.astype(like.dtype)
