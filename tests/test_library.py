"""esper_gym as a library: your own data (Dataset.from_tensors), your own network (hosts.wrap),
registered as your own env id; plus the packaging helpers (config_dir) and the renamed knobs."""

from __future__ import annotations

import math
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torch import nn

import esper_gym
from esper_gym.actions import ADVANCE, GERMINATE, Action
from esper_gym.data import Dataset, load_dataset
from esper_gym.hosts import build_host, edge_numels, host_macs, wrap
from esper_gym.kasmina import KasminaLayer, SeedConfig, SeedState, kasmina_layers
from esper_gym.tasks import Task, get_task

# ---------------------------------------------------------------------------- a user's lab code


def blobs(n_train: int = 600, n_test: int = 200, classes: int = 4, seed: int = 0):
    """Gaussian blobs in 8-D, offset and scaled so that normalisation has work to do."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, 8, generator=gen)

    def draw(n):
        y = torch.arange(n) % classes
        x = centres[y] + torch.randn(n, 8, generator=gen)
        return 5 * x + 100, y

    (x_train, y_train), (x_test, y_test) = draw(n_train), draw(n_test)
    return x_train, y_train, x_test, y_test


def make_blobs(n_train: int = 600, val_size: int = 100) -> Dataset:
    """A dataset factory (Task.dataset as a callable; called with dataset_kwargs)."""
    x_train, y_train, x_test, y_test = blobs(n_train)
    return Dataset.from_tensors(x_train, y_train, x_test, y_test, val_size=val_size, name="blobs")


class MyNet(nn.Module):
    """A plain network: no Kasmina code."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.body(x))


def my_host(input_shape, num_classes, slots, config):
    return wrap(MyNet(num_classes), slots, config)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


SMALL = dict(max_epochs=2, decision_interval=5, batch_size=64, blend_steps=5, embargo_steps=5)


# ---------------------------------------------------------------------------- Dataset.from_tensors


def test_from_tensors_splits_and_normalises_with_train_statistics():
    x_train, y_train, x_test, y_test = blobs()
    ds = Dataset.from_tensors(x_train, y_train, x_test, y_test, val_size=100, name="blobs")
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (500, 100, 200)
    assert ds.num_classes == 4 and ds.input_shape == (8,) and ds.name == "blobs"
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    torch.testing.assert_close(ds.x_train.mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(ds.x_train.std(0, correction=0), torch.ones(8), atol=1e-4, rtol=0)
    # val and test use the training split's statistics, not their own
    mean = x_train.mean(0)  # the raw inputs: about 100
    assert float(mean.mean()) == pytest.approx(100, abs=10)
    assert float(ds.x_test.mean().abs()) < 0.2 and float(ds.x_val.mean().abs()) < 0.3
    # the split is a seeded random draw: every training example is in exactly one split
    rows = torch.cat([ds.x_train, ds.x_val])
    assert len(torch.unique(rows, dim=0)) == 600
    assert torch.bincount(ds.y_val, minlength=4).min() > 0  # not the sorted tail: all classes
    again = Dataset.from_tensors(x_train, y_train, x_test, y_test, val_size=100, name="blobs")
    assert torch.equal(again.x_val, ds.x_val)
    other = Dataset.from_tensors(x_train, y_train, x_test, y_test, val_size=100, name="b", seed=1)
    assert not torch.equal(other.x_val, ds.x_val)


def test_from_tensors_images_are_normalised_per_channel():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 4, 4), generator=gen, dtype=torch.uint8).numpy()
    x[:, 1] = 7  # a constant channel maps to 0, not NaN
    y = np.arange(50) % 5
    ds = Dataset.from_tensors(x, y, x[:10], y[:10], val_size=10, name="imgs")
    assert ds.input_shape == (3, 4, 4) and ds.num_classes == 5
    means = ds.x_train.mean(dim=(0, 2, 3))
    stds = ds.x_train.std(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(means, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(stds, torch.tensor([1.0, 0.0, 1.0]), atol=1e-5, rtol=0)
    assert torch.isfinite(ds.x_test).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"y_train": torch.zeros(600)},
            r"y_train has dtype torch.float32: labels must be integers",
        ),
        ({"y_train": torch.zeros(599, dtype=torch.long)}, r"y_train has shape \(599,\)"),
        ({"x_test": torch.zeros(200, 9)}, r"x_test has examples of shape \(9,\)"),
        ({"x_train": torch.zeros(600)}, r"x_train has shape \(600,\)"),
        ({"y_test": torch.full((200,), 7)}, r"y_test\[0\]=7 is not a class: .*\[0, 4\)"),
        ({"y_train": torch.full((600,), -1)}, r"y_train\[0\]=-1 is not a class"),
        ({"val_size": 0}, r"val_size=0 .* must be an int in \[1, 599\]"),
        ({"val_size": 600}, r"val_size=600"),
        ({"name": ""}, r"name=''"),
        ({"num_classes": 1}, r"num_classes=1"),
    ],
)
def test_from_tensors_names_the_bad_value(change, message):
    x_train, y_train, x_test, y_test = blobs()
    kwargs = dict(
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, val_size=100, name="b"
    )
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        Dataset.from_tensors(**kwargs)


