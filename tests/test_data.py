"""Tests for esper_gym.data: generated spirals, IDX and CIFAR pickle parsing, lookup and errors."""

from __future__ import annotations

import gzip
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch

from esper_gym.data import (
    Dataset,
    DatasetNotFoundError,
    cifar10,
    data_root,
    fashion_mnist,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    make_spirals,
)

SPLITS = ("train", "val", "test")


def _check_layout(ds: Dataset, sizes: tuple[int, int, int]) -> None:
    for split, n in zip(SPLITS, sizes):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        assert x.dtype == torch.float32, split
        assert y.dtype == torch.int64, split
        assert tuple(x.shape) == (n, *ds.input_shape), split
        assert tuple(y.shape) == (n,), split
        if n:
            assert int(y.min()) >= 0 and int(y.max()) < ds.num_classes, split


def _normalised(raw: np.ndarray, train: np.ndarray, channel_axes: tuple[int, ...]) -> np.ndarray:
    """Reference normalisation: per-channel mean / population std of the raw training pixels."""
    train = train.astype(np.float64)
    mean = train.mean(axis=channel_axes, keepdims=True)[0]
    std = train.std(axis=channel_axes, keepdims=True)[0]
    return (raw.astype(np.float64) - mean) / std


# --------------------------------------------------------------------------------------------
# Spirals


def test_spirals_layout_and_class_balance():
    ds = make_spirals(n_train=103, n_val=17, n_test=21, arms=5)
    assert ds.name == "spirals"
    assert ds.num_classes == 5
    assert ds.input_shape == (2,)
    _check_layout(ds, (103, 17, 21))
    for split in SPLITS:
        counts = torch.bincount(getattr(ds, f"y_{split}"), minlength=5)
        assert int(counts.max() - counts.min()) <= 1, (split, counts)
    # Labels are shuffled, not sorted by class.
    assert not torch.equal(ds.y_train, torch.sort(ds.y_train).values)


def test_spirals_train_is_normalised():
    ds = make_spirals()
    torch.testing.assert_close(ds.x_train.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.x_train.std(0, correction=0), torch.ones(2), atol=1e-5, rtol=0)


def test_spirals_reproducible_and_seed_dependent():
    a, b, c = make_spirals(seed=3), make_spirals(seed=3), make_spirals(seed=4)
    for split in SPLITS:
        assert torch.equal(getattr(a, f"x_{split}"), getattr(b, f"x_{split}"))
        assert torch.equal(getattr(a, f"y_{split}"), getattr(b, f"y_{split}"))
        assert not torch.equal(getattr(a, f"x_{split}"), getattr(c, f"x_{split}"))


def test_spirals_leave_global_rng_alone():
    state = torch.get_rng_state()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_spirals(n_train=50, n_val=10, n_test=10)
    assert torch.equal(torch.rand(3), expected)
    torch.set_rng_state(state)


def test_spirals_splits_are_independent_draws():
    ds = make_spirals(n_train=500, n_val=500, n_test=500)
    xs = [getattr(ds, f"x_{split}") for split in SPLITS]
    for i in range(3):
        for j in range(i + 1, 3):
            # No point is shared between two splits.
            assert torch.cdist(xs[i], xs[j]).min() > 0, (SPLITS[i], SPLITS[j])


def test_spiral_labels_follow_the_arms():
    # Without noise the arms are disjoint curves, so nearest-neighbour labelling is near perfect;
    # labels detached from the geometry would score about 1/arms.
    ds = make_spirals(n_train=2000, n_val=0, n_test=500, noise=0.0)
    nearest = torch.cdist(ds.x_test, ds.x_train).argmin(dim=1)
    accuracy = (ds.y_train[nearest] == ds.y_test).float().mean().item()
    assert accuracy > 0.95


def test_spirals_reject_bad_arguments():
    with pytest.raises(ValueError, match="arms"):
        make_spirals(arms=1)
    with pytest.raises(ValueError, match="n_train"):
        make_spirals(n_train=0)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: tiny IDX files written here


def _write_idx(path: pathlib.Path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    header = np.array([magic, *dims], dtype=">u4").tobytes()
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + payload)


