"""What the linen and nnx model tools share: no flax here.

Both faces of each tool find a model's layers as it runs, by type, without
touching its code: linen with ``flax.linen.intercept_methods``, nnx (and any
framework whose layers are Python objects) with :func:`calls_of`, which routes
the calls of given instances through a tap for the duration of one trace.

Recalibration's loop is ``bn_jax._recalibrate``. Folding finds which BatchNorm
follows which Dense/Conv from one trace of the model: each layer output and
each BatchNorm input is passed through a named identity
(``jax.ad_checkpoint.checkpoint_name``), and in the traced program a pair is
foldable when the BatchNorm's input *is* the layer's output and nothing else
reads that value.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jcore

# Where a layer sits in a model: the names (nnx: names and indices) from the root.
LayerPath = tuple[Any, ...]


def path_str(path: LayerPath) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def use_running_average(module: Any, args: tuple, kwargs: Mapping[str, Any]) -> bool:
    """The mode of a Flax BatchNorm call: the call's argument, else the field (as Flax decides)."""
    at_call = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    return bool(module.use_running_average if at_call is None else at_call)


def fold_problem(x: jax.Array, axis: int | tuple[int, ...], mean: Any, mask: Any) -> str | None:
    """Why a BatchNorm call cannot be folded (``mean``: its running mean), or None."""
    if mask is not None:
        return "masked"
    axes = axis if isinstance(axis, tuple) else (axis,)
    if tuple(a % x.ndim for a in axes) != (x.ndim - 1,):
        return "feature axes are not the last axis"
    if mean is None or tuple(mean.shape) != (x.shape[-1],):
        return "not one statistic per feature"
    return None


@contextlib.contextmanager
def calls_of(targets: Mapping[int, tuple[Any, Any]], tap: Callable) -> Iterator[None]:
    """Routes calls of the ``targets`` instances (``{id(module): (info, module)}``) through ``tap``.

    ``tap(module, info, call, args, kwargs)`` gets the bound original ``__call__``
    as ``call``. Each class is wrapped once, with the ``__call__`` it resolved
    before any wrapping, and a call made while the same instance is already in
    ``tap`` (a subclass calling ``super().__call__``) goes straight through.
    Calls of other instances of those classes are not touched.
    """
    classes = {type(module) for _, module in targets.values()}
    originals = {cls: cls.__call__ for cls in classes}
    own = {cls: cls.__dict__.get("__call__") for cls in classes}
    active: set[int] = set()

    def wrap(original):
        def __call__(self, *args, **kwargs):
            if id(self) not in targets or id(self) in active:
                return original(self, *args, **kwargs)
            active.add(id(self))
            try:
                info, _ = targets[id(self)]
                return tap(self, info, lambda *a, **k: original(self, *a, **k), args, kwargs)
            finally:
                active.discard(id(self))

        return __call__

    try:
        for cls, original in originals.items():
            cls.__call__ = wrap(original)
        yield
    finally:
        for cls in classes:
            saved = own[cls]
            if saved is None:
                del cls.__call__
            else:
                cls.__call__ = saved


# --------------------------------------------------------------------------- folding


@dataclasses.dataclass
class TracedCall:
    """One traced call of a Dense/Conv (``"layer"``) or BatchNorm (``"norm"``)."""

    kind: str
    path: LayerPath
    module: Any
    marker: str
    problem: str | None = None  # why this call cannot take part in a fold
    out_dtype: Any = None  # a BatchNorm's output dtype, kept by the folded model


class Recorder:
    """Marks layer outputs and BatchNorm inputs with named identities while tracing."""

    def __init__(self) -> None:
        self.calls: list[TracedCall] = []

    def layer_output(self, path: LayerPath, module: Any, y: jax.Array) -> jax.Array:
        call = TracedCall("layer", path, module, f"bn_jax.fold:{len(self.calls)}")
        self.calls.append(call)
        return checkpoint_name(y, call.marker)

    def norm_input(
        self, path: LayerPath, module: Any, x: jax.Array, problem: str | None
    ) -> tuple[jax.Array, TracedCall]:
        call = TracedCall("norm", path, module, f"bn_jax.fold:{len(self.calls)}", problem)
        self.calls.append(call)
        return checkpoint_name(x, call.marker), call


def _jaxprs(jaxpr: jcore.Jaxpr) -> Iterator[jcore.Jaxpr]:
    yield jaxpr
    for eqn in jaxpr.eqns:
        for param in eqn.params.values():
            for p in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(p, jcore.ClosedJaxpr):
                    yield from _jaxprs(p.jaxpr)
                elif isinstance(p, jcore.Jaxpr):
                    yield from _jaxprs(p)


def _links(jaxpr: jcore.Jaxpr, layer_markers: set[str]) -> dict[str, str]:
    """``{norm marker: layer marker}`` where the norm's input is the layer's output only."""
    links = {}
    for j in _jaxprs(jaxpr):
        uses = Counter(v for e in j.eqns for v in e.invars if isinstance(v, jcore.Var))
        uses.update(v for v in j.outvars if isinstance(v, jcore.Var))
        marks = [e for e in j.eqns if e.primitive.name == "name"]
        made = {e.outvars[0]: e.params["name"] for e in marks if e.params["name"] in layer_markers}
        for e in marks:
            src = e.invars[0]
            if isinstance(src, jcore.Var) and src in made and uses[src] == 1:
                links[e.params["name"]] = made[src]
    return links


def foldable_pairs(
    jaxpr: jcore.Jaxpr, calls: Sequence[TracedCall]
) -> list[tuple[TracedCall, TracedCall]]:
    """``(layer, norm)`` pairs where every call of each is paired with a call of the other.

    A layer is folded into a BatchNorm only when every one of its outputs goes
    to that BatchNorm and nowhere else, and every input of the BatchNorm is
    such an output: folding rewrites the layer's weights for all its uses.
    """
    by_marker = {c.marker: c for c in calls}
    links = _links(jaxpr, {c.marker for c in calls if c.kind == "layer"})
    layers: dict[LayerPath, list[TracedCall]] = {}
    norms: dict[LayerPath, list[TracedCall]] = {}
    for c in calls:
        (layers if c.kind == "layer" else norms).setdefault(c.path, []).append(c)
    norm_of_layer = {layer: by_marker[norm].path for norm, layer in links.items()}
    pairs = []
    for path, norm_calls in norms.items():
        sources = [by_marker.get(links.get(c.marker, "")) for c in norm_calls]
        linked = [s for s in sources if s is not None]
        if len(linked) < len(sources) or any(c.problem for c in norm_calls):
            continue
        layer_paths = {s.path for s in linked}
        if len(layer_paths) != 1:
            continue
        layer_calls = layers[layer_paths.pop()]
        if all(norm_of_layer.get(c.marker) == path for c in layer_calls):
            pairs.append((layer_calls[0], norm_calls[0]))
    return pairs
