"""experiments/schedule_gate.py's ScheduleGate: the plan's action, or WAIT where it grows."""

import numpy as np
import pytest

from esper_gym.actions import GERMINATE
from esper_gym.observation import GLOBAL_FEATURES
from tests.scripts import load_experiment

GROWN = GLOBAL_FEATURES.index("log_params_ratio")  # 0 until a kernel adds parameters


@pytest.fixture(scope="module")
def gate_module():
    return load_experiment("schedule_gate")


def valid(obs):
    return list(np.flatnonzero(obs["action_mask"]))


def test_a_held_back_germination_stays_due_and_a_followed_one_grows(gate_module, tmp_path):
    env = gate_module["make_env"]("train", False, str(tmp_path / "kernels"))
    layout = env.unwrapped.layout
    obs, _ = env.reset(seed=0, options={"context": 0})
    steps_to_growth = 0
    while len(valid(obs)) == 1:  # forced: WAIT until the plan's first germination is due
        assert valid(obs) == [env.wait]
        obs, *_ = env.step(env.wait)
        steps_to_growth += 1
    assert steps_to_growth > 0  # the tuned plan grows at progress 0.25, not at once
    proposal = env.proposal
    assert valid(obs) == sorted([env.wait, proposal])
    assert layout.decode(proposal).kind == GERMINATE
    for _ in range(2):  # held back twice: proposed again each time, nothing grows
        obs, *_ = env.step(env.wait)
        assert env.proposal == proposal and len(valid(obs)) == 2
        assert obs["globals"][GROWN] == 0
    obs, *_ = env.step(proposal)  # followed: the seed exists, the plan moves on
    assert obs["globals"][GROWN] > 0
    assert env.proposal != proposal
    env.close()


def test_under_drop_a_held_back_germination_is_gone_for_the_episode(gate_module, tmp_path):
    env = gate_module["make_env"]("train", False, str(tmp_path / "kernels"), declined="drop")
    obs, _ = env.reset(seed=0, options={"context": 0})
    declined = 0
    for _ in range(200):  # every germination the plan proposes, held back
        if len(valid(obs)) == 2:
            declined += 1
        obs, _, terminated, truncated, _ = env.step(env.wait)
        if terminated or truncated:
            break
    assert terminated or truncated
    assert declined == 2  # the tuned plan's two germinations, each asked once
    assert obs["globals"][GROWN] == 0  # nothing grew: the episode was NoOp's
    env.close()
    with pytest.raises(ValueError, match="declined='later'; allowed: defer, drop"):
        gate_module["ScheduleGate"](env.unwrapped, declined="later")
