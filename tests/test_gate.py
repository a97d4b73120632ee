"""The schedule gate (esper_gym.agents.gate): the mask cut to the tuned plan's action and its
refusal, the same on one env and on the batched simulator, recorded in a checkpoint, played
behind by evaluate, and checked where it comes from a config or a file."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from esper_gym import config
from esper_gym.actions import ADVANCE, GERMINATE, WAIT, Action
from esper_gym.agents.gate import ScheduleGate, VectorScheduleGate, gate_of
from esper_gym.bench.jobs import BatchedFactory, make_jobs, resolve_tasks, run_job
from esper_gym.bench.jobs import task_env as make_env
from esper_gym.observation import GLOBAL_FEATURES
from tests.conftest import SMALL

GROWN = GLOBAL_FEATURES.index("log_params_ratio")  # 0 until a kernel adds parameters
TINY = {"dataset_kwargs": {"n_train": 1024, "n_val": 256, "n_test": 256}, "eval_size": 256}


def valid(mask) -> list[int]:
    return [int(a) for a in np.flatnonzero(mask)]


def budget_env(kernel_dir, gate, **kw):
    (task,) = resolve_tasks(["spirals_budget"], common=TINY)
    return make_env(task, kernel_dir=kernel_dir, contexts="train", gate=gate, **kw)


def test_a_held_back_germination_stays_due_under_defer_and_a_followed_one_grows(kernel_dir):
    env = budget_env(kernel_dir, "defer")
    layout = env.unwrapped.layout
    wait = layout.encode(Action(WAIT))
    obs, _ = env.reset(seed=0, options={"context": 0})
    while len(valid(obs["action_mask"])) == 1:  # forced: the plan waits until progress 0.25
        assert valid(obs["action_mask"]) == [wait]
        obs, *_ = env.step(wait)
    proposal = env.proposal
    assert layout.decode(proposal).kind == GERMINATE and obs["globals"][0] >= 0.25
    assert valid(obs["action_mask"]) == sorted([wait, proposal])  # no seed yet: refusal is WAIT
    assert valid(env.action_masks()) == sorted([wait, proposal])  # MaskablePPO's view too
    for _ in range(2):  # held back twice: proposed again each time, nothing grows
        obs, *_ = env.step(wait)
        assert env.proposal == proposal and obs["globals"][GROWN] == 0
    obs, *_ = env.step(proposal)  # followed: the seed exists, the plan moves on
    assert obs["globals"][GROWN] > 0


def test_refusing_the_second_germination_advances_the_first_seed(kernel_dir):
    """The refusal is the plan's action without the germination: with a seed live, that seed's
    advance (WAIT would hold the first seed where it is for as long as the second is refused)."""
    env = budget_env(kernel_dir, "defer")
    layout = env.unwrapped.layout
    obs, _ = env.reset(seed=0, options={"context": 0})
    while layout.decode(env.proposal).kind != GERMINATE:
        obs, *_ = env.step(env.proposal)
    obs, *_ = env.step(env.proposal)  # the first germination, followed
    second = env.proposal
    assert layout.decode(second).kind == GERMINATE  # the plan grows twice at 0.25
    (refusal,) = set(valid(obs["action_mask"])) - {second}
    assert layout.decode(refusal).kind == ADVANCE
    node = layout.decode(refusal).layer
    before = obs["nodes"][node].copy()
    obs, *_ = env.step(refusal)
    assert env.proposal == second  # under defer the second stays due...
    assert not np.array_equal(obs["nodes"][node], before)  # ...and the first seed moved on


def test_under_drop_each_germination_is_asked_once(kernel_dir):
    env = budget_env(kernel_dir, "drop")
    obs, _ = env.reset(seed=0, options={"context": 0})
    asked, done = 0, False
    while not done:
        mask = valid(obs["action_mask"])
        asked += len(mask) == 2
        refusal = min(mask, key=lambda a: a == env.proposal)  # the one that is not the plan's
        obs, _, terminated, truncated, _ = env.step(refusal)
        done = terminated or truncated
    assert asked == 2  # the tuned plan's two germinations
    assert obs["globals"][GROWN] == 0  # nothing grew: the episode was NoOp's
    with pytest.raises(
        ValueError, match="gate='later'; allowed: null \\(no gate\\), defer, drop, plans"
    ):
        ScheduleGate(env.unwrapped, "later")


@pytest.mark.parametrize("rule", ["drop", "plans"])
def test_the_vector_gate_cuts_every_copy_as_one_env_does(kernel_dir, rule):
    """Over the batched simulator, copy i's masks are those of one gated env on the same seed
    and actions, through an autoreset (one gate per copy). The gate's reset at an autoreset is
    belt and braces: ScheduleAgent also restarts its plan when progress is back to 0."""
    kwargs = {"kernel_dir": kernel_dir, "contexts": "train", **TINY}
    vec = BatchedFactory("Esper/SpiralsBudget-v0", None, kwargs, rule).vector(2)
    assert isinstance(vec, VectorScheduleGate) and gate_of(vec) == rule
    singles = [BatchedFactory("Esper/SpiralsBudget-v0", None, kwargs, rule)() for _ in range(2)]
    obs, _ = vec.reset(seed=[3, 4])
    single_obs = [e.reset(seed=s)[0] for e, s in zip(singles, (3, 4))]
    ends = 0
    for _ in range(12):  # 8 decisions an episode at this size: one autoreset each
        for i in range(2):
            np.testing.assert_array_equal(obs["action_mask"][i], single_obs[i]["action_mask"])
        # copy 0 follows the (first live) plan, copy 1 takes any other option offered
        actions = []
        for i, gate in enumerate(vec.gates):
            mask = valid(obs["action_mask"][i])
            actions.append(gate.proposal if i == 0 else max(mask, key=lambda a: a != gate.proposal))
        obs, _, term, trunc, _ = vec.step(np.array(actions))
        for i, env in enumerate(singles):
            single_obs[i], _, t, u, _ = env.step(actions[i])
            if t or u:
                single_obs[i], _ = env.reset()
        ends += int(np.sum(term | trunc))
    assert ends == 2


def test_a_gated_checkpoint_is_evaluated_behind_the_gate_and_a_bad_gate_is_refused(
    tmp_path, kernel_dir
):
    import torch

    from esper_gym.agents.tamiyo import CheckpointError, TamiyoPolicy, env_record, save_checkpoint

    common = {**SMALL, "blueprints": ("residual_mlp", "low_rank")}
    (spirals,) = resolve_tasks(["spirals"], common=common)
    env = make_env(spirals, kernel_dir=kernel_dir, gate="drop")
    record = env_record(env)
    assert record["gate"] == "drop" and "gate" not in env_record(env.unwrapped)
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, TamiyoPolicy.for_space(env.observation_space), None, 0, None, record)
    jobs = make_jobs(
        ["tamiyo", "noop"], [spirals], 1, checkpoints={"tamiyo": str(ckpt)}, kernel_dir=kernel_dir
    )
    assert {j.agent: j.gate for j in jobs} == {"tamiyo": "drop", "noop": None}
    row = run_job(next(j for j in jobs if j.agent == "tamiyo"))["row"]
    # Behind the gate a policy grows only where the plan does: at most the plan's germinations.
    from esper_gym.agents.baselines import tuned_plan

    assert row["germinations"] <= len(tuned_plan("spirals")) and row["length"] > 0
    # A crafted record: a gate that is not a rule is refused by name.
    bad = tmp_path / "bad.pt"
    save_checkpoint(
        bad, TamiyoPolicy.for_space(env.observation_space), None, 0, None,
        {**record, "gate": "import os"},
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="gate"):
        make_jobs(["tamiyo"], [spirals], 1, checkpoints={"tamiyo": str(bad)})


def test_env_gate_is_checked_in_the_config():
    from tests.test_config import load

    with pytest.raises(
        config.ConfigError, match=r"env\.gate='later'; allowed: null, defer, drop, plans, counts"
    ):
        config.validate(load("agent=tamiyo", "env.gate=later"))
    for family in ("plans", "counts"):
        with pytest.raises(config.ConfigError, match=r"task 'spirals' has no pruned plan family"):
            config.validate(load("agent=tamiyo", "task=spirals", f"env.gate={family}"))
    with pytest.raises(config.ConfigError, match=r"env\.gate=drop: no tuned schedule"):
        config.validate(load("agent=tamiyo", "task=fashion_mnist_cnn", "env.gate=drop"))
    cfg = load("agent=tamiyo", "task=spirals_pace", "env.gate=drop", "env.contexts=train")
    config.validate(cfg)
    assert OmegaConf.select(cfg, "env.gate") == "drop"
    assert isinstance(config.env_factory(cfg), BatchedFactory)
    assert config.env_factory(cfg).gate == "drop"


def test_the_gate_survives_a_mixture_and_a_resume_must_keep_it():
    from esper_gym.agents.records import check_env_record, mixture_record

    lib = ["residual_mlp", "low_rank"]
    gated = [{"task": t, "blueprints": lib, "gate": "drop"} for t in ("spirals_pace", "spirals")]
    mixed = mixture_record(gated)
    assert mixed["gate"] == "drop" and mixed["task"] == "spirals_pace+spirals"
    plain = {"task": "spirals_pace", "blueprints": lib}
    with pytest.raises(
        ValueError, match="behind the schedule gate 'drop', this env is behind None"
    ):
        check_env_record(gated[0], plain, "ckpt.pt", same_task=True)
    with pytest.raises(ValueError, match="gate None, this env is behind 'defer'"):
        check_env_record(plain, {**plain, "gate": "defer"}, "ckpt.pt", same_task=True)
    check_env_record(gated[0], dict(gated[0]), "ckpt.pt", same_task=True)  # the same: fine


def test_behind_the_plans_gate_every_plan_of_the_family_plays_as_it_does_alone(kernel_dir):
    """gate='plans' offers each plan of the pruned family its next action: an agent following
    any one of them plays that plan's episode exactly (same germinations, same return) as it
    does ungated; the options the gate offered on the way are the plans' branch points."""
    from esper_gym.agents.baselines import make_agent, tuned_plans
    from esper_gym.episode import play_episode

    gated, plain = budget_env(kernel_dir, "plans"), budget_env(kernel_dir, None)
    family = tuned_plans("spirals_budget")
    assert gate_of(gated) == "plans" and len(gated.gate.family) == len(family) > 2
    branches = set()
    for plan in family:
        follower = make_agent("schedule", plain, plan=list(plan))

        def act(obs, info=None, follower=follower):
            action = follower.act(obs)
            offered = valid(obs["action_mask"])
            assert action in offered  # the plan's action is always on offer
            assert offered == sorted(set(gated.gate.proposals))  # only the live plans' actions
            if len(offered) > 1:
                branches.add(tuple(offered))
            return action

        row = play_episode(gated, act, seed=5)[0]
        assert tuple(follower.plan) in {tuple(p.plan) for p in gated.gate.live}
        follower.reset()
        alone = play_episode(plain, follower.act, seed=5)[0]
        assert row["germinations"] == alone["germinations"] == len(plan)
        assert row["return"] == alone["return"] and row["plan"] == alone["plan"]
    assert len(branches) >= 2  # grow-or-wait is asked at more than one point


