"""Property tests: every normalizer against float64 references over drawn configurations.

Hypothesis draws a normalizer and its options (ranks 1 to 6, feature axes given
as negative ints, tuples or channels-first, masks that are random, all valid or
leave a channel with no valid element, ``momentum`` including None,
``use_scale`` / ``use_bias`` off), an input dtype (float32, bfloat16, float16)
and a way to run it (eagerly, under ``jit``, or under ``vmap`` with an
``axis_name`` over two "devices", compared with the reference on the whole
batch). Outputs, running statistics and directional derivatives of the
gradients are compared with the float64 references of ``tests/reference.py``;
the tolerances follow from the dtypes' epsilon and the conditioning of the
drawn example. A second property draws invalid arguments and inputs: they may
only raise ``ValueError`` / ``TypeError`` naming the argument. A third runs each
``bn_jax.equinox`` layer (``tests/equinox_face.py``) on drawn batches: its
outputs and running statistics equal the core normalizer's, and float64.

``make test`` runs a fixed (derandomized) set of examples; a longer random
search is ``HYPOTHESIS_PROFILE=explore pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import bn_jax
from tests import equinox_face
from tests import reference as ref
from tests.registry import NORMALIZERS, X_SHAPE

EXPLORE = os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci"


def examples(ci: int) -> Callable:
    """``ci`` examples in ``make test``; the loaded profile's number when exploring."""
    n = settings().max_examples if EXPLORE else ci
    return settings(max_examples=n, suppress_health_check=[HealthCheck.too_slow])


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
EPS32 = float(jnp.finfo(jnp.float32).eps)
DEVICES = 2  # the mapped axis of the "vmap" mode
MOMENTA = [0.0, 0.5, 0.9, 0.99, 1.0, None]


# ------------------------------------------------------------------ drawing


@dataclasses.dataclass
class Case:
    """A drawn example: a normalizer, the per-device input shape and its reference.

    ``reference(x, scale, bias, state, mask, lead, fixed)`` computes in float64
    on the layout of the whole batch; ``lead`` is 1 when a device axis is
    stacked in front (``vmap`` mode), else 0. It returns ``(y, new_state,
    fixed)``, where ``fixed`` holds the values that carry no gradient
    (BatchRenorm's ``r``, ``d``) so that finite differences can hold them.
    """

    name: str
    norm: Any
    shape: tuple[int, ...]
    feature_axes: tuple[int, ...]  # non-negative, of the per-device input
    reference: Callable
    # (x, lead) -> (x viewed with one axis per statistics group, the reduced axes):
    # how the normalizer groups elements, for the conditioning of an example.
    groups: Callable
    gain: float = 1.0  # bound on |y - bias| / |scale * x_hat| (BatchRenorm's r and d)


def _shape(draw, lo: int, hi: int) -> tuple[int, ...]:
    rank = draw(st.integers(lo, hi))
    top = 4 if rank <= 4 else 3
    return tuple(draw(st.lists(st.integers(1, top), min_size=rank, max_size=rank)))


def _axes(draw, ndim: int, candidates: list[int], max_len: int = 2) -> tuple[Any, tuple[int, ...]]:
    """Axes among ``candidates`` as the user writes them (an int, a tuple, negative or
    not) and resolved (sorted, non-negative)."""
    k = draw(st.integers(1, min(max_len, len(candidates))))
    axes = tuple(sorted(draw(st.permutations(candidates))[:k]))
    negative = draw(st.booleans())
    shown = tuple(a - ndim if negative else a for a in axes)
    if k == 1 and draw(st.booleans()):
        return shown[0], axes
    return shown, axes


def _shift(axes: tuple[int, ...], lead: int) -> tuple[int, ...]:
    return tuple(a + lead for a in axes)


def _reduced(shape, feature_axes) -> int:
    return math.prod(s for i, s in enumerate(shape) if i not in feature_axes)


def _common(draw) -> dict[str, Any]:
    return {
        "epsilon": draw(st.sampled_from([1e-5, 1e-3])),
        "use_scale": draw(st.booleans()),
        "use_bias": draw(st.booleans()),
    }


def _all_but(kept: tuple[int, ...], batch_axis: bool = False) -> Callable:
    """Statistics groups over every axis except ``kept`` (and the device-stacked
    batch axis when ``batch_axis``)."""

    def groups(x, lead):
        keep = _shift(kept, lead) + ((lead,) if batch_axis else ())
        return x, tuple(i for i in range(x.ndim) if i not in keep)

    return groups


def _running(norm) -> dict[str, Any]:
    """The options of a running-statistics update, for the references."""
    return {
        "eps": norm.epsilon,
        "momentum": norm.momentum,
        "unbiased": norm.unbiased_running_var,
    }


# ---- one Case per normalizer, built from the normalizer and the input shape


def batch_norm_case(norm, shape) -> Case:
    fa = ref.axes_of(len(shape), norm.axis)

    def reference(x, scale, bias, state, mask, lead, fixed):
        axis = _shift(fa, lead)
        y, new = ref.batch_norm_step(x, scale, bias, state, axis=axis, mask=mask, **_running(norm))
        return y, new, None

    return Case("BatchNorm", norm, shape, fa, reference, _all_but(fa))


def batch_renorm_case(norm, shape) -> Case:
    fa = ref.axes_of(len(shape), norm.axis)
    limits = {"rmax": norm.rmax, "dmax": norm.dmax}

    def reference(x, scale, bias, state, mask, lead, fixed):
        return ref.batch_renorm_step(
            x, scale, bias, state, axis=_shift(fa, lead), mask=mask, rd=fixed,
            **limits, **_running(norm),
        )  # fmt: skip

    return Case("BatchRenorm", norm, shape, fa, reference, _all_but(fa), norm.rmax + norm.dmax)


def ghost_batch_norm_case(norm, shape) -> Case:
    fa = ref.axes_of(len(shape), norm.axis)
    v = norm.virtual_batch_size

    def reference(x, scale, bias, state, mask, lead, fixed):
        y, new = ref.ghost_batch_norm_step(
            x, scale, bias, state, axis=_shift(fa, lead), virtual_batch_size=v,
            batch_axis=lead, mask=mask, **_running(norm),
        )  # fmt: skip
        return y, new, None

    def groups(x, lead):
        k = x.shape[lead] // v
        xs = x.reshape((*x.shape[:lead], k, v, *x.shape[lead + 1 :]))
        keep = (*range(lead + 1), *(a + lead + 1 for a in fa))
        return xs, tuple(i for i in range(xs.ndim) if i not in keep)

    return Case("GhostBatchNorm", norm, shape, fa, reference, groups)


