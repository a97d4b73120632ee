"""The observation contract read back: ObsView, the layout from shapes, the globals by name."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import esper_gym  # noqa: F401  (registers the ids)
from esper_gym.actions import ADVANCE, GERMINATE, Action
from esper_gym.agents import baselines
from esper_gym.kasmina import SeedState
from esper_gym.observation import (
    GLOBAL_FEATURES,
    MEASURED_GLOBAL_FEATURES,
    ObsView,
    global_row,
    layout_from_shapes,
    layout_from_spaces,
)
from tests.conftest import SMALL


def _germinated_obs(kernel_dir):
    """A spirals episode two steps in: a seed in layer 1 germinated, then advanced."""
    env = gym.make("Esper/Spirals-v0", **SMALL, kernel_dir=kernel_dir)
    env.reset(seed=0)
    lay = env.unwrapped.layout
    env.step(lay.encode(Action(GERMINATE, 1, 0, 0)))
    obs, *_ = env.step(lay.encode(Action(ADVANCE, 1, 0)))
    return env, obs


def test_view_reads_what_the_env_holds(kernel_dir):
    env, obs = _germinated_obs(kernel_dir)
    base, view = env.unwrapped, ObsView(obs)
    assert view.layout == base.layout == layout_from_spaces(env.observation_space, env.action_space)
    assert view.n_nodes == len(base.layers)
    for n, layer in enumerate(base.layers):
        for s, slot in enumerate(layer.slots):
            assert view.state(n, s) == slot.state
    assert view.state(1, 0) == SeedState.TRAINING
    assert view.glob("val_acc") == np.float32(base.val_acc)
    assert view.glob("progress") == obs["globals"][GLOBAL_FEATURES.index("progress")]
    assert view.node("depth")[0] == 0.0


def test_a_batched_view_reads_each_row_as_a_single_one(kernel_dir):
    env, obs = _germinated_obs(kernel_dir)
    first, _ = env.reset(seed=1)
    batch = {k: np.stack([first[k], obs[k]]) for k in obs}
    view, one = ObsView(batch), ObsView(obs)
    assert view.layout == one.layout
    assert view.n_nodes.tolist() == [ObsView(first).n_nodes, one.n_nodes]
    assert view.states.shape == (2, one.layout.max_nodes, one.layout.slots)
    assert np.array_equal(view.states[1], one.states)
    assert view.glob("progress").tolist() == [0.0, one.glob("progress")]
    assert np.array_equal(view.slot(0, "alpha")[1], one.slot(0, "alpha"))
    tensors = ObsView({k: torch.as_tensor(v) for k, v in batch.items()})
    assert tensors.states.tolist() == view.states.tolist()
    assert tensors.node("eff_rank").tolist() == view.node("eff_rank").tolist()


def test_layout_functions_keep_their_old_home():
    assert baselines.layout_from_spaces is layout_from_spaces
    assert baselines.layout_from_shapes is layout_from_shapes


def test_global_row_orders_by_name_and_refuses_a_drift():
    values = {name: float(i) for i, name in enumerate(reversed(MEASURED_GLOBAL_FEATURES))}
    assert global_row(values, MEASURED_GLOBAL_FEATURES) == [2.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"missing.*log_kernel_loads"):
        global_row({"cache_hit_rate": 0.0, "log_kernel_compiles": 0.0}, MEASURED_GLOBAL_FEATURES)
    with pytest.raises(ValueError, match=r"unknown.*extra"):
        global_row({**values, "extra": 1.0}, MEASURED_GLOBAL_FEATURES)
