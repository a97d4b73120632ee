"""Swappable components (reward computer, blueprint generator, Karn), the seed-outcome history
in the store, and telemetry that is measured and read."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import pickle
import sqlite3
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from esper_gym.actions import ADVANCE, CULL, GERMINATE, Action
from esper_gym.kasmina import SeedState
from esper_gym.kernels import BLUEPRINTS, BlueprintGenerator, KernelStore, SeedOutcome
from esper_gym.kernels.blueprints import ACTIVATIONS, DEFAULT_LIBRARY
from esper_gym.kernels.karn import ContributionPredictor, KarnGenerator, fit_outcomes
from esper_gym.observation import (
    GLOBAL_FEATURES,
    MEASURED_GLOBAL_FEATURES,
    MEASURED_NODE_FEATURES,
    NODE_FEATURES,
    SLOT_FEATURES,
)
from esper_gym.reward import RewardComputer, RewardWeights, StepOutcome
from tests.conftest import SMALL
from tests.test_train import ROOT, TINY, read_wandb_run

RESIDUAL = DEFAULT_LIBRARY.index("residual_mlp")


def make(kernel_dir, **kw):
    return gym.make("Esper/Spirals-v0", **{**SMALL, "kernel_dir": kernel_dir, **kw}).unwrapped


def germinate(env, layer=1, slot=0, blueprint=RESIDUAL):
    return env.step(env.layout.encode(Action(GERMINATE, layer, slot, blueprint)))


def advance(env, layer=1, slot=0):
    return env.step(env.layout.encode(Action(ADVANCE, layer, slot)))


# ------------------------------------------------------------------ generator protocol


class RecordingGenerator(BlueprintGenerator):
    """A user's generator: the smallest residual MLP, and what it was given."""

    def __init__(self):
        super().__init__()
        self.contexts, self.observed = [], []

    def propose(self, shape, kind, param_budget=None, context=None):
        self.contexts.append(context)
        return dataclasses.replace(BLUEPRINTS[kind](), hidden=3)

    def observe(self, outcome):
        self.observed.append(outcome)


def test_a_generator_of_your_own_is_used_given_context_and_told_outcomes(tmp_path):
    gen = RecordingGenerator()
    env = make(str(tmp_path), generator=gen)
    _, first = env.reset(seed=0)
    _, _, _, _, info = germinate(env)
    (context,) = gen.contexts
    assert env.layers[1].slots[0].params == 2 * 16 * 3 + 3 + 16  # its variant, not the template's
    assert info["params_added"] == env.layers[1].slots[0].params
    assert context.store is env.store and context.rng is env.np_random
    assert context.task == "spirals" and context.host_params == env.host_params
    assert context.features["fan_in"] == 16 and 0 <= context.features["dead_ratio"] <= 1
    assert context.features["progress"] == 0.0
    assert context.features["val_acc"] == first["val_acc"]  # the node as the agent saw it
    advance(env)
    env.step(env.layout.encode(Action(CULL, 1, 0)))
    (outcome,) = gen.observed
    assert outcome.fate == "culled" and outcome.blueprint["hidden"] == 3
    assert env.store.outcomes()[-1] == outcome


def test_a_generator_that_offers_one_kind_and_a_bad_generator(tmp_path):
    class LowRankOnly:
        def fits(self, shape, kind, budget):
            return kind == "low_rank"

        def propose(self, shape, kind, budget, context):
            return BLUEPRINTS["low_rank"](rank=2)

    env = make(str(tmp_path), generator=LowRankOnly())
    obs, _ = env.reset(seed=0)
    low_rank = env.layout.encode(Action(GERMINATE, 1, 0, DEFAULT_LIBRARY.index("low_rank")))
    assert obs["action_mask"][low_rank] and not obs["action_mask"][low_rank - 1]
    env.step(low_rank)
    assert env.layers[1].slots[0].params == 2 * 16 * 2
    with pytest.raises(TypeError, match=r"generator=.* lacks \['propose'\]"):
        make(str(tmp_path), generator=type("G", (), {"fits": len})())