def sequence_batch_norm_case(norm, shape) -> Case:
    fa = ref.axes_of(len(shape), norm.axis)
    time = norm.time_axis % len(shape)

    def reference(x, scale, bias, state, mask, lead, fixed):
        y, new = ref.sequence_batch_norm_step(
            x, scale, bias, state, axis=_shift(fa, lead), time_axis=time + lead, mask=mask,
            **_running(norm),
        )  # fmt: skip
        return y, new, None

    return Case("SequenceBatchNorm", norm, shape, fa, reference, _all_but((*fa, time)))


def group_norm_case(norm, shape) -> Case:
    ndim = len(shape)
    c = norm.feature_axis % ndim
    red = (
        tuple(range(1, ndim))
        if norm.reduction_axes is None
        else ref.axes_of(ndim, norm.reduction_axes)
    )
    groups = norm.num_groups

    def reduced(lead):
        return ((0,) if lead else ()) + _shift(red, lead)

    def reference(x, scale, bias, state, mask, lead, fixed):
        y = ref.group_norm(
            x, groups, scale, bias, feature_axis=c + lead, reduction_axes=reduced(lead),
            eps=norm.epsilon, mask=mask,
        )  # fmt: skip
        return y, state, None

    def view(x, lead):
        cl = c + lead
        xs = x.reshape((*x.shape[:cl], groups, x.shape[cl] // groups, *x.shape[cl + 1 :]))
        return xs, (*(a + (a > cl) for a in reduced(lead) if a != cl), cl + 1)

    return Case("GroupNorm", norm, shape, (c,), reference, view)


def instance_norm_case(norm, shape) -> Case:
    fa = ref.axes_of(len(shape), norm.feature_axes)

    def reference(x, scale, bias, state, mask, lead, fixed):
        y, new = ref.instance_norm_step(
            x, scale, bias, state, feature_axes=_shift(fa, lead), batch_axis=lead, mask=mask,
            **_running(norm),
        )  # fmt: skip
        return y, new, None

    return Case("InstanceNorm", norm, shape, fa, reference, _all_but(fa, batch_axis=True))


def per_example_case(norm, shape) -> Case:
    name = type(norm).__name__
    red = ref.axes_of(len(shape), norm.reduction_axes)
    fa = ref.axes_of(len(shape), norm.feature_axes)

    def groups(x, lead):
        return x, ((0,) if lead else ()) + _shift(red, lead)

    def reference(x, scale, bias, state, mask, lead, fixed):
        kw = {"reduction_axes": groups(x, lead)[1], "feature_axes": _shift(fa, lead)}
        if name == "RMSNorm":
            return ref.rms_norm(x, scale, mask=mask, eps=norm.epsilon, **kw), state, None
        return ref.layer_norm(x, scale, bias, mask=mask, eps=norm.epsilon, **kw), state, None

    return Case(name, norm, shape, fa, reference, groups)


def filter_response_norm_case(norm, shape) -> Case:
    fa = ref.axes_of(len(shape), norm.feature_axes)

    def reference(x, scale, bias, state, mask, lead, fixed, tau=None, eps=None):
        y = ref.filter_response_norm(
            x, scale, bias, tau, eps, feature_axes=_shift(fa, lead), eps=norm.epsilon,
            example_axes=(lead,), mask=mask,
        )  # fmt: skip
        return y, state, None

    return Case("FilterResponseNorm", norm, shape, fa, reference, _all_but(fa, batch_axis=True))


def evo_norm_b0_case(norm, shape) -> Case:
    fa = ref.axes_of(len(shape), norm.axis)

    def reference(x, scale, bias, state, mask, lead, fixed, v=None):
        y, new = ref.evo_norm_b0_step(
            x, scale, bias, v, state, axis=_shift(fa, lead), eps=norm.epsilon,
            momentum=norm.momentum, example_axes=tuple(range(lead + 1)), mask=mask,
            unbiased=norm.unbiased_running_var,
        )  # fmt: skip
        return y, new, None

    return Case("EvoNormB0", norm, shape, fa, reference, _all_but(fa))


def evo_norm_s0_case(norm, shape) -> Case:
    ndim = len(shape)
    c = norm.feature_axis % ndim
    groups = norm.num_groups

    def reduced(lead):
        return tuple(a for a in range(ndim + lead) if a != lead)

    def reference(x, scale, bias, state, mask, lead, fixed, v=None):
        y = ref.evo_norm_s0(
            x, groups, scale, bias, v, feature_axis=c + lead, reduction_axes=reduced(lead),
            eps=norm.epsilon, mask=mask,
        )  # fmt: skip
        return y, state, None

    def view(x, lead):
        cl = c + lead
        xs = x.reshape((*x.shape[:cl], groups, x.shape[cl] // groups, *x.shape[cl + 1 :]))
        return xs, (*(a + (a > cl) for a in reduced(lead) if a != cl), cl + 1)

    return Case("EvoNormS0", norm, shape, (c,), reference, view)


CASES = {
    "BatchNorm": batch_norm_case,
    "BatchRenorm": batch_renorm_case,
    "GhostBatchNorm": ghost_batch_norm_case,
    "SequenceBatchNorm": sequence_batch_norm_case,
    "GroupNorm": group_norm_case,
    "InstanceNorm": instance_norm_case,
    "LayerNorm": per_example_case,
    "RMSNorm": per_example_case,
    "FilterResponseNorm": filter_response_norm_case,
    "EvoNormB0": evo_norm_b0_case,
    "EvoNormS0": evo_norm_s0_case,
}


def case_for(norm, shape) -> Case:
    return CASES[type(norm).__name__](norm, tuple(shape))


# ---- drawing a normalizer and an input shape


def _running_options(draw) -> dict[str, Any]:
    return {
        "momentum": draw(st.sampled_from(MOMENTA)),
        "unbiased_running_var": draw(st.booleans()),
    }


def draw_batch_norm(draw, cls=bn_jax.BatchNorm, **extra) -> Case:
    shape = _shape(draw, 2, 6)
    axis, fa = _axes(draw, len(shape), list(range(len(shape))))
    assume(len(fa) < len(shape) and _reduced(shape, fa) >= 2)
    norm = cls(**_common(draw), **_running_options(draw), axis=axis, **extra)
    return case_for(norm, shape)


def draw_batch_renorm(draw) -> Case:
    rmax = draw(st.sampled_from([1.0, 1.5, 3.0]))
    dmax = draw(st.sampled_from([0.0, 0.5, 5.0]))
    return draw_batch_norm(draw, bn_jax.BatchRenorm, rmax=rmax, dmax=dmax)


def draw_ghost_batch_norm(draw) -> Case:
    shape = _shape(draw, 2, 5)
    v = draw(st.integers(1, 3))
    shape = (v * draw(st.integers(1, 3)), *shape[1:])
    axis, fa = _axes(draw, len(shape), list(range(1, len(shape))))
    assume(v * _reduced(shape[1:], tuple(a - 1 for a in fa)) >= 2)
    norm = bn_jax.GhostBatchNorm(
        **_common(draw), **_running_options(draw), axis=axis, virtual_batch_size=v
    )
    return case_for(norm, shape)


def draw_sequence_batch_norm(draw) -> Case:
    shape = _shape(draw, 3, 5)
    ndim = len(shape)
    time = draw(st.integers(0, ndim - 1))
    axis, fa = _axes(draw, ndim, [a for a in range(ndim) if a != time])
    assume(_reduced(shape, (*fa, time)) >= 2)
    norm = bn_jax.SequenceBatchNorm(
        **_common(draw),
        **_running_options(draw),
        axis=axis,
        max_steps=draw(st.integers(1, 4)),
        time_axis=time - ndim if draw(st.booleans()) else time,
    )
    return case_for(norm, shape)


def draw_group_norm(draw) -> Case:
    shape = _shape(draw, 2, 5)
    ndim = len(shape)
    c = draw(st.integers(1, ndim - 1))
    shape = (*shape[:c], draw(st.sampled_from([2, 4, 6])), *shape[c + 1 :])
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 6) if shape[c] % g == 0]))
    if draw(st.booleans()):
        red_arg = None
    else:
        others = [a for a in range(ndim) if a != c]
        extra = draw(st.lists(st.sampled_from(others), unique=True, max_size=2)) if others else []
        red = tuple(sorted({c, *extra}))
        red_arg = tuple(a - ndim for a in red) if draw(st.booleans()) else red
    norm = bn_jax.GroupNorm(
        **_common(draw),
        num_groups=groups,
        feature_axis=c - ndim if draw(st.booleans()) else c,
        reduction_axes=red_arg,
    )
    return case_for(norm, shape)


