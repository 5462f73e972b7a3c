"""One training process of ``tests/test_resume.py``: train, checkpoint, hang, resume.

Usage (the test starts it and sets ``XLA_FLAGS`` / ``JAX_PLATFORMS``)::

    python tests/_resume_worker.py CKPT_DIR OUT.npz [--hang-at STEP]
        [--multihost PROCESS_ID NUM_PROCESSES PORT]

Trains the model of ``tests/_train.py`` (BatchNorm with ``count_skipped=True``,
guarded Adam) for ``STEPS`` steps of a fixed stream that holds a few NaN and Inf
batches; with ``--multihost`` every process joins one ``jax.distributed`` run
(gloo on 127.0.0.1) and the step runs under ``shard_map`` over all devices of
all processes. An orbax checkpoint of everything (params, optimizer state,
running statistics and counters) is written every ``SAVE_EVERY`` steps.
If ``CKPT_DIR`` holds a checkpoint, training resumes from the latest one.
``--hang-at STEP`` stops making progress once step ``STEP`` is done (after the
last checkpoint, so that the work since then is lost) and prints ``hanging``:
the test kills the process there. At the end, ``OUT.npz`` holds the final state
and, per step run by this process, the loss and the running mean.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

STEPS, BATCH, SAVE_EVERY = 24, 16, 8
BAD_STEPS = (3, 13, 17)  # a NaN, +Inf, -Inf


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt_dir")
    parser.add_argument("out")
    parser.add_argument("--hang-at", type=int)
    parser.add_argument("--multihost", nargs=3, type=int, metavar=("ID", "N", "PORT"))
    args = parser.parse_args(argv)

    import jax

    if args.multihost:
        process_id, num_processes, port = args.multihost
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=60,
        )

    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tests import _train

    mesh = None
    if args.multihost:
        mesh = jax.make_mesh(
            (jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,)
        )
    trainer = _train.make_trainer(_train.guarded_adam(), mesh, count_skipped=True)
    xs, ts = _train.stream(STEPS, BATCH, seed=7)
    for i, value in zip(BAD_STEPS, (np.nan, np.inf, -np.inf), strict=True):
        xs[i, 5, 1] = value

    def place(a):
        if mesh is None:
            return a
        rows = NamedSharding(mesh, P("d"))
        return jax.make_array_from_callback(a.shape, rows, lambda idx: a[idx])

    def replicated(tree):
        if mesh is None:
            return tree
        return jax.device_put(tree, NamedSharding(mesh, P()))

    def local(a):  # this process's copy of a replicated value
        return np.asarray(a if mesh is None else a.addressable_data(0))

    params, opt_state, bn_state = replicated(_train.init(trainer.norm, trainer.optimizer))
    carry = {"params": params, "opt_state": opt_state, "bn_state": bn_state}
    manager = ocp.CheckpointManager(
        os.path.abspath(args.ckpt_dir),
        options=ocp.CheckpointManagerOptions(save_interval_steps=SAVE_EVERY, max_to_keep=2),
    )
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, carry)
        carry = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        print(f"restored step {latest}", flush=True)
    start = latest or 0

    losses, means = [], []
    params, opt_state, bn_state = carry["params"], carry["opt_state"], carry["bn_state"]
    for i in range(start, STEPS):
        params, opt_state, bn_state, loss = trainer.step(
            params, opt_state, bn_state, place(xs[i]), place(ts[i])
        )
        losses.append(local(loss))
        means.append(local(bn_state["mean"]))
        step = i + 1
        state = {"params": params, "opt_state": opt_state, "bn_state": bn_state}
        if manager.save(step, args=ocp.args.StandardSave(state)):
            manager.wait_until_finished()
            print(f"saved step {step}", flush=True)
        if step == args.hang_at:
            print("hanging", flush=True)
            while True:  # a stuck job: only a kill ends it
                time.sleep(1)
    manager.close()

    flat = jax.tree_util.tree_flatten_with_path((params, opt_state, bn_state))[0]
    out = {jax.tree_util.keystr(path): local(v) for path, v in flat}
    out["start"] = np.asarray(start)
    out["losses"] = np.stack(losses) if losses else np.zeros((0,))
    out["means"] = np.stack(means) if means else np.zeros((0, _train.HIDDEN))
    if not args.multihost or jax.process_index() == 0:
        np.savez(args.out, **out)
    if args.multihost:
        jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BaseException:
        # Exit at once: a normal exit would wait in jax.distributed's shutdown
        # barrier for the other process, and the test would only see a timeout.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
