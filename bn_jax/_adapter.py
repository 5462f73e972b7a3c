"""The one adapter behind :mod:`bn_jax.linen` and :mod:`bn_jax.nnx`.

A drop-in is described once, by a :class:`Layer`: the bn_jax normalizer it
runs and the Flax class it stands in for (if any). Everything else is
derived from that description, the same way for both Flax APIs:

* **Options.** Flax's own fields, inherited from Flax's class (same order,
  same defaults, so they cannot drift), then the normalizer's dataclass fields
  that Flax lacks (:meth:`Layer.extras`), so a new core field reaches the
  drop-ins without editing them. A layer without a Flax class has
  ``use_running_average`` (if it may keep running statistics) and the
  normalizer's fields.
* **Running statistics.** A normalizer with a ``momentum`` field may keep
  running statistics; whether it does for a given configuration (InstanceNorm
  only with ``track_running_stats``) is what its ``init`` returns.
* **Variables.** Names, shapes and dtypes come from the normalizer's
  ``init`` (run abstractly); parameters are made with the drop-in's own
  initializers, drawn in Flax's order (``scale`` before ``bias``).
* **Computation.** :func:`run`: the normalizer's ``apply``, with Flax's
  output dtype, or the plain complex formulas of :mod:`bn_jax._core.complex`
  for complex input.

Defaults that differ from Flax's are improvements and are listed in
``DEFAULTS``; ``docs/flax.md`` gives the reason for each.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen import dtypes

import bn_jax
from bn_jax._core import checks
from bn_jax._core import complex as complex_stats

FLAX_NAMES = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")

# Drop-in defaults that are not Flax's (or not the core's): the stable variance
# instead of Flax's E[x^2] - E[x]^2, and Flax's behaviour (no error) for a
# batch with one value per feature, the PyTorch-like check being opt-in.
DEFAULTS: Mapping[str, Any] = {"use_fast_variance": False, "allow_single_value": True}

# Options the adapters handle themselves: never passed to the normalizer.
ADAPTER_OPTIONS = frozenset(
    {"use_running_average", "force_float32_reductions", "promote_dtype", "num_features", "rngs"}
)


@dataclasses.dataclass(frozen=True)
class Layer:
    """The description of one drop-in.

    Attributes:
      core: the bn_jax normalizer class it runs.
      flax_name: the Flax class it stands in for (the same name in
        ``flax.linen`` and ``flax.nnx``), or None for a family member Flax
        does not have.
    """

    core: type
    flax_name: str | None = None

    @property
    def name(self) -> str:
        return self.core.__name__

    @property
    def fields(self) -> tuple[dataclasses.Field, ...]:
        """The normalizer's configuration fields."""
        return tuple(f for f in dataclasses.fields(self.core) if f.init)

    @property
    def option_names(self) -> tuple[str, ...]:
        """Fields passed to the normalizer (initializers are used by the adapter only)."""
        return tuple(f.name for f in self.fields if not f.name.endswith("_init"))

    @property
    def may_keep_state(self) -> bool:
        """Whether some configuration keeps running statistics (has a ``momentum``)."""
        return any(f.name == "momentum" for f in self.fields)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Learned parameters in Flax's creation order (``scale``, then ``bias``)."""
        names = {f.name for f in self.fields}
        return tuple(n for n in ("scale", "bias") if f"use_{n}" in names)

    def extras(self, flax_names: Iterable[str]) -> list[dataclasses.Field]:
        """Normalizer fields Flax's layer lacks, in the normalizer's order."""
        have = set(flax_names)
        return [f for f in self.fields if f.name not in have]

    def default(self, f: dataclasses.Field) -> Any:
        """The drop-in default of the normalizer field ``f`` (MISSING if required)."""
        if f.name in DEFAULTS:
            return DEFAULTS[f.name]
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return f.default

    def options(
        self,
        get: Callable[[str, Any], Any],
        native: bool = True,
        overrides: Mapping[str, Any] = MappingProxyType({}),
    ) -> dict[str, Any]:
        """The normalizer's options, read with ``get(name, drop-in default)``.

        ``overrides`` win. A Flax layer that is not a drop-in (``native=False``:
        under ``bn_jax.linen.patch``) takes the drop-in defaults of ``DEFAULTS``
        instead of its own values for those fields (Flax's defaults there are
        the ones bn_jax improves on).
        """
        out = {}
        for f in self.fields:
            if f.name.endswith("_init"):
                continue
            if f.name in overrides:
                out[f.name] = overrides[f.name]
            elif not native and f.name in DEFAULTS:
                out[f.name] = DEFAULTS[f.name]
            else:
                out[f.name] = get(f.name, self.default(f))
        return out

    def shapes(self, options: Mapping[str, Any], x: Any) -> tuple[dict, dict]:
        """``(params, state)`` as ShapeDtypeStructs for input (or feature sizes) ``x``,
        in creation order."""
        core = self.make(options)
        order: list[list[str]] = []

        def init(x: Any) -> Any:
            params, state = core.init(x)
            order[:] = [list(params), list(state)]
            return params, state

        spec = jax.ShapeDtypeStruct(x.shape, jnp.float32) if hasattr(x, "shape") else x
        params, state = jax.eval_shape(init, spec) if hasattr(x, "shape") else init(x)
        return {n: params[n] for n in order[0]}, {n: state[n] for n in order[1]}

    def initial_state(self, options: Mapping[str, Any], x: Any) -> dict[str, jax.Array]:
        """The normalizer's initial running statistics for ``x``."""
        spec = jax.ShapeDtypeStruct(x.shape, jnp.float32) if hasattr(x, "shape") else x
        return self.make(options).init(spec)[1]

    def make(self, options: Mapping[str, Any], **changes: Any) -> Any:
        """The normalizer configured with ``options`` (and ``changes``)."""
        known = {f.name for f in self.fields}
        kwargs = {k: v for k, v in {**options, **changes}.items() if k in known}
        if kwargs.get("dtype") is not None and jnp.issubdtype(kwargs["dtype"], jnp.complexfloating):
            kwargs["dtype"] = None  # complex output is made by complex_apply, not the core
        return self.core(**kwargs)


