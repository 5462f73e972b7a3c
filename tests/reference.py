"""Every reference formula of the tests, in one place. Nothing here imports bn_jax.

Float64 NumPy formulas for values, and :func:`plain_bn`, a textbook
``jax.numpy`` BatchNorm, for references of derivatives (``jax.grad`` of it).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def axes_of(ndim: int, axis) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def bn_stats(x, axis=-1, mask=None):
    """Batch mean, biased variance and count per feature, float64, feature-shaped."""
    x = np.asarray(x, np.float64)
    fa = axes_of(x.ndim, axis)
    red = tuple(i for i in range(x.ndim) if i not in fa)
    if mask is None:
        w = np.ones_like(x)
    else:
        w = np.broadcast_to(np.asarray(mask, bool), x.shape).astype(np.float64)
    xz = np.where(w > 0, x, 0.0)
    n = w.sum(red)
    mean = xz.sum(red) / np.maximum(n, 1)
    mean_b = np.expand_dims(mean, red)
    var = (w * (xz - mean_b) ** 2).sum(red) / np.maximum(n, 1)
    return mean, var, n


def bn_train(x, scale=None, bias=None, axis=-1, eps=1e-5, mask=None):
    """Training-mode BatchNorm output in float64."""
    x = np.asarray(x, np.float64)
    mean, var, _ = bn_stats(x, axis, mask)
    return bn_eval(x, mean, var, scale, bias, axis, eps)


def bn_eval(x, mean, var, scale=None, bias=None, axis=-1, eps=1e-5):
    """BatchNorm with given per-feature statistics (eval mode), float64."""
    x = np.asarray(x, np.float64)
    fa = axes_of(x.ndim, axis)
    y = (x - _per_feature(mean, x.ndim, fa)) / np.sqrt(_per_feature(var, x.ndim, fa) + eps)
    return _scale_shift(y, scale, bias, fa)


def _scale_shift(y, scale, bias, fa):
    """``y * scale + bias`` with feature-shaped ``scale`` / ``bias`` (None: absent)."""
    if scale is not None:
        y = y * _per_feature(scale, y.ndim, fa)
    if bias is not None:
        y = y + _per_feature(bias, y.ndim, fa)
    return y


def bn_train_vjp(x, scale, g, eps=1e-5):
    """Pullback of training-mode BatchNorm over all but the last axis, float64:
    ``(dx, dscale, dbias)`` for the cotangent ``g``."""
    x, scale, g = (np.asarray(v, np.float64) for v in (x, scale, g))
    red = tuple(range(x.ndim - 1))
    inv = 1.0 / np.sqrt(x.var(red) + eps)
    x_hat = (x - x.mean(red)) * inv
    dx = scale * inv * (g - g.mean(red) - x_hat * (g * x_hat).mean(red))
    return dx, (g * x_hat).sum(red), g.sum(red)


def ema(old, new, momentum):
    return momentum * np.asarray(old, np.float64) + (1 - momentum) * np.asarray(new, np.float64)


def conv2d_nhwc(x, kernel, bias=None, padding="SAME"):
    """Stride-1 2-D cross-correlation in float64: NHWC input, HWIO kernel (XLA's SAME pads)."""
    x = np.asarray(x, np.float64)
    k = np.asarray(kernel, np.float64)
    kh, kw = k.shape[:2]
    if padding == "SAME":
        x = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], ho, wo, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += x[:, i : i + ho, j : j + wo, :] @ k[i, j]
    if bias is not None:
        out = out + np.asarray(bias, np.float64)
    return out


# --- the rest of the family -----------------------------------------------


def _masked_moments(x, axes, mask):
    """Mean and biased variance over ``axes`` (keepdims), float64, valid elements only."""
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = np.maximum(w.sum(axes, keepdims=True), 1)
    mean = (w * x).sum(axes, keepdims=True) / n
    var = (w * (x - mean) ** 2).sum(axes, keepdims=True) / n
    return mean, var


def _per_feature(v, ndim, feature_axes):
    """A feature-shaped array made broadcastable against rank ``ndim``."""
    shape = [1] * ndim
    v = np.asarray(v, np.float64)
    for a, s in zip(feature_axes, v.shape, strict=True):
        shape[a] = s
    return v.reshape(shape)


def layer_norm(x, scale=None, bias=None, reduction_axes=-1, feature_axes=-1, eps=1e-6, mask=None):
    x = np.asarray(x, np.float64)
    red = axes_of(x.ndim, reduction_axes)
    fa = axes_of(x.ndim, feature_axes)
    mean, var = _masked_moments(x, red, mask)
    return _scale_shift((x - mean) / np.sqrt(var + eps), scale, bias, fa)


def rms_norm(x, scale=None, reduction_axes=-1, feature_axes=-1, eps=1e-6, mask=None):
    x = np.asarray(x, np.float64)
    red = axes_of(x.ndim, reduction_axes)
    fa = axes_of(x.ndim, feature_axes)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    ms = (w * x * x).sum(red, keepdims=True) / np.maximum(w.sum(red, keepdims=True), 1)
    return _scale_shift(x / np.sqrt(ms + eps), scale, None, fa)


