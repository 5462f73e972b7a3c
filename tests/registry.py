"""Every normalizer the matrix tests run over, described once.

The contract, error, API and cross-device tests draw their normalizers from
``NORMALIZERS``: adding a normalizer to bn_jax means adding one ``Entry`` here
(see CONTRIBUTING.md). Every entry is exercised on ``X_SHAPE`` inputs,
``[batch 4, time/space 3, features 4]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

import bn_jax
from tests import reference as ref

X_SHAPE = (4, 3, 4)
C = X_SHAPE[-1]
TWO_AXES = {"reduction_axes": (1, 2), "feature_axes": 2}  # per-example, over axes 1 and 2


def ramp(lo: float, hi: float, steps: int) -> Callable[[Any], Any]:
    """A warm-up schedule of the step count (what BatchRenorm's paper does to rmax, dmax)."""
    return lambda count: lo + (hi - lo) * jnp.minimum(count / steps, 1.0)


@dataclasses.dataclass(frozen=True)
class Entry:
    """How the matrix tests build, feed and check one normalizer.

    Attributes:
      cls: the normalizer class.
      functional: its functional form.
      config: the smallest valid configuration (keyword arguments of ``cls``).
      feature_arg: the field that places the features (named in errors).
      reference: ``(x, params, config) -> (y, state)``: the float64 training
        output and state after one step from ``init``'s state (``{}`` when
        the normalizer keeps none), on ``X_SHAPE`` input.
      state_layout: ``config -> {name: shape}`` of ``init(C)``'s state.
      single_value: for normalizers that refuse one value per statistic in
        training: ``(input shape, extra config, message)``.
      variants: more configurations the contract runs: name ->
        ``(extra config, step_mode)``; ``step_mode`` feeds one time step.
      split: how ``axis_name`` divides the input across devices, and the
        extra config that needs: ``("batch", {})`` (data parallel) or
        ``("reduced", {...})`` (axis 1, a reduced axis of each example:
        spatial or sequence parallelism).
    """

    cls: type
    functional: Callable[..., Any]
    config: Mapping[str, Any]
    feature_arg: str
    reference: Callable[[np.ndarray, Mapping[str, Any], Mapping[str, Any]], tuple]
    state_layout: Callable[[Mapping[str, Any]], dict[str, tuple[int, ...]]]
    single_value: tuple[tuple[int, ...], dict[str, Any], str] | None = None
    variants: Mapping[str, tuple[dict[str, Any], bool]] = dataclasses.field(default_factory=dict)
    split: tuple[str, dict[str, Any]] = ("batch", {})

    def build(self, **extra: Any) -> Any:
        return self.cls(**{**self.config, **extra})


def _affine(params):
    return params.get("scale"), params.get("bias")


def _scale(params, config):
    """The multiplier of the layer: ``1 + scale`` with ``zero_centered_scale``."""
    scale = params.get("scale")
    return scale + 1 if scale is not None and config.get("zero_centered_scale") else scale


def _eps(config, default):
    return config.get("epsilon", default)


def _running(config):
    m = config.get("momentum", 0.99)
    return lambda mean, var, extra=None: {
        "mean": ref.ema(0.0, mean, m),
        "var": ref.ema(1.0, var, m),
        **(extra or {}),
    }


def _bn_layout(config):
    keys = ("mean", "var") if config.get("momentum", 0.99) is not None else ("mean", "var", "count")
    return {k: (C,) for k in keys}


def _bn_ref(x, params, config):
    mean, var, _ = ref.bn_stats(x)
    return ref.bn_train(x, *_affine(params), eps=_eps(config, 1e-5)), _running(config)(mean, var)


def _renorm_ref(x, params, config):
    rmax, dmax = config.get("rmax", 3.0), config.get("dmax", 5.0)
    y, _, _ = ref.batch_renorm_train(
        x, np.zeros(C), np.ones(C), rmax, dmax, *_affine(params), eps=_eps(config, 1e-5)
    )
    mean, var, _ = ref.bn_stats(x)
    return y, _running(config)(mean, var, {"step": np.asarray(1)})


def _ghost_ref(x, params, config):
    v = config["virtual_batch_size"]
    y, mean, var = ref.ghost_batch_norm(x, v, *_affine(params), eps=_eps(config, 1e-5))
    return y, _running(config)(mean, var)


def _sequence_ref(x, params, config):
    y, mean, var = ref.sequence_batch_norm(x, *_affine(params), eps=_eps(config, 1e-5))
    slots, m = config["max_steps"], config.get("momentum", 0.99)
    k = min(slots, x.shape[1])  # steps past max_steps leave the state alone
    state = {"mean": np.zeros((slots, C)), "var": np.ones((slots, C))}
    state["mean"][:k] = ref.ema(0.0, mean[:k], m)
    state["var"][:k] = ref.ema(1.0, var[:k], m)
    return y, state


def _instance_ref(x, params, config):
    y = ref.instance_norm(x, *_affine(params), eps=_eps(config, 1e-6))
    if not config.get("track_running_stats", False):
        return y, {}
    mean, var, _ = ref.instance_stats(x)
    return y, _running(config)(mean.mean(0), var.mean(0))


def _frn_ref(x, params, config):
    y = ref.filter_response_norm(
        x, *_affine(params), params.get("tau"), params.get("eps"), eps=_eps(config, 1e-6)
    )
    return y, {}


def _b0_ref(x, params, config):
    _, state = bn_jax.EvoNormB0(**config).init(C)
    return ref.evo_norm_b0_step(
        x,
        *_affine(params),
        params["v"],
        {k: np.asarray(v) for k, v in state.items()},
        eps=_eps(config, 1e-5),
        momentum=config.get("momentum", 0.99),
        unbiased=config.get("unbiased_running_var", False),
    )


def _s0_ref(x, params, config):
    y = ref.evo_norm_s0(
        x, config["num_groups"], *_affine(params), params["v"], eps=_eps(config, 1e-5)
    )
    return y, {}


NORMALIZERS: dict[str, Entry] = {
    "BatchNorm": Entry(
        bn_jax.BatchNorm,
        bn_jax.batch_norm,
        {},
        "axis",
        _bn_ref,
        _bn_layout,
        single_value=((1, C), {}, r"BatchNorm: training with a single value per feature"),
        variants={"cumulative": ({"momentum": None}, False)},
    ),
    "BatchRenorm": Entry(
        bn_jax.BatchRenorm,
        bn_jax.batch_renorm,
        {"rmax": 1.5, "dmax": 0.5},
        "axis",
        _renorm_ref,
        lambda config: {**_bn_layout(config), "step": ()},
        single_value=((1, C), {}, r"BatchRenorm: training with a single value per feature"),
        variants={"scheduled": ({"rmax": ramp(1.0, 3.0, 2), "dmax": ramp(0.0, 5.0, 2)}, False)},
    ),
    "GhostBatchNorm": Entry(
        bn_jax.GhostBatchNorm,
        bn_jax.ghost_batch_norm,
        {"virtual_batch_size": 2},
        "axis",
        _ghost_ref,
        _bn_layout,
        single_value=(
            (4, C),
            {"virtual_batch_size": 1},
            r"virtual_batch_size=1 leaves a single value per feature",
        ),
    ),
    "SequenceBatchNorm": Entry(
        bn_jax.SequenceBatchNorm,
        bn_jax.sequence_batch_norm,
        {"max_steps": 2},
        "axis",
        _sequence_ref,
        lambda config: {k: (config["max_steps"], *s) for k, s in _bn_layout(config).items()},
        single_value=((1, 3, C), {}, r"SequenceBatchNorm: training with a single value per"),
        variants={"step": ({}, True)},
    ),
    "GroupNorm": Entry(
        bn_jax.GroupNorm,
        bn_jax.group_norm,
        {"num_groups": 2},
        "feature_axis",
        lambda x, p, cfg: (
            ref.group_norm(x, cfg["num_groups"], *_affine(p), eps=_eps(cfg, 1e-6)),
            {},
        ),
        lambda config: {},
        variants={"memory_efficient": ({"memory_efficient": True}, False)},
        split=("reduced", {}),
    ),
    "InstanceNorm": Entry(
        bn_jax.InstanceNorm,
        bn_jax.instance_norm,
        {"track_running_stats": True},
        "feature_axes",
        _instance_ref,
        lambda config: {"mean": (C,), "var": (C,)} if config["track_running_stats"] else {},
        single_value=((4, C), {}, r"InstanceNorm: .* leaves a single value per instance"),
        variants={"untracked": ({"track_running_stats": False}, False)},
        split=("reduced", {}),
    ),
    "LayerNorm": Entry(
        bn_jax.LayerNorm,
        bn_jax.layer_norm,
        {},
        "feature_axes",
        lambda x, p, cfg: (
            ref.layer_norm(x, _scale(p, cfg), p.get("bias"), eps=_eps(cfg, 1e-6)),
            {},
        ),
        lambda config: {},
        variants={
            "two_axes": (TWO_AXES, False),
            "memory_efficient": ({"memory_efficient": True}, False),
            "zero_centered": ({"zero_centered_scale": True}, False),
        },
        split=("reduced", TWO_AXES),
    ),
    "RMSNorm": Entry(
        bn_jax.RMSNorm,
        bn_jax.rms_norm,
        {},
        "feature_axes",
        lambda x, p, cfg: (ref.rms_norm(x, _scale(p, cfg), eps=_eps(cfg, 1e-6)), {}),
        lambda config: {},
        variants={
            "two_axes": (TWO_AXES, False),
            "memory_efficient": ({"memory_efficient": True}, False),
            "zero_centered": ({"zero_centered_scale": True}, False),
        },
        split=("reduced", TWO_AXES),
    ),
    "FilterResponseNorm": Entry(
        bn_jax.FilterResponseNorm,
        bn_jax.filter_response_norm,
        {},
        "feature_axes",
        _frn_ref,
        lambda config: {},
        variants={
            "no_tlu": ({"use_tau": False}, False),
            "learned_epsilon": ({"learned_epsilon": True}, False),
        },
        split=("reduced", {}),
    ),
    "EvoNormB0": Entry(
        bn_jax.EvoNormB0,
        bn_jax.evo_norm_b0,
        {},
        "axis",
        _b0_ref,
        lambda config: {
            k: (C,)
            for k in (("var",) if config.get("momentum", 0.99) is not None else ("var", "count"))
        },
        single_value=((1, C), {}, r"EvoNormB0: training with a single value per feature"),
        variants={
            "cumulative": ({"momentum": None}, False),
            "unbiased": ({"unbiased_running_var": True}, False),
        },
    ),
    "EvoNormS0": Entry(
        bn_jax.EvoNormS0,
        bn_jax.evo_norm_s0,
        {"num_groups": 2},
        "feature_axis",
        _s0_ref,
        lambda config: {},
        split=("reduced", {}),
    ),
}

NAMES = list(NORMALIZERS)
SINGLE_VALUE = [n for n, e in NORMALIZERS.items() if e.single_value is not None]


def fields(name: str) -> set[str]:
    """The field names of the normalizer ``name``."""
    return {f.name for f in dataclasses.fields(NORMALIZERS[name].cls)}


def with_field(field: str) -> list[str]:
    """The normalizers that have the configuration field ``field``."""
    return [n for n in NAMES if field in fields(n)]


def contract_cases() -> dict[str, tuple[Any, bool]]:
    """``{case: (normalizer, step_mode)}``: every entry and every variant of it."""
    cases = {}
    for name, entry in NORMALIZERS.items():
        cases[name] = (entry.build(), False)
        for variant, (extra, step_mode) in entry.variants.items():
            cases[f"{name}-{variant}"] = (entry.build(**extra), step_mode)
    return cases


def example_params(norm: Any, seed: int = 1) -> dict[str, Any]:
    """``norm.init``'s params made non-trivial (a dropped scale or bias would show)."""
    params, _ = norm.init(C)
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(v + (0.5 if k == "scale" else 0.0) + 0.3 * rng.standard_normal(v.shape))
        for k, v in params.items()
    }


def example_x(seed: int = 0, shape: tuple[int, ...] = X_SHAPE) -> np.ndarray:
    """A float32 input with a per-feature offset and spread."""
    rng = np.random.default_rng(seed)
    return (1.0 + seed + (1.0 + seed) * rng.standard_normal(shape)).astype(np.float32)
