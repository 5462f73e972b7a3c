"""The command line of ``python -m benchmarks`` (run from the repository root of a clone).

Without ``--models`` it times single layers (:mod:`benchmarks.layers`); with
``--models``, a training step of whole models (:mod:`benchmarks.models`). Both
print a text table, or one JSON document with ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import layers
from benchmarks.layers import DEFAULT_DTYPES, DEFAULT_SHAPES, MODES, WORKLOADS, Case
from benchmarks.libraries import available_libraries

PROG = "python -m benchmarks"


def _command(argv: Sequence[str] | None) -> str:
    """The command line of this run, for the report."""
    return " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])


def machine_info() -> dict[str, Any]:
    """Platform, Python, JAX and device of this run, for the report."""
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
    }


def _parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    if not items:
        return dict(DEFAULT_SHAPES)
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise SystemExit(
                f"--shape expects NAME=AxBxC, e.g. conv=128x32x32x64, got {item!r}"
            ) from None
        if len(shape) < 2 or min(shape) < 1:
            raise SystemExit(f"--shape needs at least two positive sizes, got {item!r}")
        shapes[name] = shape
    return shapes


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m benchmarks``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Time bn_jax against flax.linen.BatchNorm (and Haiku/Equinox on request), "
        "with the elementwise floor and the bytes-moved bound.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document only")
    p.add_argument(
        "--repeats",
        type=int,
        help="timed runs per case (median); default 15, with --models 7",
    )
    p.add_argument("--layers", type=int, default=4, help="layers in network mode")
    p.add_argument(
        "--shape",
        action="append",
        metavar="NAME=AxBx..",
        help="activation shape, features last (repeatable); default "
        + ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in DEFAULT_SHAPES.items()),
    )
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mode", action="append", choices=MODES)
    p.add_argument("--workload", action="append", choices=WORKLOADS)
    p.add_argument(
        "--library",
        action="append",
        help="time these libraries (repeatable): bn_jax, flax, haiku, equinox; "
        "default bn_jax and flax",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = p.add_argument_group("model rows (--models)")
    group.add_argument(
        "--models",
        action="store_true",
        help="time a full training step of whole models (ResNet-18, ResNet-50, a BN MLP, "
        "transformer LMs) with "
        "bn_jax's linen drop-in against Flax's layer, instead of single layers",
    )
    group.add_argument(
        "--model", action="append", help="only these models (repeatable); default all"
    )
    group.add_argument(
        "--compiles", type=int, default=3, help="fresh compiles per model (median); default 3"
    )
    group.add_argument(
        "--tiny", action="store_true", help="tiny model configurations (a smoke run)"
    )
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the JSON-ready report (also printed)."""
    args = build_parser().parse_args(argv)
    if args.models:
        return _run_models(args, argv)
    args.repeats = 15 if args.repeats is None else args.repeats
    if args.repeats < 1 or args.layers < 1:
        raise SystemExit("--repeats and --layers must be positive")
    shapes = _parse_shapes(args.shape)
    dtypes = args.dtype or list(DEFAULT_DTYPES)
    modes = args.mode or list(MODES)
    workloads = args.workload or list(WORKLOADS)
    libraries = available_libraries(args.library)
    jobs = [(s, d, m, w) for s in shapes for d in dtypes for m in modes for w in workloads]
    progress = _progress(len(jobs) + 1, disable=args.no_progress)
    biggest = max(shapes.values(), key=lambda s: int(np.prod(s)))
    bw = layers.measure_bandwidth(biggest, args.repeats)
    progress.update(1)
    cases = []
    for s, d, m, w in jobs:
        progress.set_description(f"{s} {d} {m} {w}")
        cases.append(
            layers.run_case(
                s,
                shapes[s],
                d,
                m,
                w,
                libraries=libraries,
                layers=args.layers,
                repeats=args.repeats,
                bandwidth=bw["bytes_per_s"],
            )
        )
        progress.update(1)
    progress.close()
    report = {
        "machine": machine_info(),
        "command": _command(argv),
        "settings": {"repeats": args.repeats, "layers": args.layers, "libraries": libraries},
        "bandwidth": bw,
        "cases": [dataclasses.asdict(c) for c in cases],
        "targets": layers.summarize_targets(cases),
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_text_report(report, cases, libraries))
    return report


def _run_models(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    try:
        from benchmarks import models
    except ImportError as e:
        raise SystemExit(
            f"--models needs flax and optax ({e}); install them with pip install -e '.[bench]'"
        ) from None

    repeats = 7 if args.repeats is None else args.repeats
    results = models.run_models(
        args.model, args.library, tiny=args.tiny, repeats=repeats, compiles=args.compiles
    )
    libraries = list(results[0].step_ms) if results else []
    report = {
        "machine": machine_info(),
        "command": _command(argv),
        "settings": {
            "repeats": repeats,
            "compiles": args.compiles,
            "tiny": args.tiny,
            "libraries": libraries,
        },
        "models": [dataclasses.asdict(r) for r in results],
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        m = report["machine"]
        print(
            f"machine: {m['device']} ({m['backend']}), {m['cpu_count']} cores, {m['platform']}; "
            f"jax {m['jax']}\ntraining step (forward, loss, gradient, optax update, new "
            f"statistics): median of {repeats} interleaved steps; compile: median of "
            f"{args.compiles} fresh compiles\n\n" + models.format_models(results, libraries)
        )
    return report


def _text_report(report: dict[str, Any], cases: Sequence[Case], libraries: Sequence[str]) -> str:
    m, bw = report["machine"], report["bandwidth"]
    machine = (
        f"machine: {m['device']} ({m['backend']}), {m['cpu_count']} cores, {m['platform']}; "
        f"jax {m['jax']}"
    )
    bandwidth = (
        f"bandwidth: {bw['bytes_per_s'] / 1e9:.2f} GB/s (read {bw['read_bytes_per_s'] / 1e9:.2f}, "
        f"read+write {bw['copy_bytes_per_s'] / 1e9:.2f}); median of "
        f"{report['settings']['repeats']} interleaved runs"
    )
    lines = [
        machine,
        bandwidth,
        "",
        layers.format_table(cases, libraries),
        "",
        "targets:",
    ]
    for t in report["targets"]:
        v = t["value"]
        shown = "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
        best = t.get("fewest_passes")
        also = "" if best is None else f"; fewest-pass program {best:.3f}"
        lines.append(
            f"  [{'met' if t['met'] else 'NOT met'}] {t['case']}: {t['target']} "
            f"(measured {shown}{also})"
        )
    return "\n".join(lines)


class _NoProgress:
    """Stands in for a tqdm bar when there is no terminal or no tqdm."""

    def update(self, n: int) -> None:
        pass

    def set_description(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, disable: bool) -> Any:
    if disable or not sys.stderr.isatty():
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m benchmarks``: runs and prints the benchmark."""
    run(argv)
