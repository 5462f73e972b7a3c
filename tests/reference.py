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


def masked_moments(x, axes, mask=None):
    """Mean, biased variance and count over ``axes`` (keepdims), float64, valid
    elements only; a group with no valid element has mean 0, variance 1 (it is
    passed through, not amplified by ``1 / sqrt(eps)``), count 0."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = w.sum(tuple(axes), keepdims=True)
    safe = np.maximum(n, 1)
    valid = w > 0  # an excluded element never enters, even when it is NaN
    mean = np.where(valid, x, 0.0).sum(tuple(axes), keepdims=True) / safe
    var = np.where(valid, (x - mean) ** 2, 0.0).sum(tuple(axes), keepdims=True) / safe
    return mean, np.where(n > 0, var, 1.0), n


def _masked_moments(x, axes, mask):
    """Mean and biased variance over ``axes`` (keepdims), float64, valid elements only."""
    mean, var, _ = masked_moments(x, axes, mask)
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
    n = w.sum(red, keepdims=True)
    ms = np.where(n > 0, (w * x * x).sum(red, keepdims=True) / np.maximum(n, 1), 1.0)
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


# --- training steps over explicit axes ---------------------------------------
#
# Each takes float64 arrays in the layout of the whole (possibly multi-device)
# batch: under ``vmap(..., axis_name=...)`` the caller stacks the devices along
# a leading axis and names that axis among the reduced (or batch) axes.


def running_update(old_mean, old_var, old_count, mean, var, n, momentum, unbiased=False):
    """Running statistics after one batch with per-feature ``mean``, biased ``var``
    and count ``n`` (Flax momentum; None: cumulative average with ``old_count``).
    A feature with no valid element keeps its statistics. Returns
    ``(mean, var, count)`` (``count`` is None unless ``momentum`` is None)."""
    old_mean, old_var, mean, var, n = (
        np.asarray(v, np.float64) for v in (old_mean, old_var, mean, var, n)
    )
    if unbiased:
        var = var * n / np.maximum(n - 1, 1)
    ok = n > 0
    if momentum is None:
        old_count = np.asarray(old_count)
        w = 1.0 / (old_count + 1)
        count = np.where(ok, old_count + 1, old_count)
    else:
        w, count = 1.0 - momentum, None
    new_mean = np.where(ok, (1 - w) * old_mean + w * mean, old_mean)
    new_var = np.where(ok, (1 - w) * old_var + w * var, old_var)
    return new_mean, new_var, count


def standardize(x, axes, mask=None, eps=1e-5):
    """``(x - mean) / sqrt(var + eps)`` with keepdims statistics over ``axes`` of the
    valid elements (every element is normalized); returns ``(x_hat, mean, var, n)``."""
    x = np.asarray(x, np.float64)
    mean, var, n = masked_moments(x, axes, mask)
    return (x - mean) / np.sqrt(var + eps), mean, var, n


def batch_norm_step(x, scale, bias, state, *, axis, eps, momentum, mask=None, unbiased=False):
    """Training-mode BatchNorm: ``(y, new_state)``; ``state`` holds ``mean``, ``var``
    (and ``count``), feature-shaped; every non-feature axis is reduced."""
    fa = axes_of(np.ndim(x), axis)
    red = tuple(i for i in range(np.ndim(x)) if i not in fa)
    x_hat, mean, var, n = standardize(x, red, mask, eps)
    y = _scale_shift(x_hat, scale, bias, fa)
    return y, _new_state(
        state, mean.squeeze(red), var.squeeze(red), n.squeeze(red), momentum, unbiased
    )


def _new_state(state, mean, var, n, momentum, unbiased):
    new = dict(state)
    new["mean"], new["var"], count = running_update(
        state["mean"], state["var"], state.get("count"), mean, var, n, momentum, unbiased
    )
    if count is not None:
        new["count"] = count
    return new


def batch_renorm_step(
    x, scale, bias, state, *, axis, eps, momentum, rmax, dmax, mask=None, unbiased=False, rd=None
):
    """Training-mode Batch Renormalization (Ioffe 2017, algorithm 1): ``(y, new_state,
    (r, d))``. ``rd`` fixes ``r`` and ``d`` (they carry no gradient)."""
    fa = axes_of(np.ndim(x), axis)
    red = tuple(i for i in range(np.ndim(x)) if i not in fa)
    x_hat, mean, var, n = standardize(x, red, mask, eps)
    if rd is None:
        sigma = np.sqrt(_per_feature(state["var"], np.ndim(x), fa) + eps)
        r = np.clip(np.sqrt(var + eps) / sigma, 1 / rmax, rmax)
        d = np.clip((mean - _per_feature(state["mean"], np.ndim(x), fa)) / sigma, -dmax, dmax)
        rd = (r, d)
    y = _scale_shift(x_hat * rd[0] + rd[1], scale, bias, fa)
    new = _new_state(state, mean.squeeze(red), var.squeeze(red), n.squeeze(red), momentum, unbiased)
    new["step"] = np.asarray(state["step"]) + 1
    return y, new, rd


def ghost_batch_norm_step(
    x,
    scale,
    bias,
    state,
    *,
    axis,
    eps,
    momentum,
    virtual_batch_size,
    batch_axis=0,
    mask=None,
    unbiased=False,
):
    """Training-mode Ghost BatchNorm: each run of ``virtual_batch_size`` examples along
    ``batch_axis`` is normalized on its own; the running statistics move towards the
    count-weighted average of the virtual batches' means and variances."""
    x = np.asarray(x, np.float64)
    fa = axes_of(x.ndim, axis)
    k = x.shape[batch_axis] // virtual_batch_size
    split = (*x.shape[:batch_axis], k, virtual_batch_size, *x.shape[batch_axis + 1 :])
    xs = x.reshape(split)
    ms = None if mask is None else np.broadcast_to(mask, x.shape).reshape(split)
    fa_s = tuple(a + (a > batch_axis) for a in fa)
    kept = (*range(batch_axis + 1), *fa_s)  # the devices, the virtual batches, the features
    red = tuple(i for i in range(xs.ndim) if i not in kept)
    x_hat, mean, var, n = standardize(xs, red, ms, eps)
    y = _scale_shift(x_hat.reshape(x.shape), scale, bias, fa)
    if unbiased:
        var = var * n / np.maximum(n - 1, 1)
    groups = tuple(range(batch_axis + 1)) + red
    total = n.sum(groups)
    safe = np.maximum(total, 1)
    avg_mean = (n * mean).sum(groups) / safe
    avg_var = (n * var).sum(groups) / safe
    return y, _new_state(state, avg_mean, avg_var, total, momentum, False)


