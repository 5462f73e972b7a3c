"""Multi-host BatchNorm: 2 processes on 127.0.0.1, 2 CPU devices each, gloo.

The test starts ``tests/_multihost_worker.py`` twice with
``jax.distributed.initialize`` on a free loopback port; the two processes run
one synchronized training step over all 4 devices. The result must equal a
single-process, single-device reference (``jax.grad`` of
``reference.plain_bn``; float64 NumPy for the running statistics). The subprocesses are
killed, and the test fails with their logs, if anything takes longer than
``TIMEOUT_S`` or if either process fails.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference as ref

WORKER = Path(__file__).with_name("_multihost_worker.py")
ROOT = WORKER.parent.parent
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 100  # both processes together; the test fails cleanly well within 120 s
EPS = 1e-5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_workers(tmp_path: Path, inputs: Path) -> list[dict[str, np.ndarray]]:
    port = free_port()
    procs, logs = [], []
    for i in range(NUM_PROCESSES):
        log = open(tmp_path / f"worker{i}.log", "wb")
        logs.append(log)
        cmd = [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port)]
        cmd += [str(inputs), str(tmp_path / f"out{i}.npz")]
        procs.append(
            subprocess.Popen(cmd, env=worker_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        )
    deadline = time.monotonic() + TIMEOUT_S
    failure = None
    try:
        while True:
            codes = [p.poll() for p in procs]  # poll every process each time
            if None not in codes:
                break
            if any(c not in (None, 0) for c in codes):
                failure = "a worker failed"
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {TIMEOUT_S} s"
                break
            time.sleep(0.1)
        if failure is None and any(p.returncode != 0 for p in procs):
            failure = "a worker failed"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    if failure:
        text = "\n".join(
            f"--- worker {i} (exit {p.returncode}) ---\n"
            + (tmp_path / f"worker{i}.log").read_text(errors="replace")[-4000:]
            for i, p in enumerate(procs)
        )
        pytest.fail(f"multi-host run: {failure}\n{text}")
    return [dict(np.load(tmp_path / f"out{i}.npz")) for i in range(NUM_PROCESSES)]


def reference_step(d):
    """One SGD step on a single device over the whole batch (plain formulas)."""

    def loss(params):
        h = jnp.asarray(d["x"]) @ params["w1"]
        y = ref.plain_bn(h, params["scale"], params["bias"], eps=EPS)
        return jnp.sum((y @ params["w2"] - d["t"]) ** 2) / d["x"].shape[0]

    params = {k: jnp.asarray(d[k]) for k in ("w1", "w2", "scale", "bias")}
    value, grads = jax.value_and_grad(loss)(params)
    new = {k: np.asarray(params[k] - float(d["lr"]) * grads[k]) for k in params}
    h64 = np.asarray(d["x"], np.float64) @ np.asarray(d["w1"], np.float64)
    mean, var, _ = ref.bn_stats(h64)
    m = float(d["momentum"])
    new["mean"] = ref.ema(d["mean"], mean, m)
    new["var"] = ref.ema(d["var"], var, m)
    new["loss"] = np.asarray(value)
    return new


def test_two_processes_match_single_device_reference(tmp_path):
    rng = np.random.default_rng(0)
    n_dev = NUM_PROCESSES * DEVICES_PER_PROCESS
    batch, d_in, c, d_out = n_dev * 6, 3, 4, 2
    d = {
        # each device's rows have their own offset, so per-device statistics differ
        "x": (rng.normal(size=(batch, d_in)) + np.repeat(np.arange(n_dev), 6)[:, None]),
        "t": rng.normal(size=(batch, d_out)),
        "w1": rng.normal(size=(d_in, c)),
        "w2": rng.normal(size=(c, d_out)),
        "scale": rng.uniform(0.5, 1.5, c),
        "bias": rng.normal(size=c),
        "mean": rng.normal(size=c) * 0.1,
        "var": rng.uniform(0.8, 1.2, c),
    }
    d = {k: v.astype(np.float32) for k, v in d.items()}
    d["lr"], d["momentum"] = np.asarray(0.1), np.asarray(0.9)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **d)

    outs = run_workers(tmp_path, inputs)

    expected = reference_step(d)
    for i, out in enumerate(outs):
        assert int(out["process_count"]) == NUM_PROCESSES
        assert int(out["device_count"]) == n_dev
        assert int(out["local_device_count"]) == DEVICES_PER_PROCESS
        for k in ("loss", "w1", "w2", "scale", "bias"):
            np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-5, err_msg=k)
        for k in ("mean", "var"):
            np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
            per_device = out[f"{k}_per_device"]
            assert per_device.shape == (n_dev, c)
            for j in range(n_dev):  # running statistics identical on all 4 devices
                np.testing.assert_array_equal(per_device[j], out[k], err_msg=f"{k} device {j}")
        if i:  # and the two processes agree bit for bit
            for k in out:
                np.testing.assert_array_equal(out[k], outs[0][k], err_msg=k)


# ---------------------------------------------------------------- examples


def run_example(args: list[str], timeout: float) -> str:
    env = dict(os.environ)  # the 8 fake CPU devices of tests/conftest.py
    try:
        done = subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{args[0]} timed out after {timeout} s:\n{e.stdout}\n{e.stderr}")
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


SMALL = ["--steps", "3", "--per-device-batch", "8", "--hidden", "16"]


def test_example_distributed_runs():
    out = run_example(["examples/distributed.py", *SMALL], timeout=110)
    assert "8 x cpu devices" in out
    assert "vs one device on the same batch" in out  # it exits non-zero if they disagree
    assert "test accuracy" in out


def test_example_multihost_local_processes_runs():
    args = ["examples/multihost.py", "--local-processes", "2", "--timeout", "100", *SMALL]
    out = run_example(args, timeout=115)
    assert "2 processes x 2 cpu devices = mesh {'batch': 4}" in out
    assert "identical in every process" in out
    assert "test accuracy" in out
