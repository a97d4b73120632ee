"""Tamiyo's levers for small decisions (issue 26 item 4): gamma = 1 with the warm start,
group-relative advantages with common random numbers, the anchor to the schedule."""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest
import torch

from esper_gym.agents.tamiyo import PPOConfig, train
from esper_gym.agents.tamiyo.ppo import (
    anchor_kl,
    build_vector_env,
    group_seeds,
    rloo_advantages,
)
from esper_gym.observation import GLOBAL_FEATURES

torch.set_num_threads(1)

SMALL_SPIRALS = dict(max_epochs=1, decision_interval=10, eval_size=256)  # 4-step episodes


def spirals(tmp_path):
    import esper_gym  # noqa: F401  (registers the ids)

    return functools.partial(
        gym.make, "Esper/Spirals-v0", kernel_dir=tmp_path / "kernels", **SMALL_SPIRALS
    )


def test_progress_is_a_global_and_time_remaining_is_one_minus_it():
    # No new feature: progress (optimizer steps done / budget) is the first global, and time
    # remaining is 1 - progress, a linear function of it the policy's globals MLP already has.
    assert GLOBAL_FEATURES[0] == "progress"


def test_gamma_one_with_the_warm_start_trains_end_to_end(tmp_path):
    """gamma = 1 (the undiscounted return that is scored): imitation's critic targets, GAE with
    lambda < 1 and the PPO update all stay finite."""
    logs = []
    cfg = PPOConfig(
        total_steps=24 + 64, num_envs=2, rollout_steps=32, update_epochs=2, gamma=1.0,
        gae_lambda=0.95, teacher="schedule", imitation_episodes=6, seed=0,
    )  # fmt: skip
    train(cfg, spirals(tmp_path), log=lambda m, s: logs.append((s, m)))
    assert len(logs) == 2 and "imitation/loss" in logs[0][1]
    for _, metrics in logs:
        assert all(np.isfinite(v) for v in metrics.values() if v is not None), metrics


def test_group_seeds_share_one_seed_per_group():
    assert group_seeds(10, 4, 0) == 10  # copy i gets 10 + i, as before
    assert group_seeds(10, 6, 3) == [10, 10, 10, 11, 11, 11]


def test_copies_of_a_group_start_identical(tmp_path):
    envs = build_vector_env([spirals(tmp_path)], 4)
    obs, _ = envs.reset(seed=group_seeds(3, 4, 2))
    for k, v in obs.items():
        np.testing.assert_array_equal(v[0], v[1], err_msg=k)
        np.testing.assert_array_equal(v[2], v[3], err_msg=k)
    assert any(not np.array_equal(v[0], v[2]) for v in obs.values())  # groups differ
    # Different decisions, then the autoreset: the group's next episode is shared too.
    rng, done = np.random.default_rng(0), np.zeros(4, bool)
    while not done.any():
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in obs["action_mask"]])
        obs, _, terminated, truncated, _ = envs.step(actions)
        done = terminated | truncated
    assert done.all()
    for k, v in obs.items():
        np.testing.assert_array_equal(v[0], v[1], err_msg=k)
    envs.close()


def test_rloo_advantages_sum_to_zero_within_a_group_and_skip_cut_episodes():
    torch.manual_seed(0)
    n_steps, n_envs, group = 8, 6, 3
    rewards = torch.randn(n_steps, n_envs)
    dones = torch.zeros(n_steps, n_envs)
    dones[4] = 1  # episodes of 4 steps: [0, 4) and [4, 8)
    fresh = torch.ones(n_envs)
    fresh[3:] = 0  # the second group's first episode began in an earlier rollout
    adv, valid = rloo_advantages(rewards, dones, fresh, torch.ones(n_envs), group)
    assert valid[:, :3].all() and not valid[:4, 3:].any() and valid[4:, 3:].all()
    for g in (0, 3):
        for start in (0, 4):
            per_episode = adv[start, g : g + group]
            assert per_episode.sum().abs() < 1e-5
            assert (adv[start : start + 4, g : g + group] == per_episode).all()  # every step
    returns = rewards[:4, :3].sum(0)
    assert adv[0, 0] == pytest.approx(float(returns[0] - returns[1:].mean()), abs=1e-5)
    assert (adv[:4, 3:] == 0).all()


def test_group_advantages_train_end_to_end(tmp_path):
    logs = []
    cfg = PPOConfig(
        total_steps=128, num_envs=4, rollout_steps=16, update_epochs=1, gamma=1.0,
        group_advantages=2, seed=0,
    )  # fmt: skip
    train(cfg, spirals(tmp_path), log=lambda m, s: logs.append((s, m)))
    assert [m["diagnostics/group_valid"] for _, m in logs] == [1.0, 1.0]  # 4 whole episodes
    assert all(np.isfinite(m["losses/policy"]) for _, m in logs)
    with pytest.raises(ValueError, match="must divide num_envs"):
        PPOConfig(num_envs=4, group_advantages=3)
    with pytest.raises(ValueError, match="group size >= 2"):
        PPOConfig(group_advantages=1)


def test_anchor_kl_is_positive_on_disagreement_and_zero_on_the_target():
    mask = torch.tensor([[True, True, True, False]])
    target = torch.tensor([1])
    q = torch.tensor([[0.05, 0.85 + 0.05, 0.05, 0.0]])  # one-hot smoothed over the 3 valid
    logits = q.clamp_min(1e-30).log().masked_fill(~mask, -1e9)
    assert anchor_kl(logits, target, mask, 0.15) == pytest.approx(0.0, abs=1e-5)
    disagree = torch.tensor([[5.0, -5.0, 0.0, -1e9]])
    assert anchor_kl(disagree, target, mask, 0.15) > 1.0


def test_anchor_term_in_training_decays_and_is_absent_at_coefficient_zero(tmp_path):
    logs = []
    cfg = PPOConfig(
        total_steps=24 + 128, num_envs=2, rollout_steps=32, update_epochs=1,
        teacher="schedule", imitation_episodes=6, anchor_coef=2.0, seed=0,
    )  # fmt: skip
    train(cfg, spirals(tmp_path), log=lambda m, s: logs.append((s, m)))
    ppo = [m for _, m in logs if "losses/policy" in m]
    coefs = [m["charts/anchor_coef"] for m in ppo]
    assert coefs[0] > coefs[1] > 0 and coefs[0] <= 2.0  # linear decay to 0 at the last step
    assert all(m["losses/anchor"] > 0 for m in ppo)  # a sampling policy is not the one-hot
    logs.clear()
    train(replace_coef(cfg, 0.0), spirals(tmp_path), log=lambda m, s: logs.append((s, m)))
    assert not any("losses/anchor" in m or "charts/anchor_coef" in m for _, m in logs)
    with pytest.raises(ValueError, match="set teacher"):
        PPOConfig(anchor_coef=1.0)


def replace_coef(cfg: PPOConfig, coef: float) -> PPOConfig:
    from dataclasses import replace

    return replace(cfg, anchor_coef=coef)
