"""Batch moments: local, masked and cross-device, with one collective.

Every statistic is returned with ``keepdims`` shape (reduced axes kept as size
1) so that it broadcasts against the input, and in at least float32.

Local moments use a *shifted* one-pass formula: with a per-channel shift ``K``
taken from the data itself (the first element along the reduced axes),

    mean = K + S1 / n,    M2 = S2 - S1**2 / n,    S1 = sum(x - K),  S2 = sum((x - K)**2)

which stays accurate when ``|mean| >> std`` (the textbook ``E[x^2] - E[x]^2``
loses every digit there) and gives the mean to within an ulp. ``S1`` and
``S2`` are two sibling reductions of ``x`` (one pass where XLA fuses siblings,
as on GPU; two reads of ``x`` on CPU, where a variadic ``lax.reduce`` doing
both was several times slower). With a mask the valid elements are reduced in
two passes (mean, then centered squares).

Across devices each device contributes ``(count, mean, M2)``; one
``all_gather`` of those ``3 * C`` numbers and the pairwise merge of Chan et al.
(1979),

    n = sum(n_i),  mean = sum(n_i * mean_i) / n,  M2 = sum(M2_i + n_i * (mean_i - mean)**2)

gives the statistics of the global batch exactly, weighted by count (PyTorch's
SyncBatchNorm does the same), with no cancellation.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from bn_jax._core.checks import AxisName, Groups, stat_dtype


class Moments(NamedTuple):
    """Per-channel statistics, keepdims-shaped, in the statistics dtype."""

    count: jax.Array  # type: ignore[assignment]  # valid elements in the statistics
    mean: jax.Array
    m2: jax.Array  # sum of squared deviations from the mean

    @property
    def var(self) -> jax.Array:
        """Biased (population) variance ``M2 / n``; 0 where ``n`` is 0."""
        return self.m2 / jnp.maximum(self.count, 1)


def normalizing_var(m: Moments, mask: jax.Array | None) -> jax.Array:
    """The variance to normalize with: ``M2 / n``, and 1 for a group with no valid
    element (mean 0 there), which then passes through rather than being
    amplified by ``1 / sqrt(epsilon)``. Without a mask every group of a
    non-empty input has elements, so no test enters the program."""
    var = m.m2 / jnp.maximum(m.count, 1)
    return var if mask is None else jnp.where(m.count > 0, var, 1.0)


def moments(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None = None,
    *,
    fast_variance: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: Groups = None,
) -> Moments:
    """Count, mean and M2 of ``x`` over ``axes``, of the whole batch across the devices
    of ``axis_name`` (this device's alone when it is None).

    Complex ``x`` has a complex mean and a real ``M2 = sum(|x - mean|**2)``
    (Flax's convention); the count and ``M2`` are always real.
    """
    dt = stat_dtype(x.dtype)
    real = jnp.finfo(dt).dtype  # of the count and M2: float32 for complex64 too
    sq = _abs_sq if jnp.iscomplexobj(x) else jnp.square
    xf = x.astype(dt)
    if mask is None:
        n = math.prod(x.shape[a] for a in axes)
        count = jnp.full(tuple(1 if i in axes else s for i, s in enumerate(x.shape)), n, real)
        if fast_variance:
            s1 = jnp.sum(xf, axes, keepdims=True)
            s2 = jnp.sum(sq(xf), axes, keepdims=True)
            mean = s1 / n
            m = Moments(count, mean, jnp.maximum(s2 - jnp.real(s1 * jnp.conj(mean)), 0.0))
        else:
            # Shift by the first element along the reduced axes (exact: the moments
            # do not depend on it): one pass whose sums stay small when |mean| >> std.
            first = lax.slice(x, (0,) * x.ndim, count.shape)
            shift = lax.stop_gradient(first).astype(dt)
            x1, x2, k1, k2 = private_copies((x, x, shift, shift))
            s1 = jnp.sum(x1.astype(dt) - k1, axes, keepdims=True)
            s2 = jnp.sum(sq(x2.astype(dt) - k2), axes, keepdims=True)
            m = Moments(count, shift + s1 / n, jnp.maximum(s2 - sq(s1) / n, 0.0))
    else:
        mask = jnp.broadcast_to(mask, x.shape)
        count = jnp.sum(mask, axes, keepdims=True, dtype=real)
        xm = jnp.where(mask, xf, 0)
        mean = jnp.sum(xm, axes, keepdims=True) / jnp.maximum(count, 1).astype(dt)
        if fast_variance:
            m2 = jnp.sum(sq(xm), axes, keepdims=True)
            m2 = m2 - jnp.real(count.astype(dt) * mean * jnp.conj(mean))
            m = Moments(count, mean, jnp.maximum(m2, 0.0))
        else:
            m = Moments(count, mean, _centered_squares(x, mean, axes, mask))
    if axis_name is not None:
        m = merge_across(m, axis_name, axis_index_groups)
    return m


def mean_square(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None = None,
    *,
    axis_name: AxisName | None = None,
    axis_index_groups: Groups = None,
) -> tuple[jax.Array, jax.Array]:
    """``(mean(|x|**2), n)`` over ``axes`` (valid elements only under ``mask``),
    keepdims-shaped, in at least float32: the statistic of RMSNorm.

    With ``axis_name`` the sum of squares and the count are summed over the
    devices in one collective. A group with no valid element gets mean square
    1, so that it is passed through rather than amplified.
    """
    xf = x.astype(stat_dtype(x.dtype))
    dt = jnp.finfo(xf.dtype).dtype  # real: float32 for complex64 too
    sq = _abs_sq(xf) if jnp.iscomplexobj(x) else jnp.square(xf)
    if mask is None:
        ss = jnp.sum(sq, axes, keepdims=True)
        n = jnp.full(ss.shape, math.prod(x.shape[a] for a in axes), dt)
    else:
        mask = jnp.broadcast_to(mask, x.shape)
        ss = jnp.sum(jnp.where(mask, sq, 0), axes, keepdims=True)
        n = jnp.sum(mask, axes, keepdims=True, dtype=dt)
    if axis_name is not None:
        ss, n = group_sum(jnp.stack([ss, n]), axis_name, axis_index_groups)
    if mask is None:
        return ss / n, n
    return jnp.where(n > 0, ss / jnp.maximum(n, 1), 1.0), n


def private_copies(v: Any) -> Any:
    """The same value, which XLA:CPU may not merge with other uses of ``v``.

    On CPU a reduction reads ``x`` in the same pass as its elementwise producer
    (``x - mean``, a dtype conversion) only if no other pass shares that
    producer; when two passes share one, XLA:CPU writes it to memory and reads
    it back. An optimization barrier keeps each pass's producer its own. On
    other platforms this is the identity: XLA:GPU fuses sibling reductions and
    duplicates cheap producers by itself, and a barrier there splits fusions
    (docs/design.md). The platform is chosen when the program is lowered, not
    at trace time: the copy is one primitive whose CPU lowering is the barrier
    and whose other lowerings are the identity, so no platform switch enters
    the program.
    """
    leaves, tree = jax.tree.flatten(v)
    return jax.tree.unflatten(tree, _private_copy_p.bind(*leaves))


_private_copy_p = Primitive("bn_jax_private_copy")
_private_copy_p.multiple_results = True
_private_copy_p.def_impl(lambda *xs: xs)
_private_copy_p.def_abstract_eval(lambda *avals: avals)
mlir.register_lowering(_private_copy_p, lambda ctx, *xs: xs)
mlir.register_lowering(
    _private_copy_p,
    mlir.lower_fun(lambda *xs: lax.optimization_barrier(xs), multiple_results=True),
    platform="cpu",
)
# A copy is linear: its derivative and transpose are copies too, and under
# vmap it copies the batched values.
ad.primitive_jvps[_private_copy_p] = lambda primals, tangents: (
    _private_copy_p.bind(*primals),
    _private_copy_p.bind(*[ad.instantiate_zeros(t) for t in tangents]),
)
ad.primitive_transposes[_private_copy_p] = lambda cts, *args: _private_copy_p.bind(
    *[ad.instantiate_zeros(c) for c in cts]
)
batching.primitive_batchers[_private_copy_p] = lambda args, dims: (
    _private_copy_p.bind(*args),
    dims,
)


def _centered_squares(
    x: jax.Array, mean: jax.Array, axes: tuple[int, ...], mask: jax.Array | None = None
) -> jax.Array:
    """``sum(|x - mean|**2)`` over ``axes`` (valid elements only under ``mask``),
    reading ``x`` in one fused pass (private copies of ``x`` and ``mean``: the
    normalization computes the same ``x - mean``)."""
    x, mean = private_copies(x), private_copies(mean)
    d = x.astype(mean.dtype) - mean
    if mask is not None:
        d = jnp.where(mask, d, 0)
    return jnp.sum(_abs_sq(d), axes, keepdims=True)


def _abs_sq(v: jax.Array) -> jax.Array:
    """``|v|**2``, real."""
    if jnp.iscomplexobj(v):
        return jnp.square(jnp.real(v)) + jnp.square(jnp.imag(v))
    return jnp.square(v)


def merge_across(
    m: Moments,
    axis_name: AxisName,
    axis_index_groups: Groups = None,
) -> Moments:
    """Pools per-device moments over ``axis_name`` with a single all_gather."""
    dt = m.mean.dtype  # complex input gathers its real count and M2 as complex numbers
    packed = jnp.stack([m.count.astype(dt), m.mean, m.m2.astype(dt)])
    g = _all_gather(packed, axis_name, axis_index_groups)
    g = g.reshape((-1, *packed.shape))  # a tuple axis_name gathers several dims
    n_i, mean_i, m2_i = jnp.real(g[:, 0]), g[:, 1], jnp.real(g[:, 2])
    n = jnp.sum(n_i, 0)
    safe = jnp.maximum(n, 1)
    ref = mean_i[:1]  # shift the weighted average for accuracy at large |mean|
    mean = ref[0] + jnp.sum(n_i.astype(dt) * (mean_i - ref), 0) / safe.astype(dt)
    m2 = jnp.sum(m2_i, 0) + jnp.sum(n_i * _abs_sq(mean_i - mean[None]), 0)
    return Moments(n, mean, m2)


def group_sum(
    v: jax.Array,
    axis_name: AxisName | None,
    axis_index_groups: Groups = None,
) -> jax.Array:
    """``psum`` that also works with ``axis_index_groups`` under ``shard_map``."""
    if axis_name is None:
        return v
    if axis_index_groups is None:
        return lax.psum(v, axis_name)
    g = _all_gather(v, axis_name, axis_index_groups)
    return jnp.sum(g.reshape((-1, *v.shape)), 0)


def _all_gather(
    v: jax.Array,
    axis_name: AxisName,
    axis_index_groups: Groups,
) -> jax.Array:
    # Without groups the gathered value is the same on every device: say so,
    # so that shard_map can return running statistics replicated (P()).
    if axis_index_groups is None and _all_manual(axis_name):
        return lax.all_gather(v, axis_name, to="invarying")
    if isinstance(axis_name, tuple) and axis_index_groups is None:
        # vmap cannot gather over several of its axes at once: gather over one
        # name at a time, the last first, which gives the layout of one gather
        # over the tuple (vmap's collectives move no data between devices).
        for name in reversed(axis_name):
            v = lax.all_gather(v, name)
        return v
    return lax.all_gather(v, axis_name, axis_index_groups=axis_index_groups)


def vmapped(axis_name: AxisName) -> bool:
    """True where ``axis_name`` (bound) is mapped by ``jax.vmap`` rather than by
    ``shard_map`` or ``pmap``."""
    return not _all_manual(axis_name)


def _all_manual(axis_name: AxisName) -> bool:
    """True under ``shard_map`` over ``axis_name`` (not under pmap or vmap)."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
    return all(n in manual for n in names)
