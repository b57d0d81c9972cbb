"""The IDX reader on the real MNIST files and on corrupt ones; the shipped sample."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from conftest import MNIST_DIR
from fusedvjp.model import data

RAW = MNIST_DIR / "MNIST" / "raw"
needs_mnist = pytest.mark.skipif(not (RAW / "t10k-labels-idx1-ubyte").exists(), reason=f"no MNIST in {RAW}")


@needs_mnist
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_reads_real_test_set(suffix):
    images = data.read_idx(RAW / f"t10k-images-idx3-ubyte{suffix}")
    labels = data.read_idx(RAW / f"t10k-labels-idx1-ubyte{suffix}")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    # The first test digit of MNIST is a 7.
    assert labels[0] == 7


@needs_mnist
def test_load_mnist_normalizes_like_the_seed():
    ds = data.load_mnist(MNIST_DIR)
    assert ds.train_images.shape == (60000, 784) and ds.test_images.shape == (10000, 784)
    raw = data.read_idx(RAW / "t10k-images-idx3-ubyte")[0].reshape(-1)
    np.testing.assert_allclose(ds.test_images[0], (raw / 255.0 - 0.1307) / 0.3081, rtol=1e-6)


def _write_idx(path, arr, magic_dtype=0x08):
    header = bytes([0, 0, magic_dtype, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.tobytes())


def test_round_trip_and_gzip(tmp_path, rng):
    arr = rng.integers(0, 255, (5, 28, 28)).astype(np.uint8)
    _write_idx(tmp_path / "a", arr)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), arr)
    (tmp_path / "a.gz").write_bytes(gzip.compress((tmp_path / "a").read_bytes()))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), arr)


def test_corrupt_files_name_the_file(tmp_path, rng):
    arr = rng.integers(0, 255, (5, 28, 28)).astype(np.uint8)
    _write_idx(tmp_path / "good", arr)
    raw = (tmp_path / "good").read_bytes()
    (tmp_path / "truncated").write_bytes(raw[:-10])
    (tmp_path / "magic").write_bytes(b"\x12\x34" + raw[2:])
    (tmp_path / "short").write_bytes(raw[:6])
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    for name, match in [("truncated", "truncated or corrupt"), ("magic", "bad magic 1234"),
                        ("short", "header needs"), ("bad.gz", "cannot read"), ("missing", "not found")]:
        with pytest.raises(data.DatasetError, match=match) as e:
            data.read_idx(tmp_path / name)
        assert name in str(e.value)


def test_missing_dataset_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)
    with pytest.raises(data.DatasetError, match=r"pip install 'fusedvjp\[mnist\]'"):
        data.load("mnist", tmp_path)
    assert data.load("auto", tmp_path).name.startswith("sample")


def test_shipped_sample_is_stratified_real_mnist():
    assert data.SAMPLE_PATH.stat().st_size < 3e6
    ds = data.load_sample()
    assert ds.train_images.shape == (10000, 784) and ds.test_images.shape == (2000, 784)
    assert np.all(np.bincount(ds.train_labels) == 1000) and np.all(np.bincount(ds.test_labels) == 200)


@needs_mnist
def test_sample_digits_are_real_mnist_digits():
    with np.load(data.SAMPLE_PATH) as z:
        sample = z["test_images"][:20]
    full = data.read_idx(RAW / "t10k-images-idx3-ubyte")
    digests = {hashlib.sha1(im.tobytes()).hexdigest() for im in full}
    assert all(hashlib.sha1(im.tobytes()).hexdigest() in digests for im in sample)