def test_load_dataset_takes_a_dataset_or_a_factory():
    ds = make_blobs()
    assert load_dataset(ds) is ds
    assert len(load_dataset(make_blobs, n_train=400).x_train) == 300
    with pytest.raises(ValueError, match="takes no dataset_kwargs"):
        load_dataset(ds, n_train=3)
    with pytest.raises(TypeError, match=r"returned tuple, not an esper_gym\.data\.Dataset"):
        load_dataset(blobs)


# ---------------------------------------------------------------------------- Task sources


def test_task_dataset_and_host_by_name_object_callable_or_import_path():
    ds = make_blobs()
    assert Task(dataset=ds).load_data() is ds
    by_call = Task(dataset=make_blobs, dataset_kwargs={"n_train": 400}).load_data()
    assert len(by_call.x_train) == 300
    by_path = Task(dataset="tests.test_library:make_blobs", dataset_kwargs={"val_size": 50})
    assert len(by_path.load_data().x_val) == 50
    assert len(Task(dataset="tests.test_library.make_blobs").load_data().x_val) == 100
    assert Task(dataset="spirals", dataset_kwargs={"n_train": 64}).load_data().name == "spirals"
    assert Task(host="tests.test_library:my_host").host_builder() is my_host
    assert Task(host=my_host).host_builder() is my_host
    assert Task(host="cnn").host_builder() is esper_gym.hosts.cnn


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset": "mnist"}, r"task 'mine': dataset='mnist'; allowed: spirals, fashion_mnist"),
        ({"dataset": "nolab.data:load"}, r"dataset='nolab.data:load': cannot import 'nolab.data'"),
        ({"dataset": "tests.test_library:nope"}, r"'tests.test_library' has no attribute 'nope'"),
        ({"host": "vit"}, r"task 'mine': host='vit'; allowed: mlp, cnn, resnet, a builder"),
        ({"host": "tests.test_library:SMALL"}, r"host='tests.test_library:SMALL' is not callable"),
        ({"dataset": 3}, r"dataset=3 is not a name, a Dataset or a callable"),
    ],
)
def test_task_names_a_bad_source(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Task(name="mine", **kwargs)


def test_dataset_kwargs_a_factory_does_not_take_are_named():
    with pytest.raises(TypeError, match=r"task 'mine': dataset_kwargs: .*'arms'"):
        Task(name="mine", dataset=make_blobs, dataset_kwargs={"arms": 3}).load_data()


def test_eval_size():
    assert get_task("fashion_mnist").eval_size == 2000
    assert get_task(Task(eval_size=300), max_epochs=1.0).eval_size == 300
    with pytest.raises(ValueError, match=r"unknown Task field\(s\) \['val_size'\]"):
        get_task("spirals", val_size=300)  # the old name of eval_size is gone
    with pytest.raises(ValueError, match="eval_size=0 must be an integer >= 1"):
        Task(eval_size=0)


def test_an_empty_validation_split_is_named(kernel_dir):
    env = gym.make(
        "Esper/Spirals-v0", kernel_dir=kernel_dir, dataset_kwargs={"n_train": 256, "n_val": 0}
    )
    with pytest.raises(ValueError, match=r"empty validation split.*n_val for spirals"):
        env.reset(seed=0)


# ---------------------------------------------------------------------------- hosts.wrap


def test_wrap_replaces_linear_and_conv_in_place_keeping_parameters_and_output():
    torch.manual_seed(0)
    net = MyNet()
    weight = net.head.weight
    x = torch.randn(5, 8)
    before = net(x)
    out = wrap(net, 2, SeedConfig())
    assert out is net
    assert [layer.name for layer in kasmina_layers(net)] == ["body.0", "head"]
    assert net.head.host.weight is weight and len(net.head.slots) == 2
    assert isinstance(net.body[0], KasminaLayer) and isinstance(net.body[1], nn.ReLU)
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)  # dormant: the host alone
    assert wrap(net, 2, SeedConfig(), targets=(nn.Linear,)) is net  # already wrapped: no change
    assert len(kasmina_layers(net)) == 2 and isinstance(net.head.host, nn.Linear)


def test_wrap_by_name_leaves_the_classifier_plain():
    net = wrap(SmallCNN(), 1, SeedConfig(), targets=("conv1", "conv2"))
    assert [layer.name for layer in kasmina_layers(net)] == ["conv1", "conv2"]
    assert isinstance(net.fc, nn.Linear)
    only_convs = wrap(SmallCNN(), 1, SeedConfig(), targets=(nn.Conv2d,))
    assert isinstance(only_convs.fc, nn.Linear) and len(kasmina_layers(only_convs)) == 2
    bare = wrap(nn.Linear(3, 2), 1, SeedConfig())
    assert isinstance(bare, KasminaLayer) and bare.name == "linear"


@pytest.mark.parametrize(
    "targets, message",
    [
        (("fc9",), r"targets \['fc9'\] match no layer of SmallCNN; its Linear/Conv2d layers: "),
        ((nn.LayerNorm,), r"each must be nn.Linear, nn.Conv2d"),
        ((), r"each must be"),
    ],
)
def test_wrap_names_bad_targets(targets, message):
    with pytest.raises(ValueError, match=message):
        wrap(SmallCNN(), 1, SeedConfig(), targets=targets)


