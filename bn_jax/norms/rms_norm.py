"""Root Mean Square Layer Normalization (Zhang & Sennrich, 2019)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax._core import checks
from bn_jax._core.memory_efficient import rms_norm_saving_output
from bn_jax._core.normalize import StatsConfig
from bn_jax._core.stats import group_sum
from bn_jax.norms._common import (
    Initializer,
    Mask,
    Params,
    State,
    check_example_call,
    check_example_fields,
    feature_shape,
    functional,
    init_params,
    out_dtype,
)


def rms_normalize(
    x: jax.Array,
    scale: jax.Array | None,
    mask: jax.Array | None,
    *,
    axes: tuple[int, ...],
    epsilon: float,
    out_dtype: Any,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> jax.Array:
    """``x * rsqrt(mean(x**2) + epsilon) * scale`` with the mean over ``axes``.

    Reduced in at least float32; with ``mask`` only True elements enter the
    mean; with ``axis_name`` the sum of squares and the count are summed over
    the devices in one collective. Differentiated by JAX (the formula is
    already one reduction and one elementwise pass each way).
    """
    dt = checks.stat_dtype(x.dtype)
    xf = x.astype(dt)
    sq = xf * xf
    if mask is None:
        ss = jnp.sum(sq, axes, keepdims=True)
        n = jnp.asarray(math.prod(x.shape[a] for a in axes), dt)
    else:
        mask = jnp.broadcast_to(mask, x.shape)
        ss = jnp.sum(jnp.where(mask, sq, 0), axes, keepdims=True)
        n = jnp.sum(mask, axes, keepdims=True, dtype=dt)
    if axis_name is not None:
        n = jnp.broadcast_to(n, ss.shape)
        ss, n = group_sum(jnp.stack([ss, n]), axis_name, axis_index_groups)
    # A row with no valid element is passed through (mean square 1), not amplified.
    ms = ss / n if mask is None else jnp.where(n > 0, ss / jnp.maximum(n, 1), 1.0)
    y = xf * lax.rsqrt(ms + epsilon)
    if scale is not None:
        y = y * scale.astype(dt)
    return y.astype(out_dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMSNorm:
    r"""RMS normalization: rescale each example by its root mean square, no centering.

    For every example (every position outside ``reduction_axes``)::

        y = x / sqrt(mean(x**2) + epsilon) * scale     # mean over reduction_axes

    There is no mean subtraction and no bias. No running statistics: ``state``
    is ``{}``; ``training`` is accepted and ignored.

    When to use it: transformers (LLaMA, T5, Gemma use it in place of
    LayerNorm): cheaper than LayerNorm (one reduction, no centering) and, in
    Zhang & Sennrich's experiments, as accurate.

    Args:
      epsilon: added to the mean square; must be positive (Flax's default
        1e-6).
      dtype: output dtype; ``None`` keeps the input's. The mean square is
        reduced in at least float32.
      param_dtype: dtype of ``scale``.
      use_scale, scale_init: learn ``scale`` (absent from params when False).
      reduction_axes: axes the mean square is taken over (default ``-1``).
      feature_axes: axes of ``scale`` (default ``-1``).
      axis_name: a mapped axis over which the reduced axes are split
        (model/sequence parallelism), as in ``flax.linen.RMSNorm``.
      axis_index_groups: merge within these groups of devices only.
      memory_efficient: compute the backward pass from the output ``y`` and
        the per-row statistics, so that training does not keep ``x`` (the
        matmul after a transformer's norm keeps ``y`` anyway). Same outputs,
        gradients equal to float rounding; reverse mode only (``jax.jvp``
        raises). See the memory-efficient page of the docs.

    Example::

        norm = bn_jax.RMSNorm()
        params, state = norm.init(512)               # {"scale": [512]}, {}
        y, _ = norm.apply(params, state, x, training=True)

    Reference: B. Zhang and R. Sennrich, "Root Mean Square Layer
    Normalization", NeurIPS 2019.
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = jax.nn.initializers.ones
    reduction_axes: int | tuple[int, ...] = -1
    feature_axes: int | tuple[int, ...] = -1
    axis_name: Hashable | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    memory_efficient: bool = False

    def __post_init__(self) -> None:
        check_example_fields(self)

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``({"scale"}, {})``; see :meth:`Normalizer.init`."""
        shape = feature_shape(features, self.feature_axes, "RMSNorm", "feature_axes")
        return init_params(self, shape, key), {}

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Rescales each example by its root mean square over ``reduction_axes``; ``state``
        (``{}``) is returned unchanged and ``training`` has no effect. See
        :meth:`Normalizer.apply`."""
        x, reduce_axes, aff, mask = check_example_call(self, params, x, training, mask)
        if self.memory_efficient:
            cfg = StatsConfig(
                axes=reduce_axes,
                epsilon=float(self.epsilon),
                out_dtype=out_dtype(self, x),
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
            )
            return rms_norm_saving_output(x, aff.scale, mask, cfg), state
        y = rms_normalize(
            x,
            aff.scale,
            mask,
            axes=reduce_axes,
            epsilon=float(self.epsilon),
            out_dtype=out_dtype(self, x),
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )
        return y, state


rms_norm = functional(RMSNorm, "rms_norm", "y, _ = bn_jax.rms_norm(params, {}, x, training=True)")
