"""Shared fixtures: small task configurations and one kernel store per test session."""

import pathlib

import pytest
import torch

from tests.test_data import _write_cifar

# Tests run on 2 cores next to other work: one thread keeps timings and results stable.
torch.set_num_threads(1)

# Spirals small enough for a test: 8 optimizer steps per epoch, 6 env steps per episode.
SMALL = {
    "dataset_kwargs": {"n_train": 1024, "n_val": 256, "n_test": 256},
    "max_epochs": 6.0,
    "decision_interval": 8,
    "eval_size": 256,
    "blend_steps": 8,
    "embargo_steps": 8,
}


def write_tiny_cifar(tmp_path: pathlib.Path) -> pathlib.Path:
    directory = tmp_path / "cifar-10-batches-py"
    if not directory.exists():
        _write_cifar(directory)
    return directory


def small_kwargs(env_id: str, tmp_path: pathlib.Path) -> dict:
    """gym.make kwargs that keep every registered task to a few seconds."""
    if "Spirals" in env_id:
        return dict(SMALL)
    if "FashionMNIST" in env_id:
        return {"max_epochs": 0.04, "decision_interval": 4, "eval_size": 256}
    if "CIFAR10" in env_id:
        return {
            "data_dir": str(write_tiny_cifar(tmp_path)),
            "dataset_kwargs": {"val_size": 20},
            "eval_size": 20,
            "batch_size": 16,
            "max_epochs": 1.0,
            "decision_interval": 2,
        }
    raise KeyError(env_id)


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("kernels"))
