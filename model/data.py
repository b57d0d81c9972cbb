"""MNIST from IDX files (torchvision's layout), its download, and the small real-MNIST sample we ship.

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, available under the
Creative Commons Attribution-Share Alike 3.0 license. ``assets/mnist_sample.npz`` is a
stratified subset of it (see :func:`build_sample`), redistributed under the same license.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import math
import os
import pathlib
import sys
import tempfile
import urllib.error
import urllib.request
import zlib

import numpy as np
from tqdm import tqdm

SAMPLE_PATH = pathlib.Path(__file__).resolve().parent / "assets" / "mnist_sample.npz"
MEAN, STD = 0.1307, 0.3081  # the seed's (and torchvision's) MNIST normalization
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Tried in order: the S3 mirror torchvision downloads from, then the Google Cloud one
# TensorFlow's MNIST reader used; both serve LeCun's original .gz files.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# MD5 of the original .gz files as the mirrors serve them (the values torchvision
# publishes; 9912422, 28881, 1648877 and 4542 bytes). The copies in this project's
# shared/data are not these bytes: they were re-compressed (gzip mtime 0, no name field,
# 9719438 bytes for the train images), so their digests could not serve here.
GZ_MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
# The decompressed IDX files: (bytes, SHA-256), computed from shared/data, whose content
# has the published MD5s of uncompressed MNIST (6bbc9ace..., a25bea73..., 2646ac64...,
# 27ae3e4e...). A download whose .gz digest differs is still accepted when its content
# matches, so a mirror that re-compresses the files serves as well.
IDX_SHA256 = {
    "train-images-idx3-ubyte": (47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": (60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": (7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": (10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
# Seconds for the connection and for each read; a stalled mirror fails and the next is tried.
# (Name resolution is the system resolver's and has its own timeout.)
TIMEOUT_S = 30.0
_CHUNK = 1 << 16
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DatasetError(RuntimeError):
    """MNIST files are missing, truncated or malformed."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Normalized images ``[n, 784]`` float32 and int32 labels, train and test."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """Reads an IDX file (plain or ``.gz``): magic ``0 0 dtype ndim``, big-endian dims, data."""
    path = pathlib.Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"IDX file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file: bad magic {raw[:4].hex() or '(empty)'}")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated: header needs {header} bytes, file has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: dims up to 2**32 cannot wrap
    if len(raw) != expected:
        raise DatasetError(f"{path} has {len(raw)} bytes but its header {shape} implies {expected} bytes: "
                           "truncated or corrupt")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(raw_dir: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, stem + ".gz"):
        if (raw_dir / name).exists():
            return raw_dir / name
    return None


