"""Contexts (esper_gym.contexts), traced data-flow edges, residual hosts, dataset shifts and the
decision metrics computed from seed records."""

import json
import math
import warnings

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torch import nn

import esper_gym
from esper_gym.actions import ADVANCE, CULL, GERMINATE, Action
from esper_gym.agents.tamiyo import TamiyoPolicy, obs_to_batch
from esper_gym.bench.report import decision_summary
from esper_gym.contexts import apply_context, context_space
from esper_gym.data import make_spirals, shift_dataset
from esper_gym.episode import decision_metrics
from esper_gym.hosts import (
    _autograd_edges,
    _fx_edges,
    build_host,
    data_flow_edges,
)
from esper_gym.kasmina import KasminaLayer, SeedConfig, kasmina_layers
from esper_gym.observation import GLOBAL_FEATURES, to_pyg
from esper_gym.tasks import CONTEXTS, TASKS
from tests.conftest import SMALL, small_kwargs
from tests.test_host_kernels import DATASETS


def factors(context: dict) -> tuple:
    return tuple(
        sorted((k, v) for k, v in context.items() if k not in ("split", "index", "fields"))
    )


# --- the distributions --------------------------------------------------------------------------


def test_a_task_names_its_contexts():
    """TASKS is the one table: CONTEXTS is its view, and a Task of your own may bring a space."""
    assert {name: task.context_space for name, task in TASKS.items()} == CONTEXTS
    assert CONTEXTS["spirals_faulty"] is CONTEXTS["spirals"]  # same factors, one space
    mine = esper_gym.tasks.Task(name="mine", context_space=CONTEXTS["cifar10"])
    assert context_space(mine) is CONTEXTS["cifar10"]
    with pytest.raises(ValueError, match="'mine' has no context distribution"):
        context_space(esper_gym.tasks.Task(name="mine"))


@pytest.mark.parametrize("task", sorted(CONTEXTS))
def test_train_and_test_contexts_are_disjoint_combinations_of_the_same_levels(task):
    space = CONTEXTS[task]
    train = {tuple(sorted(c.items())) for c in space.contexts("train")}
    test = {tuple(sorted(c.items())) for c in space.contexts("test")}
    assert train and test and not train & test
    assert len(train) + len(test) == len(space.grid())
    for factor in space.factors:
        for split in (train, test):
            assert {dict(c)[factor.name] for c in split} == set(factor.levels)


@pytest.mark.parametrize("task", sorted(CONTEXTS))
def test_every_context_host_fits_the_fixed_spaces(task):
    """The largest host of every context fits max_nodes and the edge slots: the spaces are the
    same for every context."""
    base = TASKS[task]
    input_shape, classes = DATASETS[base.dataset]
    sizes = set()
    for context in CONTEXTS[task].grid():
        t = apply_context(base, context)
        key = (repr(sorted(t.host_kwargs.items())), context.get("classes", classes))
        if key in sizes:
            continue
        sizes.add(key)
        model = build_host(t.host, input_shape, key[1], 1, t.seed_config(), **dict(t.host_kwargs))
        layers = kasmina_layers(model)
        assert len(layers) <= base.max_nodes
        assert len(data_flow_edges(model, input_shape)) <= 2 * base.max_nodes
    assert len(sizes) >= 2  # contexts change the host


def test_apply_context_scales_the_users_task_and_sets_the_host():
    base = TASKS["spirals"]
    task = apply_context(
        base.__class__(name="spirals", max_epochs=4.0, lr=0.02, decision_interval=8),
        {"width": 8, "depth": 3, "epochs_scale": 0.5, "lr_scale": 0.3, "label_noise": 0.1},
    )
    assert task.max_epochs == 2.0 and task.lr == pytest.approx(0.006)
    assert task.host_kwargs["hidden"] == (8, 8, 8)
    assert task.dataset_kwargs["label_noise"] == 0.1
    conv = apply_context(TASKS["fashion_mnist_resnet"], {"width": 8, "depth": 1})
    assert conv.host_kwargs == {"channels": (8,), "blocks": 1}


# --- the env ------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", sorted(esper_gym.ENV_IDS))
def test_every_id_samples_distinct_contexts_and_builds_them(env_id, tmp_path, kernel_dir):
    env = gym.make(env_id, kernel_dir=kernel_dir, contexts="test", **small_kwargs(env_id, tmp_path))
    space = CONTEXTS[env.unwrapped.base_task.name]
    test = {tuple(sorted(c.items())) for c in space.contexts("test")}
    train = {tuple(sorted(c.items())) for c in space.contexts("train")}
    seen = set()
    for seed in range(8):
        obs, info = env.reset(seed=seed)
        context = info["context"]
        json.dumps(context)  # a plain dict
        assert context["split"] == "test" and factors(context) in test
        assert factors(context) not in train
        seen.add(factors(context))
        u = env.unwrapped
        # The task, data and host are the context's.
        assert u.task.lr == pytest.approx(context["fields"]["lr"])
        assert u.task.max_epochs == pytest.approx(context["fields"]["max_epochs"])
        assert u.data.num_classes == context.get("classes", u.data.num_classes)
        if "depth" in context:
            extra = 2 * u.task.host_kwargs.get("blocks", 0) + 1 if u.task.host == "resnet" else 1
            assert len(u.layers) == context["depth"] * extra + 1
        assert env.observation_space.contains(obs)
    assert len(seen) >= 3


