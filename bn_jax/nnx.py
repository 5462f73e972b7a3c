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

:class:`BatchNorm`, :class:`LayerNorm`, :class:`RMSNorm`, :class:`GroupNorm`
and :class:`InstanceNorm` subclass the ``flax.nnx`` layer of the same name:
Flax's own constructor makes their attributes and variables (so
``nnx.state``, ``nnx.graphdef``, ``nnx.view``, ``set_attributes``,
``nnx.jit`` / ``scan`` / ``vmap`` see what they see with Flax's layer), they
take Flax's constructor and call arguments (same order and defaults, except
the stable ``use_fast_variance=False``) and pass ``isinstance`` checks. After
Flax's arguments come, keyword-only, the options of the bn_jax normalizer
that Flax lacks. :class:`BatchRenorm`, :class:`GhostBatchNorm` and
:class:`SequenceBatchNorm` take ``num_features``, ``use_running_average``, the
options of their normalizer, ``rngs`` and ``<param>_metadata``.

:func:`convert` switches the norm layers of an existing model to these
drop-ins in place, keeping their variables. The deliberate differences from
Flax are listed in the documentation's Flax page.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import MappingProxyType
from typing import Any, TypeVar

import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from

from bn_jax import _adapter
from bn_jax._adapter import LAYERS, Layer
from bn_jax._nnx_tools import fold, recalibrate

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "SequenceBatchNorm",
    "convert",
    "fold",
    "recalibrate",
]

M = TypeVar("M", bound=nnx.Module)
_P = inspect.Parameter
_NO_METADATA = MappingProxyType({})


def _options(module: nnx.Module, layer: Layer) -> dict[str, Any]:
    options = layer.options(lambda name, default: getattr(module, name, default))
    if layer.flax_name == "GroupNorm" and options.get("num_groups") is not None:
        options["group_size"] = None  # Flax's nnx GroupNorm stores both; num_groups decides
    return options