def test_the_plans_gate_refuses_an_action_it_did_not_offer(kernel_dir):
    env = budget_env(kernel_dir, "plans")
    obs, _ = env.reset(seed=0, options={"context": 0})
    offered = valid(obs["action_mask"])
    outside = next(a for a in range(len(obs["action_mask"])) if a not in offered)
    with pytest.raises(ValueError, match=rf"action {outside} is not one the gate offered"):
        env.step(outside)


def test_a_checkpoint_pins_the_plans_of_its_gate(tmp_path, kernel_dir):
    """The record carries a digest of the gate's plans: a checkpoint is refused behind other
    plans for its task (conf/schedule_plans.yaml rewritten), a crafted digest is refused by name,
    an older record without one still loads, and another task (transfer) is not compared."""
    import torch

    from esper_gym.agents.gate import plans_digest
    from esper_gym.agents.records import check_env_record
    from esper_gym.agents.tamiyo import (
        CheckpointError,
        TamiyoPolicy,
        env_record,
        load_checkpoint,
        save_checkpoint,
    )

    env = budget_env(kernel_dir, "plans")
    record = env_record(env)
    assert record["gate_plans"] == plans_digest("spirals_budget", "plans")
    assert plans_digest("spirals_budget", "drop") != record["gate_plans"]
    moved = {**record, "gate_plans": "0" * 64}  # trained behind another family
    with pytest.raises(ValueError, match="trained behind other plans of gate 'plans'"):
        check_env_record(moved, record, "ckpt.pt", same_task=False)
    older = {k: v for k, v in record.items() if k != "gate_plans"}
    check_env_record(older, record, "ckpt.pt", same_task=True)
    check_env_record(moved, {**record, "task": "spirals_pace"}, "ckpt.pt", same_task=False)
    torch.manual_seed(0)
    bad = tmp_path / "bad.pt"
    policy = TamiyoPolicy.for_space(env.observation_space)
    save_checkpoint(bad, policy, None, 0, None, {**record, "gate_plans": "import os"})
    with pytest.raises(CheckpointError, match="gate_plans"):
        load_checkpoint(bad)


