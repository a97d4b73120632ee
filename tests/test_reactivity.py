"""The committed Tamiyo checkpoints: three training seeds, small, loadable without pickle code.

Whether they react is measured, not asserted: `same_budget_plans` plays a checkpoint in two test
contexts with the same budget (so `progress`, a schedule's only clock, runs identically) and
the same sampling seed (identical random draws). Different plans can only come from the
telemetry it reads. On the committed checkpoints (imitation warm start + PPO, README,
Results) the plans are identical for 5 of the 6 (checkpoint, sampling seed 7 or 8) pairs; in
the sixth the third germination comes one decision later. They play, in effect, an open-loop
schedule (their teacher's, with other gaps), so no test here claims otherwise.
"""

import pathlib

import gymnasium as gym
import torch

import esper_gym  # noqa: F401  (registers the ids)
from esper_gym.agents.tamiyo import load_checkpoint
from esper_gym.episode import play_episode

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINTS = sorted((ROOT / "results" / "checkpoints").glob("tamiyo_seed*.pt"))


def _same_budget_pair(space) -> tuple[int, int]:
    """Two test contexts with the same epochs (the episode's length and progress clock) that
    differ in the host's width: different telemetry from the first step on."""
    contexts = space.contexts("test")
    for i, a in enumerate(contexts):
        for j, b in enumerate(contexts):
            if j > i and a["epochs_scale"] == b["epochs_scale"] and a["width"] != b["width"]:
                return i, j
    raise AssertionError("no two test contexts share a budget")


def _plan(events) -> list[tuple]:
    return [(e["step"], e["layer"], e["blueprint"]) for e in events if e["to"] == "GERMINATED"]


def same_budget_plans(path, kernel_dir=None, seed: int = 7) -> list[list[tuple]]:
    """The germination plans of checkpoint `path` in two same-budget test contexts of spirals."""
    policy = load_checkpoint(path).policy.eval()
    env = gym.make("Esper/Spirals-v0", contexts="test", kernel_dir=kernel_dir)
    plans = []
    for index in _same_budget_pair(env.unwrapped.context_space):
        _, events = play_episode(
            env, policy.actor(seed=seed), seed=seed, options={"context": index}
        )
        plans.append(_plan(events))
    return plans


def test_three_checkpoints_are_committed_and_load_weights_only():
    assert [p.name for p in CHECKPOINTS] == [f"tamiyo_seed{i}.pt" for i in range(3)]
    for path in CHECKPOINTS:
        assert path.stat().st_size < 1_000_000  # small: policy weights and config
        torch.load(path, weights_only=True)  # refuses anything but tensors and plain data