def _write_fashion(
    directory: pathlib.Path, n_train: int = 7, n_test: int = 3, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    # One known pixel: the first test image is black except row 5, column 17.
    arrays["test_images"][0] = 0
    arrays["test_images"][0, 5, 17] = 255
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        prefix = "train" if split == "train" else "t10k"
        _write_idx(
            directory / f"{prefix}-images-idx3-ubyte{suffix}", 2051, images.shape, images.tobytes()
        )
        _write_idx(
            directory / f"{prefix}-labels-idx1-ubyte{suffix}", 2049, labels.shape, labels.tobytes()
        )
    return arrays


def _check_tiny_fashion(ds: Dataset, arrays: dict[str, np.ndarray], val_size: int) -> None:
    n_train = len(arrays["train_images"]) - val_size
    assert ds.name == "fashion_mnist"
    assert ds.input_shape == (1, 28, 28)
    assert ds.num_classes == 10
    _check_layout(ds, (n_train, val_size, len(arrays["test_images"])))
    train_raw = arrays["train_images"][:, None]
    expected = {
        "train": _normalised(train_raw[:n_train], train_raw[:n_train], (0, 2, 3)),
        "val": _normalised(train_raw[n_train:], train_raw[:n_train], (0, 2, 3)),
        "test": _normalised(arrays["test_images"][:, None], train_raw[:n_train], (0, 2, 3)),
    }
    for split in SPLITS:
        np.testing.assert_allclose(getattr(ds, f"x_{split}").numpy(), expected[split], atol=1e-5)
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train_labels"][:n_train])
    np.testing.assert_array_equal(ds.y_val.numpy(), arrays["train_labels"][n_train:])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["test_labels"])


@pytest.fixture
def no_env_data_dir(monkeypatch):
    monkeypatch.delenv("ESPER_DATA_DIR", raising=False)


def test_fashion_idx_round_trip_via_data_dir(tmp_path, no_env_data_dir):
    arrays = _write_fashion(tmp_path / "fm")
    ds = load_fashion_mnist(tmp_path / "fm", val_size=2)
    _check_tiny_fashion(ds, arrays, val_size=2)
    first = ds.x_test[0]
    assert (first == first.max()).nonzero().tolist() == [[0, 5, 17]]
    assert torch.unique(first).numel() == 2


def test_fashion_idx_round_trip_uncompressed_and_parent_dir(tmp_path, no_env_data_dir):
    arrays = _write_fashion(tmp_path / "fashion-mnist", gz=False, seed=1)
    # data_dir may also be the parent of a fashion-mnist directory.
    _check_tiny_fashion(load_fashion_mnist(str(tmp_path), val_size=0), arrays, val_size=0)


def test_fashion_found_via_env_before_system_dir(tmp_path, monkeypatch):
    arrays = _write_fashion(tmp_path / "fashion-mnist", seed=2)
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path))
    _check_tiny_fashion(load_fashion_mnist(val_size=3), arrays, val_size=3)
    _check_tiny_fashion(load_dataset("fashion_mnist", val_size=3), arrays, val_size=3)


def test_fashion_is_cached_per_directory(tmp_path, no_env_data_dir):
    _write_fashion(tmp_path / "a", seed=3)
    _write_fashion(tmp_path / "b", seed=4)
    a1 = load_fashion_mnist(tmp_path / "a", val_size=2)
    assert load_fashion_mnist(tmp_path / "a", val_size=2) is a1
    assert load_fashion_mnist(tmp_path / "a" / ".." / "a", val_size=2) is a1
    assert load_fashion_mnist(tmp_path / "a", val_size=1) is not a1
    assert not torch.equal(load_fashion_mnist(tmp_path / "b", val_size=2).x_train, a1.x_train)


@pytest.mark.parametrize(
    ("filename", "magic"),
    [("train-images-idx3-ubyte.gz", 2049), ("t10k-labels-idx1-ubyte.gz", 2051)],
)
def test_fashion_bad_magic_names_the_file(tmp_path, no_env_data_dir, filename, magic):
    arrays = _write_fashion(tmp_path)
    key = ("train" if filename.startswith("train") else "test") + (
        "_images" if "images" in filename else "_labels"
    )
    array = arrays[key]
    _write_idx(tmp_path / filename, magic, array.shape, array.tobytes())
    with pytest.raises(ValueError, match=rf"{filename}.*magic number {magic}"):
        load_fashion_mnist(tmp_path, val_size=2)


