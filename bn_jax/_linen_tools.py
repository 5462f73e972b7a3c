"""Whole-model recalibration and folding for ``flax.linen`` models.

Both tools find the BatchNorm layers (``isinstance(m, flax.linen.BatchNorm)``,
so Flax's own layer and bn_jax's drop-ins) and the Dense/Conv layers with
``flax.linen.intercept_methods`` while the model runs; the model's code is not
touched. Exposed as ``bn_jax.linen.recalibrate`` and ``bn_jax.linen.fold``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax.core import FrozenDict, freeze

from bn_jax import _recalibrate
from bn_jax._model_tools import (
    LayerPath,
    Recorder,
    fold_problem,
    foldable_pairs,
    path_str,
    use_running_average,
)
from bn_jax.inference import fold_batch_norms

__all__ = ["Folded", "fold", "recalibrate"]

_LAYERS = (nn.Dense, nn.Conv)


def recalibrate(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    forward: Callable[[Any, Any], Any] | None = None,
    passes: int = 1,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any] | FrozenDict:
    r"""Recomputes every BatchNorm's ``mean`` and ``var`` as exact population statistics.

    The linen counterpart of PyTorch's ``torch.optim.swa_utils.update_bn(loader,
    model)``: the model runs on every batch, the input of each BatchNorm layer
    is captured (with ``flax.linen.intercept_methods``, no change to the
    model), and its ``batch_stats`` become, per feature over all batches and
    all calls of the layer::

        mean = sum(x) / n,   var = sum((x - mean)**2) / n    # n: all valid elements

    pooled exactly (count-weighted, not an EMA, not an average of per-batch
    variances); the BatchNorm's ``mask`` argument is honoured.

    What the layers see is what ``forward`` does. Run the model in training
    mode (each BatchNorm normalizes with its batch's statistics) for PyTorch's
    ``update_bn`` / "precise BN" in one pass. Run it in evaluation mode with
    ``passes`` set to the BatchNorm depth of the network to get exactly the
    statistics the evaluation-mode model sees: each pass runs with the previous
    pass's statistics, and pass ``k`` settles the layers at depth ``k``.

    Args:
      model: the linen module.
      variables: its variables, with a ``batch_stats`` collection.
      batches: an iterable of batches, or a callable returning a fresh one
        (needed when ``passes > 1`` and the batches come from a generator).
      forward: ``forward(variables, batch)`` runs the model on one batch; it is
        jitted and its output is ignored. Default:
        ``model.apply(variables, batch, mutable=True)``. E.g. for a model with
        a ``train`` flag: ``lambda v, b: model.apply(v, b["image"], train=True,
        mutable=["batch_stats"])``.
      passes: passes over ``batches``, each with the statistics of the last.
      progress: show a tqdm progress bar (when tqdm is installed).
      total: the number of batches, for the progress bar.

    Returns:
      ``variables`` with ``mean`` and ``var`` of every BatchNorm that ran
      replaced (in their dtype; the biased variance, as Flax keeps it, or
      ``M2 / (n - 1)`` for a layer with ``unbiased_running_var=True``; other
      entries kept; a feature that saw no valid element keeps its values). A
      ``FrozenDict`` stays frozen.

    Raises:
      ValueError: no batches, no BatchNorm called, ``passes`` < 1, a one-shot
        iterator with ``passes > 1``, a BatchNorm without ``batch_stats`` or
        whose statistics are not one per feature.
      TypeError: a ``passes`` that is not an int.

    With batch-sharded global arrays under ``jit`` nothing more is needed for
    several devices. BatchNorms inside lifted transforms (``nn.scan``,
    ``nn.vmap``, ``nn.remat``) are not supported.

    Example::

        variables = bn_jax.linen.recalibrate(model, variables, train_images)
    """
    _check_variables(variables, "recalibrate")
    if forward is None:

        def forward(v, batch):
            return model.apply(v, batch, mutable=True)

    unbiased: dict[LayerPath, bool] = {}  # each layer's variance convention, seen when tracing

    @jax.jit
    def moments(v, batch):
        calls: dict[LayerPath, list] = {}
        axes: dict[LayerPath, Any] = {}
        active: set[LayerPath] = set()

        def tap(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__" and isinstance(module, nn.BatchNorm):
                path = tuple(module.path)
                if path not in active:
                    calls.setdefault(path, []).append((args[0], kwargs.get("mask")))
                    axes[path] = module.axis
                    unbiased[path] = bool(getattr(module, "unbiased_running_var", False))
                    return _reentrant(active, path, next_fun, args, kwargs)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(tap):
            forward(v, batch)
        out = {}
        for path, c in calls.items():
            layer = f"BatchNorm {path_str(path)!r}"
            out[path] = _recalibrate.feature_moments(c, axes[path], f"the input of {layer}")
            _recalibrate.check_layer_stats(_stats_at(v, path), out[path], layer)
        return out

    def finish(v, pooled):
        new = _recalibrate.update_layers(
            pooled, {p: _stats_at(v, p) for p in pooled}, unbiased.__getitem__
        )
        tree = _plain(v)
        for path, stats in new.items():
            node = tree["batch_stats"]
            for name in path[:-1]:
                node = node[name]
            node[path[-1]] = dict(stats)
        return tree

    out = _recalibrate.run(
        lambda v, batch: (moments(v, batch), v),
        _plain(variables),  # one pytree type for every pass
        batches,
        finish=finish,
        passes=passes,
        progress=progress,
        total=total,
    )
    return freeze(out) if isinstance(variables, FrozenDict) else out


class Folded(nn.Module):
    """A linen model with some BatchNorms folded into the Dense/Conv before them.

    Made by :func:`fold`, applied to the variables it returns, and called as
    ``module`` is: ``Folded(...).apply(folded_variables, *args, **kwargs)``.
    The BatchNorms listed in ``folded`` are skipped (their input is returned,
    cast to the BatchNorm's output dtype) and the layers in ``added_bias``
    add the ``bias`` that folding gave them; everything else runs as in
    ``module``, on the same variable paths.

    Attributes:
      module: the original model.
      folded: ``(layer path, BatchNorm path)`` pairs that were folded.
      norm_dtypes: the output dtype of each folded BatchNorm, in that order.
      added_bias: paths of the layers that had no bias before folding.
    """

    module: nn.Module
    folded: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()
    norm_dtypes: tuple[str, ...] = ()
    added_bias: tuple[tuple[str, ...], ...] = ()

    def setup(self) -> None:
        nn.share_scope(self, self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        norms = {bn: dt for (_, bn), dt in zip(self.folded, self.norm_dtypes, strict=True)}
        biased = set(self.added_bias)
        root = len(self.path)
        active: set[LayerPath] = set()

        def skip(next_fun, args, kwargs, context):
            module = context.module
            path = tuple(module.path[root:])
            if context.method_name != "__call__" or path in active:
                return next_fun(*args, **kwargs)
            if path in norms and isinstance(module, nn.BatchNorm):
                if not use_running_average(module, args, kwargs):
                    raise ValueError(
                        f"Folded: BatchNorm {path_str(path)!r} was folded for evaluation but "
                        f"is called in training mode (use_running_average=False); train the "
                        f"unfolded model."
                    )
                return args[0].astype(norms[path])
            if path in biased and isinstance(module, _LAYERS):
                y = _reentrant(active, path, next_fun, args, kwargs)
                return y + module.get_variable("params", "bias").astype(y.dtype)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(skip):
            return self.module(*args, **kwargs)


def fold(
    model: nn.Module, variables: Mapping[str, Any], *args: Any, **kwargs: Any
) -> tuple[Folded, dict[str, Any]]:
    r"""Folds every BatchNorm that directly follows a Dense or Conv, for evaluation.

    The model is traced once as ``model.apply(variables, *args, **kwargs)``
    (abstractly: nothing is computed), which must run it in evaluation mode.
    A ``(layer, BatchNorm)`` pair is folded when the layer is a
    ``flax.linen.Dense`` or ``flax.linen.Conv`` (or a subclass), the BatchNorm's
    input is that layer's output and nothing else reads that output, every
    call of the layer feeds that BatchNorm and every call of the BatchNorm
    comes from that layer (shared layers fold only if all their uses agree),
    and the BatchNorm normalizes the last axis with one statistic per feature,
    without a mask. With ``f = scale / sqrt(var + epsilon)`` the layer gets
    ``kernel * f`` and ``(bias - mean) * f + beta``
    (:func:`bn_jax.fold_batch_norms`). Not folded (left as they are): a
    BatchNorm after anything else (an activation, an add, a pooling, a
    ``DenseGeneral`` or ``Einsum``), a layer whose output is also used
    elsewhere (a residual branch taken before the BatchNorm), channels-first
    BatchNorms, masked calls.

    Args:
      model: the linen module.
      variables: its variables (``params`` and ``batch_stats``).
      *args: the arguments of one evaluation call, e.g. an example batch.
      **kwargs: its keyword arguments, e.g. ``train=False``.

    Returns:
      ``(folded_model, folded_variables)``: ``folded_model.apply(folded_variables,
      *args, **kwargs)`` equals ``model.apply(variables, *args, **kwargs)`` to
      float rounding, for any input; ``folded_model.folded`` lists the pairs
      that were folded. The folded BatchNorms' entries are gone from the
      variables.

    Raises:
      ValueError: a BatchNorm ran in training mode during the trace.

    Example::

        folded, fvars = bn_jax.linen.fold(model, variables, x, train=False)
        y = folded.apply(fvars, x, train=False)
    """
    _check_variables(variables, "fold")
    recorder = Recorder()
    active: set[LayerPath] = set()

    def tap(next_fun, args, kwargs, context):
        module = context.module
        path = tuple(module.path)
        if context.method_name != "__call__" or path in active:
            return next_fun(*args, **kwargs)
        if isinstance(module, nn.BatchNorm):
            if not use_running_average(module, args, kwargs):
                raise ValueError(
                    f"fold: BatchNorm {path_str(path)!r} ran in training mode; call fold with "
                    f"the arguments of an evaluation call (e.g. train=False)."
                )
            mean: jax.Array | None = module.get_variable("batch_stats", "mean")
            problem = fold_problem(args[0], module.axis, mean, kwargs.get("mask"))
            x, call = recorder.norm_input(path, module, args[0], problem)
            y = _reentrant(active, path, next_fun, (x, *args[1:]), kwargs)
            call.out_dtype = y.dtype
            return y
        if isinstance(module, _LAYERS):
            y = _reentrant(active, path, next_fun, args, kwargs)
            return recorder.layer_output(path, module, y)
        return next_fun(*args, **kwargs)

    def run(v):
        with nn.intercept_methods(tap):
            return model.apply(v, *args, **kwargs)

    jaxpr = jax.make_jaxpr(run)(variables).jaxpr
    pairs = foldable_pairs(jaxpr, recorder.calls)
    folded_vars = _plain(variables)
    for layer, norm in pairs:
        folded_vars = fold_batch_norms(
            folded_vars, [(layer.path, norm.path)], epsilon=norm.module.epsilon
        )
    folded = Folded(
        model,
        folded=tuple((layer.path, norm.path) for layer, norm in pairs),
        norm_dtypes=tuple(str(norm.out_dtype) for _, norm in pairs),
        added_bias=tuple(layer.path for layer, _ in pairs if not layer.module.use_bias),
    )
    return folded, folded_vars


def _reentrant(active: set[LayerPath], path: LayerPath, next_fun, args, kwargs):
    """Calls ``next_fun`` with ``path`` marked active, so a ``super().__call__`` passes through."""
    active.add(path)
    try:
        return next_fun(*args, **kwargs)
    finally:
        active.discard(path)


def _check_variables(variables: Any, fn: str) -> None:
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        keys = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(
            f"{fn}: variables must be the model's variables with a 'batch_stats' collection, "
            f"got {keys}."
        )


def _stats_at(variables: Mapping[str, Any], path: LayerPath) -> Mapping[str, Any]:
    node = variables["batch_stats"]
    for name in path:
        if not isinstance(node, Mapping) or name not in node:
            raise ValueError(
                f"recalibrate: BatchNorm {path_str(path)!r} has no entry in variables"
                f"['batch_stats']."
            )
        node = node[name]
    return node


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree
