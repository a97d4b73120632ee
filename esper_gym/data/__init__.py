"""Datasets for the benchmark tasks: synthetic spirals, Fashion-MNIST and CIFAR-10.

Every loader returns a :class:`Dataset` of float32 inputs normalised with the per-channel
mean and standard deviation of its own training split, int64 labels, and three splits:
``train`` and ``val`` (disjoint parts of the official training set) and ``test`` (the official
test set). Nothing is ever downloaded implicitly and nothing falls back to random data: a
missing or malformed dataset raises.
"""

from esper_gym.data.cifar10 import (
    CIFAR10_DIRNAME,
    CIFAR10_MD5,
    CIFAR10_META,
    CIFAR10_TEST_BATCH,
    CIFAR10_TRAIN_BATCHES,
    CIFAR10_URL,
    load_cifar10,
)
from esper_gym.data.dataset import (
    DATASET_NAMES,
    SHIFT_KWARGS,
    Dataset,
    DatasetNotFoundError,
    data_root,
    shift_dataset,
)
from esper_gym.data.fashion_mnist import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_SYSTEM_DIR,
    FASHION_MNIST_URL,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    load_fashion_mnist,
)
from esper_gym.data.registry import load_dataset
from esper_gym.data.spirals import make_spirals

# Every public name of the loader modules, importable from esper_gym.data as before the split.
__all__ = [
    "CIFAR10_DIRNAME",
    "CIFAR10_MD5",
    "CIFAR10_META",
    "CIFAR10_TEST_BATCH",
    "CIFAR10_TRAIN_BATCHES",
    "CIFAR10_URL",
    "DATASET_NAMES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_SYSTEM_DIR",
    "FASHION_MNIST_URL",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "SHIFT_KWARGS",
    "Dataset",
    "DatasetNotFoundError",
    "data_root",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "make_spirals",
    "shift_dataset",
]
