"""Tamiyo: the graph policy's action layout and masking, checkpoints, and that PPO learns."""

from __future__ import annotations

import functools
import math
import shutil
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Categorical

from esper_gym.actions import ActionLayout
from esper_gym.agents.tamiyo import (
    MASKED,
    GuardConfig,
    PPOConfig,
    TamiyoPolicy,
    TrainingCollapse,
    check_guards,
    env_record,
    load_checkpoint,
    obs_to_batch,
    save_checkpoint,
    train,
)
from esper_gym.kernels.blueprints import DEFAULT_LIBRARY
from esper_gym.observation import GLOBAL_FEATURES, GraphSpec, observation_space, to_pyg

torch.set_num_threads(1)

LAYOUT = ActionLayout(max_nodes=8, slots=2, blueprints=3)  # per_node = 10, A = 81
SPEC = GraphSpec(max_nodes=8, slots=2)


def make_obs(n_nodes: int, seed: int, spec=SPEC, layout=LAYOUT, valid: float = 0.5) -> dict:
    """An observation of `observation_space(spec, layout.size)`: random features on a prefix of
    `n_nodes` real nodes, a chain of real edges, WAIT and a random share of the real nodes'
    actions valid."""
    rng = np.random.default_rng(seed)
    n, e = spec.max_nodes, spec.max_edges
    nodes = np.zeros((n, spec.node_dim), np.float32)
    nodes[:n_nodes] = rng.normal(size=(n_nodes, spec.node_dim))
    edges = np.zeros((e, 2), np.int64)
    edge_attr = np.zeros((e, 2), np.float32)
    for i in range(n_nodes - 1):
        edges[i] = (i, i + 1)
        edge_attr[i] = (1.0, rng.random())
    mask = np.zeros(layout.size, np.int8)
    mask[0] = 1
    real = 1 + n_nodes * layout.per_node
    mask[1:real] = rng.random(real - 1) < valid
    obs = {
        "nodes": nodes,
        "edges": edges,
        "edge_attr": edge_attr,
        "node_mask": (np.arange(n) < n_nodes).astype(np.int8),
        "globals": rng.normal(size=len(GLOBAL_FEATURES)).astype(np.float32),
        "action_mask": mask,
    }
    return obs


def stack(observations: list[dict]) -> dict:
    return {k: np.stack([o[k] for o in observations]) for k in observations[0]}


def policy_for(spec=SPEC, layout=LAYOUT, **kw) -> TamiyoPolicy:
    torch.manual_seed(0)
    return TamiyoPolicy.for_space(observation_space(spec, layout.size), **kw).eval()


# --- observation -> batch ----------------------------------------------------------------------


def test_synthetic_observations_fit_the_observation_space():
    space = observation_space(SPEC, LAYOUT.size)
    assert all(space.contains(make_obs(n, seed=n)) for n in range(1, SPEC.max_nodes + 1))


def test_obs_to_batch_matches_to_pyg_for_numpy_and_sb3_float_tensors():
    obs = stack([make_obs(n, seed=n) for n in (1, 3, 8, 5)])
    reference = to_pyg(obs)
    as_sb3 = {k: torch.as_tensor(v).float() for k, v in obs.items()}  # SB3 hands over float32
    for batch in (obs_to_batch(obs), obs_to_batch(as_sb3)):
        assert batch.num_graphs == reference.num_graphs == 4
        for key in ("x", "edge_index", "edge_attr", "u", "node_pos", "action_mask", "batch"):
            assert torch.equal(getattr(batch, key), getattr(reference, key)), key
    assert obs_to_batch(make_obs(1, seed=0)).edge_index.shape == (2, 0)


# --- the policy's output -----------------------------------------------------------------------


def test_masked_actions_have_probability_exactly_zero():
    policy = policy_for()
    obs = stack([make_obs(n, seed=10 + n, valid=0.3) for n in (2, 5, 8)])
    logits, _ = policy(obs_to_batch(obs))
    mask = torch.as_tensor(obs["action_mask"]).bool()
    probs = torch.softmax(logits, dim=1)
    assert torch.all(probs[~mask] == 0.0)
    assert torch.all(probs[mask] > 0.0)
    assert torch.allclose(probs.sum(1), torch.ones(3))
    dist = Categorical(logits=logits)
    samples = dist.sample((10_000,))  # [10000, 3]
    taken = mask.gather(1, samples.T)
    assert taken.all()
    assert torch.isfinite(dist.entropy()).all() and torch.isfinite(dist.log_prob(samples)).all()


