"""The IDX reader on the real MNIST files and on corrupt ones; the shipped sample."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import socket
import threading
import zlib

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


def test_corrupt_gzip_stream_is_a_dataset_error(tmp_path, rng):
    """A valid gzip header over a damaged deflate stream raises zlib.error inside gzip."""
    arr = (rng.integers(0, 4, (5, 28, 28)) * 60).astype(np.uint8)  # compressible: Huffman-coded blocks
    _write_idx(tmp_path / "a", arr)
    blob = bytearray(gzip.compress((tmp_path / "a").read_bytes()))
    blob[20:40] = b"\xff" * 20
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(blob))
    (tmp_path / "damaged.gz").write_bytes(bytes(blob))
    (tmp_path / "cut.gz").write_bytes(gzip.compress((tmp_path / "a").read_bytes())[:-30])
    for name in ("damaged.gz", "cut.gz"):
        with pytest.raises(data.DatasetError, match="cannot read IDX file") as e:
            data.read_idx(tmp_path / name)
        assert name in str(e.value)


def test_huge_header_dims_report_the_true_implied_size(tmp_path):
    """Dims near 2**31 must not wrap around in the size check (int64 wraps 2**31 * 2**31 * 4 to 0)."""
    dims = (2**31, 2**31, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in dims)
    (tmp_path / "huge").write_bytes(header + b"\0" * 64)
    with pytest.raises(data.DatasetError, match="truncated or corrupt") as e:
        data.read_idx(tmp_path / "huge")
    assert f"implies {16 + 2**64} bytes" in str(e.value)


# --- download (a local http.server; the tests never touch the network) -----------------------


def _closed_port_url() -> str:
    """A URL on 127.0.0.1 that refuses connections: a port bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """No test reaches the real mirrors: a download not given local ones fails at once."""
    monkeypatch.setattr(data, "MIRRORS", (_closed_port_url(),))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """Serves ``tmp_path/www`` on 127.0.0.1; yields (www dir, base URL of www/mnist/)."""
    www = tmp_path / "www"
    (www / "mnist").mkdir(parents=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}/mnist/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _serve_real_mnist(www):
    for stem in data.FILES.values():
        shutil.copyfile(RAW / f"{stem}.gz", www / "mnist" / f"{stem}.gz")


def _files_in(raw_dir):
    return sorted(p.name for p in raw_dir.iterdir()) if raw_dir.exists() else []


def test_checksum_tables_describe_the_real_files():
    """The IDX digests are the real MNIST content's (the .gz MD5s, the mirrors' bytes, cannot be checked here)."""
    assert set(data.GZ_MD5) == set(data.IDX_SHA256) == set(data.FILES.values())
    if (RAW / "t10k-labels-idx1-ubyte.gz").exists():
        for stem, (size, digest) in data.IDX_SHA256.items():
            content = gzip.decompress((RAW / f"{stem}.gz").read_bytes())
            assert (len(content), hashlib.sha256(content).hexdigest()) == (size, digest), stem


@needs_mnist
def test_download_from_a_local_mirror(tmp_path, mirror):
    www, url = mirror
    _serve_real_mnist(www)
    raw_dir = tmp_path / "data" / "MNIST" / "raw"
    data.download_mnist(tmp_path / "data", mirrors=[url], progress=False)
    assert _files_in(raw_dir) == sorted(f"{stem}.gz" for stem in data.FILES.values())
    for stem in data.FILES.values():
        assert (raw_dir / f"{stem}.gz").read_bytes() == (RAW / f"{stem}.gz").read_bytes()
    ds = data.load("mnist", tmp_path / "data", mirrors=[_closed_port_url()])  # present: nothing is fetched
    assert ds.train_images.shape == (60000, 784) and ds.test_labels[0] == 7


@needs_mnist
def test_load_mnist_downloads_what_is_missing(tmp_path, mirror):
    www, url = mirror
    _serve_real_mnist(www)
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    shutil.copyfile(RAW / "train-images-idx3-ubyte", raw_dir / "train-images-idx3-ubyte")
    logs = []
    ds = data.load("mnist", tmp_path, logs.append, mirrors=[url], progress=False)
    assert ds.test_images.shape == (10000, 784)
    assert "train-images-idx3-ubyte.gz" not in _files_in(raw_dir)
    assert sum("downloaded" in m for m in logs) == 3


def test_checksum_mismatch_leaves_nothing_behind(tmp_path, mirror):
    www, url = mirror
    for stem in data.FILES.values():
        (www / "mnist" / f"{stem}.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + b"\0\0\0\x02" + b"ab"))
    with pytest.raises(data.DatasetError, match="checksum") as e:
        data.download_mnist(tmp_path, mirrors=[url], progress=False)
    assert url in str(e.value)
    assert _files_in(tmp_path / "MNIST" / "raw") == []


def test_fabricated_files_with_a_patched_table(tmp_path, mirror, monkeypatch, rng):
    """The .gz digest path: small fabricated files whose MD5 the table is patched to hold."""
    www, url = mirror
    gz_md5 = {}
    for stem in data.FILES.values():
        shape = (3, 28, 28) if "images" in stem else (3,)
        arr = rng.integers(0, 10, shape).astype(np.uint8)
        _write_idx(tmp_path / stem, arr)
        blob = gzip.compress((tmp_path / stem).read_bytes())
        (www / "mnist" / f"{stem}.gz").write_bytes(blob)
        gz_md5[stem] = hashlib.md5(blob).hexdigest()
    monkeypatch.setattr(data, "GZ_MD5", gz_md5)
    monkeypatch.setattr(data, "IDX_SHA256", {stem: (10**6, "0" * 64) for stem in data.FILES.values()})
    data.download_mnist(tmp_path / "d", mirrors=[url], progress=False)
    ds = data.load_mnist(tmp_path / "d")
    assert ds.train_images.shape == (3, 784) and ds.test_labels.shape == (3,)


@needs_mnist
def test_first_mirror_failing_second_succeeding(tmp_path, mirror):
    www, url = mirror
    _serve_real_mnist(www)
    missing = url.replace("/mnist/", "/nothing-here/")  # the same server answers 404
    logs = []
    data.download_mnist(tmp_path, mirrors=[_closed_port_url(), missing, url], log=logs.append, progress=False)
    assert data.mnist_files_present(tmp_path)
    assert any("404" in m for m in logs) and any("refused" in m.lower() for m in logs)
    assert not [n for n in _files_in(tmp_path / "MNIST" / "raw") if not n.endswith("-ubyte.gz")]


def test_offline_auto_falls_back_and_mnist_says_why(tmp_path):
    mirrors = [_closed_port_url(), _closed_port_url()]
    logs = []
    ds = data.load("auto", tmp_path, logs.append, mirrors=mirrors, progress=False)
    assert ds.name.startswith("sample")
    assert any("using the shipped sample" in m and mirrors[0] in m for m in logs)
    with pytest.raises(data.DatasetError, match="cannot download MNIST") as e:
        data.load("mnist", tmp_path, mirrors=mirrors, progress=False)
    assert all(m in str(e.value) for m in mirrors) and "--dataset sample" in str(e.value)
    assert _files_in(tmp_path / "MNIST" / "raw") == []


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
