"""Filter Response Normalization with the Thresholded Linear Unit (Singh & Krishnan, 2020)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from bn_jax._core import checks
from bn_jax._core.normalize import StatsConfig
from bn_jax._core.stats import mean_square
from bn_jax.norms import _common
from bn_jax.norms._common import Initializer, Mask, Params, Signature, State


def default_eps_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The learned epsilon's initial value, 1e-4 (TensorFlow Addons' FRN layer starts there)."""
    del key
    return jnp.full(shape, 1e-4, dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FilterResponseNorm(_common.NormFields):
    r"""Filter Response Normalization: divide by the mean square over space, then threshold.

    For every example ``n`` (axis 0) and channel ``c``, over the remaining
    (spatial) axes, with no mean subtraction::

        nu2 = mean(x[n, ..., c]**2)
        y = x / sqrt(nu2 + epsilon) * scale + bias
        z = max(y, tau)                        # the TLU; use_tau=False returns y

    The Thresholded Linear Unit (TLU) ``max(y, tau)`` is the paper's
    activation that goes with FRN: a learned threshold per channel, which
    stands in for a ReLU after the layer (``max(y, tau) = relu(y - tau) +
    tau``) and keeps units from dying when ``y`` is biased away from zero.
    With ``learned_epsilon=True`` the constant becomes ``epsilon + |eps|``
    with ``eps`` a learned parameter per channel (the paper's remedy for
    activation maps of one or few spatial positions, where ``x / sqrt(x**2
    + epsilon)`` is close to ``sign(x)``). No running statistics: ``state``
    is ``{}``; ``training`` is accepted and ignored.

    When to use it: convolutional networks trained with small or variable
    batches (each example is normalized on its own, so training and
    evaluation compute the same thing), in place of a BatchNorm-ReLU pair.

    Args:
      epsilon: added to the mean square; must be positive (the paper's
        default 1e-6; timm uses 1e-5).
      dtype: output dtype; ``None`` keeps the input's. The mean square is
        reduced in at least float32.
      param_dtype: dtype of the parameters.
      use_scale, use_bias: learn ``scale`` / ``bias`` (absent from params
        when False).
      use_tau: apply the TLU with a learned ``tau`` (on by default, as in the
        paper); False gives the plain normalization ``y``.
      learned_epsilon: learn ``eps`` (one per channel) and use ``epsilon +
        |eps|``.
      scale_init, bias_init, tau_init, eps_init: Flax-style initializers
        ``(key, shape, dtype)``; defaults 1, 0, 0 and ``1e-4``.
      feature_axes: the channel axes (default ``-1``; ``1`` for NCHW); may not
        include the batch axis 0. The mean square is taken over every other
        axis except 0.
      axis_name: a mapped axis over which the spatial axes are split (spatial
        parallelism): the sum of squares is merged across its devices. Not
        needed for data parallelism (each example is normalized on its own).
      axis_index_groups: merge within these groups of devices only.

    Example::

        norm = bn_jax.FilterResponseNorm()
        params, state = norm.init(64)     # {"scale", "bias", "tau"}, {}
        z, _ = norm.apply(params, state, x, training=True)    # x: [N, H, W, 64]

    Reference: S. Singh and S. Krishnan, "Filter Response Normalization
    Layer: Eliminating Batch Dependence in the Training of Deep Neural
    Networks", CVPR 2020.
    """

    epsilon: float = 1e-6
    use_tau: bool = True
    learned_epsilon: bool = False
    tau_init: Initializer = jax.nn.initializers.zeros
    eps_init: Initializer = default_eps_init
    feature_axes: int | tuple[int, ...] = -1

    def __post_init__(self) -> None:
        _common.check_common(self, feature_axes=self.feature_axes)

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, {})``: ``scale``, ``bias``, ``tau`` (and ``eps``) per channel."""
        shape = _common.feature_shape(
            features, self.feature_axes, "FilterResponseNorm", "feature_axes"
        )
        params = _common.init_params(
            shape,
            key,
            self.param_dtype,
            **_common.affine_inits(self),
            tau=self.tau_init if self.use_tau else None,
            eps=self.eps_init if self.learned_epsilon else None,
        )
        return params, {}

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Normalizes each channel of each example by its root mean square over the spatial
        axes, then applies the TLU; ``state`` (``{}``) is returned unchanged and
        ``training`` has no effect. See :meth:`Normalizer.apply`.

        Raises:
          ValueError: also for feature axes that include the batch axis 0.
          TypeError: also for complex input.
        """
        x, mask, sig = _common.check_call(self, params, state, x, mask, training)
        pshape, used, cfg = _layout(self, sig)
        dt = checks.stat_dtype(x.dtype)
        eps = jnp.asarray(self.epsilon, dt)
        if "eps" in used:
            eps = eps + jnp.abs(params["eps"].reshape(pshape).astype(dt))
        # The mean square is RMSNorm's statistic, taken over the spatial axes.
        ms, _ = mean_square(
            x, cfg.axes, mask, axis_name=cfg.axis_name, axis_index_groups=cfg.axis_index_groups
        )
        y = x.astype(dt) * jax.lax.rsqrt(ms + eps)
        if "scale" in used:
            y = y * params["scale"].reshape(pshape).astype(dt)
        if "bias" in used:
            y = y + params["bias"].reshape(pshape).astype(dt)
        if "tau" in used:
            y = jnp.maximum(y, params["tau"].reshape(pshape).astype(dt))
        return y.astype(cfg.out_dtype), state


@functools.lru_cache(maxsize=256)
def _layout(
    norm: FilterResponseNorm, sig: Signature
) -> tuple[tuple[int, ...], tuple[str, ...], StatsConfig]:
    layer = "FilterResponseNorm"
    feature_axes = checks.resolve_axes(norm.feature_axes, sig.ndim, "feature_axes")
    if 0 in feature_axes:
        raise ValueError(
            f"{layer}: feature_axes={norm.feature_axes!r} includes axis 0, the batch axis; put "
            f"the batch first."
        )
    _common.check_real(layer, sig, " (its TLU is a maximum)")
    uses = {
        "scale": norm.use_scale,
        "bias": norm.use_bias,
        "tau": norm.use_tau,
        "eps": norm.learned_epsilon,
    }
    used = tuple(n for n, use in uses.items() if use)
    features = _common.check_features(
        layer, sig, feature_axes, used, axis_arg="feature_axes", axis=norm.feature_axes
    )
    cfg = StatsConfig(
        _common.other_axes(sig.ndim, feature_axes, first=1),
        float(norm.epsilon),
        _common.out_dtype(norm.dtype, sig),
        norm.axis_name,
        norm.axis_index_groups,
    )
    return _common.broadcast_shape(sig.ndim, feature_axes, features), used, cfg


filter_response_norm = _common.functional(
    FilterResponseNorm,
    "filter_response_norm",
    "z, _ = bn_jax.filter_response_norm(params, {}, x, training=True)",
)
