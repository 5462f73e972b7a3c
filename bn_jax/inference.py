"""Inference tools: fold BatchNorm into the layer before it, recalibrate statistics.

Folding (Jacob et al. 2018, section 3.2; the standard inference rewrite): a
BatchNorm in evaluation mode after a Dense or Conv layer ``z = x @ W + b`` is
itself affine,

    y = (z - mean) * scale / sqrt(var + epsilon) + beta,

so with ``f = scale / sqrt(var + epsilon)`` per output feature,

    W' = W * f            (each output column of the kernel scaled)
    b' = (b - mean) * f + beta

and ``x @ W' + b'`` equals the two layers up to float rounding, with no
BatchNorm left to run.

Recalibration ("precise BN", Wu & Johnson 2021; AdaBN, Li et al. 2016): replace
the running statistics (an exponential average of batch statistics taken while
the weights were still moving) by the exact population mean and variance of the
BatchNorm inputs over a stream of batches. Each batch contributes its
``(count, mean, M2)`` from the library core; batches (and devices) are pooled
with the count-weighted merge of Chan et al. (1979),

    n = n_a + n_b,   mean = mean_a + n_b (mean_b - mean_a) / n,
    M2 = M2_a + M2_b + n_a n_b (mean_b - mean_a)**2 / n,

so the result is the mean and variance of all the data at once, not an average
of per-batch variances, whatever the batch sizes and masks.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax import _recalibrate
from bn_jax._core import checks
from bn_jax._core.stats import Moments, merge_across
from bn_jax.norms._common import broadcast_shape

__all__ = ["fold_batch_norms", "fold_into_conv", "fold_into_dense", "recalibrate"]

# A module path in a variables tree, as the user spells it: "block1/bn" or ("block1", "bn").
ModulePath = str | Sequence[str]


# --------------------------------------------------------------------------- folding


def fold_into_dense(
    kernel: jax.Array,
    bias: jax.Array | None,
    params: Mapping[str, jax.Array] | None,
    state: Mapping[str, jax.Array],
    *,
    epsilon: float = 1e-5,
    feature_axis: int | tuple[int, ...] = -1,
) -> tuple[jax.Array, jax.Array]:
    r"""Merges an evaluation-mode BatchNorm that follows a Dense layer into it.

    With ``f = scale / sqrt(var + epsilon)`` per output feature::

        kernel' = kernel * f                  # along feature_axis
        bias'   = (bias - mean) * f + beta

    so that ``x @ kernel' + bias'`` equals ``BatchNorm(x @ kernel + bias)``
    in evaluation mode, to float rounding. The arithmetic is done in at least
    float32 and the results are cast back to the kernel's (and bias's) dtype,
    so a bf16 kernel stays bf16 and is rounded once.

    Args:
      kernel: the Dense kernel, Flax layout ``(in, out)``: the output
        features are along ``feature_axis`` (default last). A PyTorch
        ``Linear.weight`` is ``(out, in)``: pass ``feature_axis=0``.
        ``DenseGeneral`` kernels with several output axes take a tuple.
      bias: the layer's bias (output-feature shaped), or ``None`` for a layer
        without bias; a bias is then created (the folded layer needs one),
        in the kernel's dtype.
      params: the BatchNorm's ``{"scale", "bias"}``; a missing key (or
        ``None`` / ``{}``) means the BatchNorm has no scale (1) or no bias (0).
      state: the BatchNorm's running statistics ``{"mean", "var"}``.
      epsilon: the BatchNorm's epsilon.
      feature_axis: the output-feature axis or axes of ``kernel``.

    Returns:
      ``(kernel, bias)`` of the folded layer.

    Raises:
      ValueError: a per-feature array whose shape does not match the kernel's
        output features, a ``feature_axis`` out of range, or a non-positive
        ``epsilon``.
      TypeError: a non-float kernel, or ``params`` / ``state`` not dicts.

    Note:
      The folded bias is ``beta - (mean - bias) * f``: the folded layer
      produces large pre-activations and cancels them with a large bias where
      the unfolded one subtracts the mean after the matmul. When ``|mean|``
      is far above the feature's standard deviation both lose about the same
      digits in the float32 matmul (docs/design.md).

    Example::

        k, b = bn_jax.fold_into_dense(
            v["params"]["Dense_0"]["kernel"], v["params"]["Dense_0"].get("bias"),
            v["params"]["BatchNorm_0"], v["batch_stats"]["BatchNorm_0"])

    Reference: B. Jacob et al., "Quantization and Training of Neural Networks
    for Efficient Integer-Arithmetic-Only Inference", CVPR 2018.
    """
    kernel = _as_kernel(kernel, "fold_into_dense")
    if kernel.ndim < 2:
        raise ValueError(
            f"fold_into_dense: kernel must have rank >= 2 ((in, out) for Flax Dense), got "
            f"shape {tuple(kernel.shape)}."
        )
    return _fold(kernel, bias, params, state, epsilon, feature_axis, "fold_into_dense")


def fold_into_conv(
    kernel: jax.Array,
    bias: jax.Array | None,
    params: Mapping[str, jax.Array] | None,
    state: Mapping[str, jax.Array],
    *,
    epsilon: float = 1e-5,
    feature_axis: int | tuple[int, ...] = -1,
) -> tuple[jax.Array, jax.Array]:
    r"""Merges an evaluation-mode BatchNorm that follows a convolution into it.

    The same rewrite as :func:`fold_into_dense`: with
    ``f = scale / sqrt(var + epsilon)`` per output channel, every output
    channel's filter is scaled by ``f`` and ``bias' = (bias - mean) * f + beta``.
    Grouped and depthwise convolutions fold the same way (their kernels also
    carry one filter per output channel).

    Args:
      kernel: the convolution kernel, Flax layout ``HWIO`` (``(spatial...,
        in, out)``, rank >= 3) with the output channels last. PyTorch's
        ``OIHW`` needs ``feature_axis=0``.
      bias: the layer's bias ``[out]``, or ``None`` (then a bias is created in
        the kernel's dtype).
      params: the BatchNorm's ``{"scale", "bias"}`` (missing keys: no scale /
        no bias).
      state: the BatchNorm's running statistics ``{"mean", "var"}``.
      epsilon: the BatchNorm's epsilon.
      feature_axis: the output-channel axis of ``kernel``.

    Returns:
      ``(kernel, bias)`` of the folded convolution; ``kernel`` keeps its dtype.

    Raises:
      ValueError: a kernel of rank < 3 (use :func:`fold_into_dense`), or
        shapes that do not match (see :func:`fold_into_dense`).
      TypeError: as :func:`fold_into_dense`.

    Example::

        k, b = bn_jax.fold_into_conv(conv["kernel"], conv.get("bias"), bn_params, bn_state)
    """
    kernel = _as_kernel(kernel, "fold_into_conv")
    if kernel.ndim < 3:
        raise ValueError(
            f"fold_into_conv: kernel must be a convolution kernel of rank >= 3 (HWIO: "
            f"(spatial..., in, out)), got shape {tuple(kernel.shape)}; for a Dense kernel "
            f"use fold_into_dense."
        )
    return _fold(kernel, bias, params, state, epsilon, feature_axis, "fold_into_conv")


def fold_batch_norms(
    variables: Mapping[str, Any],
    pairs: Mapping[ModulePath, ModulePath] | Sequence[tuple[ModulePath, ModulePath]],
    *,
    epsilon: float = 1e-5,
) -> dict[str, Any]:
    """Folds BatchNorms into the Dense/Conv before them in a Flax linen variable tree.

    Works on the plain nested dicts of ``model.init`` / a checkpoint
    (``{"params": ..., "batch_stats": ...}``); it does not need flax. For
    each ``(layer, batch_norm)`` pair the layer's ``kernel`` and ``bias`` are
    replaced by the folded ones (a ``bias`` is added where the layer had
    none), and the BatchNorm's entries are removed from ``params`` and
    ``batch_stats`` (and ``batch_stats`` itself once empty). The result is
    the variables of the same model with those BatchNorms deleted and the
    folded layers built with ``use_bias=True``; other collections are kept.

    Args:
      variables: a Flax linen variables dict (``FrozenDict`` is fine).
      pairs: ``{layer: batch_norm}`` or a sequence of ``(layer, batch_norm)``
        module paths inside ``params``, e.g. ``("Conv_0", "BatchNorm_0")`` or
        ``("block1/conv", "block1/bn")`` (a ``/``-separated string or a tuple
        of names).
      epsilon: the BatchNorms' epsilon (Flax's default is 1e-5).

    Returns:
      A new variables dict of plain dicts; ``variables`` is not modified.

    Raises:
      ValueError: a path that is not in the tree (the message lists what is
        there), a layer without ``kernel``, a BatchNorm without
        ``mean`` / ``var`` in ``batch_stats``, or a BatchNorm named twice.

    Example::

        folded = bn_jax.fold_batch_norms(variables, [("Conv_0", "BatchNorm_0")])
        y = FoldedNet().apply(folded, x)   # the model without BatchNorm_0
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            "fold_batch_norms: variables must be a Flax variables dict with a 'params' "
            f"collection, got {type(variables).__name__}"
            + (f" with keys {sorted(variables)}." if isinstance(variables, Mapping) else ".")
        )
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    out = _to_dict(variables)
    stats = out.get("batch_stats", {})
    seen: set[tuple[str, ...]] = set()
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(
                f"fold_batch_norms: pairs must hold (layer, batch_norm) path pairs, got {item!r}."
            )
        layer_path, bn_path = _path(item[0]), _path(item[1])
        if bn_path in seen:
            raise ValueError(f"fold_batch_norms: pairs names BatchNorm {bn_path!r} twice.")
        seen.add(bn_path)
        layer = _lookup(out["params"], layer_path, "params", "layer")
        if not isinstance(layer, dict) or "kernel" not in layer:
            keys = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
            raise ValueError(
                f"fold_batch_norms: params at {'/'.join(layer_path)!r} has no 'kernel' "
                f"({keys}); the first of each pair must be a Dense or Conv layer."
            )
        bn_state = _lookup(stats, bn_path, "batch_stats", "batch_norm")
        bn_params = _lookup(out["params"], bn_path, "params", "batch_norm", missing_ok=True)
        kernel, bias = _fold(
            _as_kernel(layer["kernel"], "fold_batch_norms"),
            layer.get("bias"),
            bn_params,
            bn_state,
            epsilon,
            -1,
            "fold_batch_norms",
        )
        layer["kernel"], layer["bias"] = kernel, bias
        _remove(out["params"], bn_path)
        _remove(stats, bn_path)
    if "batch_stats" in out and not out["batch_stats"]:
        del out["batch_stats"]
    return out


