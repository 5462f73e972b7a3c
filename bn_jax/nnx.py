"""``flax.nnx`` drop-ins over the bn_jax core.

Swap one import and keep the rest of an NNX model::

    from flax import nnx
    from bn_jax import nnx as bnnx          # instead of nnx.BatchNorm

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
            self.bn = bnnx.BatchNorm(16, momentum=0.9, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.bn(self.conv(x)))

    model = Block(nnx.Rngs(0))
    model.train()        # batch statistics, running statistics updated
    model.eval()         # running statistics

:class:`BatchNorm` takes the arguments of ``flax.nnx.BatchNorm``
(``num_features`` positional, ``rngs``, ``use_running_average`` in the
constructor or the call, ``scale_metadata`` / ``bias_metadata``) and keeps
``scale`` / ``bias`` as ``nnx.Param`` and ``mean`` / ``var`` as
``nnx.BatchStat``, with Flax's shapes: ``nnx.state(model)`` has the same tree
as with Flax's layer. ``model.train()`` / ``model.eval()``, ``nnx.view``,
``nnx.jit`` and ``nnx.Optimizer`` work as with Flax's layer. The other members
of the family take ``num_features``, ``rngs`` and the arguments of the bn_jax
normalizer they wrap.

Every module here calls ``bn_jax.<Norm>(...).apply``; no statistics code
lives in this file. Deliberate differences from ``flax.nnx.BatchNorm`` are
those listed in :mod:`bn_jax.linen` (``use_fast_variance=False`` by default,
output dtype = input dtype unless ``dtype`` is set, statistics in at least
float32); ``promote_dtype`` is not accepted for the same reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

import bn_jax
from bn_jax._nnx_tools import fold, recalibrate
from bn_jax.linen import _plain_initializers, _stateless_error
from bn_jax.norms._common import Initializer

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "Norm",
    "RMSNorm",
    "SequenceBatchNorm",
    "fold",
    "recalibrate",
    "wrap",
]

Dtype = Any
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


class Norm(nnx.Module):
    """Base of the nnx wrappers: holds a bn_jax normalizer's config and variables.

    Subclasses set ``core_cls`` (the bn_jax normalizer) and ``stateful``
    (whether it keeps running statistics, switched by ``use_running_average``
    and ``train()`` / ``eval()``). Config fields are plain attributes (so
    ``set_attributes`` works on them); parameters are ``nnx.Param`` and running
    statistics ``nnx.BatchStat``, named as in the core's ``init``.
    """

    core_cls: ClassVar[type]
    stateful: ClassVar[bool] = True

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        rngs: nnx.Rngs,
        use_running_average: bool | None = False,
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
        **config: Any,
    ) -> None:
        core = self.core_cls(**config)  # validates the config
        names = tuple(f.name for f in dataclasses.fields(core) if f.init)
        for n in names:
            setattr(self, n, getattr(core, n))
        self._config_names = names
        self.num_features = num_features
        if self.stateful:
            self.use_running_average = use_running_average
        elif use_running_average:
            raise _stateless_error(type(self).__name__)

        plain = _plain_initializers(core)
        param_shapes, state = plain.init(num_features)
        metadata = metadata or {}
        for name, s in param_shapes.items():
            init_fn = getattr(core, f"{name}_init", None)
            if callable(init_fn):
                value = init_fn(rngs.params(), tuple(s.shape), s.dtype)
            else:
                value = core.init(num_features, key=rngs.params())[0][name]
            setattr(self, name, nnx.Param(value, **dict(metadata.get(name, {}))))
        for n in names:  # unused affine parameters read as None, as in Flax
            if n.startswith("use_") and getattr(core, n) is False:
                attr = n[len("use_") :]
                if attr not in param_shapes:
                    setattr(self, attr, nnx.data(None))
        self._param_names = tuple(param_shapes)
        for name, value in state.items():
            setattr(self, name, nnx.BatchStat(value))
        self._state_names = tuple(state)

    def core(self) -> Any:
        """The bn_jax normalizer for the current attribute values."""
        return self.core_cls(**{n: getattr(self, n) for n in self._config_names})

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, **kwargs: Any
    ) -> jax.Array:
        """Normalizes ``x``; in training mode updates the ``nnx.BatchStat`` variables.

        Args:
          x: the input, with features along ``axis``.
          use_running_average: overrides the attribute when given.
          **kwargs: passed to the core's ``apply`` (e.g. ``mask``).
        """
        layer = type(self).__name__
        if self.stateful:
            use_ra = use_running_average
            if use_ra is None:
                use_ra = self.use_running_average
            if use_ra is None:
                raise ValueError(
                    f"{layer}: no use_running_average was given. Pass it to the constructor "
                    f"({layer}(..., use_running_average=False)), at call time "
                    f"(layer(x, use_running_average=True)), or switch the model with "
                    f"model.train() / model.eval()."
                )
            training = not bool(use_ra)
        else:
            if use_running_average is not None:
                raise _stateless_error(layer)
            training = True
        params = {n: getattr(self, n)[...] for n in self._param_names}
        state = {n: getattr(self, n)[...] for n in self._state_names}
        y, new_state = self.core().apply(params, state, x, training=training, **kwargs)
        if training:
            for n in self._state_names:
                getattr(self, n)[...] = new_state[n]
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)``."""
        if self.stateful and use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(Norm):
    r"""Batch Normalization as a ``flax.nnx`` Module (drop-in for ``nnx.BatchNorm``).

    Training mode (``use_running_average=False``, the default, or after
    ``model.train()``), per feature over every other axis and every device of
    ``axis_name``::

        mu, var = mean(x), mean((x - mu)**2)
        y = (x - mu) / sqrt(var + epsilon) * scale + bias
        mean, var <- momentum * (mean, var) + (1 - momentum) * (mu, var)

    Evaluation (``use_running_average=True`` or ``model.eval()``) normalizes
    with the running statistics. The computation is
    ``bn_jax.BatchNorm(...).apply``.

    Variables: ``scale``, ``bias`` (``nnx.Param``, ``None`` when unused) and
    ``mean``, ``var`` (``nnx.BatchStat``; plus ``count`` with
    ``momentum=None``), all of shape ``[num_features]``.

    Args:
      num_features: the number of features (or a tuple, one size per axis of
        a tuple ``axis``).
      use_running_average: the mode when the call does not give one.
      axis: the feature axis or axes (``1`` for NCHW).
      momentum: weight of the old running statistics (Flax convention;
        PyTorch's ``momentum=0.1`` is ``0.9``); ``None``: exact cumulative
        average.
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's.
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: initializers ``(key, shape, dtype)``, drawn from
        ``rngs.params()`` as Flax does.
      axis_name: mapped axis whose devices share statistics.
      axis_index_groups: synchronize within these groups only.
      use_fast_variance: ``E[x^2] - E[x]^2`` (Flax's default); default False,
        a formula that stays accurate when ``|mean| >> std``.
      unbiased_running_var: the running variance tracks the unbiased batch
        variance, as PyTorch does.
      rngs: ``nnx.Rngs`` for the initializers.
      bias_metadata, scale_metadata: metadata of the ``nnx.Param`` (e.g.
        sharding).

    Conventions: running statistics start at mean 0 and variance 1 with no
    debiasing; a channel whose batch statistics are not finite keeps its
    running statistics.

    Example::

        from bn_jax import nnx as bnnx
        bn = bnnx.BatchNorm(16, momentum=0.9, rngs=nnx.Rngs(0))
        y = bn(x)            # training: updates bn.mean, bn.var
        bn.eval()
        y = bn(x)            # running statistics

    Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating
    Deep Network Training by Reducing Internal Covariate Shift", ICML 2015.
    """

    core_cls = bn_jax.BatchNorm

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = jax.nn.initializers.zeros,
        scale_init: Initializer = jax.nn.initializers.ones,
        axis_name: Hashable | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> None:
        super().__init__(
            num_features,
            rngs=rngs,
            use_running_average=use_running_average,
            metadata={"scale": scale_metadata, "bias": bias_metadata},
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            unbiased_running_var=unbiased_running_var,
        )

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``; in training mode updates ``mean`` and ``var``.

        Args:
          x: the input, with features along ``axis``.
          use_running_average: overrides the attribute when given.
          mask: boolean array broadcastable to ``x``; only True elements enter
            the batch statistics.
        """
        return super().__call__(x, use_running_average, mask=mask)


def wrap(core_cls: type, *, stateful: bool) -> type[Norm]:
    """An nnx Module class for the bn_jax normalizer ``core_cls``.

    Its constructor is ``(num_features, *, rngs, use_running_average=False,
    **config)`` where ``config`` are the fields of ``core_cls``.
    """
    layer = core_cls.__name__
    doc = (
        f"``bn_jax.{layer}`` as a ``flax.nnx`` Module.\n\n"
        f"``{layer}(num_features, *, rngs, **config)`` with the config of "
        f"``bn_jax.{layer}``; parameters are ``nnx.Param``"
        + (
            ", running statistics ``nnx.BatchStat`` (switched by ``use_running_average``, "
            "``model.train()`` / ``model.eval()``)."
            if stateful
            else "."
        )
        + f"\n\nSee ``bn_jax.{layer}`` for the formula and the paper."
    )
    return type(
        layer,
        (Norm,),
        {
            "core_cls": core_cls,
            "stateful": stateful,
            "__module__": __name__,
            "__qualname__": layer,
            "__doc__": doc,
        },
    )


BatchRenorm = wrap(bn_jax.BatchRenorm, stateful=True)
GhostBatchNorm = wrap(bn_jax.GhostBatchNorm, stateful=True)
SequenceBatchNorm = wrap(bn_jax.SequenceBatchNorm, stateful=True)
InstanceNorm = wrap(bn_jax.InstanceNorm, stateful=True)
GroupNorm = wrap(bn_jax.GroupNorm, stateful=False)
LayerNorm = wrap(bn_jax.LayerNorm, stateful=False)
RMSNorm = wrap(bn_jax.RMSNorm, stateful=False)
