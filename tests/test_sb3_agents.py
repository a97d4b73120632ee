"""SB3 PPO and MaskablePPO with the graph features extractor, on the real env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import esper_gym  # noqa: F401  (registers the ids)
from esper_gym.agents.sb3 import (
    GraphFeaturesExtractor,
    ObservedActionMask,
    make_maskable_ppo,
    make_ppo,
)
from esper_gym.agents.tamiyo import GraphEncoder, obs_to_batch

torch.set_num_threads(1)
SMALL_SPIRALS = dict(max_epochs=1, decision_interval=10, eval_size=256)
PPO_KW = dict(n_steps=64, batch_size=32, n_epochs=2, seed=0, verbose=0)
STEPS = 192


class AssertValidActions(gym.Wrapper):
    """Fails the run if the agent takes an action the last observation masked (with
    `strict=False` it only counts them)."""

    def __init__(self, env, strict: bool = True):
        super().__init__(env)
        self.strict, self.steps, self.invalid = strict, 0, 0

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.mask = obs["action_mask"].copy()
        return obs, info

    def step(self, action):
        valid = bool(self.mask[int(action)])
        assert valid or not self.strict, f"masked action {int(action)} taken"
        obs, reward, terminated, truncated, info = self.env.step(action)
        assert info.get("invalid_action", not valid) == (not valid)  # the env agrees
        self.invalid += int(not valid)
        self.mask = obs["action_mask"].copy()
        self.steps += 1
        return obs, reward, terminated, truncated, info


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")  # shared: each blueprint compiles once per module


def small_env(kernel_dir):
    return gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **SMALL_SPIRALS)


def test_extractor_reuses_tamiyos_trunk_on_float_observations(kernel_dir):
    env = small_env(kernel_dir)
    extractor = GraphFeaturesExtractor(env.observation_space, hidden=32, layers=2).eval()
    assert isinstance(extractor.encoder, GraphEncoder)
    obs, _ = env.reset(seed=0)
    batched = {k: torch.as_tensor(np.stack([v, v])).float() for k, v in obs.items()}
    features = extractor(batched)
    assert features.shape == (2, 32) and extractor.features_dim == 32
    _, context = extractor.encoder(obs_to_batch(obs))  # the native-dtype observation
    torch.testing.assert_close(features[0], context[0])
    torch.testing.assert_close(features[1], context[0])


def test_sb3_ppo_runs_on_spirals(kernel_dir):
    env = AssertValidActions(small_env(kernel_dir), strict=False)  # plain PPO ignores masks
    model = make_ppo(env, **PPO_KW)
    assert isinstance(model.policy.features_extractor, GraphFeaturesExtractor)
    model.learn(STEPS)
    assert model.num_timesteps == STEPS and env.steps == STEPS
    action, _ = model.predict(env.reset(seed=1)[0], deterministic=True)
    assert 0 <= int(action) < env.action_space.n


def test_maskable_ppo_never_takes_a_masked_action(kernel_dir):
    env = AssertValidActions(small_env(kernel_dir))
    model = make_maskable_ppo(env, **PPO_KW)
    model.learn(STEPS)
    assert model.num_timesteps == STEPS and env.steps == STEPS


def test_maskable_ppo_takes_masks_from_observations_when_the_env_has_no_action_masks():
    from tests.test_tamiyo import GraphBandit  # masks the action blocks of absent nodes

    env = AssertValidActions(GraphBandit())
    model = make_maskable_ppo(
        env, hidden=16, layers=1, n_steps=64, batch_size=32, n_epochs=1, seed=0, verbose=0
    )
    wrapped = model.get_env().envs[0]
    while not isinstance(wrapped, ObservedActionMask):
        wrapped = wrapped.env  # raises AttributeError at the bottom if the wrapper is missing
    model.learn(128)
    assert env.steps == 128
