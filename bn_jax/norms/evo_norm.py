"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, 2020)."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax._core import checks
from bn_jax._core.running import update_running
from bn_jax._core.stats import moments, normalizing_var
from bn_jax.norms._common import (
    Initializer,
    Mask,
    Params,
    State,
    batch_mask,
    broadcastable,
    check_batch_fields,
    check_common_fields,
    check_int,
    check_state_keys,
    check_training,
    check_x,
    checked_mask,
    checked_params,
    feature_shape,
    freeze,
    functional,
    named_params,
    other_axes,
    out_dtype,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvoNormB0:
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

    momentum: float | None = 0.99
    epsilon: float = 1e-5
    axis: int | tuple[int, ...] = -1
    axis_name: Hashable | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = jax.nn.initializers.ones
    bias_init: Initializer = jax.nn.initializers.zeros
    v_init: Initializer = jax.nn.initializers.ones
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_fast_variance: bool = False
    unbiased_running_var: bool = False
    allow_single_value: bool = False
    count_skipped: bool = False

    def __post_init__(self) -> None:
        check_batch_fields(self)

    def _inits(self) -> dict[str, Initializer | None]:
        return {
            "scale": self.scale_init if self.use_scale else None,
            "bias": self.bias_init if self.use_bias else None,
            "v": self.v_init,
        }

    def _state_keys(self) -> tuple[str, ...]:
        keys = ("var",) if self.momentum is not None else ("var", "count")
        return (*keys, "skipped") if self.count_skipped else keys

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)``: ``scale``, ``bias``, ``v`` and the running ``var``
        (1), plus the ``count`` / ``skipped`` counters in use."""
        shape = feature_shape(features, self.axis, "EvoNormB0")
        dt = checks.stat_dtype(self.param_dtype)
        state = {k: jnp.zeros(shape, jnp.int32) for k in self._state_keys()}
        state["var"] = jnp.ones(shape, dt)
        return named_params(self._inits(), shape, key, self.param_dtype), state

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Training: the batch variance, and the running variance updated; evaluation: the
        running variance, state unchanged. See :meth:`Normalizer.apply`.

        Raises:
          ValueError: also for an ``axis`` that includes the batch axis 0 and,
            unless ``allow_single_value``, a single value per feature in training.
        """
        training, x = check_training(training, "EvoNormB0"), check_x(x)
        feature_axes = checks.resolve_axes(self.axis, x.ndim)
        if 0 in feature_axes:
            raise ValueError(
                f"EvoNormB0: axis={self.axis!r} includes axis 0, the batch axis (the "
                f"per-example variance is taken over the other axes); put the batch first."
            )
        check_state_keys(state, self._state_keys(), "EvoNormB0")
        p = checked_params(
            self, self._inits(), params, x, feature_axes, "axis", running={"var": state["var"]}
        )
        dt = checks.stat_dtype(x.dtype)
        if training:
            batch_axes = other_axes(x.ndim, feature_axes)
            mask = batch_mask(self, x.shape, batch_axes, mask)
            batch = moments(
                x,
                batch_axes,
                mask,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                fast_variance=self.use_fast_variance,
            )
            var_b = normalizing_var(batch, mask)
        else:
            mask = checks.check_mask(mask, x.shape)
            var_b = broadcastable(state["var"], x.ndim, feature_axes).astype(dt)
        # The example's own variance over the spatial axes: never across devices
        # (axis_name splits the batch here, not the examples).
        inst = moments(
            x,
            other_axes(x.ndim, feature_axes, first=1),
            mask,
            fast_variance=self.use_fast_variance,
        )
        var_i = normalizing_var(inst, mask)
        xf = x.astype(dt)
        right = p["v"].astype(dt) * xf + jnp.sqrt(var_i + self.epsilon)
        y = xf / jnp.maximum(jnp.sqrt(var_b + self.epsilon), right)
        if p["scale"] is not None:
            y = y * p["scale"].astype(dt)
        if p["bias"] is not None:
            y = y + p["bias"].astype(dt)
        y = y.astype(out_dtype(self, x))
        if not training:
            return y, state
        shape = state["var"].shape
        mean, var, count = (v.reshape(shape) for v in (batch.mean, batch.var, batch.count))
        # The core's update (guard, cumulative average, skip counter) reads a
        # running mean: B0 keeps none, so it gets a placeholder and drops it.
        new = update_running(
            {**state, "mean": jnp.zeros_like(state["var"])},
            mean,
            var,
            count,
            momentum=self.momentum,
            unbiased=self.unbiased_running_var,
        )
        del new["mean"]
        return y, new