def sequence_batch_norm_step(
    x, scale, bias, state, *, axis, time_axis, eps, momentum, mask=None, unbiased=False
):
    """Training-mode recurrent BatchNorm (Cooijmans et al. 2016): each step along
    ``time_axis`` is normalized with its own statistics; running slot ``t`` (state
    arrays ``[max_steps, *features]``) moves towards step ``t``'s statistics."""
    x = np.asarray(x, np.float64)
    fa = axes_of(x.ndim, axis)
    kept = (time_axis, *fa)
    red = tuple(i for i in range(x.ndim) if i not in kept)
    x_hat, mean, var, n = standardize(x, red, mask, eps)
    y = _scale_shift(x_hat, scale, bias, fa)
    order = sorted(kept)
    perm = [order.index(a) for a in kept]  # time first, then the features in order
    mean, var, n = (np.transpose(v.squeeze(red), perm) for v in (mean, var, n))
    steps = min(x.shape[time_axis], state["mean"].shape[0])
    new = {name: np.array(v, np.float64) for name, v in state.items()}
    head = {name: v[:steps] for name, v in state.items()}
    upd = _new_state(head, mean[:steps], var[:steps], n[:steps], momentum, unbiased)
    for name in new:
        new[name][:steps] = upd[name]
    return y, new


def instance_norm_step(
    x, scale, bias, state, *, feature_axes, eps, momentum, batch_axis=0, mask=None, unbiased=False
):
    """Instance Normalization in training mode: every example (along ``batch_axis``)
    and feature normalized over the other axes; with running statistics in
    ``state``, they move towards the count-weighted average over the examples of
    the instance means and variances. Returns ``(y, new_state)``."""
    x = np.asarray(x, np.float64)
    fa = axes_of(x.ndim, feature_axes)
    red = tuple(i for i in range(x.ndim) if i != batch_axis and i not in fa)
    x_hat, mean, var, n = standardize(x, red, mask, eps)
    y = _scale_shift(x_hat, scale, bias, fa)
    if not state:
        return y, state
    if unbiased:
        var = var * n / np.maximum(n - 1, 1)
    mean, var, n = (v.squeeze(red) for v in (mean, var, n))
    b = batch_axis - sum(1 for i in red if i < batch_axis)
    total = n.sum(b)
    safe = np.maximum(total, 1)
    avg_mean, avg_var = (n * mean).sum(b) / safe, (n * var).sum(b) / safe
    return y, _new_state(state, avg_mean, avg_var, total, momentum, False)


