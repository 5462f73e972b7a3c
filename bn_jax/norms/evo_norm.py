"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, 2020)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax._core import checks
from bn_jax._core.normalize import StatsConfig
from bn_jax._core.running import update_running
from bn_jax._core.stats import moments, normalizing_var
from bn_jax.norms import _common
from bn_jax.norms._common import Initializer, Mask, Params, Signature, State


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvoNormB0(_common.BatchFields):
    r"""EvoNorm-B0: a batch-dependent normalization-activation layer found by search.

    For features ``c`` (along ``axis``), with ``x``'s batch axis first::

        var_b = var(x)                     # over every axis but the features (the batch)
        var_i = var(x[n])                  # per example, over the spatial axes
        y = x / max(sqrt(var_b + epsilon), v * x + sqrt(var_i + epsilon)) * scale + bias

    The batch variance is BatchNorm's: across the devices of ``axis_name``,
    with masks, and tracked as a running variance (Flax's momentum
    convention) that evaluation uses in place of ``var_b``; ``var_i`` is the
    example's own at every call. ``v`` is a learned per-channel parameter:
    where ``v * x`` is large the layer divides by it, which acts as the
    layer's non-linearity (no activation follows it in the paper's networks).

    When to use it: in place of a BatchNorm-ReLU pair in convolutional
    networks; the paper reports it ahead of BN-ReLU on ImageNet classifiers
    and in GAN training.

    Args:
      momentum: weight of the old running variance (Flax convention), in
        ``[0, 1]``; ``None`` keeps the cumulative average (a per-feature
        ``count`` joins the state). timm's ``momentum=0.1`` is 0.9 here.
      epsilon: added to both variances inside the square roots; must be
        positive (timm's default for B0 is 1e-3).
      axis: the feature axis or axes (``-1`` for NHWC, ``1`` for NCHW); may
        not include the batch axis 0.
      axis_name: a mapped axis whose devices share the batch variance, as in
        :class:`BatchNorm` (one collective).
      axis_index_groups: share it within these groups of devices only.
      use_scale, use_bias: learn ``scale`` / ``bias`` (absent from params
        when False).
      scale_init, bias_init, v_init: Flax-style initializers; defaults 1, 0, 1.
      dtype: output dtype; ``None`` keeps the input's. Statistics are reduced
        in at least float32.
      param_dtype: dtype of the parameters; the running variance is float32,
        or ``param_dtype`` if wider.
      use_fast_variance: ``E[x^2] - E[x]^2`` for both variances instead of the
        shifted formula.
      unbiased_running_var: the running variance tracks ``n / (n - 1)`` times
        the batch variance, ``n`` counted over every device (timm's and
        PyTorch's convention).
      allow_single_value: train on a batch with one value per feature
        instead of raising.
      count_skipped: add an int32 ``skipped`` to the state that counts, per
        feature, the steps whose batch statistics were not finite.

    Conventions:
      * The state is ``{"var"}`` (timm's ``running_var``): there is no running
        mean, since B0 never subtracts one. It starts at 1, so evaluation
        before any training step uses ``sqrt(1 + epsilon)``.
      * ``momentum=0.99`` here is PyTorch's and timm's ``momentum=0.01``.
      * A channel whose batch statistics are not finite, or that has no
        valid element under ``mask``, keeps its running variance; the output
        still shows the NaN.
      * ``mask`` applies to both variances (in evaluation to ``var_i``).
      * Training on a batch with a single value per feature is an error, as
        for :class:`BatchNorm`; ``allow_single_value=True`` computes it
        (``var_b`` is 0).

    Example::

        norm = bn_jax.EvoNormB0(momentum=0.9)
        params, state = norm.init(64)       # {"scale", "bias", "v"}, {"var"}
        y, state = norm.apply(params, state, x, training=True)   # x: [N, H, W, 64]
        y_eval, _ = norm.apply(params, state, x, training=False)

    Reference: H. Liu, A. Brock, K. Simonyan and Q. V. Le, "Evolving
    Normalization-Activation Layers", NeurIPS 2020.
    """

    v_init: Initializer = jax.nn.initializers.ones

    def __post_init__(self) -> None:
        _common.check_batch_fields(self)

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``: ``scale``, ``bias``, ``v`` and the running ``var``
        (1), plus the ``count`` / ``skipped`` counters in use."""
        shape = _common.feature_shape(features, self.axis, "EvoNormB0")
        state = {k: jnp.zeros(shape, jnp.int32) for k in _b0_state_keys(self)}
        state["var"] = jnp.ones(shape, checks.stat_dtype(self.param_dtype))
        params = _common.init_params(
            shape,
            key,
            self.param_dtype,
            **_common.affine_inits(self),
            v=self.v_init,
        )
        return params, state

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Training: the batch variance, and the running variance updated; evaluation: the
        running variance, state unchanged. See :meth:`Normalizer.apply`.

        Raises:
          ValueError: also for an ``axis`` that includes the batch axis 0 and,
            unless ``allow_single_value``, a single value per feature in training.
          TypeError: also for complex input.
        """
        x, mask, sig = _common.check_call(
            self, params, state, x, mask, training, sync_in_eval=False
        )
        pshape, instance_axes, cfg = _b0_layout(self, sig)
        dt = checks.stat_dtype(x.dtype)
        if training:
            batch = cfg.moments(x, mask)
            var_b = normalizing_var(batch, mask)
        else:
            var_b = state["var"].reshape(pshape).astype(dt)
        # The example's own variance over the spatial axes: never across devices
        # (axis_name splits the batch here, not the examples).
        inst = moments(x, instance_axes, mask, fast_variance=self.use_fast_variance)
        var_i = normalizing_var(inst, mask)
        xf = x.astype(dt)
        right = params["v"].reshape(pshape).astype(dt) * xf + jnp.sqrt(var_i + self.epsilon)
        y = xf / jnp.maximum(jnp.sqrt(var_b + self.epsilon), right)
        if self.use_scale:
            y = y * params["scale"].reshape(pshape).astype(dt)
        if self.use_bias:
            y = y + params["bias"].reshape(pshape).astype(dt)
        y = y.astype(cfg.out_dtype)
        if not training:
            return y, state
        # The core's update (guard, cumulative average, skip counter) reads a
        # running mean: B0 keeps none, so it gets a placeholder and drops it.
        new = update_running(
            {**state, "mean": jnp.zeros_like(state["var"])},
            batch.mean,
            batch.m2 / jnp.maximum(batch.count, 1),
            batch.count,
            momentum=self.momentum,
            unbiased=self.unbiased_running_var,
        )
        del new["mean"]
        return y, new