def group_norm(
    x, num_groups, scale=None, bias=None, feature_axis=-1, reduction_axes=None, eps=1e-6, mask=None
):
    """Loops over the groups: each slice of channels is normalized over reduction_axes."""
    x = np.asarray(x, np.float64)
    c = feature_axis % x.ndim
    red = tuple(range(1, x.ndim)) if reduction_axes is None else axes_of(x.ndim, reduction_axes)
    m = None if mask is None else np.broadcast_to(mask, x.shape)
    size = x.shape[c] // num_groups
    y = np.empty_like(x)
    for g in range(num_groups):
        sl = [slice(None)] * x.ndim
        sl[c] = slice(g * size, (g + 1) * size)
        sl = tuple(sl)
        mean, var = _masked_moments(x[sl], red, None if m is None else m[sl])
        y[sl] = (x[sl] - mean) / np.sqrt(var + eps)
    return _scale_shift(y, scale, bias, (c,))


def instance_stats(x, feature_axes=-1):
    """Per-instance mean and biased variance, shape [batch, *features], float64."""
    x = np.asarray(x, np.float64)
    fa = axes_of(x.ndim, feature_axes)
    red = tuple(i for i in range(1, x.ndim) if i not in fa)
    return x.mean(red), x.var(red), int(np.prod([x.shape[i] for i in red]))


def instance_norm(x, scale=None, bias=None, feature_axes=-1, eps=1e-6):
    """Loops over the examples: each is normalized per channel over its other axes."""
    x = np.asarray(x, np.float64)
    fa = axes_of(x.ndim, feature_axes)
    y = np.stack(
        [bn_train(x[n][None], axis=tuple(a for a in fa), eps=eps)[0] for n in range(x.shape[0])]
    )
    return _scale_shift(y, scale, bias, fa)


def batch_renorm_train(x, run_mean, run_var, rmax, dmax, scale=None, bias=None, axis=-1, eps=1e-5):
    """Batch Renormalization's training output (Ioffe 2017, algorithm 1), float64."""
    x = np.asarray(x, np.float64)
    fa = axes_of(x.ndim, axis)
    red = tuple(i for i in range(x.ndim) if i not in fa)
    mean, var, _ = bn_stats(x, axis)
    sigma_b = np.sqrt(var + eps)
    sigma = np.sqrt(np.asarray(run_var, np.float64) + eps)
    r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
    d = np.clip((mean - np.asarray(run_mean, np.float64)) / sigma, -dmax, dmax)
    y = (x - np.expand_dims(mean, red)) / np.expand_dims(sigma_b, red)
    y = y * np.expand_dims(r, red) + np.expand_dims(d, red)
    return _scale_shift(y, scale, bias, fa), r, d


def torch_bn_train_step(
    x, running_mean, running_var, weight, bias, *, momentum=0.1, eps=1e-5, num_batches=0
):
    """PyTorch's documented training-mode BatchNorm on channels-first input, float64.

    Normalizes with the biased batch variance; the running variance tracks the
    unbiased one; ``momentum`` weighs the *new* batch (``None``: cumulative
    average with factor ``1 / num_batches_tracked``). Returns
    ``(y, new_running_mean, new_running_var, num_batches + 1)``.
    """
    mean, var, n = bn_stats(x, axis=1)
    y = bn_train(x, weight, bias, axis=1, eps=eps)
    factor = 1.0 / (num_batches + 1) if momentum is None else momentum
    unbiased = var * n / (n - 1)
    new_mean = (1 - factor) * np.asarray(running_mean, np.float64) + factor * mean
    new_var = (1 - factor) * np.asarray(running_var, np.float64) + factor * unbiased
    return y, new_mean, new_var, num_batches + 1


def ghost_batch_norm(x, virtual_batch_size, scale=None, bias=None, axis=-1, eps=1e-5):
    """GhostBatchNorm's training output: BatchNorm on each contiguous chunk of the batch.

    Returns ``(y, mean, var)`` with the chunk statistics averaged (equal weights:
    every chunk has the same number of elements), float64.
    """
    x = np.asarray(x, np.float64)
    chunks = [x[i : i + virtual_batch_size] for i in range(0, x.shape[0], virtual_batch_size)]
    y = np.concatenate([bn_train(c, scale, bias, axis, eps) for c in chunks])
    stats = [bn_stats(c, axis) for c in chunks]
    return y, np.mean([m for m, _, _ in stats], 0), np.mean([v for _, v, _ in stats], 0)


def sequence_batch_norm(x, scale=None, bias=None, eps=1e-5):
    """SequenceBatchNorm's training output on ``[batch, time, features]``: BatchNorm of
    each time step on its own. Returns ``(y, mean, var)`` with ``[time, features]``
    statistics, float64."""
    x = np.asarray(x, np.float64)
    steps = range(x.shape[1])
    y = np.stack([bn_train(x[:, t], scale, bias, eps=eps) for t in steps], 1)
    stats = [bn_stats(x[:, t]) for t in steps]
    return y, np.stack([m for m, _, _ in stats]), np.stack([v for _, v, _ in stats])


def plain_bn(x, scale=None, bias=None, *, axis=-1, mask=None, eps=1e-5):
    """Training-mode BatchNorm as a textbook two-pass formula in ``jax.numpy``, for
    ``jax.grad``, ``jax.jvp`` and ``jax.hessian`` references (no bn_jax code)."""
    fa = axes_of(x.ndim, axis)
    red = tuple(i for i in range(x.ndim) if i not in fa)
    w = jnp.ones(x.shape) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    n = jnp.maximum(jnp.sum(w, red, keepdims=True), 1)
    mean = jnp.sum(w * x, red, keepdims=True) / n
    var = jnp.sum(w * (x - mean) ** 2, red, keepdims=True) / n
    y = (x - mean) / jnp.sqrt(var + eps)
    shape = [x.shape[i] if i in fa else 1 for i in range(x.ndim)]
    if scale is not None:
        y = y * scale.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y
