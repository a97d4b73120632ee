"""The privileged `lookahead` baseline: candidates tried on forks, the best one committed."""

import numpy as np
import pytest
import yaml

from esper_gym import config_dir
from esper_gym.actions import ADVANCE, GERMINATE, Action
from esper_gym.agents.baselines import AGENTS, PRIVILEGED, make_agent
from esper_gym.agents.lookahead import LookaheadAgent
from esper_gym.bench.jobs import TaskSpec
from esper_gym.bench.jobs import task_env as make_env
from esper_gym.bench.report import comparison_baselines
from esper_gym.episode import play_episode
from tests.conftest import SMALL

TASK = {**SMALL, "blueprints": ("residual_mlp", "low_rank")}


def _env(kernel_dir):
    return make_env(TaskSpec("spirals", "spirals", TASK), kernel_dir=kernel_dir)


def _forked_return(env, first, agent) -> float:
    """What a candidate is worth, computed apart from the agent: fork, play it, then the
    default continuation to the end of the episode."""
    fork = env.unwrapped.fork()
    total, action = 0.0, first
    while True:
        obs, reward, terminated, truncated, _ = fork.step(action)
        total += reward
        if terminated or truncated:
            return total
        action = agent.default(obs["action_mask"])


def test_lookahead_commits_the_best_candidate_and_leaves_the_run_untouched(kernel_dir):
    env = _env(kernel_dir)
    # The "noop" continuation (no further growth), checked against a hand-made rollout.
    agent = make_agent("lookahead", env, every=2, continuation="noop", cull=False)
    assert isinstance(agent, LookaheadAgent) and agent.horizon is None
    actions, scores = [], []

    def act(obs):
        a = agent.act(obs)
        if agent.env.unwrapped.steps % agent.every == 0:
            # Recomputed on fresh forks of the same state: the agent's scores and choice agree.
            worth = {c: _forked_return(env, c, agent) for c in agent.candidates(obs["action_mask"])}
            assert agent.last_scores == pytest.approx(worth)
            assert a == max(worth, key=lambda c: (worth[c], -list(worth).index(c)))
            scores.append(worth)
        actions.append(a)
        return a

    metrics, _ = play_episode(env, act, seed=11)
    cost = agent.episode_cost()
    steps = metrics["length"]
    # 6 steps, decisions at 0, 2, 4: the default, then GERMINATE residual_mlp / low_rank in the
    # first free slot of each of the 3 layers; each rollout runs to the episode's end.
    assert steps == 6 and cost["decisions"] == 3 and len(scores) == 3
    assert len(scores[0]) == 7
    assert cost["cost_steps"] == sum(len(s) * (steps - t) for s, t in zip(scores, (0, 2, 4)))
    assert cost["cost_s"] > 0
    # Growth was tried and one candidate was better than waiting (a constructed case where
    # growth pays on this seed: 0.29 vs 0.20), so the agent grew, unlike NoOp.
    germinate = env.unwrapped.layout.encode(Action(GERMINATE, 0, 0, 0))
    assert scores[0][germinate] != scores[0][0]
    assert metrics["germinations"] >= 1

    # The rollouts changed nothing: the same actions on a fresh env from the same seed give
    # the same trajectory, step for step.
    fresh = _env(kernel_dir)
    replay = iter(actions)
    again, _ = play_episode(fresh, lambda obs: next(replay), seed=11)
    for key in ("return", "val_acc", "test_acc", "params_added", "plan"):
        assert again[key] == metrics[key], key

    # Its return is at least its first decision's best score, which is at least NoOp's: the
    # default continuation at step 0 (WAIT: no seed yet) is NoOp's own episode, and forks are
    # exact, so each later decision keeps or improves what the previous one predicted.
    noop_env = _env(kernel_dir)
    noop, _ = play_episode(noop_env, make_agent("noop", noop_env).act, seed=11)
    assert scores[0][0] == pytest.approx(noop["return"], abs=1e-12)
    assert metrics["return"] >= max(scores[0].values()) - 1e-9
    assert metrics["return"] > noop["return"]


def test_cost_is_counted_per_episode_and_bounded_by_the_horizon(kernel_dir):
    env = _env(kernel_dir)
    agent = make_agent(
        "lookahead", env, every=3, horizon=2, blueprints=["low_rank"], continuation="noop",
        cull=False,
    )  # fmt: skip
    for seed in (1, 1):  # the same episode twice: the second count starts from zero again
        metrics, _ = play_episode(env, agent.act, seed=seed)
        cost = agent.episode_cost()
        # decisions at steps 0 and 3, <= 1 + WAIT + 3 layers candidates, 2 forked steps each
        assert cost["decisions"] == 2
        assert 2 * 2 <= cost["cost_steps"] <= 2 * 5 * 2
    assert metrics["length"] == 6