def test_each_nodes_logits_land_in_its_block_and_padding_is_masked():
    """Hand-set heads: the node head outputs the constant vector `b`, WAIT outputs 7. Then
    every real node's block is `b` and every padded block is MASKED, whatever the node count."""
    policy = policy_for()
    per_node = LAYOUT.per_node
    b = torch.arange(per_node, dtype=torch.float32) + 1.0
    with torch.no_grad():
        policy.node_head[-1].weight.zero_()
        policy.node_head[-1].bias.copy_(b)
        policy.wait_head[-1].weight.zero_()
        policy.wait_head[-1].bias.fill_(7.0)
    counts = (1, 3, 8)
    obs = stack([make_obs(n, seed=n, valid=1.0) for n in counts])
    logits, _ = policy(obs_to_batch(obs))
    assert logits.shape == (3, LAYOUT.size)
    for g, n in enumerate(counts):
        assert logits[g, 0] == 7.0
        blocks = logits[g, 1:].view(LAYOUT.max_nodes, per_node)
        assert torch.equal(blocks[:n], b.expand(n, per_node))
        assert torch.all(blocks[n:] == MASKED)


def test_scatter_matches_a_per_node_loop():
    policy = policy_for()
    counts = (2, 8, 4)
    obs = stack([make_obs(n, seed=20 + n, valid=1.0) for n in counts])
    batch = obs_to_batch(obs)
    with torch.no_grad():
        logits, _ = policy(batch)
        h, ctx = policy.encoder(batch)
        start = 0
        for g, n in enumerate(counts):
            for p in range(n):
                expected = policy.node_head(torch.cat([h[start + p], ctx[g]]))
                cols = slice(1 + p * LAYOUT.per_node, 1 + (p + 1) * LAYOUT.per_node)
                torch.testing.assert_close(logits[g, cols], expected)
            start += n
            assert torch.isclose(logits[g, 0], policy.wait_head(ctx[g])[0])


def test_a_graph_alone_or_inside_a_mixed_batch_gets_the_same_output():
    policy = policy_for()
    observations = [make_obs(n, seed=30 + n) for n in (1, 6, 3, 8, 2)]
    logits, values = policy(obs_to_batch(stack(observations)))
    for g, obs in enumerate(observations):
        alone_logits, alone_value = policy(obs_to_batch(obs))
        torch.testing.assert_close(alone_logits[0], logits[g], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone_value[0], values[g], rtol=1e-5, atol=1e-5)
    # Reordering the graphs of a batch reorders the outputs, nothing else.
    order = [3, 0, 4, 1, 2]
    logits2, values2 = policy(obs_to_batch(stack([observations[i] for i in order])))
    torch.testing.assert_close(logits2, logits[order], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values2, values[order], rtol=1e-5, atol=1e-5)


def test_a_policy_runs_on_a_host_with_a_different_max_nodes():
    """Trained with max_nodes=8, applied where max_nodes=4 (same slots and blueprints): the
    same 3-layer graph gets the same logits in the columns both layouts share."""
    policy = policy_for()
    small_layout, small_spec = ActionLayout(4, 2, 3), GraphSpec(4, 2)
    big = make_obs(3, seed=40, valid=1.0)
    small = make_obs(3, seed=40, spec=small_spec, layout=small_layout, valid=1.0)
    for key in ("nodes", "edges", "edge_attr", "node_mask"):
        small[key] = big[key][: small[key].shape[0]]
    small["globals"] = big["globals"]
    logits_big, value_big = policy(obs_to_batch(big))
    logits_small, value_small = policy(obs_to_batch(small))
    assert logits_small.shape == (1, small_layout.size)
    shared = 1 + 3 * LAYOUT.per_node
    torch.testing.assert_close(logits_small[0, :shared], logits_big[0, :shared])
    torch.testing.assert_close(value_small, value_big)