def draw_instance_norm(draw) -> Case:
    shape = _shape(draw, 3, 5)
    axis, fa = _axes(draw, len(shape), list(range(1, len(shape))))
    assume(_reduced(shape[1:], tuple(a - 1 for a in fa)) >= 2)
    norm = bn_jax.InstanceNorm(
        **_common(draw),
        **_running_options(draw),
        feature_axes=axis,
        track_running_stats=draw(st.booleans()),
    )
    return case_for(norm, shape)


def _draw_per_example(draw, name: str) -> Case:
    shape = _shape(draw, 1, 6)
    ndim = len(shape)
    red_arg, _ = _axes(draw, ndim, list(range(ndim)), max_len=3)
    feat_arg, _ = _axes(draw, ndim, list(range(ndim)))
    cfg = {**_common(draw), "reduction_axes": red_arg, "feature_axes": feat_arg}
    cfg["memory_efficient"] = draw(st.booleans())  # the backward pass from the output
    if name == "RMSNorm":
        del cfg["use_bias"]
    return case_for(getattr(bn_jax, name)(**cfg), shape)


def draw_filter_response_norm(draw) -> Case:
    shape = _shape(draw, 2, 5)
    axis, _ = _axes(draw, len(shape), list(range(1, len(shape))))
    norm = bn_jax.FilterResponseNorm(
        **_common(draw),
        feature_axes=axis,
        use_tau=draw(st.booleans()),
        learned_epsilon=draw(st.booleans()),
    )
    return case_for(norm, shape)


def draw_evo_norm_b0(draw) -> Case:
    shape = _shape(draw, 2, 5)
    axis, fa = _axes(draw, len(shape), list(range(1, len(shape))))
    assume(_reduced(shape, fa) >= 2)
    norm = bn_jax.EvoNormB0(**_common(draw), **_running_options(draw), axis=axis)
    return case_for(norm, shape)


def draw_evo_norm_s0(draw) -> Case:
    shape = _shape(draw, 2, 5)
    ndim = len(shape)
    c = draw(st.integers(1, ndim - 1))
    shape = (*shape[:c], draw(st.sampled_from([2, 4, 6])), *shape[c + 1 :])
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 6) if shape[c] % g == 0]))
    norm = bn_jax.EvoNormS0(
        **_common(draw), num_groups=groups, feature_axis=c - ndim if draw(st.booleans()) else c
    )
    return case_for(norm, shape)


DRAW = {
    "BatchNorm": draw_batch_norm,
    "BatchRenorm": draw_batch_renorm,
    "GhostBatchNorm": draw_ghost_batch_norm,
    "SequenceBatchNorm": draw_sequence_batch_norm,
    "GroupNorm": draw_group_norm,
    "InstanceNorm": draw_instance_norm,
    "LayerNorm": lambda draw: _draw_per_example(draw, "LayerNorm"),
    "RMSNorm": lambda draw: _draw_per_example(draw, "RMSNorm"),
    "FilterResponseNorm": draw_filter_response_norm,
    "EvoNormB0": draw_evo_norm_b0,
    "EvoNormS0": draw_evo_norm_s0,
}


def test_every_normalizer_is_fuzzed():
    assert set(DRAW) == set(CASES) == set(NORMALIZERS)


