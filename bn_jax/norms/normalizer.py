"""The ``Normalizer`` protocol: the calling convention of every bn_jax normalizer."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from bn_jax.norms._common import Mask, Params, State


@runtime_checkable
class Normalizer(Protocol):
    """What every normalizer is: a frozen configuration with pure ``init`` and ``apply``.

    A normalizer is a frozen, hashable, keyword-only dataclass, so it can be
    closed over in ``jax.jit`` or passed as a static argument; its fields are
    validated when it is built. Its two methods are pure functions of their
    arguments::

        params, state = norm.init(features)
        y, state = norm.apply(params, state, x, training=True)    # batch statistics
        y, same = norm.apply(params, state, x, training=False)    # running statistics

    ``params`` is a dict with ``"scale"`` and ``"bias"`` (each absent when
    ``use_scale`` / ``use_bias`` is False); ``state`` is a dict of float32
    running statistics (``{"mean", "var"}`` for BatchNorm, plus what a variant
    needs), or ``{}`` for normalizers that keep none, so every normalizer is
    called the same way. Anything a normalizer adds to ``apply`` (such as
    ``SequenceBatchNorm``'s ``step``) is keyword-only with a default.
    """

    def init(self, features: Any, *, key: jax.Array | None = None) -> tuple[Params, State]:
        """Returns ``(params, state)`` for ``features``.

        Args:
          features: the number of features, a tuple of sizes (one per feature
            axis) or an example input.
          key: PRNG key for random initializers (the default ones need none).

        Returns:
          ``params`` with the arrays in use and the initial ``state``: running
          mean 0 and variance 1 where the normalizer keeps them, else ``{}``.
        """
        ...

    def apply(
        self, params: Params, state: State, x: jax.Array, *, training: bool, mask: Mask = None
    ) -> tuple[jax.Array, State]:
        """Normalizes ``x``; returns ``(y, new_state)``.

        Args:
          params: from :meth:`init`.
          state: from :meth:`init` or a previous ``apply``.
          x: floating-point input, with the features where the normalizer's
            axis fields say.
          training: keyword only, no default. True: statistics of the batch
            (of each example for per-example normalizers) and an updated
            state. False: the running statistics where the normalizer keeps
            them, and the same state.
          mask: boolean array broadcastable to ``x``; only True elements enter
            the statistics (all elements are normalized).

        Returns:
          ``y`` with the shape of ``x`` and the dtype of ``x`` (or the
          normalizer's ``dtype``), and the new state, with the same shapes and
          dtypes as ``state``.

        Raises:
          TypeError: non-float input, a non-bool ``training``, params that are
            not a dict.
          ValueError: a feature-size mismatch between ``x`` and params or
            state, an axis out of range, a mask that does not broadcast, an
            unbound ``axis_name``, and what the normalizer's own docstring
            adds.
        """
        ...
