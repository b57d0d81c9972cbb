"""The MNIST MLP: initialization, training on the shipped sample, and impl agreement."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from fusedvjp.model import mlp, train
from test_data import _write_idx


def test_init_matches_the_seed():
    p = mlp.init_params(jax.random.key(0))
    assert p["w1"].shape == (784, 512) and p["w2"].shape == (512, 10)
    assert np.all(p["b1"] == 0) and np.all(p["b2"] == 0)
    np.testing.assert_allclose(np.std(p["w1"]), np.sqrt(2 / 784), rtol=0.02)
    np.testing.assert_allclose(np.std(p["w2"]), np.sqrt(2 / 512), rtol=0.1)


@pytest.mark.slow
def test_trains_on_the_shipped_sample(tmp_path, capsys):
    """The seed's settings for 2 epochs on the 10k/2k sample reach >= 0.85 test accuracy."""
    metrics = train.main(["--dataset", "sample", "--epochs", "2", "--impl", "jnp", "--out", str(tmp_path),
                          "--no-progress"])
    out = capsys.readouterr().out
    assert "Epoch 1/2 | Loss: " in out and "| Test Accuracy: " in out
    assert metrics["epochs"][-1]["test_accuracy"] >= 0.85
    assert metrics["epochs"][1]["loss"] < metrics["epochs"][0]["loss"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["test_accuracy"] for e in saved["epochs"]] == [e["test_accuracy"] for e in metrics["epochs"]]
    for name in ("curves.png", "predictions.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pallas_matches_jnp_step_for_step():
    """A few SGD steps with impl="pallas" (interpret mode) follow impl="jnp"'s losses."""
    from fusedvjp.model import data

    ds = data.load_sample()
    losses = {}
    for impl in ("jnp", "pallas"):
        args = train.parse_args(["--impl", impl, "--epochs", "1", "--max-steps", "3", "--hidden", "64",
                                 "--no-progress"])
        metrics = train.train(args, ds, log=lambda *_: None)
        losses[impl] = metrics["epochs"][0]["step_losses"]
    assert len(losses["jnp"]) == 3
    np.testing.assert_allclose(losses["pallas"], losses["jnp"], rtol=1e-4)


def test_sgd_step_decreases_loss_on_a_batch():
    params = mlp.init_params(jax.random.key(1), (20, 16, 10))
    x = jax.random.normal(jax.random.key(2), (32, 20))
    y = jax.random.randint(jax.random.key(3), (32,), 0, 10)
    before = mlp.loss_fn(params, x, y, "jnp")
    for _ in range(5):
        params, _ = mlp.sgd_step(params, x, y, 0.1, "jnp")
    assert mlp.loss_fn(params, x, y, "jnp") < before
    assert jnp.isfinite(before)


def test_bad_cli_arguments():
    with pytest.raises(SystemExit):
        train.parse_args(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        train.parse_args(["--impl", "cuda"])


@pytest.mark.parametrize("flag, value, match", [
    ("--lr", "inf", "--lr must be a finite number > 0"),
    ("--lr", "nan", "--lr must be a finite number > 0"),
    ("--lr", "0", "--lr must be a finite number > 0"),
    ("--max-steps", "0", "--max-steps must be >= 1"),
    ("--max-steps", "-3", "--max-steps must be >= 1"),
    # Past these ranges a value ended in a traceback (OverflowError, MLIR's TypeError) or
    # silently repeated another value's run (seed 2**32 is seed 0's key without x64).
    ("--seed", "18446744073709551616", "--seed must be in [0, 4294967295]"),
    ("--seed", str(2**32), "--seed must be in [0, 4294967295]"),
    ("--seed", "-1", "--seed must be in [0, 4294967295]"),
    ("--epochs", str(2**32), "--epochs must be in [1, 4294967295]"),
    ("--hidden", str(10**30), "--hidden must be in [1, 2147483647]"),
    ("--num-processes", str(2**31), "--num-processes must be in [1, 2147483647]"),
    ("--coordinator", "localhost:99999", "--coordinator must be HOST:PORT with PORT in [1, 65535]"),
    ("--coordinator", "localhost", "--coordinator must be HOST:PORT"),
])
def test_rejects_degenerate_options(flag, value, match, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args([flag, value])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_the_largest_seed_is_a_key():
    """The top of --seed's range is accepted and makes a key (the bound is not off by one)."""
    args = train.parse_args(["--seed", str(2**32 - 1), "--epochs", str(2**32 - 1)])
    jax.random.fold_in(jax.random.key(args.seed), args.epochs)


@pytest.mark.parametrize("empty", ["train", "test"])
def test_a_set_of_zero_images_is_a_clean_error(tmp_path, empty, rng):
    """Well-formed IDX files holding 0 images end the CLI with the reader's message, not a
    reshape's ValueError."""
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for which, prefix in (("train", "train"), ("test", "t10k")):
        n = 0 if which == empty else 3
        _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)).astype(np.uint8))
        _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)).astype(np.uint8))
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"),
                    "--no-progress"])
    assert str(e.value.code) == f"error: {raw_dir}: the {empty} set holds 0 images"