def test_generator_goes_through_gym_make_and_pickles(tmp_path):
    env = gym.make("Esper/Spirals-v0", kernel_dir=str(tmp_path), generator=KarnGenerator(explore=1))
    clone = pickle.loads(pickle.dumps(env.unwrapped))
    assert isinstance(clone.generator, KarnGenerator) and clone.generator.explore == 1.0


@pytest.mark.slow
def test_karn_runs_in_spawned_vector_env_workers(tmp_path):
    fns = [
        lambda: gym.make(
            "esper_gym:Esper/Spirals-v0",
            **SMALL,
            kernel_dir=str(tmp_path),
            generator=KarnGenerator(explore=1.0),
        )
    ] * 2
    venv = gym.vector.AsyncVectorEnv(fns, shared_memory=False, context="spawn")
    venv.reset(seed=0)
    action = np.full(2, 1 + RESIDUAL, np.int64)  # GERMINATE(layer 0, slot 0, residual_mlp)
    _, _, _, _, info = venv.step(action)
    venv.close()
    assert (info["params_added"] > 0).all()


# ---------------------------------------------------------------- outcomes in the store


def test_fossilized_culled_and_live_seeds_leave_their_outcomes(tmp_path):
    env = make(str(tmp_path))
    env.reset(seed=0)
    germinate(env, 1, 0)
    advance(env, 1, 0)  # TRAINING
    germinate(env, 0, 0)
    advance(env, 1, 0)  # BLENDING (8 steps: PROBATION after one interval)
    _, _, _, _, info = advance(env, 1, 0)  # PROBATION -> FOSSILIZED
    assert env.layers[1].slots[0].state == SeedState.FOSSILIZED
    assert info["outcomes_recorded"] == 1
    (fossil,) = env.store.outcomes()
    assert fossil.fate == "fossilized" and fossil.kind == "residual_mlp"
    assert fossil.contribution == env.layers[1].slots[0].contribution
    assert fossil.params == env.layers[1].slots[0].params == 2 * 16 * 64 + 64 + 16
    assert fossil.shape == (16,) and fossil.host_params == env.host_params
    assert fossil.features["fan_out"] == 16 and fossil.features["progress"] == 0.0
    assert fossil.age == 5 * env.task.decision_interval  # germinated before step 1, ended in 5
    term = False
    while not term:
        _, _, term, _, info = env.step(0)
    last = env.store.outcomes()[-1]
    assert last.fate == "live" and last.shape == (16,) and last.features["fan_in"] == 2
    assert info["outcomes_recorded"] == 2 and len(env.store.outcomes()) == 2
    # The ceiling's grafted seeds are not the agent's: no outcome.
    env.reset(seed=0, options={"grow": "residual_mlp"})
    while not env.step(0)[2]:
        pass
    assert len(env.store.outcomes()) == 2


RMLP = '{"activation": "gelu", "hidden": 64, "init_scale": 1.0, "name": "residual_mlp"}'


