"""Fashion-MNIST from the four standard IDX files."""

from __future__ import annotations

import functools
import gzip
import os
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from esper_gym.data.dataset import (
    Dataset,
    DatasetNotFoundError,
    _check_val_size,
    _split_and_normalise,
    data_root,
)

FASHION_MNIST_SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, val_size: int = 5000) -> Dataset:
    """Fashion-MNIST from the four standard IDX files (``.gz`` or uncompressed).

    The files are looked for in ``data_dir`` (or ``data_dir/fashion-mnist``) if given; otherwise
    in ``$ESPER_DATA_DIR/fashion-mnist`` if that variable is set, then in
    ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``). The first
    directory holding all four files is used; none -> :class:`DatasetNotFoundError`. A file with
    a wrong magic number, shape or size -> ``ValueError`` naming it.

    The last ``val_size`` training images form the validation split. Inputs have shape
    ``(1, 28, 28)``. The result is cached per (directory, val_size) and shared between callers:
    do not modify its tensors in place.
    """
    if data_dir is not None:
        root = pathlib.Path(data_dir).expanduser()
        candidates = [root, root / "fashion-mnist"]
    else:
        candidates = []
        if os.environ.get("ESPER_DATA_DIR"):
            candidates.append(data_root() / "fashion-mnist")
        candidates.append(FASHION_MNIST_SYSTEM_DIR)
    for directory in candidates:
        if _find_idx_files(directory) is not None:
            return _load_fashion_mnist_cached(directory.resolve(), _check_val_size(val_size))
    tried = "\n".join(f"  {d}" for d in candidates)
    names = ", ".join(f"{n}.gz" for n in FASHION_MNIST_FILES.values())
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found; looked for {names} (or the same names without .gz) in:\n"
        f"{tried}\n"
        "To get it: `apt-get install dataset-fashion-mnist` (installs into "
        f"{FASHION_MNIST_SYSTEM_DIR}), or download the four files from {FASHION_MNIST_URL} "
        "into $ESPER_DATA_DIR/fashion-mnist, or pass data_dir=<directory holding them>."
    )


def _find_idx_files(directory: pathlib.Path) -> dict[str, pathlib.Path] | None:
    found = {}
    for key, name in FASHION_MNIST_FILES.items():
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


# Environments reload their dataset on every reset, and parsing plus normalising Fashion-MNIST
# takes about a second; the cache keeps one copy per directory instead.
@functools.lru_cache(maxsize=4)
def _load_fashion_mnist_cached(directory: pathlib.Path, val_size: int) -> Dataset:
    files = _find_idx_files(directory)
    if files is None:  # removed between the lookup and this call
        raise DatasetNotFoundError(f"Fashion-MNIST files disappeared from {directory}")
    train_images = _read_idx_images(files["train_images"])
    train_labels = _read_idx_labels(files["train_labels"])
    test_images = _read_idx_images(files["test_images"])
    test_labels = _read_idx_labels(files["test_labels"])
    for images, labels, split in (
        (train_images, train_labels, "train"),
        (test_images, test_labels, "test"),
    ):
        if len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {split} split in {directory}: {len(images)} images "
                f"but {len(labels)} labels"
            )
        if labels.size and labels.max() > 9:
            raise ValueError(
                f"Fashion-MNIST {split} labels in {directory} exceed 9 (max {labels.max()})"
            )
    return _split_and_normalise(
        "fashion_mnist",
        train_images[:, None],
        train_labels,
        test_images[:, None],
        test_labels,
        val_size=val_size,
        num_classes=10,
    )


def _read_idx(path: pathlib.Path) -> bytes:
    opener: Callable[..., Any] = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file {path}: {e}") from e


def _read_idx_images(path: pathlib.Path) -> np.ndarray:
    raw = _read_idx(path)
    if len(raw) < 16:
        raise ValueError(f"IDX image file {path} is truncated ({len(raw)} bytes)")
    magic, n, rows, cols = np.frombuffer(raw, dtype=">u4", count=4)
    if magic != IDX_IMAGES_MAGIC:
        raise ValueError(
            f"IDX image file {path} has magic number {magic}, expected {IDX_IMAGES_MAGIC}"
        )
    if (rows, cols) != (28, 28):
        raise ValueError(f"IDX image file {path} holds {rows}x{cols} images, expected 28x28")
    expected = 16 + int(n) * 28 * 28
    if len(raw) != expected:
        raise ValueError(
            f"IDX image file {path} is {len(raw)} bytes, expected {expected} for {n} images"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(int(n), 28, 28)


def _read_idx_labels(path: pathlib.Path) -> np.ndarray:
    raw = _read_idx(path)
    if len(raw) < 8:
        raise ValueError(f"IDX label file {path} is truncated ({len(raw)} bytes)")
    magic, n = np.frombuffer(raw, dtype=">u4", count=2)
    if magic != IDX_LABELS_MAGIC:
        raise ValueError(
            f"IDX label file {path} has magic number {magic}, expected {IDX_LABELS_MAGIC}"
        )
    if len(raw) != 8 + int(n):
        raise ValueError(
            f"IDX label file {path} is {len(raw)} bytes, expected {8 + int(n)} for {n} labels"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=8)
