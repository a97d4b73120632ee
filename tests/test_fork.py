"""env.unwrapped.fork(): an independent copy of the running episode (lookahead baselines)."""

import numpy as np
import pytest

from esper_gym.actions import ADVANCE, CULL, GERMINATE, Action
from esper_gym.env import MorphogeneticEnv
from tests.conftest import SMALL

TASK = {**SMALL, "blueprints": ("residual_mlp", "low_rank")}


def _trajectory(env, actions):
    out = []
    for a in actions:
        obs, reward, terminated, _, info = env.step(a)
        out.append((obs, reward, terminated, info["val_acc"], info["params"]))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, ((oa, ra, ta, va, pa), (ob, rb, tb, vb, pb)) in enumerate(zip(a, b)):
        assert (ra, ta, va, pa) == (rb, tb, vb, pb), f"step {i}"
        for key in oa:
            assert np.array_equal(oa[key], ob[key]), f"step {i}: obs[{key!r}]"


def test_stepping_a_fork_leaves_the_original_trajectory_unchanged(kernel_dir):
    env = MorphogeneticEnv("spirals", kernel_dir=kernel_dir, **TASK)
    lay = env.layout
    germ = lay.encode(Action(GERMINATE, 0, 0, 0))
    adv = lay.encode(Action(ADVANCE, 0, 0))
    plan = [germ, adv, adv, 0, 0, 0]  # a live seed is training when the fork is taken
    env.reset(seed=5)
    reference = _trajectory(env, plan)

    env.reset(seed=5)
    head = _trajectory(env, plan[:2])
    _assert_same(head, reference[:2])
    same = env.fork()
    other = env.fork()
    # The fork continues exactly as the original would (host, seeds, data order, RNG copied).
    _assert_same(_trajectory(same, plan[2:]), reference[2:])
    # Another future on a second fork: culling the seed, growing elsewhere...
    diverged = _trajectory(
        other,
        [
            lay.encode(Action(CULL, 0, 0)),
            lay.encode(Action(GERMINATE, 1, 0, 1)),
            lay.encode(Action(ADVANCE, 1, 0)),
            0,
        ],
    )
    assert [r for _, r, *_ in diverged] != [r for _, r, *_ in reference[2:]]
    # ...and the original, stepped after both forks, still follows the reference exactly.
    _assert_same(_trajectory(env, plan[2:]), reference[2:])
    assert env.trainer.model is not same.trainer.model
    assert env.data is same.data  # the dataset is shared, not copied


def test_fork_needs_a_running_episode():
    env = MorphogeneticEnv("spirals", **TASK)
    with pytest.raises(RuntimeError, match="call reset"):
        env.fork()


def test_a_forks_seed_outcomes_stay_out_of_the_store(kernel_dir):
    env = MorphogeneticEnv("spirals", kernel_dir=kernel_dir, **TASK)
    lay = env.layout
    env.reset(seed=5)
    _trajectory(env, [lay.encode(Action(GERMINATE, 0, 0, 0)), lay.encode(Action(ADVANCE, 0, 0))])
    before = len(env.store.outcomes())  # the kernel store is shared by the session's tests
    fork = env.fork()
    _, _, _, _, info = fork.step(lay.encode(Action(CULL, 0, 0)))
    assert info["outcomes_recorded"] == 1  # the fork counts its outcome...
    assert len(env.store.outcomes()) == before  # ...but does not write it where Karn learns
    _, _, _, _, info = env.step(lay.encode(Action(CULL, 0, 0)))
    assert info["outcomes_recorded"] == 1 and len(env.store.outcomes()) == before + 1