def test_contexts_none_keeps_the_fixed_task_and_bad_values_are_refused(kernel_dir):
    env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **SMALL)
    _, info = env.reset(seed=0)
    assert "context" not in info and env.unwrapped.task == env.unwrapped.base_task
    with pytest.raises(ValueError, match=r"contexts='foo'; allowed: None .*'train', 'test'"):
        gym.make("Esper/Spirals-v0", contexts="foo")
    with pytest.raises(ValueError, match="show_context=True needs contexts"):
        gym.make("Esper/Spirals-v0", show_context=True)
    custom = esper_gym.tasks.Task(name="mine")
    with pytest.raises(ValueError, match="'mine' has no context distribution"):
        esper_gym.env.MorphogeneticEnv(task=custom, contexts="train")
    env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, contexts="train", **SMALL)
    n = len(CONTEXTS["spirals"].contexts("train"))
    with pytest.raises(ValueError, match=rf"context={n} must be an int in \[0, {n - 1}\]"):
        env.reset(seed=0, options={"context": n})
    _, info = env.reset(seed=0, options={"context": 5})
    assert info["context"]["index"] == 5
    assert factors(info["context"]) == factors(CONTEXTS["spirals"].contexts("train")[5])


def test_same_seed_same_context_and_same_episode(kernel_dir):
    def play(seed):
        env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, contexts="train", **SMALL)
        obs, info = env.reset(seed=seed)
        trace = [(obs, 0.0, info["context"])]
        rng = np.random.default_rng(seed)
        done = False
        while not done:
            action = int(rng.choice(np.flatnonzero(obs["action_mask"])))
            obs, r, term, trunc, info = env.step(action)
            trace.append((obs, r, info["val_acc"]))
            done = term or trunc
        return trace

    a, b, c = play(11), play(11), play(12)
    assert a[0][2] == b[0][2]
    assert len(a) == len(b)
    for (oa, ra, xa), (ob, rb, xb) in zip(a, b):
        for key in oa:
            np.testing.assert_array_equal(oa[key], ob[key])
        assert ra == rb and xa == xb
    assert a[0][2] != c[0][2] or a[-1][2] != c[-1][2]


def test_show_context_appends_the_normalised_factors_to_globals(kernel_dir):
    hidden = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, contexts="test", **SMALL)
    shown = gym.make(
        "Esper/Spirals-v0", kernel_dir=kernel_dir, contexts="test", show_context=True, **SMALL
    )
    space = CONTEXTS["spirals"]
    g = len(GLOBAL_FEATURES)
    assert hidden.observation_space["globals"].shape == (g,)
    assert shown.observation_space["globals"].shape == (g + len(space.factors),)
    oh, ih = hidden.reset(seed=3)
    os_, is_ = shown.reset(seed=3)
    assert ih["context"] == is_["context"]
    np.testing.assert_array_equal(os_["globals"][:g], oh["globals"])
    extra = os_["globals"][g:]
    assert np.all((extra >= 0) & (extra <= 1))
    width = space.names.index("width")
    expected = math.log(is_["context"]["width"] / 8) / math.log(32 / 8)
    assert extra[width] == pytest.approx(expected)
    # Tamiyo sizes its global encoder from the space.
    policy = TamiyoPolicy.for_space(shown.observation_space).eval()
    assert policy.act(os_) in set(np.flatnonzero(os_["action_mask"]))


@pytest.mark.parametrize("show", [False, True])
def test_gymnasium_and_sb3_checkers_pass_with_contexts(show, kernel_dir):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(
        "Esper/Spirals-v0", kernel_dir=kernel_dir, contexts="train", show_context=show, **SMALL
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=False)
    assert [str(w.message) for w in caught] == []
    sb3_check_env(env.unwrapped, warn=False)


def test_datasets_are_loaded_once_per_dataset_kwargs(kernel_dir, monkeypatch):
    env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, contexts="train", **SMALL)
    calls = []
    real = esper_gym.tasks.Task.load_data
    monkeypatch.setattr(
        esper_gym.tasks.Task, "load_data", lambda self: calls.append(1) or real(self)
    )
    keys = set()
    for seed in range(12):
        _, info = env.reset(seed=seed)
        keys.add(json.dumps(info["context"]["fields"]["dataset_kwargs"], sort_keys=True))
    assert len(calls) == len(keys) < 12


