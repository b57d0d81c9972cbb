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
