"""Data-parallel training (``--data-parallel``, ``model/distributed.py``) on 8 CPU devices.

XLA's host platform is split into 8 devices only by a flag read when jax starts, and
this pytest process has started jax with one: every 8-device run here is a subprocess
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``). The single-device runs they are
compared with run in this process.

Tolerances. A data-parallel step computes the same sums as the single-device step in
another order: each device reduces its 16 of the 128 rows, then the gradients are
all-reduced over the 8 devices. That moves gradient entries by a few f32 ulps, and the
per-step losses by <= 2.4e-7 relative (measured over these runs: jnp, xla and pallas on
8 devices, jnp on 3). Losses (per step and per epoch) are compared with ``rtol=LOSS_RTOL``
= 1e-5: 40x the drift seen, and far below what a real fault gives (measured on 30 steps
of this run: leaving one device's 16 rows out of every gradient moves the losses by up
to 9e-3 relative, a gradient 8/7 too large by 7e-2). Test accuracy may differ by one digit
of the 2000-digit test set: an argmax whose two top logits lie within those ulps can flip
(none did: every accuracy was equal).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from one_cpu import on_one_cpu


LOSS_RTOL = 1e-5
DEVICES = 8
IMPLS = ("jnp", "xla", "pallas")
# A short run: 2 epochs x 15 steps of the seed's settings on the shipped sample (~6 s a
# run on 2 cores). Pallas runs in interpret mode, and 8 simulated devices each interpret
# their kernels on this machine's 2 cores, so it gets a smaller model and fewer steps.
RUN_FLAGS = ["--dataset", "sample", "--epochs", "2", "--max-steps", "15", "--no-progress"]
PALLAS_FLAGS = ["--dataset", "sample", "--epochs", "1", "--max-steps", "4", "--hidden", "64", "--no-progress"]
SUBPROCESS_TIMEOUT_S = 120


def _env(devices: int) -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}


def on_cpu():
    """The single-device reference runs on the CPU, as the subprocesses do (JAX_PLATFORMS=cpu)."""
    import jax

    return jax.default_device(jax.devices("cpu")[0])


def run_on_devices(devices: int, args: list[str]) -> subprocess.CompletedProcess:
    """``python ARGS`` with the CPU split into ``devices`` devices, pinned to one CPU
    (``one_cpu.py``: more devices than cores can otherwise hang XLA at a rendezvous);
    fails the test on a timeout."""
    cmd = on_one_cpu([sys.executable, *args])
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(devices), capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} ran past {SUBPROCESS_TIMEOUT_S} s\n{(e.stdout or '')[-4000:]}"
                    f"{(e.stderr or '')[-4000:]}")
    what = "python -c (a probe)" if args[0] == "-c" else " ".join(args)
    print(f"{devices} devices: {what}: {time.perf_counter() - start:.1f} s")
    return proc


def train_cli(devices: int, flags: list[str]) -> subprocess.CompletedProcess:
    proc = run_on_devices(devices, ["-m", "fusedvjp.model.train", *flags])
    assert proc.returncode == 0, (f"train {' '.join(flags)} on {devices} devices:\n"
                                  f"{proc.stdout[-4000:]}{proc.stderr[-8000:]}")
    return proc


def assert_same_curve(parallel: dict, single: dict, n_test: int) -> None:
    assert len(parallel["epochs"]) == len(single["epochs"])
    for p, s in zip(parallel["epochs"], single["epochs"]):
        epoch = f"epoch {s['epoch']}"
        assert len(p["step_losses"]) == len(s["step_losses"]), epoch
        np.testing.assert_allclose(p["step_losses"], s["step_losses"], rtol=LOSS_RTOL, err_msg=epoch)
        np.testing.assert_allclose(p["loss"], s["loss"], rtol=LOSS_RTOL, err_msg=epoch)
        assert abs(p["test_accuracy"] - s["test_accuracy"]) <= 1 / n_test + 1e-12, (epoch, p, s)


@pytest.mark.slow
# The training runs cover the hand-written VJP on both of its paths (jnp, and the kernels
# partitioned by ops/_sharding.py); impl="xla" is plain jnp that XLA partitions itself,
# checked by the compiled-step test below and by tests_multidevice (CI time).
@pytest.mark.parametrize("impl", ("jnp", "pallas"))
def test_eight_devices_follow_one_device(impl, tmp_path):
    """The same short run on 8 devices (each batch of 128 split 16 rows per device) and on
    one: equal per-step and per-epoch losses and test accuracy, from the metrics.json each
    writes."""
    from fusedvjp.model import train

    flags = (PALLAS_FLAGS if impl == "pallas" else RUN_FLAGS) + ["--impl", impl]
    proc = train_cli(DEVICES, flags + ["--data-parallel", "--out", str(tmp_path / "dp")])
    assert f"data parallel: {DEVICES} devices" in proc.stdout and "16 rows per device" in proc.stdout, proc.stdout
    parallel = json.loads((tmp_path / "dp" / "metrics.json").read_text())
    assert parallel["devices"] == DEVICES and parallel["config"]["data_parallel"]

    start = time.perf_counter()
    with on_cpu():
        train.main(flags + ["--out", str(tmp_path / "one")])
    print(f"1 device in-process: {time.perf_counter() - start:.1f} s")
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert single["devices"] == 1
    assert_same_curve(parallel, single, n_test=2000)


@pytest.mark.slow
def test_batches_the_devices_do_not_divide_are_kept(tmp_path):
    """3 devices, batch 96, a whole epoch of the sample: the last batch (16 rows) and the
    evaluation tail (1998 + 2 rows) do not split over 3 devices; they run replicated, and
    the curve is still the single-device one."""
    from fusedvjp.model import train

    flags = ["--dataset", "sample", "--epochs", "1", "--batch-size", "96", "--impl", "jnp", "--no-progress"]
    train_cli(3, flags + ["--data-parallel", "--out", str(tmp_path / "dp")])
    parallel = json.loads((tmp_path / "dp" / "metrics.json").read_text())
    assert parallel["devices"] == 3 and len(parallel["epochs"][0]["step_losses"]) == 105  # ceil(10000 / 96)
    with on_cpu():
        train.main(flags + ["--out", str(tmp_path / "one")])
    assert_same_curve(parallel, json.loads((tmp_path / "one" / "metrics.json").read_text()), n_test=2000)


def test_batch_size_not_divisible_by_the_devices_is_a_clear_error(tmp_path):
    """Before any data is loaded: the message names the batch size and the device count."""
    proc = run_on_devices(DEVICES, ["-m", "fusedvjp.model.train", "--data-parallel", "--batch-size", "100",
                                    "--dataset", "sample", "--out", str(tmp_path), "--no-progress"])
    assert proc.returncode != 0
    assert "--batch-size 100 is not divisible by the 8 devices" in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "dataset:" not in proc.stdout


# --- the compiled step: which collectives -----------------------------------------------

COLLECTIVE = re.compile(
    r"=\s*(\([^)]*\)|\S+)\s+(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(")
# Prints the compiled per-device HLO of the trainer's data-parallel step on all devices.
HLO_PROBE = """
import sys
from fusedvjp.model import distributed
mesh = distributed.data_mesh()
print(distributed.lower_train_step(mesh, int(sys.argv[1]), (784, 512, 10), impl=sys.argv[2]).compile().as_text())
"""


def collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(collective, [result shapes]) for each collective in a compiled HLO module."""
    found = []
    for types, op in COLLECTIVE.findall(hlo):
        shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", types)]
        found.append((op, shapes))
    return found