# --- graphs traced from the host ----------------------------------------------------------------


def resnet_expected_edges(model) -> set[tuple[int, int]]:
    """The skip structure read off ResidualCNN's modules: down -> a -> b, and the block's input
    (the stage's down conv) skips to whatever follows the block."""
    index = {id(m): i for i, m in enumerate(kasmina_layers(model))}
    edges, prev_out = set(), None
    for stage in model.stages:
        down, a, b = (index[id(stage[k])] for k in ("down", "0a", "0b"))
        if prev_out is not None:
            edges |= {(i, down) for i in prev_out}
        edges |= {(down, a), (a, b)}
        prev_out = {down, b}  # the block's output is relu(x + b(...)): both reach the next layer
    fc = index[id(model.fc)]
    return edges | {(i, fc) for i in prev_out}


def test_resnet_observation_has_real_skip_edges(kernel_dir):
    env = gym.make("Esper/FashionMNISTResNet-v0", kernel_dir=kernel_dir, max_epochs=0.04)
    obs, _ = env.reset(seed=0)
    model = env.unwrapped.model
    real = obs["edge_attr"][:, 0] > 0.5
    edges = {tuple(map(int, e)) for e in obs["edges"][real]}
    assert edges == resnet_expected_edges(model)
    names = [layer.name for layer in env.unwrapped.layers]
    skips = {(names[i], names[j]) for i, j in edges if j != i + 1}
    assert skips == {("down0", "down1"), ("down1", "fc")}
    # The skip edge carries the stage's output tensor (its size, like the chain edge beside it).
    i = [tuple(map(int, e)) for e in obs["edges"]].index((0, 3))
    assert obs["edge_attr"][i, 1] == pytest.approx(math.log1p(4 * 14 * 14) / 10)


def test_fx_and_autograd_tracing_agree_on_every_shipped_host():
    for task in TASKS.values():
        input_shape, classes = DATASETS[task.dataset]
        model = build_host(
            task.host, input_shape, classes, 1, task.seed_config(), **dict(task.host_kwargs)
        )
        assert _fx_edges(model) == _autograd_edges(model, input_shape), task.name
    mlp = build_host("mlp", (2,), 5, 1, SeedConfig(), hidden=(4, 4, 4))
    assert data_flow_edges(mlp, (2,)) == [(0, 1), (1, 2), (2, 3)]


class ValueBranch(nn.Module):
    """fx cannot trace a branch on a tensor's value; the autograd fallback still finds the skip."""

    def __init__(self):
        super().__init__()
        self.a = KasminaLayer(nn.Linear(4, 4), 1, "a")
        self.b = KasminaLayer(nn.Linear(4, 4), 1, "b")
        self.c = KasminaLayer(nn.Linear(4, 3), 1, "c")

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() >= 0:  # always true after relu, but data-dependent for fx
            h = h + self.b(h)
        return self.c(h)


def test_untraceable_host_falls_back_to_the_autograd_graph():
    model = build_host(lambda *a, **k: ValueBranch(), (4,), 3, 1, SeedConfig())
    with pytest.raises(Exception):  # noqa: B017 (fx's own error types vary by version)
        _fx_edges(model)
    assert data_flow_edges(model, (4,)) == [(0, 1), (0, 2), (1, 2)]


def test_tamiyo_batches_the_residual_graph_like_to_pyg(kernel_dir):
    env = gym.make("Esper/FashionMNISTResNet-v0", kernel_dir=kernel_dir, max_epochs=0.04)
    spirals = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **SMALL)
    obs_r, _ = env.reset(seed=1)
    obs_s, _ = spirals.reset(seed=1)
    stacked = {k: np.stack([obs_r[k], obs_s[k]]) for k in obs_r}
    fast, ref = obs_to_batch(stacked), to_pyg(stacked)
    assert torch.equal(fast.edge_index, ref.edge_index)
    assert torch.equal(fast.x, ref.x) and torch.equal(fast.batch, ref.batch)
    assert fast.edge_index.shape[1] == 8 + 2  # 6 chain + 2 skip edges, then 2 chain edges
    assert {(0, 3), (3, 6)} <= set(map(tuple, fast.edge_index.t().tolist()))
    policy = TamiyoPolicy.for_space(env.observation_space).eval()
    logits, values = policy(fast)
    assert logits.shape == (2, env.action_space.n) and values.shape == (2,)
    assert policy.act(obs_r) in set(np.flatnonzero(obs_r["action_mask"]))


