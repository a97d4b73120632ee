"""The `schedule` baseline: an open-loop plan, seeds advanced at once, no telemetry read."""

import numpy as np
import pytest

from esper_gym.agents.baselines import Germination, ScheduleAgent, make_agent, tuned_plan
from esper_gym.bench.jobs import TaskSpec
from esper_gym.bench.jobs import task_env as make_env
from esper_gym.episode import play_episode
from esper_gym.observation import GLOBAL_INDEX as G
from esper_gym.observation import NODE_FEATURES
from tests.conftest import SMALL

TASK = {**SMALL, "blueprints": ("residual_mlp", "low_rank")}
PLAN = [
    {"at": 0.0, "blueprint": "residual_mlp", "layer": "first"},
    {"at": 0.5, "blueprint": "low_rank", "layer": "next"},
]


def _env(contexts=None, kernel_dir=None):
    return make_env(TaskSpec("spirals", "spirals", TASK), kernel_dir=kernel_dir, contexts=contexts)


def test_bad_plans_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match=r"at=1.0 must be a progress fraction in \[0, 1\)"):
        Germination(1.0, "residual_mlp")
    with pytest.raises(ValueError, match="layer rule 'widest'; allowed: first, middle, last, next"):
        Germination(0.1, "residual_mlp", "widest")
    for bad in (-1, True):  # an index is an int >= 0, not a bool
        with pytest.raises(ValueError, match=f"layer rule {bad!r}; allowed: .*a layer index"):
            Germination(0.1, "residual_mlp", bad)
    env = _env()
    with pytest.raises(ValueError, match="'conv3x3' is not in the task's library; allowed: "):
        ScheduleAgent(
            env.observation_space,
            env.action_space,
            [{"at": 0.0, "blueprint": "conv3x3"}],
            env.unwrapped.task.blueprints,
        )
    with pytest.raises(ValueError, match="a schedule plan is a list"):
        ScheduleAgent(env.observation_space, env.action_space, "residual_mlp")


def test_the_plan_is_played_on_time_in_its_layers_and_seeds_advance_at_once(kernel_dir):
    env = _env(kernel_dir=kernel_dir)
    agent = make_agent("schedule", env, plan=PLAN)
    metrics, events = play_episode(env, agent.act, seed=3)
    steps = metrics["length"]
    # Germinations at progress 0 (step 0, first layer) and 0.5 (step steps/2, the next layer).
    assert metrics["plan"] == f"0:0:residual_mlp;{steps // 2}:1:low_rank"
    assert metrics["params_added"] > 0 and metrics["invalid_actions"] == 0
    # Seeds are moved on at once: the first seed left GERMINATED on the step after it began.
    first = [e for e in events if e.get("layer") == "fc0" and e.get("to") == "TRAINING"]
    assert first, events
    # Never culled: an open-loop plan has no way to judge a seed.
    assert not any(e.get("to") == "CULLED" for e in events)


def test_a_layer_index_names_the_layer_and_wraps_like_next(kernel_dir):
    env = _env(kernel_dir=kernel_dir)
    plan = [{"at": 0.0, "blueprint": "residual_mlp", "layer": 1}]
    plan += [{"at": 0.0, "blueprint": "residual_mlp", "layer": 3}]  # 3 % 3 host layers: 0
    plan += [{"at": 0.0, "blueprint": "residual_mlp", "layer": 2}]
    metrics, _ = play_episode(env, make_agent("schedule", env, plan=plan).act, seed=3)
    # Layers 1, 0, 2: one germination per step.
    assert metrics["plan"] == "0:1:residual_mlp;1:0:residual_mlp;2:2:residual_mlp"


def test_decisions_do_not_read_telemetry():
    env = _env()
    agent = ScheduleAgent(
        env.observation_space, env.action_space, PLAN, ("residual_mlp", "low_rank")
    )
    obs, _ = env.reset(seed=0)
    first = agent.act(obs)
    assert first != 0  # germinate at progress 0
    agent.reset()
    noisy = {k: v.copy() for k, v in obs.items()}
    rng = np.random.default_rng(0)
    keep = noisy["globals"][G["progress"]]
    noisy["globals"][:] = rng.normal(size=noisy["globals"].shape)  # accuracy, loss, plateau...
    noisy["globals"][G["progress"]] = keep
    noisy["nodes"][:, : len(NODE_FEATURES)] = rng.normal(
        size=(noisy["nodes"].shape[0], len(NODE_FEATURES))
    )
    assert agent.act(noisy) == first


def test_one_plan_in_every_context(kernel_dir):
    env = _env(contexts="train", kernel_dir=kernel_dir)
    plans, contexts = set(), set()
    for seed in (0, 1):
        agent = make_agent("schedule", env, plan=PLAN[:1])
        metrics, _ = play_episode(env, agent.act, seed)
        plans.add(metrics["plan"])
        contexts.add(metrics["context_index"])
    assert len(contexts) == 2 and plans == {"0:0:residual_mlp"}


def test_the_tuned_plan_is_used_by_default_and_a_missing_one_is_refused():
    plan = tuned_plan("spirals")
    assert all(isinstance(g, Germination) for g in plan)
    env = _env()
    assert make_agent("schedule", env).plan == plan
    with pytest.raises(
        ValueError, match=r"no tuned schedule for task 'cifar10'.*tune_schedule\.py"
    ):
        tuned_plan("cifar10")