@pytest.mark.parametrize("impl", IMPLS)
def test_step_all_reduces_gradients_and_gathers_no_activation(impl):
    """The compiled 8-device step holds one batch shard per device ([16, 784]); its only
    collectives are all-reduces of parameter-shaped gradients and the scalar loss -- no
    all-gather (or any collective) of an activation ([128 or 16, 784 / 512 / 10])."""
    batch = 128
    proc = run_on_devices(DEVICES, ["-c", HLO_PROBE, str(batch), impl])
    assert proc.returncode == 0, proc.stderr[-8000:]
    hlo = proc.stdout
    layout = re.search(r"entry_computation_layout=\{\((.*?)\)->", hlo).group(1)
    assert f"f32[{batch // DEVICES},784]" in layout and f"s32[{batch // DEVICES}]" in layout, layout

    params = {(784, 512), (512,), (512, 10), (10,)}
    params |= {shape[::-1] for shape in params}  # XLA may reduce a weight gradient transposed
    found = collectives(hlo)
    assert found, "no collective: the step is not partitioned (or the gradients are never reduced)"
    assert {op for op, _ in found} == {"all-reduce"}, found
    reduced = {shape for _, shapes in found for shape in shapes}
    assert reduced <= params | {()}, f"a non-parameter array crosses devices: {reduced - params - {()}}"
    for w in ((784, 512), (512, 10)):
        assert w in reduced or w[::-1] in reduced, f"gradient of the {w} weight not all-reduced: {found}"


# --- the helpers, on this process's one device ------------------------------------------

def test_helpers_on_one_device():
    import jax

    from fusedvjp.model import distributed

    mesh = distributed.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    assert distributed.process_rows(mesh, 64) == slice(0, 64)
    x, y = distributed.shard_batch(mesh, np.ones((64, 3), np.float32), np.arange(64, dtype=np.int32))
    assert x.shape == (64, 3) and np.array_equal(np.asarray(y), np.arange(64))
    distributed.check_batch_size(96, 8)
    with pytest.raises(ValueError, match=r"--batch-size 100 is not divisible by the 8 devices"):
        distributed.check_batch_size(100, 8)