@st.composite
def examples_of(draw, names=tuple(DRAW)):
    name = draw(st.sampled_from(names))
    case = DRAW[name](draw)
    return case, {
        "dtype": draw(st.sampled_from(list(DTYPES))),
        "mode": draw(st.sampled_from(["eager", "jit", "vmap"])),
        "mask": draw(st.sampled_from([None, "all", "random", "dead channel"])),
        "seed": draw(st.integers(0, 2**16)),
    }


# ---------------------------------------------------------------- running


def _mask(kind, shape, feature_axes, rng):
    if kind is None:
        return None
    mask = np.ones(shape, bool) if kind == "all" else rng.random(shape) < 0.7
    if kind == "dead channel":  # the first feature has no valid element anywhere
        index = tuple(0 if i in feature_axes else slice(None) for i in range(len(shape)))
        mask[index] = False
    return mask


def _inputs(case: Case, dtype, mode, mask_kind, seed):
    rng = np.random.default_rng(seed)
    lead = (DEVICES,) if mode == "vmap" else ()
    full = (*lead, *case.shape)
    fa_full = _shift(case.feature_axes, len(lead))
    offset, std = rng.uniform(-3, 3), rng.uniform(0.5, 2)
    x = (offset + std * rng.standard_normal(full)).astype(dtype)
    mask = _mask(mask_kind, full, fa_full, rng)
    params, state = case.norm.init(np.zeros(case.shape, np.float32))
    params = {k: rng.uniform(0.5, 1.5, v.shape).astype(np.float32) for k, v in params.items()}
    params = {k: v - 1.0 if k == "bias" else v for k, v in params.items()}
    state = dict(state)
    if "mean" in state:
        state["mean"] = rng.normal(size=state["mean"].shape).astype(np.float32)
        state["var"] = rng.uniform(0.5, 2, state["var"].shape).astype(np.float32)
    if "count" in state:
        state["count"] = rng.integers(0, 5, state["count"].shape).astype(np.int32)
    if "step" in state:
        state["step"] = np.int32(rng.integers(0, 5))
    g = rng.standard_normal(full).astype(dtype)
    directions = {"x": rng.standard_normal(full)}
    directions.update({k: rng.standard_normal(v.shape) for k, v in params.items()})
    return x, mask, params, state, g, directions


def _run(case: Case, mode, params, state, x, mask, g=None):
    """``(y, new_state, grads)`` of one training step, ``grads`` of ``sum(y * g)``
    (None without ``g``)."""
    norm = case.norm
    if mode == "vmap":
        norm = dataclasses.replace(norm, axis_name="d")

    def apply(p, x, m):
        return norm.apply(p, state, x, training=True, mask=m)

    if mode == "vmap":
        apply = jax.vmap(apply, in_axes=(None, 0, None if mask is None else 0), axis_name="d")

    def loss(p, x):
        y, new_state = apply(p, x, mask)
        return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), (y, new_state)

    if g is None:
        step = apply if mode == "eager" else jax.jit(apply)
        y, new_state = step(params, x, mask)
        return y, new_state, None
    step = jax.grad(loss, argnums=(0, 1), has_aux=True)
    if mode != "eager":
        step = jax.jit(step)
    (gp, gx), (y, new_state) = step(params, x)
    return y, new_state, {"x": gx, **gp}


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def check_against_reference(case: Case, dtype_name: str, mode: str, mask_kind, seed: int):
    dtype = DTYPES[dtype_name]
    eps_dt = float(jnp.finfo(dtype).eps)
    x, mask, params, state, g, directions = _inputs(case, dtype, mode, mask_kind, seed)
    lead = 1 if mode == "vmap" else 0
    y, new_state, grads = _run(case, mode, params, state, x, mask, g)

    x64, g64, p64, s64 = _f64(x), _f64(g), _f64(params), _f64(state)

    def reference(x, p, fixed=None):
        extra = {k: v for k, v in p.items() if k not in ("scale", "bias")}  # tau, v, eps
        return case.reference(x, p.get("scale"), p.get("bias"), s64, mask, lead, fixed, **extra)

    y_ref, state_ref, fixed = reference(x64, p64)

    assert y.dtype == x.dtype and y.shape == x.shape
    check_output(case, x64, p64, mask, lead, y, y_ref, eps_dt)
    a, x_hat, spread = conditioning(case, x64, p64, mask, lead)
    kappa = spread.max()  # float32 error bound on x_hat, in float32 ulps

    # Running statistics: same keys, shapes and dtypes; values within float32 error.
    assert set(new_state) == set(state)
    scale2 = (1 + np.abs(x64).max()) ** 2
    for k, v in new_state.items():
        if mode == "vmap":  # replicated: every device holds the same value
            v = np.asarray(v)
            np.testing.assert_array_equal(v, np.broadcast_to(v[:1], v.shape), err_msg=k)
            v = v[0]
        assert v.dtype == np.asarray(state[k]).dtype and v.shape == np.shape(state[k]), k
        np.testing.assert_allclose(
            np.asarray(v, np.float64), state_ref[k], rtol=2e-5, atol=2e-6 * scale2, err_msg=k
        )

    # Gradients: each directional derivative against a Richardson-extrapolated
    # central difference of the float64 reference (r, d of BatchRenorm held). The
    # tolerance is relative to the sum of the terms' magnitudes before they cancel:
    # with a = |scale| / sqrt(var + eps) per element, the backward pass computes
    # dx = a * (g - mean(g) - x_hat * mean(g * x_hat)), dscale = sum(g * x_hat),
    # dbias = sum(g). The other parameters (tau, v, eps) act on each element of y
    # on its own: their terms are g times each element's change.
    absg = np.abs(g64)
    rms_g = np.sqrt(np.mean(g64 * g64))

    def elementwise(k, v, h=1e-6):
        up, down = ({**p64, k: p64[k] + t * v} for t in (h, -h))
        dy = (reference(x64, up, fixed)[0] - reference(x64, down, fixed)[0]) / (2 * h)
        return np.sum(absg * np.abs(dy))

    magnitude = {
        "x": lambda v: np.sum(np.abs(v) * a * case.gain * (absg + rms_g * (1 + x_hat))),
        "scale": lambda v: np.sum(absg * (case.gain * x_hat + 1) * _bcast(np.abs(v), case, lead)),
        "bias": lambda v: np.sum(absg * _bcast(np.abs(v), case, lead)),
    }
    for k, v in directions.items():

        def loss(t, k=k, v=v):
            xs = x64 + t * v if k == "x" else x64
            ps = {**p64, k: p64[k] + t * v} if k != "x" else p64
            return np.sum(reference(xs, ps, fixed)[0] * g64)

        def central(h, loss=loss):
            return (loss(h) - loss(-h)) / (2 * h)

        h = 1e-5
        d1, d2 = central(h), central(h / 2)
        expected = (4 * d2 - d1) / 3
        got = np.sum(np.asarray(grads[k], np.float64) * v)
        mag = (magnitude[k](v) if k in magnitude else elementwise(k, v)) + abs(expected)
        tol = (4 * eps_dt + 64 * EPS32 * (1 + kappa)) * mag + abs(d2 - d1) + 1e-7
        assert abs(got - expected) <= tol, (
            f"gradient along {k}: {got:.6g} vs reference {expected:.6g} (tol {tol:.3g})"
        )


