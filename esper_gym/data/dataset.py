"""The Dataset type, its checks, the shared split/normalise helpers and dataset shifts.
`DATASET_NAMES` are the registered names; `esper_gym.data.registry.load_dataset` maps them to
their loaders."""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

DATASET_NAMES = ("spirals", "fashion_mnist", "cifar10")


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
# Shared by the loaders: split and normalise


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
