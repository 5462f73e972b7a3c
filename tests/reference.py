"""Independent float64 NumPy references. Nothing here imports bn_jax."""

from __future__ import annotations

import numpy as np


def feature_axes(ndim: int, axis) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def bn_stats(x, axis=-1, mask=None):
    """Batch mean, biased variance and count per feature, float64, feature-shaped."""
    x = np.asarray(x, np.float64)
    fa = feature_axes(x.ndim, axis)
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
    fa = feature_axes(x.ndim, axis)
    red = tuple(i for i in range(x.ndim) if i not in fa)
    mean, var, _ = bn_stats(x, axis, mask)
    y = (x - np.expand_dims(mean, red)) / np.sqrt(np.expand_dims(var, red) + eps)
    if scale is not None:
        y = y * np.expand_dims(np.asarray(scale, np.float64), red)
    if bias is not None:
        y = y + np.expand_dims(np.asarray(bias, np.float64), red)
    return y


def bn_eval(x, mean, var, scale=None, bias=None, axis=-1, eps=1e-5):
    x = np.asarray(x, np.float64)
    fa = feature_axes(x.ndim, axis)
    red = tuple(i for i in range(x.ndim) if i not in fa)
    y = (x - np.expand_dims(mean, red)) / np.sqrt(np.expand_dims(var, red) + eps)
    if scale is not None:
        y = y * np.expand_dims(np.asarray(scale, np.float64), red)
    if bias is not None:
        y = y + np.expand_dims(np.asarray(bias, np.float64), red)
    return y


def ema(old, new, momentum):
    return momentum * np.asarray(old, np.float64) + (1 - momentum) * np.asarray(new, np.float64)
