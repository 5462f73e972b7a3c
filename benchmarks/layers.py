"""Single layers: bn_jax's BatchNorm against flax.linen.BatchNorm (and Haiku / Equinox).

Run ``python -m benchmarks`` from a clone (``--help`` for options; ``--json``
for machines). ``python -m benchmarks --models`` times a full training step of
whole models instead (see :mod:`benchmarks.models`); the layers under test are
in :mod:`benchmarks.libraries`.

BatchNorm is memory-bound, so every time is reported next to three references
measured in the same process:

* the **elementwise floor**: ``y = x * a + b`` with per-channel ``a``, ``b``
  (one read and one write of ``x``), the least any normalization can cost;
* the **bytes-moved bound**: the bytes a layer must move divided by the memory
  bandwidth measured in this run (the better of a streaming reduction, which
  reads ``x``, and an in-place ``y * a + b``, which reads and writes it, each
  looped inside one jitted program so that dispatch is not counted). A training
  forward reads ``x`` twice (the statistics, then the normalization) and
  writes ``y``; a backward reads ``x`` and ``dy`` twice (the two per-channel
  sums, then ``dx``) and writes ``dx``; an eval forward reads ``x`` and writes
  ``y``;
* the **fewest-pass program** (``minimal``): a plain program making exactly the
  passes a fused BatchNorm needs, compiled by the same XLA (see
  :func:`make_minimal`): what this compiler and machine allow any library.

Each workload runs in two modes: a **single** jitted call of one layer, and
**network**, ``--layers`` layers chained inside one jitted program, as in a
real model: XLA reuses buffers instead of allocating a fresh output per call,
and each layer's output goes through an ``optimization_barrier``, standing in
for the convolution that would read it from memory (without it XLA:GPU
recomputes a bare chain of normalizations from its first input and never
writes the layers' outputs). XLA:CPU drops the barrier before fusion: there
the training chain is materialized anyway (each layer's statistics need all
of its input) and the eval chain and the floor's fuse into one pass.
``lax.scan`` over layers is not used:
its stacked residuals and in-place carry add copies of ``x`` that belong to
neither library. Libraries are timed interleaved (each repeat runs every
library once, in rotating order) and the median of ``--repeats`` runs is
reported, with the compiled temporary memory of forward plus backward
(``memory_analysis().temp_size_in_bytes``).

Workloads: ``fwd`` (training forward: output and new running statistics),
``fwd+bwd`` (gradient of ``sum(y * W)`` with respect to parameters and ``x``,
with the new running statistics as auxiliary output) and ``eval`` (running
statistics). Flax runs with its default settings (``use_fast_variance=True``,
output dtype promoted with the float32 parameters, so bfloat16 input gives
float32 output).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.libraries import BUILDERS, Library
from benchmarks.timing import time_interleaved

# The same private copies bn_jax's statistics make on XLA:CPU, so that the
# fewest-pass program gets the pass structure bn_jax gets.
from bn_jax._core.stats import private_copies

DEFAULT_SHAPES = {"conv": (128, 32, 32, 64), "dense": (256, 1024)}
DEFAULT_DTYPES = ("float32", "bfloat16")
WORKLOADS = ("fwd", "fwd+bwd", "eval")
MODES = ("single", "network")
# Units of x.nbytes a layer must move (read + write), per workload.
BYTES_UNITS = {"fwd": 3, "fwd+bwd": 8, "eval": 2}
# Targets, as ratios measured by this benchmark: never behind Flax, training
# within 15% of the fewest-pass program, eval within 5% of the elementwise floor.
TARGETS = {
    "fwd_vs_flax": 1.0,
    "fwd+bwd_vs_flax": 1.0,
    "fwd_vs_fewest_passes": 1.15,
    "fwd+bwd_vs_fewest_passes": 1.15,
    "eval_vs_floor": 1.05,
}


# ----------------------------------------------------------------------------
# Workloads.


def make_workload(lib: Library, workload: str, mode: str, layers: int):
    """Returns ``(fn, n_layers)``: ``fn(params, states, x, w)`` jitted.

    In network mode ``params`` and ``states`` are lists, one entry per layer.
    """
    n_layers = layers if mode == "network" else 1

    def forward(params, states, x, training):
        if mode == "single":
            return lib.apply(params, states, x, training)
        h, new = x, []
        for i, (p, s) in enumerate(zip(params, states, strict=True)):
            h, s = lib.apply(p, s, between_layers(h, i), training)
            new.append(s)
        return h, new

    if workload == "fwd":
        fn = jax.jit(lambda p, s, x, w: forward(p, s, x, True))
    elif workload == "eval":
        fn = jax.jit(lambda p, s, x, w: forward(p, s, x, False)[0])
    else:

        def loss(p, s, x, w):
            y, new = forward(p, s, x, True)
            return jnp.sum(y * w.astype(y.dtype), dtype=jnp.float32), new

        fn = jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))
    return fn, n_layers


def between_layers(h: jax.Array, i: int) -> jax.Array:
    """Layer ``i``'s input: the previous layer's output, materialized.

    In a real model a convolution or matmul reads each normalization's output
    from memory. In a bare chain of normalizations XLA:GPU instead recomputes
    every layer's input from the first one inside each consumer, which no real
    model allows. The barrier stands in for that convolution.
    """
    return h if i == 0 else lax.optimization_barrier(h)


def _per_layer(tree, n_layers: int, mode: str):
    return tree if mode == "single" else [tree] * n_layers


def make_floor(mode: str, layers: int):
    """The elementwise floor ``x * a + b``, once or ``layers`` times chained."""
    n_layers = layers if mode == "network" else 1

    def floor(a, b, x):
        for i in range(n_layers):
            x = between_layers(x, i) * a[i] + b[i]
        return x

    return jax.jit(floor), n_layers


def make_minimal(workload: str, mode: str, layers: int):
    """The fewest passes over memory any training-mode BatchNorm can make, as a
    plain program compiled by the same XLA: per layer, two per-channel sums and
    one elementwise pass forward; for ``fwd+bwd`` also two sums and one
    elementwise pass backward. Its arithmetic is a stand-in (the per-channel
    factors are scaled sums), so it measures what this compiler and machine
    allow, not a normalization. ``fn(x, w)`` jitted; ``None`` for eval, whose
    fewest-pass program is the floor."""
    if workload == "eval":
        return None
    n_layers = layers if mode == "network" else 1
    f32 = jnp.float32

    def sums(u, v):  # sum(u) and sum(u * v) per channel, accumulated in float32
        axes = tuple(range(u.ndim - 1))
        # each pass converts its own copy (else XLA:CPU writes one shared float32 copy)
        u1, u2, v2 = private_copies((u, u, v))
        return jnp.sum(u1.astype(f32), axes), jnp.sum(u2.astype(f32) * v2.astype(f32), axes)

    def minimal(x, w):
        inputs, stats, h = [], [], x
        for i in range(n_layers):
            h = between_layers(h, i)
            s1, s2 = sums(h, h)
            inputs.append(h)
            stats.append(s1 * 1e-6 + s2 * 1e-6)  # stands for the running statistics
            h = (private_copies(h).astype(f32) * (s1 * 1e-6) + s2 * 1e-6).astype(x.dtype)
        if workload == "fwd":
            return h, stats
        g = w
        for i in reversed(range(n_layers)):  # dx needs the forward's statistics too
            g0, g1 = sums(g, inputs[i])
            gi, xi = private_copies((g, inputs[i]))
            gf = gi.astype(f32) * (g0 * 1e-6) + xi.astype(f32) * (g1 * 1e-6)
            g = between_layers((gf + stats[i]).astype(x.dtype), i)
        return g, stats

    return jax.jit(minimal)


def _temp_bytes(fn, *args) -> int | None:
    try:
        stats = fn.lower(*args).compile().memory_analysis()
    except Exception:  # some backends do not report
        return None
    return None if stats is None else int(stats.temp_size_in_bytes)


def measure_bandwidth(shape: tuple[int, ...], repeats: int, passes: int = 8) -> dict[str, float]:
    """Sustained streaming bandwidth in bytes/s, float32.

    Two loops of ``passes`` iterations inside one jitted program, so that the
    cost of dispatching a call is spread over many passes: a reduction over all
    but the last axis (reads ``x`` once per pass) and ``y = y * a + b`` (reads
    and writes ``y`` once per pass). Each pass depends on the loop counter, so
    XLA cannot hoist it out of the loop.
    """
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    axes = tuple(range(x.ndim - 1))

    @jax.jit
    def read(x):
        def body(i, acc):
            return acc + jnp.sum(x * (i + 1).astype(x.dtype), axes)

        return lax.fori_loop(0, passes, body, jnp.zeros(x.shape[-1], x.dtype))

    @jax.jit
    def copy(x):
        return lax.fori_loop(0, passes, lambda i, y: y * 0.5 + i.astype(y.dtype), x)

    t = time_interleaved({"read": lambda: read(x), "copy": lambda: copy(x)}, repeats)
    read_bw = passes * x.nbytes / statistics.median(t["read"])
    copy_bw = passes * 2 * x.nbytes / statistics.median(t["copy"])
    return {
        "read_bytes_per_s": read_bw,
        "copy_bytes_per_s": copy_bw,
        "bytes_per_s": max(read_bw, copy_bw),
    }


@dataclasses.dataclass
class Case:
    """One measured benchmark case: times per library (ms) next to the floor, the
    bytes-moved bound and the fewest-pass program."""

    shape_name: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    workload: str
    layers: int
    times_ms: dict[str, float]
    floor_ms: float
    bound_ms: float
    temp_bytes: dict[str, int | None]
    minimal_ms: float  # the fewest-pass program (the floor for eval)


def run_case(
    shape_name: str,
    shape: tuple[int, ...],
    dtype: str,
    mode: str,
    workload: str,
    *,
    libraries: Sequence[str],
    layers: int,
    repeats: int,
    bandwidth: float,
) -> Case:
    """Times one workload (``fwd``, ``fwd+bwd`` or ``eval``) of every library on one shape.

    Args:
      shape_name: a label for the shape (``"conv"``, ``"dense"``).
      shape: the input shape, features last.
      dtype: the input dtype's name (``"float32"``, ``"bfloat16"``).
      mode: ``"single"`` (one jitted layer) or ``"network"`` (``layers`` chained).
      workload: one of :data:`WORKLOADS`.
      libraries: names of the libraries to time (see :func:`available_libraries`).
      layers: number of chained layers in ``"network"`` mode.
      repeats: interleaved runs; the median is reported.
      bandwidth: the measured memory bandwidth in bytes/s, for the bound.

    Returns:
      The :class:`Case` with median times in milliseconds.
    """
    dt = jnp.dtype(dtype)
    kx, kw = jax.random.split(jax.random.key(0))
    x = (3.0 + 2.0 * jax.random.normal(kx, shape, jnp.float32)).astype(dt)
    w = jax.random.normal(kw, shape, jnp.float32).astype(dt)
    calls: dict[str, Callable[[], Any]] = {}
    temp: dict[str, int | None] = {}
    n = 1
    for name in libraries:
        lib = BUILDERS[name](x)
        fn, n = make_workload(lib, workload, mode, layers)
        params, state = lib.init(x)
        if workload == "eval":  # non-trivial running statistics
            _, state = jax.jit(partial(lib.apply, training=True))(params, state, x)
        args = (_per_layer(params, n, mode), _per_layer(state, n, mode), x, w)
        calls[name] = lambda fn=fn, args=args: fn(*args)
        if workload == "fwd+bwd":
            temp[name] = _temp_bytes(fn, *args)
    floor, _ = make_floor(mode, layers)
    c = shape[-1]
    a = jnp.ones((n, c), dt)
    b = jnp.zeros((n, c), dt)
    calls["floor"] = lambda: floor(a, b, x)
    minimal = make_minimal(workload, mode, layers)
    if minimal is not None:
        calls["minimal"] = lambda: minimal(x, w)
    t = time_interleaved(calls, repeats)
    med = {k: 1e3 * statistics.median(v) for k, v in t.items()}
    bound = 1e3 * BYTES_UNITS[workload] * n * x.nbytes / bandwidth
    return Case(
        shape_name,
        tuple(shape),
        dtype,
        mode,
        workload,
        n,
        {k: v for k, v in med.items() if k not in ("floor", "minimal")},
        med["floor"],
        bound,
        temp,
        med.get("minimal", med["floor"]),
    )


# ----------------------------------------------------------------------------
# Report.


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize_targets(cases: Sequence[Case]) -> list[dict[str, Any]]:
    """The :data:`TARGETS`, checked against the measured ratios."""
    out = []
    for c in cases:
        if "bn_jax" not in c.times_ms:
            continue
        bn = c.times_ms["bn_jax"]
        label = f"{c.shape_name} {c.dtype} {c.mode} {c.workload}"
        checks = []  # (target, reference time the ratio is taken to)
        if c.workload in ("fwd", "fwd+bwd") and "flax" in c.times_ms:
            checks.append((f"{c.workload}_vs_flax", c.times_ms["flax"]))
        if c.workload in ("fwd", "fwd+bwd"):
            checks.append((f"{c.workload}_vs_fewest_passes", c.minimal_ms))
        if c.workload == "eval":
            checks.append(("eval_vs_floor", c.floor_ms))
        if c.workload == "fwd+bwd" and "flax" in c.temp_bytes:
            tb, tf = c.temp_bytes.get("bn_jax"), c.temp_bytes.get("flax")
            if tb is not None and tf is not None:
                out.append(
                    {
                        "case": label,
                        "target": "temp_bytes<=flax",
                        "value": tb,
                        "limit": tf,
                        "met": tb <= tf,
                    }
                )
        for key, reference in checks:
            limit, value = TARGETS[key], _ratio(bn, reference)
            out.append(
                {
                    "case": label,
                    "target": f"{key}<={limit}",
                    "value": value,
                    "limit": limit,
                    "met": value is not None and value <= limit,
                    # the same ratio for the fewest-pass program: the best any
                    # library could measure here
                    "fewest_passes": _ratio(c.minimal_ms, reference),
                }
            )
    return out


def format_table(cases: Sequence[Case], libraries: Sequence[str]) -> str:
    """The measured cases as an aligned text table of times and ratios."""
    others = [n for n in libraries if n != "bn_jax"]
    head = ["case", "mode", "workload"]
    head += [f"{n} ms" for n in libraries]
    head += [f"bn_jax/{n}" for n in others]
    head += ["minimal ms", "floor ms", "bound ms", "bn_jax/minimal", "bn_jax/floor"]
    head += ["bn_jax/bound"]
    head += [f"{n}/bound" for n in others]
    rows = [head]
    for c in cases:
        bn = c.times_ms.get("bn_jax")
        row = [f"{c.shape_name} {c.dtype}", f"{c.mode}x{c.layers}", c.workload]
        row += [_fmt_ms(c.times_ms.get(n)) for n in libraries]
        row += [_fmt(_ratio(bn, c.times_ms.get(n)), 2) for n in others]
        row += [_fmt_ms(c.minimal_ms), _fmt_ms(c.floor_ms), _fmt_ms(c.bound_ms)]
        row += [_fmt(_ratio(bn, c.minimal_ms), 2), _fmt(_ratio(bn, c.floor_ms), 2)]
        row += [_fmt(_ratio(bn, c.bound_ms), 2)]
        row += [_fmt(_ratio(c.times_ms.get(n), c.bound_ms), 2) for n in others]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    mem = [c for c in cases if c.temp_bytes]
    if mem:
        lines.append("")
        lines.append("compiled temp memory of fwd+bwd (MiB): " + ", ".join(libraries))
        for c in mem:
            vals = [_fmt_mib(c.temp_bytes.get(n)) for n in libraries]
            lines.append(f"  {c.shape_name} {c.dtype} {c.mode}x{c.layers}: " + "  ".join(vals))
    return "\n".join(lines)


def _fmt_ms(v: float | None) -> str:
    """Milliseconds to three significant figures or one decimal, whichever is finer."""
    return _fmt(v, 1 if v is None or v >= 10 else 2 if v >= 1 else 3)


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _fmt_mib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**20:.2f}"
