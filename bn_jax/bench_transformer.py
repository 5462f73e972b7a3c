"""Transformer training step: Flax's norm, bn_jax's plain and memory-efficient norms, none.

A 4-block pre-norm transformer language model (d_model 256, 4 heads, sequence
256, batch 8, vocabulary 1024, float32), written plainly with ``flax.linen``,
built four times from the same code: with ``flax.linen.LayerNorm`` (or
``RMSNorm``), with ``bn_jax.linen.LayerNorm``, with
``bn_jax.linen.LayerNorm(memory_efficient=True)`` and with the identity in
place of every norm. One training step is the forward pass, softmax
cross-entropy, the gradient and an SGD update. Per variant it reports the
step time (median of interleaved repeats: each repeat runs every variant once,
in rotating order), the CPU time of the process during the step (less
sensitive than wall time to other work on a shared machine) and the compiled
temporary memory (``memory_analysis().temp_size_in_bytes``), with memory as a
ratio to the model without normalization and times as ratios to bn_jax's
plain layer.

Run it with ``python -m bn_jax.bench_transformer`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

VARIANTS = ("flax", "bn_jax", "bn_jax memory_efficient", "none")
NORMS = ("LayerNorm", "RMSNorm")
# d_model, heads, sequence, batch, vocabulary, blocks
FULL = {"d_model": 256, "heads": 4, "seq": 256, "batch": 8, "vocab": 1024, "blocks": 4}
TINY = {"d_model": 32, "heads": 2, "seq": 16, "batch": 2, "vocab": 64, "blocks": 2}


@dataclasses.dataclass(frozen=True)
class TransformerResult:
    """Step time (ms) and compiled temporary memory (bytes) per variant."""

    norm: str
    sizes: dict[str, int]
    step_ms: dict[str, float]
    temp_bytes: dict[str, int | None]
    cpu_ms: dict[str, float]

    def ratios(self) -> dict[str, dict[str, float | None]]:
        """Each variant's memory over the no-normalization model's and its time over
        bn_jax's plain layer's (None where that variant was not run)."""
        none, plain = self.temp_bytes.get("none"), self.step_ms.get("bn_jax")
        plain_cpu = self.cpu_ms.get("bn_jax")
        out = {}
        for v, ms in self.step_ms.items():
            temp = self.temp_bytes[v]
            out[v] = {
                "temp_vs_none": None if not none or temp is None else temp / none,
                "time_vs_bn_jax": None if not plain else ms / plain,
                "cpu_time_vs_bn_jax": None if not plain_cpu else self.cpu_ms[v] / plain_cpu,
            }
        return out


def norm_factory(variant: str, norm: str) -> Callable[[], Any]:
    """A constructor of the norm layer ``norm`` (a ``flax.linen`` name) for ``variant``."""
    import flax.linen as nn

    import bn_jax.linen

    if variant == "none":
        return lambda: lambda x: x
    if variant == "flax":
        return getattr(nn, norm)
    cls = getattr(bn_jax.linen, norm)
    if variant == "bn_jax":
        return cls
    if variant == "bn_jax memory_efficient":
        return lambda: cls(memory_efficient=True)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def make_model(norm: Callable[[], Any], sizes: dict[str, int]) -> Any:
    """The pre-norm transformer language model as a ``flax.linen`` module.

    ``norm()`` makes one normalization layer; ``sizes`` is :data:`FULL` or
    :data:`TINY`. The module maps ``(batch, seq)`` tokens to ``(batch, seq,
    vocab)`` logits.
    """
    import flax.linen as nn
    import jax

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = norm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=sizes["heads"])(h, h)
            h = norm()(x)
            return x + nn.Dense(x.shape[-1])(jax.nn.gelu(nn.Dense(4 * x.shape[-1])(h)))

    class TransformerLM(nn.Module):
        @nn.compact
        def __call__(self, tokens, train: bool = True):  # train: no dropout, no effect
            x = nn.Embed(sizes["vocab"], sizes["d_model"])(tokens)
            for _ in range(sizes["blocks"]):
                x = Block()(x)
            return nn.Dense(sizes["vocab"])(norm()(x))

    return TransformerLM()


def make_step(model: Any) -> Callable[..., Any]:
    """``step(params, tokens, labels) -> (params, loss)``: cross-entropy, gradient, SGD."""
    import jax
    import optax

    def loss(params, tokens, labels):
        logits = model.apply({"params": params}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(params, tokens, labels):
        value, grads = jax.value_and_grad(loss)(params, tokens, labels)
        return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads), value

    return step


def run_transformer(
    norm: str = "LayerNorm",
    *,
    variants: Sequence[str] = VARIANTS,
    repeats: int = 7,
    tiny: bool = False,
) -> TransformerResult:
    """Compiles and times one training step of each variant, interleaved."""
    import jax

    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    sizes = TINY if tiny else FULL
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    shape = (sizes["batch"], sizes["seq"])
    tokens = jax.random.randint(k1, shape, 0, sizes["vocab"])
    labels = jax.random.randint(k2, shape, 0, sizes["vocab"])
    compiled, params, temp = {}, {}, {}
    for v in variants:
        model = make_model(norm_factory(v, norm), sizes)
        params[v] = jax.jit(model.init)(k3, tokens)["params"]
        compiled[v] = jax.jit(make_step(model)).lower(params[v], tokens, labels).compile()
        mem = compiled[v].memory_analysis()
        temp[v] = None if mem is None else int(mem.temp_size_in_bytes)
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up
        params[v] = jax.block_until_ready(compiled[v](params[v], tokens, labels))[0]
    for r in range(repeats):
        k = r % len(variants)
        for v in list(variants[k:]) + list(variants[:k]):
            t0, c0 = time.perf_counter(), time.process_time()
            params[v] = jax.block_until_ready(compiled[v](params[v], tokens, labels))[0]
            times[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    step_ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
    cpu_ms = {v: 1e3 * statistics.median(t) for v, t in cpu.items()}
    return TransformerResult(norm, dict(sizes), step_ms, temp, cpu_ms)


def format_result(result: TransformerResult) -> str:
    """One table per norm: step ms, temporary MiB and the two ratios per variant."""
    ratios = result.ratios()

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    head = ("variant", "step ms", "CPU ms", "temp MiB", "temp / none", "time / bn_jax")
    rows = [(*head, "CPU time / bn_jax")]
    for v, ms in result.step_ms.items():
        t, r = result.temp_bytes[v], ratios[v]
        rows.append(
            (
                v,
                f"{ms:.1f}",
                f"{result.cpu_ms[v]:.1f}",
                "-" if t is None else f"{t / 2**20:.1f}",
                fmt(r["temp_vs_none"]),
                fmt(r["time_vs_bn_jax"]),
                fmt(r["cpu_time_vs_bn_jax"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{result.norm}:\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bn_jax.bench_transformer",
        description="Training step of a 4-block pre-norm transformer with Flax's norm, "
        "bn_jax's plain and memory-efficient norms, and none: step time and compiled "
        "temporary memory, as ratios.",
    )
    p.add_argument("--norm", action="append", choices=NORMS, help="default both")
    p.add_argument("--variant", action="append", choices=VARIANTS, help="default all (repeatable)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per variant (median)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--json", action="store_true", help="print one JSON document only")
    return p


def main(argv: Sequence[str] | None = None) -> list[TransformerResult]:
    """Runs the benchmark for each requested norm and prints the tables."""
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be positive")
    variants = args.variant or VARIANTS
    results = [
        run_transformer(n, variants=variants, repeats=args.repeats, tiny=args.tiny)
        for n in args.norm or NORMS
    ]
    if args.json:
        doc = [{**dataclasses.asdict(r), "ratios": r.ratios()} for r in results]
        print(json.dumps(doc, indent=1))
    else:
        print("\n\n".join(format_result(r) for r in results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
