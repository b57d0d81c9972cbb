"""The LM example (``python -m fusedvjp.model.lm``): impls step for step, the corpus, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tol
from fusedvjp.model import lm, lm_data

TINY = ["--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "16", "--batch-size", "4",
        "--warmup", "5", "--eval-batches", "1", "--no-progress"]


@pytest.fixture(scope="module")
def small_corpus_dir(tmp_path_factory):
    """40 files of real Python source (pieces of the standard library) under names whose
    hash puts some on each side of the split."""
    root = tmp_path_factory.mktemp("corpus")
    sources = [_stdlib_bytes(m) for m in ("json/__init__.py", "textwrap.py", "bisect.py", "colorsys.py")]
    for i in range(40):
        text = sources[i % len(sources)]
        (root / f"m{i}.py").write_bytes(text[(i * 997) % len(text):][:3000])
    (root / "notes.rst").write_bytes(b"A title\n=======\n\nSome *text*.\n")
    (root / "ignored.json").write_bytes(b"{}")
    return root


def _stdlib_bytes(rel: str) -> bytes:
    return (lm_data.stdlib_root() / rel).read_bytes()


def _run(impl, steps, corpus, extra=()):
    args = lm.parse_args(TINY + ["--impl", impl, "--steps", str(steps), "--eval-every", str(steps), *extra])
    return lm.train(args, corpus, log=lambda *_: None)


def test_corpus_split_is_by_file_and_deterministic(small_corpus_dir):
    corpus = lm_data.load(small_corpus_dir)
    files = lm_data.corpus_files(small_corpus_dir)
    assert [f.name for f in files if f.suffix not in (".py", ".rst")] == []  # ignored.json left out
    val = [f for f in files if lm_data.is_validation(f)]
    assert 1 <= corpus.validation_files == len(val) < corpus.train_files == len(files) - len(val)
    # Each file's bytes followed by the separator, in sorted order, on its own side.
    expected_val = b"".join((small_corpus_dir / f).read_bytes() + b"\0" for f in val)
    assert corpus.validation.tobytes() == expected_val
    assert lm_data.load(small_corpus_dir).train.tobytes() == corpus.train.tobytes()
    x, y = lm_data.windows(corpus.train, np.array([0, 5]), 7)
    np.testing.assert_array_equal(x[1], corpus.train[5:12])
    np.testing.assert_array_equal(y[1], corpus.train[6:13])


def test_stdlib_corpus_excludes_site_packages():
    root = lm_data.stdlib_root()
    files = lm_data.corpus_files(root)
    assert len(files) > 100 and any(f.as_posix() == "json/__init__.py" for f in files)
    assert not any(part in lm_data.EXCLUDED_DIRS for f in files for part in f.parts)


def _assert_same_run(a, b, rtol):
    """Same per-step losses and validation loss (rtol) and same trained parameters.

    The losses alone are a weak check: adamw's update is invariant to a gradient's scale
    and the loss moves only to second order in a parameter error. The parameters are
    compared too, each leaf within rtol of its largest entry."""
    np.testing.assert_allclose(a["step_losses"], b["step_losses"], rtol=rtol)
    np.testing.assert_allclose(a["evals"][-1]["val_loss"], b["evals"][-1]["val_loss"], rtol=rtol)
    flat_a = dict(lm.nnx.to_flat_state(lm.nnx.state(a["model"])))
    flat_b = dict(lm.nnx.to_flat_state(lm.nnx.state(b["model"])))
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        pa, pb = np.asarray(flat_a[name][...]), np.asarray(flat_b[name][...])
        np.testing.assert_allclose(pa, pb, rtol=rtol, atol=rtol * np.max(np.abs(pb)), err_msg=str(name))


def test_jnp_and_xla_follow_each_other_step_for_step(small_corpus_dir):
    """20 adamw steps, f32: the hand-written VJPs (jnp) and XLA's autodiff (xla) give the
    same per-step losses, validation loss and parameters."""
    corpus = lm_data.load(small_corpus_dir)
    runs = {impl: _run(impl, 20, corpus, ["--activation", "tanh"]) for impl in ("jnp", "xla")}
    assert len(runs["jnp"]["step_losses"]) == 20
    _assert_same_run(runs["jnp"], runs["xla"], rtol=1e-5)
    assert runs["jnp"]["step_losses"][-1] < runs["jnp"]["step_losses"][0] - 0.5  # it learns


def test_jnp_and_xla_follow_each_other_with_gelu(small_corpus_dir):
    corpus = lm_data.load(small_corpus_dir)
    runs = {impl: _run(impl, 20, corpus, ["--activation", "gelu", "--untied"]) for impl in ("jnp", "xla")}
    _assert_same_run(runs["jnp"], runs["xla"], rtol=1e-5)


def test_pallas_follows_jnp(small_corpus_dir):
    """Three steps with the Pallas kernels (interpret mode) on the same losses as jnp."""
    corpus = lm_data.load(small_corpus_dir)
    runs = {impl: _run(impl, 3, corpus, ["--activation", "tanh", "--untied"]) for impl in ("jnp", "pallas")}
    _assert_same_run(runs["pallas"], runs["jnp"], rtol=1e-5)


def test_bf16_follows_xla(small_corpus_dir):
    """--dtype bf16 (bf16 activations, f32 parameters): 3 steps of jnp within bf16's
    tolerance of xla's losses (both round the same matmuls to bf16, in different places)."""
    corpus = lm_data.load(small_corpus_dir)
    runs = {impl: _run(impl, 3, corpus, ["--activation", "tanh", "--dtype", "bf16"]) for impl in ("jnp", "xla")}
    np.testing.assert_allclose(runs["jnp"]["step_losses"], runs["xla"]["step_losses"], **tol(jnp.bfloat16))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(lm.nnx.state(runs["jnp"]["model"])))


