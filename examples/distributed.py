"""Data-parallel training with synchronized BatchNorm under ``jax.shard_map``.

Each device holds a slice of the global batch. ``BatchNorm(axis_name="batch")``
normalizes with the statistics of the *whole* global batch (one all-gather of
count/mean/M2 per layer in the forward pass, one all-reduce of 2C numbers in
the backward pass), so training on 8 devices computes exactly what one device
would on the concatenated batch; the script checks this on its first step.

    python examples/distributed.py                   # CPU: 8 fake CPU devices
    python examples/distributed.py --steps 300       # GPUs / TPUs: every local accelerator

Nothing in the training code is CPU specific: on a machine with accelerators
the mesh is built over them. The only CPU-specific line asks JAX's CPU backend
for 8 devices when the user has not chosen a number; it has no effect on other
backends.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps")
    parser.add_argument("--per-device-batch", type=int, default=32, help="rows per device")
    parser.add_argument("--hidden", type=int, default=64, help="width of the hidden layer")
    parser.add_argument(
        "--cpu-devices", type=int, default=8, help="fake CPU devices when running on the CPU"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # answers --help and rejects bad arguments before JAX is imported


import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bn_jax

AXIS = "batch"


def use_fake_cpu_devices(n: int) -> None:
    """Asks the CPU backend for ``n`` devices unless the user already chose.

    Must run before JAX creates its backends (before the first ``jax.devices()``).
    """
    chosen = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if not chosen and "JAX_NUM_CPU_DEVICES" not in os.environ:
        jax.config.update("jax_num_cpu_devices", n)


def make_data(seed: int, n: int, d_in: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs with badly scaled, offset features (BatchNorm's use case)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d_in)) * 2.0
    labels = rng.integers(0, classes, n)
    x = centers[labels] + rng.normal(size=(n, d_in))
    x = x * np.logspace(-1, 2, d_in) + 50.0  # feature scales 0.1 .. 100, offset 50
    return x.astype(np.float32), labels.astype(np.int32)


def init_model(seed: int, d_in: int, hidden: int, classes: int, norm: bn_jax.BatchNorm):
    """``dense -> BatchNorm -> relu -> dense``: returns ``(params, state)``."""
    rng = np.random.default_rng(seed)
    bn_params, bn_state = norm.init(hidden)
    params = {
        "dense1": jnp.asarray(rng.normal(size=(d_in, hidden)) / np.sqrt(d_in), jnp.float32),
        "bn": bn_params,
        "dense2": jnp.asarray(rng.normal(size=(hidden, classes)) / np.sqrt(hidden), jnp.float32),
    }
    return params, {"bn": bn_state}


def forward(norm: bn_jax.BatchNorm, params, state, x, *, training: bool):
    h = x @ params["dense1"]
    h, bn_state = norm.apply(params["bn"], state["bn"], h, training=training)
    return jax.nn.relu(h) @ params["dense2"], {"bn": bn_state}


def loss_fn(norm, params, state, x, labels, global_batch):
    logits, new_state = forward(norm, params, state, x, training=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum() / global_batch
    return loss, new_state


def make_train_step(mesh: jax.sharding.Mesh, norm: bn_jax.BatchNorm, optimizer):
    """A jitted data-parallel step; ``x`` and ``labels`` are sharded over ``AXIS``."""

    def local_step(params, opt_state, state, x, labels):
        global_batch = x.shape[0] * lax.axis_size(AXIS)
        (loss, new_state), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
            norm, params, state, x, labels, global_batch
        )
        # params come in replicated (in_specs P()), so shard_map already sums
        # their gradient over devices: no explicit psum of grads is needed.
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # BatchNorm's running statistics are the same on every device, and
        # typed as such, so they can be returned replicated (out_specs P()).
        return params, opt_state, new_state, lax.psum(loss, AXIS)

    step = jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(AXIS), P(AXIS)),
        out_specs=(P(), P(), P(), P()),
    )
    return jax.jit(step)


def check_against_one_device(mesh, params, state, x, labels):
    """Largest relative difference between a sharded step and one device.

    Compares the loss, the gradients and the new running statistics of one
    step on ``mesh`` with those of ``BatchNorm(axis_name=None)`` on one device
    over the concatenated batch. SGD with learning rate 1 makes the parameter
    update equal to minus the gradient.
    """
    sgd = optax.sgd(1.0)
    sharded = make_train_step(mesh, bn_jax.BatchNorm(axis_name=AXIS, momentum=0.9), sgd)
    new_params, _, new_state, loss = sharded(params, sgd.init(params), state, x, labels)
    got = (jax.tree.map(jnp.subtract, params, new_params), new_state, loss)
    single = bn_jax.BatchNorm(momentum=0.9)  # axis_name=None: one device, whole batch
    reference = jax.jit(jax.value_and_grad(partial(loss_fn, single), has_aux=True))
    x1, labels1 = jax.device_put((x, labels), jax.devices()[0])
    (loss, new_state), grads = reference(params, state, x1, labels1, x.shape[0])
    got, want = jax.device_get((got, (grads, new_state, loss)))
    rel = jax.tree.map(
        lambda a, b: np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30), got, want
    )
    return max(jax.tree.leaves(rel))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    use_fake_cpu_devices(args.cpu_devices)
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P(AXIS))
    print(f"{len(devices)} x {devices[0].platform} devices, mesh {dict(mesh.shape)}")

    d_in, classes = 16, 4
    global_batch = args.per_device_batch * len(devices)
    x_all, y_all = make_data(0, 5120, d_in, classes)  # one set of class centers
    (x_all, x_test), (y_all, y_test) = np.split(x_all, [4096]), np.split(y_all, [4096])

    norm = bn_jax.BatchNorm(axis_name=AXIS, momentum=0.9)
    params, state = init_model(2, d_in, args.hidden, classes, norm)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    train_step = make_train_step(mesh, norm, optimizer)

    rng = np.random.default_rng(0)

    def next_batch():
        idx = rng.choice(len(x_all), global_batch, replace=False)
        return jax.device_put(x_all[idx], rows), jax.device_put(y_all[idx], rows)

    x, labels = next_batch()
    diff = check_against_one_device(mesh, params, state, x, labels)
    print(
        f"one step on {len(devices)} devices vs one device on the same batch: "
        f"loss, gradients, running stats agree to {diff:.1e} (relative)"
    )
    if diff > 1e-4:
        raise SystemExit("sharded and single-device steps disagree")

    start = time.perf_counter()
    for step in range(args.steps):
        params, opt_state, state, loss = train_step(params, opt_state, state, x, labels)
        x, labels = next_batch()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {float(loss):.4f}")
    jax.block_until_ready(params)
    print(f"{args.steps} steps in {time.perf_counter() - start:.2f} s")

    # Evaluation uses the running statistics: no axis_name, no shard_map, no
    # communication; jit runs it on the sharded global test batch.
    n_test = len(x_test) // len(devices) * len(devices)
    x_test = jax.device_put(x_test[:n_test], rows)
    logits, _ = jax.jit(partial(forward, norm, training=False))(params, state, x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test[:n_test]))
    print(f"test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