def test_act_is_greedy_in_eval_and_samples_only_valid_actions():
    policy = policy_for(dropout=0.5).train()
    obs = make_obs(4, seed=50, valid=0.3)
    logits, _ = policy.eval()(obs_to_batch(obs))
    policy.train()
    assert policy.act(obs) == int(logits.argmax())
    assert policy.training  # act leaves the mode as it found it
    valid = set(np.flatnonzero(obs["action_mask"]).tolist())
    assert {policy.act(obs, greedy=False) for _ in range(200)} <= valid


def test_sampled_actor_is_reproducible_for_a_seed_and_differs_from_argmax():
    policy = policy_for()
    obs = make_obs(5, seed=51, valid=0.8)
    logits, _ = policy(obs_to_batch(obs))
    argmax = int(logits.argmax())

    def episode(actor, steps=40):
        return [actor(obs) for _ in range(steps)]

    first = episode(policy.actor(seed=1_000_003))
    torch.manual_seed(123)  # the global RNG does not enter a seeded actor's draws
    assert episode(policy.actor(seed=1_000_003)) == first
    assert episode(policy.actor(seed=1_000_004)) != first
    valid = set(np.flatnonzero(obs["action_mask"]).tolist())
    assert set(first) <= valid and len(set(first)) > 10  # ~uniform over ~30 valid actions
    assert sum(a != argmax for a in first) > 30
    assert episode(policy.actor(greedy=True, seed=1_000_003)) == [argmax] * 40


def test_wait_bias_sets_the_initial_probability_of_wait():
    obs = make_obs(4, seed=52, valid=1.0)
    n_valid = int(obs["action_mask"].sum())
    for bias in (0.0, 3.0):
        logits, _ = policy_for(wait_bias=bias)(obs_to_batch(obs))
        p_wait = torch.softmax(logits, 1)[0, 0].item()
        expected = math.exp(bias) / (math.exp(bias) + n_valid - 1)
        assert p_wait == pytest.approx(expected, rel=0.05), (bias, p_wait, expected)


def test_gated_head_gives_wait_sigmoid_of_its_bias_however_many_actions_are_valid():
    for valid in (0.2, 1.0):
        obs = make_obs(4, seed=53, valid=valid)
        for bias in (0.0, 2.0):
            logits, _ = policy_for(wait_bias=bias, gated=True)(obs_to_batch(obs))
            probs = torch.softmax(logits, 1)[0]
            # the logits are log-probabilities already: softmax leaves them unchanged
            valid_ = torch.as_tensor(obs["action_mask"]) == 1
            assert torch.allclose(probs[valid_].log(), logits[0, valid_], atol=1e-5)
            # (the head adds a tiny input-dependent term to its bias: init gain 0.01)
            assert probs[0].item() == pytest.approx(1 / (1 + math.exp(-bias)), abs=2e-3)
            assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
            assert torch.all(probs[torch.as_tensor(obs["action_mask"]) == 0] == 0)
    only_wait = make_obs(4, seed=54, valid=0.0)
    logits, _ = policy_for(wait_bias=-5.0, gated=True)(obs_to_batch(only_wait))
    assert torch.softmax(logits, 1)[0, 0].item() == 1.0


def test_mc_dropout_uncertainty_is_zero_without_dropout_and_positive_with_it():
    obs = obs_to_batch(stack([make_obs(n, seed=60 + n) for n in (2, 7)]))
    none = policy_for(dropout=0.0).uncertainty(obs, samples=4)
    some = policy_for(dropout=0.3).uncertainty(obs, samples=4)
    assert none["value_std"].shape == (2,) and torch.all(none["value_std"] < 1e-6)
    assert torch.all(some["value_std"] > 0)
    assert torch.all(some["entropy"] > 0)


def test_the_mc_dropout_gate_is_gone():
    """The MC-dropout gate (dropout masks sampled on a network never trained with dropout) was
    removed: actor takes no gate, and there is no epistemic score (docs/agents.md)."""
    policy = policy_for(dropout=0.5)
    assert not hasattr(policy, "epistemic")
    with pytest.raises(TypeError):
        policy.actor(seed=7, gate=0.1)


