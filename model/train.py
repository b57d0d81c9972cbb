"""Train the seed's MNIST MLP: ``python -m fusedvjp.model.train [options]``.

Prints one line per epoch as the seed does (``Epoch 1/10 | Loss: 0.5898 | Test Accuracy:
0.9009``) and writes ``metrics.json``, ``curves.png`` and ``predictions.png`` to ``--out``,
as one set (:func:`write_outputs`), holding ``--out`` against other runs (:func:`hold_out`).

``--data-parallel`` splits every batch over all devices (``model/distributed.py``); with
``--coordinator``, ``--num-processes`` and ``--process-id`` the devices are those of
several processes (``jax.distributed``), each running this same command.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fusedvjp.model import data as data_lib
from fusedvjp.model import distributed
from fusedvjp.model import mlp
from fusedvjp.ops import IMPLS


# The integer options' ranges (None: no upper bound). Past them a value would not fail
# cleanly, or would not do what it says: JAX's PRNG keeps a seed's low 32 bits without x64
# (2**32 would repeat seed 0's run; past int64 it overflows), each epoch's number is folded
# into the shuffle key as a uint32, jax.distributed takes the process count as a C int, and
# a hidden width of 2**31 would already need 6.7 TB of f32 weights (784 x 2**31 x 4 bytes;
# past int64 it fails inside MLIR).
INT_RANGES = {
    "epochs": (1, 2**32 - 1),
    "batch_size": (1, None),
    "hidden": (1, 2**31 - 1),
    "seed": (0, 2**32 - 1),
    "max_steps": (1, None),
    "num_processes": (1, 2**31 - 1),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusedvjp.model.train", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", choices=IMPLS, default="auto")
    p.add_argument("--dataset", choices=("auto", "mnist", "sample"), default="auto",
                   help="mnist: full MNIST from --data-dir, downloaded if missing; sample: the shipped "
                        "10k/2k subset; auto: mnist if present or downloadable, else sample")
    p.add_argument("--data-dir", default="data", help="holds MNIST/raw/*-ubyte[.gz] (torchvision's layout)")
    p.add_argument("--out", default="runs/mnist", help="where metrics.json, curves.png, predictions.png go")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    p.add_argument("--data-parallel", action="store_true",
                   help="split each batch over every device (1-D mesh 'data', parameters replicated); "
                        "--batch-size must be a multiple of the device count")
    multi = p.add_argument_group("multi-process (jax.distributed; implies --data-parallel; run the same "
                                 "command once per process)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address for the coordination service")
    multi.add_argument("--num-processes", type=int, metavar="N")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process's index in [0, N)")
    args = p.parse_args(argv)
    for name, (lo, hi) in INT_RANGES.items():
        value = getattr(args, name)
        if value is None or lo <= value and (hi is None or value <= hi):
            continue
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        p.error(f"--{name.replace('_', '-')} must be {bounds}, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):  # inf and nan train straight to NaN
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.coordinator is not None:
        host, sep, port = args.coordinator.rpartition(":")
        if not (host and sep and re.fullmatch("[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
            p.error(f"--coordinator must be HOST:PORT with PORT in [1, 65535], got {args.coordinator!r}")
    multi_flags = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in multi_flags):
        if any(v is None for v in multi_flags):
            p.error("--coordinator, --num-processes and --process-id go together")
        if not 0 <= args.process_id < args.num_processes:
            p.error(f"--process-id must be in [0, --num-processes), got {args.process_id} of {args.num_processes}")
        args.data_parallel = True
    return args


def prepare_out(out: str | pathlib.Path) -> pathlib.Path:
    """Creates ``out`` and writes a scratch file there, so a bad ``--out`` ends the run
    before the data is loaded, not after training.

    Raises:
      SystemExit: ``out`` cannot be created or written (the message names it).
    """
    out = pathlib.Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise SystemExit(f"error: --out {out} is not a writable directory: {e.strerror or e}") from None
    return out


# What a run writes to --out, replaced together by write_outputs; the lock file hold_out takes.
OUTPUT_NAMES = ("metrics.json", "curves.png", "predictions.png")
LOCK_NAME = ".train.lock"


def hold_out(out: pathlib.Path):
    """Takes ``out`` for this run: an exclusive ``flock`` on ``out/.train.lock``, which
    holds this process's pid. The lock lasts until the returned file is closed or the
    process ends (a killed run leaves no stale lock); the file itself stays.

    Raises:
      SystemExit: another live run holds ``out`` (the message names its pid).
    """
    lock = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise SystemExit(f"error: --out {out} is held by another run (pid {holder}): wait for it to end, "
                         "or pick another --out") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def write_outputs(out: pathlib.Path, metrics: dict, params, dataset: data_lib.Dataset, impl: str) -> None:
    """Writes :data:`OUTPUT_NAMES` into ``out`` as one set; the caller holds ``out`` (:func:`hold_out`).

    The three are written into a staging folder in ``out`` first. Only when all are
    complete are the previous run's three removed, and then the new ones renamed in: an
    interrupt while writing leaves the previous set whole, one during the renames (three
    unlinks and three renames) part of this run's set and nothing of the previous one's.
    No reader sees files of two runs. Other files in ``out`` are left alone.
    """
    for stale in out.glob(".staging-*"):  # a killed run's; no live run stages here while we hold out
        shutil.rmtree(stale, ignore_errors=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
        plot_curves(metrics["epochs"], staging / "curves.png")
        plot_predictions(params, dataset, impl, staging / "predictions.png")
        for name in OUTPUT_NAMES:  # on disk before any rename makes it visible
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        for name in OUTPUT_NAMES:
            (out / name).unlink(missing_ok=True)
        for name in OUTPUT_NAMES:
            os.replace(staging / name, out / name)
        data_lib.fsync_dir(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def accuracy(params, images, labels, impl, batch=2000, mesh=None) -> float:
    """Test accuracy in chunks of ``batch`` rows; with a ``mesh``, each chunk split over it."""
    if mesh is not None:
        batch = max(mesh.size, batch - batch % mesh.size)  # chunks the devices divide; only the tail may not
    correct = 0
    for i in range(0, len(images), batch):
        if mesh is None:
            x, y = jnp.asarray(images[i:i + batch]), jnp.asarray(labels[i:i + batch])
        else:
            x, y = distributed.shard_batch(mesh, images[i:i + batch], labels[i:i + batch])
        correct += int(jnp.sum(mlp.predict(params, x, impl) == y))
    return correct / len(images)


def parallel_mesh(args: argparse.Namespace):
    """The data-parallel mesh over every device, or ``None`` without ``--data-parallel``.

    Raises:
      ValueError: ``--batch-size`` is not a multiple of the device count.
    """
    if not args.data_parallel:
        return None
    distributed.check_batch_size(args.batch_size, jax.device_count())
    return distributed.data_mesh()


def train(args: argparse.Namespace, dataset: data_lib.Dataset, log=print) -> dict:
    """Runs the training loop; returns the metrics dict (also the final params under "params").

    With ``args.data_parallel`` every batch is split over all devices and the params are
    replicated; the returned params are then host (numpy) arrays.
    """
    mesh = parallel_mesh(args)
    # The mesh is set while the steps trace. The Pallas kernels are partitioned over its
    # Auto axis with or without it on a host of several devices; on TPU, where they cannot
    # be (jax-ml/jax#38196), the set mesh is what makes impl="auto" take the jnp path
    # instead of running them whole (docs/sharding.md).
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        return _train(args, dataset, mesh, log)


def _train(args, dataset, mesh, log) -> dict:
    key = jax.random.key(args.seed)
    init_key, shuffle_key = jax.random.split(key)
    params = mlp.init_params(init_key, (dataset.train_images.shape[1], args.hidden, 10))
    if mesh is not None:
        params = distributed.replicate(mesh, params)
    n = len(dataset.train_images)
    steps = -(-n // args.batch_size)  # the last partial batch is kept, as in the seed
    history = []
    for epoch in range(1, args.epochs + 1):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n))
        start, losses = time.perf_counter(), []
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{args.epochs}", leave=False,
                   disable=args.no_progress, file=sys.stderr)
        for step in bar:
            if args.max_steps is not None and step >= args.max_steps:
                break
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            if mesh is None:
                x, y = jnp.asarray(dataset.train_images[idx]), jnp.asarray(dataset.train_labels[idx])
            else:
                x, y = distributed.shard_batch(mesh, dataset.train_images[idx], dataset.train_labels[idx])
            params, loss = mlp.sgd_step(params, x, y, args.lr, args.impl)
            losses.append(loss)
        jax.block_until_ready(params)
        seconds = time.perf_counter() - start
        train_loss = float(np.mean(jax.device_get(losses)))
        acc = accuracy(params, dataset.test_images, dataset.test_labels, args.impl, mesh=mesh)
        history.append({"epoch": epoch, "loss": train_loss, "test_accuracy": acc, "seconds": seconds,
                        "step_losses": [float(v) for v in jax.device_get(losses)]})
        log(f"Epoch {epoch}/{args.epochs} | Loss: {train_loss:.4f} | Test Accuracy: {acc:.4f}")
    return {
        "dataset": dataset.name,
        "impl": args.impl,
        "device": str(jax.devices()[0].device_kind),
        "devices": 1 if mesh is None else mesh.size,
        "processes": jax.process_count(),
        "jax_version": jax.__version__,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "no_progress")},
        "epochs": history,
        "params": params if mesh is None else jax.device_get(params),  # replicated: any process can read it
    }


def plot_curves(history: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss (epoch mean)", title="Loss")
    ax2.plot(epochs, [h["test_accuracy"] for h in history], marker="o", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_predictions(params, dataset: data_lib.Dataset, impl: str, path: pathlib.Path, n: int = 36) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, labels = dataset.test_images[:n], dataset.test_labels[:n]
    pred = np.asarray(mlp.predict(params, jnp.asarray(images), impl))
    side = int(np.ceil(np.sqrt(n)))
    fig, axes = plt.subplots(side, side, figsize=(1.6 * side, 1.8 * side))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].reshape(28, 28) * data_lib.STD + data_lib.MEAN, cmap="gray")
        wrong = pred[i] != labels[i]
        ax.set_title(f"pred {pred[i]} / true {labels[i]}" + (" X" if wrong else ""),
                     fontsize=8, color="red" if wrong else "black")
    fig.suptitle("Test digits: predicted / true (wrong ones in red, marked X)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.coordinator is not None:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    # In a multi-process run every process trains; process 0 reports and writes the files.
    lead = jax.process_index() == 0
    say = print if lead else (lambda *_: None)
    args.no_progress = args.no_progress or not lead
    out = prepare_out(args.out)
    with hold_out(out) if lead else contextlib.nullcontext():
        return _run(args, out, lead, say)


def _run(args, out, lead, say) -> dict:
    try:
        parallel_mesh(args)  # a bad --batch-size fails here, before the data is loaded
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        dataset = data_lib.load(args.dataset, args.data_dir, log=say, progress=not args.no_progress)
    except data_lib.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    say(f"dataset: {dataset.name}: {len(dataset.train_images)} train / {len(dataset.test_images)} test; "
        f"impl={args.impl}; device={jax.devices()[0].device_kind}")
    if args.data_parallel:
        n = jax.device_count()
        say(f"data parallel: {n} devices ({jax.local_device_count()} local, {jax.process_count()} process(es)); "
            f"each batch of {args.batch_size} split {args.batch_size // n} rows per device")
    else:
        say(f"devices: 1 of {jax.device_count()} used (--data-parallel splits each batch over all)")
    metrics = train(args, dataset, log=say)
    params = metrics.pop("params")
    if lead:
        write_outputs(out, metrics, params, dataset, args.impl)
        say(f"wrote {', '.join(str(out / name) for name in OUTPUT_NAMES)}")
    return metrics


if __name__ == "__main__":
    main()
