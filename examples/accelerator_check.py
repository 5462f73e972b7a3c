"""Checks bn_jax on an accelerator (GPU/TPU): numerics, then the benchmark.

    python examples/accelerator_check.py --out results/ [bench arguments]

Run it from a clone: the benchmark is the repository's ``benchmarks/``
package, which is not installed with bn_jax.

1. **Numerics.** Training-mode output and the gradient of ``sum(y * w)`` (with
   respect to ``x``, ``scale`` and ``bias``) in float32, bfloat16 and float16,
   against a float64 NumPy formula on the same (rounded) inputs, as
   ``|out - ref| / |ref|``; Flax (default fast variance and the stable
   ``use_fast_variance=False``) is shown beside. One case has ``|mean| = 1e4``
   with unit std, where a one-pass ``E[x^2] - E[x]^2`` variance cancels.
2. **Benchmark.** ``python -m benchmarks`` with every other argument
   (``--shape``, ``--library``, ...), its report saved as ``bench.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the rest (passed on to ``python -m benchmarks``)."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other options go to the benchmark: see python -m benchmarks --help.",
    )
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("outputs/accelerator"),
        help="folder for numerics.json and bench.json (default: %(default)s)",
    )
    p.add_argument("--skip-bench", action="store_true", help="run the numerics only")
    return p.parse_known_args(argv)


if __name__ == "__main__":
    parse_args()  # answers --help and rejects bad arguments before JAX is imported


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The benchmarks sit beside bn_jax at the root of the clone this script is in;
# first on the path, so that the clone's bn_jax is the one measured.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import bn_jax
from benchmarks import cli

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


# ----------------------------------------------------------------------------
# 1. Numerics against float64.


def reference(x, w, scale, bias, eps=1e-5):
    """Float64 BatchNorm over all but the last axis, and the gradient of sum(y * w)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    scale, bias = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
    red = tuple(range(x.ndim - 1))
    mean, var = x.mean(red), x.var(red)
    inv = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean) * inv
    y = x_hat * scale + bias
    dscale, dbias = (w * x_hat).sum(red), w.sum(red)
    dx = scale * inv * (w - w.mean(red) - x_hat * (w * x_hat).mean(red))
    return y, (dx, dscale, dbias)


def _rel(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def numerics() -> list[dict]:
    rows = []
    cases = [
        ("conv 64x16x16x32, mean 3 std 2", (64, 16, 16, 32), 3.0, 2.0),
        ("dense 512x256, mean 1e4 std 1", (512, 256), 1e4, 1.0),
    ]
    for label, shape, loc, std in cases:
        for dtype in ("float32", "bfloat16", "float16"):
            if loc > 1e3 and dtype != "float32":
                continue  # not representable to one std in 8 or 11 mantissa bits
            dt = jnp.dtype(dtype)
            kx, kw, ks, kb = jax.random.split(jax.random.key(1), 4)
            x = (loc + std * jax.random.normal(kx, shape, jnp.float32)).astype(dt)
            w = jax.random.normal(kw, shape, jnp.float32).astype(dt)
            c = shape[-1]
            scale = 1.0 + 0.1 * jax.random.normal(ks, (c,))
            bias = 0.1 * jax.random.normal(kb, (c,))
            y_ref, g_ref = reference(x.astype(jnp.float32), w.astype(jnp.float32), scale, bias)

            norm = bn_jax.BatchNorm()
            params, state = norm.init(x)
            params = {"scale": scale, "bias": bias}

            @jax.jit
            def run(params, state, x, w, norm=norm):
                def loss(p, x):
                    y, _ = norm.apply(p, state, x, training=True)
                    return jnp.sum(y.astype(jnp.float32) * w.astype(jnp.float32)), y

                (_, y), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
                return y, gx, gp["scale"], gp["bias"]

            y, gx, gs, gb = run(params, state, x, w)
            row = {
                "case": label,
                "dtype": dtype,
                "y": _rel(y, y_ref),
                "dx": _rel(gx, g_ref[0]),
                "dscale": _rel(gs, g_ref[1]),
                "dbias": _rel(gb, g_ref[2]),
            }
            for name, fast in (("flax_fast", True), ("flax_stable", False)):
                m = nn.BatchNorm(use_running_average=False, use_fast_variance=fast, dtype=dt)
                v = m.init(jax.random.key(0), x)
                v = {"params": {"scale": scale, "bias": bias}, "batch_stats": v["batch_stats"]}
                yf, _ = jax.jit(lambda v, x, m=m: m.apply(v, x, mutable=["batch_stats"]))(v, x)
                row[f"y_{name}"] = _rel(yf, y_ref)
            # A float32 input at |mean| >> std is known only to its ulp: the mean
            # itself cannot be nearer than half an ulp, in std units.
            row["tol"] = max(TOLERANCE[dtype], float(np.spacing(np.float32(loc))) / std)
            worst = max(row[k] for k in ("y", "dx", "dscale", "dbias"))
            row["ok"] = bool(np.isfinite(worst) and worst <= row["tol"])
            rows.append(row)
    return rows


def format_numerics(rows: list[dict]) -> str:
    head = ["case", "dtype", "y", "dx", "dscale", "dbias", "flax y (fast)", "flax y (stable)", ""]
    out = [head]
    for r in rows:
        vals = [r[k] for k in ("y", "dx", "dscale", "dbias", "y_flax_fast", "y_flax_stable")]
        ok = f"{'ok' if r['ok'] else 'FAIL'} (tol {r['tol']:.0e})"
        out.append([r["case"], r["dtype"], *(f"{v:.1e}" for v in vals), ok])
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    lines = ("  ".join(v.ljust(wd) for v, wd in zip(row, widths, strict=True)) for row in out)
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# 2. Benchmark.


def main(argv: list[str] | None = None) -> None:
    args, bench_args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(cli.machine_info()), flush=True)

    rows = numerics()
    (args.out / "numerics.json").write_text(json.dumps(rows, indent=1))
    print(format_numerics(rows), flush=True)
    if not args.skip_bench:
        report = cli.run(bench_args)  # with a progress bar unless --no-progress
        (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    failed = [f"{r['case']} {r['dtype']}" for r in rows if not r["ok"]]
    if failed:
        raise SystemExit(f"numerics out of tolerance: {failed}")


if __name__ == "__main__":
    main()