def test_unwritable_out_fails_before_loading_data(tmp_path, monkeypatch):
    """--out is checked first: a run must not train for an hour and then lose its results."""
    def no_loading(*args, **kwargs):
        raise AssertionError("data loaded before --out was checked")

    monkeypatch.setattr(train.data_lib, "load", no_loading)
    (tmp_path / "a-file").write_text("")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "run"):  # root ignores permission bits: use a file
        with pytest.raises(SystemExit) as e:
            train.main(["--dataset", "sample", "--out", str(out), "--no-progress"])
        assert str(out) in str(e.value.code) and "not a writable directory" in str(e.value.code)


def test_corrupt_gz_in_data_dir_is_a_clean_error(tmp_path):
    """A damaged .gz (zlib.error inside gzip) ends the CLI with the IDX reader's message, no traceback."""
    import gzip

    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    blob = bytearray(gzip.compress(bytes(range(256)) * 64))
    blob[20:40] = b"\xff" * 20
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw_dir / f"{stem}.gz").write_bytes(bytes(blob))
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"),
                    "--no-progress"])
    assert "cannot read IDX file" in str(e.value.code) and "train-images-idx3-ubyte.gz" in str(e.value.code)


@pytest.mark.parametrize("impl", ["jnp", "xla", "pallas"])
def test_fused_linear_cross_entropy_head_follows_todays_curve(impl):
    """The MLP's last layer + loss replaced by ops.linear_softmax_cross_entropy_with_integer_labels
    (reduction="mean") follows the trainer's step losses (dense -> cross-entropy, impl="jnp")
    step for step: same init, same batches, plain SGD."""
    from fusedvjp import ops
    from fusedvjp.model import data

    ds = data.load_sample()
    steps, hidden, batch, lr = 20, 64, 128, 0.01
    args = train.parse_args(["--impl", "jnp", "--epochs", "1", "--max-steps", str(steps), "--hidden", str(hidden),
                             "--batch-size", str(batch), "--lr", str(lr), "--no-progress"])
    want = train.train(args, ds, log=lambda *_: None)["epochs"][0]["step_losses"]

    def loss_fn(params, x, y):
        h = ops.dense_tanh(x, params["w1"], params["b1"], impl=impl)
        return ops.linear_softmax_cross_entropy_with_integer_labels(h, params["w2"], y, b=params["b2"],
                                                                   reduction="mean", impl=impl)

    @jax.jit
    def step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss

    # As train._train: the init and shuffle keys split from --seed 0, epoch 1's permutation.
    init_key, shuffle_key = jax.random.split(jax.random.key(args.seed))
    params = mlp.init_params(init_key, (ds.train_images.shape[1], hidden, 10))
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, 1), len(ds.train_images)))
    got = []
    for i in range(steps):
        idx = perm[i * batch:(i + 1) * batch]
        params, loss = step(params, jnp.asarray(ds.train_images[idx]), jnp.asarray(ds.train_labels[idx]))
        got.append(float(loss))
    assert got[-1] < got[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --- --out: one run's set, never two runs' -----------------------------------------------

_OLD = {"metrics.json": b'{"run": "old"}', "curves.png": b"old curves", "predictions.png": b"old predictions"}
_SMOKE = ["--dataset", "sample", "--epochs", "1", "--max-steps", "2", "--hidden", "16", "--impl", "jnp",
          "--no-progress"]


class _Interrupt(BaseException):
    """A stand-in for KeyboardInterrupt (which pytest would take as the user's)."""


def _previous_run(out):
    """``out`` holding an earlier run's set and a file the trainer did not write."""
    out.mkdir(exist_ok=True)
    for name, content in _OLD.items():
        (out / name).write_bytes(content)
    (out / "notes.txt").write_text("mine")


def _tiny_plots(monkeypatch):
    """Stand-ins for the two plots (matplotlib takes seconds), each writing a marker."""
    monkeypatch.setattr(train, "plot_curves", lambda history, path: path.write_bytes(b"new curves"))
    monkeypatch.setattr(train, "plot_predictions",
                        lambda params, dataset, impl, path: path.write_bytes(b"new predictions"))


def test_a_run_interrupted_while_writing_leaves_the_previous_set(tmp_path, monkeypatch, capsys):
    """An interrupt after metrics.json and curves.png are written, before predictions.png:
    --out still holds the previous run's three files (not two new and one old), the
    other files, and no staging folder. Then a whole run replaces the three together."""
    out = tmp_path / "out"
    _previous_run(out)
    _tiny_plots(monkeypatch)
    tiny_predictions = train.plot_predictions

    def interrupted(*args):
        assert {p.name for p in out.glob(".staging-*/*")} == {"curves.png", "metrics.json"}
        raise _Interrupt

    monkeypatch.setattr(train, "plot_predictions", interrupted)
    with pytest.raises(_Interrupt):
        train.main(_SMOKE + ["--out", str(out)])
    assert {name: (out / name).read_bytes() for name in _OLD} == _OLD
    assert {p.name for p in out.iterdir()} == {".train.lock", *_OLD, "notes.txt"}

    monkeypatch.setattr(train, "plot_predictions", tiny_predictions)
    metrics = train.main(_SMOKE + ["--out", str(out)])
    assert json.loads((out / "metrics.json").read_text())["epochs"] == metrics["epochs"]
    assert (out / "curves.png").read_bytes() == b"new curves"
    assert (out / "predictions.png").read_bytes() == b"new predictions"
    assert (out / "notes.txt").read_text() == "mine"
    assert {p.name for p in out.iterdir()} == {".train.lock", *_OLD, "notes.txt"}
    assert f"wrote {out / 'metrics.json'}, {out / 'curves.png'}, {out / 'predictions.png'}" in capsys.readouterr().out


def test_a_run_interrupted_while_renaming_leaves_none_of_the_previous_set(tmp_path, monkeypatch):
    """An interrupt after the first of the three renames: what --out holds is this run's
    (metrics.json), none of the previous run's; a killed run's staging folder goes on the
    next write."""
    out = tmp_path / "out"
    _previous_run(out)
    _tiny_plots(monkeypatch)
    renames = []

    def replace_then_interrupt(src, dst):
        if renames:
            raise _Interrupt
        renames.append(dst)
        os.rename(src, dst)

    with monkeypatch.context() as m, train.hold_out(out), pytest.raises(_Interrupt):
        m.setattr(os, "replace", replace_then_interrupt)
        train.write_outputs(out, {"epochs": [], "run": "new"}, None, None, "jnp")
    assert renames == [out / "metrics.json"]
    assert json.loads((out / "metrics.json").read_text())["run"] == "new"
    assert {p.name for p in out.iterdir()} == {".train.lock", "metrics.json", "notes.txt"}

    (out / ".staging-killed").mkdir()  # a SIGKILLed run's leftovers
    (out / ".staging-killed" / "curves.png").write_bytes(b"killed")
    with train.hold_out(out):
        train.write_outputs(out, {"epochs": [], "run": "newer"}, None, None, "jnp")
    assert json.loads((out / "metrics.json").read_text())["run"] == "newer"
    assert (out / "curves.png").read_bytes() == b"new curves"
    assert {p.name for p in out.iterdir()} == {".train.lock", *_OLD, "notes.txt"}


def test_a_second_run_on_a_held_out_is_refused(tmp_path, monkeypatch):
    """Another process holds --out: a run on it stops before loading the data, naming that
    process; once the holder ends (a killed run included), --out is free again."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys; from fusedvjp.model import train; "
         "lock = train.hold_out(pathlib.Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()", str(out)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"

        def no_loading(*args, **kwargs):
            raise AssertionError("data loaded on an --out another run holds")

        monkeypatch.setattr(train.data_lib, "load", no_loading)
        with pytest.raises(SystemExit) as e:
            train.main(_SMOKE + ["--out", str(out)])
        assert str(e.value.code) == (f"error: --out {out} is held by another run (pid {holder.pid}): "
                                     "wait for it to end, or pick another --out")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with train.hold_out(out) as lock:
        lock.seek(0)
        assert lock.read() == f"{os.getpid()}\n"


def test_concurrent_runs_on_one_out_never_mix(tmp_path, monkeypatch):
    """Two threads run main on the same --out at once, each writing its set: one of them is
    refused, and --out holds the other's whole set."""
    import threading

    _tiny_plots(monkeypatch)
    out = tmp_path / "out"
    one_refused = threading.Event()
    real_train = train.train

    def train_once_the_other_is_refused(args, dataset, log):
        one_refused.wait(timeout=30)  # both are running: neither has written yet
        return real_train(args, dataset, log)

    monkeypatch.setattr(train, "train", train_once_the_other_is_refused)
    results = {}

    def run(seed):
        try:
            results[seed] = train.main(_SMOKE + ["--seed", str(seed), "--out", str(out)])
        except SystemExit as e:
            results[seed] = e
            one_refused.set()

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    refused = [seed for seed, r in results.items() if isinstance(r, SystemExit)]
    assert len(results) == 2 and len(refused) == 1, results
    assert "is held by another run" in str(results[refused[0]].code)
    winner = 3 - refused[0]
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == winner
    assert (out / "predictions.png").read_bytes() == b"new predictions"