def check_output(case: Case, x64, p64, mask, lead, y, y_ref, eps_dt):
    """The output against its float64 reference: the output's rounding plus float32
    rounding amplified as each element's normalization amplifies it: (x - mean) * a
    with a = |scale| * inv_std."""
    y = np.asarray(y, np.float64)
    assert np.isfinite(y).all(), "non-finite output from finite input"
    _, x_hat, spread = conditioning(case, x64, p64, mask, lead)
    s_abs = np.abs(_bcast(p64["scale"], case, lead)) if "scale" in p64 else 1.0
    b_abs = np.abs(_bcast(p64["bias"], case, lead)) if "bias" in p64 else 0.0
    fp32 = case.gain * s_abs * (spread + x_hat) + b_abs
    tol = 2 * eps_dt * np.abs(y_ref) + 16 * EPS32 * fp32 + 1e-7
    err = np.abs(y - y_ref)
    assert (err <= tol).all(), f"output: max error {err.max():.3g}, ratio {(err / tol).max():.3g}"


def conditioning(case: Case, x64, p64, mask, lead):
    """Per element of ``x``, from the statistics group it belongs to (float64):
    ``a = |scale| / sqrt(var + eps)``, ``|x_hat|`` and ``(|x| + |mean|) /
    sqrt(var + eps)``, the bound on ``x_hat``'s float32 error in units of epsilon."""
    xv, red = case.groups(x64, lead)
    mv = None if mask is None else case.groups(np.broadcast_to(mask, x64.shape), lead)[0]
    mean, var, _ = ref.masked_moments(xv, red, mv)
    inv = 1 / np.sqrt(var + case.norm.epsilon)
    x_hat = np.abs((xv - mean) * inv).reshape(x64.shape)
    spread = ((np.abs(xv) + np.abs(mean)) * inv).reshape(x64.shape)
    a = np.broadcast_to(inv, xv.shape).reshape(x64.shape)
    if "scale" in p64:
        a = a * np.abs(_bcast(p64["scale"], case, lead))
    return a, x_hat, spread


def _bcast(v, case: Case, lead: int):
    """A feature-shaped array broadcastable against the (stacked) input."""
    shape = [1] * (lead + len(case.shape))
    for a, s in zip(_shift(case.feature_axes, lead), np.shape(v), strict=True):
        shape[a] = s
    return np.reshape(v, shape)


@examples(ci=30)
@given(examples_of())
def test_matches_float64_reference(drawn):
    case, opts = drawn
    check_against_reference(case, opts["dtype"], opts["mode"], opts["mask"], opts["seed"])


STATEFUL = (
    "BatchNorm", "BatchRenorm", "GhostBatchNorm", "SequenceBatchNorm", "InstanceNorm", "EvoNormB0",
)  # fmt: skip


