"""The Equinox face of the registry: how the matrix tests run a normalizer of
``tests/registry.py`` through its ``bn_jax.equinox`` layer.

A :class:`Face` builds the Equinox layer that computes what a core normalizer
computes (Equinox's constructor, from the normalizer's configuration and the
input shape), and :func:`apply` calls it on a batch in the core's layout
(batch first, features last) the way an Equinox user does: one example per
call under ``jax.vmap`` (with the layer's ``axis_name`` for the stateful
layers, the ``eqx.nn.State`` unbatched: ``in_axes=(0, None), out_axes=(0,
None)``), and returns the output in the core's layout. :func:`core_state`
reads a layer's running statistics from its ``eqx.nn.State`` as the core's
state dict, :func:`core_step` says what one training call computes in the
core's terms (Equinox's rules where they are not the core's), and
:func:`inference_state` the statistics an inference call normalizes with.

Adding an Equinox layer means adding one entry to ``FACES``; the error,
bad-batch and fuzz matrices then run it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.registry import NORMALIZERS, X_SHAPE

try:  # an optional extra: without it the Equinox cases skip
    import equinox as eqx

    import bn_jax.equinox as bnx
except ImportError:  # pragma: no cover
    eqx = bnx = None

AXIS = "batch"  # the axis_name of every stateful layer: the vmap over the examples


@dataclasses.dataclass(frozen=True)
class Face:
    """How one ``bn_jax.equinox`` layer stands for a registry normalizer.

    Attributes:
      layer: the class name in ``bn_jax.equinox``.
      build: ``(cfg, shape, **options) -> layer``: the layer (Equinox's
        constructor) that computes what the core normalizer with the fields
        ``cfg`` (every field, by name) computes on an input of ``shape`` (the
        core's layout). Values are passed on unchecked, so that the layer's
        own checks see them; a configuration the layer cannot express is an
        AssertionError.
      layout: how an example is cut from the core's batch: ``"channels_first"``
        (``(B, *spatial, C)`` -> examples ``(C, *spatial)``), ``"sequence"``
        (``(B, T, C)`` -> ``(T, C)``) or ``"trailing"`` (the trailing axes that
        LayerNorm / RMSNorm normalize over; every leading axis is mapped).
      stateful: called with an ``eqx.nn.State`` under a ``vmap`` that binds
        ``AXIS``; the others are per-example layers.
      state_option: an option (of the layer and the core normalizer alike)
        that makes a per-example layer stateful when True.
      config: core options the layer always has (merged over the registry
        entry's config).
      options: Equinox's own options and the values the fuzz draws (the
        first is the default).
    """

    layer: str
    build: Callable[..., Any]
    layout: str
    stateful: bool = False
    state_option: str | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)


def _affine(cfg) -> bool:
    """Equinox's ``channelwise_affine``: scale and bias together."""
    assert cfg["use_scale"] == cfg["use_bias"], "channelwise_affine: scale and bias together"
    return cfg["use_scale"]


def _plain(cfg, **fields) -> None:
    """Refuses a core configuration the Equinox layer cannot express."""
    for name, want in fields.items():
        assert cfg[name] == want, f"{name}={cfg[name]!r}: the Equinox layer has {want!r}"


def _batch_options(cfg) -> dict[str, Any]:
    """bn_jax's options of the BatchNorm-like layers."""
    _plain(cfg, axis=-1, axis_name=None, axis_index_groups=None)
    keys = ("use_fast_variance", "unbiased_running_var", "allow_single_value", "count_skipped")
    return {k: cfg[k] for k in keys}


def _batch_args(cfg) -> tuple[Any, ...]:
    """Equinox's ``eps, channelwise_affine, momentum``."""
    return cfg["epsilon"], _affine(cfg), cfg["momentum"]


def _batch_norm(cfg, shape, mode="batch"):
    return bnx.BatchNorm(shape[-1], AXIS, *_batch_args(cfg), mode=mode, **_batch_options(cfg))


def _batch_renorm(cfg, shape):
    return bnx.BatchRenorm(
        shape[-1], AXIS, *_batch_args(cfg), rmax=cfg["rmax"], dmax=cfg["dmax"],
        **_batch_options(cfg),
    )  # fmt: skip


def _sequence_batch_norm(cfg, shape):
    _plain(cfg, time_axis=1)
    assert len(shape) == 3, f"SequenceBatchNorm's examples are (time, features), got {shape}"
    return bnx.SequenceBatchNorm(
        shape[-1], cfg["max_steps"], AXIS, *_batch_args(cfg), **_batch_options(cfg)
    )


def _ghost_batch_norm(cfg, shape):
    return bnx.GhostBatchNorm(
        shape[-1], AXIS, *_batch_args(cfg), virtual_batch_size=cfg["virtual_batch_size"],
        **_batch_options(cfg),
    )  # fmt: skip


def _group_norm(cfg, shape):
    _plain(cfg, feature_axis=-1, reduction_axes=None, axis_name=None)
    return bnx.GroupNorm(
        cfg["num_groups"], shape[-1], cfg["epsilon"], _affine(cfg),
        use_fast_variance=cfg["use_fast_variance"], memory_efficient=cfg["memory_efficient"],
    )  # fmt: skip


def _instance_norm(cfg, shape, track_running_stats=False):
    _plain(cfg, feature_axes=-1, axis_name=None, axis_index_groups=None)
    _plain(cfg, track_running_stats=track_running_stats)
    keys = ("use_fast_variance", "momentum", "unbiased_running_var", "allow_single_value",
            "count_skipped")  # fmt: skip
    return bnx.InstanceNorm(
        shape[-1], cfg["epsilon"], _affine(cfg), track_running_stats=track_running_stats,
        axis_name=AXIS if track_running_stats else None, **{k: cfg[k] for k in keys},
    )  # fmt: skip


def example_rank(cfg, ndim: int) -> int:
    """How many trailing axes a LayerNorm / RMSNorm example has: the axes it reduces
    over, which must also be its feature axes, and trailing."""
    red = sorted(a % ndim for a in np.atleast_1d(cfg["reduction_axes"]))
    feat = sorted(a % ndim for a in np.atleast_1d(cfg["feature_axes"]))
    assert red == feat == list(range(ndim - len(red), ndim)) and red[0] > 0, (
        f"reduction_axes={cfg['reduction_axes']}, feature_axes={cfg['feature_axes']}: "
        f"Equinox's layer normalizes whole examples"
    )
    return len(red)


def _layer_norm(cfg, shape):
    _plain(cfg, zero_centered_scale=False, axis_name=None)
    return bnx.LayerNorm(
        shape[len(shape) - example_rank(cfg, len(shape)) :], cfg["epsilon"],
        use_weight=cfg["use_scale"], use_bias=cfg["use_bias"],
        use_fast_variance=cfg["use_fast_variance"], memory_efficient=cfg["memory_efficient"],
    )  # fmt: skip


def _rms_norm(cfg, shape, use_bias=False):
    """Equinox's RMSNorm has a bias, added after the core's output (in float32,
    rounded once): with ``use_bias=False`` it is the core's RMSNorm."""
    _plain(cfg, zero_centered_scale=False, axis_name=None, dtype=None)
    return bnx.RMSNorm(
        shape[len(shape) - example_rank(cfg, len(shape)) :], cfg["epsilon"],
        use_weight=cfg["use_scale"], use_bias=use_bias, memory_efficient=cfg["memory_efficient"],
    )  # fmt: skip


# Registry name -> its Equinox face.
FACES: dict[str, Face] = {
    "BatchNorm": Face(
        "BatchNorm", _batch_norm, "channels_first", stateful=True,
        options={"mode": ("batch", "ema")},
    ),
    "BatchRenorm": Face("BatchRenorm", _batch_renorm, "channels_first", stateful=True),
    "GhostBatchNorm": Face("GhostBatchNorm", _ghost_batch_norm, "channels_first", stateful=True),
    "SequenceBatchNorm": Face(
        "SequenceBatchNorm", _sequence_batch_norm, "sequence", stateful=True
    ),
    "GroupNorm": Face("GroupNorm", _group_norm, "channels_first"),
    "InstanceNorm": Face(
        "InstanceNorm", _instance_norm, "channels_first", state_option="track_running_stats",
        config={"track_running_stats": False, "allow_single_value": True},
        options={"track_running_stats": (False, True)},
    ),
    "LayerNorm": Face("LayerNorm", _layer_norm, "trailing"),
    "RMSNorm": Face("RMSNorm", _rms_norm, "trailing", options={"use_bias": (False, True)}),
}  # fmt: skip

NAMES = list(FACES)
STATEFUL = [n for n in NAMES if FACES[n].stateful]


def variants(names: list[str] = NAMES) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{case: (name, options)}``: each face with its default options, and with each
    other value of one of them (e.g. ``"BatchNorm-mode=ema"``)."""
    cases = {}
    for name in names:
        cases[name] = (name, {})
        for key, values in FACES[name].options.items():
            for value in values[1:]:
                cases[f"{name}-{key}={value}"] = (name, {key: value})
    return cases


def stateful(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether the face ``name`` with Equinox's ``options`` is a stateful layer."""
    face = FACES[name]
    return face.stateful or bool((options or {}).get(face.state_option or ""))


def stateful_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """The cases of :func:`variants` whose layer is stateful."""
    return {case: v for case, v in variants().items() if stateful(*v)}


def require() -> None:
    if bnx is None:
        pytest.skip("equinox is not installed (the bn_jax[equinox] extra)")


def core(name: str, options: Mapping[str, Any] | None = None, **extra: Any) -> Any:
    """The core normalizer of the registry entry ``name`` that its face, with Equinox's
    ``options``, can stand for."""
    face = FACES[name]
    state = {face.state_option: stateful(name, options)} if face.state_option else {}
    return NORMALIZERS[name].build(**{**face.config, **state, **extra})


def build(name: str, norm: Any = None, shape: tuple[int, ...] = X_SHAPE, *,
          changes: Mapping[str, Any] | None = None, **options: Any):  # fmt: skip
    """``(layer, state)``: the Equinox layer standing for the core normalizer ``norm``
    (by default the registry entry's) with its fields ``changes`` (passed to
    Equinox's constructor unchecked) on inputs of ``shape``, and its fresh
    ``eqx.nn.State`` (None for a per-example layer)."""
    require()
    face = FACES[name]
    norm = core(name, options) if norm is None else norm
    cfg = {f.name: getattr(norm, f.name) for f in dataclasses.fields(norm)}
    layer = face.build({**cfg, **(changes or {})}, tuple(shape), **options)
    return layer, (eqx.nn.State(layer) if stateful(name, options) else None)


def with_params(layer, params: Mapping[str, Any]):
    """``layer`` with the core's ``params`` as its ``weight`` / ``bias`` (those it has)."""
    names = [n for n, k in (("weight", "scale"), ("bias", "bias")) if k in params]
    if not names:
        return layer
    return eqx.tree_at(
        lambda m: tuple(getattr(m, n) for n in names),
        layer,
        tuple(jnp.asarray(params[k], getattr(layer, n).dtype)
              for n, k in (("weight", "scale"), ("bias", "bias")) if n in names),
    )  # fmt: skip


# ------------------------------------------------------------------ calling


def to_examples(name: str, x: Any, ndim_example: int | None = None) -> np.ndarray:
    """The core's batch ``x`` as a batch of Equinox examples (batch axis first)."""
    x = np.asarray(x)  # NumPy: a layout change compiles nothing
    layout = FACES[name].layout
    if layout == "channels_first":
        return np.moveaxis(x, -1, 1)
    if layout == "trailing":
        return x.reshape((-1, *x.shape[x.ndim - ndim_example :]))
    return x


def from_examples(name: str, y: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`to_examples`."""
    y = np.asarray(y)
    if FACES[name].layout == "channels_first":
        return np.moveaxis(y, 1, -1)
    return y.reshape(shape)


@eqx.filter_jit if eqx is not None else (lambda f: f)
def call(layer, state, x, mask=None, *, training: bool = True, bound: bool = True,
         mask_per_example: bool = True):  # fmt: skip
    """The layer on a batch of Equinox examples ``x``, each call on one example under
    ``jax.vmap`` (binding ``AXIS`` unless ``bound`` is False); ``mask`` holds one
    mask per example (``mask_per_example``) or one for all. Returns ``(y, state)``."""
    mask_axis = 0 if mask is not None and mask_per_example else None
    if state is None:
        return jax.vmap(lambda x, m: layer(x, mask=m), in_axes=(0, mask_axis))(x, mask), None

    def one(x, m, s):
        return layer(x, s, inference=not training, mask=m)

    return jax.vmap(
        one, axis_name=AXIS if bound else None, in_axes=(0, mask_axis, None), out_axes=(0, None)
    )(x, mask, state)


def apply(name: str, layer, state, x, *, training: bool = True, mask=None):
    """``(y, new state)`` of one call of the face ``name``'s ``layer`` on the batch
    ``x`` in the core's layout (``mask``: broadcastable to ``x``); ``y`` is in the
    core's layout."""
    x = np.asarray(x)
    k = len(getattr(layer, "shape", ()))  # LayerNorm / RMSNorm: the example's rank
    xe = to_examples(name, x, k)
    me = None if mask is None else to_examples(name, np.broadcast_to(mask, x.shape), k)
    ye, new = call(layer, state, xe, me, training=training)
    return from_examples(name, ye, x.shape), new


# ------------------------------------------------------------- the core's terms


def core_state(layer, state) -> dict[str, jax.Array]:
    """The running statistics held in ``state`` for ``layer``, as the core's state
    dict. BatchNorm's ``"batch"`` mode holds Equinox's hidden averages, which are
    the core's running statistics from mean 0 / var 1 (``hidden = m * hidden + (1
    - m) * batch``); ``"ema"`` mode holds the moving averages themselves."""
    if isinstance(layer, bnx.BatchNorm):
        index = layer.batch_state_index if layer.mode == "batch" else layer.ema_state_index
        out = dict(zip(("mean", "var"), state.get(index), strict=True))
        for key, index in (("count", layer.count_index), ("skipped", layer.skipped_index)):
            if index is not None:
                out[key] = state.get(index)
        return out
    return dict(state.get(layer.state_index))


def _batch_mode(layer) -> bool:
    """BatchNorm's ``"batch"`` mode with a moving average (hidden values to debias)."""
    return isinstance(layer, bnx.BatchNorm) and layer.mode == "batch" and layer.momentum is not None


def _debiased(mean, var, t: int, momentum: float):
    """Equinox's hidden ``"batch"`` averages after ``t`` steps, debiased (float64):
    ``mean = hidden_mean / (1 - m**t)``, ``var = (hidden_var - m**t) / (1 - m**t)``
    (documented on the Equinox page), mean 0 and var 1 while ``1 - m**t`` is 0."""
    weight = 1.0 - np.float64(momentum) ** t
    mean, var = np.float64(mean), np.float64(var)
    if weight == 0:
        return np.zeros_like(mean), np.ones_like(var)
    return mean / weight, (var - (1 - weight)) / weight


def inference_state(layer, state) -> dict[str, Any]:
    """The statistics an inference call normalizes with, as the core's state: the
    running statistics, debiased in BatchNorm's ``"batch"`` mode."""
    stats = core_state(layer, state)
    if not _batch_mode(layer):
        return stats
    t = int(state.get(layer.batch_counter))
    mean, var = _debiased(stats["mean"], stats["var"], t, layer.momentum)
    return {**stats, "mean": mean.astype(np.float32), "var": var.astype(np.float32)}


def inference_rounding(layer, state) -> tuple[Any, Any] | None:
    """Bounds on the float32 rounding of :func:`inference_state`'s mean and variance
    (None where they are the stored values): BatchNorm's ``"batch"`` mode divides
    hidden values by ``1 - m**t``."""
    if not _batch_mode(layer):
        return None
    stats = core_state(layer, state)
    decay = np.float64(layer.momentum) ** int(state.get(layer.batch_counter))
    weight = 1.0 - decay
    if weight == 0:  # mean 0 and var 1, exactly
        return None
    eps = 4 * float(np.finfo(np.float32).eps)
    return (
        eps * np.abs(np.float64(stats["mean"])) / weight,
        eps * (np.abs(np.float64(stats["var"])) + decay) / weight,
    )


def _skipped(x, mask):
    """Per feature (the last axis): no valid element, or a valid one that is not finite."""
    x = np.asarray(x, np.float64)
    valid = np.broadcast_to(True if mask is None else mask, x.shape).reshape(-1, x.shape[-1])
    finite = np.isfinite(x.reshape(valid.shape)) | ~valid
    return ~valid.any(0) | ~finite.all(0)


@functools.partial(jax.jit, static_argnums=0, static_argnames="training")
def core_apply(norm, params, state, x, mask=None, *, training: bool = True):
    """``norm.apply``, compiled (one program instead of many eager operations)."""
    return norm.apply(params, state, x, training=training, mask=mask)


def core_step(layer, norm, params, state, x, mask=None, *, steps: int = 0, first: bool = True):
    """``(y, new state)``: what one training call of ``layer`` computes, in the core's
    terms (``norm`` on the whole batch ``x``, core layout, from the core ``state``,
    after ``steps`` training calls).

    Equinox's rules that are not the core's: ``"ema"`` mode copies the batch
    statistics on its first step (``first``) and, after it, normalizes the batch
    with the running statistics after this step's update; in ``"batch"`` mode a
    channel the non-finite guard skips keeps its debiased estimate (its hidden
    averages become those that debias to it one step later); RMSNorm adds its
    bias to the float32 output and rounds once.
    """
    if getattr(layer, "mode", None) == "ema":
        if first:
            norm = dataclasses.replace(norm, momentum=0.0)
        y, new = core_apply(norm, params, state, x, mask)
        if not first:
            y, _ = core_apply(norm, params, new, x, training=False)
        return y, new
    if isinstance(layer, bnx.RMSNorm) and layer.bias is not None:
        wide = dataclasses.replace(norm, dtype=jnp.float32)
        y, new = core_apply(wide, {k: v for k, v in params.items() if k != "bias"}, state, x, mask)
        return (np.asarray(y) + params["bias"]).astype(np.asarray(x).dtype), new
    y, new = core_apply(norm, params, state, x, mask)
    if _batch_mode(layer):
        m = np.float64(layer.momentum)
        mean, var = _debiased(state["mean"], state["var"], steps, m)
        decay = m ** (steps + 1)
        kept = {"mean": (1 - decay) * mean, "var": decay + (1 - decay) * var}
        skipped = _skipped(x, mask)
        for k, v in kept.items():
            new[k] = np.where(skipped, v.astype(np.float32), np.asarray(new[k]))
    return y, new
