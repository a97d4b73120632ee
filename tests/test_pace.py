"""Esper/SpiralsPace-v0: the rent of spirals_budget, one budget, and a hidden learning rate that
the run shows as its pace and that decides whether growth pays."""

import dataclasses

import gymnasium as gym
import numpy as np
import pytest

import esper_gym
from esper_gym.agents.baselines import ScheduleAgent
from esper_gym.contexts import apply_context
from esper_gym.env import MorphogeneticEnv
from esper_gym.episode import play_episode
from esper_gym.observation import GLOBAL_FEATURES
from esper_gym.tasks import TASKS

ID = "Esper/SpiralsPace-v0"
VAL_ACC = GLOBAL_FEATURES.index("val_acc")


def test_the_id_its_rent_and_its_contexts():
    assert ID in esper_gym.ENV_IDS and TASKS["spirals_pace"].gym_id == ID
    env = gym.make(ID, contexts="test")
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and info["context"]["split"] == "test"
    assert obs["globals"][len(GLOBAL_FEATURES)] == pytest.approx(0.5)  # the rent, shown
    space = TASKS["spirals_pace"].context_space
    train = {tuple(sorted(c.items())) for c in space.contexts("train")}
    test = {tuple(sorted(c.items())) for c in space.contexts("test")}
    assert not train & test and (len(train), len(test)) == (40, 24)
    # One budget: every context has the same 32 decisions.
    steps = {apply_context(TASKS["spirals_pace"], c).episode_steps(4096) for c in space.grid()}
    assert steps == {32}


def _env(**context):
    task = apply_context(dataclasses.replace(TASKS["spirals_pace"], context_space=None), context)
    return MorphogeneticEnv(task=task)


def test_the_learning_rate_is_hidden_at_step_0_and_shows_in_the_run():
    slow, fast = _env(width=24, lr_scale=0.1, arms=3), _env(width=24, lr_scale=2.0, arms=3)
    first = [env.reset(seed=0)[0] for env in (slow, fast)]
    for key in ("globals", "nodes", "action_mask"):
        np.testing.assert_array_equal(first[0][key], first[1][key])
    for _ in range(8):  # a quarter of the run of NoOp: the pace shows (0.42 against 0.69)
        obs = [env.step(0)[0] for env in (slow, fast)]
    assert obs[1]["globals"][VAL_ACC] > obs[0]["globals"][VAL_ACC] + 0.2


def test_whether_growth_pays_turns_on_the_hidden_learning_rate():
    """Two germinations at progress 0.25, against NoOp on the same seed: they pay where the host
    learns slowly and lose where it is fast (measured +2.3 and -2.1 over 4 seeds)."""
    plan = ({"at": 0.25, "blueprint": "residual_mlp", "layer": "next"},) * 2
    gains = {}
    for lr_scale in (0.1, 2.0):
        env = _env(width=24, lr_scale=lr_scale, arms=3)
        returns = []
        for p in ((), plan):
            agent = ScheduleAgent(env.observation_space, env.action_space, p, env.task.blueprints)
            returns.append(play_episode(env, agent.act, 0, None)[0]["return"])
        gains[lr_scale] = returns[1] - returns[0]
    assert gains[0.1] > 1.0 and gains[2.0] < -1.0, gains


def test_the_committed_gate_policy_reads_the_hidden_learning_rate():
    """Tamiyo behind the schedule gate (results/tamiyo_pace, seed 0) on two held-out test
    contexts that differ only in the learning rate, hidden at step 0, with the same sampling
    seed: it grows where the host learns slowly and not where it is fast."""
    import pathlib

    from esper_gym.agents.gate import ScheduleGate
    from esper_gym.agents.tamiyo import load_checkpoint

    path = pathlib.Path(__file__).parents[1] / "results/tamiyo_pace/checkpoints/tamiyo_seed0.pt"
    test = TASKS["spirals_pace"].context_space.contexts("test")
    grown = {}
    for lr_scale in (0.15, 1.0):
        index = test.index({"width": 24, "lr_scale": lr_scale, "arms": 3})  # never trained on
        env = ScheduleGate(MorphogeneticEnv(task="spirals_pace", contexts="test"), "drop")
        act = load_checkpoint(path, env=env).policy.actor(greedy=False, seed=1)
        metrics, _ = play_episode(env, act, 1, {"context": index})
        grown[lr_scale] = metrics["germinations"]
    assert grown == {0.15: 2, 1.0: 0}


def test_the_committed_count_gate_policy_sizes_its_growth_by_the_hidden_learning_rate():
    """Tamiyo behind the count gate (results/tamiyo_pace/counts, seed 1, greedy: its decoding)
    on three held-out test contexts that differ only in the learning rate, hidden at step 0,
    with the same seed: three seeds where the host learns slowest, two, then none."""
    import pathlib

    from esper_gym.agents.gate import ScheduleGate
    from esper_gym.agents.tamiyo import load_checkpoint

    root = pathlib.Path(__file__).parents[1]
    path = root / "results/tamiyo_pace/counts/steps294k/checkpoints/tamiyo_seed1.pt"
    test = TASKS["spirals_pace"].context_space.contexts("test")
    grown = {}
    for lr_scale in (0.15, 0.5, 0.7):
        index = test.index({"width": 12, "lr_scale": lr_scale, "arms": 3})  # never trained on
        env = ScheduleGate(MorphogeneticEnv(task="spirals_pace", contexts="test"), "counts")
        act = load_checkpoint(path, env=env).policy.actor(greedy=True, seed=1)
        metrics, _ = play_episode(env, act, 1, {"context": index})
        grown[lr_scale] = metrics["germinations"]
    assert grown == {0.15: 3, 0.5: 2, 0.7: 0}
