"""Interleaved timing shared by the layer and the model benchmarks.

The libraries under test are timed in turns, not one after the other: each
repeat runs every library once, and the order rotates by one place per
repeat, so that a slow spell of a shared machine, or a warm cache left by the
previous call, falls on every library alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def rotation(names: Sequence[str], repeat: int) -> list[str]:
    """The order of ``names`` in repeat number ``repeat``: rotated left by ``repeat``."""
    k = repeat % len(names)
    return list(names[k:]) + list(names[:k])


def time_interleaved(
    calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Runs every call once per repeat, in rotating order; returns seconds.

    Each call's result is waited for (``jax.block_until_ready``) inside its
    timed span; ``warmup`` untimed runs of each call come first.
    """
    for call in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(call())
    times: dict[str, list[float]] = {n: [] for n in calls}
    for r in range(repeats):
        for n in rotation(list(calls), r):
            t0 = time.perf_counter()
            jax.block_until_ready(calls[n]())
            times[n].append(time.perf_counter() - t0)
    return times