def test_count_first_grows_each_burst_from_its_last_layer():
    from esper_gym.agents.baselines import Germination, parse_plan
    from esper_gym.agents.gate import count_first, gate_plans, plans_digest

    plan = parse_plan([{"at": 0.25, "blueprint": "low_rank", "layer": "next"}] * 2)
    assert count_first(plan) == (Germination(0.25, "low_rank", 1), Germination(0.25, "low_rank", 0))
    two_bursts = parse_plan(
        [{"at": 0.0, "blueprint": "residual_mlp", "layer": "first"}]
        + [{"at": 0.5, "blueprint": "residual_mlp", "layer": "next"}] * 2
    )
    assert [g.layer for g in count_first(two_bursts)] == [0, 2, 1]  # layers 0, then 1-2 reversed
    with pytest.raises(ValueError, match="count_first: layer rule 'last'; allowed: first, next"):
        count_first(parse_plan([{"at": 0.0, "blueprint": "residual_mlp", "layer": "last"}]))
    # On the committed families, a burst's first germination names its plan: no two plans open
    # with the same (at, blueprint, layer), so the count is decided with the first seed.
    for task in ("spirals_budget", "spirals_pace"):
        plans = gate_plans(task, "counts")
        firsts = [p[0] for p in plans if p]
        assert len(firsts) == len(set(firsts)) == len(plans) - 1
        for reordered, plan in zip(plans, gate_plans(task, "plans")):  # the same seeds
            assert sorted((g.at, g.blueprint, g.layer) for g in reordered) == sorted(
                (g.at, g.blueprint, i) for i, g in enumerate(plan)
            )
        assert plans_digest(task, "counts") != plans_digest(task, "plans")  # pinned apart


