"""Whole-model recalibration and folding for ``flax.nnx`` models.

The BatchNorm (``isinstance(m, flax.nnx.BatchNorm)``: Flax's layer and
bn_jax's drop-ins), Linear and Conv layers are found with
``nnx.iter_modules``; their calls are observed by wrapping ``__call__`` of
their classes for the duration of one trace (calls of other instances pass
straight through), the technique ``nnx.capture`` uses. The model's code is not
touched. Exposed as ``bn_jax.nnx.recalibrate`` and ``bn_jax.nnx.fold``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
from flax import nnx

from bn_jax import _recalibrate
from bn_jax._model_tools import (
    LayerPath,
    Recorder,
    calls_of,
    fold_problem,
    foldable_pairs,
    path_str,
    use_running_average,
)
from bn_jax.inference import fold_into_conv, fold_into_dense

__all__ = ["FoldedBatchNorm", "fold", "recalibrate"]

_LAYERS = (nnx.Linear, nnx.Conv)


def recalibrate(
    model: nnx.Module,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
    passes: int = 1,
    progress: bool = True,
    total: int | None = None,
) -> None:
    r"""Recomputes every BatchNorm's ``mean`` and ``var`` in place as exact population statistics.

    The nnx counterpart of PyTorch's ``torch.optim.swa_utils.update_bn(loader,
    model)``: the model runs on every batch, the input of each BatchNorm is
    captured, and its ``mean`` / ``var`` become, per feature over all batches
    and all calls of the layer::

        mean = sum(x) / n,   var = sum((x - mean)**2) / n    # n: all valid elements

    pooled exactly (count-weighted, not an EMA, not an average of per-batch
    variances); the BatchNorm's ``mask`` argument is honoured. A layer with
    ``unbiased_running_var=True`` (a bn_jax drop-in option) gets
    ``M2 / (n - 1)``.

    The batches run on a functional copy of the model under ``jax.jit``, so
    the running statistics a training-mode call would write and the model's
    random state are not changed; only the recalibrated ``mean`` and ``var``
    are written back, once all passes are done. The copy's random state
    advances from batch to batch (dropout draws new masks).

    What the layers see is what ``forward`` does: in training mode
    (``model.train()`` before, or ``use_running_average=False`` at the call)
    each BatchNorm normalizes with its batch's statistics, PyTorch's
    ``update_bn`` / "precise BN" in one pass. In evaluation mode with ``passes``
    set to the BatchNorm depth of the network the result is exactly the
    statistics the evaluation-mode model sees (each pass runs with the last
    pass's statistics, and pass ``k`` settles the layers at depth ``k``).

    Args:
      model: the nnx module; updated in place.
      batches: an iterable of batches, or a callable returning a fresh one
        (needed when ``passes > 1`` and the batches come from a generator).
      forward: ``forward(model, batch)`` runs the model on one batch; it is
        jitted and its output is ignored. Default: ``model(batch)``.
      passes: passes over ``batches``, each with the statistics of the last.
      progress: show a tqdm progress bar (when tqdm is installed).
      total: the number of batches, for the progress bar.

    Raises:
      ValueError: no batches, no BatchNorm called, ``passes`` < 1, a one-shot
        iterator with ``passes > 1``, a BatchNorm whose statistics are not one
        per feature. The model is unchanged when it raises.
      TypeError: a ``passes`` that is not an int.

    With batch-sharded global arrays under ``jit`` nothing more is needed for
    several devices. BatchNorms inside ``nnx.scan`` / ``nnx.vmap`` are not
    supported.

    Example::

        model.train()
        bn_jax.nnx.recalibrate(model, train_images)
        model.eval()
    """
    if forward is None:

        def forward(m, batch):
            return m(batch)

    norms = {
        _key(path): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, nnx.BatchNorm)
    }
    # nnx.split types the states of several filters as a variadic tuple; two filters give two.
    graphdef, rngs, rest = nnx.split(model, nnx.RngState, ...)  # type: ignore[misc]

    @jax.jit
    def moments(rngs, rest, stats, batch):
        m = nnx.merge(graphdef, rngs, rest)
        targets = {}
        for path, module in nnx.iter_modules(m):
            key = _key(path)
            if key in stats and isinstance(module, nnx.BatchNorm):
                module.mean.set_value(stats[key]["mean"])
                module.var.set_value(stats[key]["var"])
                targets[id(module)] = (key, module)
        calls: dict[LayerPath, list] = {}

        def tap(module, key, call, args, kwargs):
            calls.setdefault(key, []).append((args[0], kwargs.get("mask")))
            return call(*args, **kwargs)

        with calls_of(targets, tap):
            forward(m, batch)
        out = {}
        for key, c in calls.items():
            layer = f"BatchNorm {path_str(key)!r}"
            out[key] = _recalibrate.feature_moments(c, norms[key].axis, f"the input of {layer}")
            _recalibrate.check_layer_stats(stats[key], out[key], layer)
        return out, nnx.state(m, nnx.RngState)

    def step(carry, batch):
        rngs, stats = carry
        out, rngs = moments(rngs, rest, stats, batch)
        return out, (rngs, stats)

    def finish(carry, pooled):
        rngs, stats = carry
        new = _recalibrate.update_layers(
            pooled,
            {k: stats[k] for k in pooled},
            lambda k: getattr(norms[k], "unbiased_running_var", False),
        )
        return rngs, {**stats, **new}

    stats = {key: {"mean": m.mean[...], "var": m.var[...]} for key, m in norms.items()}
    _, stats = _recalibrate.run(
        step,
        (rngs, stats),
        batches,
        finish=finish,
        passes=passes,
        progress=progress,
        total=total,
    )
    for key, module in norms.items():
        module.mean.set_value(stats[key]["mean"])
        module.var.set_value(stats[key]["var"])


class FoldedBatchNorm(nnx.Module):
    """Stands in for a BatchNorm that :func:`fold` merged into the layer before it.

    Returns its input cast to the BatchNorm's output dtype. Evaluation only: it
    keeps ``use_running_average`` (so ``model.train()`` / ``model.eval()`` reach
    it) and raises when a call would run in training mode.
    """

    def __init__(self, dtype: str, use_running_average: bool = True) -> None:
        self.dtype = dtype
        self.use_running_average = use_running_average

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        if not (self.use_running_average if use_running_average is None else use_running_average):
            raise ValueError(
                "FoldedBatchNorm: this BatchNorm was folded into the layer before it for "
                "evaluation and cannot run in training mode (use_running_average=False); "
                "train the unfolded model, or call model.eval()."
            )
        return x.astype(self.dtype)


def fold(model: nnx.Module, *args: Any, **kwargs: Any) -> nnx.Module:
    r"""Returns a copy of ``model`` with every BatchNorm that follows a Linear/Conv folded.

    The model is traced once as ``model(*args, **kwargs)`` (abstractly:
    nothing is computed) and must run in evaluation mode (``model.eval()``).
    A ``(layer, BatchNorm)`` pair is folded when the layer is an
    ``nnx.Linear`` or ``nnx.Conv`` (or a subclass), the BatchNorm's input is
    that layer's output and nothing else reads that output, every call of the
    layer feeds that BatchNorm and every call of the BatchNorm comes from that
    layer, and the BatchNorm normalizes the last axis without a mask. In the
    copy the layer's ``kernel`` becomes ``kernel * f`` and its ``bias``
    ``(bias - mean) * f + beta`` with ``f = scale / sqrt(var + epsilon)`` (a
    bias is added where it had none), and the BatchNorm is replaced by a
    :class:`FoldedBatchNorm`, which returns its input. Not folded (left as they
    are): a BatchNorm after anything else (an activation, an add, a pooling,
    ``LinearGeneral``, ``Einsum``), a layer whose output is also used
    elsewhere, channels-first BatchNorms, masked calls.

    Args:
      model: the nnx module; not modified.
      *args: the arguments of one evaluation call, e.g. an example batch.
      **kwargs: its keyword arguments.

    Returns:
      The folded copy: ``fold(model, x)(y)`` equals ``model(y)`` to float
      rounding for any input ``y`` the model accepts.

    Raises:
      ValueError: a BatchNorm ran in training mode during the trace.

    Example::

        model.eval()
        folded = bn_jax.nnx.fold(model, x)
    """
    graphdef, state = nnx.split(model)
    recorder = Recorder()

    def tap(module, path, call, args, kwargs):
        if isinstance(module, nnx.BatchNorm):
            if not use_running_average(module, args, kwargs):
                raise ValueError(
                    f"fold: BatchNorm {path_str(path)!r} ran in training mode; call "
                    f"model.eval() before fold."
                )
            problem = fold_problem(args[0], module.axis, module.mean, kwargs.get("mask"))
            x, record = recorder.norm_input(path, module, args[0], problem)
            y = call(x, *args[1:], **kwargs)
            record.out_dtype = y.dtype
            return y
        return recorder.layer_output(path, module, call(*args, **kwargs))

    def run(state):
        m = nnx.merge(graphdef, state)
        targets = {
            id(module): (path, module)
            for path, module in nnx.iter_modules(m)
            if isinstance(module, (nnx.BatchNorm, *_LAYERS))
        }
        with calls_of(targets, tap):
            return m(*args, **kwargs)

    pairs = foldable_pairs(jax.make_jaxpr(run)(state).jaxpr, recorder.calls)
    folded = nnx.clone(model)
    # The copy's layers and BatchNorms by path, of the types the trace recorded them as.
    layers = {p: m for p, m in nnx.iter_modules(folded) if isinstance(m, _LAYERS)}
    norms = {p: m for p, m in nnx.iter_modules(folded) if isinstance(m, nnx.BatchNorm)}
    replaced = {}
    for layer_call, norm_call in pairs:
        layer, norm = layers[layer_call.path], norms[norm_call.path]
        fold_fn = fold_into_dense if isinstance(layer, nnx.Linear) else fold_into_conv
        kernel, bias = fold_fn(
            layer.kernel[...],
            None if layer.bias is None else layer.bias[...],
            {
                name: getattr(norm, name)[...]
                for name in ("scale", "bias")
                if getattr(norm, name) is not None
            },
            {"mean": norm.mean[...], "var": norm.var[...]},
            epsilon=norm.epsilon,
        )
        layer.kernel.set_value(kernel)
        if layer.bias is None:
            layer.bias = nnx.Param(bias)
            layer.use_bias = True
        else:
            layer.bias.set_value(bias)
        replaced[norm_call.path] = FoldedBatchNorm(str(norm_call.out_dtype))
    return nnx.recursive_map(lambda path, node: replaced.get(path, node), folded)


def _key(path: LayerPath) -> tuple[str, ...]:
    return tuple(str(p) for p in path)