def _b0_state_keys(norm: EvoNormB0) -> tuple[str, ...]:
    keys = ("var",) if norm.momentum is not None else ("var", "count")
    return (*keys, "skipped") if norm.count_skipped else keys


@functools.lru_cache(maxsize=256)
def _b0_layout(
    norm: EvoNormB0, sig: Signature
) -> tuple[tuple[int, ...], tuple[int, ...], StatsConfig]:
    """The features' broadcast shape, the per-example (spatial) axes and the batch
    statistics' configuration, checked once."""
    layer = "EvoNormB0"
    feature_axes = checks.resolve_axes(norm.axis, sig.ndim)
    if 0 in feature_axes:
        raise ValueError(
            f"{layer}: axis={norm.axis!r} includes axis 0, the batch axis (the per-example "
            f"variance is taken over the other axes); put the batch first."
        )
    _common.check_real(layer, sig)
    _common.check_state_keys(layer, sig.state, _b0_state_keys(norm))
    used = [n for n, use in (("scale", norm.use_scale), ("bias", norm.use_bias)) if use]
    features = _common.check_features(
        layer, sig, feature_axes, [*used, "v"], ("var",), axis_arg="axis", axis=norm.axis
    )
    batch_axes = _common.other_axes(sig.ndim, feature_axes)
    _common.check_batch_values(norm, layer, sig, batch_axes)
    pshape = _common.broadcast_shape(sig.ndim, feature_axes, features)
    instance_axes = _common.other_axes(sig.ndim, feature_axes, first=1)
    return pshape, instance_axes, _common.stats_config(norm, batch_axes, sig)