def _create_missing(
    module: nnx.Module,
    layer: Layer,
    num_features: Any,
    rngs: nnx.Rngs | None = None,
    initializers: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Creates the normalizer's variables that ``module`` does not have yet.

    Flax's constructor makes those of Flax's layers; this makes the rest
    (all of a family member's, ``count`` for ``momentum=None``, InstanceNorm's
    running statistics), as Flax would: one ``rngs.params()`` key per
    parameter, ``scale`` first, ``nnx.data(None)`` for an unused parameter.
    """
    options = _options(module, layer)
    param_shapes, _ = layer.shapes(options, num_features)
    for name in layer.param_names:
        if name in vars(module):
            continue
        if name not in param_shapes:
            setattr(module, name, nnx.data(None))
            continue
        s = param_shapes[name]
        value = initializers[name](rngs.params(), tuple(s.shape), s.dtype)
        setattr(module, name, nnx.Param(value, **dict(metadata[name])))
    for name, value in layer.initial_state(options, num_features).items():
        if name not in vars(module):
            setattr(module, name, nnx.BatchStat(value))


def _init_signature(layer: Layer, base: type) -> tuple[inspect.Signature, list[str]]:
    """The constructor's signature and the names of the arguments Flax's ``__init__``
    does not take (passed to the normalizer instead)."""
    if layer.flax_name:
        flax_params = list(inspect.signature(base.__init__).parameters.values())
        params = [
            p.replace(default=_adapter.DEFAULTS[p.name]) if p.name in _adapter.DEFAULTS else p
            for p in flax_params
        ]
        have = [p.name for p in params]
    else:
        params = [
            _P("self", _P.POSITIONAL_OR_KEYWORD),
            _P("num_features", _P.POSITIONAL_OR_KEYWORD),
        ]
        have = []
    extra: list[_P] = []
    if layer.may_keep_state and "use_running_average" not in have:
        extra.append(_P("use_running_average", _P.KEYWORD_ONLY, default=False))
    for f in layer.extras(have):
        d = layer.default(f)
        extra.append(
            _P(f.name, _P.KEYWORD_ONLY, default=_P.empty if d is dataclasses.MISSING else d)
        )
    if not layer.flax_name:
        extra.append(_P("rngs", _P.KEYWORD_ONLY))
        extra += [
            _P(f"{n}_metadata", _P.KEYWORD_ONLY, default=_NO_METADATA) for n in layer.param_names
        ]
    return inspect.Signature([*params, *extra]), [p.name for p in extra]


def _make_init(layer: Layer, base: type) -> Any:
    sig, extra_names = _init_signature(layer, base)

    def __init__(self: nnx.Module, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        extra = {n: arguments.pop(n) for n in extra_names}
        num_features = arguments.get("num_features", extra.get("num_features"))
        rngs = arguments.get("rngs", extra.pop("rngs", None))
        metadata = {n: extra.pop(f"{n}_metadata", _NO_METADATA) for n in layer.param_names}
        # Initializers are used here only: they do not enter the graph, as in Flax.
        initializers = {n: extra.pop(f"{n}_init", None) for n in layer.param_names}
        if layer.flax_name:
            base.__init__(self, **arguments)
        else:
            self.num_features = num_features
        for name, value in extra.items():
            setattr(self, name, value)
        _adapter.validate(layer, _options(self, layer))
        _create_missing(self, layer, num_features, rngs, initializers, metadata)

    __init__.__signature__ = sig  # type: ignore[attr-defined]
    return __init__


def _call_signature(layer: Layer, base: type) -> inspect.Signature:
    if layer.flax_name is None:
        return _adapter.family_call_signature()
    sig = inspect.signature(base.__call__)
    if layer.may_keep_state and "use_running_average" not in sig.parameters:
        sig = _adapter.with_keyword(sig, "use_running_average", None)
    return sig


def _apply(
    self: nnx.Module,
    layer: Layer,
    x: Any,
    use_running_average: bool | None = None,
    mask: Any = None,
    **kwargs: Any,
) -> Any:
    """The body of every drop-in's ``__call__``."""
    options = _options(self, layer)
    param_shapes, state_shapes = layer.shapes(options, jnp.asarray(x))
    params = {n: getattr(self, n)[...] for n in param_shapes}
    stats = {n: getattr(self, n) for n in state_shapes}
    promote = getattr(self, "promote_dtype", None)
    if promote is not None:  # Flax's promotion: (x, [mean, var,] scale, bias)
        values = [getattr(self, n, None) for n in layer.param_names]
        values = [None if v is None else v[...] for v in values]
        running = (
            [stats[n][...] for n in ("mean", "var")] if _FLAX_PROMOTES_STATS[layer.name] else []
        )
        promoted = promote((x, *running, *values), dtype=getattr(self, "dtype", None))
        x = promoted[0]
        named = dict(zip(layer.param_names, promoted[1 + len(running) :], strict=True))
        params = {n: named[n] for n in param_shapes}
    training = True
    if stats:
        use_ra = first_from(
            use_running_average,
            getattr(self, "use_running_average", None),
            error_msg=(
                f"{type(self).__name__}: no use_running_average was given. Pass it to the "
                f"constructor ({type(self).__name__}(..., use_running_average=False)), at call "
                f"time (layer(x, use_running_average=True)), or switch the model with "
                f"model.train() / model.eval() or nnx.view(model, use_running_average=...)."
            ),
        )
        training = not use_ra
    state = {n: v[...] for n, v in stats.items()}
    y, new_state = _adapter.run(
        layer, options, params, state, x, training=training, mask=mask, **kwargs
    )
    if stats and training:
        for name, v in stats.items():
            v[...] = _adapter.stored(new_state[name], v[...])
    return y


def _make_call(layer: Layer, sig: inspect.Signature) -> Any:
    def __call__(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        del arguments["self"]
        extra = arguments.pop("kwargs", {})
        return _apply(self, layer, **arguments, **extra)

    __call__.__signature__ = sig  # type: ignore[attr-defined]
    __call__.__doc__ = _adapter.call_doc(layer)
    return __call__


def set_view(self: nnx.Module, use_running_average: bool | None = None) -> None:
    """Sets the mode for ``nnx.view``.

    Args:
      use_running_average: if True, normalize with the running statistics; if
        False, with the batch's (and update the running statistics).
    """
    if use_running_average is not None:
        self.use_running_average = use_running_average


def _drop_in(layer: Layer) -> type[nnx.Module]:
    """The ``flax.nnx`` Module class for ``layer``."""
    base = getattr(nnx, layer.flax_name) if layer.flax_name else nnx.Module
    namespace: dict[str, Any] = {
        "__init__": _make_init(layer, base),
        "__call__": _make_call(layer, _call_signature(layer, base)),
        "__module__": __name__,
        "__qualname__": layer.name,
    }
    if layer.may_keep_state and not hasattr(base, "set_view"):
        namespace["set_view"] = set_view
    extras = [p for p in _init_signature(layer, base)[1]]
    namespace["__doc__"] = _adapter.class_doc(layer, "flax.nnx", extras)
    return type(layer.name, (base,), namespace)


# Flax's nnx BatchNorm passes its running statistics through promote_dtype.
_FLAX_PROMOTES_STATS = {name: name == "BatchNorm" for name in LAYERS}

_DROP_INS: dict[str, type[nnx.Module]] = {name: _drop_in(layer) for name, layer in LAYERS.items()}

BatchNorm = _DROP_INS["BatchNorm"]
LayerNorm = _DROP_INS["LayerNorm"]
RMSNorm = _DROP_INS["RMSNorm"]
GroupNorm = _DROP_INS["GroupNorm"]
InstanceNorm = _DROP_INS["InstanceNorm"]
BatchRenorm = _DROP_INS["BatchRenorm"]
GhostBatchNorm = _DROP_INS["GhostBatchNorm"]
SequenceBatchNorm = _DROP_INS["SequenceBatchNorm"]


def convert(model: M, **overrides: Any) -> M:
    """Switches every Flax norm layer of ``model`` to its bn_jax drop-in, in place.

    Each ``flax.nnx`` BatchNorm, LayerNorm, RMSNorm, GroupNorm and
    InstanceNorm of ``model`` (``model`` itself included) becomes the drop-in
    of this module: the same object, with the same ``Param`` / ``BatchStat``
    variables and attributes, computing with bn_jax from now on. The stable
    variance replaces Flax's fast one unless ``use_fast_variance=True`` is
    passed. ``overrides`` set bn_jax options on every converted layer that has
    them (drop-ins already in the model included): e.g.
    ``convert(model, axis_name="batch")`` makes every BatchNorm a
    count-weighted synchronized BatchNorm.

    Args:
      model: an nnx Module.
      **overrides: bn_jax options (fields of the normalizers).

    Returns:
      ``model``, converted.

    Raises:
      TypeError: an override that no norm layer has.
    """
    _adapter.check_overrides(overrides)
    flax_classes = {getattr(nnx, name): name for name in _adapter.FLAX_NAMES}
    for _, module in list(nnx.iter_modules(model)):
        name = flax_classes.get(type(module))
        if name is None:
            name = next((n for n, c in _DROP_INS.items() if type(module) is c), None)
            if name is None:
                continue
        else:
            module.__class__ = _DROP_INS[name]
            for field, default in _adapter.DEFAULTS.items():
                if hasattr(module, field):
                    setattr(module, field, default)
        layer = LAYERS[name]
        have = [n for n in vars(module)]
        for f in layer.extras(have):
            setattr(module, f.name, layer.default(f))
        if layer.may_keep_state and not hasattr(module, "use_running_average"):
            module.use_running_average = False
        for field, value in overrides.items():
            if field in layer.option_names:
                setattr(module, field, value)
        _adapter.validate(layer, _options(module, layer))
        if layer.may_keep_state:  # e.g. count for momentum=None
            num_features = getattr(module, "num_features", None) or tuple(module.mean.shape)
            _create_missing(module, layer, num_features)
    return model
