"""Growth rules (north, fragrow, gradmax; reactive) and the features they read."""

import math

import numpy as np
import pytest
import torch

from esper_gym.actions import ADVANCE, GERMINATE, Action
from esper_gym.agents.baselines import AGENTS, make_agent
from esper_gym.agents.rules import (
    FragrowAgent,
    GradmaxAgent,
    NorthAgent,
    ReactiveAgent,
    rule_params,
)
from esper_gym.bench.jobs import TaskSpec
from esper_gym.bench.jobs import task_env as make_env
from esper_gym.episode import play_episode
from esper_gym.kasmina import KasminaLayer
from esper_gym.kasmina.lifecycle import SeedState
from esper_gym.kasmina.telemetry import effective_rank
from esper_gym.observation import GLOBAL_INDEX as G
from esper_gym.observation import NODE_INDEX as N
from esper_gym.observation import slot_column
from tests.conftest import SMALL

TASK = {**SMALL, "blueprints": ("residual_mlp", "low_rank")}


def _env(contexts=None, kernel_dir=None):
    return make_env(TaskSpec("spirals", "spirals", TASK), kernel_dir=kernel_dir, contexts=contexts)


ENV = _env()  # spaces only: no episode is played on it


def _obs(progress=0.5, states=None, **node_values):
    """A hand-built observation of a 3-layer host (fc0, fc1 hidden; fc2 the output layer):
    every slot DORMANT unless `states` = {(layer, slot): SeedState}; the mask allows every
    germination of a dormant slot and the advance of a GERMINATED/TRAINING/PROBATION seed.
    `node_values`: feature name -> 3 values (one per layer)."""
    space, lay = ENV.observation_space, ENV.unwrapped.layout
    obs = {k: np.zeros(s.shape, s.dtype) for k, s in space.spaces.items()}
    obs["node_mask"][:3] = 1
    obs["globals"][G["progress"]] = progress
    obs["action_mask"][0] = 1
    states = states or {}
    for n in range(3):
        for s in range(lay.slots):
            state = states.get((n, s), SeedState.DORMANT)
            obs["nodes"][n, slot_column(s, f"state_{state.name.lower()}")] = 1.0
            if state == SeedState.DORMANT:
                for b in range(lay.blueprints):
                    obs["action_mask"][lay.encode(Action(GERMINATE, n, s, b))] = 1
            if state in (SeedState.GERMINATED, SeedState.TRAINING, SeedState.PROBATION):
                obs["action_mask"][lay.encode(Action(ADVANCE, n, s))] = 1
    for name, values in node_values.items():
        obs["nodes"][:3, N[name]] = values
    return obs


def _germinate(layer, slot=0, blueprint=0):
    return ENV.unwrapped.layout.encode(Action(GERMINATE, layer, slot, blueprint))


def _agent(cls, **params):
    return cls(ENV.observation_space, ENV.action_space, TASK["blueprints"], **params)


# ------------------------------------------------------------------------------------ north
def test_north_grows_the_most_saturated_hidden_layer():
    agent = _agent(NorthAgent, threshold=0.3)
    # fc1 saturated (0.5), fc0 not (0.1); the output layer (0.9) is not a hidden layer.
    obs = _obs(eff_rank=[0.1, 0.5, 0.9])
    assert agent.act(obs) == _germinate(1)
    # Both hidden layers saturated: the more saturated one, fc0.
    assert _agent(NorthAgent, threshold=0.3).act(_obs(eff_rank=[0.6, 0.5, 0.9])) == _germinate(0)


def test_north_waits_below_threshold_while_a_seed_is_in_progress_and_late():
    agent = _agent(NorthAgent, threshold=0.3, late=0.7)
    assert agent.act(_obs(eff_rank=[0.1, 0.29, 1.0])) == 0  # nothing hidden is saturated
    assert agent.act(_obs(progress=0.75, eff_rank=[0.9, 0.9, 0.9])) == 0  # too late
    # A seed still blending: no new seed (it has not changed the function yet), nothing to
    # advance (BLENDING -> PROBATION is automatic), so WAIT.
    blending = _obs(eff_rank=[0.9, 0.9, 0.9], states={(0, 0): SeedState.BLENDING})
    assert agent.act(blending) == 0
    # A seed in TRAINING is advanced, not joined by another.
    training = _obs(eff_rank=[0.9, 0.9, 0.9], states={(0, 0): SeedState.TRAINING})
    assert agent.act(training) == ENV.unwrapped.layout.encode(Action(ADVANCE, 0, 0))