@examples(ci=20)
@given(examples_of(STATEFUL), st.integers(1, 3), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_non_finite_values_leave_the_statistics_they_reach_alone(drawn, n_bad, value):
    """NaN and Inf at random elements: every running statistic that a non-finite
    valid element reaches keeps its value (and counts the skip); the others are
    updated as the reference says; elements excluded by the mask never count."""
    case, opts = drawn
    assume(case.norm.__dataclass_fields__.get("track_running_stats") is None
           or case.norm.track_running_stats)  # fmt: skip
    case = dataclasses.replace(case, norm=dataclasses.replace(case.norm, count_skipped=True))
    x, mask, params, state, _, _ = _inputs(case, DTYPES[opts["dtype"]], opts["mode"],
                                           opts["mask"], opts["seed"])  # fmt: skip
    rng = np.random.default_rng(opts["seed"] + 2)
    flat = x.reshape(-1)  # a view: poisons x
    flat[rng.choice(flat.size, min(n_bad, flat.size), replace=False)] = value
    _, new_state, _ = _run(case, opts["mode"], params, state, x, mask)

    lead = 1 if opts["mode"] == "vmap" else 0
    p64 = _f64(params)
    with np.errstate(invalid="ignore", over="ignore"):  # the reference meets them too
        _, ref_state, _ = case.reference(_f64(x), p64.pop("scale", None), p64.pop("bias", None),
                                         _f64(state), mask, lead, None, **p64)  # fmt: skip
    # a non-finite valid element makes the variance non-finite (EvoNormB0 keeps no mean)
    hit = ~(np.isfinite(ref_state.get("mean", 0.0)) & np.isfinite(ref_state["var"]))
    for k, v in new_state.items():
        v = np.asarray(v)[0] if opts["mode"] == "vmap" else np.asarray(v)
        if k == "skipped":
            np.testing.assert_array_equal(v, np.asarray(state[k]) + hit, err_msg=k)
        elif k == "step":
            np.testing.assert_array_equal(v, np.asarray(state[k]) + 1)
        else:
            hit_k = np.broadcast_to(hit, np.shape(v))
            np.testing.assert_array_equal(v[hit_k], np.asarray(state[k])[hit_k], err_msg=k)
            np.testing.assert_allclose(v[~hit_k], ref_state[k][~hit_k], rtol=2e-5, atol=1e-4,
                                       err_msg=k)  # fmt: skip


# Examples the search found, kept as plain tests.
REGRESSIONS = {
    # eager apply with NumPy state arrays (as loaded from a checkpoint)
    "sequence-numpy-state": (
        bn_jax.SequenceBatchNorm(momentum=0.0, axis=(1,), max_steps=1, time_axis=0,
                                 use_scale=False, use_bias=False),
        (1, 1, 2), "float32", "eager", None, 0,
    ),
    # two values per group: a tolerance that must follow each group's conditioning
    "group-two-values": (
        bn_jax.GroupNorm(num_groups=2, epsilon=1e-5, use_scale=False, reduction_axes=(1,),
                         feature_axis=1),
        (4, 4, 4, 2), "float32", "jit", None, 4,
    ),
    # a channel with no valid element: r from the variance the normalization uses (1)
    "renorm-empty-channel": (
        bn_jax.BatchRenorm(momentum=0.9), (4, 3), "float32", "jit", "dead channel", 0,
    ),
    # memory_efficient: an empty group passes through as without it
    "layer-norm-memory-efficient-empty-group": (
        bn_jax.LayerNorm(memory_efficient=True, reduction_axes=0, feature_axes=-1),
        (3, 4), "float32", "jit", "dead channel", 0,
    ),
    "rms-norm-memory-efficient-empty-group": (
        bn_jax.RMSNorm(memory_efficient=True, reduction_axes=0, feature_axes=-1),
        (3, 4), "float32", "jit", "dead channel", 0,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regression(name):
    norm, shape, *opts = REGRESSIONS[name]
    check_against_reference(case_for(norm, shape), *opts)


@pytest.mark.parametrize("state", [None, 3.0, {"mean": np.zeros(4)}])
@pytest.mark.parametrize("name", [n for n, e in NORMALIZERS.items() if e.build().init(4)[1]])
def test_regression_state_that_is_not_a_state(name, state):
    """A state that is not a dict, or lacks a key, is named in a ValueError (it was an
    unnamed TypeError from deep inside, or none at all)."""
    norm = NORMALIZERS[name].build(momentum=None)  # InstanceNorm read a missing count
    params, _ = norm.init(4)
    x = np.ones(X_SHAPE, np.float32)
    with pytest.raises(ValueError, match=r"\bstate\b"):
        norm.apply(params, state, x, training=True)


# ------------------------------------------------------ invalid arguments

not_a_number = st.one_of(st.text(max_size=3), st.booleans(), st.complex_numbers(), st.just([0.5]))
not_an_int = st.one_of(
    st.floats(allow_nan=True), st.text(max_size=2), st.booleans(), st.just([1]), st.just({})
)
axes_values = st.one_of(
    not_an_int.filter(lambda v: not isinstance(v, list)),
    st.just(()),
    st.tuples(st.integers(-2, 2), st.text(max_size=1)),
)
out_of_range = st.one_of(st.integers(3, 40), st.integers(-40, -4))
# field -> invalid values given to the constructor
FIELD_VALUES = {
    "momentum": st.one_of(
        st.floats().filter(lambda m: not 0 <= m <= 1), not_a_number, st.integers(2, 9)
    ),
    "epsilon": st.one_of(
        st.floats(max_value=0.0),
        st.sampled_from([float("inf"), float("nan")]),
        not_a_number,
        st.none(),
    ),
    "axis": axes_values,
    "feature_axes": axes_values,
    "reduction_axes": axes_values.filter(lambda v: v is not None),
    "feature_axis": st.one_of(not_an_int, st.just((1,))),
    "num_groups": st.one_of(st.integers(-5, 0), not_an_int),
    "virtual_batch_size": st.one_of(st.integers(-5, 0), not_an_int),
    "max_steps": st.one_of(st.integers(-5, 0), not_an_int),
    "time_axis": not_an_int,
    "dtype": st.sampled_from(["int32", jnp.int8, jnp.bool_, "no such dtype", 3]),
    "param_dtype": st.sampled_from(["int32", jnp.uint8, None, "f32x"]),
    "rmax": st.one_of(st.floats(max_value=0.999), st.just("3")),
    "dmax": st.one_of(st.floats(max_value=-1e-3), st.just("5")),
    "axis_index_groups": st.just(((0, 1), (2, 3))),  # without axis_name
}


def _fields_of(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(getattr(bn_jax, name))]


# The normalizers of Flax's five layers take complex input, as Flax does.
TAKES_COMPLEX = {"BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"}


@st.composite
def invalid_calls(draw):
    """``(name, what, expected argument, call)``: ``call()`` must raise."""
    name = draw(st.sampled_from(list(NORMALIZERS)))
    cls, cfg = NORMALIZERS[name].cls, dict(NORMALIZERS[name].config)
    norm = cls(**cfg)
    params, state = norm.init(X_SHAPE[-1])
    x = np.random.default_rng(0).standard_normal(X_SHAPE).astype(np.float32)
    training = draw(st.booleans())
    fields = _fields_of(name)
    kinds = ["field", "x", "training", "mask", "params", "state", "axis_name", "feature size"]
    kinds += ["axis out of range"]
    if name == "SequenceBatchNorm":
        kinds.append("step")
    kind = draw(st.sampled_from(kinds))
    step = {}

    def apply(norm=norm, params=params, state=state, x=x, training=training, **kw):
        return lambda: norm.apply(params, state, x, training=training, **step, **kw)

    if kind == "field":
        field = draw(st.sampled_from([f for f in FIELD_VALUES if f in fields]))
        value = draw(FIELD_VALUES[field])
        if field == "reduction_axes" and name == "GroupNorm" and value == ():
            value = (0, "a")
        return name, f"{field}={value!r}", field, lambda: cls(**{**cfg, field: value})
    if kind == "x":
        invalid = [x.astype(np.int32), x > 0, x.tolist(), "x", jnp.asarray(x, jnp.uint8)]
        if name not in TAKES_COMPLEX:
            invalid.append(x.astype(np.complex64))
        bad = draw(st.sampled_from(invalid))
        return name, f"x of type {type(bad).__name__}", "x", apply(x=bad)
    if kind == "training":
        bad = draw(st.one_of(st.integers(), st.text(max_size=2), st.none(), st.just(jnp.array(1))))
        return name, f"training={bad!r}", "training", apply(training=bad)
    if kind == "mask":
        training = True  # evaluation does not use the mask
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)))
        try:
            assume(np.broadcast_shapes(shape, X_SHAPE) != X_SHAPE)
        except ValueError:
            pass
        return (
            name,
            f"mask of shape {shape}",
            "mask",
            apply(training=True, mask=np.ones(shape, bool)),
        )
    if kind == "params":
        if params and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(params)))
            bad = {k: v for k, v in params.items() if k != key}
            return name, f"params without {key!r}", key, apply(params=bad)
        bad = draw(st.sampled_from([None, [], (1.0,), np.ones(4)]))
        return name, f"params={bad!r}", "params", apply(params=bad)
    if kind == "state":
        assume(bool(state) and training)
        if draw(st.booleans()):
            key = draw(st.sampled_from(sorted(state)))
            bad = {k: v for k, v in state.items() if k != key}
            return name, f"state without {key!r}", "state", apply(state=bad)
        bad = draw(st.sampled_from([None, [], 3.0]))
        return name, f"state={bad!r}", "state", apply(state=bad)
    if kind == "axis_name":
        label = draw(st.text(min_size=1, max_size=4))
        bound = cls(**cfg, axis_name=label)
        assume(training or not state)  # evaluation with running statistics needs no axis
        return name, f"axis_name={label!r} unbound", "axis_name", apply(norm=bound)
    if kind == "feature size":
        assume(bool(params) or bool(state))
        bad = np.ones((*X_SHAPE[:-1], draw(st.sampled_from([1, 2, 3, 5, 8]))), np.float32)
        arg = "scale" if "scale" in params else "bias" if "bias" in params else "mean"
        return name, f"x of shape {bad.shape}", arg, apply(x=bad)
    if kind == "axis out of range":
        field = draw(
            st.sampled_from(
                [
                    f
                    for f in ("axis", "feature_axes", "feature_axis", "reduction_axes", "time_axis")
                    if f in fields
                ]
            )
        )
        value = draw(out_of_range)
        if name == "SequenceBatchNorm" and field == "axis" and value % 3 == 1:
            value = 7  # time_axis=1 is taken
        bad = cls(**cfg, **{field: value})
        return name, f"{field}={value}", field, apply(norm=bad)
    if kind == "step":
        bad = draw(
            st.one_of(
                st.integers(-9, -1),
                st.floats(),
                st.booleans(),
                st.just(jnp.zeros(2, jnp.int32)),
                st.just(jnp.float32(1)),
            )
        )
        step["step"] = bad
        return name, f"step={bad!r}", "step", apply(x=x[:, 0])
    raise AssertionError(kind)