def test_checkpoint_roundtrip_gives_identical_outputs(tmp_path):
    policy = policy_for()
    with torch.no_grad():  # non-default return statistics must survive too
        policy.ret_mean.fill_(2.5)
        policy.ret_var.fill_(4.0)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    save_checkpoint(tmp_path / "ck.pt", policy, optimizer, 1234, PPOConfig(seed=3))
    ckpt = load_checkpoint(tmp_path / "ck.pt")
    assert ckpt.global_step == 1234 and ckpt.config["seed"] == 3
    batch = obs_to_batch(stack([make_obs(n, seed=70 + n) for n in (3, 8)]))
    expected, loaded = policy(batch), ckpt.policy.eval()(batch)
    assert torch.equal(expected[0], loaded[0]) and torch.equal(expected[1], loaded[1])


# --- PPO ---------------------------------------------------------------------------------------


class GraphBandit(gym.Env):
    """One-step episodes on a random 2..4-node graph: reward 1 for GERMINATE (blueprint 0, slot
    0) on the node whose feature 0 is largest, 0 otherwise. Every real node's actions and WAIT
    are valid, so a uniform policy finds the reward with probability 1/(1 + 3n)."""

    layout = ActionLayout(max_nodes=4, slots=1, blueprints=1)
    spec = GraphSpec(max_nodes=4, slots=1)

    def __init__(self):
        self.observation_space = observation_space(self.spec, self.layout.size)
        self.action_space = gym.spaces.Discrete(self.layout.size)

    def target(self, obs) -> int:
        n = int(obs["node_mask"].sum())
        return 1 + int(np.argmax(obs["nodes"][:n, 0])) * self.layout.per_node

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        n = int(self.np_random.integers(2, 5))
        seed = int(self.np_random.integers(2**31))
        self.obs = make_obs(n, seed, self.spec, self.layout, valid=1.0)
        return self.obs, {}

    def step(self, action):
        reward = float(int(action) == self.target(self.obs))
        return self.obs, reward, True, False, {}


def bandit_config(**kw) -> PPOConfig:
    defaults = dict(
        total_steps=1536,
        num_envs=8,
        rollout_steps=16,
        minibatches=4,
        update_epochs=4,
        lr=3e-3,
        hidden=32,
        layers=2,
        dropout=0.0,
        ent_coef=0.0,
        gamma=0.0,
        seed=0,
        uncertainty_samples=2,
        # A one-step bandit's return is a coin flip given the state (the policy samples), so
        # the best critic is about the mean: explained variance ~0, which on a real episode
        # (returns-to-go fall with progress) would be a broken critic.
        guards=GuardConfig(explained_variance_min=None),
    )
    return PPOConfig(**{**defaults, **kw})


def target_probability(policy: TamiyoPolicy, seeds=range(100, 132)) -> float:
    env = GraphBandit()
    probs = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        logits, _ = policy.eval()(obs_to_batch(obs))
        probs.append(torch.softmax(logits, 1)[0, env.target(obs)].item())
    return float(np.mean(probs))


def test_ppo_update_raises_the_probability_of_the_rewarded_action():
    before = target_probability(
        TamiyoPolicy.for_space(GraphBandit().observation_space, hidden=32, layers=2, dropout=0.0)
    )
    logs = []
    policy = train(bandit_config(), GraphBandit, log=lambda m, s: logs.append((s, m)))
    after = target_probability(policy)
    assert before < 0.15  # about uniform over the 3n + 1 valid actions
    assert after > 0.6, (before, after)
    returns = [m["charts/episodic_return"] for _, m in logs]
    assert np.mean(returns[-3:]) > np.mean(returns[:3]) + 0.3


def test_lr_anneals_linearly_to_lr_final_and_stays_put_without_annealing():
    logs = []
    cfg = bandit_config(total_steps=512, lr=1e-3, lr_final=1e-4, uncertainty_samples=0)
    train(cfg, GraphBandit, log=lambda m, s: logs.append(m))  # 4 updates of 128 steps
    expected = [1e-3 + k / 4 * (1e-4 - 1e-3) for k in range(4)]
    assert [m["charts/lr"] for m in logs] == pytest.approx(expected)
    logs.clear()
    train(
        bandit_config(total_steps=256, anneal_lr=False),
        GraphBandit,
        log=lambda m, s: logs.append(m),
    )
    assert [m["charts/lr"] for m in logs] == [3e-3, 3e-3]


