"""Whole models: a full training step with bn_jax's drop-in against Flax's layer.

Run ``python -m benchmarks --models`` from a clone (``--model NAME`` for one
row, ``--tiny`` for a seconds-long smoke run). Each row is one model from
:data:`MODELS`, built twice from the same code, once with each library's
normalization classes (``bn_jax.linen.BatchNorm`` or ``flax.linen.BatchNorm``,
same constructor), and one training step: forward in training mode, softmax cross-entropy, gradient,
an ``optax`` SGD-with-momentum update, and the new running statistics. Per
library it reports

* the **step time**: median of ``--repeats`` steps, the libraries interleaved
  (each repeat runs every library once, in rotating order), state fed back in;
* the **compile time**: lowering plus XLA compilation of the step, median of
  ``--compiles`` fresh compiles (a new function each time, so no cache hits),
  interleaved too; as wall-clock time and as this process's CPU time, which
  other jobs on a shared machine disturb much less;
* the compiled **temporary memory** (``memory_analysis().temp_size_in_bytes``);
* the **HLO size**: instructions of the optimized program, and operations of
  the program handed to XLA (StableHLO), to see what the compiler throws away.

A new row is a builder registered with :func:`register`: it takes the library
name and ``tiny`` and returns a :class:`Model`; :func:`norm_class` gives the
library's class of a normalization by its Flax name (``"BatchNorm"``,
``"LayerNorm"``, ``"RMSNorm"``, ...).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import bn_jax.linen
from benchmarks.timing import rotation

# "none" replaces every normalization by the identity: what the rest of the
# model costs (run it with --library none).
MODEL_LIBRARIES = ("bn_jax", "flax", "none")
DEFAULT_MODEL_LIBRARIES = ("bn_jax", "flax")


@dataclasses.dataclass(frozen=True)
class Model:
    """A benchmark row: ``module(x, train=...)`` returns logits for ``labels``."""

    module: nn.Module
    x: jax.Array
    labels: jax.Array


MODELS: dict[str, Callable[[str, bool], Model]] = {}


def register(name: str) -> Callable[[Callable[[str, bool], Model]], Callable[[str, bool], Model]]:
    """Adds ``builder(library, tiny) -> Model`` to :data:`MODELS` under ``name``."""

    def add(builder: Callable[[str, bool], Model]) -> Callable[[str, bool], Model]:
        MODELS[name] = builder
        return builder

    return add


class _NoNorm(nn.Module):
    """The identity, with the constructor arguments the models pass to a norm."""

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def norm_class(library: str, name: str) -> Any:
    """The normalization class ``name`` (a ``flax.linen`` name) of ``library``."""
    if library == "none":
        return _NoNorm
    if library not in ("bn_jax", "flax"):
        raise ValueError(f"library must be one of {MODEL_LIBRARIES}, got {library!r}")
    return getattr(bn_jax.linen if library == "bn_jax" else nn, name)


# ----------------------------------------------------------------------------
# Models, written plainly with flax.linen (He et al. 2016 for the ResNets).


class _BasicBlock(nn.Module):
    features: int
    strides: int
    norm: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(self.norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = self.norm()(y)
        if x.shape != y.shape:
            x = self.norm()(nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x))
        return nn.relu(x + y)


class _Bottleneck(nn.Module):
    features: int
    strides: int
    norm: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(self.norm()(nn.Conv(self.features, (1, 1), use_bias=False)(x)))
        y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(y)
        y = nn.relu(self.norm()(y))
        y = self.norm()(nn.Conv(4 * self.features, (1, 1), use_bias=False)(y))
        if x.shape != y.shape:
            x = self.norm()(nn.Conv(4 * self.features, (1, 1), self.strides, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A ResNet for NHWC images: stem, four stages of blocks, global average pool."""

    stage_sizes: Sequence[int]
    block: Any
    width: int
    num_classes: int
    norm_cls: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = partial(self.norm_cls, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        x = nn.Conv(self.width, (7, 7), (2, 2), use_bias=False)(x)
        x = nn.relu(norm()(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                x = self.block(self.width * 2**i, strides, norm)(x)
        return nn.Dense(self.num_classes)(jnp.mean(x, (1, 2)))


class MLP(nn.Module):
    """Dense -> BatchNorm -> ReLU, ``depth`` times, then a linear classifier."""

    hidden: int
    depth: int
    num_classes: int
    norm_cls: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for _ in range(self.depth):
            x = nn.Dense(self.hidden, use_bias=False)(x)
            x = self.norm_cls(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes)(x)


def _images(batch: int, size: int, classes: int) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch, size, size, 3), jnp.float32)
    return x, jax.random.randint(ky, (batch,), 0, classes)


@register("resnet18")
def resnet18(library: str, tiny: bool) -> Model:
    """ResNet-18, batch 32 of 64x64x3 images, 100 classes (tiny: 4 of 16x16, width 8)."""
    batch, size, width = (4, 16, 8) if tiny else (32, 64, 64)
    x, y = _images(batch, size, 100)
    stages = (1, 1, 1, 1) if tiny else (2, 2, 2, 2)
    model = ResNet(stages, _BasicBlock, width, 100, norm_class(library, "BatchNorm"))
    return Model(model, x, y)


@register("resnet50")
def resnet50(library: str, tiny: bool) -> Model:
    """ResNet-50, batch 32 of 64x64x3 images, 100 classes (tiny: 4 of 16x16, width 8)."""
    batch, size, width = (4, 16, 8) if tiny else (32, 64, 64)
    x, y = _images(batch, size, 100)
    stages = (1, 1, 1, 1) if tiny else (3, 4, 6, 3)
    model = ResNet(stages, _Bottleneck, width, 100, norm_class(library, "BatchNorm"))
    return Model(model, x, y)


@register("bn_mlp")
def bn_mlp(library: str, tiny: bool) -> Model:
    """Four Dense(1024)-BatchNorm-ReLU layers on a batch of 256 (tiny: 2 of 32 on 16)."""
    batch, hidden, depth = (16, 32, 2) if tiny else (256, 1024, 4)
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch, hidden), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 10)
    return Model(MLP(hidden, depth, 10, norm_class(library, "BatchNorm")), x, y)


