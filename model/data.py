"""MNIST from IDX files (torchvision's layout), and the small real-MNIST sample we ship.

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, available under the
Creative Commons Attribution-Share Alike 3.0 license. ``assets/mnist_sample.npz`` is a
stratified subset of it (see :func:`build_sample`), redistributed under the same license.
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib

import numpy as np

SAMPLE_PATH = pathlib.Path(__file__).resolve().parent / "assets" / "mnist_sample.npz"
MEAN, STD = 0.1307, 0.3081  # the seed's (and torchvision's) MNIST normalization
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
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
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file: bad magic {raw[:4].hex() or '(empty)'}")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated: header needs {header} bytes, file has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(f"{path} has {len(raw)} bytes but its header {shape} implies {expected}: "
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


def download_mnist(data_dir: str | pathlib.Path) -> None:
    """Downloads MNIST with torchvision (the ``mnist`` extra) into ``DIR/MNIST/raw``."""
    try:
        import torchvision
    except ImportError:
        raise DatasetError(
            f"MNIST is not in {pathlib.Path(data_dir) / 'MNIST' / 'raw'} and torchvision is not installed: "
            "install the extra (pip install 'fusedvjp[mnist]') to download it, put the four IDX files "
            "(train-images-idx3-ubyte etc., plain or .gz) there, or use --dataset sample"
        ) from None
    for train in (True, False):
        torchvision.datasets.MNIST(root=str(data_dir), train=train, download=True)


def load(dataset: str, data_dir: str | pathlib.Path, log=print) -> Dataset:
    """``"mnist"``: full MNIST (downloaded if missing and possible); ``"sample"``: the
    shipped subset; ``"auto"``: full MNIST if present or downloadable, else the sample."""
    if dataset == "sample":
        return load_sample()
    if dataset == "mnist":
        if not mnist_files_present(data_dir):
            download_mnist(data_dir)
        return load_mnist(data_dir)
    if dataset == "auto":
        if mnist_files_present(data_dir):
            return load_mnist(data_dir)
        try:
            download_mnist(data_dir)
        except Exception as e:  # no torchvision, no network: the shipped sample is the answer
            log(f"full MNIST unavailable ({type(e).__name__}: {e}); using the shipped sample")
            return load_sample()
        return load_mnist(data_dir)
    raise ValueError(f"unknown dataset {dataset!r}; expected 'auto', 'mnist' or 'sample'")


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
    import sys

    build_sample(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
    print(f"wrote {SAMPLE_PATH} ({SAMPLE_PATH.stat().st_size / 1e6:.2f} MB)")