def test_rollout_diagnostics_count_wait_share_churn_and_entropy():
    # One-step episodes where every action is valid: wait_share is the share of WAIT among all
    # actions, and churn (culls per finished episode) the share of CULL actions.
    logs = []
    cfg = bandit_config(total_steps=256, uncertainty_samples=0)
    train(cfg, GraphBandit, log=lambda m, s: logs.append(m))
    for m in logs:
        assert m["charts/episodes"] == 128
        assert m["diagnostics/wait_share"] == pytest.approx(m["actions/wait"] / 128)
        assert m["diagnostics/churn"] == pytest.approx(m["actions/cull"] / 128)
        assert m["actions/cull"] > 0
        # the first rollout is about uniform over 1 + 3n valid actions, n in 2..4
        assert math.log(7) - 0.1 < m["diagnostics/entropy"] < math.log(13)


GUARD_CASES = {
    # metric: (healthy value, bad value)
    "diagnostics/wait_share": (0.4, 0.99),
    "diagnostics/entropy": (1.2, 0.01),
    "losses/explained_variance": (0.3, -0.2),
}
HEALTHY = {metric: good for metric, (good, _) in GUARD_CASES.items()}


@pytest.mark.parametrize("metric", list(GUARD_CASES))
def test_each_guard_fires_after_patience_consecutive_bad_updates(metric):
    guards, history = GuardConfig(patience=3), {}
    bad = {**HEALTHY, metric: GUARD_CASES[metric][1]}
    check_guards(bad, guards, history, 100)
    check_guards(bad, guards, history, 200)
    check_guards(HEALTHY, guards, history, 300)  # a healthy update restarts the count
    check_guards(bad, guards, history, 400)
    check_guards(bad, guards, history, 500)
    with pytest.raises(TrainingCollapse) as err:
        check_guards(bad, guards, history, 600)
    assert metric in str(err.value) and "global step 600" in str(err.value)
    assert "3 consecutive updates" in str(err.value)
    # off: the run goes on, with the whole guard set disabled or with that threshold null
    key = {"diagnostics/wait_share": "wait_share_max", "diagnostics/entropy": "entropy_min"}
    key = key.get(metric, "explained_variance_min")
    assert f"guards.{key}" in str(err.value)
    for off in (GuardConfig(patience=1, enabled=False), GuardConfig(patience=1, **{key: None})):
        for _ in range(5):
            check_guards(bad, off, {}, 700)


def test_guards_stay_quiet_on_healthy_and_undefined_metrics():
    guards, history = GuardConfig(patience=1), {}
    check_guards(HEALTHY, guards, history, 1)
    # no growth was valid (wait_share NaN), no metric at all: nothing to judge
    check_guards({**HEALTHY, "diagnostics/wait_share": math.nan}, guards, history, 2)
    check_guards({}, guards, history, 3)
    # at the thresholds themselves: wait share 0.95 and entropy 0.05 are still healthy
    check_guards(
        {**HEALTHY, "diagnostics/wait_share": 0.95, "diagnostics/entropy": 0.05}, guards, history, 4
    )


class WaitBandit(GraphBandit):
    """GraphBandit where only WAIT pays: the policy learns to wait although growth is valid."""

    def step(self, action):
        return self.obs, float(int(action) == 0), True, False, {}


def test_training_stops_loudly_on_wait_collapse_and_runs_on_a_healthy_task(tmp_path):
    guards = GuardConfig(patience=2, entropy_min=None, explained_variance_min=None)
    cfg = bandit_config(total_steps=4096, uncertainty_samples=0, guards=guards)
    logs = []
    with pytest.raises(TrainingCollapse, match="WAIT collapse") as err:
        train(cfg, WaitBandit, log=lambda m, s: logs.append(m), checkpoint_path=tmp_path / "c.pt")
    assert "diagnostics/wait_share" in str(err.value)
    assert [m["diagnostics/wait_share"] > 0.95 for m in logs[-2:]] == [True, True]
    assert len(logs) < 4096 // 128  # it stopped early, and left the collapsed policy behind
    assert load_checkpoint(tmp_path / "c.pt").global_step == 128 * len(logs)
    # The rewarded-growth bandit with the same guards trains to the end (and with the default
    # guards: test_ppo_update_raises_the_probability_of_the_rewarded_action).
    logs = []
    train(replace(cfg, total_steps=1536), GraphBandit, log=lambda m, s: logs.append(m))
    assert len(logs) == 1536 // 128