def _as_kernel(kernel: Any, fn: str) -> jax.Array:
    checks.check_input(kernel, f"{fn}: kernel")
    return jnp.asarray(kernel)


def _fold(kernel, bias, params, state, epsilon, feature_axis, fn):
    checks.check_epsilon(epsilon)
    params = {} if params is None else params
    for name, tree in (("params", params), ("state", state)):
        if not isinstance(tree, Mapping):
            raise TypeError(f"{fn}: {name} must be a dict, got {type(tree).__name__}.")
    for key in ("mean", "var"):
        if key not in state:
            raise ValueError(
                f"{fn}: state has no {key!r} (keys: {sorted(state)}); pass the BatchNorm's "
                f"running statistics {{'mean', 'var'}} (Flax: its batch_stats)."
            )
    axes = checks.resolve_axes(checks.canonical_axis(feature_axis), kernel.ndim, "feature_axis")
    fshape = tuple(kernel.shape[a] for a in axes)
    per_feature = {
        "state['mean']": state["mean"],
        "state['var']": state["var"],
        "params['scale']": params.get("scale"),
        "params['bias']": params.get("bias"),
        "bias": bias,
    }
    for name, v in per_feature.items():
        if v is not None and tuple(jnp.shape(v)) != fshape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(jnp.shape(v))} but the kernel of shape "
                f"{tuple(kernel.shape)} has {fshape} output features along "
                f"feature_axis={feature_axis!r}; a PyTorch (out, in) kernel needs feature_axis=0."
            )
    return _fold_arrays(
        kernel,
        None if bias is None else jnp.asarray(bias),
        params.get("scale"),
        params.get("bias"),
        jnp.asarray(state["mean"]),
        jnp.asarray(state["var"]),
        epsilon=float(epsilon),
        axes=axes,
    )


