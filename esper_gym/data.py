"""Datasets for the benchmark tasks: synthetic spirals, Fashion-MNIST and CIFAR-10.

Every loader returns a :class:`Dataset` of float32 inputs normalised with the per-channel
mean and standard deviation of its own training split, int64 labels, and three splits:
``train`` and ``val`` (disjoint parts of the official training set) and ``test`` (the official
test set). Nothing is ever downloaded implicitly and nothing falls back to random data: a
missing or malformed dataset raises.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import math
import os
import pathlib
import pickle
import shutil
import stat
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _np_multiarray

__all__ = [
    "Dataset",
    "DatasetNotFoundError",
    "data_root",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "make_spirals",
    "shift_dataset",
]

DATASET_NAMES = ("spirals", "fashion_mnist", "cifar10")

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

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_META = "batches.meta"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the loader looked; the message says where and how to fix."""


# eq=False: field-wise == on tensors would raise, and identity is what the caches hand out.
@dataclass(frozen=True, eq=False)
class Dataset:
    """Three labelled splits of one classification task.

    ``x_*`` are float32 of shape ``(N, *input_shape)``, normalised with the per-channel mean and
    (population) standard deviation of ``x_train``; ``y_*`` are int64 of shape ``(N,)`` with
    values in ``[0, num_classes)``. ``val`` is held out from the official training set, ``test``
    is the official test set (for spirals, an independent draw).

    Loaders of file-backed datasets cache and return the same instance on every call, so its
    tensors are shared: treat them as read-only (index or ``.clone()`` before modifying).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    @classmethod
    def from_tensors(
        cls,
        x_train: Any,
        y_train: Any,
        x_test: Any,
        y_test: Any,
        *,
        val_size: int,
        name: str,
        num_classes: int | None = None,
        seed: int = 0,
    ) -> Dataset:
        """Your own data as a Dataset: checked, split and normalised like the built-in ones.

        ``x_*`` (tensors or arrays) are inputs of shape ``(N, *input_shape)``, e.g. ``(N, F)``
        vectors or ``(N, C, H, W)`` images; ``y_*`` are integer labels of shape ``(N,)`` in
        ``[0, num_classes)`` (``num_classes`` defaults to the largest training label + 1).
        ``val_size`` training examples, drawn at random with ``seed`` (data is often sorted by
        class), become the validation split the env evaluates on every step; the rest is
        trained on. Inputs are normalised with the per-feature (``(N, F)``) or per-channel
        (dim 1 of anything larger) mean and population std of that training remainder; a constant feature or
        channel gets std 1. A bad shape, label or size raises ``ValueError`` naming it.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name={name!r} must be a non-empty string")
        x_train, x_test = _as_inputs(x_train, "x_train"), _as_inputs(x_test, "x_test")
        if x_test.shape[1:] != x_train.shape[1:]:
            raise ValueError(
                f"x_test has examples of shape {tuple(x_test.shape[1:])}, x_train of shape "
                f"{tuple(x_train.shape[1:])}: they must match"
            )
        y_train = _as_labels(y_train, "y_train", len(x_train), "x_train")
        y_test = _as_labels(y_test, "y_test", len(x_test), "x_test")
        given = num_classes is not None
        if not given:
            num_classes = max(int(y_train.max()) + 1, 2)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} must be an int >= 2")
        for labels, key in ((y_train, "y_train"), (y_test, "y_test")):
            bad = ((labels < 0) | (labels >= num_classes)).nonzero()
            if len(bad):
                i = int(bad[0, 0])
                source = "given" if given else "the largest y_train label + 1"
                raise ValueError(
                    f"{key}[{i}]={int(labels[i])} is not a class: labels must be in "
                    f"[0, {num_classes}) (num_classes={num_classes}, {source})"
                )
        n = len(x_train)
        if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 < val_size < n:
            raise ValueError(
                f"val_size={val_size!r} (the validation split taken from the {n} training "
                f"examples) must be an int in [1, {n - 1}]: the env evaluates on it every step "
                "and trains on the rest"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        train_idx, val_idx = order[: n - val_size], order[n - val_size :]
        dims = [0] if x_train.dim() == 2 else [0, *range(2, x_train.dim())]
        x64 = x_train[train_idx].to(torch.float64)
        mean = x64.mean(dim=dims, keepdim=True)
        std = x64.std(dim=dims, keepdim=True, correction=0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        mean, std = mean.to(torch.float32), std.to(torch.float32)
        return cls(
            name=name,
            x_train=(x_train[train_idx] - mean) / std,
            y_train=y_train[train_idx],
            x_val=(x_train[val_idx] - mean) / std,
            y_val=y_train[val_idx],
            x_test=(x_test - mean) / std,
            y_test=y_test,
            num_classes=num_classes,
            input_shape=tuple(int(d) for d in x_train.shape[1:]),
        )


def _as_inputs(x: Any, key: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(
            f"{key} has shape {tuple(x.shape)}: expected (N, *input_shape) with N > 0, e.g. "
            "(N, features) or (N, C, H, W)"
        )
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{key} has dtype {x.dtype}: expected real numbers")
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{key} holds NaN or Inf values")
    return x


def _as_labels(y: Any, key: str, n: int, x_key: str) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{key} has dtype {y.dtype}: labels must be integers 0..num_classes-1")
    if y.shape != (n,):
        raise ValueError(
            f"{key} has shape {tuple(y.shape)}: expected ({n},), one label per {x_key} row"
        )
    return y.to(torch.int64)


def data_root() -> pathlib.Path:
    """Where downloaded datasets live: ``$ESPER_DATA_DIR`` if set, else ``~/.cache/esper_gym``."""
    env = os.environ.get("ESPER_DATA_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "esper_gym"


def load_dataset(
    name: str | Dataset | Callable[..., Dataset],
    *,
    data_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Dataset:
    """A benchmark dataset by name (``"spirals"``, ``"fashion_mnist"``, ``"cifar10"``), or yours.

    ``data_dir`` and ``kwargs`` are passed to the loader; ``data_dir`` is ignored for spirals,
    which are generated. Names are matched case-insensitively with ``-`` read as ``_``.
    A ``Dataset`` is returned as it is (it takes no ``kwargs``); a callable is called with
    ``kwargs`` (and ``data_dir=`` when one is given) and must return a ``Dataset``, e.g. one
    made by :meth:`Dataset.from_tensors`. Raises ``ValueError`` for an unknown name.
    """
    if isinstance(name, Dataset):
        if kwargs:
            raise ValueError(
                f"dataset {name.name!r} is a ready Dataset: it takes no dataset_kwargs, got "
                f"{sorted(kwargs)}"
            )
        return name
    if callable(name):
        if data_dir is not None:
            kwargs["data_dir"] = data_dir
        data = name(**kwargs)
        if not isinstance(data, Dataset):
            raise TypeError(
                f"dataset factory {getattr(name, '__qualname__', name)!r} returned "
                f"{type(data).__name__}, not an esper_gym.data.Dataset (see Dataset.from_tensors)"
            )
        return data
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    shift = {k: kwargs.pop(k) for k in SHIFT_KWARGS if k in kwargs}
    if key == "spirals":
        data = make_spirals(**kwargs)
    elif key == "fashion_mnist":
        data = load_fashion_mnist(data_dir, **kwargs)
    elif key == "cifar10":
        data = load_cifar10(data_dir, **kwargs)
    else:
        raise ValueError(
            f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}, a Dataset or "
            "a callable returning one"
        )
    return shift_dataset(data, **shift) if shift else data


# dataset_kwargs every built-in dataset takes on top of its loader's own (see shift_dataset).
SHIFT_KWARGS = ("classes", "label_noise", "input_noise", "shift_seed")


def shift_dataset(
    data: Dataset,
    classes: int | None = None,
    label_noise: float = 0.0,
    input_noise: float = 0.0,
    shift_seed: int = 0,
) -> Dataset:
    """A harder variant of `data` (the knobs of the contextual benchmark, esper_gym.contexts).

    - ``classes=k``: keep only the examples of classes ``0..k-1`` in every split (labels
      unchanged, ``num_classes=k``);
    - ``label_noise=p``: each *training* label is replaced, with probability ``p``, by a
      different class drawn uniformly; validation and test labels stay clean, so accuracy
      still measures the true task (the agent sees a noisy training loss, a clean val_acc);
    - ``input_noise=s``: Gaussian noise of standard deviation ``s`` (inputs are normalised, so
      in units of the data's std) added once to every split's inputs (a fixed corruption, the
      same for every epoch: a blurrier task, not an augmentation).

    Draws come from a generator seeded with ``shift_seed``: the same arguments always give the
    same dataset. The input is never modified (loaders share cached instances).
    """
    if classes is not None and (
        isinstance(classes, bool)
        or not isinstance(classes, int)
        or not 2 <= classes <= data.num_classes
    ):
        raise ValueError(
            f"classes={classes!r} must be an int in [2, {data.num_classes}] ({data.name} has "
            f"{data.num_classes} classes)"
        )
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise={label_noise!r} must be in [0, 1)")
    if not 0.0 <= input_noise < math.inf:
        raise ValueError(f"input_noise={input_noise!r} must be a finite number >= 0")
    gen = torch.Generator().manual_seed(shift_seed)
    num_classes = classes or data.num_classes
    splits = {}
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if classes is not None:
            keep = y < classes
            x, y = x[keep], y[keep]
        if input_noise > 0:
            x = x + input_noise * torch.randn(x.shape, generator=gen)
        if split == "train" and label_noise > 0:
            flip = torch.rand(len(y), generator=gen) < label_noise
            # A uniform *other* class: an offset in 1..k-1, so a flipped label is always wrong.
            offset = torch.randint(1, num_classes, (len(y),), generator=gen)
            y = torch.where(flip, (y + offset) % num_classes, y)
        splits[split] = (x, y)
    return Dataset(
        name=data.name,
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_val=splits["val"][0],
        y_val=splits["val"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        num_classes=num_classes,
        input_shape=data.input_shape,
    )


# --------------------------------------------------------------------------------------------
# Spirals


def make_spirals(
    n_train: int = 4096,
    n_val: int = 1024,
    n_test: int = 1024,
    arms: int = 5,
    noise: float = 0.05,
    turns: float = 1.75,
    seed: int = 0,
) -> Dataset:
    """Interleaved 2-D spirals, one class per arm.

    A point of arm ``k`` at position ``t ~ U(0, 1)`` along the arm lies at radius ``t`` and angle
    ``2π(turns·t + k/arms)``, plus isotropic Gaussian noise of standard deviation ``noise·t``
    (relative to the radius, so the arms blur more the further out they go). Each split
    has class counts differing by at most one, in shuffled order. The three splits are
    successive independent draws from one ``torch.Generator`` seeded with ``seed``; the global
    RNG is untouched, so the same arguments always give the same dataset.

    The defaults are a capacity test: a 2-hidden-layer width-8 ReLU MLP reaches about 47% test
    accuracy and a width-64 one about 91% (Adam 1e-2, 2000 steps of batch 128), against a
    25-NN ceiling near 94%. Adjacent arms are ``1 / (turns·arms)`` apart along a ray, so noise
    near that gap (0.1 with these defaults) caps every model near 76%.
    """
    if arms < 2:
        raise ValueError(f"arms must be >= 2, got {arms}")
    if min(n_train, n_val, n_test) < 0 or n_train == 0:
        raise ValueError(
            f"need n_train > 0 and n_val, n_test >= 0; got {n_train}, {n_val}, {n_test}"
        )
    if noise < 0 or turns <= 0:
        raise ValueError(f"need noise >= 0 and turns > 0; got noise={noise}, turns={turns}")
    gen = torch.Generator().manual_seed(seed)
    splits = [_spiral_points(n, arms, noise, turns, gen) for n in (n_train, n_val, n_test)]
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits
    mean, std = _feature_stats(x_train)
    return Dataset(
        name="spirals",
        x_train=(x_train - mean) / std,
        y_train=y_train,
        x_val=(x_val - mean) / std,
        y_val=y_val,
        x_test=(x_test - mean) / std,
        y_test=y_test,
        num_classes=arms,
        input_shape=(2,),
    )


def _spiral_points(
    n: int, arms: int, noise: float, turns: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n, dtype=torch.int64) % arms
    y = y[torch.randperm(n, generator=gen)]
    t = torch.rand(n, generator=gen, dtype=torch.float64)
    angle = 2 * torch.pi * (turns * t + y.to(torch.float64) / arms)
    x = torch.stack((t * torch.cos(angle), t * torch.sin(angle)), dim=1)
    x = x + noise * t.unsqueeze(1) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x.to(torch.float32), y


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


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


# --------------------------------------------------------------------------------------------
# CIFAR-10


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


# --------------------------------------------------------------------------------------------
# Shared


def _check_val_size(val_size: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise ValueError(
            f"val_size={val_size!r} (the validation split, a dataset_kwargs key) must be a "
            "non-negative int"
        )
    return val_size


def _split_and_normalise(
    name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    val_size: int,
    num_classes: int,
) -> Dataset:
    """uint8 (N, C, H, W) images -> Dataset, with the last ``val_size`` training images as val.

    Pixels are normalised as ``(p - mean) / std`` with the per-channel mean and population std
    of the raw (0..255) training pixels, which equals normalising ``p / 255`` by its own stats.
    """
    n = len(train_x)
    if val_size >= n:
        raise ValueError(
            f"{name}: val_size={val_size} (the validation split taken from the training images; "
            f"task.dataset_kwargs={{val_size: ...}}) leaves no training data: there are only "
            f"{n} training images"
        )
    mean, std = _uint8_channel_stats(train_x[: n - val_size])

    def normalise(images: np.ndarray) -> torch.Tensor:
        out = images.astype(np.float32)
        out -= mean
        out /= std
        return torch.from_numpy(out)

    return Dataset(
        name=name,
        x_train=normalise(train_x[: n - val_size]),
        y_train=torch.from_numpy(train_y[: n - val_size].astype(np.int64)),
        x_val=normalise(train_x[n - val_size :]),
        y_val=torch.from_numpy(train_y[n - val_size :].astype(np.int64)),
        x_test=normalise(test_x),
        y_test=torch.from_numpy(test_y.astype(np.int64)),
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in train_x.shape[1:]),
    )


def _uint8_channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of uint8 (N, C, H, W), as float32 (1, C, 1, 1).

    Sums are exact integers accumulated over chunks: a float64 copy of CIFAR-10 would be 1 GB.
    A constant channel gets std 1 so that it maps to zero instead of NaN.
    """
    channels = images.shape[1]
    total = np.zeros(channels, dtype=np.int64)
    total_sq = np.zeros(channels, dtype=np.int64)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].astype(np.int64)
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += (chunk * chunk).sum(axis=(0, 2, 3))
    count = images.size // channels
    mean = total / count
    var = np.maximum(total_sq / count - mean * mean, 0.0)
    std = np.where(var > 0, np.sqrt(var), 1.0)
    shape = (1, channels, 1, 1)
    return mean.reshape(shape).astype(np.float32), std.reshape(shape).astype(np.float32)


def _feature_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and population std of (N, F) ``x``; a constant feature gets std 1."""
    x64 = x.to(torch.float64)
    mean = x64.mean(dim=0, keepdim=True)
    std = x64.std(dim=0, keepdim=True, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.to(x.dtype), std.to(x.dtype)