def test_resume_continues_global_step_optimizer_and_schedule(tmp_path):
    path = tmp_path / "run.pt"
    first, resumed = [], []
    cfg = bandit_config(total_steps=256, checkpoint_every=1)  # 2 updates of 128 steps
    train(cfg, GraphBandit, log=lambda m, s: first.append((s, m)), checkpoint_path=path)
    shutil.copyfile(path, tmp_path / "copy.pt")
    saved = load_checkpoint(path)
    assert [s for s, _ in first] == [128, 256] and saved.global_step == 256
    adam_steps = next(iter(saved.optimizer_state["state"].values()))["step"].item()
    assert adam_steps == 2 * cfg.update_epochs * cfg.minibatches

    cfg_longer = bandit_config(total_steps=512, checkpoint_every=1)
    train(
        cfg_longer,
        GraphBandit,
        log=lambda m, s: resumed.append((s, m)),
        checkpoint_path=path,
        resume_from=path,
    )
    assert [s for s, _ in resumed] == [384, 512]
    # The learning-rate schedule picks up at update 3 of 4, not at update 1.
    assert resumed[0][1]["charts/lr"] == pytest.approx(cfg.lr * (1 - 2 / 4))
    after = load_checkpoint(path)
    adam_steps = next(iter(after.optimizer_state["state"].values()))["step"].item()
    assert after.global_step == 512 and adam_steps == 4 * cfg.update_epochs * cfg.minibatches

    # A resumed run is reproducible: resuming again from the same checkpoint replays the same
    # continuation exactly (weights, optimizer, return statistics and RNG come from the file).
    again = train(cfg_longer, GraphBandit, resume_from=tmp_path / "copy.pt")
    for name, tensor in after.policy.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


# --- the real environment ----------------------------------------------------------------------

SMALL_SPIRALS = dict(max_epochs=1, decision_interval=10, eval_size=256)
LOGGED = (
    "losses/policy",
    "losses/value",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clip_frac",
    "losses/ratio_start",
    "losses/explained_variance",
    "actions/wait",
    "actions/germinate",
    "actions/advance",
    "actions/cull",
    "charts/steps_per_s",
    "charts/lr",
    "charts/episodes",
    "charts/episodic_return",
    "charts/episodic_length",
    "uncertainty/value_std",
    "uncertainty/entropy",
    "diagnostics/wait_share",
    "diagnostics/entropy",
    "diagnostics/churn",
)


def test_train_on_spirals_logs_every_metric(tmp_path):
    import esper_gym  # noqa: F401  (registers the ids)

    make_env = functools.partial(
        gym.make, "Esper/Spirals-v0", kernel_dir=tmp_path / "kernels", **SMALL_SPIRALS
    )
    logs = []
    cfg = PPOConfig(total_steps=192, num_envs=2, rollout_steps=32, update_epochs=2, seed=0)
    train(cfg, make_env, log=lambda m, s: logs.append((s, m)), checkpoint_path=tmp_path / "t.pt")
    assert [s for s, _ in logs] == [64, 128, 192]
    for _, metrics in logs:
        assert set(LOGGED) <= set(metrics), set(LOGGED) - set(metrics)
        kinds = sum(metrics[f"actions/{k}"] for k in ("wait", "germinate", "advance", "cull"))
        assert kinds == 64
        assert metrics["charts/episodes"] > 0  # 4-step episodes end within every rollout
        assert all(np.isfinite(v) for v in metrics.values())
    saved = load_checkpoint(tmp_path / "t.pt")
    assert saved.global_step == 192
    assert saved.env == {"task": "spirals", "blueprints": list(DEFAULT_LIBRARY)}


