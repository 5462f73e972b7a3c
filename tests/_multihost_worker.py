"""One process of ``tests/test_multihost.py``: a synchronized BatchNorm training step.

Usage (the test starts it; the parent sets ``XLA_FLAGS`` for 2 CPU devices and
``JAX_PLATFORMS=cpu`` before this process imports JAX)::

    python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT INPUTS.npz OUT.npz

Every process loads the same global batch and parameters from ``INPUTS.npz``,
places its own rows on its local devices, runs one SGD step of
``dense -> BatchNorm(axis_name="d") -> dense`` under ``jax.shard_map`` over all
devices of all processes, and writes what it sees to ``OUT.npz``.
"""

from __future__ import annotations

import os
import sys
import traceback


def main(argv: list[str]) -> None:
    process_id, num_processes, port = (int(a) for a in argv[:3])
    inputs, out_path = argv[3], argv[4]

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )

    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import bn_jax

    data = dict(np.load(inputs))
    x, t = data["x"], data["t"]
    params = {
        "w1": data["w1"],
        "bn": {"scale": data["scale"], "bias": data["bias"]},
        "w2": data["w2"],
    }
    state = {"mean": data["mean"], "var": data["var"]}
    lr, momentum = float(data["lr"]), float(data["momentum"])

    mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("d"))
    # every process holds the whole batch in memory; each device gets its rows
    xg = jax.make_array_from_callback(x.shape, rows, lambda idx: x[idx])
    tg = jax.make_array_from_callback(t.shape, rows, lambda idx: t[idx])
    norm = bn_jax.BatchNorm(axis_name="d", momentum=momentum)
    global_batch = x.shape[0]

    def step(params, state, x, t):
        def loss(params):
            h, new_state = norm.apply(params["bn"], state, x @ params["w1"], training=True)
            out = h @ params["w2"]
            return jnp.sum((out - t) ** 2) / global_batch, new_state

        (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        new_params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        per_device = jax.tree.map(lambda a: a[None], new_state)
        return new_params, new_state, per_device, lax.psum(value, "d")

    train = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(), P(), P("d"), P("d")),
            out_specs=(P(), P(), P("d"), P()),
        )
    )
    new_params, new_state, per_device, loss = train(params, state, xg, tg)

    def local(a):  # a replicated array: this process's copy
        return np.asarray(a.addressable_data(0))

    out = {
        "process_count": np.asarray(jax.process_count()),
        "device_count": np.asarray(jax.device_count()),
        "local_device_count": np.asarray(jax.local_device_count()),
        "loss": local(loss),
        "w1": local(new_params["w1"]),
        "w2": local(new_params["w2"]),
        "scale": local(new_params["bn"]["scale"]),
        "bias": local(new_params["bn"]["bias"]),
        "mean": local(new_state["mean"]),
        "var": local(new_state["var"]),
    }
    for k in ("mean", "var"):  # one copy per device, from every process
        out[f"{k}_per_device"] = np.asarray(
            multihost_utils.process_allgather(per_device[k], tiled=True)
        )
    np.savez(out_path, **out)
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
