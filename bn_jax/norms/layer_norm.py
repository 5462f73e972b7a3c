"""Layer Normalization (Ba, Kiros & Hinton, 2016)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from bn_jax._core import checks
from bn_jax._core.memory_efficient import layer_norm_saving_output
from bn_jax._core.normalize import StatsConfig, normalizing_function
from bn_jax.norms import _common
from bn_jax.norms._common import Mask, Params, Signature, State


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerNorm(_common.NormFields):
    r"""Layer Normalization: normalize each example over its feature axes.

    For every example (every position outside ``reduction_axes``)::

        mu, var = mean(x), mean((x - mu)**2)        # over reduction_axes
        y = (x - mu) / sqrt(var + epsilon) * scale + bias       # * (1 + scale): zero_centered_scale

    ``scale`` and ``bias`` have the shape of ``feature_axes``. There are no
    running statistics: ``state`` is ``{}`` and ``training`` is accepted (and
    ignored) so that every normalizer has the same calling convention.

    When to use it: transformers and recurrent networks, and whenever the
    batch is small, variable or of size one at inference; the output of an
    example never depends on the rest of the batch.

    Args:
      epsilon: added to the variance; must be positive (Flax's default 1e-6).
      dtype: output dtype; ``None`` keeps the input's. Statistics are reduced
        in at least float32.
      param_dtype: dtype of ``scale`` / ``bias``.
      use_bias, use_scale, bias_init, scale_init: as in :class:`BatchNorm`.
      reduction_axes: axes the statistics are taken over (default ``-1``).
      feature_axes: axes of ``scale`` / ``bias`` (default ``-1``).
      axis_name: a mapped axis over which the *reduced* axes are split (model
        or sequence parallelism): statistics are merged across its devices,
        as in ``flax.linen.LayerNorm``. Not needed for data parallelism.
      axis_index_groups: merge within these groups of devices only.
      use_fast_variance: ``E[x^2] - E[x]^2`` instead of the shifted formula.
      memory_efficient: compute the backward pass from the output ``y`` and
        the per-row statistics, so that training does not keep ``x`` (the
        matmul after a transformer's norm keeps ``y`` anyway). Same outputs,
        gradients equal to float rounding while ``|scale|`` is not tiny next
        to ``|bias|``; reverse mode only (``jax.jvp`` raises). See the
        memory-efficient page of the docs.
      zero_centered_scale: multiply by ``1 + scale`` instead of ``scale``, with
        ``scale`` starting at 0 (``scale_init`` ``ones``, the default, then gives
        zeros; any other initializer gives the stored value): weight decay on
        ``scale`` pulls the layer towards the identity scale rather than
        towards 0. Gemma's norms and NVIDIA Transformer Engine's
        ``zero_centered_gamma`` store the scale this way. Set it when building
        a layer: ``patch`` and ``convert`` refuse it, as an existing layer's
        scale would be read as ``1 + scale``.

    Example::

        norm = bn_jax.LayerNorm()
        params, state = norm.init(512)               # state == {}
        y, _ = norm.apply(params, state, x, training=True)

    Reference: J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer
    Normalization", arXiv:1607.06450, 2016.
    """

    epsilon: float = 1e-6
    reduction_axes: int | tuple[int, ...] = -1
    feature_axes: int | tuple[int, ...] = -1
    use_fast_variance: bool = False
    memory_efficient: bool = False
    zero_centered_scale: bool = False

    def __post_init__(self) -> None:
        _common.check_common(
            self, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes
        )

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, {})``; see :meth:`Normalizer.init`."""
        shape = _common.feature_shape(features, self.feature_axes, "LayerNorm", "feature_axes")
        inits = _common.affine_inits(self)
        if self.use_scale:
            inits["scale"] = _common.centered_scale_init(self.scale_init, self.zero_centered_scale)
        return _common.init_params(shape, key, self.param_dtype, **inits), {}

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Normalizes each example over ``reduction_axes``; ``state`` (``{}``) is returned
        unchanged and ``training`` has no effect. See :meth:`Normalizer.apply`."""
        x, mask, sig = _common.check_call(self, params, state, x, mask, training)
        pshape, used, cfg = _layout(self, sig)
        scale, bias = (params[n].reshape(pshape) if n in used else None for n in ("scale", "bias"))
        scale = _common.zero_centered(scale, self.zero_centered_scale)
        if self.memory_efficient and cfg.custom_derivative:
            return layer_norm_saving_output(x, scale, bias, mask, cfg), state
        return normalizing_function(cfg)(x, scale, bias, mask, cfg)[0], state


@functools.lru_cache(maxsize=256)
def _layout(
    norm: LayerNorm, sig: Signature
) -> tuple[tuple[int, ...], tuple[str, ...], StatsConfig]:
    reduce_axes = checks.resolve_axes(norm.reduction_axes, sig.ndim, "reduction_axes")
    feature_axes = checks.resolve_axes(norm.feature_axes, sig.ndim, "feature_axes")
    _common.check_saving_output("LayerNorm", norm.memory_efficient, sig)
    used = tuple(n for n, use in (("scale", norm.use_scale), ("bias", norm.use_bias)) if use)
    features = _common.check_features(
        "LayerNorm", sig, feature_axes, used, axis_arg="feature_axes", axis=norm.feature_axes
    )
    cfg = _common.stats_config(norm, reduce_axes, sig)
    return _common.broadcast_shape(sig.ndim, feature_axes, features), used, cfg


layer_norm = _common.functional(
    LayerNorm, "layer_norm", "y, _ = bn_jax.layer_norm(params, {}, x, training=True, epsilon=1e-5)"
)