def test_imitation_warm_start_copies_the_schedule_and_counts_its_steps(tmp_path):
    """With teacher=schedule the policy, before any PPO update, plays the tuned plan: it agrees
    with the teacher on most states and its greedy germinations are the plan's."""
    import esper_gym  # noqa: F401  (registers the ids)
    from esper_gym.agents.baselines import make_agent

    make_env = functools.partial(
        gym.make, "Esper/Spirals-v0", kernel_dir=tmp_path / "kernels", **SMALL_SPIRALS
    )
    logs = []
    cfg = PPOConfig(
        total_steps=24,  # imitation only: 6 episodes of 4 steps on 2 envs fill the budget
        num_envs=2,
        rollout_steps=16,
        teacher="schedule",
        imitation_episodes=6,
        imitation_epochs=30,
        gated=True,
        lr=3e-3,
        seed=0,
    )
    ckpt = tmp_path / "warm.pt"
    policy = train(cfg, make_env, log=lambda m, s: logs.append((s, m)), checkpoint_path=ckpt)
    assert len(logs) == 1, [s for s, _ in logs]  # no PPO update
    [(step, metrics)] = logs
    assert metrics["imitation/episodes"] >= 6 and step == metrics["imitation/steps"] >= 6 * 4
    assert load_checkpoint(ckpt).global_step == step  # the warm start alone is saved
    assert metrics["imitation/agreement"] > 0.9, metrics
    env = make_env()
    teacher = make_agent("schedule", env)
    teacher_plan, policy_plan = [], []
    for agent, plan in ((teacher, teacher_plan), (policy, policy_plan)):
        obs, _ = env.reset(seed=77)
        done = False
        while not done:
            action = agent.act(obs)
            plan.append(action)
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
    assert policy_plan == teacher_plan
    assert any(a != 0 for a in teacher_plan)  # the plan germinates: not a trivial match


def test_a_privileged_or_unknown_teacher_is_refused(tmp_path):
    import esper_gym  # noqa: F401  (registers the ids)

    make_env = functools.partial(gym.make, "Esper/Spirals-v0", kernel_dir=tmp_path / "kernels")
    for name in ("lookahead", "schedul"):
        with pytest.raises(ValueError, match=f"teacher={name!r} cannot be imitated; allowed: "):
            train(PPOConfig(total_steps=1, num_envs=1, teacher=name), make_env)
    with pytest.raises(ValueError, match="imitation_episodes=0"):
        PPOConfig(teacher="schedule", imitation_episodes=0)


def test_resume_refuses_a_checkpoint_of_another_task_or_blueprint_library(tmp_path):
    import esper_gym  # noqa: F401  (registers the ids)

    def maker(env_id, **kw):
        return functools.partial(gym.make, env_id, kernel_dir=tmp_path / "kernels", **kw)

    spirals = maker("Esper/Spirals-v0")()
    ckpt = tmp_path / "spirals.pt"
    policy = TamiyoPolicy.for_space(spirals.observation_space)
    save_checkpoint(ckpt, policy, None, 64, PPOConfig(), env_record(spirals))
    cfg = PPOConfig(total_steps=128, num_envs=1, rollout_steps=32)

    with pytest.raises(ValueError) as err:
        train(cfg, maker("Esper/FashionMNIST-v0"), resume_from=ckpt)
    assert f"checkpoint {ckpt} is for task 'spirals'" in str(err.value)
    assert "this run's task is 'fashion_mnist'" in str(err.value)

    swapped = (DEFAULT_LIBRARY[1], DEFAULT_LIBRARY[0], *DEFAULT_LIBRARY[2:])
    with pytest.raises(ValueError) as err:
        train(cfg, maker("Esper/Spirals-v0", blueprints=swapped), resume_from=ckpt)
    assert str(list(DEFAULT_LIBRARY)) in str(err.value) and str(list(swapped)) in str(err.value)


# The CI learning task (as in experiments/tamiyo_vs_baselines.py): spirals with one slot per
# layer and three blueprints, a cheap, a mid-sized and an expensive one.
CI_SPIRALS = dict(seed_slots=1, blueprints=("norm", "squeeze_excite", "residual_mlp"))


