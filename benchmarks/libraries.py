"""The BatchNorm layers the micro-benchmark times, behind one calling convention.

Each library gives ``init(x) -> (params, state)`` and ``apply(params, state, x,
training) -> (y, state)``, with ``params`` a pytree of arrays to differentiate:
bn_jax's functional ``BatchNorm``, ``flax.linen.BatchNorm`` (default settings),
and, when they are installed, Haiku's and Equinox's BatchNorm.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import jax

import bn_jax


@dataclasses.dataclass(frozen=True)
class Library:
    """A BatchNorm under test: ``init(x)``, ``apply(params, state, x, training)``."""

    name: str
    init: Callable[[jax.Array], tuple[Any, Any]]
    apply: Callable[[Any, Any, jax.Array, bool], tuple[jax.Array, Any]]


def _bn_jax_library(x: jax.Array) -> Library:
    norm = bn_jax.BatchNorm()

    def apply(params, state, x, training):
        return norm.apply(params, state, x, training=training)

    return Library("bn_jax", lambda x: norm.init(x), apply)


def _flax_library(x: jax.Array) -> Library:
    import flax.linen as nn

    module = nn.BatchNorm()

    def init(x):
        v = module.init(jax.random.key(0), x, use_running_average=False)
        return v["params"], v["batch_stats"]

    def apply(params, state, x, training):
        variables = {"params": params, "batch_stats": state}
        if not training:
            return module.apply(variables, x, use_running_average=True), state
        y, new = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        return y, new["batch_stats"]

    return Library("flax", init, apply)


def _haiku_library(x: jax.Array) -> Library:
    import haiku as hk

    def f(x, is_training):
        bn = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.99, eps=1e-5)
        return bn(x, is_training=is_training)

    t = hk.without_apply_rng(hk.transform_with_state(f))

    def init(x):
        return t.init(jax.random.key(0), x, True)

    def apply(params, state, x, training):
        return t.apply(params, state, x, training)

    return Library("haiku", init, apply)


def _equinox_library(x: jax.Array) -> Library:
    import equinox as eqx

    # Equinox normalizes over vmapped axes: map every non-feature axis.
    names = tuple(f"ax{i}" for i in range(x.ndim - 1))

    static = {}

    def init(x):
        # Equinox keeps its statistics in ``dtype`` and cannot mix it with the
        # input's (bfloat16 input with float32 statistics raises): use the input's.
        bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            input_size=x.shape[-1],
            axis_name=names,
            momentum=0.99,
            eps=1e-5,
            dtype=x.dtype,
            mode="ema",  # running averages like the others (its default, which warns if unsaid)
        )
        params, static["module"] = eqx.partition(bn, eqx.is_inexact_array)
        return params, state

    def apply(params, state, x, training):
        bn = eqx.nn.inference_mode(eqx.combine(params, static["module"]), value=not training)
        f = bn
        for name in reversed(names):
            f = jax.vmap(f, in_axes=(0, None), out_axes=(0, None), axis_name=name)
        return f(x, state)

    return Library("equinox", init, apply)


DEFAULT_LIBRARIES = ("bn_jax", "flax")

# name -> builder(x) -> Library; x fixes the shape and dtype the layer is built for.
BUILDERS: dict[str, Callable[[jax.Array], Library]] = {
    "bn_jax": _bn_jax_library,
    "flax": _flax_library,
    "haiku": _haiku_library,
    "equinox": _equinox_library,
}


def available_libraries(requested: Sequence[str] | None = None) -> list[str]:
    """The libraries to time: ``requested`` (haiku and equinox when importable),
    or bn_jax and flax when nothing is requested."""
    names = list(DEFAULT_LIBRARIES)
    names += [m for m in ("haiku", "equinox") if importlib.util.find_spec(m) is not None]
    if not requested:
        return list(DEFAULT_LIBRARIES)
    unknown = sorted(set(requested) - set(names))
    if unknown:
        raise SystemExit(f"unknown or unavailable libraries {unknown}; available: {names}")
    return [n for n in names if n in requested]