@partial(jax.jit, static_argnames=("epsilon", "axes"))
def _fold_arrays(kernel, bias, scale, beta, mean, var, *, epsilon, axes):
    """The folding arithmetic, in at least float32; one compiled program."""
    arrays = [a for a in (kernel, bias, scale, beta, mean, var) if a is not None]
    dt = checks.stat_dtype(*(a.dtype for a in arrays))
    factor = lax.rsqrt(var.astype(dt) + jnp.asarray(epsilon, dt))
    if scale is not None:
        factor = factor * scale.astype(dt)
    new_bias = -mean.astype(dt) if bias is None else bias.astype(dt) - mean.astype(dt)
    new_bias = new_bias * factor
    if beta is not None:
        new_bias = new_bias + beta.astype(dt)
    factor = factor.reshape(broadcast_shape(kernel.ndim, axes, factor.shape))
    new_kernel = kernel.astype(dt) * factor
    bias_dtype = kernel.dtype if bias is None else bias.dtype
    return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)


def _to_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _path(p: ModulePath) -> tuple[str, ...]:
    if isinstance(p, str):
        parts = tuple(s for s in p.split("/") if s)
    elif isinstance(p, Sequence) and all(isinstance(s, str) for s in p):
        parts = tuple(p)
    else:
        parts = ()
    if not parts:
        raise TypeError(
            f"fold_batch_norms: a module path must be a non-empty '/'-separated string or a "
            f"tuple of names, got {p!r}."
        )
    return parts


