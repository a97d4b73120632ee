"""`load_dataset`: a dataset by registered name, a ready `Dataset`, or a factory of yours.

Its own module because it imports every loader, and the loaders import `dataset.py`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from esper_gym.data.cifar10 import load_cifar10
from esper_gym.data.dataset import DATASET_NAMES, SHIFT_KWARGS, Dataset, shift_dataset
from esper_gym.data.fashion_mnist import load_fashion_mnist
from esper_gym.data.spirals import make_spirals


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