# ---------------------------------------------------------------------------------- fragrow
def _gap(obs, val, train):
    obs["globals"][G["val_acc"]], obs["globals"][G["train_acc"]] = val, train
    return obs


def test_fragrow_interval_follows_the_accuracy_gap():
    # I_max = late / growths = 0.4; at a zero gap with alpha 0 the interval is I_max / 2 = 0.2.
    params = {"growths": 2, "alpha": 0.0, "late": 0.8}
    assert _agent(FragrowAgent, **params).act(_gap(_obs(0.25), 0.8, 0.8)) == _germinate(0)
    # Overfitting (train 5 points above val): I = 0.4 / (1 + e^-5) = 0.397, not due at 0.25.
    assert _agent(FragrowAgent, **params).act(_gap(_obs(0.25), 0.8, 0.85)) == 0
    # Underfitting (train below val): I = 0.4 / (1 + e^5) = 0.003, due almost at once.
    assert _agent(FragrowAgent, **params).act(_gap(_obs(0.05), 0.8, 0.75)) == _germinate(0)
    assert _agent(FragrowAgent, **params).interval(_gap(_obs(), 0.8, 0.8)) == pytest.approx(0.2)


def test_fragrow_counts_from_the_last_growth_fills_front_to_back_and_stops():
    agent = _agent(FragrowAgent, growths=2, alpha=0.0, late=0.8)
    assert agent.act(_gap(_obs(0.25), 0.8, 0.8)) == _germinate(0)
    # 0.1 after the last growth (< 0.2): not yet, the seed on probation is advanced instead.
    probation = _gap(_obs(0.35, {(0, 0): SeedState.PROBATION}), 0.8, 0.8)
    assert agent.act(probation) == ENV.unwrapped.layout.encode(Action(ADVANCE, 0, 0))
    # Due: fc0 still has a free slot, so fc0 again (a layer fills before the next).
    due = _gap(_obs(0.46, {(0, 0): SeedState.FOSSILIZED}), 0.8, 0.8)
    assert agent.act(due) == _germinate(0, 1)
    # Two growths done: no third, however long it waits.
    full = {(0, 0): SeedState.FOSSILIZED, (0, 1): SeedState.FOSSILIZED}
    assert agent.act(_gap(_obs(0.75, full), 0.8, 0.8)) == 0


# ---------------------------------------------------------------------------------- gradmax
def test_gradmax_grows_on_its_clock_where_the_output_gradient_is_largest():
    agent = _agent(GradmaxAgent, interval=0.2, start=0.1, growths=2)
    grad = {"log_out_grad": [0.2, 0.5, 0.9]}  # the output layer's is largest but not hidden
    assert agent.act(_obs(0.05, **grad)) == 0  # before `start`
    assert agent.act(_obs(0.1, **grad)) == _germinate(1)
    busy = {(1, 0): SeedState.FOSSILIZED}
    assert agent.act(_obs(0.2, busy, **grad)) == 0  # next one due at 0.3
    # Due again: fc1 still has a free slot and the largest gradient mass.
    assert agent.act(_obs(0.3, busy, **grad)) == _germinate(1, 1)
    assert agent.act(_obs(0.9, busy, **grad)) == 0  # growths spent


def test_gradmax_takes_the_next_layer_when_the_mask_forbids_the_best():
    agent = _agent(GradmaxAgent, interval=0.2, start=0.0, growths=1)
    obs = _obs(0.0, log_out_grad=[0.2, 0.5, 0.9])
    lay = ENV.unwrapped.layout
    for s in range(lay.slots):
        for b in range(lay.blueprints):
            obs["action_mask"][lay.encode(Action(GERMINATE, 1, s, b))] = 0
    assert agent.act(obs) == _germinate(0)


