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

:class:`BatchNorm`, :class:`LayerNorm`, :class:`RMSNorm`, :class:`GroupNorm`
and :class:`InstanceNorm` subclass the ``flax.linen`` layer of the same name:
they inherit its fields (same order, same defaults, except the stable
``use_fast_variance=False``), take its call arguments, create the same
variables (``params``: ``scale`` / ``bias``; ``batch_stats``: ``mean`` /
``var``) and pass ``isinstance`` checks against it. After Flax's fields come
the options of the bn_jax normalizer that Flax lacks (e.g.
``unbiased_running_var``, ``allow_single_value``). :class:`BatchRenorm`,
:class:`GhostBatchNorm` and :class:`SequenceBatchNorm` take
``use_running_average`` and the options of their normalizer.

``with patch(**overrides):`` makes every ``flax.linen`` norm layer compute
with bn_jax, without editing the model. The deliberate differences from Flax
are listed in the documentation's Flax page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.core import meta

from bn_jax import _adapter
from bn_jax._adapter import LAYERS, Layer
from bn_jax._linen_tools import fold, recalibrate

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
    "patch",
    "recalibrate",
]


def _apply(
    self: nn.Module,
    layer: Layer,
    native: bool,
    x: Any,
    use_running_average: bool | None = None,
    mask: Any = None,
    **kwargs: Any,
) -> Any:
    """The body of every drop-in's ``__call__`` (and of patched Flax layers)."""
    options = layer.options(lambda name, default: getattr(self, name, default), native, _PATCH)
    x = jnp.asarray(x)
    param_shapes, state_shapes = layer.shapes(options, x)
    stat_dtype = None if getattr(self, "force_float32_reductions", True) else self.param_dtype

    def initial(name: str) -> Any:
        value = layer.initial_state(options, x)[name]
        if stat_dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(stat_dtype)
        return value

    stats = {n: self.variable("batch_stats", n, initial, n) for n in state_shapes}
    params = {}
    for name, s in param_shapes.items():
        if self.has_variable("params", name):  # shapes are checked by the core, with its hints
            params[name] = meta.unbox(self.get_variable("params", name))
        else:
            params[name] = self.param(name, getattr(self, f"{name}_init"), s.shape, s.dtype)

    training = True
    if stats:
        use_ra = nn.merge_param(
            "use_running_average", getattr(self, "use_running_average", None), use_running_average
        )
        training = not use_ra
    initializing = self.is_initializing()
    state = {n: v.value for n, v in stats.items()}
    y, new_state = _adapter.run(
        layer,
        options,
        params,
        state,
        x,
        training=training,
        initializing=initializing,
        mask=mask,
        **kwargs,
    )
    if stats and training and not initializing:
        for name, v in stats.items():
            v.value = _adapter.stored(new_state[name], v.value)
    return y


def _call_signature(layer: Layer, base: type) -> inspect.Signature:
    """Flax's call signature, plus ``use_running_average`` where Flax's layer has none
    but the normalizer may keep running statistics (InstanceNorm)."""
    if layer.flax_name is None:
        return _adapter.family_call_signature()
    sig = inspect.signature(base.__call__)
    if layer.may_keep_state and "use_running_average" not in sig.parameters:
        sig = _adapter.with_keyword(sig, "use_running_average", None)
    return sig


def _make_call(layer: Layer, sig: inspect.Signature) -> Any:
    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        del arguments["self"]
        extra = arguments.pop("kwargs", {})
        native = isinstance(self, _DROP_INS[layer.name])
        return _apply(self, layer, native, **arguments, **extra)

    __call__.__signature__ = sig  # type: ignore[attr-defined]
    __call__.__doc__ = _adapter.call_doc(layer)
    return nn.compact(__call__)


def _drop_in(layer: Layer) -> type[nn.Module]:
    """The ``flax.linen`` Module class for ``layer``."""
    base = getattr(nn, layer.flax_name) if layer.flax_name else nn.Module
    flax_fields = [f.name for f in dataclasses.fields(base)] if layer.flax_name else []
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {}
    for name, default in _adapter.DEFAULTS.items():
        if name in flax_fields:
            annotations[name] = Any
            namespace[name] = default
    if layer.may_keep_state and "use_running_average" not in flax_fields:
        annotations["use_running_average"] = Any
        namespace["use_running_average"] = None
    for f in layer.extras(flax_fields):
        annotations[f.name] = Any
        default = layer.default(f)
        if default is dataclasses.MISSING:
            namespace[f.name] = dataclasses.field(kw_only=True)
        else:
            namespace[f.name] = default
    namespace.update(
        {
            "__annotations__": annotations,
            "__call__": _make_call(layer, _call_signature(layer, base)),
            "__module__": __name__,
            "__qualname__": layer.name,
            "__doc__": _adapter.class_doc(layer, "flax.linen", namespace),
        }
    )
    return type(layer.name, (base,), namespace)


# While patch() is active: its overrides (and an "__active__" marker).
_PATCH: dict[str, Any] = {}

_DROP_INS: dict[str, type[nn.Module]] = {name: _drop_in(layer) for name, layer in LAYERS.items()}

BatchNorm = _DROP_INS["BatchNorm"]
LayerNorm = _DROP_INS["LayerNorm"]
RMSNorm = _DROP_INS["RMSNorm"]
GroupNorm = _DROP_INS["GroupNorm"]
InstanceNorm = _DROP_INS["InstanceNorm"]
BatchRenorm = _DROP_INS["BatchRenorm"]
GhostBatchNorm = _DROP_INS["GhostBatchNorm"]
SequenceBatchNorm = _DROP_INS["SequenceBatchNorm"]


@contextlib.contextmanager
def patch(**overrides: Any) -> Iterator[None]:
    """Computes every ``flax.linen`` norm layer with bn_jax inside the ``with`` block.

    ``flax.linen.BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and
    ``InstanceNorm`` (and the drop-ins of this module) run bn_jax's
    normalizers, with the same variables, so a model and its checkpoints are
    used unchanged. The stable variance replaces Flax's fast one unless
    ``use_fast_variance=True`` is passed. ``overrides`` set bn_jax options for
    every layer that has them, whatever the model says: e.g.
    ``patch(axis_name="batch")`` makes every BatchNorm a count-weighted
    synchronized BatchNorm (PyTorch's ``SyncBatchNorm.convert_sync_batchnorm``).

    Example::

        with bn_jax.linen.patch(axis_name="batch"):
            y, updates = jax.shard_map(step, mesh=mesh, in_specs=..., out_specs=...)(...)

    Tracing happens inside the block: call (or first ``jit``-compile) the
    model there. Patches do not nest.

    Raises:
      TypeError: an override that no norm layer has.
      RuntimeError: ``patch`` is already active.
    """
    _adapter.check_overrides(overrides)
    if _PATCH:
        raise RuntimeError("bn_jax.linen.patch is already active; patches do not nest.")
    saved = {name: vars(getattr(nn, name))["__call__"] for name in _adapter.FLAX_NAMES}
    try:
        for name in _adapter.FLAX_NAMES:
            getattr(nn, name).__call__ = vars(_DROP_INS[name])["__call__"]
        _PATCH.update(overrides, __active__=True)
        yield
    finally:
        _PATCH.clear()
        for name, call in saved.items():
            getattr(nn, name).__call__ = call