LAYERS: dict[str, Layer] = {
    "BatchNorm": Layer(bn_jax.BatchNorm, "BatchNorm"),
    "LayerNorm": Layer(bn_jax.LayerNorm, "LayerNorm"),
    "RMSNorm": Layer(bn_jax.RMSNorm, "RMSNorm"),
    "GroupNorm": Layer(bn_jax.GroupNorm, "GroupNorm"),
    "InstanceNorm": Layer(bn_jax.InstanceNorm, "InstanceNorm"),
    "BatchRenorm": Layer(bn_jax.BatchRenorm),
    "GhostBatchNorm": Layer(bn_jax.GhostBatchNorm),
    "SequenceBatchNorm": Layer(bn_jax.SequenceBatchNorm),
}


def run(
    layer: Layer,
    options: Mapping[str, Any],
    params: Mapping[str, jax.Array],
    state: Mapping[str, jax.Array],
    x: Any,
    *,
    training: bool,
    initializing: bool = False,
    mask: Any = None,
    **kwargs: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Applies the normalizer; returns ``(y, new_state)``.

    The output dtype is Flax's: ``dtype``, else the promoted type of ``x`` and
    the parameters. Integer input is normalized in float32, as in Flax. While
    ``initializing`` no collective runs and the one-value check is off (the
    example input of ``init`` is often a dummy such as ``jnp.ones((1, C))``).
    """
    x = jnp.asarray(x)
    out_dtype = dtypes.canonicalize_dtype(x, *params.values(), dtype=options.get("dtype"))
    changes: dict[str, Any] = {}
    if initializing:
        changes = {"axis_name": None, "axis_index_groups": None, "allow_single_value": True}
    if jnp.issubdtype(x.dtype, jnp.complexfloating) or jnp.issubdtype(
        out_dtype, jnp.complexfloating
    ):
        core = layer.make(options, **changes, dtype=None)
        return complex_apply(core, dict(params), dict(state), x, training, mask, out_dtype)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    core = layer.make(options, **changes, dtype=out_dtype)
    if mask is not None:
        kwargs["mask"] = mask
    return core.apply(dict(params), dict(state), x, training=training, **kwargs)


def stored(new: jax.Array, old: jax.Array) -> jax.Array:
    """A running statistic as written back: in the variable's dtype, unless it
    became complex (the running mean of complex input is complex, as in Flax)."""
    if jnp.issubdtype(new.dtype, jnp.complexfloating):
        return new
    return new.astype(old.dtype)


def complex_apply(
    core: Any,
    params: dict[str, jax.Array],
    state: dict[str, jax.Array],
    x: jax.Array,
    training: bool,
    mask: Any,
    out_dtype: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One of Flax's five layers on complex input (plain formulas, Flax's ``|x|^2`` variance)."""
    kind = type(core)
    ndim = x.ndim
    view = x
    use_mean = kind is not bn_jax.RMSNorm
    if kind is bn_jax.BatchNorm:
        feat = checks.resolve_axes(core.axis, ndim)
        red = tuple(i for i in range(ndim) if i not in feat)
    elif kind is bn_jax.InstanceNorm:
        feat = checks.resolve_axes(core.feature_axes, ndim, "feature_axes")
        red = tuple(i for i in range(1, ndim) if i not in feat)
    elif kind in (bn_jax.LayerNorm, bn_jax.RMSNorm):
        feat = checks.resolve_axes(core.feature_axes, ndim, "feature_axes")
        red = checks.resolve_axes(core.reduction_axes, ndim, "reduction_axes")
    elif kind is bn_jax.GroupNorm:
        (c,) = checks.resolve_axes(core.feature_axis, ndim, "feature_axis")
        red = tuple(range(1, ndim))
        if core.reduction_axes is not None:
            red = checks.resolve_axes(core.reduction_axes, ndim, "reduction_axes")
        channels = x.shape[c]
        groups = core.num_groups or channels // core.group_size
        split = (*x.shape[:c], groups, channels // groups, *x.shape[c + 1 :])
        view = x.reshape(split)
        red = tuple(sorted([a + (a > c) for a in red if a != c] + [c + 1]))
        feat = (c, c + 1)
        if mask is not None:
            mask = jnp.broadcast_to(mask, x.shape).reshape(split)
    else:
        raise TypeError(
            f"{kind.__name__} takes real input only; complex input is supported by the "
            f"drop-ins for Flax's layers ({', '.join(FLAX_NAMES)})."
        )

    pshape = [1] * view.ndim
    for a in feat:
        pshape[a] = view.shape[a]

    def shaped(v: jax.Array | None) -> jax.Array | None:
        return None if v is None else v.reshape(pshape)

    scale, bias = shaped(params.get("scale")), shaped(params.get("bias"))
    eps = float(core.epsilon)
    if state and not training:
        y = complex_stats.normalize(
            view, shaped(state["mean"]), shaped(state["var"]), scale, bias, eps, out_dtype
        )
        return y.reshape(x.shape), state
    count, mean, var = complex_stats.moments(
        view,
        red,
        mask,
        use_mean=use_mean,
        fast_variance=getattr(core, "use_fast_variance", False),
        axis_name=core.axis_name,
        axis_index_groups=core.axis_index_groups,
    )
    y = complex_stats.normalize(view, mean, var, scale, bias, eps, out_dtype).reshape(x.shape)
    if not (state and training):
        return y, state
    if kind is bn_jax.InstanceNorm:  # average the instance statistics over the batch
        w = count / jnp.maximum(jnp.sum(count, 0, keepdims=True), 1)
        mean, var, count = (jnp.sum(v, 0, keepdims=True) for v in (w * mean, w * var, count))
    fshape = state["mean"].shape
    return y, complex_stats.update_running(
        state,
        mean.reshape(fshape),
        var.reshape(fshape),
        count.reshape(fshape),
        momentum=core.momentum,
    )


def validate(layer: Layer, options: Mapping[str, Any]) -> None:
    """Raises the normalizer's own error for invalid ``options``."""
    layer.make(options)


def option_names() -> set[str]:
    """Every option of some drop-in (for checking ``patch`` / ``convert`` overrides)."""
    return {n for layer in LAYERS.values() for n in layer.option_names}


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Raises TypeError for an override that no drop-in has (values are checked by
    each normalizer when it is built)."""
    unknown = sorted(set(overrides) - option_names())
    if unknown:
        raise TypeError(
            f"unknown bn_jax option(s) {unknown}; the options are the fields of the bn_jax "
            f"normalizers, e.g. axis_name, use_fast_variance, unbiased_running_var."
        )


def with_keyword(sig: inspect.Signature, name: str, default: Any) -> inspect.Signature:
    """``sig`` with a keyword-only parameter ``name`` added before any ``**kwargs``."""
    params = list(sig.parameters.values())
    new = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
    at = len(params)
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        at -= 1
    return sig.replace(parameters=[*params[:at], new, *params[at:]])


def family_call_signature() -> inspect.Signature:
    """``(self, x, use_running_average=None, **kwargs)``: the call of a family member
    that Flax does not have (keyword arguments go to the normalizer's ``apply``)."""
    p = inspect.Parameter
    return inspect.Signature(
        [
            p("self", p.POSITIONAL_OR_KEYWORD),
            p("x", p.POSITIONAL_OR_KEYWORD),
            p("use_running_average", p.POSITIONAL_OR_KEYWORD, default=None),
            p("kwargs", p.VAR_KEYWORD),
        ]
    )


def call_doc(layer: Layer) -> str:
    """The docstring of a drop-in's ``__call__``."""
    return (
        f"Normalizes ``x`` with ``bn_jax.{layer.name}``; in training mode updates the "
        f"running statistics.\n\n"
        f"Args:\n"
        f"  x: the input.\n"
        f"  use_running_average: where the layer keeps running statistics: use them (True)\n"
        f"    or the batch's (False); overrides the attribute where Flax's layer allows.\n"
        f"  mask: boolean array broadcastable to ``x``; only True elements enter the\n"
        f"    statistics.\n"
        f"  **kwargs: passed to ``bn_jax.{layer.name}.apply`` (family members only).\n\n"
        f"Returns:\n"
        f"  The normalized ``x``, same shape.\n"
    )


def class_doc(layer: Layer, api: str, extras: Iterable[str]) -> str:
    """The docstring of a drop-in class for the Flax API ``api``."""
    core = f"``bn_jax.{layer.name}``"
    summary = (layer.core.__doc__ or "").strip().splitlines()[0]
    if layer.flax_name:
        head = (
            f"{summary}\n\n"
            f"Drop-in for ``{api}.{layer.flax_name}``, computed by {core}: it subclasses\n"
            f"Flax's class (same fields, order and defaults, except the stable\n"
            f"``use_fast_variance=False``), takes the same call arguments and creates the\n"
            f"same variables."
        )
    else:
        head = (
            f"{summary}\n\n"
            f"{core} as a ``{api}`` Module: its options are those of {core}"
            + (", plus ``use_running_average``" if layer.may_keep_state else "")
            + "."
        )
    names = [n for n in extras if n not in DEFAULTS or not layer.flax_name]
    more = ""
    if layer.flax_name and names:
        more = (
            "\n\nOptions beyond Flax's, after its fields: "
            + ", ".join(f"``{n}``" for n in names)
            + f" (see {core})."
        )
    return (
        f"{head}{more}\n\nSee {core} for the formula, the conventions and the paper, and the\n"
        f"documentation's Flax page for every deliberate difference from Flax.\n"
    )
