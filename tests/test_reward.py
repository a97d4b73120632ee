import gymnasium as gym
import pytest

from esper_gym.actions import ADVANCE, CULL, GERMINATE, Action
from esper_gym.kasmina import SeedState
from esper_gym.reward import RewardComputer, RewardWeights, StepOutcome
from tests.conftest import SMALL

S = SeedState


def outcome(**kw):
    base = dict(
        val_acc_before=0.5,
        val_acc=0.5,
        param_ratio=0.0,
        macs_ratio=0.0,
        loss_spikes=0,
        faults=0,
        invalid_action=False,
        intervened=False,
        diverged=False,
    )
    return StepOutcome(**{**base, **kw})


def test_components_are_the_weighted_terms():
    w = RewardWeights(
        accuracy=10,
        param_cost=0.5,
        latency_cost=0.25,
        stability=0.1,
        fault=0.2,
        invalid_action=0.3,
        intervention=0.05,
        divergence=5,
    )
    reward, c = RewardComputer(w)(
        outcome(
            val_acc=0.6,
            param_ratio=1.0,  # one doubling: log2(2) = 1
            macs_ratio=3.0,  # two doublings: log2(4) = 2
            loss_spikes=2,
            faults=3,
            invalid_action=True,
            intervened=True,
            episode_steps=2,
        )
    )
    assert c == pytest.approx(
        {
            "accuracy": 1.0,
            "param_cost": -0.25,  # 0.5 * 1 / 2 steps
            "latency_cost": -0.25,  # 0.25 * 2 / 2 steps
            "stability": -0.2,
            "fault": -0.6,
            "invalid_action": -0.3,
            "intervention": -0.05,
            "divergence": 0.0,
        }
    )
    assert reward == pytest.approx(sum(c.values()))
    _, c = RewardComputer(w)(outcome(val_acc=0.1, diverged=True))
    assert c["divergence"] == -5 and c["accuracy"] == 0.0


def test_weights_are_checked():
    with pytest.raises(TypeError, match="param_cost='high'"):
        RewardWeights(param_cost="high")
    with pytest.raises(ValueError, match="fault=-1"):
        RewardWeights(fault=-1)


# ------------------------------------------------------------------ exploits
def first(mask, layout, kind, states, env):
    """First slot action of `kind` valid now on a slot in one of `states`."""
    for n, layer in enumerate(env.layers):
        for s, slot in enumerate(layer.slots):
            if slot.state not in states:
                continue
            for b in range(layout.blueprints if kind == GERMINATE else 1):
                a = layout.encode(Action(kind, n, s, b))
                if mask[a]:
                    return a
    return None


def germinate_cull_cycles(env, mask):
    return (
        first(mask, env.layout, CULL, {S.GERMINATED, S.TRAINING}, env)
        or first(mask, env.layout, GERMINATE, {S.DORMANT}, env)
        or 0
    )


def advance_cull_churn(env, mask):
    return (
        first(mask, env.layout, CULL, {S.BLENDING, S.PROBATION}, env)
        or first(mask, env.layout, ADVANCE, {S.GERMINATED, S.TRAINING}, env)
        or first(mask, env.layout, GERMINATE, {S.DORMANT}, env)
        or 0
    )


def park_seeds(env, mask):
    return (
        first(mask, env.layout, ADVANCE, {S.GERMINATED}, env)
        or first(mask, env.layout, GERMINATE, {S.DORMANT}, env)
        or 0
    )


def wait(env, mask):
    return 0


def episode_return(policy, seed, kernel_dir):
    env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **SMALL).unwrapped
    env.reset(seed=seed)
    total, done, actions = 0.0, False, 0
    while not done:
        a = policy(env, env.action_masks())
        actions += a != 0
        _, r, done, _, info = env.step(a)
        assert not info["invalid_action"]
        total += r
    return total, actions


@pytest.mark.parametrize("exploit", [germinate_cull_cycles, advance_cull_churn, park_seeds])
@pytest.mark.parametrize("seed", [0, 1])
def test_exploits_lose_against_wait(exploit, seed, kernel_dir):
    baseline, _ = episode_return(wait, seed, kernel_dir)
    farmed, actions = episode_return(exploit, seed, kernel_dir)
    assert actions >= 3  # the exploit really acted
    assert farmed < baseline, (exploit.__name__, farmed, baseline)
