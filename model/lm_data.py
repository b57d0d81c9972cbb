"""The LM example's corpus: the running Python's standard library, as bytes.

No download: the ``.py``, ``.rst`` and ``.txt`` files under ``sysconfig``'s ``stdlib`` path
(``site-packages`` and caches left out), read in sorted order, each followed by a NUL byte
(no source file holds one, so it marks the end of a file). Train and validation are split
by file, by a hash of the file's path relative to the stdlib root: the same files land on
the same side on every run and every machine with the same Python.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig
import zlib

import numpy as np

SUFFIXES = (".py", ".rst", ".txt")
EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")
SEPARATOR = 0  # the byte after each file
VALIDATION_PER_MILLE = 100  # a file is validation when crc32(path) % 1000 < this (~10%)


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # [n_train] uint8
    validation: np.ndarray  # [n_val] uint8
    root: str
    train_files: int
    validation_files: int


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: pathlib.Path) -> list[pathlib.Path]:
    """The corpus's files under ``root``, sorted by relative path."""
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.suffix in SUFFIXES and not any(part in EXCLUDED_DIRS for part in rel.parts) and path.is_file():
            files.append(rel)
    return sorted(files, key=lambda p: p.as_posix())


def is_validation(rel: pathlib.Path) -> bool:
    return zlib.crc32(rel.as_posix().encode()) % 1000 < VALIDATION_PER_MILLE


def _join(root: pathlib.Path, files: list[pathlib.Path]) -> np.ndarray:
    parts = []
    for rel in files:
        parts.append((root / rel).read_bytes())
        parts.append(bytes([SEPARATOR]))
    return np.frombuffer(b"".join(parts), np.uint8)


def load(root: str | pathlib.Path | None = None) -> Corpus:
    """The corpus under ``root`` (default: this Python's standard library).

    Raises:
      FileNotFoundError: no corpus file on one side of the split (the message names the root).
    """
    root = stdlib_root() if root is None else pathlib.Path(root)
    files = corpus_files(root)
    val_files = [f for f in files if is_validation(f)]
    train_files = [f for f in files if not is_validation(f)]
    if not train_files or not val_files:
        raise FileNotFoundError(f"{root}: {len(train_files)} training and {len(val_files)} validation files "
                                f"with suffixes {SUFFIXES}; need at least one of each")
    return Corpus(_join(root, train_files), _join(root, val_files), str(root), len(train_files), len(val_files))


def windows(data: np.ndarray, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``data[s:s+length]`` and next-byte targets ``data[s+1:s+length+1]`` per start,
    both ``[len(starts), length]`` int32."""
    idx = starts[:, None] + np.arange(length + 1)
    seq = data[idx].astype(np.int32)
    return seq[:, :-1], seq[:, 1:]


def random_starts(rng: np.random.Generator, data: np.ndarray, count: int, length: int) -> np.ndarray:
    """``count`` uniformly random window starts in ``data``.

    Raises:
      ValueError: ``data`` is shorter than one window (``length + 1`` bytes).
    """
    if len(data) < length + 1:
        raise ValueError(f"the data has {len(data)} bytes, fewer than one window of {length} + 1")
    return rng.integers(0, len(data) - length, count)


def even_starts(data: np.ndarray, count: int, length: int) -> np.ndarray:
    """``count`` window starts spread evenly over ``data`` (the fixed validation set)."""
    if len(data) < length + 1:
        raise ValueError(f"the data has {len(data)} bytes, fewer than one window of {length} + 1")
    return np.linspace(0, len(data) - length - 1, count).astype(np.int64)
