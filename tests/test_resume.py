"""Nothing lost on restart: kill a training process after a checkpoint, resume, compare.

``tests/_resume_worker.py`` trains a BatchNorm model (with NaN and Inf batches in
its stream, so the skipped-update and optimizer-guard counters move) and writes
an orbax checkpoint every few steps. A run is killed (SIGKILL) while stuck a few
steps after a checkpoint, a new process resumes from that checkpoint, and its
final parameters, optimizer state, running statistics and counters must be
bit-identical to those of an uninterrupted run, as must the loss and running
mean of every step it redid. The same with two processes (``jax.distributed``,
gloo on 127.0.0.1) sharing one ``shard_map`` over 4 devices, where the running
statistics are those of the global batch. Every process is killed, and the test
fails with its log, past ``TIMEOUT_S``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import _resume_worker as worker
from tests.test_multihost import free_port, worker_env

WORKER = Path(worker.__file__)
ROOT = WORKER.parent.parent
TIMEOUT_S = 100  # per launch, all processes together
HANG_AT = 12  # steps 9..12 are done after the checkpoint of step 8, then lost


def launch(tmp: Path, name: str, ckpt: Path, processes: int, hang: bool) -> list[Path]:
    """Runs ``processes`` workers; with ``hang``, kills them once all are stuck.
    Returns their output files (only the first process writes one)."""
    port = free_port()
    procs, logs, outs = [], [], []
    for i in range(processes):
        out = tmp / f"{name}{i}.npz"
        cmd = [sys.executable, str(WORKER), str(ckpt), str(out)]
        if hang:
            cmd += ["--hang-at", str(HANG_AT)]
        if processes > 1:
            cmd += ["--multihost", str(i), str(processes), str(port)]
        log = tmp / f"{name}{i}.log"
        with open(log, "wb") as f:
            procs.append(
                subprocess.Popen(
                    cmd, env=worker_env(), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT
                )
            )
        logs.append(log)
        outs.append(out)
    deadline = time.monotonic() + TIMEOUT_S
    failure = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if hang and all("hanging" in log.read_text(errors="replace") for log in logs):
                break
            if None not in codes:
                if hang or any(codes):
                    failure = f"exit codes {codes}"
                break
            if any(c not in (None, 0) for c in codes):
                failure = f"exit codes {codes}"
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {TIMEOUT_S} s"
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL: no cleanup, no flushing, as a preemption
            p.wait()
    if failure:
        text = "\n".join(
            f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}" for log in logs
        )
        pytest.fail(f"{name} run: {failure}\n{text}")
    return outs


def check_resume_is_bit_identical(tmp: Path, processes: int):
    full = dict(np.load(launch(tmp, "full", tmp / "ckpt_full", processes, hang=False)[0]))
    ckpt = tmp / "ckpt"
    launch(tmp, "killed", ckpt, processes, hang=True)
    assert (ckpt / "8").is_dir() and not (ckpt / str(HANG_AT)).exists()
    resumed = dict(np.load(launch(tmp, "resumed", ckpt, processes, hang=False)[0]))

    assert int(resumed["start"]) == 8 and int(full["start"]) == 0
    state_keys = set(full) - {"start", "losses", "means"}
    assert any("skipped" in k for k in state_keys) and any("notfinite" in k for k in state_keys)
    for k in state_keys:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
        assert np.isfinite(resumed[k]).all(), k
    # every redone step saw the same global batch statistics and loss
    np.testing.assert_array_equal(resumed["means"], full["means"][8:])
    np.testing.assert_array_equal(resumed["losses"], full["losses"][8:])
    skipped = next(v for k, v in full.items() if "skipped" in k)
    np.testing.assert_array_equal(skipped, len(worker.BAD_STEPS))


def test_killed_run_resumes_bit_identical(tmp_path):
    check_resume_is_bit_identical(tmp_path, processes=1)


def test_killed_two_process_run_resumes_bit_identical(tmp_path):
    check_resume_is_bit_identical(tmp_path, processes=2)