def test_privileged_and_never_the_reference():
    assert "lookahead" in AGENTS and "lookahead" in PRIVILEGED
    assert comparison_baselines(["lookahead", "noop", "schedule"]) == ["noop", "schedule"]


def test_bad_settings_are_refused_with_the_value(kernel_dir):
    env = _env(kernel_dir)
    with pytest.raises(ValueError, match=r"every=0 must be an integer >= 1"):
        make_agent("lookahead", env, every=0)
    with pytest.raises(ValueError, match=r"horizon=2.5 must be an integer >= 1"):
        make_agent("lookahead", env, horizon=2.5)
    with pytest.raises(ValueError, match=r"\['conv9'\] not in the task's library; allowed: "):
        make_agent("lookahead", env, blueprints=["residual_mlp", "conv9"])
    with pytest.raises(TypeError, match="needs an env with fork"):
        LookaheadAgent(env.observation_space, env.action_space, env=object())
    with pytest.raises(ValueError, match="continuation='later'"):
        make_agent("lookahead", env, continuation="later")
    with pytest.raises(ValueError, match="needs schedule="):
        LookaheadAgent(env.observation_space, env.action_space, env, continuation="schedule")


class StubSchedule:
    """A schedule continuation that records what it is asked: GERMINATE residual_mlp in layer
    1 once progress reaches 0.5 (its one entry), else ADVANCE what it can, else WAIT."""

    calls = 0

    def __init__(self, layout):
        self.layout, self.done = layout, 0

    def reset(self):
        self.done = 0

    def act(self, obs, info=None):
        StubSchedule.calls += 1
        mask, lay = obs["action_mask"], self.layout
        germ = lay.encode(Action(GERMINATE, 1, 0, 0))
        if not self.done and obs["globals"][0] >= 0.5 and mask[germ]:
            self.done = 1
            return germ
        return next(
            (a for n in range(lay.max_nodes) for s in range(lay.slots)
             if mask[a := lay.encode(Action(ADVANCE, n, s))]),
            0,
        )  # fmt: skip


def test_lookahead_continues_with_the_schedule(kernel_dir):
    """Each candidate is scored by playing it, then the schedule (a copy of its state as of
    now) to the end; the committed run is at least as good as the schedule's own."""
    import copy

    env = _env(kernel_dir)
    stub = StubSchedule(env.unwrapped.layout)
    agent = LookaheadAgent(
        env.observation_space, env.action_space, env, every=1, continuation="schedule",
        schedule=stub, cull=True,
    )  # fmt: skip
    checked = []

    def act(obs):
        state = copy.deepcopy(agent.states["schedule"])  # the schedule as of this step
        probe = copy.deepcopy(state)
        own = probe.act(obs)
        a = agent.act(obs)
        if env.unwrapped.steps == 0:
            candidates = agent.candidates(obs["action_mask"], [own])
            assert candidates[0] == own and list(agent.last_scores) == candidates
            for c in candidates:
                fork, follow = env.unwrapped.fork(), copy.deepcopy(probe if c == own else state)
                total, action = 0.0, c
                while True:
                    o, r, term, trunc, _ = fork.step(action)
                    total += r
                    if term or trunc:
                        break
                    action = follow.act(o)
                assert agent.last_scores[c] == pytest.approx(total)
            checked.append(len(candidates))
        return a

    StubSchedule.calls = 0
    metrics, _ = play_episode(env, act, seed=11)
    assert checked and StubSchedule.calls > metrics["length"]  # the rollouts asked it
    # The schedule's own episode on the same seed: the lookahead is at least as good.
    alone_env = _env(kernel_dir)
    alone = StubSchedule(alone_env.unwrapped.layout)
    plain, _ = play_episode(alone_env, alone.act, seed=11)
    assert metrics["return"] >= plain["return"] - 1e-9
    assert agent.episode_cost()["decisions"] == metrics["length"]  # it decided at every step


def test_config_defaults_are_the_agents_defaults():
    """evaluate builds `lookahead` with make_agent's defaults, train with conf/agent: the same."""
    import inspect

    build = yaml.safe_load((config_dir() / "agent" / "lookahead.yaml").read_text())["build"]
    params = inspect.signature(LookaheadAgent).parameters
    for key in ("every", "horizon", "blueprints"):
        default = params[key].default
        assert build[key] == (list(default) if isinstance(default, tuple) else default), key
    assert np.all([b in TASK["blueprints"] for b in build["blueprints"]])
