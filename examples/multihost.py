"""Multi-host data-parallel training with synchronized BatchNorm.

Start one copy of this script per process (usually one per host). The training
step is the one of ``examples/distributed.py``: ``jax.shard_map`` over a mesh of
*all* devices of *all* processes, ``BatchNorm(axis_name="batch")``. JAX's
multi-process runtime carries the collectives (gloo on CPU, NCCL on GPU, ICI
on TPU), so the BatchNorm statistics are those of the global batch.

On a cluster, ``jax.distributed.initialize()`` finds its peers on its own::

    srun python examples/multihost.py          # SLURM: one task per host
    python examples/multihost.py               # on every host of a TPU pod slice

Elsewhere, name the coordinator (process 0's host and a free port)::

    python examples/multihost.py --coordinator HOST:PORT --num-processes N --process-id I

On one machine, try it with N local processes on 127.0.0.1, each with its own
fake CPU devices, talking over gloo::

    python examples/multihost.py --local-processes 2
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
import traceback


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(  # the docstring says how to start the processes
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--local-processes",
        type=int,
        default=0,
        metavar="N",
        help="launch N processes of this script on 127.0.0.1 (CPU, gloo) and wait for them",
    )
    parser.add_argument(
        "--cpu-devices-per-process", type=int, default=2, help="with --local-processes"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds, with --local-processes"
    )
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (default: auto-detect)")
    parser.add_argument("--num-processes", type=int, help="processes in all (default: auto-detect)")
    parser.add_argument(
        "--process-id", type=int, help="this process's index (default: auto-detect)"
    )
    parser.add_argument("--steps", type=int, default=50, help="training steps")
    parser.add_argument("--per-device-batch", type=int, default=32, help="rows per device")
    parser.add_argument("--hidden", type=int, default=64, help="width of the hidden layer")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- launcher


def launch_local(args: argparse.Namespace, argv: list[str]) -> int:
    """Starts ``args.local_processes`` copies of this script; returns an exit code."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    # each process gets its own fake CPU devices (set before it imports JAX)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    n_dev = args.cpu_devices_per_process
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n_dev}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    passthrough = _drop_option(argv, "--local-processes")
    peers = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(args.local_processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *passthrough, *peers, "--process-id", str(i)], env=env
        )
        for i in range(args.local_processes)
    ]
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                return 0
            if any(c not in (None, 0) for c in codes):
                print(f"a process failed (exit codes {codes}); stopping the others", flush=True)
                return 1
            if time.monotonic() > deadline:
                print(f"timed out after {args.timeout:.0f} s; stopping the processes", flush=True)
                return 1
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _drop_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


# ---------------------------------------------------------------- one process


def run_process(args: argparse.Namespace) -> None:
    import jax

    # gloo carries cross-process collectives between CPU devices (JAX's
    # default in recent versions; it does not affect GPU or TPU devices).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    else:  # SLURM, TPU pods, Open MPI, ...: read from the environment
        jax.distributed.initialize()

    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import bn_jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from distributed import AXIS, forward, init_model, make_data, make_train_step

    def log(*a):
        if jax.process_index() == 0:
            print(*a, flush=True)

    devices = jax.devices()  # every device of every process
    mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P(AXIS))
    log(
        f"{jax.process_count()} processes x {jax.local_device_count()} "
        f"{devices[0].platform} devices = mesh {dict(mesh.shape)}"
    )

    d_in, classes = 16, 4
    x_all, y_all = make_data(0, 5120, d_in, classes)  # one set of class centers
    (x_all, x_test), (y_all, y_test) = np.split(x_all, [4096]), np.split(y_all, [4096])
    norm = bn_jax.BatchNorm(axis_name=AXIS, momentum=0.9)
    params, state = init_model(2, d_in, args.hidden, classes, norm)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    train_step = make_train_step(mesh, norm, optimizer)

    # Each process feeds only its own devices: a local batch of
    # per_device_batch rows per local device, from its own random stream.
    rng = np.random.default_rng(jax.process_index())
    local_batch = args.per_device_batch * jax.local_device_count()

    def next_batch():
        idx = rng.choice(len(x_all), local_batch, replace=False)
        return (
            jax.make_array_from_process_local_data(rows, x_all[idx]),
            jax.make_array_from_process_local_data(rows, y_all[idx]),
        )

    start = time.perf_counter()
    for step in range(args.steps):
        x, labels = next_batch()
        params, opt_state, state, loss = train_step(params, opt_state, state, x, labels)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            log(f"step {step:4d}  loss {float(loss.addressable_data(0)):.4f}")
    jax.block_until_ready(params)
    log(f"{args.steps} steps in {time.perf_counter() - start:.2f} s")

    # The replicated results are the same in every process, bit for bit.
    local = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), (params, state))
    multihost_utils.assert_equal(local, "parameters or BatchNorm statistics differ")
    log("parameters and BatchNorm running statistics are identical in every process")

    # Evaluation: running statistics, no communication in BatchNorm.
    share = len(x_test) // jax.process_count() // jax.local_device_count()
    share *= jax.local_device_count()
    lo = jax.process_index() * share
    x_local, y_local = x_test[lo : lo + share], y_test[lo : lo + share]
    logits, _ = jax.jit(lambda p, s, x: forward(norm, p, s, x, training=False))(
        params, state, jax.make_array_from_process_local_data(rows, x_local)
    )
    labels = jax.make_array_from_process_local_data(rows, y_local)
    accuracy = jax.jit(lambda z, y: jnp.mean(jnp.argmax(z, -1) == y))(logits, labels)
    log(f"test accuracy {float(accuracy.addressable_data(0)):.3f}")
    jax.distributed.shutdown()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.local_processes:
        sys.exit(launch_local(args, argv))
    try:
        run_process(args)
    except BaseException:
        # Leave at once: a normal exit would wait in jax.distributed's shutdown
        # barrier for processes that may never get there.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