def hostile_rows(path):
    db = sqlite3.connect(path)
    cols = "task, kind, blueprint, shape, features, contribution, params, host_params, fate, age"
    rows = [
        ("s", "norm", '{"name": "norm"}', "[16]", '{"a": NaN}', 0.1, 32, 405, "culled", 3),
        ("s", "norm", '{"name": "norm"}', "[16]", "{}", float("nan"), 32, 405, "culled", 3),
        ("s", "norm", '{"name": "norm"}', "[16]", "{}", 0.1, "many", 405, "culled", 3),
        ("s", "norm", '{"name": "low_rank"}', "[16]", "{}", 0.1, 32, 405, "culled", 3),
        ("s", "norm", '{"name": "norm"}', "[16, -1]", "{}", 0.1, 32, 405, "culled", 3),
        ("s", "norm", '{"name": "norm"}', "[16]", "{}", 0.1, 32, 405, "eaten", 3),
        ("s", "norm", '{"name": "norm"}', "[16]", "[" * 5000, 0.1, 32, 405, "culled", 3),
        ("s", "norm", '{"name": "norm"}', "[16]", "{}", 0.1, 32, 405, "culled", b"\x80\x04"),
        ("s", "norm", "__import__('os')", "[16]", "{}", 0.1, 32, 405, "culled", 3),
        # Rows that pass a shape-only check but poison Karn (log of init_scale) or name what
        # the registry does not hold.
        ("s", "residual_mlp", RMLP.replace("1.0", "-1"), "[16]", "{}", 0.1, 32, 405, "culled", 3),
        ("s", "residual_mlp", RMLP.replace("1.0", '"x"'), "[16]", "{}", 0.1, 32, 405, "culled", 3),
        ("s", "residual_mlp", RMLP.replace("64", "true"), "[16]", "{}", 0.1, 32, 405, "culled", 3),
        ("s", "residual_mlp", RMLP.replace("64", "1e9"), "[16]", "{}", 0.1, 32, 405, "culled", 3),
        ("s", "residual_mlp", RMLP[:-1] + ', "x": 1}', "[16]", "{}", 0.1, 32, 405, "culled", 3),
        ("s", "norm", '{"name": "norm"}', "[16]", '{"progress": 1e300}', 0.1, 32, 405, "culled", 3),
        ("s", "norm", '{"name": "norm"}', "[16]", "{}", 0.1, 32, 405, "culled", 2**60),
    ]
    db.executemany(f"INSERT INTO outcomes ({cols}) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
    db.commit()
    db.close()
    return len(rows)


def test_malformed_outcome_rows_are_skipped_never_trusted(tmp_path):
    store = KernelStore(tmp_path)
    good = SeedOutcome("s", "norm", {"name": "norm"}, (16,), {"a": 1.0}, 0.1, 32, 405, "culled", 3)
    store.record_outcome(good)
    bad = hostile_rows(tmp_path / "index.sqlite")
    got = store.outcomes()
    assert list(got) == [good] and got.skipped == bad and got.problems
    assert store.outcomes(kind="low_rank") == []
    with pytest.raises(ValueError, match="fate 'x'"):
        dataclasses.replace(good, fate="x")
    # Karn reads the same history and proposes on it without a crash, and says what it skipped.
    gen = KarnGenerator(explore=0.0, min_history=1)
    ctx = _context(store)
    with pytest.warns(UserWarning, match=f"skipped {bad} malformed outcome row"):
        assert gen.propose((16,), "residual_mlp", 5000, ctx).name == "residual_mlp"
    assert gen.last_choice == "predicted"
    # The shipped blueprints' own values (a bool among them) are what a row may hold.
    conv = SeedOutcome(
        "s", "conv3x3", BLUEPRINTS["conv3x3"]().to_dict(), (8, 4, 4), {}, 0.0, 1, 9, "live", 0
    )
    store.record_outcome(conv)
    assert store.outcomes(kind="conv3x3") == [conv]
    with pytest.raises(ValueError, match="init_scale must be a number in"):
        dataclasses.replace(conv, blueprint={**conv.blueprint, "init_scale": -1.0})
    with pytest.raises(ValueError, match="norm=1 must be a bool"):
        dataclasses.replace(conv, blueprint={**conv.blueprint, "norm": 1})


# ------------------------------------------------------------------------------- Karn


def _context(store, seed=0, **features):
    from esper_gym.kernels import ProposalContext

    return ProposalContext(
        features={"progress": 0.1, "dead_ratio": 0.2, **features},
        host_params=405,
        task="spirals",
        store=store,
        rng=np.random.default_rng(seed),
    )


def _synthetic_history(store, rng, n=120):
    """Contribution that pays for relu and for size, with noise: Karn must find both."""
    gen = KarnGenerator()
    variants = gen.variants((16,), "residual_mlp", 5000)
    for _ in range(n):
        bp = variants[int(rng.integers(len(variants)))]
        params = bp.param_count((16,))
        contribution = 0.05 * (bp.activation == "relu") + 0.01 * math.log2(params) - 0.05
        contribution += 0.002 * float(rng.normal())
        features = {"progress": float(rng.random()), "dead_ratio": float(rng.random())}
        store.record_outcome(
            SeedOutcome(
                "spirals", "residual_mlp", bp.to_dict(), (16,), features,
                contribution, params, 405, "fossilized", 10,
            )
        )  # fmt: skip


def test_karn_learns_which_variant_pays_and_explores_from_the_env_rng(tmp_path):
    store = KernelStore(tmp_path)
    _synthetic_history(store, np.random.default_rng(0))
    history = store.outcomes()
    predictor = fit_outcomes(history[:90])
    held_out = history[90:]
    from esper_gym.kernels.karn import outcome_features

    pred = predictor.predict(np.stack([outcome_features(o) for o in held_out]))
    truth = np.asarray([o.contribution for o in held_out])
    assert np.abs(pred - truth).mean() < 0.2 * np.abs(truth).mean()  # within 20%
    greedy = KarnGenerator(explore=0.0, objective="reward")
    best = greedy.propose((16,), "residual_mlp", 5000, _context(store))
    assert best.activation == "relu" and greedy.last_choice == "predicted"
    per_param = KarnGenerator(explore=0.0).propose((16,), "residual_mlp", 5000, _context(store))
    assert per_param.activation == "relu"
    assert per_param.param_count((16,)) <= best.param_count((16,))
    # Exploring: drawn from the context's RNG, so the same seed gives the same proposals.
    explorer = KarnGenerator(explore=1.0)
    a = [explorer.propose((16,), "residual_mlp", 5000, _context(store, seed=7)) for _ in range(3)]
    b = [explorer.propose((16,), "residual_mlp", 5000, _context(store, seed=7)) for _ in range(3)]
    assert a == b and explorer.last_choice == "explore"
    ctx = _context(store, seed=7)
    draws = {explorer.propose((16,), "residual_mlp", 5000, ctx) for _ in range(20)}
    assert len(draws) > 3
    # Every variant fits the budget; without a context Karn is the template generator.
    assert all(v.param_count((16,)) <= 1000 for v in explorer.variants((16,), "residual_mlp", 1000))
    assert KarnGenerator().propose((16,), "residual_mlp", 5000) == BlueprintGenerator().propose(
        (16,), "residual_mlp", 5000
    )


def test_karn_variants_are_real_hyper_parameters_that_compile(tmp_path):
    from esper_gym.kernels import KernelCache, load_or_compile

    store = KernelStore(tmp_path)
    cache = KernelCache(store)
    variants = KarnGenerator().variants((16,), "residual_mlp", 5000)
    assert {v.activation for v in variants} == set(ACTIVATIONS)
    assert {v.init_scale for v in variants} == {0.5, 1.0, 2.0}
    assert len({v.hidden for v in variants}) == 4
    x = torch.randn(4, 16)
    for v in (variants[0], variants[-1]):  # smallest and largest, different activations/scales
        kernel, meta = load_or_compile(v, (16,), store, cache)
        assert meta.blueprint == v.to_dict() and torch.equal(kernel(x), torch.zeros_like(x))
    # init_scale scales the first layer's default init, nothing else.
    one = BLUEPRINTS["residual_mlp"](hidden=8)
    two = dataclasses.replace(one, init_scale=2.0, activation="tanh")
    torch.manual_seed(0)
    a = one.build((16,))
    torch.manual_seed(0)
    b = two.build((16,))
    assert torch.equal(b[0].weight, 2 * a[0].weight) and torch.equal(b[2].weight, a[2].weight)
    assert isinstance(b[1], torch.nn.Tanh) and isinstance(a[1], torch.nn.GELU)
    with pytest.raises(ValueError, match="activation='swish'; allowed: gelu, relu, tanh"):
        BLUEPRINTS["residual_mlp"](activation="swish")
    with pytest.raises(ValueError, match="init_scale must be a number in"):
        BLUEPRINTS["low_rank"](init_scale=0.0)
    with pytest.raises(ValueError, match="objective='best'; allowed: per_param, reward"):
        KarnGenerator(objective="best")
    with pytest.raises(ValueError, match="explore=2 must be a fraction"):
        KarnGenerator(explore=2)


def test_ridge_predictor_recovers_a_linear_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = x @ np.array([1.0, -2.0, 0.0, 0.5]) + 3.0
    model = ContributionPredictor(alpha=1e-6).fit(x, y)
    assert np.allclose(model.predict(x), y, atol=1e-4)
    assert ContributionPredictor().fit(x, y).chosen_alpha <= 1.0  # signal: a light penalty
    noise = rng.normal(size=200)  # features that predict nothing: shrunk to the mean
    shrunk = ContributionPredictor().fit(x, noise)
    assert shrunk.chosen_alpha >= 100
    assert np.abs(shrunk.predict(x) - noise.mean()).max() < 0.1 * noise.std()
    with pytest.raises(RuntimeError, match="predict before fit"):
        ContributionPredictor().predict(x)


# ------------------------------------------------------------------ the activation kernel


def test_activation_blueprint_is_a_per_channel_gate_that_starts_at_zero(tmp_path):
    env = make(str(tmp_path), blueprints=(*DEFAULT_LIBRARY, "activation"))
    env.reset(seed=0)
    act = len(DEFAULT_LIBRARY)  # appended last: the other GERMINATE indices are unchanged
    assert env.action_space.n == 1 + env.task.max_nodes * env.task.seed_slots * (act + 3)
    env.step(env.layout.encode(Action(GERMINATE, 1, 0, act)))
    slot = env.layers[1].slots[0]
    assert slot.blueprint == "activation" and slot.params == 3 * 16
    for _ in range(3):
        advance(env)
    kernel = env.layers[1].kernels["0"]
    gain = dict(kernel.named_parameters())
    assert any(p.abs().sum() > 0 for p in gain.values())  # it learned while training
    conv = BLUEPRINTS["activation"]().build((4, 5, 5))
    assert sum(p.numel() for p in conv.parameters()) == 12
    assert torch.equal(conv(torch.randn(2, 4, 5, 5)), torch.zeros(2, 4, 5, 5))


# -------------------------------------------------------------------- telemetry, reward


def test_telemetry_counts_compiles_loads_hits_and_times_seeds(tmp_path):
    plain = make(str(tmp_path))
    _, info = plain.reset(seed=0)
    assert "telemetry" not in info and plain.telemetry_stats()["kernel_compiles"] == 0
    env = make(str(tmp_path), telemetry="measured")
    _, info = env.reset(seed=0)
    t = info["telemetry"]
    assert (t["cache_hits"], t["kernel_loads"], t["kernel_compiles"]) == (0, 0, 0)
    assert math.isnan(t["cache_hit_rate"]) and t["seed_latency_ms"] == {}
    _, _, _, _, info = germinate(env, 1, 0)
    t = info["telemetry"]
    assert (t["cache_hits"], t["kernel_loads"], t["kernel_compiles"]) == (0, 1, 1)
    _, _, _, _, info = germinate(env, 1, 1)  # the same recipe: served from memory
    t = info["telemetry"]
    assert (t["cache_hits"], t["kernel_loads"], t["kernel_compiles"]) == (1, 1, 1)
    assert t["cache_hit_rate"] == 0.5
    _, _, _, _, info = advance(env, 1, 0)
    assert info["telemetry"]["seed_latency_ms"]["fc1.0"] > 0  # measured, running
    assert "fc1.1" not in info["telemetry"]["seed_latency_ms"]  # GERMINATED: not running
    # A new episode on the same store: nothing compiled, the cache still holds the kernel.
    _, info = env.reset(seed=1)
    assert info["telemetry"]["kernel_compiles"] == 0
    _, _, _, _, info = germinate(env, 1, 0)
    assert info["telemetry"]["cache_hits"] == 1 and info["telemetry"]["kernel_compiles"] == 0


def test_measured_telemetry_is_an_opt_in_observation(tmp_path):
    plain = make(str(tmp_path))
    env = make(str(tmp_path), telemetry="measured")
    base = len(NODE_FEATURES) + env.task.seed_slots * len(SLOT_FEATURES)
    assert plain.observation_space["nodes"].shape[1] == base
    assert env.observation_space["nodes"].shape[1] == base + len(MEASURED_NODE_FEATURES)
    assert env.observation_space["globals"].shape == (
        len(GLOBAL_FEATURES) + len(MEASURED_GLOBAL_FEATURES),
    )
    env.reset(seed=0)
    germinate(env, 1, 0)
    obs, *_ = advance(env, 1, 0)
    assert env.observation_space.contains(obs)
    node = obs["nodes"][1]
    lat, seed_lat, fault_rate = node[base:]
    assert lat > 0 and seed_lat > 0 and fault_rate == 0
    assert obs["nodes"][0][base + 1] == 0  # no seed runs on layer 0
    g = obs["globals"][len(GLOBAL_FEATURES) :]
    assert (
        g[0] == 0.0
        and g[1] == pytest.approx(math.log1p(1))
        and g[2] == pytest.approx(math.log1p(1))
    )
    # The heuristic reads the layout from the spaces, measured or not.
    from esper_gym.agents.baselines import HeuristicAgent

    agent = HeuristicAgent(env.observation_space, env.action_space)
    assert agent.layout == env.layout and env.action_space.contains(agent.act(obs))
    with pytest.raises(ValueError, match="telemetry='wallclock'; allowed: off, measured"):
        make(str(tmp_path), telemetry="wallclock")


def test_latency_cost_on_measured_time(tmp_path):
    outcome = StepOutcome(0.5, 0.5, 1.0, 1.0, 0, 0, False, False, False, 1, latency_ratio=3.0)
    macs = RewardComputer()(outcome)[1]["latency_cost"]
    measured = RewardComputer(latency="measured")(outcome)[1]["latency_cost"]
    assert macs == pytest.approx(-0.05 * 1.0) and measured == pytest.approx(-0.05 * 2.0)
    nan = dataclasses.replace(outcome, latency_ratio=math.nan)
    assert RewardComputer(latency="measured")(nan)[1]["latency_cost"] == 0.0
    with pytest.raises(ValueError, match="latency='wall'; allowed: macs, measured"):
        RewardComputer(latency="wall")
    env = make(str(tmp_path), reward_fn=RewardComputer(latency="measured"))
    env.reset(seed=0)
    germinate(env, 1, 0)
    _, _, _, _, info = advance(env, 1, 0)
    ms = env.telemetry_stats()["seed_latency_ms"]["fc1.0"]
    assert ms > 0 and info["reward_components"]["latency_cost"] < 0


# -------------------------------------------------- the contracts the issue asks tests for


def test_contributions_are_measured_not_left_at_zero(tmp_path):
    env = make(str(tmp_path))
    env.reset(seed=0)
    germinate(env, 1, 0)
    advance(env, 1, 0)  # TRAINING: contribution = accuracy with alpha 1 minus without
    col = len(NODE_FEATURES) + SLOT_FEATURES.index("contribution")
    seen = []
    for _ in range(3):
        obs, *_ = env.step(0)
        seen.append(env.layers[1].slots[0].contribution)
        assert obs["nodes"][1][col] == pytest.approx(seen[-1] * 10, abs=1e-6)
    # On 256 validation samples one sample is 1/256: a seed that changes nothing stays at 0.
    assert max(abs(c) for c in seen) >= 1 / env.task.contribution_size, seen
    # Measured by hand: accuracy with the seed at alpha 1 minus without it.
    n = env.task.contribution_size
    x, y = env.trainer.x_val[:n], env.trainer.y_val[:n]
    off, _ = env.trainer.evaluate(x, y)
    with env.layers[1].seed_override(0, 1.0):
        on, _ = env.trainer.evaluate(x, y)
    assert env.layers[1].slots[0].contribution == pytest.approx(on - off)


def test_ceiling_reset_grows_every_slot_it_can(tmp_path):
    env = make(str(tmp_path))
    obs, info = env.reset(seed=0, options={"grow": ["conv3x3", "residual_mlp"]})
    gen = BlueprintGenerator(env.task.blueprints)
    expected = 0
    for layer in env.layers:
        fits = gen.fits(layer.out_shape, "residual_mlp", env.task.param_budget)
        for slot in layer.slots:
            if fits:  # conv3x3 fits no linear slot: the next preference does
                assert slot.state == SeedState.FOSSILIZED and slot.blueprint == "residual_mlp"
                assert slot.alpha == 1.0
                expected += gen.propose(layer.out_shape, "residual_mlp", 5000).param_count(
                    layer.out_shape
                )
            else:
                assert slot.state == SeedState.DORMANT
    assert info["params_added"] == expected > 0
    grown = env.layout.encode(Action(GERMINATE, 1, 0, RESIDUAL))
    assert not obs["action_mask"][grown]  # a fossil's slot cannot germinate
    _, _, _, _, info = env.step(0)
    assert info["params_added"] == expected  # the fossils stay and train with the host
    assert any(abs(s.contribution) > 0 for layer in env.layers for s in layer.slots)
    env.reset(seed=0)
    assert all(s.state == SeedState.DORMANT for layer in env.layers for s in layer.slots)


def test_a_loss_spike_is_detected_and_costs_stability(tmp_path):
    env = make(str(tmp_path))
    env.reset(seed=0)
    for _ in range(2):
        _, _, _, _, info = env.step(0)
        assert info["loss_spikes"] == 0
    with torch.no_grad():  # a sudden jump of the logits' scale: the loss jumps, stays finite
        env.layers[-1].host.weight.mul_(40.0)
    _, _, _, _, info = env.step(0)
    assert info["loss_spikes"] >= 1 and not info["diverged"]
    assert info["reward_components"]["stability"] == pytest.approx(
        -env.reward_fn.weights.stability * info["loss_spikes"]
    )


def test_a_corrupt_artifact_in_the_store_is_a_load_fault_inside_the_env(tmp_path):
    env = make(str(tmp_path))
    env.reset(seed=0)
    germinate(env, 1, 0)
    sha = env.layers[1].slots[0].kernel_sha
    path = env.store.path(sha)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = make(str(tmp_path))  # a new process's env: nothing in memory, the store is read
    fresh.reset(seed=0)
    _, _, term, _, info = germinate(fresh, 1, 0)
    assert info["fault_kinds"] == ["load"] and info["faults"] == 1
    assert fresh.layers[1].slots[0].state == SeedState.DORMANT and info["params_added"] == 0
    assert info["reward_components"]["fault"] == -fresh.reward_fn.weights.fault
    assert not term and fresh.layers[1].slots[0].calls == 0
    _, _, _, _, info = fresh.step(0)  # the run goes on
    assert info["faults"] == 0 and 0 < info["val_acc"] <= 1


# ------------------------------------------------------------------- from the command line


def test_own_reward_class_and_karn_from_the_command_line(tmp_path):
    """`reward.computer._target_=<a class on PYTHONPATH>`: the returns in results.json are its
    rewards; `generator=karn`: the store holds the seed outcome history afterwards; the
    episode's telemetry reaches the W&B (offline) episode log."""
    (tmp_path / "mylab.py").write_text(
        "class MyReward:\n"
        "    def __call__(self, outcome):\n"
        "        gain = outcome.val_acc - outcome.val_acc_before\n"
        "        return 0.25 + gain, {'bonus': 0.25, 'gain': gain}\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "HYDRA_FULL_ERROR": "1"}
    env["WANDB_SILENT"] = "true"
    env.pop("WANDB_MODE", None)
    run_dir, kernels = tmp_path / "run", tmp_path / "kernels"
    cmd = [sys.executable, "-m", "esper_gym.train", "agent=heuristic", "generator=karn"]
    cmd += ["reward.computer._target_=mylab.MyReward", "logger=wandb", "eval.episodes=1"]
    cmd += ["eval.compare=[]", "logger.progress=false", *TINY]
    cmd += [f"env.kernel_dir={kernels}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (episode,) = json.loads((run_dir / "results.json").read_text())["eval"]["heuristic"]["episodes"]
    assert episode["reward/bonus"] == pytest.approx(0.25 * episode["length"])
    assert episode["return"] == pytest.approx(episode["reward/bonus"] + episode["reward/gain"])
    assert "reward/accuracy" not in episode  # the default computer was replaced
    assert episode["telemetry/kernel_compiles"] >= 1  # a fresh store: Karn's variants compiled
    outcomes = KernelStore(kernels).outcomes()
    assert len(outcomes) == episode["outcomes_recorded"] >= 1 and outcomes.skipped == 0
    assert all(o.task == "spirals" and o.host_params == episode["host_params"] for o in outcomes)
    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    (row,) = [r for r in read_wandb_run(str(wandb_dir))["history"] if "eval/heuristic/return" in r]
    assert row["eval/heuristic/telemetry/kernel_compiles"] == episode["telemetry/kernel_compiles"]
    assert row["eval/heuristic/reward/bonus"] == pytest.approx(episode["reward/bonus"])
    assert "eval/heuristic/telemetry/cache_hit_rate" in row


def test_a_reward_class_that_is_not_there_is_named(tmp_path):
    from tests.test_train import train

    proc = train(tmp_path, "agent=heuristic", "reward.computer._target_=nolab.Nope", check=False)
    assert proc.returncode != 0
    assert "reward.computer._target_='nolab.Nope' cannot be imported" in proc.stderr


def test_config_error_messages_name_the_generator_key():
    from esper_gym import train
    from tests.test_config import load

    cfg = load("generator=karn", "generator.explore=2.0")
    with pytest.raises(
        train.ConfigError, match=r"generator \(esper_gym.kernels.karn.KarnGenerator\).*explore=2.0"
    ):
        train.validate(cfg)
    assert isinstance(train.build_generator(load("generator=karn")), KarnGenerator)
    assert type(train.build_generator(load())) is BlueprintGenerator
    fn = train.build_reward_fn(load("reward=measured_latency", "reward.weights.param_cost=0.3"))
    assert fn.latency == "measured" and fn.weights.param_cost == 0.3
    assert type(fn.weights) is RewardWeights  # the dataclass, not a DictConfig wrapping it
    assert type(train.build_reward_fn(load()).weights) is RewardWeights
    assert pathlib.Path(train.CONF_DIR, "generator", "karn.yaml").is_file()


def test_a_tasks_own_reward_weights_hold_under_the_config_unless_a_weight_is_set(tmp_path):
    """spirals_budget prices parameters at 0.5 (its Task.reward_weights): the Hydra entry points
    keep that unless the user sets reward.weights.param_cost, and a replay record carries the
    weights in force, which validate takes as the registered task's."""
    from esper_gym import config
    from esper_gym.bench import records
    from esper_gym.bench.jobs import Job, resolve_tasks, run_job
    from tests.test_config import load

    task = config.build_task(load("task=spirals_budget"))
    assert config.build_reward_fn(load("task=spirals_budget"), task).weights.param_cost == 0.5
    set_ = load("task=spirals_budget", "reward.weights.param_cost=0.2")
    assert config.build_reward_fn(set_, task).weights.param_cost == 0.2
    spirals = config.build_task(load())
    assert config.build_reward_fn(load(), spirals).weights.param_cost == 0.05
    assert config.build_reward_weights(load("reward.weights.fault=1.0")) == {"fault": 1.0}
    (spec,) = resolve_tasks(["spirals_budget"], overrides={"spirals_budget": {"max_epochs": 1.0}})
    out = run_job(Job("noop", spec, seed=3, kernel_dir=str(tmp_path), reward_weights={}))
    weights = out["replay"]["env_kwargs"]["reward_weights"]
    assert weights["param_cost"] == 0.5 and weights["accuracy"] == 10.0
    diffs = records.differences(out["replay"])
    assert not [d for d in diffs if d.startswith("reward_weights")], diffs