def test_behind_the_counts_gate_the_count_is_one_decision_and_each_plan_plays_alone(kernel_dir):
    """gate='counts': following any plan of the reordered family plays its ungated episode
    exactly, and once a seed is grown no choice is left (one live plan: the rest is forced),
    where behind 'plans' the same family asks "another seed?" after the first."""
    from esper_gym.agents.baselines import make_agent
    from esper_gym.agents.gate import gate_plans
    from esper_gym.episode import play_episode

    gated, plain = budget_env(kernel_dir, "counts"), budget_env(kernel_dir, None)
    layout = gated.unwrapped.layout
    assert gate_of(gated) == "counts"
    sizes = set()
    for plan in gate_plans("spirals_budget", "counts"):
        follower = make_agent("schedule", plain, plan=list(plan))
        grown = [0]

        def act(obs, info=None, follower=follower, grown=grown):
            offered = valid(obs["action_mask"])
            if grown[0]:
                assert len(gated.gate.live) == 1 and len(offered) == 1  # forced from here
            elif len(offered) > 1:
                sizes.add(len(offered))
            action = follower.act(obs)
            assert action in offered
            grown[0] += layout.decode(action).kind == GERMINATE
            return action

        row = play_episode(gated, act, seed=5)[0]
        follower.reset()
        alone = play_episode(plain, follower.act, seed=5)[0]
        assert row["germinations"] == alone["germinations"] == len(plan)
        assert row["return"] == alone["return"] and row["plan"] == alone["plan"]
    assert max(sizes) == 4  # WAIT, one, two or three seeds side by side at progress 0