def test_tied_head_has_no_kernel_and_shares_the_embedding(small_corpus_dir):
    tied = lm.GPT(lm.Config(seq_len=8, d_model=16, layers=1, heads=2, activation="tanh", impl="jnp"),
                  rngs=lm.nnx.Rngs(0))
    untied = lm.GPT(lm.Config(seq_len=8, d_model=16, layers=1, heads=2, activation="tanh", tied=False, impl="jnp"),
                    rngs=lm.nnx.Rngs(0))
    assert tied.head.kernel is None and untied.head.kernel[...].shape == (16, lm.VOCAB)
    tokens = jnp.arange(16).reshape(2, 8)
    # The loss is the cross-entropy of the logits the sampler reads.
    logits = lm.nnx.jit(lambda m, t: m.logits(t))(tied, tokens)
    expected = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None] + 1, -1))
    np.testing.assert_allclose(lm.nnx.jit(lambda m, t: m(t, t + 1))(tied, tokens), expected, rtol=1e-5)


def test_memory_table_fused_needs_less_than_xla():
    """At a shape of several vocabulary chunks (256 MiB of f32 logits; jnp's chunk holds
    64 MiB), xla's temporaries hold the logits and the fused loss's are under them and at
    most 1/4 of xla's (the op's own memory test's bound). At a shape one chunk covers, the
    two are alike: the LM's own head is such a shape."""
    rows = lm.memory_table([(2048, 64, 32768, jnp.bfloat16)])
    (row,) = rows
    assert row["fused_impl"] == "jnp" and row["logits_f32_bytes"] == 2048 * 32768 * 4
    assert row["xla_bytes"] >= row["logits_f32_bytes"] > row["fused_bytes"]
    assert row["xla_bytes"] >= 4 * row["fused_bytes"]
    assert "2048 x 64 x 32768" in lm.format_memory_table(rows)


def test_cli_smoke(tmp_path, small_corpus_dir, capsys):
    metrics = lm.main(TINY + ["--steps", "4", "--eval-every", "2", "--activation", "tanh", "--sample-bytes", "12",
                              "--corpus", str(small_corpus_dir), "--no-memory-report", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "bits/byte after 4 steps" in out and "ms/step median" in out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["step"] for e in saved["evals"]] == [2, 4] and len(saved["step_losses"]) == 4
    assert saved["evals"][-1]["val_loss"] == metrics["evals"][-1]["val_loss"]
    np.testing.assert_allclose(saved["evals"][-1]["val_bits_per_byte"] * np.log(2), saved["evals"][-1]["val_loss"])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample = (tmp_path / "sample.txt").read_bytes()
    assert sample.startswith(b"def ") and len(sample) == 4 + 12


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        lm.parse_args(["--d-model", "30", "--heads", "4"])
    with pytest.raises(SystemExit, match="need at least one of each"):
        lm.main(TINY + ["--corpus", str(tmp_path), "--out", str(tmp_path / "o")])


def test_missing_optax_names_the_extra():
    script = textwrap.dedent("""
        import sys
        sys.modules["optax"] = None  # makes `import optax` raise ImportError
        try:
            import fusedvjp.model.lm
        except ImportError as e:
            print("ImportError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert "ImportError: the LM example needs flax and optax" in out.stdout and '".[flax]"' in out.stdout, (
        out.stdout + out.stderr)


@pytest.mark.slow
def test_data_parallel_follows_one_device(tmp_path, small_corpus_dir):
    """The CLI on 2 CPU devices (each batch split 2 rows per device) and on one: the same
    step losses."""
    from one_cpu import on_one_cpu

    flags = TINY + ["--steps", "5", "--eval-every", "5", "--activation", "tanh", "--sample-bytes", "0",
                    "--no-memory-report", "--corpus", str(small_corpus_dir), "--impl", "jnp"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    runs = {}
    for name, extra in (("dp", ["--data-parallel"]), ("one", [])):
        proc = subprocess.run(on_one_cpu([sys.executable, "-m", "fusedvjp.model.lm", *flags, *extra,
                                          "--out", str(tmp_path / name)]),
                              cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["dp"]["devices"] == 2 and runs["one"]["devices"] == 1
    np.testing.assert_allclose(runs["dp"]["step_losses"], runs["one"]["step_losses"], rtol=1e-5)