def test_fashion_truncated_or_mismatched_files_raise(tmp_path, no_env_data_dir):
    arrays = _write_fashion(tmp_path / "short")
    images = arrays["train_images"]
    _write_idx(
        tmp_path / "short" / "train-images-idx3-ubyte.gz", 2051, images.shape, images.tobytes()[:-1]
    )
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz"):
        load_fashion_mnist(tmp_path / "short", val_size=2)

    _write_fashion(tmp_path / "mismatch", n_train=7)
    labels = np.zeros(6, dtype=np.uint8)
    _write_idx(tmp_path / "mismatch" / "train-labels-idx1-ubyte.gz", 2049, (6,), labels.tobytes())
    with pytest.raises(ValueError, match="7 images but 6 labels"):
        load_fashion_mnist(tmp_path / "mismatch", val_size=2)

    (tmp_path / "notgz").mkdir()
    _write_fashion(tmp_path / "notgz")
    (tmp_path / "notgz" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_fashion_mnist(tmp_path / "notgz", val_size=2)


def test_fashion_val_size_must_leave_training_data(tmp_path, no_env_data_dir):
    _write_fashion(tmp_path, n_train=7)
    with pytest.raises(ValueError, match="val_size"):
        load_fashion_mnist(tmp_path, val_size=7)
    with pytest.raises(ValueError, match="val_size"):
        load_fashion_mnist(tmp_path, val_size=-1)


def test_fashion_missing_names_paths_and_remedy(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "github.com/zalandoresearch/fashion-mnist" in message
    assert isinstance(info.value, FileNotFoundError)

    # Without data_dir: $ESPER_DATA_DIR/fashion-mnist, then the system directory, both reported.
    system = tmp_path / "usr-share"
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", system)
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "env"))
    _write_fashion(tmp_path / "env" / "fashion-mnist")
    (tmp_path / "env" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").unlink()  # incomplete
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist()
    message = str(info.value)
    assert str(tmp_path / "env" / "fashion-mnist") in message
    assert str(system) in message
    assert "$ESPER_DATA_DIR/fashion-mnist" in message


@pytest.mark.skipif(
    not fashion_mnist.FASHION_MNIST_SYSTEM_DIR.is_dir(),
    reason=f"real Fashion-MNIST not installed in {fashion_mnist.FASHION_MNIST_SYSTEM_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)
def test_fashion_real_files():
    ds = load_fashion_mnist(fashion_mnist.FASHION_MNIST_SYSTEM_DIR)
    _check_layout(ds, (55000, 5000, 10000))
    assert ds.input_shape == (1, 28, 28)
    for split in SPLITS:
        labels = getattr(ds, f"y_{split}")
        assert set(labels.unique().tolist()) == set(range(10)), split
    assert abs(ds.x_train.mean().item()) < 1e-3
    assert abs(ds.x_train.std().item() - 1) < 1e-3
    # Held-out parts come from the same distribution, so they are roughly normalised too.
    assert abs(ds.x_val.mean().item()) < 0.05
    assert abs(ds.x_test.mean().item()) < 0.05
    # Validation is the tail of the official training file, not the test set.
    with gzip.open(
        fashion_mnist.FASHION_MNIST_SYSTEM_DIR / "train-labels-idx1-ubyte.gz", "rb"
    ) as f:
        train_labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    np.testing.assert_array_equal(ds.y_val.numpy(), train_labels[-5000:])
    np.testing.assert_array_equal(ds.y_train.numpy(), train_labels[:-5000])


# --------------------------------------------------------------------------------------------
# CIFAR-10: tiny pickle batches written here in the official format


CIFAR_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck"


def _official_pickle(obj: object) -> bytes:
    # The official files are Python 2 pickles whose arrays name numpy.core.multiarray (numpy 2
    # writes numpy._core); protocol 3 keeps GLOBAL opcodes as plain text, so rename in place.
    return pickle.dumps(obj, protocol=3).replace(
        b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"
    )


def _write_cifar(directory: pathlib.Path, per_batch: int = 20, seed: int = 0) -> dict:
    """Write a tiny cifar-10-batches-py; return images as (N, 3, 32, 32) uint8 and labels."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [*cifar10.CIFAR10_TRAIN_BATCHES, cifar10.CIFAR10_TEST_BATCH]
    for name in names:
        images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        if name == "data_batch_1":
            # One known pixel: the first image is black except channel 1 (green), row 5, col 7.
            images[0] = 0
            images[0, 1, 5, 7] = 255
        labels = rng.integers(0, 10, per_batch).tolist()
        # Documented row layout: 1024 red values, then green, then blue, each row-major 32x32.
        rows = np.stack(
            [np.concatenate([img[0].ravel(), img[1].ravel(), img[2].ravel()]) for img in images]
        )
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": rows}
        batch[b"filenames"] = [f"{name}_{i}.png".encode() for i in range(per_batch)]
        (directory / name).write_bytes(_official_pickle(batch))
        written[name] = (images, np.array(labels))
    meta = {
        b"label_names": [n.encode() for n in CIFAR_CLASSES.split()],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    }
    (directory / cifar10.CIFAR10_META).write_bytes(_official_pickle(meta))
    train_x = np.concatenate([written[n][0] for n in cifar10.CIFAR10_TRAIN_BATCHES])
    train_y = np.concatenate([written[n][1] for n in cifar10.CIFAR10_TRAIN_BATCHES])
    test_x, test_y = written[cifar10.CIFAR10_TEST_BATCH]
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def test_cifar_round_trip(tmp_path, no_env_data_dir):
    directory = tmp_path / "cifar-10-batches-py"
    arrays = _write_cifar(directory)
    ds = load_cifar10(directory, val_size=30)
    assert ds.name == "cifar10"
    assert ds.input_shape == (3, 32, 32)
    assert ds.num_classes == 10
    _check_layout(ds, (70, 30, 20))

    first = ds.x_train[0]
    assert (first == first.max()).nonzero().tolist() == [[1, 5, 7]]

    train = arrays["train_x"][:70]
    np.testing.assert_allclose(ds.x_train.numpy(), _normalised(train, train, (0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(
        ds.x_val.numpy(), _normalised(arrays["train_x"][70:], train, (0, 2, 3)), atol=1e-5
    )
    np.testing.assert_allclose(
        ds.x_test.numpy(), _normalised(arrays["test_x"], train, (0, 2, 3)), atol=1e-5
    )
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train_y"][:70])
    np.testing.assert_array_equal(ds.y_val.numpy(), arrays["train_y"][70:])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["test_y"])
    # Per-channel normalisation of the training split.
    torch.testing.assert_close(ds.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ds.x_train.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-5, rtol=0
    )


def test_cifar_lookup_by_parent_env_and_name(tmp_path, monkeypatch):
    arrays = _write_cifar(tmp_path / "cifar-10-batches-py", per_batch=4, seed=1)
    by_parent = load_cifar10(tmp_path, val_size=2)
    _check_layout(by_parent, (18, 2, 4))
    np.testing.assert_array_equal(by_parent.y_test.numpy(), arrays["test_y"])

    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path))
    assert data_root() == tmp_path
    assert load_cifar10(val_size=2) is by_parent  # same directory -> the cached instance
    assert load_dataset("cifar10", val_size=2) is by_parent


def test_cifar_missing_names_path_and_url(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    assert cifar10.CIFAR10_URL in str(info.value)

    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "root"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10()
    assert str(tmp_path / "root" / "cifar-10-batches-py") in str(info.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in str(info.value)

    # A partial directory names the missing batch.
    directory = tmp_path / "partial" / "cifar-10-batches-py"
    _write_cifar(directory, per_batch=2)
    (directory / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_cifar10(directory, val_size=1)


def test_cifar_rejects_malformed_and_foreign_pickles(tmp_path, no_env_data_dir):
    directory = tmp_path / "bad" / "cifar-10-batches-py"
    _write_cifar(directory, per_batch=2)
    (directory / "data_batch_2").write_bytes(
        _official_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(ValueError, match="data_batch_2"):
        load_cifar10(directory, val_size=1)

    # A pickle that would call anything other than numpy's array constructors is refused.
    directory = tmp_path / "evil" / "cifar-10-batches-py"
    _write_cifar(directory, per_batch=2)
    (directory / "test_batch").write_bytes(pickle.dumps(os.getcwd, protocol=3))
    with pytest.raises(ValueError, match=r"test_batch.*refusing"):
        load_cifar10(directory, val_size=1)

    directory = tmp_path / "dir" / "cifar-10-batches-py"
    _write_cifar(directory, per_batch=2)
    (directory / "data_batch_4").unlink()
    (directory / "data_batch_4").mkdir()
    with pytest.raises(ValueError, match=r"data_batch_4.*not a regular file"):
        load_cifar10(directory, val_size=1)


# --------------------------------------------------------------------------------------------
# Dispatch and data root


def test_load_dataset_dispatch():
    ds = load_dataset("spirals", n_train=50, n_val=10, n_test=10, seed=1)
    assert torch.equal(ds.x_train, make_spirals(n_train=50, n_val=10, n_test=10, seed=1).x_train)


def test_load_dataset_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="mnist_digits") as info:
        load_dataset("mnist_digits")
    for name in ("spirals", "fashion_mnist", "cifar10"):
        assert name in str(info.value)


def test_data_root_default(monkeypatch):
    monkeypatch.delenv("ESPER_DATA_DIR", raising=False)
    assert data_root() == pathlib.Path.home() / ".cache" / "esper_gym"
