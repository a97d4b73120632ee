"""ConcatVectorEnv and training one Tamiyo policy on several tasks at once."""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest
import torch

import esper_gym  # noqa: F401  (registers the ids)
from esper_gym.agents.tamiyo import PPOConfig, load_checkpoint, make_vector_env, train
from esper_gym.multitask import ConcatVectorEnv, merge_infos

SMALL = dict(max_epochs=1, decision_interval=10, eval_size=256)


def spirals(tmp_path, **kw):
    kwargs = {**SMALL, **kw}
    return functools.partial(gym.make, "Esper/Spirals-v0", kernel_dir=tmp_path / "k", **kwargs)


def test_copy_i_of_the_concatenation_is_copy_i_of_its_own_vector_env(tmp_path):
    makers = [
        spirals(tmp_path),
        spirals(tmp_path, max_epochs=2, host_kwargs={"hidden": [16, 16, 16]}),
    ]
    parts = [make_vector_env(m, 2) for m in makers]
    concat = ConcatVectorEnv([make_vector_env(m, 2) for m in makers])
    assert concat.num_envs == 4 and concat.offsets == [0, 2]
    obs, _ = concat.reset(seed=5)
    alone = [parts[0].reset(seed=5)[0], parts[1].reset(seed=7)[0]]  # seed + offset
    for key in obs:
        assert np.array_equal(obs[key], np.concatenate([a[key] for a in alone]))
    rng = np.random.default_rng(0)
    for _ in range(8):
        mask = obs["action_mask"].astype(bool)
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in mask])
        obs, reward, term, trunc, _ = concat.step(actions)
        steps = [parts[0].step(actions[:2]), parts[1].step(actions[2:])]
        for key in obs:
            assert np.array_equal(obs[key], np.concatenate([s[0][key] for s in steps])), key
        assert np.allclose(reward, np.concatenate([s[1] for s in steps]))
        assert np.array_equal(term, np.concatenate([s[2] for s in steps]))
        assert np.array_equal(trunc, np.concatenate([s[3] for s in steps]))
    concat.close()


def test_merge_infos_keeps_keys_that_only_some_sub_envs_have():
    infos = [
        {"a": np.array([1.0, 2.0]), "_a": np.array([True, True])},
        {"b": np.array([None, {"x": 1}], object), "_b": np.array([False, True])},
    ]
    merged = merge_infos(infos, [2, 2])
    assert merged["a"].tolist() == [1.0, 2.0, 0.0, 0.0]
    assert merged["_a"].tolist() == [True, True, False, False]
    assert merged["b"].tolist() == [None, None, None, {"x": 1}]
    assert merged["_b"].tolist() == [False, False, False, True]


def test_spaces_that_do_not_stack_are_refused(tmp_path):
    a = make_vector_env(spirals(tmp_path), 1)
    b = make_vector_env(spirals(tmp_path, blueprints=("residual_mlp", "low_rank")), 1)
    with pytest.raises(ValueError, match="vector env 1 has observation space"):
        ConcatVectorEnv([a, b])


def test_one_policy_trains_on_two_tasks_each_copy_imitating_its_own_task(tmp_path):
    short = dict(max_epochs=0.5, decision_interval=50, eval_size=256)  # 4-5 steps an episode
    fashion = functools.partial(
        gym.make, "Esper/FashionMNIST-v0", kernel_dir=tmp_path / "k", **short
    )
    logs = []
    cfg = PPOConfig(
        total_steps=42,  # 10 imitation steps and one update of 2 x 16
        num_envs=1,
        rollout_steps=16,
        update_epochs=1,
        teacher="schedule",
        imitation_episodes=1,  # and one per copy: the fashion_mnist copy's episode too
        seed=0,
    )
    ckpt = tmp_path / "mix.pt"
    train(
        cfg,
        [spirals(tmp_path), fashion],
        log=lambda m, s: logs.append((s, m)),
        checkpoint_path=ckpt,
    )
    saved = load_checkpoint(ckpt)
    assert saved.env["task"] == "spirals+fashion_mnist"
    assert saved.env["tasks"] == ["spirals", "fashion_mnist"]
    (imitated, first), (updated, second) = logs  # the warm start, then one PPO update
    assert first["imitation/episodes"] >= 2 and imitated == first["imitation/steps"] >= 4
    assert updated - imitated == 2 * 16  # one copy of each task, 16 steps each
    assert second["actions/wait"] + second["actions/germinate"] <= 32
    # Each task's own mean return, for the tasks whose episodes ended (spirals' are shorter).
    per_task = {k for k in second if k.startswith("charts/episodic_return/")}
    assert "charts/episodic_return/spirals" in per_task
    assert per_task <= {f"charts/episodic_return/{t}" for t in ("spirals", "fashion_mnist")}
    torch.load(ckpt, weights_only=True)


def test_tasks_with_different_blueprint_libraries_are_refused(tmp_path):
    faulty = functools.partial(gym.make, "Esper/SpiralsFaulty-v0", kernel_dir=tmp_path / "k")
    cfg = PPOConfig(total_steps=8, num_envs=1, rollout_steps=8, teacher=None)
    with pytest.raises(ValueError, match="task 'spirals_faulty' has the blueprint library"):
        train(cfg, [spirals(tmp_path), faulty])
