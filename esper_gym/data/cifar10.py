"""CIFAR-10 from the official python-pickle directory (read with a numpy-only unpickler)."""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import pathlib
import pickle
import shutil
import stat
import tarfile
import tempfile
import urllib.request
from typing import Any

import numpy as np

from esper_gym.data.dataset import (
    Dataset,
    DatasetNotFoundError,
    _check_val_size,
    _split_and_normalise,
    data_root,
)

try:
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _np_multiarray

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_META = "batches.meta"


def load_cifar10(
    data_dir: str | os.PathLike | None = None, val_size: int = 5000, download: bool = False
) -> Dataset:
    """CIFAR-10 from the official python-pickle directory ``cifar-10-batches-py``.

    ``data_dir`` may be that directory itself or its parent; without it the directory is
    ``data_root()/cifar-10-batches-py``. Missing -> :class:`DatasetNotFoundError`, unless
    ``download=True``, which fetches the official tarball (md5-verified) into ``data_dir`` or
    ``data_root()`` and extracts it first. Malformed batches -> ``ValueError`` naming the file.

    The last ``val_size`` training images form the validation split. Inputs have shape
    ``(3, 32, 32)``. The result is cached per (directory, val_size) and shared between callers:
    do not modify its tensors in place.
    """
    parent = pathlib.Path(data_dir).expanduser() if data_dir is not None else data_root()
    candidates = (
        [parent, parent / CIFAR10_DIRNAME] if data_dir is not None else [parent / CIFAR10_DIRNAME]
    )
    directory = next((d for d in candidates if (d / CIFAR10_TEST_BATCH).exists()), None)
    if directory is None and download:
        _download_cifar10(parent)
        directory = parent / CIFAR10_DIRNAME
    if directory is None:
        tried = "\n".join(f"  {d}" for d in candidates)
        raise DatasetNotFoundError(
            f"CIFAR-10 not found; looked for {CIFAR10_DIRNAME}/{CIFAR10_TEST_BATCH} in:\n{tried}\n"
            f"To get it: download {CIFAR10_URL} and extract it under $ESPER_DATA_DIR "
            f"(currently {data_root()}), or pass data_dir=<directory holding {CIFAR10_DIRNAME}>, "
            "or call load_cifar10(..., download=True)."
        )
    return _load_cifar10_cached(directory.resolve(), _check_val_size(val_size))


def _download_cifar10(parent: str | os.PathLike) -> pathlib.Path:
    """Fetch the official CIFAR-10 tarball, check its md5 and extract it under ``parent``.

    Returns the extracted ``cifar-10-batches-py`` directory. Only called on explicit request.
    """
    parent = pathlib.Path(parent).expanduser()
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        tarball = pathlib.Path(tmp) / "cifar-10-python.tar.gz"
        with urllib.request.urlopen(CIFAR10_URL, timeout=60) as response, open(tarball, "wb") as f:
            shutil.copyfileobj(response, f)
        md5 = hashlib.md5()
        with open(tarball, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                md5.update(chunk)
        if md5.hexdigest() != CIFAR10_MD5:
            raise ValueError(
                f"downloaded {CIFAR10_URL} has md5 {md5.hexdigest()}, expected {CIFAR10_MD5}"
            )
        with tarfile.open(tarball, "r:gz") as tar:
            _safe_extract(tar, parent)
    return parent / CIFAR10_DIRNAME


def _safe_extract(tar: tarfile.TarFile, parent: pathlib.Path) -> None:
    if hasattr(tarfile, "data_filter"):
        # Refuses absolute paths, links out of the tree and device files.
        tar.extractall(parent, filter="data")
        return
    # Pythons before 3.10.12/3.11.4 lack extraction filters; the official tarball holds only
    # plain files and directories, so anything else (or a path escaping parent) is refused.
    root = parent.resolve()
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
            raise ValueError(f"refusing to extract suspicious tar member {member.name!r}")
    tar.extractall(parent)


@functools.lru_cache(maxsize=2)
def _load_cifar10_cached(directory: pathlib.Path, val_size: int) -> Dataset:
    meta = _read_cifar_pickle(directory / CIFAR10_META)
    label_names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(label_names, list) or len(label_names) != 10:
        raise ValueError(f"CIFAR-10 metadata {directory / CIFAR10_META} lacks 10 label_names")
    train = [_read_cifar_batch(directory / name) for name in CIFAR10_TRAIN_BATCHES]
    test_x, test_y = _read_cifar_batch(directory / CIFAR10_TEST_BATCH)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return _split_and_normalise(
        "cifar10", train_x, train_y, test_x, test_y, val_size=val_size, num_classes=10
    )


def _read_cifar_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_cifar_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"CIFAR-10 batch {path} is not a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
    ):
        shape = getattr(data, "shape", None)
        raise ValueError(f"CIFAR-10 batch {path}: b'data' must be uint8 (N, 3072), got {shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"CIFAR-10 batch {path}: need {len(data)} integer labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 batch {path}: labels outside 0..9")
    # Rows are the 1024 red, then green, then blue values of a 32x32 image in row-major order.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


# Unpickling can run arbitrary code, which is acceptable here only because these are the
# official CIFAR-10 files, in the official format, placed by the user in a directory they chose
# (or downloaded and md5-checked on their explicit request). To limit the damage of a stray or
# tampered file anyway, the unpickler resolves only the numpy globals that ndarrays need.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 writes bytes this way at protocol 2, e.g. in re-pickled copies of the dataset.
    ("_codecs", "encode"): codecs.encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a CIFAR-10 file"
            ) from None


def _read_cifar_pickle(path: pathlib.Path) -> Any:
    # Only the fixed names above are ever opened; a directory, device or FIFO in their place
    # means the directory is not what we think it is.
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DatasetNotFoundError(
            f"CIFAR-10 file {path} is missing; re-extract {CIFAR10_URL} there"
        ) from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"CIFAR-10 file {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            # encoding="bytes" because the files were pickled by Python 2 (keys are bytes).
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"CIFAR-10 file {path} is not a valid CIFAR-10 pickle: {e}") from e