evo_norm_b0 = functional(
    EvoNormB0,
    "evo_norm_b0",
    "y, state = bn_jax.evo_norm_b0(params, state, x, training=True, momentum=0.9)",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvoNormS0:
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
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = jax.nn.initializers.ones
    bias_init: Initializer = jax.nn.initializers.zeros
    v_init: Initializer = jax.nn.initializers.ones
    feature_axis: int = -1
    axis_name: Hashable | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    use_fast_variance: bool = False

    def __post_init__(self) -> None:
        if (self.num_groups is None) == (self.group_size is None):
            raise ValueError(
                f"EvoNormS0 needs exactly one of num_groups and group_size, got "
                f"num_groups={self.num_groups!r} and group_size={self.group_size!r}; to give "
                f"group_size, pass num_groups=None as well (num_groups defaults to 32)."
            )
        for name in ("num_groups", "group_size"):
            if getattr(self, name) is not None:
                freeze(self, **{name: check_int(name, getattr(self, name), positive=True)})
        freeze(self, feature_axis=check_int("feature_axis", self.feature_axis))
        check_common_fields(self)

    def _inits(self) -> dict[str, Initializer | None]:
        return {
            "scale": self.scale_init if self.use_scale else None,
            "bias": self.bias_init if self.use_bias else None,
            "v": self.v_init,
        }

    def _groups(self, channels: int) -> int:
        """Number of groups for ``channels``, or a ValueError that says what divides."""
        if self.group_size is not None:
            arg, divisor = f"group_size={self.group_size}", self.group_size
        else:
            arg, divisor = f"num_groups={self.num_groups}", self.num_groups
        if channels % divisor:
            raise ValueError(
                f"EvoNormS0: {arg} does not divide the {channels} channels along "
                f"feature_axis={self.feature_axis}; pick a divisor of {channels}."
            )
        return self.num_groups if self.group_size is None else channels // self.group_size

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, {})`` for ``features`` channels (an int or an example input)."""
        (channels,) = feature_shape(features, self.feature_axis, "EvoNormS0", "feature_axis")
        self._groups(channels)
        return named_params(self._inits(), (channels,), key, self.param_dtype), {}

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Applies S0 to each example; ``state`` (``{}``) is returned unchanged and
        ``training`` has no effect. See :meth:`Normalizer.apply`.

        Raises:
          ValueError: also for channels not divisible into groups, or a
            ``feature_axis`` that is the batch axis 0.
        """
        check_training(training, "EvoNormS0")
        x = check_x(x)
        (c,) = checks.resolve_axes(self.feature_axis, x.ndim, "feature_axis")
        if c == 0:
            raise ValueError(
                f"EvoNormS0: feature_axis={self.feature_axis} is axis 0, the batch axis; put "
                f"the batch first."
            )
        p = checked_params(self, self._inits(), params, x, (c,), "feature_axis")
        channels = x.shape[c]
        groups = self._groups(channels)
        mask, _ = checked_mask(self, x.shape, mask)
        # GroupNorm's grouping: the channel axis c split into (groups, channels
        # per group) at c, c + 1; statistics over every axis but 0 and c.
        split = (*x.shape[:c], groups, channels // groups, *x.shape[c + 1 :])
        xs = x.reshape(split)
        if mask is not None:
            mask = jnp.broadcast_to(mask, x.shape).reshape(split)
        m = moments(
            xs,
            tuple(a for a in range(1, xs.ndim) if a != c),
            mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            fast_variance=self.use_fast_variance,
        )
        dt = m.mean.dtype
        inv = lax.rsqrt(normalizing_var(m, mask) + self.epsilon)
        xf = xs.astype(dt)
        y = xf * jax.nn.sigmoid(_grouped(p["v"], split, c).astype(dt) * xf) * inv
        if p["scale"] is not None:
            y = y * _grouped(p["scale"], split, c).astype(dt)
        if p["bias"] is not None:
            y = y + _grouped(p["bias"], split, c).astype(dt)
        return y.astype(out_dtype(self, x)).reshape(x.shape), state


def _grouped(v: jax.Array, split: tuple[int, ...], c: int) -> jax.Array:
    """A per-channel array broadcastable against ``x`` reshaped to ``split``."""
    shape = [1] * len(split)
    shape[c], shape[c + 1] = split[c], split[c + 1]
    return v.reshape(shape)


evo_norm_s0 = functional(
    EvoNormS0,
    "evo_norm_s0",
    "y, _ = bn_jax.evo_norm_s0(params, {}, x, training=True, num_groups=8)",
)