@examples(ci=150)
@given(invalid_calls(), st.booleans())
def test_invalid_arguments_raise_errors_that_name_them(drawn, under_jit):
    name, what, arg, call = drawn
    if under_jit:  # errors are raised while tracing, with the same message
        plain = call
        call = lambda: jax.jit(lambda: plain())()
    try:
        call()
    except (ValueError, TypeError) as e:
        assert re.search(rf"\b{re.escape(arg)}\b", str(e)), f"{name}, {what}: {e}"
    else:
        raise AssertionError(f"{name}, {what}: no error")


# ------------------------------------------------------------------ the Equinox face


@st.composite
def equinox_examples(draw, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """A core normalizer of the registry entry ``name`` that its ``bn_jax.equinox``
    layer (with Equinox's own ``options``) can stand for (features last,
    statistics of the whole batch), its input shape and an input to run. The
    first values drawn from are typical ones: the first example uses them."""
    fields = {f.name for f in dataclasses.fields(NORMALIZERS[name].cls)}
    batch, features = draw(st.sampled_from([3, 1, 2, 4])), draw(st.sampled_from([3, 1, 2, 4]))
    inner = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    cfg: dict[str, Any] = {"epsilon": draw(st.sampled_from([1e-5, 1e-3]))}
    affine = st.sampled_from([True, False])
    if name in ("LayerNorm", "RMSNorm"):
        cfg["use_scale"] = draw(affine)
        if "use_bias" in fields:
            cfg["use_bias"] = draw(affine)
    else:  # Equinox's channelwise_affine: both or neither
        cfg["use_scale"] = cfg["use_bias"] = draw(affine)
    if "momentum" in fields:
        momenta = [0.9, 0.5, 0.99, 0.0, 1.0] + ([None] if options.get("mode") != "ema" else [])
        cfg["momentum"] = draw(st.sampled_from(momenta))
        cfg["unbiased_running_var"] = draw(st.booleans())
    if "allow_single_value" in fields:  # Equinox trains a batch of one
        cfg["allow_single_value"] = True
    if name == "BatchRenorm":
        cfg["rmax"] = draw(st.sampled_from([1.0, 1.5, 3.0]))
        cfg["dmax"] = draw(st.sampled_from([0.0, 0.5, 5.0]))
    if name == "GhostBatchNorm":
        cfg["virtual_batch_size"] = draw(st.sampled_from([2, 1, 3]))
        batch = cfg["virtual_batch_size"] * draw(st.sampled_from([2, 1]))
    if name == "SequenceBatchNorm":
        inner = (draw(st.sampled_from([3, 1, 2])),)  # time steps
        cfg["max_steps"] = draw(st.sampled_from([2, 1, 3]))
    if name == "GroupNorm":
        features = draw(st.sampled_from([6, 2, 4]))
        cfg["num_groups"] = draw(st.sampled_from([g for g in (2, 1, 3) if features % g == 0]))
    shape = (batch, *inner, features)
    if name in ("LayerNorm", "RMSNorm"):  # an example: the trailing k axes
        k = draw(st.integers(1, len(shape) - 1))
        axes = tuple(range(len(shape) - k, len(shape)))
        if draw(st.booleans()):
            axes = tuple(a - len(shape) for a in axes)
        cfg["reduction_axes"] = cfg["feature_axes"] = axes
    return {
        "norm": equinox_face.core(name, options, **cfg),
        "shape": shape,
        "dtype": draw(st.sampled_from(["float32", "bfloat16"])),
        "mask": draw(st.sampled_from([None, "all", "random", "dead channel"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _agree(got, want, eps_dt, what, extra=0.0):
    """Two computations of the same values in ``dtype``: within a rounding of the
    output dtype and float32 rounding (the Equinox layer's statistics pool the
    mapped examples in another order than the core's reductions), plus ``extra``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    tol = 2 * eps_dt * np.abs(want) + 32 * EPS32 * (1 + np.abs(want).max(initial=0)) + extra
    err = np.abs(got - want)
    assert (err <= tol).all(), f"{what}: max error {err.max():.3g}, ratio {(err / tol).max():.3g}"


def _agree_state(got, want, x, what):
    assert set(got) == set(want), what
    scale2 = (1 + np.abs(np.asarray(x, np.float64)).max()) ** 2
    for k, v in got.items():
        assert v.dtype == np.asarray(want[k]).dtype and v.shape == np.shape(want[k]), (what, k)
        got_k, want_k = np.asarray(v, np.float64), np.asarray(want[k], np.float64)
        np.testing.assert_allclose(
            got_k, want_k, rtol=2e-5, atol=2e-6 * scale2, err_msg=f"{what}: {k}"
        )


def _counted(mask, shape):
    """Per feature (the last axis): whether ``mask`` leaves it a valid element."""
    valid = np.broadcast_to(True if mask is None else mask, shape)
    return valid.reshape(-1, shape[-1]).any(0)


def check_equinox_face(name, norm, shape, options, dtype, mask, seed):
    """Two training calls and an inference call of the Equinox layer on batches
    in the core's layout: outputs and running statistics equal what the core
    normalizer computes on the same batches (Equinox's rules in
    ``equinox_face.core_step``), and the first call equals the float64 reference."""
    eps_dt = float(jnp.finfo(DTYPES[dtype]).eps)
    case = case_for(norm, shape)
    x1, m1, params, _, _, _ = _inputs(case, DTYPES[dtype], "jit", mask, seed)
    x2, m2, _, _, _, _ = _inputs(case, DTYPES[dtype], "jit", mask, seed + 1)
    layer, state = equinox_face.build(name, norm, shape, **options)
    if options.get("use_bias"):  # Equinox's RMSNorm has a bias, the core's does not
        params["bias"] = np.random.default_rng(seed).uniform(-0.5, 0.5, layer.bias.shape)
        params["bias"] = params["bias"].astype(np.float32)
    layer = equinox_face.with_params(layer, params)
    _, start = norm.init(np.zeros(shape, np.float32))
    stateful = equinox_face.stateful(name, options)
    core_start = equinox_face.core_state(layer, state) if stateful else {}
    _agree_state(core_start, start, x1, "the fresh state")

    y1, s1 = equinox_face.apply(name, layer, state, x1, mask=m1)
    want_y, want_state = equinox_face.core_step(layer, norm, params, start, x1, m1)
    assert y1.dtype == x1.dtype
    _agree(y1, want_y, eps_dt, "output")

    # The first call against float64 ("ema" mode's first step copies the batch's).
    first_norm = dataclasses.replace(norm, momentum=0.0) if options.get("mode") == "ema" else norm
    p64 = _f64(params)
    y_ref, state_ref, _ = case_for(first_norm, shape).reference(
        _f64(x1), p64.get("scale"), p64.get("bias"), _f64(start), m1, 0, None
    )
    if options.get("use_bias"):
        y_ref = y_ref + p64["bias"]
    check_output(case, _f64(x1), p64, m1, 0, y1, y_ref, eps_dt)
    if not stateful:
        return
    _agree_state(equinox_face.core_state(layer, s1), want_state, x1, "state after one call")
    scale2 = (1 + np.abs(_f64(x1)).max()) ** 2
    for k, v in equinox_face.core_state(layer, s1).items():
        v = np.asarray(v, np.float64)
        np.testing.assert_allclose(v, state_ref[k], rtol=2e-5, atol=2e-6 * scale2, err_msg=k)

    # A second call from the state the first wrote. "ema" mode's first step lasts
    # until every channel's statistics were finite and counted.
    first = not _counted(m1, shape).all()
    y2, s2 = equinox_face.apply(name, layer, s1, x2, mask=m2)
    want_y, want_state = equinox_face.core_step(
        layer, norm, params, want_state, x2, m2, steps=1, first=first
    )
    _agree(y2, want_y, eps_dt, "output of the second call")
    _agree_state(equinox_face.core_state(layer, s2), want_state, x2, "state after two calls")

    # Inference: the core's evaluation with the statistics the state stands for,
    # whose float32 rounding the output carries (var + eps may be small).
    y3, _ = equinox_face.apply(name, layer, s2, x1, training=False)
    stats = equinox_face.inference_state(layer, s2)
    want_y, _ = equinox_face.core_apply(norm, params, stats, x1, training=False)
    extra, rounding = 0.0, equinox_face.inference_rounding(layer, s2)
    if rounding is not None:  # per feature
        d_mean, d_var = rounding
        inv = 1 / np.sqrt(np.float64(stats["var"]) + norm.epsilon)
        scale = np.abs(p64["scale"]) if "scale" in p64 else 1.0
        off = np.abs(np.float64(want_y) - p64.get("bias", 0.0))
        extra = scale * inv * d_mean + off * inv**2 * d_var
    _agree(y3, want_y, eps_dt, "inference output", extra)


def test_every_equinox_layer_has_a_face():
    """Each layer class of ``bn_jax.equinox`` runs through the matrices."""
    equinox_face.require()
    bnx = equinox_face.bnx
    layers = {n for n in bnx.__all__ if isinstance(getattr(bnx, n), type)}
    assert layers == {face.layer for face in equinox_face.FACES.values()}


EQX_VARIANTS = equinox_face.variants()


@pytest.mark.parametrize("case", EQX_VARIANTS)
@examples(ci=3)
@given(st.data())
def test_equinox_layers_compute_what_the_core_computes(case, data):
    equinox_face.require()
    name, options = EQX_VARIANTS[case]
    check_equinox_face(name, options=options, **data.draw(equinox_examples(name, options)))


def test_equinox_ema_mode_with_unbiased_running_var():
    equinox_face.require()
    norm = equinox_face.core(
        "BatchNorm", momentum=0.5, unbiased_running_var=True, allow_single_value=True
    )
    check_equinox_face("BatchNorm", norm, (4, 2, 3), {"mode": "ema"}, "float32", None, 0)