def test_rules_advance_seeds_as_soon_as_the_mask_allows_and_never_cull():
    germinated = _obs(0.9, {(1, 1): SeedState.GERMINATED})
    # No growth due at progress 0.9 (past `late`; gradmax's first seed only at 0.95).
    for cls, params in ((NorthAgent, {}), (FragrowAgent, {}), (GradmaxAgent, {"start": 0.95})):
        agent = _agent(cls, **params)
        assert agent.act(germinated) == ENV.unwrapped.layout.encode(Action(ADVANCE, 1, 1)), (
            cls.__name__
        )


def test_bad_parameters_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match=r"threshold=1.5 must be a number in \(0, 1\]"):
        _agent(NorthAgent, threshold=1.5)
    with pytest.raises(ValueError, match=r"growths=0 must be an integer >= 1"):
        _agent(FragrowAgent, growths=0)
    with pytest.raises(ValueError, match=r"start=1.0 must be a number in \[0, 1\)"):
        _agent(GradmaxAgent, start=1.0)
    with pytest.raises(ValueError, match=r"gradmax params \['thresh'\] unknown; allowed: "):
        rule_params("spirals", "gradmax", {"thresh": 0.1})
    with pytest.raises(ValueError, match="must be a mapping"):
        rule_params("spirals", "north", [0.3])
    with pytest.raises(ValueError, match=r"no tuned north parameters for task 'cifar10'"):
        rule_params("cifar10", "north", None)


# -------------------------------------------------------------------------------- features
def test_effective_rank_is_the_share_of_the_width_in_use():
    torch.manual_seed(0)
    assert float(effective_rank(torch.eye(8))) == pytest.approx(1.0)  # every direction equal
    rank1 = torch.randn(64, 1) * torch.randn(1, 8)
    assert float(effective_rank(rank1)) == pytest.approx(1 / 8, rel=1e-4)
    two = torch.zeros(16, 4)
    two[:8, 0], two[8:, 1] = 1.0, 1.0  # two equal directions out of 4
    assert float(effective_rank(two)) == pytest.approx(0.5)
    assert float(effective_rank(torch.zeros(5, 3))) == 0.0
    conv = torch.randn(4, 6, 5, 5)  # units are channels: full rank over 100 positions
    assert 0.8 < float(effective_rank(conv)) <= 1.0
    for bad in (float("nan"), float("inf")):  # a diverging host must not make telemetry raise
        h = torch.randn(8, 4)
        h[0, 0] = bad
        assert float(effective_rank(h)) == 0.0


def test_the_output_gradient_mass_is_the_rms_per_sample_gradient():
    torch.manual_seed(0)
    layer = KasminaLayer(torch.nn.Linear(3, 4), 1, "fc")
    x = torch.randn(10, 3)
    layer.record = True
    out = layer(x)
    target = torch.randn(10, 4)
    loss = ((out - target) ** 2).sum(1).mean()  # per-sample gradient 2 * (out - target)
    loss.backward()
    per_sample = (2 * (out.detach() - target)).norm(dim=1)
    expected = float(per_sample.pow(2).mean().sqrt())
    sig = layer.health()
    assert sig.out_grad == pytest.approx(expected, rel=1e-5)
    assert 0 < sig.eff_rank <= 1


def test_new_features_carry_real_values_in_an_episode(kernel_dir):
    env = _env(kernel_dir=kernel_dir)
    obs, _ = env.reset(seed=0)
    train_accs = [float(obs["globals"][G["train_acc"]])]
    assert train_accs[0] == pytest.approx(float(obs["globals"][G["val_acc"]]))  # at reset
    agent = make_agent("gradmax", env, params={"interval": 0.2, "start": 0.0, "growths": 2})
    done, steps = False, 0
    while not done:
        obs, _, done, _, info = env.step(agent.act(obs))
        steps += 1
        n = int(obs["node_mask"].sum())
        rank = obs["nodes"][:n, N["eff_rank"]]
        assert np.all((rank > 0) & (rank <= 1)), rank
        assert np.all(obs["nodes"][:n, N["log_out_grad"]] > 0)
        train_accs.append(float(obs["globals"][G["train_acc"]]))
        ratio = info["params_added"] / env.unwrapped.host_params
        assert obs["globals"][G["log_params_ratio"]] == pytest.approx(math.log10(1 + ratio))
    assert all(0 <= a <= 1 for a in train_accs)
    assert len(set(train_accs)) > steps // 2  # it moves with training
    assert max(train_accs[1:]) > train_accs[0] + 0.05  # and it learns
    assert info["params_added"] > 0  # and gradmax grew