def _lookup(tree, path, collection, role, missing_ok=False):
    node = tree
    for i, name in enumerate(path):
        if not isinstance(node, dict) or name not in node:
            if missing_ok:
                return None
            here = "/".join(path[:i]) or "the top level"
            keys = sorted(node) if isinstance(node, dict) else []
            raise ValueError(
                f"fold_batch_norms: {role} path {'/'.join(path)!r} is not in {collection!r}: "
                f"{here} has {keys}."
            )
        node = node[name]
    return node


def _remove(tree: dict, path: tuple[str, ...]) -> None:
    """Deletes ``path`` from ``tree`` and any parent that becomes empty."""
    parents = [tree]
    for name in path[:-1]:
        node = parents[-1].get(name)
        if not isinstance(node, dict):
            return
        parents.append(node)
    parents[-1].pop(path[-1], None)
    for parent, name in zip(reversed(parents[:-1]), reversed(path[:-1]), strict=True):
        if parent[name]:
            break
        del parent[name]


# ----------------------------------------------------------------------- recalibration


def recalibrate(
    fn: Callable[..., Any] | None,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    state: Any = None,
    passes: int = 1,
    axis: int | tuple[int, ...] = -1,
    masked: bool = False,
    unbiased: bool = False,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    map_fn: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    progress: bool = True,
    total: int | None = None,
) -> Any:
    r"""Recomputes BatchNorm statistics as the exact population statistics of a data stream.

    For every BatchNorm input ``x`` that ``fn`` returns, over all batches::

        mean = sum(x) / n,   var = sum((x - mean)**2) / n    # n: all valid elements

    per feature (the features are along ``axis``), exactly as if every batch
    were concatenated into one: each batch contributes ``(count, mean, M2)``
    and they are pooled with Chan et al.'s count-weighted merge (not an EMA,
    not an average of per-batch variances). Batches may differ in size (an
    uneven last batch is fine; it costs one more compile), masks may drop
    elements, and devices are pooled as well.

    Two ways to call it:

    * ``state=None``: ``fn(batch)`` returns the BatchNorm inputs (one array,
      or a pytree of arrays, one per layer) and the result has the same
      structure with ``{"mean", "var"}`` in place of each array. ``fn=None``
      takes the batches themselves as the inputs.
    * ``state`` given (the model's BatchNorm states: a pytree of
      ``{"mean", "var", ...}`` dicts): ``fn(state, batch)`` returns the
      BatchNorm inputs computed *with* ``state`` (in the same structure), and
      the result is ``state`` with ``mean`` / ``var`` replaced (other keys
      kept). Over ``passes`` passes the statistics of one pass feed the next.

    Whole models. A BatchNorm's input depends on the statistics of the
    BatchNorms before it, so recalibrating all layers from one pass measures
    each layer's inputs under the *old* statistics of the earlier ones. Two
    answers, pick one:

    * one pass with ``fn`` running the model in training mode (each layer
      normalized with its batch statistics) and returning the BatchNorm
      inputs: the usual "precise BN" (PyTorch's ``swa_utils.update_bn``,
      Wu & Johnson 2021); cost one pass.
    * ``state`` with ``fn`` running the model in evaluation mode and
      ``passes`` set to the BatchNorm depth (the most BatchNorms on any path
      through the network): pass ``k`` makes the layers at depth ``k`` exact,
      because their inputs depend only on shallower layers, which earlier
      passes settled. The result equals recalibrating layer by layer in order
      (the statistics the evaluation-mode model really sees), without having
      to say which layer comes first. Fewer passes give a cheaper
      approximation.

    Uses: after training, to replace EMA statistics that lag the weights
    (precise BN); after folding, pruning or quantization, which change the
    activations; and for test-time domain adaptation (AdaBN): run it on
    unlabeled target-domain batches.

    Devices. With global batch-sharded arrays under ``jit`` nothing is needed.
    Inside ``shard_map`` / ``pmap``, set ``axis_name`` (each batch's
    statistics are merged across the devices with one collective) and give
    ``map_fn``, which wraps the per-batch statistics function before it is
    jitted and must return the replicated result, e.g.::

        map_fn=lambda f: jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P())
        map_fn=lambda f: jax.pmap(f, axis_name="data", out_axes=None)

    (with ``state``, ``f`` takes ``(state, batch)``: ``in_specs=(P(), P("data"))``,
    ``in_axes=(None, 0)``). ``jax.make_mesh`` gives Explicit axes by default:
    put each batch with ``NamedSharding(mesh, P("data"))`` first (or build the
    mesh with ``AxisType.Auto``). ``pmap`` wants batches with a leading device
    axis.

    Args:
      fn: maps a batch (or ``state, batch``) to the BatchNorm inputs; with
        ``masked=True`` to ``(inputs, masks)``, ``masks`` with the structure of
        ``inputs`` (``None`` where a layer has none). It is jitted: keep it
        pure. ``None``: the identity.
      batches: an iterable of batches (anything ``fn`` accepts), or a
        callable returning a fresh one (needed when ``passes > 1`` and the
        batches are a generator).
      state: the BatchNorm states to update; see above.
      passes: passes over ``batches`` (``state`` required when > 1).
      axis: the feature axis or axes of every input (statistics are taken
        over all the others).
      masked: ``fn`` returns ``(inputs, masks)``; only elements where the
        mask is True count. A feature with no valid element keeps its value
        in ``state`` (mean 0, var 1 without ``state``).
      unbiased: store ``M2 / (n - 1)`` (PyTorch's running-variance
        convention, ``unbiased_running_var=True``) instead of ``M2 / n``.
      axis_name: mapped axis whose devices' statistics are merged per batch.
      axis_index_groups: merge within these groups of device indices only.
      map_fn: wraps the per-batch statistics function (``shard_map``, ``pmap``)
        before ``jax.jit``.
      progress: show a tqdm progress bar (when tqdm is installed).
      total: number of batches, for the progress bar (default ``len(batches)``
        when it has one).

    Returns:
      The new statistics: ``{"mean", "var"}`` per input (``state=None``) or
      the updated ``state``, in float32 (``state``'s dtype when given).

    Raises:
      ValueError: no batches, ``passes`` < 1 or > 1 without ``state`` or with a
        one-shot iterator, a ``state`` whose structure or shapes do not match
        the inputs, a ``mask`` that does not broadcast, an unbound
        ``axis_name``.
      TypeError: non-float inputs, a non-int ``passes``, a non-callable
        ``fn``, ``masked=True`` with ``fn`` not returning a pair.

    A non-finite batch makes the result non-finite: recalibration is a
    measurement, and it shows bad data rather than skipping it.

    Example::

        stats = bn_jax.recalibrate(lambda b: features(params, b), loader)
        state = bn_jax.recalibrate(eval_features, loader, state=state, passes=3)

    References: Y. Wu and J. Johnson, "Rethinking 'Batch' in BatchNorm",
    2021; Y. Li et al., "Revisiting Batch Normalization For Practical Domain
    Adaptation" (AdaBN), 2016; T. F. Chan, G. H. Golub and R. J. LeVeque,
    "Updating Formulae and a Pairwise Algorithm for Computing Sample
    Variances", 1979.
    """
    _recalibrate.check_passes(passes, batches)
    if passes > 1 and state is None:
        raise ValueError(
            f"recalibrate: passes={passes} needs state (each pass recomputes the inputs with "
            f"the previous pass's statistics); without state every pass would be the same."
        )
    if fn is not None and not callable(fn):
        raise TypeError(f"recalibrate: fn must be callable or None, got {type(fn).__name__}.")
    axis = checks.canonical_axis(axis)
    groups = checks.canonical_groups(axis_index_groups, axis_name)

    def batch_moments(*args):
        out = args[-1] if fn is None else fn(*args)
        if masked:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError(
                    "recalibrate: masked=True expects fn to return (inputs, masks), got "
                    f"{type(out).__name__}."
                )
            xs, masks = out
        else:
            xs, masks = out, None
        leaves, treedef = jax.tree.flatten(xs)
        if not leaves:
            raise ValueError("recalibrate: fn returned no arrays.")
        mask_leaves = [None] * len(leaves) if masks is None else _up_to(treedef, masks, "masks")
        if axis_name is not None:
            checks.bound_axis_size(axis_name, groups, "recalibrate")
        moments = []
        for x, m in zip(leaves, mask_leaves, strict=True):
            mom = _recalibrate.feature_moments([(x, m)], axis, "an input returned by fn")
            moments.append(mom if axis_name is None else merge_across(mom, axis_name, groups))
        return jax.tree.unflatten(treedef, moments)

    jitted = jax.jit(batch_moments if map_fn is None else map_fn(batch_moments))

    def step(state, batch):
        return (jitted(batch) if state is None else jitted(state, batch)), state

    def finish(state, pooled):
        leaves, treedef = jax.tree.flatten(pooled, is_leaf=lambda t: isinstance(t, Moments))
        olds = [None] * len(leaves) if state is None else _up_to(treedef, state, "state")
        for m, old in zip(leaves, olds, strict=True):
            if old is None:
                continue
            if not isinstance(old, Mapping) or "mean" not in old or "var" not in old:
                raise ValueError(
                    "recalibrate: every entry of state that matches an input must be a "
                    f"BatchNorm state {{'mean', 'var', ...}}, got {old!r}."
                )
            if jnp.shape(old["mean"]) != m.mean.shape:
                raise ValueError(
                    f"recalibrate: state['mean'] has shape {jnp.shape(old['mean'])} but the "
                    f"input fn returns for it has {m.mean.shape} features along the axis."
                )
        new = _recalibrate.population(
            leaves,
            [None if o is None else (jnp.asarray(o["mean"]), jnp.asarray(o["var"])) for o in olds],
            unbiased=(bool(unbiased),) * len(leaves),
        )
        return jax.tree.unflatten(
            treedef,
            [
                {"mean": mean, "var": var} if old is None else {**old, "mean": mean, "var": var}
                for (mean, var), old in zip(new, olds, strict=True)
            ],
        )

    return _recalibrate.run(
        step, state, batches, finish=finish, passes=passes, progress=progress, total=total
    )


def _up_to(treedef, tree, name):
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"recalibrate: {name} must have the structure of the inputs fn returns ({treedef}): {e}"
        ) from None
