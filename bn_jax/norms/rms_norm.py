"""Root Mean Square Layer Normalization (Zhang & Sennrich, 2019)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax._core import checks
from bn_jax._core.memory_efficient import rms_norm_saving_output
from bn_jax._core.normalize import StatsConfig
from bn_jax._core.stats import mean_square
from bn_jax.norms import _common
from bn_jax.norms._common import Initializer, Mask, Params, Signature, State


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMSNorm:
    r"""RMS normalization: rescale each example by its root mean square, no centering.

    For every example (every position outside ``reduction_axes``)::

        y = x / sqrt(mean(x**2) + epsilon) * scale     # mean over reduction_axes
                                                       # * (1 + scale): zero_centered_scale

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
      zero_centered_scale: multiply by ``1 + scale`` instead of ``scale``, with
        ``scale`` starting at 0 (``scale_init`` ``ones``, the default, then gives
        zeros; any other initializer gives the stored value): weight decay on
        ``scale`` pulls the layer towards the identity scale rather than
        towards 0. Gemma's RMSNorm and NVIDIA Transformer Engine's
        ``zero_centered_gamma`` store the scale this way. Set it when building
        a layer: ``patch`` and ``convert`` refuse it, as an existing layer's
        scale would be read as ``1 + scale``.

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
    zero_centered_scale: bool = False

    def __post_init__(self) -> None:
        _common.check_common(
            self, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes
        )

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``({"scale"}, {})``; see :meth:`Normalizer.init`."""
        shape = _common.feature_shape(features, self.feature_axes, "RMSNorm", "feature_axes")
        scale_init = _common.centered_scale_init(self.scale_init, self.zero_centered_scale)
        return _common.init_params(
            shape, key, self.param_dtype, scale=scale_init if self.use_scale else None
        ), {}

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Rescales each example by its root mean square over ``reduction_axes``; ``state``
        (``{}``) is returned unchanged and ``training`` has no effect. See
        :meth:`Normalizer.apply`."""
        x, mask, sig = _common.check_call(self, params, state, x, mask, training)
        pshape, cfg = _layout(self, sig)
        scale = params["scale"].reshape(pshape) if self.use_scale else None
        scale = _common.zero_centered(scale, self.zero_centered_scale)
        if self.memory_efficient and cfg.custom_derivative:
            return rms_norm_saving_output(x, scale, mask, cfg), state
        # Differentiated by JAX: the formula is already one reduction and one
        # elementwise pass each way.
        ms, _ = mean_square(
            x, cfg.axes, mask, axis_name=cfg.axis_name, axis_index_groups=cfg.axis_index_groups
        )
        dt = checks.stat_dtype(x.dtype)  # complex for complex input
        y = x.astype(dt) * lax.rsqrt(ms + cfg.epsilon).astype(dt)
        if scale is not None:
            y = y * scale.astype(dt)
        return y.astype(cfg.out_dtype), state


@functools.lru_cache(maxsize=256)
def _layout(norm: RMSNorm, sig: Signature) -> tuple[tuple[int, ...], StatsConfig]:
    reduce_axes = checks.resolve_axes(norm.reduction_axes, sig.ndim, "reduction_axes")
    feature_axes = checks.resolve_axes(norm.feature_axes, sig.ndim, "feature_axes")
    _common.check_saving_output("RMSNorm", norm.memory_efficient, sig)
    used = ("scale",) if norm.use_scale else ()
    features = _common.check_features(
        "RMSNorm", sig, feature_axes, used, axis_arg="feature_axes", axis=norm.feature_axes
    )
    cfg = StatsConfig(
        reduce_axes,
        float(norm.epsilon),
        _common.out_dtype(norm.dtype, sig),
        norm.axis_name,
        norm.axis_index_groups,
        custom_derivative=not sig.vmapped,
    )
    return _common.broadcast_shape(sig.ndim, feature_axes, features), cfg


rms_norm = _common.functional(
    RMSNorm, "rms_norm", "y, _ = bn_jax.rms_norm(params, {}, x, training=True)"
)