def test_wrap_refuses_a_named_layer_that_cannot_grow():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"target '1' names '1', a LayerNorm"):
        wrap(net, 1, SeedConfig(), targets=("1",))


def test_wrapped_cnn_host_shapes_edges_and_macs():
    model = build_host(
        lambda s, k, slots, cfg: wrap(SmallCNN(), slots, cfg), (1, 8, 8), 3, 2, SeedConfig()
    )
    assert [layer.out_shape for layer in kasmina_layers(model)] == [(4, 4, 4), (8, 2, 2), (3,)]
    assert edge_numels(model) == [64, 32]
    # 36 weights x 16 positions + 288 x 4 + 96: what each host layer multiplies per sample
    assert host_macs(model) == 4 * 9 * 16 + 8 * 4 * 9 * 4 + 32 * 3


def test_build_host_refuses_layers_registered_out_of_data_flow_order():
    class Backwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 4)
            self.body = nn.Linear(8, 16)

        def forward(self, x):
            return self.head(self.body(x))

    with pytest.raises(ValueError, match=r"run in the order \['body', 'head'\] but are registered"):
        build_host(lambda *a: wrap(Backwards(), a[2], a[3]), (8,), 4, 1, SeedConfig())
    with pytest.raises(ValueError, match=r"has no KasminaLayer.*hosts\.wrap"):
        build_host(lambda *a: MyNet(), (8,), 4, 1, SeedConfig())


# ---------------------------------------------------------------------------- your own env id


def test_my_own_env_id_checks_grows_and_ends_with_a_test_accuracy(kernel_dir):
    task = Task(name="mine", host=my_host, dataset=make_blobs, **SMALL)
    gym.envs.registry.pop("MyLab/Mine-v0", None)  # test_env registers the same example id
    gym.register(
        "MyLab/Mine-v0", entry_point="esper_gym.env:MorphogeneticEnv", kwargs={"task": task}
    )
    env = gym.make("MyLab/Mine-v0", kernel_dir=kernel_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=False)
    assert [str(w.message) for w in caught] == []

    base = env.unwrapped
    obs, info = env.reset(seed=0)
    assert int(obs["node_mask"].sum()) == 2 and base.data.name == "blobs"
    assert info["params"] == 8 * 16 + 16 + 16 * 4 + 4
    assert base.host_macs == 8 * 16 + 16 * 4
    params_before = sum(p.numel() for p in base.model.parameters())
    _, _, _, _, info = env.step(base.layout.encode(Action(GERMINATE, 0, 0, 0)))
    assert info["params_added"] > 0 and info["events"][0]["to"] == "GERMINATED"
    assert sum(p.numel() for p in base.model.parameters()) == params_before + info["params_added"]
    env.step(base.layout.encode(Action(ADVANCE, 0, 0)))
    slot = base.layers[0].slots[0]
    assert slot.state == SeedState.TRAINING
    assert slot.calls == base.task.decision_interval + 1  # every optimizer step + contribution
    terminated, steps = False, 2
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(0)
        steps += 1
        assert not truncated and math.isfinite(reward)
    # 2 epochs of 500 examples in batches of 64: 16 optimizer steps -> 4 decisions of 5 (20)
    assert steps == base.episode_steps == 4
    assert info["test_acc"] == base.trainer.evaluate(base.data.x_test, base.data.y_test)[0]
    assert info["test_acc"] > 0.5  # four well separated blobs: far above chance (0.25)


def task_with_dataset_factory() -> Task:
    return Task(name="mine", host="tests.test_library:my_host", dataset=make_blobs, **SMALL)


def test_a_task_with_a_dataset_pickles_and_runs_in_spawned_workers(kernel_dir):
    env = gym.make("esper_gym:Esper/Spirals-v0", task=Task(dataset=make_blobs(), **SMALL))
    env.reset(seed=1)
    clone = pickle.loads(pickle.dumps(env.unwrapped))
    o1, r1, *_ = env.unwrapped.step(0)
    o2, r2, *_ = clone.step(0)
    assert r1 == r2 and np.array_equal(o1["nodes"], o2["nodes"])

    def make():
        return gym.make(
            "esper_gym:Esper/Spirals-v0", task=task_with_dataset_factory(), kernel_dir=kernel_dir
        )

    venv = gym.vector.AsyncVectorEnv([make] * 2, shared_memory=False, context="spawn")
    try:
        obs, _ = venv.reset(seed=[0, 1])
        assert obs["node_mask"].sum(axis=1).tolist() == [2, 2]
        _, rewards, *_ = venv.step(np.zeros(2, dtype=np.int64))
        assert np.isfinite(rewards).all()
    finally:
        venv.close()


# ---------------------------------------------------------------------------- packaging


def test_config_dir_is_the_repository_conf_in_a_clone():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    assert esper_gym.config_dir() == root / "conf"
    from esper_gym import train

    assert str(root / "conf") == train.CONF_DIR
