"""What the linen and nnx model tools share: no flax here.

Recalibration pools, per BatchNorm layer, the ``(count, mean, M2)`` of every
input the layer received (all its calls, all batches) with the core's
count-weighted merge. Folding finds which BatchNorm follows which Dense/Conv
from one trace of the model: each layer output and each BatchNorm input is
passed through a named identity (``jax.ad_checkpoint.checkpoint_name``), and in
the traced program a pair is foldable when the BatchNorm's input *is* the
layer's output and nothing else reads that value.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jcore

from bn_jax._core import checks
from bn_jax._core.stats import Moments, local_moments
from bn_jax.inference import _finalize, _len, _merge, _progress

Path = tuple[Any, ...]


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path) or "<root>"


# --------------------------------------------------------------------- recalibration


def feature_moments(calls: Sequence[tuple[jax.Array, Any]], axis: Any, path: Path) -> Moments:
    """Moments over everything but the feature axes, pooled over one layer's calls.

    Each call's input is laid out as ``(elements, features...)`` and the calls
    are concatenated, so a layer applied several times (to inputs of different
    batch or spatial sizes) gets the statistics of all its inputs at once.
    """
    flat, masks, fshape = [], [], None
    for x, mask in calls:
        checks.check_input(x, f"the input of BatchNorm {path_str(path)!r}")
        axes = checks.resolve_axes(checks.canonical_axis(axis), x.ndim)
        shape = tuple(x.shape[a] for a in axes)
        if fshape is not None and shape != fshape:
            raise ValueError(
                f"recalibrate: BatchNorm {path_str(path)!r} was called with {fshape} and "
                f"{shape} features."
            )
        fshape = shape
        front = tuple(i for i in range(x.ndim) if i not in axes)
        flat.append(jnp.transpose(x, front + axes).reshape(-1, *fshape))
        m = checks.check_mask(mask, x.shape)
        m = jnp.ones(x.shape, bool) if m is None else jnp.broadcast_to(m, x.shape)
        masks.append(jnp.transpose(m, front + axes).reshape(-1, *fshape))
    x = jnp.concatenate(flat) if len(flat) > 1 else flat[0]
    m = None if all(mask is None for _, mask in calls) else jnp.concatenate(masks)
    return Moments(*(v.reshape(fshape) for v in local_moments(x, (0,), m)))


def check_stats_shape(stats: Mapping[str, Any], moments: Moments, path: Path) -> None:
    for key in ("mean", "var"):
        if key not in stats:
            raise ValueError(
                f"recalibrate: BatchNorm {path_str(path)!r} has no batch statistic {key!r} "
                f"(it has {sorted(stats)})."
            )
        if tuple(jnp.shape(stats[key])) != tuple(moments.mean.shape):
            raise ValueError(
                f"recalibrate: BatchNorm {path_str(path)!r} keeps {key!r} of shape "
                f"{tuple(jnp.shape(stats[key]))} but its input has features "
                f"{tuple(moments.mean.shape)}; only one statistic per feature can be "
                f"recalibrated."
            )


def pool_passes(
    step: Callable[[Any, Any], tuple[dict[str, Moments], Any]],
    carry: Any,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    old_stats: Callable[[Any, list[Any]], dict[str, Mapping[str, jax.Array]]],
    unbiased: Callable[[Any], bool],
    write: Callable[[Any, dict[str, dict[str, jax.Array]]], Any],
    passes: int,
    progress: bool,
    total: int | None,
) -> Any:
    """Runs ``passes`` passes of ``step(carry, batch) -> (moments, carry)``.

    After each pass the pooled moments of every layer replace its ``mean`` and
    ``var`` (``write``), so the next pass runs with them; a feature that saw no
    valid element keeps its old values. ``var`` is ``M2 / n``, or
    ``M2 / (n - 1)`` for the layers where ``unbiased(key)`` (a BatchNorm that
    keeps PyTorch's unbiased running variance).
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"recalibrate: passes must be an int >= 1, got {passes!r}.")
    if passes > 1 and not callable(batches) and iter(batches) is batches:
        raise ValueError(
            f"recalibrate: passes={passes} reads batches more than once, but batches is a "
            f"one-shot iterator; pass a list or a callable that returns a fresh iterable."
        )
    for p in range(passes):
        data = batches() if callable(batches) else batches
        n = total if total is not None else _len(data)
        desc = "recalibrate" if passes == 1 else f"recalibrate {p + 1}/{passes}"
        acc = None
        for batch in _progress(data, n, desc, progress):
            moments, carry = step(carry, batch)
            acc = moments if acc is None else _merge(acc, moments)
        if acc is None:
            raise ValueError("recalibrate: batches yielded no batch.")
        if not acc:
            raise ValueError("recalibrate: the model called no BatchNorm layer.")
        new = {}
        for flag in (False, True):
            group = {k: m for k, m in acc.items() if bool(unbiased(k)) == flag}
            if group:
                new.update(_finalize(group, old_stats(carry, list(group)), unbiased=flag))
        carry = write(carry, new)
    return carry


# --------------------------------------------------------------------------- folding


@dataclasses.dataclass
class Call:
    """One traced call of a Dense/Conv (``"layer"``) or BatchNorm (``"norm"``)."""

    kind: str
    path: Path
    module: Any
    marker: str
    problem: str | None = None  # why this call cannot take part in a fold
    out_dtype: Any = None  # a BatchNorm's output dtype, kept by the folded model


class Recorder:
    """Marks layer outputs and BatchNorm inputs with named identities while tracing."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def layer_output(self, path: Path, module: Any, y: jax.Array) -> jax.Array:
        call = Call("layer", path, module, f"bn_jax.fold:{len(self.calls)}")
        self.calls.append(call)
        return checkpoint_name(y, call.marker)

    def norm_input(
        self, path: Path, module: Any, x: jax.Array, problem: str | None
    ) -> tuple[jax.Array, Call]:
        call = Call("norm", path, module, f"bn_jax.fold:{len(self.calls)}", problem)
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


def foldable_pairs(jaxpr: jcore.Jaxpr, calls: Sequence[Call]) -> list[tuple[Call, Call]]:
    """``(layer, norm)`` pairs where every call of each is paired with a call of the other.

    A layer is folded into a BatchNorm only when every one of its outputs goes
    to that BatchNorm and nowhere else, and every input of the BatchNorm is
    such an output: folding rewrites the layer's weights for all its uses.
    """
    by_marker = {c.marker: c for c in calls}
    links = _links(jaxpr, {c.marker for c in calls if c.kind == "layer"})
    layers: dict[Path, list[Call]] = {}
    norms: dict[Path, list[Call]] = {}
    for c in calls:
        (layers if c.kind == "layer" else norms).setdefault(c.path, []).append(c)
    norm_of_layer = {layer: by_marker[norm].path for norm, layer in links.items()}
    pairs = []
    for path, norm_calls in norms.items():
        sources = [by_marker.get(links.get(c.marker, "")) for c in norm_calls]
        if any(s is None for s in sources) or any(c.problem for c in norm_calls):
            continue
        layer_paths = {s.path for s in sources}
        if len(layer_paths) != 1:
            continue
        layer_calls = layers[layer_paths.pop()]
        if all(norm_of_layer.get(c.marker) == path for c in layer_calls):
            pairs.append((layer_calls[0], norm_calls[0]))
    return pairs