class TransformerLM(nn.Module):
    """A pre-norm transformer language model: embedding, ``blocks`` x (norm ->
    self-attention -> residual, norm -> GELU MLP -> residual), final norm,
    linear head; ``(batch, seq)`` tokens to ``(batch, seq, vocab)`` logits."""

    vocab: int
    d_model: int
    heads: int
    blocks: int
    norm_cls: Any

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:  # train: no dropout
        x = nn.Embed(self.vocab, self.d_model)(tokens)
        for _ in range(self.blocks):
            h = self.norm_cls()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
            h = self.norm_cls()(x)
            x = x + nn.Dense(self.d_model)(jax.nn.gelu(nn.Dense(4 * self.d_model)(h)))
        return nn.Dense(self.vocab)(self.norm_cls()(x))


def _transformer(library: str, tiny: bool, norm: str, memory_efficient: bool) -> Model:
    cls = norm_class(library, norm)
    if memory_efficient and library == "bn_jax":
        cls = partial(cls, memory_efficient=True)
    vocab, d_model, heads, blocks, batch, seq = (
        (64, 32, 2, 2, 2, 16) if tiny else (1024, 256, 4, 4, 8, 256)
    )
    kx, ky = jax.random.split(jax.random.key(0))
    tokens = jax.random.randint(kx, (batch, seq), 0, vocab)
    labels = jax.random.randint(ky, (batch, seq), 0, vocab)
    return Model(TransformerLM(vocab, d_model, heads, blocks, cls), tokens, labels)


@register("transformer_ln")
def transformer_ln(library: str, tiny: bool) -> Model:
    """4-block pre-LayerNorm transformer LM: d_model 256, 4 heads, batch 8 of 256
    tokens, vocabulary 1024 (tiny: 2 blocks, d_model 32, batch 2 of 16)."""
    return _transformer(library, tiny, "LayerNorm", memory_efficient=False)


@register("transformer_ln_memory_efficient")
def transformer_ln_memory_efficient(library: str, tiny: bool) -> Model:
    """``transformer_ln`` with ``bn_jax.linen.LayerNorm(memory_efficient=True)``."""
    return _transformer(library, tiny, "LayerNorm", memory_efficient=True)


@register("transformer_rms")
def transformer_rms(library: str, tiny: bool) -> Model:
    """``transformer_ln`` with RMSNorm."""
    return _transformer(library, tiny, "RMSNorm", memory_efficient=False)


@register("transformer_rms_memory_efficient")
def transformer_rms_memory_efficient(library: str, tiny: bool) -> Model:
    """``transformer_ln`` with ``bn_jax.linen.RMSNorm(memory_efficient=True)``."""
    return _transformer(library, tiny, "RMSNorm", memory_efficient=True)


# ----------------------------------------------------------------------------
# The training step and its measurements.


def make_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """``step(params, stats, opt_state, x, labels) -> (params, stats, opt_state, loss)``."""

    def loss_fn(params, stats, x, labels):
        logits, new = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, new.get("batch_stats", {})

    def step(params, stats, opt_state, x, labels):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return step


@dataclasses.dataclass
class ModelResult:
    """Per-library measurements of one model's training step."""

    model: str
    input_shape: tuple[int, ...]
    step_ms: dict[str, float]
    compile_s: dict[str, float]  # wall-clock
    compile_cpu_s: dict[str, float]  # CPU time of this process (all its threads)
    temp_bytes: dict[str, int | None]
    hlo_ops: dict[str, int]  # instructions of the optimized program
    stablehlo_ops: dict[str, int]  # operations of the program handed to XLA