# --- normalization-activation layers (FRN, EvoNorm) ----------------------------
#
# Written from the papers: Singh & Krishnan 2020 (FRN, TLU) and Liu et al. 2020
# (EvoNorm-B0, -S0). ``example_axes`` are the axes that index examples (the batch
# axis, and a leading device axis when one is stacked in front): per-example
# statistics are never taken over them.


def _weights(x, mask):
    return np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)


def filter_response_norm(
    x, scale=None, bias=None, tau=None, eps_learned=None, *, feature_axes=-1, eps=1e-6,
    example_axes=(0,), mask=None,
):  # fmt: skip
    """FRN + TLU: ``max(x / sqrt(nu2 + eps) * scale + bias, tau)`` with ``nu2`` the mean of
    ``x**2`` over every axis that is neither a feature nor an example axis (valid
    elements only; 1 where there is none), and ``eps + |eps_learned|`` when a learned
    epsilon is given."""
    x = np.asarray(x, np.float64)
    fa = axes_of(x.ndim, feature_axes)
    red = tuple(i for i in range(x.ndim) if i not in fa and i not in example_axes)
    w = _weights(x, mask)
    n = w.sum(red, keepdims=True)
    sq = np.where(w > 0, x * x, 0.0).sum(red, keepdims=True)
    nu2 = np.where(n > 0, sq / np.maximum(n, 1), 1.0)
    if eps_learned is not None:
        eps = eps + np.abs(_per_feature(eps_learned, x.ndim, fa))
    y = _scale_shift(x / np.sqrt(nu2 + eps), scale, bias, fa)
    return y if tau is None else np.maximum(y, _per_feature(tau, x.ndim, fa))


def evo_norm_b0_step(
    x, scale, bias, v, state, *, axis=-1, eps=1e-5, momentum=0.99, example_axes=(0,), mask=None,
    unbiased=False, training=True,
):  # fmt: skip
    """EvoNorm-B0: ``(y, new_state)`` with
    ``y = x / max(sqrt(var_b + eps), v * x + sqrt(var_i + eps)) * scale + bias``;
    ``var_b`` is the batch variance over every non-feature axis (the running ``var``
    when not training), ``var_i`` each example's over the other non-feature axes,
    both over valid elements (1 where there is none). In training ``state["var"]``
    (and ``count``) move towards ``var_b`` as BatchNorm's running variance does."""
    x = np.asarray(x, np.float64)
    fa = axes_of(x.ndim, axis)
    red_b = tuple(i for i in range(x.ndim) if i not in fa)
    red_i = tuple(i for i in red_b if i not in example_axes)
    _, var_i, _ = masked_moments(x, red_i, mask)
    if training:
        mean_b, var_b, n_b = masked_moments(x, red_b, mask)
    else:
        var_b = _per_feature(state["var"], x.ndim, fa)
    right = _per_feature(v, x.ndim, fa) * x + np.sqrt(var_i + eps)
    y = _scale_shift(x / np.maximum(np.sqrt(var_b + eps), right), scale, bias, fa)
    if not training:
        return y, state
    new = dict(state)
    _, new["var"], count = running_update(
        np.zeros(np.shape(state["var"])), state["var"], state.get("count"),
        mean_b.squeeze(red_b), var_b.squeeze(red_b), n_b.squeeze(red_b), momentum, unbiased,
    )  # fmt: skip
    if count is not None:
        new["count"] = count
    return y, new


def evo_norm_s0(
    x, num_groups, scale=None, bias=None, v=None, *, feature_axis=-1, reduction_axes=None,
    eps=1e-5, mask=None,
):  # fmt: skip
    """EvoNorm-S0, looping over the groups of channels: each slice of ``C / G`` channels
    along ``feature_axis`` gives ``x * sigmoid(v * x) / sqrt(var + eps)`` with ``var``
    the variance over ``reduction_axes`` (default: all but axis 0) of its valid
    elements; then ``* scale + bias``."""
    x = np.asarray(x, np.float64)
    c = feature_axis % x.ndim
    red = tuple(range(1, x.ndim)) if reduction_axes is None else axes_of(x.ndim, reduction_axes)
    m = None if mask is None else np.broadcast_to(mask, x.shape)
    size = x.shape[c] // num_groups
    vv = np.ones(x.shape[c]) if v is None else np.asarray(v, np.float64)
    vx = x * _per_feature(vv, x.ndim, (c,))
    y = np.empty_like(x)
    for g in range(num_groups):
        sl = [slice(None)] * x.ndim
        sl[c] = slice(g * size, (g + 1) * size)
        sl = tuple(sl)
        _, var = _masked_moments(x[sl], red, None if m is None else m[sl])
        y[sl] = x[sl] / (1 + np.exp(-vx[sl])) / np.sqrt(var + eps)
    return _scale_shift(y, scale, bias, (c,))