def mnist_files_present(data_dir: str | pathlib.Path) -> bool:
    raw_dir = pathlib.Path(data_dir) / "MNIST" / "raw"
    return all(_find(raw_dir, stem) is not None for stem in FILES.values())


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 28, 28] -> float32 [n, 784]: ``(x / 255 - 0.1307) / 0.3081`` as the seed."""
    x = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
    return (x - MEAN) / STD


def _check_pair(images: np.ndarray, labels: np.ndarray, what: str, path: pathlib.Path) -> None:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(f"{path}: {what} images must be [n, 28, 28], got {images.shape}")
    if images.shape[0] == 0:  # well-formed IDX, but nothing to train on or to score
        raise DatasetError(f"{path}: the {what} set holds 0 images")
    if labels.shape != (images.shape[0],):
        raise DatasetError(f"{path}: {what} labels {labels.shape} do not match images {images.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: {what} labels outside 0..9")


def load_mnist(data_dir: str | pathlib.Path) -> Dataset:
    """Loads ``DIR/MNIST/raw/*-ubyte[.gz]`` (torchvision's layout)."""
    raw_dir = pathlib.Path(data_dir) / "MNIST" / "raw"
    arrays = {}
    for key, stem in FILES.items():
        path = _find(raw_dir, stem)
        if path is None:
            raise DatasetError(f"MNIST file not found: {raw_dir / stem} (or .gz)")
        arrays[key] = read_idx(path)
    _check_pair(arrays["train_images"], arrays["train_labels"], "train", raw_dir)
    _check_pair(arrays["test_images"], arrays["test_labels"], "test", raw_dir)
    return Dataset(
        name=f"mnist ({raw_dir})",
        train_images=normalize(arrays["train_images"]),
        train_labels=arrays["train_labels"].astype(np.int32),
        test_images=normalize(arrays["test_images"]),
        test_labels=arrays["test_labels"].astype(np.int32),
    )


def load_sample() -> Dataset:
    """The shipped stratified real-MNIST sample (10k train / 2k test)."""
    with np.load(SAMPLE_PATH) as z:
        return Dataset(
            name="sample (shipped 10k/2k real-MNIST subset)",
            train_images=normalize(z["train_images"]),
            train_labels=z["train_labels"].astype(np.int32),
            test_images=normalize(z["test_images"]),
            test_labels=z["test_labels"].astype(np.int32),
        )


def _verify(path: pathlib.Path, stem: str) -> str | None:
    """None if the downloaded ``path`` is the real ``stem.gz``, else what is wrong with it.

    The published .gz digest first; failing that, the decompressed content (read no further
    than its known size, so a hostile file cannot inflate without bound).
    """
    gz_md5 = GZ_MD5[stem]
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() == gz_md5:
        return None
    size, sha256 = IDX_SHA256[stem]
    try:
        with gzip.open(path, "rb") as f:
            content = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as e:
        return f"checksum mismatch (MD5 {digest.hexdigest()}, expected {gz_md5}; not a readable gzip: {e})"
    if len(content) == size and hashlib.sha256(content).hexdigest() == sha256:
        return None
    return (f"checksum mismatch (MD5 {digest.hexdigest()}, expected {gz_md5}; the decompressed content "
            "is not MNIST's either)")


def _fetch(url: str, dest: pathlib.Path, stem: str, progress: bool) -> str | None:
    """Downloads ``url`` to ``dest`` atomically (temp file in the same folder, fsync, rename).

    Returns None on success, else the reason (network error, HTTP status, checksum); on
    failure nothing is left in ``dest``'s folder. Raises DatasetError if the folder
    cannot be written.
    """
    # A .gz never exceeds its content by more than the headers and 5 bytes per 64 KiB
    # stored block: a larger body is not the file, and reading stops there.
    limit = IDX_SHA256[stem][0] + (1 << 20)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:  # our side, not the mirror's: no point in trying the next one
        raise DatasetError(f"cannot download MNIST into {dest.parent}: cannot write there ({e})") from None
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                total = response.headers.get("Content-Length")
                with tqdm(total=int(total) if total and total.isdigit() else None, unit="B", unit_scale=True,
                          desc=dest.name, leave=False, disable=not progress, file=sys.stderr) as bar:
                    received = 0
                    while chunk := response.read(_CHUNK):
                        received += len(chunk)
                        if received > limit:
                            return f"more than {limit} bytes: not the MNIST file"
                        out.write(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        problem = _verify(tmp, stem)
        if problem is not None:
            return problem
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        return f"unreachable ({e.reason})"
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, truncated bodies
        return f"{type(e).__name__}: {e}"
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: pathlib.Path) -> None:
    """Makes a rename in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def download_mnist(data_dir: str | pathlib.Path, mirrors=None, log=print, progress: bool = True) -> None:
    """Downloads the missing MNIST files into ``DIR/MNIST/raw`` (torchvision's layout) with urllib.

    Each ``<name>.gz`` is fetched from the first mirror that serves it intact: bounded
    timeouts, a size cap, the checksum of :data:`GZ_MD5` (or of the content,
    :data:`IDX_SHA256`), then an atomic rename. Files already there are kept.

    Args:
      data_dir: the ``--data-dir``.
      mirrors: base URLs ending in ``/``, tried in order (default :data:`MIRRORS`).
      log: progress messages.
      progress: show a tqdm bar per file (on stderr).

    Raises:
      DatasetError: a file came intact from no mirror (offline, HTTP errors, checksums),
        or the folder cannot be created; the message lists each mirror's reason.
    """
    mirrors = MIRRORS if mirrors is None else tuple(mirrors)
    raw_dir = pathlib.Path(data_dir) / "MNIST" / "raw"
    missing = [stem for stem in FILES.values() if _find(raw_dir, stem) is None]
    if not missing:
        return
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot download MNIST into {raw_dir}: cannot create it ({e})") from None
    for stem in missing:
        name = stem + ".gz"
        reasons = []
        for i, mirror in enumerate(mirrors):
            problem = _fetch(mirror + name, raw_dir / name, stem, progress)
            if problem is None:
                log(f"downloaded {name} from {mirror} (checksum verified)")
                break
            reasons.append(f"{mirror + name}: {problem}")
            if i + 1 < len(mirrors):
                log(f"{mirror + name}: {problem}; trying {mirrors[i + 1]}")
        else:  # the first file that no mirror serves ends the attempt: offline costs one round, not four
            raise DatasetError(
                f"cannot download MNIST into {raw_dir}: {name} came intact from no mirror ({'; '.join(reasons)}). "
                "Put the four IDX files (train-images-idx3-ubyte etc., plain or .gz) there, "
                "or use --dataset sample")


def load(dataset: str, data_dir: str | pathlib.Path, log=print, *, mirrors=None, progress: bool = True) -> Dataset:
    """Loads a dataset by its ``--dataset`` name.

    ``"mnist"``: full MNIST from ``DIR/MNIST/raw``, downloaded first if missing (an error
    if that fails); ``"sample"``: the shipped subset; ``"auto"``: full MNIST if present or
    downloadable, else the sample, saying why.

    Raises:
      DatasetError: ``"mnist"`` could not be downloaded, or files present are corrupt.
      ValueError: an unknown name.
    """
    if dataset == "sample":
        return load_sample()
    if dataset not in ("mnist", "auto"):
        raise ValueError(f"unknown dataset {dataset!r}; expected 'auto', 'mnist' or 'sample'")
    if not mnist_files_present(data_dir):
        try:
            download_mnist(data_dir, mirrors, log=log, progress=progress)
        except DatasetError as e:
            if dataset == "mnist":
                raise
            log(f"using the shipped sample: full MNIST unavailable: {e}")
            return load_sample()
    return load_mnist(data_dir)


def build_sample(data_dir: str | pathlib.Path, out: str | pathlib.Path = SAMPLE_PATH,
                 n_train: int = 10_000, n_test: int = 2_000, seed: int = 0) -> None:
    """Writes the stratified sample: ``n/10`` random digits of each class, raw uint8."""
    raw_dir = pathlib.Path(data_dir) / "MNIST" / "raw"
    rng = np.random.default_rng(seed)

    def pick(images, labels, n):
        idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), n // 10, replace=False) for c in range(10)])
        idx = rng.permutation(idx)
        return images[idx], labels[idx]

    tr_x, tr_y = pick(read_idx(_find(raw_dir, FILES["train_images"])),
                      read_idx(_find(raw_dir, FILES["train_labels"])), n_train)
    te_x, te_y = pick(read_idx(_find(raw_dir, FILES["test_images"])),
                      read_idx(_find(raw_dir, FILES["test_labels"])), n_test)
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, train_images=tr_x, train_labels=tr_y, test_images=te_x, test_labels=te_y)


if __name__ == "__main__":  # python -m fusedvjp.model.data DATA_DIR  (rebuilds the shipped sample)
    build_sample(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
    print(f"wrote {SAMPLE_PATH} ({SAMPLE_PATH.stat().st_size / 1e6:.2f} MB)")