@pytest.mark.slow
def test_tamiyo_beats_random_and_noop_on_spirals(tmp_path):
    """About 3 minutes per seed on 2 shared cores: PPO for 4096 env steps (~50 episodes), then
    10 held-out episodes (env seeds never seen in training) per agent. Tamiyo samples its policy:
    that is what PPO optimises, and the argmax can sit on WAIT while most of the mass is spread
    over several growth actions (experiments/tamiyo_vs_baselines.py reports both)."""
    import esper_gym  # noqa: F401
    from esper_gym.agents.baselines import NoOpAgent, RandomAgent, run_episode

    class Sampled:
        def __init__(self, policy):
            self.policy = policy

        def act(self, obs, info=None):
            return self.policy.act(obs, greedy=False)

    make_env = functools.partial(
        gym.make, "Esper/Spirals-v0", kernel_dir=tmp_path / "kernels", **CI_SPIRALS
    )
    env = make_env()
    held_out = [10_000 + i for i in range(10)]
    scores = {"tamiyo": [], "random": [], "noop": []}
    for seed in (0, 1, 2):
        cfg = PPOConfig(total_steps=4096, num_envs=8, rollout_steps=32, lr=1e-3, seed=seed)
        agents = {
            "tamiyo": Sampled(train(cfg, make_env)),
            "random": RandomAgent(seed=seed),
            "noop": NoOpAgent(),
        }
        torch.manual_seed(seed)
        for name, agent in agents.items():
            returns = [run_episode(env, agent, seed=s)["return"] for s in held_out]
            scores[name].append(np.mean(returns))
    mean = {name: float(np.mean(s)) for name, s in scores.items()}
    assert mean["tamiyo"] > mean["random"], scores
    assert mean["tamiyo"] > mean["noop"], scores


def test_truncated_episodes_bootstrap_from_the_final_obs(tmp_path):
    # Same-step autoreset hands Dict final observations over as a per-env array of dicts;
    # with max_episode_steps=3 every episode is truncated, so the bootstrap path runs each time.
    import esper_gym  # noqa: F401  (registers the ids)

    make_env = functools.partial(
        gym.make,
        "Esper/Spirals-v0",
        kernel_dir=tmp_path / "kernels",
        max_episode_steps=3,
        **SMALL_SPIRALS,
    )
    logs = []
    cfg = PPOConfig(total_steps=48, num_envs=2, rollout_steps=12, update_epochs=1, seed=0)
    train(cfg, make_env, log=lambda m, s: logs.append(m))
    assert [m["charts/episodes"] for m in logs] == [8, 8]
    assert all(m["charts/episodic_length"] == 3 for m in logs)


def test_the_policy_updated_is_the_policy_that_acted():
    # With dropout on in the network, acting and the update's first forward must still agree:
    # the first ratio of every update is exactly 1.
    logs = []
    train(
        bandit_config(total_steps=256, dropout=0.3, uncertainty_samples=0),
        GraphBandit,
        log=lambda m, s: logs.append(m),
    )
    assert len(logs) == 2
    assert all(m["losses/ratio_start"] < 1e-5 for m in logs), [
        m["losses/ratio_start"] for m in logs
    ]


def test_return_statistics_preserve_the_value_in_return_units():
    from esper_gym.agents.tamiyo.popart import update_return_stats

    env = GraphBandit()
    policy = TamiyoPolicy.for_space(env.observation_space, hidden=32, layers=2, dropout=0.0)
    obs = [env.reset(seed=s)[0] for s in range(6)]
    batch = obs_to_batch({k: np.stack([o[k] for o in obs]) for k in obs[0]})
    before = policy.eval()(batch)[1]
    for returns in (torch.randn(64) * 5 + 20, torch.randn(64) * 0.1 - 3):
        update_return_stats(policy, returns)
        after = policy(batch)[1]
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert float(policy.ret_mean) != 0.0 and float(policy.ret_var) != 1.0


def test_the_warm_start_cut_is_where_one_step_at_a_time_would_stop():
    """imitation_cut: episodes played ahead (a runner's chunk) past the cut are not counted;
    the budget stops the warm start at its last whole step of every copy."""
    from esper_gym.agents.tamiyo.imitation import Episode, imitation_cut

    config = PPOConfig(teacher="schedule", imitation_episodes=3)

    def ep(step, copy):
        return Episode(step, copy, [], [], [], 0.0)

    # 2 copies: copy 0 ends at 4 and 8, copy 1 at 6 and 12.
    played = [ep(4, 0), ep(6, 1), ep(8, 0), ep(12, 1)]
    assert imitation_cut(played[:2], 6, 2, config, None) is None  # 2 of 3 episodes
    assert imitation_cut(played, 16, 2, config, None) == 8  # the third ended at step 8
    assert imitation_cut(played, 16, 2, config, 14) == 7  # 2 copies x 7 steps = 14 env steps
    assert imitation_cut(played[:2], 6, 2, PPOConfig(teacher="schedule"), 14) is None
    assert imitation_cut(played[:2], 6, 2, PPOConfig(teacher="schedule"), 13) == 6
