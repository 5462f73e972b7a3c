"""``flax.linen`` drop-ins over the bn_jax core.

Swap one import and keep the rest of a Flax model::

    import flax.linen as nn
    from bn_jax import linen as bnn        # instead of nn.BatchNorm

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(64, (3, 3))(x)
            x = bnn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            return nn.relu(x)

    variables = Block().init(key, x, train=False)
    y, updates = Block().apply(variables, x, train=True, mutable=["batch_stats"])

:class:`BatchNorm` takes every constructor and call argument of
``flax.linen.BatchNorm`` and keeps the same variables: ``params`` holds
``scale`` and ``bias``, ``batch_stats`` holds ``mean`` and ``var``, with Flax's
shapes and dtypes, so a checkpoint made with Flax's layer loads as it is. The
other members of the family (:class:`BatchRenorm`, :class:`GroupNorm`, ...)
take the arguments of the bn_jax normalizer they wrap and keep their running
statistics, if any, in ``batch_stats``.

Every module here is a thin shell: it creates the Flax variables and calls
``bn_jax.<Norm>(...).apply``; no statistics code lives in this file.

Deliberate differences from ``flax.linen.BatchNorm``:

* ``use_fast_variance`` defaults to False (Flax: True). Flax's fast variance
  ``E[x^2] - E[x]^2`` loses every digit when ``|mean| >> std``; ours stays
  accurate. Pass ``use_fast_variance=True`` to get Flax's formula.
* The output dtype is the input dtype unless ``dtype`` is set (Flax promotes
  bfloat16 input with float32 parameters to float32).
* Statistics are always reduced in at least float32, so
  ``force_float32_reductions=False`` is rejected.
* Masked statistics are pooled over the valid elements of the global batch,
  weighted by count, and a channel with no valid element keeps its running
  statistics (Flax averages per-device masked means and writes NaN).
* Extra options: ``momentum=None`` (exact cumulative average; adds a
  ``count`` to ``batch_stats``) and ``unbiased_running_var`` (PyTorch's
  running variance).
* ``init`` in training mode returns the output normalized with the local
  batch statistics, as Flax does, except for a batch with a single value per
  feature (e.g. a dummy ``jnp.ones((1, features))``), where it returns the
  output of the initial running statistics instead of an error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import bn_jax
from bn_jax._core import checks
from bn_jax._linen_tools import fold, recalibrate
from bn_jax.norms._common import Initializer

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "SequenceBatchNorm",
    "fold",
    "recalibrate",
    "wrap",
]

Dtype = Any


def _plain_initializers(core: Any) -> Any:
    """``core`` with its initializers replaced by zeros (for shapes and state only).

    User initializers may return boxed values (``nn.with_partitioning``), which
    the core's ``init`` cannot turn into arrays; parameters are created by Flax
    with the user's initializers, so only their shapes are needed from the core.
    Also used by :mod:`bn_jax.nnx`.
    """
    fields = {
        f.name: jax.nn.initializers.zeros
        for f in dataclasses.fields(core)
        if f.name.endswith("_init") and callable(getattr(core, f.name))
    }
    return dataclasses.replace(core, **fields) if fields else core


def _stateless_error(layer: str) -> TypeError:
    """The TypeError of both adapters for ``use_running_average`` on a stateless layer."""
    return TypeError(f"{layer} keeps no running statistics; use_running_average does not apply.")


def _core(module: Any, core_cls: type) -> Any:
    """``core_cls`` configured with ``module``'s attributes of the same names (core
    fields the module does not declare keep their defaults)."""
    fields = [f.name for f in dataclasses.fields(core_cls) if f.init]
    return core_cls(**{n: getattr(module, n) for n in fields if hasattr(module, n)})


def _single_value_per_feature(core: Any, x: jax.Array) -> bool:
    """Whether a training step of ``core`` on ``x`` would have one value per feature."""
    feature_axes = checks.resolve_axes(core.axis, x.ndim)
    return math.prod(x.shape[i] for i in range(x.ndim) if i not in feature_axes) <= 1


def _run(
    module: nn.Module,
    core: Any,
    x: jax.Array,
    *,
    training: bool | None,
    mask: jax.Array | None = None,
    **call_kwargs: Any,
) -> jax.Array:
    """Creates ``module``'s variables for ``core`` and applies ``core`` to ``x``.

    Parameters go to ``params`` (made with the core's ``<name>_init``
    initializer, drawn from Flax's ``params`` RNG stream, as Flax's own layers
    do), state to ``batch_stats``. While initializing, no statistics are
    written and no collective runs (``axis_name`` is dropped), so ``init`` works
    outside ``shard_map`` / ``pmap``. ``training=None`` (no
    ``use_running_average`` given) is an error for a normalizer with state and
    means the normalizer's only mode otherwise.
    """
    checks.check_input(x)
    x = jnp.asarray(x)
    plain = _plain_initializers(core)
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    order: list[list[str]] = []  # eval_shape sorts dict keys; Flax's RNG use follows order

    def init_in_order(spec: jax.ShapeDtypeStruct) -> Any:
        params, state = plain.init(spec)
        order[:] = [list(params), list(state)]
        return params, state

    param_shapes, state_shapes = jax.eval_shape(init_in_order, spec)
    param_shapes = {n: param_shapes[n] for n in order[0]}
    state_shapes = {n: state_shapes[n] for n in order[1]}

    initial: dict[str, jax.Array] = {}

    def initial_state(name: str) -> jax.Array:
        if not initial:
            initial.update(plain.init(x)[1])
        return initial[name]

    variables = {
        name: module.variable("batch_stats", name, initial_state, name) for name in state_shapes
    }
    state = {name: v.value for name, v in variables.items()}

    params = {}
    for name, s in param_shapes.items():
        init_fn = getattr(core, f"{name}_init", None)
        if callable(init_fn):
            params[name] = module.param(name, init_fn, tuple(s.shape), s.dtype)
        else:  # a parameter without an initializer field: the core's own init
            params[name] = module.param(name, lambda key, n=name: core.init(x, key=key)[0][n])

    if training is None:
        if state_shapes:
            raise ValueError(
                f"{type(module).__name__}: no use_running_average was given; pass it to the "
                f"constructor or at call time (False: batch statistics, True: running ones)."
            )
        training = True
    if mask is not None:
        call_kwargs["mask"] = mask
    if module.is_initializing() and training:
        local = core
        if getattr(core, "axis_name", None) is not None:
            local = dataclasses.replace(core, axis_name=None, axis_index_groups=None)
        if state and hasattr(core, "axis") and _single_value_per_feature(core, x):
            training = False
        y, _ = local.apply(params, state, x, training=training, **call_kwargs)
        return y
    y, new_state = core.apply(params, state, x, training=training, **call_kwargs)
    if training:
        for name, v in variables.items():
            v.value = new_state[name]
    return y


class BatchNorm(nn.Module):
    r"""Batch Normalization as a ``flax.linen`` Module (drop-in for ``nn.BatchNorm``).

    Training mode (``use_running_average=False``), per feature over every
    other axis and every device of ``axis_name``::

        mu, var = mean(x), mean((x - mu)**2)
        y = (x - mu) / sqrt(var + epsilon) * scale + bias
        batch_stats = momentum * batch_stats + (1 - momentum) * (mu, var)

    Evaluation (``use_running_average=True``) normalizes with
    ``batch_stats``. The computation is ``bn_jax.BatchNorm(...).apply``.

    Variables (for ``x`` of shape ``[..., C]`` and ``axis=-1``)::

        {"params": {"scale": [C], "bias": [C]},
         "batch_stats": {"mean": [C], "var": [C]}}       # + "count" if momentum=None

    Attributes:
      use_running_average: use ``batch_stats`` (True) or the batch's
        statistics (False); may instead be given at call time.
      axis: the feature axis or axes (``1`` for NCHW).
      momentum: weight of the old running statistics (Flax convention;
        PyTorch's ``momentum=0.1`` is ``0.9`` here); ``None`` keeps the exact
        cumulative average.
      epsilon: added to the variance.
      dtype: output dtype; ``None`` keeps the input's.
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: initializers ``(key, shape, dtype)``.
      axis_name: mapped axis whose devices share statistics.
      axis_index_groups: synchronize within these groups only.
      use_fast_variance: ``E[x^2] - E[x]^2`` (Flax's default). Default False:
        a shifted formula that stays accurate when ``|mean| >> std``.
      force_float32_reductions: accepted for compatibility; must be True
        (statistics are always reduced in at least float32).
      unbiased_running_var: the running variance tracks the unbiased batch
        variance, as PyTorch does.
      allow_single_value: as in ``bn_jax.BatchNorm``.

    Conventions: running statistics start at mean 0 and variance 1 with no
    debiasing; a channel whose batch statistics are not finite keeps its
    running statistics. During ``init`` nothing is written to
    ``batch_stats`` and no collective runs. See the module docstring for the
    other deliberate differences from ``flax.linen.BatchNorm``.

    Example::

        from bn_jax import linen as bnn
        bn = bnn.BatchNorm(use_running_average=False, momentum=0.9)
        variables = bn.init(jax.random.key(0), x)
        y, updates = bn.apply(variables, x, mutable=["batch_stats"])

    Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating
    Deep Network Training by Reducing Internal Covariate Shift", ICML 2015.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = jax.nn.initializers.zeros
    scale_init: Initializer = jax.nn.initializers.ones
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    allow_single_value: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``; updates ``batch_stats`` in training mode.

        Args:
          x: the input, with features along ``axis``.
          use_running_average: overrides the attribute when given.
          mask: boolean array broadcastable to ``x``; only True elements enter
            the batch statistics.

        Returns:
          The normalized ``x``, same shape.
        """
        use_ra = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        if not self.force_float32_reductions:
            raise ValueError(
                "BatchNorm: force_float32_reductions=False is not supported; bn_jax always "
                "reduces statistics in at least float32 (pass dtype= for the output dtype)."
            )
        core = _core(self, bn_jax.BatchNorm)
        return _run(self, core, x, training=not bool(use_ra), mask=mask)


def wrap(core_cls: type, *, stateful: bool, doc: str | None = None) -> type[nn.Module]:
    """A ``flax.linen`` Module class for the bn_jax normalizer ``core_cls``.

    The Module's attributes are the fields of ``core_cls`` (same names and
    defaults), plus ``use_running_average`` when the normalizer keeps running
    statistics (``stateful=True``). Calling it creates ``params`` and
    ``batch_stats`` from ``core_cls.init`` and returns ``core_cls.apply``'s
    output; extra keyword arguments of the call (``mask``, ...) go to
    ``apply``.
    """
    core_fields = [f for f in dataclasses.fields(core_cls) if f.init]
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {}
    if stateful:
        annotations["use_running_average"] = bool | None
        namespace["use_running_average"] = None
    for f in core_fields:
        annotations[f.name] = Any
        kw: dict[str, Any] = {"kw_only": True} if f.kw_only is True else {}
        if f.default is not dataclasses.MISSING:
            namespace[f.name] = dataclasses.field(default=f.default, **kw)
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f.name] = dataclasses.field(default_factory=f.default_factory, **kw)
        elif kw:
            namespace[f.name] = dataclasses.field(**kw)
    layer = core_cls.__name__

    def __call__(
        self: Any, x: jax.Array, use_running_average: bool | None = None, **kwargs: Any
    ) -> jax.Array:
        core = _core(self, core_cls)
        if stateful:
            if self.use_running_average is not None and use_running_average is not None:
                nn.merge_param("use_running_average", self.use_running_average, use_running_average)
            use_ra = use_running_average
            if use_ra is None:
                use_ra = self.use_running_average
            training = None if use_ra is None else not bool(use_ra)
        else:
            if use_running_average is not None:
                raise _stateless_error(layer)
            training = True
        return _run(self, core, x, training=training, **kwargs)

    __call__.__doc__ = (
        f"Applies ``bn_jax.{layer}`` to ``x`` (keyword arguments go to its ``apply``)."
    )
    namespace.update(
        {
            "__annotations__": annotations,
            "__call__": nn.compact(__call__),
            "__module__": __name__,
            "__qualname__": layer,
            "__doc__": doc
            or (
                f"``bn_jax.{layer}`` as a ``flax.linen`` Module.\n\n"
                f"Attributes are those of ``bn_jax.{layer}``"
                + (
                    " plus ``use_running_average`` (also accepted at call time); running "
                    "statistics live in the ``batch_stats`` collection."
                    if stateful
                    else "; it keeps parameters only."
                )
                + f"\n\nSee ``bn_jax.{layer}`` for the formula and the paper."
            ),
        }
    )
    return type(layer, (nn.Module,), namespace)


BatchRenorm = wrap(bn_jax.BatchRenorm, stateful=True)
GhostBatchNorm = wrap(bn_jax.GhostBatchNorm, stateful=True)
SequenceBatchNorm = wrap(bn_jax.SequenceBatchNorm, stateful=True)
InstanceNorm = wrap(bn_jax.InstanceNorm, stateful=True)
GroupNorm = wrap(bn_jax.GroupNorm, stateful=False)
LayerNorm = wrap(bn_jax.LayerNorm, stateful=False)
RMSNorm = wrap(bn_jax.RMSNorm, stateful=False)