@pytest.mark.parametrize("name", ["north", "fragrow", "gradmax", "reactive"])
def test_the_rules_play_spirals_episodes_with_valid_actions(name, kernel_dir):
    assert name in AGENTS
    env = _env(contexts="train", kernel_dir=kernel_dir)
    agent = make_agent(name, env)  # params: None -> the values tuned for spirals
    metrics, events = play_episode(env, agent.act, seed=1)
    assert metrics["invalid_actions"] == 0 and metrics["length"] > 0
    assert not any(e.get("reason") == "agent" and e.get("to") == "CULLED" for e in events)


# --------------------------------------------------------------------------------- reactive
def _curve(agent, accs, train_gap=0.0, steps=10):
    """Feed `agent` a run whose val accuracy at step t (progress t / steps) is accs[t] (train
    accuracy `train_gap` above it); the actions it took."""
    actions = []
    for t, acc in enumerate(accs):
        obs = _obs(progress=t / steps)
        obs["globals"][G["val_acc"]] = acc
        obs["globals"][G["train_acc"]] = acc + train_gap
        actions.append(agent.act(obs))
    return actions


def test_reactive_grows_a_slow_learner_and_not_a_fast_one_nor_a_noisy_one():
    params = dict(look=0.3, min_slope=0.2, max_acc=0.75, max_gap=0.02, growths=3, window=2)
    # Slow: 0.30 -> 0.45 by progress 0.4, still rising (slope 0.4 per unit progress).
    slow = _curve(_agent(ReactiveAgent, **params), [0.30, 0.33, 0.36, 0.39, 0.42, 0.45, 0.48])
    # Fast: at 0.9 by progress 0.2 (converged: above max_acc), flat after.
    fast = _curve(_agent(ReactiveAgent, **params), [0.30, 0.70, 0.90, 0.91, 0.91, 0.91, 0.91])
    # Noisy: a plateau at 0.5 from progress 0.1 (slope 0 < min_slope once it reads, at 0.3).
    flat = _curve(_agent(ReactiveAgent, **params), [0.30, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50])
    # Noisy labels: slow and low, but training accuracy under validation accuracy.
    labels = _curve(
        _agent(ReactiveAgent, **params), [0.30, 0.33, 0.36, 0.39, 0.42, 0.45, 0.48], train_gap=-0.1
    )
    assert fast == flat == labels == [0] * 7
    # The slow run triggers at its first step past `look` (step 3, progress 0.3) and grows one
    # layer after another (this hand-built mask keeps every slot dormant, so the same slot
    # index), three seeds, then never again.
    assert slow[:3] == [0, 0, 0]
    assert slow[3:6] == [_germinate(0), _germinate(1), _germinate(2)]
    assert slow[6:] == [0]
    # "Slow" also bounds the slope from above: a fast learner (1.2 per unit progress) still
    # far from done is left alone with max_slope 0.8, while the slow run still grows.
    capped = {**params, "max_acc": 1.0, "max_slope": 0.8}
    quick = _curve(_agent(ReactiveAgent, **capped), [0.30, 0.42, 0.54, 0.66, 0.78, 0.90, 0.95])
    assert quick == [0] * 7
    assert (
        _curve(_agent(ReactiveAgent, **capped), [0.30, 0.33, 0.36, 0.39, 0.42, 0.45, 0.48]) == slow
    )


def test_reactive_restarts_with_each_episode_and_refuses_bad_thresholds():
    agent = _agent(ReactiveAgent, look=0.1, min_slope=0.2, max_acc=0.75, window=1, growths=1)
    first = _curve(agent, [0.3, 0.35, 0.4])
    again = _curve(agent, [0.3, 0.35, 0.4])  # progress restarts at 0: a new episode
    assert first == again and first.count(0) == 2
    with pytest.raises(ValueError, match="max_acc"):
        _agent(ReactiveAgent, max_acc=1.5)
    with pytest.raises(ValueError, match="min_slope"):
        _agent(ReactiveAgent, min_slope=float("nan"))
    with pytest.raises(ValueError, match="max_slope"):
        _agent(ReactiveAgent, max_slope="fast")
