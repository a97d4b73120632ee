"""Esper/SpiralsBudget-v0: the budget-conscious benchmark (rent 0.5 shown in the globals, hidden
factors, the same decisions whatever the budget)."""

import math

import gymnasium as gym
import numpy as np
import pytest

import esper_gym
from esper_gym.contexts import apply_context
from esper_gym.observation import GLOBAL_FEATURES
from esper_gym.tasks import TASKS, get_task
from tests.conftest import SMALL

ID = "Esper/SpiralsBudget-v0"
PACE = "Esper/SpiralsPace-v0"
# Small enough for a test; the decision interval still follows the epochs.
TINY = {"dataset_kwargs": {"n_train": 1024, "n_val": 256, "n_test": 256}, "eval_size": 256}


def test_the_id_makes_resets_and_steps(kernel_dir):
    assert ID in esper_gym.ENV_IDS and TASKS["spirals_budget"].gym_id == ID
    env = gym.make(ID, kernel_dir=kernel_dir, contexts="test", **TINY)
    obs, info = env.reset(seed=0)
    assert info["context"]["split"] == "test"
    assert env.observation_space.contains(obs)
    obs, reward, *_ = env.step(0)
    assert env.observation_space.contains(obs) and math.isfinite(reward)
    assert env.unwrapped.reward_fn.weights.param_cost == 0.5  # the task's own weights
    assert env.unwrapped.reward_fn.weights.latency_cost == 0.05  # MAC cost at its default


def test_train_and_test_contexts_are_disjoint_and_large_enough():
    space = TASKS["spirals_budget"].context_space
    train = {tuple(sorted(c.items())) for c in space.contexts("train")}
    test = {tuple(sorted(c.items())) for c in space.contexts("test")}
    assert not train & test and len(test) >= 24 and len(train) >= 48
    hidden = {"lr_scale", "epochs_scale", "arms", "noise", "label_noise"}
    assert hidden <= set(space.names)


def test_the_rent_global_is_shown_only_on_the_budget_tasks(kernel_dir):
    n = len(GLOBAL_FEATURES)
    env = gym.make(ID, kernel_dir=kernel_dir, contexts="train", **TINY)
    obs, _ = env.reset(seed=1)
    assert obs["globals"].shape == (n + 1,) and obs["globals"][n] == pytest.approx(0.5)
    # The user's rent is what the observation shows.
    mine = gym.make(ID, kernel_dir=kernel_dir, reward_weights={"param_cost": 0.2}, **TINY)
    assert mine.reset(seed=1)[0]["globals"][n] == pytest.approx(0.2)
    # With the context shown, the rent stays at its index and the context follows it.
    shown = gym.make(ID, kernel_dir=kernel_dir, contexts="train", show_context=True, **TINY)
    g = shown.reset(seed=1)[0]["globals"]
    assert g.shape == (n + 1 + 6,) and g[n] == pytest.approx(0.5)
    for env_id in sorted(set(esper_gym.ENV_IDS) - {ID, PACE}):
        if "Spirals" in env_id:  # the others load data; their tasks are checked below
            obs, _ = gym.make(env_id, kernel_dir=kernel_dir, **SMALL).reset(seed=0)
            assert obs["globals"].shape == (n,), env_id
    budget = [TASKS["spirals_budget"], TASKS["spirals_pace"]]
    assert [t for t in TASKS.values() if t.show_rent] == budget
    assert [t for t in TASKS.values() if t.reward_weights] == budget


def test_the_decision_count_is_the_same_at_every_budget():
    base = TASKS["spirals_budget"]
    n_train = 4096  # the spirals loader's default, which no factor changes
    counts = {}
    for context in base.context_space.grid():
        task = apply_context(base, context)
        counts.setdefault(context["epochs_scale"], set()).add(task.episode_steps(n_train))
    assert set(counts) == {0.3, 0.6, 1.0}
    assert {n for c in counts.values() for n in c} == {32}
    # ... and on the env, at two budgets (a quarter of the data: 8 decisions in both).
    steps = []
    for scale in (0.3, 1.0):
        index = next(
            i
            for i, c in enumerate(base.context_space.contexts("train"))
            if c["epochs_scale"] == scale
        )
        env = gym.make(ID, contexts="train", **TINY)
        obs, _ = env.reset(seed=0, options={"context": index})
        obs, *_ = env.step(0)
        steps.append((env.unwrapped.episode_steps, obs["globals"][0]))  # (count, progress)
    assert steps == [(8, 1 / 8), (8, 1 / 8)]


def test_bad_task_preferences_are_refused():
    with pytest.raises(ValueError, match="reward_weights"):
        get_task("spirals", reward_weights={"param_cost": -1.0})
    with pytest.raises(ValueError, match="reward_weights"):
        get_task("spirals", reward_weights={"rent": 1.0})
    with pytest.raises(ValueError, match="show_rent"):
        get_task("spirals", show_rent=1)
    assert np.isclose(get_task("spirals", show_rent=True).decision_interval, 8)
