"""Multi-process data parallel: 2 CPU processes, 2 devices each, under ``jax.distributed``.

Each process is a subprocess (the device count and ``jax.distributed`` are process-wide
and fixed at jax's start); the coordinator listens on 127.0.0.1 at a port the OS had
free a moment before (a run that loses that race is retried on a new port); every
process has a deadline, and once one fails or the deadline passes the rest are killed,
so a process waiting for a dead peer cannot hang CI. CPU collectives are gloo's.

Tolerance: as in ``test_data_parallel.py``, only the order of the batch sums differs
(each device sums 16 of the 64 rows, then the 4 partial gradients are all-reduced
across the 2 processes): measured, the updates differ by <= 4.3e-7 of their largest
entry and the loss by 1e-7 relative. Both are compared at 1e-5 (``LOSS_RTOL``, and
``UPDATE_TOL`` of the update's largest entry); leaving out one process's rows changes
the update by about half its largest entry (measured: 0.46 to 0.78).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from one_cpu import on_one_cpu


PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT_S = 120  # per launch, all processes together; a run takes ~6-12 s on 2 cores
INIT_TIMEOUT_S = 60  # jax.distributed's wait for the peers (worker script)
LOSS_RTOL = 1e-5
UPDATE_TOL = 1e-5
WORKER = REPO / "tests" / "multiprocess_worker.py"
PORT_TAKEN = re.compile(r"address already in use|failed to add port|failed to bind", re.IGNORECASE)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(make_cmd, tmp_path, env: dict | None = None, attempts: int = 3) -> list[str]:
    """Starts ``make_cmd(coordinator, process_id)`` for every process; returns their logs.

    Fails the test (after killing every process still running) on a deadline or a
    non-zero exit; retries on a new port when the coordinator could not bind its own.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    for attempt in range(attempts):
        coordinator = f"127.0.0.1:{free_port()}"
        logs = [tmp_path / f"try{attempt}-process{i}.log" for i in range(PROCESSES)]
        procs = []
        start = time.monotonic()
        try:
            for i, log in enumerate(logs):
                with open(log, "w") as f:  # a file, not a pipe: a full pipe would block its writer
                    procs.append(subprocess.Popen(on_one_cpu(make_cmd(coordinator, i)), cwd=REPO, env=env, stdout=f,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
            while True:
                codes = [p.poll() for p in procs]  # every process polled, each time round
                if None not in codes or any(c not in (None, 0) for c in codes) or time.monotonic() - start > TIMEOUT_S:
                    break
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and its children
                    p.wait()
        seconds = time.monotonic() - start
        outs = [log.read_text() for log in logs]
        codes = [p.returncode for p in procs]
        print(f"{PROCESSES} processes, try {attempt}: {seconds:.1f} s, exit codes {codes}")
        if all(c == 0 for c in codes):
            return outs
        if attempt + 1 < attempts and any(PORT_TAKEN.search(o) for o in outs):
            continue
        why = f"ran past {TIMEOUT_S} s" if seconds > TIMEOUT_S else f"exit codes {codes}"
        tails = "\n".join(f"--- process {i} ({codes[i]}):\n{o[-4000:]}" for i, o in enumerate(outs))
        pytest.fail(f"multi-process run {why}: {' '.join(map(str, make_cmd(coordinator, 0)))}\n{tails}")
    raise AssertionError("unreachable")


def test_one_step_matches_single_process(tmp_path):
    """One SGD step (lr 1, so the update is the gradient) on a global batch of 64 real
    digits split over 2 processes x 2 devices: each process holds its own 32 rows, and
    the replicated parameters and loss every process ends with equal the single-process
    step's."""
    import jax

    from fusedvjp.model import data, mlp

    batch, hidden, lr = 64, 512, 1.0

    def cmd(coordinator, i):
        return [sys.executable, str(WORKER), "--coordinator", coordinator, "--num-processes", str(PROCESSES),
                "--process-id", str(i), "--local-devices", str(LOCAL_DEVICES), "--batch", str(batch),
                "--hidden", str(hidden), "--lr", str(lr), "--impl", "jnp", "--timeout", str(INIT_TIMEOUT_S),
                "--out", str(tmp_path / f"process{i}.npz")]

    launch(cmd, tmp_path)

    ds = data.load_sample()
    with jax.default_device(jax.devices("cpu")[0]):  # the processes run on CPUs too
        params = mlp.init_params(jax.random.key(0), (784, hidden, 10))
        before = jax.device_get(params)
        expected, loss = mlp.sgd_step(params, ds.train_images[:batch], ds.train_labels[:batch], lr, "jnp")
        expected = jax.device_get(expected)

    per_process = batch // PROCESSES
    for i in range(PROCESSES):
        got = np.load(tmp_path / f"process{i}.npz")
        assert int(got["global_devices"]) == PROCESSES * LOCAL_DEVICES
        assert list(got["rows"]) == [i * per_process, (i + 1) * per_process]  # its own rows, and only those
        assert tuple(got["x_local_shape"]) == (batch // (PROCESSES * LOCAL_DEVICES), 784)
        np.testing.assert_allclose(got["loss"], loss, rtol=LOSS_RTOL, err_msg=f"process {i}")
        for name in expected:
            update, want = got[name] - before[name], expected[name] - before[name]
            np.testing.assert_allclose(update, want, rtol=0, atol=UPDATE_TOL * np.max(np.abs(want)),
                                       err_msg=f"process {i}: {name}")


@pytest.mark.slow
def test_trainer_cli_across_processes(tmp_path):
    """``python -m fusedvjp.model.train --coordinator ... --num-processes 2 --process-id I``:
    process 0 reports and writes metrics.json, whose curve is the single-process one."""
    from fusedvjp.model import train

    flags = ["--dataset", "sample", "--epochs", "2", "--max-steps", "10", "--impl", "jnp", "--no-progress"]

    def cmd(coordinator, i):
        return [sys.executable, "-m", "fusedvjp.model.train", *flags, "--coordinator", coordinator,
                "--num-processes", str(PROCESSES), "--process-id", str(i), "--out", str(tmp_path / f"out{i}")]

    xla_flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={LOCAL_DEVICES}"
    outs = launch(cmd, tmp_path, env={"XLA_FLAGS": xla_flags.strip()})
    assert f"data parallel: {PROCESSES * LOCAL_DEVICES} devices ({LOCAL_DEVICES} local, {PROCESSES} process(es))" \
        in outs[0], outs[0][-4000:]
    assert "Epoch 2/2" in outs[0] and "Epoch" not in outs[1]  # process 0 reports
    assert not (tmp_path / "out1" / "metrics.json").exists()
    parallel = json.loads((tmp_path / "out0" / "metrics.json").read_text())
    assert parallel["devices"] == PROCESSES * LOCAL_DEVICES and parallel["processes"] == PROCESSES

    import jax

    with jax.default_device(jax.devices("cpu")[0]):  # the processes run on CPUs too
        train.main(flags + ["--out", str(tmp_path / "single")])
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    for p, s in zip(parallel["epochs"], single["epochs"], strict=True):
        np.testing.assert_allclose(p["step_losses"], s["step_losses"], rtol=LOSS_RTOL)
        np.testing.assert_allclose(p["loss"], s["loss"], rtol=LOSS_RTOL)
        assert abs(p["test_accuracy"] - s["test_accuracy"]) <= 1 / 2000 + 1e-12


@pytest.mark.parametrize("argv, match", [
    (["--coordinator", "127.0.0.1:1234"], "go together"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id must be in"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"], "--num-processes must be in"),
])
def test_multi_process_flags(argv, match, capsys):
    from fusedvjp.model import train

    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_multi_process_flags_imply_data_parallel():
    from fusedvjp.model import train

    args = train.parse_args(["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"])
    assert args.data_parallel and args.process_id == 1