def _count_ops(text: str) -> int:
    """Instructions (lines defining a value) in HLO or StableHLO text."""
    return len(re.findall(r"^\s*(?:ROOT\s+)?%\S+\s*=", text, re.M))


def run_model(
    name: str, libraries: Sequence[str], *, tiny: bool, repeats: int, compiles: int
) -> ModelResult:
    """Builds ``MODELS[name]`` for every library and measures its training step."""
    tx = optax.sgd(0.01, momentum=0.9)
    steps, states, compiled, lowered_ops = {}, {}, {}, {}
    x = None
    for lib in libraries:
        m = MODELS[name](lib, tiny)
        x = m.x
        variables = jax.jit(partial(m.module.init, train=False))(jax.random.key(1), m.x)
        params, stats = variables["params"], variables.get("batch_stats", {})
        states[lib] = (params, stats, tx.init(params))
        steps[lib] = (make_step(m.module, tx), m.x, m.labels)
    compile_times: dict[str, list[float]] = {lib: [] for lib in libraries}
    compile_cpu: dict[str, list[float]] = {lib: [] for lib in libraries}
    for r in range(compiles):
        for lib in rotation(libraries, r):
            fn, xb, yb = steps[lib]
            fresh = jax.jit(lambda *a, fn=fn: fn(*a))  # a new function: no cache hit
            t0, c0 = time.perf_counter(), time.process_time()
            lowered = fresh.lower(*states[lib], xb, yb)
            compiled[lib] = lowered.compile()
            compile_times[lib].append(time.perf_counter() - t0)
            compile_cpu[lib].append(time.process_time() - c0)
            lowered_ops[lib] = _count_ops(lowered.as_text())
    temp, hlo = {}, {}
    for lib in libraries:
        mem = compiled[lib].memory_analysis()
        temp[lib] = None if mem is None else int(mem.temp_size_in_bytes)
        hlo[lib] = _count_ops(compiled[lib].as_text())
    times: dict[str, list[float]] = {lib: [] for lib in libraries}
    for lib in libraries:  # warm-up: two steps each
        for _ in range(2):
            states[lib] = _run_step(compiled[lib], states[lib], *steps[lib][1:])
    for r in range(repeats):
        for lib in rotation(libraries, r):
            t0 = time.perf_counter()
            states[lib] = _run_step(compiled[lib], states[lib], *steps[lib][1:])
            times[lib].append(time.perf_counter() - t0)
    return ModelResult(
        name,
        tuple(x.shape),
        {lib: 1e3 * statistics.median(v) for lib, v in times.items()},
        {lib: statistics.median(v) for lib, v in compile_times.items()},
        {lib: statistics.median(v) for lib, v in compile_cpu.items()},
        temp,
        hlo,
        lowered_ops,
    )


def _run_step(compiled, state, x, labels):
    params, stats, opt_state, loss = compiled(*state, x, labels)
    jax.block_until_ready(loss)
    return params, stats, opt_state


def _ratio_text(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def format_models(results: Sequence[ModelResult], libraries: Sequence[str]) -> str:
    """The model rows as a text table: values per library, then bn_jax over each other."""
    others = [lib for lib in libraries if lib != "bn_jax"]
    metrics = [
        ("step ms", "step_ms", lambda v: f"{v:.1f}"),
        ("compile s", "compile_s", lambda v: f"{v:.2f}"),
        ("compile CPU s", "compile_cpu_s", lambda v: f"{v:.2f}"),
        ("temp MiB", "temp_bytes", lambda v: "-" if v is None else f"{v / 2**20:.1f}"),
        ("HLO ops", "hlo_ops", str),
        ("StableHLO ops", "stablehlo_ops", str),
    ]
    head = ["model", "input", "metric", *libraries, *(f"bn_jax/{o}" for o in others)]
    rows = [head]
    for r in results:
        for label, field, fmt in metrics:
            vals = getattr(r, field)
            row = [r.model, "x".join(map(str, r.input_shape)), label]
            row += [fmt(vals[lib]) for lib in libraries]
            row += [_ratio_text(vals.get("bn_jax"), vals.get(o)) for o in others]
            rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_models(
    names: Sequence[str] | None,
    libraries: Sequence[str] | None,
    *,
    tiny: bool,
    repeats: int,
    compiles: int,
) -> list[ModelResult]:
    """Measures every requested model row (all of :data:`MODELS` by default)."""
    names = list(names or MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; registered: {sorted(MODELS)}")
    libraries = list(libraries or DEFAULT_MODEL_LIBRARIES)
    bad = sorted(set(libraries) - set(MODEL_LIBRARIES))
    if bad:
        raise SystemExit(f"--models runs the libraries {list(MODEL_LIBRARIES)}, got {bad}")
    if repeats < 1 or compiles < 1:
        raise SystemExit("--repeats and --compiles must be positive")
    return [run_model(n, libraries, tiny=tiny, repeats=repeats, compiles=compiles) for n in names]
