"""SB3 PPO and MaskablePPO with the graph features extractor, on the real env."""

from __future__ import annotations

import contextlib

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


# --- checkpoints: SB3 archives from a shared folder must not run code ------------------------


class _Payload:
    """Unpickling it creates `marker`: stands for any code a hostile archive could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite(src, dst, edit_data=None, extra=()):
    """Copy the SB3 archive `src` to `dst`, with `edit_data(data_json_dict)` applied and the
    (name, bytes) members of `extra` appended."""
    import json
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            blob = zin.read(info.filename)
            if info.filename == "data" and edit_data is not None:
                data = json.loads(blob)
                edit_data(data)
                blob = json.dumps(data).encode()
            zout.writestr(info, blob)
        for name, blob in extra:
            zout.writestr(name, blob)


def _pickled(obj) -> dict:
    import base64

    import cloudpickle

    return {":serialized:": base64.b64encode(cloudpickle.dumps(obj)).decode()}


@pytest.fixture(scope="module")
def sb3_checkpoint(kernel_dir, tmp_path_factory):
    from esper_gym.agents.sb3 import save_model
    from esper_gym.agents.tamiyo import env_record

    env = small_env(kernel_dir)
    model = make_maskable_ppo(env, hidden=16, layers=1, n_steps=16, batch_size=16, seed=0)
    model.learn(16)  # after learn the archive also pickles _last_obs and the episode buffers
    path = tmp_path_factory.mktemp("sb3") / "checkpoint.zip"
    save_model(model, path, env_record(env))
    return path, model


def _fresh(kernel_dir):
    from esper_gym.agents.tamiyo import env_record

    env = small_env(kernel_dir)
    return make_maskable_ppo(
        env, hidden=16, layers=1, n_steps=16, batch_size=16, seed=1
    ), env_record(env)


def test_payload_is_live_when_unpickled(tmp_path):
    import base64

    import cloudpickle

    marker = tmp_path / "ran"
    cloudpickle.loads(base64.b64decode(_pickled(_Payload(marker))[":serialized:"]))
    assert marker.exists()  # so "marker absent" below means "not unpickled"


def test_safe_load_resumes_our_own_checkpoint_without_unpickling(
    sb3_checkpoint, kernel_dir, monkeypatch
):
    import stable_baselines3.common.save_util as save_util

    from esper_gym.agents.sb3 import load_model

    path, trained = sb3_checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("cloudpickle.loads called while loading a checkpoint")

    monkeypatch.setattr(save_util.cloudpickle, "loads", refuse)
    fresh, record = _fresh(kernel_dir)
    model = load_model(path, fresh, fresh.get_env(), record)
    assert model.num_timesteps == 16
    for name, tensor in trained.policy.state_dict().items():
        assert torch.equal(tensor, model.policy.state_dict()[name]), name
    model.learn(16, reset_num_timesteps=False)  # and it trains on
    assert model.num_timesteps == 32


@pytest.mark.parametrize("key", ["lr_schedule", "policy_class", "_last_obs"])
def test_payload_in_an_entry_sb3_pickles_is_neutralised(sb3_checkpoint, kernel_dir, tmp_path, key):
    from esper_gym.agents.sb3 import load_model

    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.zip"
    _rewrite(sb3_checkpoint[0], hostile, lambda d: d.update({key: _pickled(_Payload(marker))}))
    fresh, record = _fresh(kernel_dir)
    model = load_model(hostile, fresh, fresh.get_env(), record)
    assert not marker.exists()
    assert getattr(model, key) is not None or key == "_last_obs"
    assert model.num_timesteps == 16


def test_payload_in_any_other_entry_is_refused(sb3_checkpoint, kernel_dir, tmp_path):
    from esper_gym.agents.sb3 import UnsafeCheckpointError, load_model

    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.zip"
    _rewrite(sb3_checkpoint[0], hostile, lambda d: d.update({"gamma": _pickled(_Payload(marker))}))
    fresh, record = _fresh(kernel_dir)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_model(hostile, fresh, fresh.get_env(), record)
    assert "entries ['gamma'] are pickled" in str(err.value)
    assert not marker.exists()
    # SB3's own load runs it: the attack this guards against.
    with contextlib.suppress(Exception):
        type(fresh).load(hostile, env=fresh.get_env())
    assert marker.exists()


def test_unexpected_and_duplicated_members_are_refused(sb3_checkpoint, kernel_dir, tmp_path):
    import warnings

    from esper_gym.agents.sb3 import UnsafeCheckpointError, load_model

    fresh, record = _fresh(kernel_dir)
    extra = tmp_path / "extra.zip"
    _rewrite(sb3_checkpoint[0], extra, extra=[("evil.pth", b"x")])
    with pytest.raises(UnsafeCheckpointError, match=r"unexpected archive members \['evil.pth'\]"):
        load_model(extra, fresh, fresh.get_env(), record)
    dup = tmp_path / "dup.zip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is told to write
        _rewrite(sb3_checkpoint[0], dup, extra=[("data", b"{}")])
    with pytest.raises(UnsafeCheckpointError, match=r"duplicated \['data'\]"):
        load_model(dup, fresh, fresh.get_env(), record)


def test_checkpoint_of_another_task_is_refused_naming_it(sb3_checkpoint, kernel_dir):
    from esper_gym.agents.sb3 import load_model

    fresh, record = _fresh(kernel_dir)
    other = {**record, "task": "fashion_mnist"}
    with pytest.raises(ValueError) as err:
        load_model(sb3_checkpoint[0], fresh, fresh.get_env(), other)
    assert "is for task 'spirals'; this run's task is 'fashion_mnist'" in str(err.value)
