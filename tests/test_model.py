"""The MNIST MLP: initialization, training on the shipped sample, and impl agreement."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedvjp.model import mlp, train


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
])
def test_rejects_degenerate_options(flag, value, match, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args([flag, value])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


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
