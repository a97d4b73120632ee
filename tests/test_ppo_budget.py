"""`total_steps` is what a Tamiyo run takes (issue 24 §2): the imitation warm start counts in it
and never runs past it, PPO rounds what is left to whole rollouts, and a run that does not end
at exactly `total_steps` says so in one line with the number it ends at."""

from __future__ import annotations

import logging

import pytest

from esper_gym.agents.tamiyo import load_checkpoint, train
from tests.test_tamiyo import GraphBandit, bandit_config

# GraphBandit episodes are one step: 8 envs x 16 rollout steps = 128 env steps an update, and
# imitation_episodes=32 teacher episodes are 4 steps of the 8 envs = 32 env steps.
WARM = dict(teacher="random", imitation_episodes=32, imitation_epochs=1, uncertainty_samples=0)


def run(tmp_path, caplog, **kw):
    logs = []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="esper_gym.agents.tamiyo.ppo"):
        train(
            bandit_config(**kw),
            GraphBandit,
            log=lambda m, s: logs.append(s),
            checkpoint_path=tmp_path / "c.pt",
        )
    warnings = [r.getMessage() for r in caplog.records]
    return logs, load_checkpoint(tmp_path / "c.pt").global_step, warnings


def test_the_budget_left_after_imitation_is_rounded_to_whole_rollouts_with_a_warning(
    tmp_path, caplog
):
    # 256 asked: 32 imitation steps leave 224 = 1.75 rollouts -> 2 (the old rule ran 1: 160).
    logs, step, warnings = run(tmp_path, caplog, total_steps=256, **WARM)
    assert logs == [32, 160, 288] and step == 288
    (line,) = warnings
    assert "total_steps=256" in line and "ends at 288 env steps" in line and "\n" not in line
    assert "32 imitation steps + 2 updates" in line


def test_a_budget_of_whole_rollouts_runs_exactly_and_says_nothing(tmp_path, caplog):
    logs, step, warnings = run(tmp_path, caplog, total_steps=32 + 2 * 128, **WARM)
    assert logs == [32, 160, 288] and step == 288 and warnings == []
    logs, step, warnings = run(tmp_path, caplog, total_steps=256, teacher=None)
    assert logs == [128, 256] and warnings == []


def test_imitation_never_runs_past_the_budget(tmp_path, caplog):
    # 16 asked, 32 teacher episodes wanted (32 steps): the warm start stops at 16, no PPO.
    logs, step, warnings = run(tmp_path, caplog, total_steps=16, **WARM)
    assert logs == [16] and step == 16
    (line,) = warnings
    assert "total_steps=16 ends in the imitation warm start" in line
    assert "16 of imitation_episodes=32" in line and "no PPO update" in line


@pytest.mark.parametrize("total", [100, 200])
def test_without_a_warm_start_ppo_rounds_to_the_nearest_rollout_but_runs_at_least_one(
    tmp_path, caplog, total
):
    logs, step, warnings = run(tmp_path, caplog, total_steps=total, teacher=None)
    expected = {100: 128, 200: 256}[total]
    assert logs[-1] == step == expected
    (line,) = warnings
    assert f"total_steps={total}" in line and f"ends at {expected} env steps" in line