evo_norm_b0 = _common.functional(
    EvoNormB0,
    "evo_norm_b0",
    "y, state = bn_jax.evo_norm_b0(params, state, x, training=True, momentum=0.9)",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvoNormS0(_common.NormFields):
    r"""EvoNorm-S0: a batch-independent normalization-activation layer found by search.

    The ``C`` channels along ``feature_axis`` are split into ``G`` contiguous
    groups of ``C / G``; for every example ``n`` and group ``g``::

        std_g = sqrt(var(x[n, ..., channels of g]) + epsilon)   # over space and the group
        y = x * sigmoid(v * x) / std_g * scale + bias

    ``x * sigmoid(v * x)`` is the SiLU (swish) with a learned per-channel
    slope ``v``, divided by GroupNorm's group standard deviation; ``x`` is not
    centered. No running statistics: ``state`` is ``{}``; ``training`` is
    accepted and ignored.

    When to use it: convolutional networks with small or variable batches,
    in place of a GroupNorm-activation pair; the paper reports S0 ahead of
    BN-ReLU and GN-ReLU at small batch sizes.

    Args:
      num_groups: number of groups ``G`` (32, as GroupNorm and timm); pass
        ``num_groups=None`` to give ``group_size`` instead. Exactly one of
        the two is set.
      group_size: channels per group.
      epsilon: added to the group variance inside the square root; must be
        positive (timm's default 1e-5).
      dtype, param_dtype, use_scale, use_bias, scale_init, bias_init: as in
        :class:`GroupNorm`.
      v_init: Flax-style initializer of ``v`` (ones).
      feature_axis: the channel axis that is grouped (default ``-1``; ``1``
        for NCHW); not the batch axis 0. The statistics are over every axis
        except 0, restricted to each group along ``feature_axis``.
      axis_name: a mapped axis over which the spatial axes are split (spatial
        parallelism), as for :class:`GroupNorm`. Not needed for data
        parallelism.
      axis_index_groups: merge within these groups of devices only.
      use_fast_variance: ``E[x^2] - E[x]^2`` instead of the shifted formula.

    Example::

        norm = bn_jax.EvoNormS0(num_groups=8)
        params, state = norm.init(64)       # {"scale", "bias", "v"}, {}
        y, _ = norm.apply(params, state, x, training=True)   # x: [N, H, W, 64]

    Reference: H. Liu, A. Brock, K. Simonyan and Q. V. Le, "Evolving
    Normalization-Activation Layers", NeurIPS 2020.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-5
    v_init: Initializer = jax.nn.initializers.ones
    feature_axis: int = -1
    use_fast_variance: bool = False

    def __post_init__(self) -> None:
        num_groups, group_size = _common.check_groups("EvoNormS0", self.num_groups, self.group_size)
        _common.freeze(self, num_groups=num_groups, group_size=group_size)
        _common.freeze(self, feature_axis=_common.check_int("feature_axis", self.feature_axis))
        _common.check_common(self)

    def _groups(self, channels: int) -> int:
        return _common.group_count(
            "EvoNormS0", channels, self.num_groups, self.group_size, self.feature_axis
        )

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, {})`` for ``features`` channels (an int or an example input)."""
        (channels,) = _common.feature_shape(
            features, self.feature_axis, "EvoNormS0", "feature_axis"
        )
        self._groups(channels)
        params = _common.init_params(
            (channels,),
            key,
            self.param_dtype,
            **_common.affine_inits(self),
            v=self.v_init,
        )
        return params, {}

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Applies S0 to each example; ``state`` (``{}``) is returned unchanged and
        ``training`` has no effect. See :meth:`Normalizer.apply`.

        Raises:
          ValueError: also for channels not divisible into groups, or a
            ``feature_axis`` that is the batch axis 0.
          TypeError: also for complex input.
        """
        x, mask, sig = _common.check_call(self, params, state, x, mask, training)
        split, pshape, cfg = _s0_layout(self, sig)
        xs = x.reshape(split)
        if mask is not None:
            mask = jnp.broadcast_to(mask, x.shape).reshape(split)
        m = cfg.moments(xs, mask)
        dt = m.mean.dtype
        inv = lax.rsqrt(normalizing_var(m, mask) + self.epsilon)
        xf = xs.astype(dt)
        y = xf * jax.nn.sigmoid(params["v"].reshape(pshape).astype(dt) * xf) * inv
        if self.use_scale:
            y = y * params["scale"].reshape(pshape).astype(dt)
        if self.use_bias:
            y = y + params["bias"].reshape(pshape).astype(dt)
        return y.astype(cfg.out_dtype).reshape(x.shape), state


@functools.lru_cache(maxsize=256)
def _s0_layout(
    norm: EvoNormS0, sig: Signature
) -> tuple[tuple[int, ...], tuple[int, ...], StatsConfig]:
    """GroupNorm's grouping: the channel axis ``c`` split into (groups, channels per
    group) at ``c, c + 1``, statistics over every axis but 0 and ``c``; returns the
    split shape, the parameters' broadcast shape against it and the statistics'
    configuration, checked once."""
    layer = "EvoNormS0"
    (c,) = checks.resolve_axes(norm.feature_axis, sig.ndim, "feature_axis")
    if c == 0:
        raise ValueError(
            f"{layer}: feature_axis={norm.feature_axis} is axis 0, the batch axis; put the "
            f"batch first."
        )
    _common.check_real(layer, sig)
    used = [n for n, use in (("scale", norm.use_scale), ("bias", norm.use_bias)) if use]
    _common.check_features(
        layer, sig, (c,), [*used, "v"], axis_arg="feature_axis", axis=norm.feature_axis
    )
    channels = sig.shape[c]
    groups = norm._groups(channels)
    split = (*sig.shape[:c], groups, channels // groups, *sig.shape[c + 1 :])
    pshape = [1] * len(split)
    pshape[c], pshape[c + 1] = groups, channels // groups
    axes = tuple(a for a in range(1, len(split)) if a != c)
    return split, tuple(pshape), _common.stats_config(norm, axes, sig)


evo_norm_s0 = _common.functional(
    EvoNormS0,
    "evo_norm_s0",
    "y, _ = bn_jax.evo_norm_s0(params, {}, x, training=True, num_groups=8)",
)