# --- dataset shifts -----------------------------------------------------------------------------


def test_shift_dataset_noise_and_class_subsets():
    data = make_spirals(n_train=2000, n_val=500, n_test=500, arms=5)
    noisy = shift_dataset(data, label_noise=0.2, shift_seed=1)
    flipped = (noisy.y_train != data.y_train).float().mean().item()
    assert 0.17 < flipped < 0.23
    assert torch.equal(noisy.y_val, data.y_val) and torch.equal(noisy.y_test, data.y_test)
    assert torch.equal(noisy.x_train, data.x_train)
    again = shift_dataset(data, label_noise=0.2, shift_seed=1)
    assert torch.equal(again.y_train, noisy.y_train)
    sub = shift_dataset(data, classes=3)
    assert sub.num_classes == 3 and int(sub.y_train.max()) == 2 and int(sub.y_test.max()) == 2
    assert len(sub.x_train) == int((data.y_train < 3).sum())
    blurred = shift_dataset(data, input_noise=0.5)
    assert 0.4 < (blurred.x_val - data.x_val).std().item() < 0.6
    with pytest.raises(ValueError, match=r"classes=7 must be an int in \[2, 5\]"):
        shift_dataset(data, classes=7)
    with pytest.raises(ValueError, match=r"label_noise=1.5 must be in \[0, 1\)"):
        shift_dataset(data, label_noise=1.5)


# --- decision metrics ---------------------------------------------------------------------------


def seed(outcome, contribution, params=100, step=0, progress=0.0, layer=0):
    return {"outcome": outcome, "contribution": contribution, "params": params, "step": step,
            "progress": progress, "layer": layer, "blueprint": "residual_mlp"}  # fmt: skip


def test_decision_metrics_from_seed_records():
    m = decision_metrics(
        [
            seed("CULLED", 0.05, step=1, progress=0.1),  # culled: false positive even if it helped
            seed("FOSSILIZED", 0.02, step=3, progress=0.3, layer=1),  # useful
            seed("FOSSILIZED", 0.0, step=4, progress=0.4),  # no gain: false positive
            seed("PROBATION", 0.01, step=5, progress=0.5),  # unfinished: neither
        ]
    )
    assert m["germinations"] == 4 and m["useful_seeds"] == 1 and m["false_positives"] == 2
    assert m["decision_quality"] == 0.25 and m["false_positive_rate"] == 0.5
    assert m["first_useful_progress"] == 0.3
    assert m["plan"].split(";")[1] == "3:1:residual_mlp"
    none = decision_metrics([])
    assert none["germinations"] == 0 and math.isnan(none["decision_quality"])


def test_decision_summary_pools_germinations_and_measures_plan_entropy():
    rows = []
    for agent, plans in (("fixed", ["0:1:a"] * 4), ("reactive", ["0:1:a", "2:0:b", "", "0:1:a"])):
        for i, plan in enumerate(plans):
            n = len(plan.split(";")) if plan else 0
            rows.append(
                {"task": "t", "agent": agent, "germinations": n, "useful_seeds": n * (i % 2),
                 "false_positives": n * (1 - i % 2), "first_useful_progress":
                 0.1 * i if n and i % 2 else math.nan, "context_index": i, "plan": plan}
            )  # fmt: skip
    out = decision_summary(pd.DataFrame(rows)).set_index("agent")
    assert out.at["fixed", "distinct_plans"] == 1 and out.at["fixed", "plan_entropy"] == 0
    assert out.at["fixed", "decision_quality"] == 0.5
    assert out.at["reactive", "distinct_plans"] == 3
    assert out.at["reactive", "plan_entropy"] == pytest.approx(1.5)
    assert out.at["reactive", "germinations"] == 3
    assert out.at["reactive", "first_useful_progress"] == pytest.approx(0.2)
    assert out.at["reactive", "distinct_contexts"] == 4


def test_env_records_each_germination_and_its_end(kernel_dir):
    env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **SMALL)
    layout = env.unwrapped.layout
    env.reset(seed=0)
    plan = [
        layout.encode(Action(GERMINATE, 1, 0, 0)),
        layout.encode(Action(GERMINATE, 0, 1, 0)),
        layout.encode(Action(CULL, 0, 1)),
        layout.encode(Action(ADVANCE, 1, 0)),
        0,
        0,
    ]
    for a in plan:
        _, _, term, _, info = env.step(a)
    assert term
    first, second = info["seeds"]
    assert (first["step"], first["layer_name"], first["slot"]) == (0, "fc1", 0)
    assert second["outcome"] == "CULLED" and second["step"] == 1 and second["params"] > 0
    slot = env.unwrapped.layers[1].slots[0]
    assert first["outcome"] == slot.state.name and first["contribution"] == slot.contribution
