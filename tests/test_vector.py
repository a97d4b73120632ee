"""The batched simulator (esper_gym.vector) against single envs, and against itself."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import esper_gym
from esper_gym.actions import ADVANCE, CULL, GERMINATE, Action
from esper_gym.kasmina import SeedState
from esper_gym.kernels import load_or_compile
from esper_gym.vector import BatchedMorphogeneticEnv, programs, stacks
from esper_gym.vector import batch as vec_batch
from tests.conftest import SMALL, small_kwargs

# Bounds of copy i against its single env over whole episodes. Masks, events, fault kinds,
# seed states, terminations are compared exactly. Host weights, accuracies and rewards come
# out bit-identical here; reported losses (globals), activation statistics and `norm` kernels
# under vmap reduce in another order (~1e-7 apart), which training can grow a little.
OBS_ATOL = 1e-5
REWARD_ATOL = 1e-6
WEIGHTS = {"wait": 0.25, "germinate": 0.3, "advance": 0.4, "cull": 0.05}


def _actions(layout, blueprints, mask: np.ndarray, rng) -> list[int]:
    """Valid actions by kind (WEIGHTS), never the fault kernel whose fault is wall-clock time."""
    kinds: dict[str, list[int]] = {}
    for a in np.flatnonzero(mask):
        action = layout.decode(int(a))
        if action.kind == "germinate" and blueprints[action.blueprint] == "fault_slow":
            continue
        kinds.setdefault(action.kind, []).append(int(a))
    names = list(kinds)
    p = np.array([WEIGHTS[k] for k in names])
    return kinds[names[rng.choice(len(names), p=p / p.sum())]]


def _policy(envs, masks: np.ndarray, rng) -> np.ndarray:
    """Three steps in four every copy takes copy 0's action where it is valid (same blueprint in the
    same slot: stacked kernel groups), otherwise each copy its own (mixed groups)."""
    single = envs.envs[0]
    layout, blueprints = single.layout, single.task.blueprints
    if rng.random() < 0.75:
        shared = int(rng.choice(_actions(layout, blueprints, masks[0], rng)))
        return np.array([shared if m[shared] else 0 for m in masks])
    return np.array([int(rng.choice(_actions(layout, blueprints, m, rng))) for m in masks])


def _compare(env_id: str, kwargs: dict, kernel_dir: str, n: int, steps: int, seed: int = 2):
    """Step a batched env and n single envs with the same actions; assert copy i matches
    single env i. Returns (kinds of faults seen, seed states seen)."""
    envs = gym.make_vec(
        env_id, num_envs=n, vectorization_mode="vector_entry_point", kernel_dir=kernel_dir,
        **kwargs,
    )  # fmt: skip
    singles = [gym.make(env_id, kernel_dir=kernel_dir, **kwargs) for _ in range(n)]
    obs, _ = envs.reset(seed=seed)
    single_obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(singles)]
    rng = np.random.default_rng(seed)
    faults, states = [], set()
    for step in range(steps):
        for i in range(n):
            for key, value in single_obs[i].items():
                np.testing.assert_allclose(obs[key][i], value, atol=OBS_ATOL, rtol=0, err_msg=key)
            np.testing.assert_array_equal(obs["action_mask"][i], single_obs[i]["action_mask"])
        actions = _policy(envs.unwrapped, obs["action_mask"].astype(bool), rng)
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        for i, env in enumerate(singles):
            o, r, term, trunc, info = env.step(int(actions[i]))
            assert (term, trunc) == (terminated[i], truncated[i]), (step, i)
            assert abs(r - rewards[i]) <= REWARD_ATOL, (step, i, r, rewards[i])
            got = infos["final_info"] if term or trunc else infos
            assert got["events"][i] == info["events"], (step, i)
            assert list(got["fault_kinds"][i]) == info["fault_kinds"], (step, i)
            assert got["val_acc"][i] == pytest.approx(info["val_acc"], abs=1e-9)
            faults += info["fault_kinds"]
            copy, ref = envs.unwrapped.envs[i], env.unwrapped
            if term or trunc:
                for key, value in o.items():
                    final = infos["final_obs"][i][key]
                    np.testing.assert_allclose(final, value, atol=OBS_ATOL, rtol=0, err_msg=key)
                assert got["seeds"][i] == info["seeds"]
                o, _ = env.reset()
            else:
                got_states = [[s.state for s in layer.slots] for layer in copy.layers]
                assert got_states == [[s.state for s in layer.slots] for layer in ref.layers]
                states |= {s.state for layer in ref.layers for s in layer.slots}
            single_obs[i] = o
    envs.close()
    return faults, states


@pytest.fixture
def count_vmapped(monkeypatch):
    """How many stacked (vmapped) kernel group calls ran, and how many fell back; groups of
    two copies already run stacked, so that these small tests exercise that path."""
    monkeypatch.setattr(vec_batch, "VMAP_MIN", 2)
    counts = {"vmapped": 0, "fallback": 0}
    real = vec_batch._vmapped_call

    def counting(graph, states, x):
        result = real(graph, states, x)
        counts["vmapped" if result is not None else "fallback"] += 1
        return result

    monkeypatch.setattr(vec_batch, "_vmapped_call", counting)
    return counts


def test_make_vec_gives_the_batched_env():
    envs = gym.make_vec("Esper/Spirals-v0", num_envs=3, vectorization_mode="vector_entry_point")
    assert isinstance(envs, BatchedMorphogeneticEnv)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert envs.max_episode_steps == 1000  # the registration's TimeLimit
    assert envs.single_action_space == envs.envs[0].action_space
    assert envs.action_space == gym.vector.utils.batch_space(envs.single_action_space, 3)
    assert envs.observation_space["nodes"].shape == (
        3,
        *envs.single_observation_space["nodes"].shape,
    )
    for env_id in esper_gym.ENV_IDS:
        assert gym.spec(env_id).vector_entry_point == esper_gym.VECTOR_ENTRY_POINT
    envs.close()


@pytest.mark.parametrize(
    ("env_id", "steps"),
    [("Esper/Spirals-v0", 14), ("Esper/SpiralsFaulty-v0", 14), ("Esper/FashionMNIST-v0", 11)],
)
def test_copies_match_single_envs(env_id, steps, kernel_dir, tmp_path, count_vmapped):
    # Whole episodes and an autoreset: spirals runs 6 steps per episode, fashion_mnist 5.
    faults, states = _compare(env_id, small_kwargs(env_id, tmp_path), kernel_dir, 3, steps)
    assert count_vmapped["vmapped"] > 0  # kernels did run stacked
    # Seeds trained and blended (spirals' 8-step blend ends within a step: PROBATION).
    assert SeedState.TRAINING in states
    assert states & {SeedState.BLENDING, SeedState.PROBATION, SeedState.FOSSILIZED}
    if "Faulty" in env_id:
        assert faults  # and each copy's were its single env's


def test_attention_groups_run_stacked(kernel_dir, count_vmapped):
    """attention's graph has two ops vmap cannot batch (sym_size.int, CPU flash attention):
    vmap runs a copy of it with those rewritten (`_batchable`), and the copies still match
    their single envs, which run the validated graph itself."""
    kwargs = dict(SMALL, blueprints=("attention", "residual_mlp"))
    envs = gym.make_vec(
        "Esper/Spirals-v0", num_envs=2, vectorization_mode="vector_entry_point",
        kernel_dir=kernel_dir, **kwargs,
    )  # fmt: skip
    envs.reset(seed=0)
    layout = envs.unwrapped.envs[0].layout
    envs.step(np.full(2, layout.encode(Action(GERMINATE, 1, 0, 0))))
    envs.step(np.full(2, layout.encode(Action(ADVANCE, 1, 0))))
    graph = envs.unwrapped.envs[0].layers[1].kernels["0"].graph
    assert graph in programs._VMAPPABLE and graph not in programs._NOT_VMAPPABLE
    targets = {node.target for node in programs._batchable(graph).graph.nodes}
    assert programs._attention in targets and programs._size in targets
    assert torch.ops.aten.scaled_dot_product_attention.default in {
        node.target for node in graph.graph.nodes
    }  # the validated graph itself is left as it was
    envs.close()
    count_vmapped["fallback"] = 0
    _compare("Esper/Spirals-v0", kwargs, kernel_dir, 2, 8, seed=3)
    assert count_vmapped["vmapped"] > 0 and count_vmapped["fallback"] == 0


def test_seeded_batched_runs_are_bit_identical(kernel_dir):
    def run():
        envs = BatchedMorphogeneticEnv(num_envs=4, kernel_dir=kernel_dir, **SMALL)
        obs, _ = envs.reset(seed=11)
        rng = np.random.default_rng(0)
        trace = [obs]
        for _ in range(8):
            actions = _policy(envs, obs["action_mask"].astype(bool), rng)
            obs, rewards, terminated, _, infos = envs.step(actions)
            trace += [obs, rewards, terminated, infos["events"], infos["train_loss"]]
        envs.close()
        return trace

    first, second = run(), run()
    for a, b in zip(first, second):
        if isinstance(a, dict):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        else:
            assert np.array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object))


def test_a_fault_in_one_copy_stays_in_that_copy(kernel_dir, count_vmapped):
    envs = BatchedMorphogeneticEnv(num_envs=3, kernel_dir=kernel_dir, **SMALL)
    envs.reset(seed=0)
    layout, blueprints = envs.envs[0].layout, envs.envs[0].task.blueprints
    germinate = layout.encode(Action(GERMINATE, 1, 0, blueprints.index("residual_mlp")))
    advance = layout.encode(Action(ADVANCE, 1, 0))
    envs.step(np.full(3, germinate))
    envs.step(np.full(3, advance))  # TRAINING in all three: one stacked group
    kernel = envs.envs[1].layers[1].kernels["0"]
    with torch.no_grad():
        next(iter(kernel.parameters())).fill_(float("nan"))
    _, _, _, _, infos = envs.step(np.zeros(3, dtype=np.int64))
    assert infos["faults"].tolist() == [0, 3, 0]
    assert list(infos["fault_kinds"][1]) == ["nonfinite"] * 3
    culled = [e for e in infos["events"][1] if e["to"] == "CULLED"]
    assert len(culled) == 1 and culled[0]["reason"].startswith("circuit breaker")
    states = [env.layers[1].slots[0].state for env in envs.envs]
    assert states == [SeedState.TRAINING, SeedState.EMBARGOED, SeedState.TRAINING]
    # The healthy copies' seeds ran on: per step once per optimizer step (8), once for the
    # contribution, over the two TRAINING steps.
    assert [envs.envs[i].layers[1].slots[0].calls for i in (0, 2)] == [18, 18]
    assert count_vmapped["vmapped"] > 0
    envs.close()


def test_faults_of_a_blended_seed_match_the_single_env(kernel_dir, count_vmapped):
    """A coupled seed that turns NaN faults in training, evaluation and contribution passes;
    copy 1 records each fault in the same step as its single env, the others none."""
    # The breaker stays shut (every pass faults); 12 steps: no episode ends in the test.
    kwargs = dict(SMALL, max_faults=50, max_epochs=12.0)
    envs = BatchedMorphogeneticEnv(num_envs=3, kernel_dir=kernel_dir, **kwargs)
    single = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **kwargs)
    envs.reset(seed=0)
    single.reset(seed=1)
    layout, blueprints = envs.envs[0].layout, envs.envs[0].task.blueprints
    germinate = layout.encode(Action(GERMINATE, 1, 0, blueprints.index("residual_mlp")))
    advance = layout.encode(Action(ADVANCE, 1, 0))
    for action in (germinate, advance, advance, 0):  # ... BLENDING, then PROBATION
        envs.step(np.full(3, action))
        single.step(action)
    for kernel in (envs.envs[1].layers[1].kernels["0"], single.unwrapped.layers[1].kernels["0"]):
        with torch.no_grad():
            next(iter(kernel.parameters())).fill_(float("nan"))
    for _ in range(2):
        obs, rewards, _, _, infos = envs.step(np.zeros(3, dtype=np.int64))
        o, reward, _, _, info = single.step(0)
        assert infos["faults"][[0, 2]].tolist() == [0, 0]
        assert list(infos["fault_kinds"][1]) == info["fault_kinds"]
        assert rewards[1] == reward
        np.testing.assert_allclose(obs["nodes"][1], o["nodes"], atol=OBS_ATOL, rtol=0)
    # The previous step's evaluation (its faults are drained a step late, as the single env
    # drains them), then 8 training calls; the contribution pass turns the seed off (alpha 0:
    # no call).
    assert info["fault_kinds"] == ["nonfinite"] * 9
    assert count_vmapped["vmapped"] > 0
    envs.close()


def test_unbatchable_hosts_run_per_copy(kernel_dir, tmp_path):
    """A CNN host cannot be stacked: its copies train one by one, and still match."""
    kwargs = small_kwargs("Esper/FashionMNISTCNN-v0", tmp_path)
    envs = BatchedMorphogeneticEnv(
        num_envs=2, task="fashion_mnist_cnn", kernel_dir=kernel_dir, **kwargs
    )
    single = gym.make("Esper/FashionMNISTCNN-v0", kernel_dir=kernel_dir, **kwargs)
    obs, _ = envs.reset(seed=5)
    single_obs, _ = single.reset(seed=6)  # copy 1
    np.testing.assert_array_equal(obs["nodes"][1], single_obs["nodes"])
    obs, rewards, *_ = envs.step(np.zeros(2, dtype=np.int64))
    single_obs, reward, *_ = single.step(0)
    np.testing.assert_array_equal(obs["nodes"][1], single_obs["nodes"])
    assert rewards[1] == reward
    assert envs._plan()[0][1] is None  # no batch: the per-copy path
    envs.close()


def test_reset_mask_and_seed_lists(kernel_dir):
    envs = BatchedMorphogeneticEnv(num_envs=2, kernel_dir=kernel_dir, **SMALL)
    single = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **SMALL)
    obs, _ = envs.reset(seed=[3, 9])
    np.testing.assert_array_equal(obs["nodes"][1], single.reset(seed=9)[0]["nodes"])
    envs.step(np.zeros(2, dtype=np.int64))
    before = obs["nodes"][1].copy()
    obs, infos = envs.reset(seed=[4, None], options={"reset_mask": np.array([True, False])})
    np.testing.assert_array_equal(obs["nodes"][0], single.reset(seed=4)[0]["nodes"])
    assert not np.array_equal(obs["nodes"][1], before)  # copy 1 kept its (stepped) episode
    assert infos["_step"].tolist() == [True, False]
    with pytest.raises(ValueError, match="not in"):
        envs.step(np.array([0, 10**6]))
    envs.close()


def test_tamiyo_trains_on_the_batched_env(kernel_dir):
    """env.vectorization=batched: train.env_factory gives a constructor whose `vector` is the
    batched simulator, and Tamiyo's PPO trains on it (whole episodes: autoresets included)."""
    from hydra import compose, initialize_config_dir

    from esper_gym import train as train_mod
    from esper_gym.agents.tamiyo import PPOConfig, make_vector_env
    from esper_gym.agents.tamiyo import train as ppo

    overrides = ["env.vectorization=batched", f"env.kernel_dir={kernel_dir}", "task=spirals"]
    overrides += [f"task.{k}={v}" for k, v in SMALL.items() if k != "dataset_kwargs"]
    overrides.append("task.dataset_kwargs={n_train:1024,n_val:256,n_test:256}")
    with initialize_config_dir(config_dir=str(esper_gym.config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    train_mod.validate(cfg)
    make = train_mod.env_factory(cfg)
    envs = make_vector_env(make, 3)
    assert isinstance(envs, BatchedMorphogeneticEnv) and envs.num_envs == 3
    envs.close()
    logs = []
    config = PPOConfig(total_steps=24, num_envs=2, rollout_steps=12, update_epochs=1, seed=0)
    ppo(config, make, log=lambda m, s: logs.append((s, m)))
    assert [s for s, _ in logs] == [24]
    assert logs[0][1]["charts/episodes"] >= 2  # episodes of 6 steps (task.max_epochs=6) ended
    with initialize_config_dir(config_dir=str(esper_gym.config_dir()), version_base="1.3"):
        sb3 = compose("config", overrides=[*overrides, "agent=sb3_ppo"])
    with pytest.raises(train_mod.ConfigError, match="batched"):
        train_mod.validate(sb3)


def test_a_skipped_host_step_stays_in_that_copy(kernel_dir, monkeypatch):
    """A copy whose host gradients its own check finds non-finite (here: injected into its row
    of the stacked gradients, with a layer marked coupled) skips its host step: its weights and
    Adam step count stay as they were, the other copies' rows step on."""
    real = vec_batch._Batch._check_grads
    inject = {"on": False}

    def poisoned(self, loss, x, y):
        if not inject["on"]:
            return real(self, loss, x, y)
        for stack in self.host.values():
            stack.tensors[0].grad[1].fill_(float("nan"))
        layer = self.trainers[1].layers[0]
        layer.coupled = True  # so that copy 1's own check reads its host gradients
        try:
            return real(self, loss, x, y)
        finally:
            layer.coupled = False

    monkeypatch.setattr(vec_batch._Batch, "_check_grads", poisoned)
    envs = BatchedMorphogeneticEnv(num_envs=3, kernel_dir=kernel_dir, **SMALL)
    envs.reset(seed=0)
    envs.step(np.zeros(3, dtype=np.int64))
    (batch,) = envs._batches.values()

    def weights(i):
        return [
            p.detach().clone() for layer in envs.envs[i].layers for p in layer.host.parameters()
        ]

    def steps():
        return [s.tolist() for stack in batch.host.values() for s in stack.steps_of]

    before, steps_before = [weights(i) for i in range(3)], steps()
    inject["on"] = True
    envs.step(np.zeros(3, dtype=np.int64))
    inject["on"] = False
    after = [weights(i) for i in range(3)]
    changed = [any(not torch.equal(a, b) for a, b in zip(before[i], after[i])) for i in range(3)]
    assert changed == [True, False, True]
    interval = envs.envs[0].task.decision_interval
    for was, now in zip(steps_before, steps()):
        assert [n - w for w, n in zip(was, now)] == [interval, 0, interval]
    envs.step(np.zeros(3, dtype=np.int64))  # and copy 1 trains on afterwards
    assert any(not torch.equal(a, b) for a, b in zip(after[1], weights(1)))
    envs.close()


def test_seed_stacks_hold_the_seeds_and_their_adam_state(kernel_dir, count_vmapped):
    """Seeds of one layer sharing a kernel graph train from one stacked leaf per parameter:
    each kernel's parameters are views of its row, so they change as the stack steps; a cull
    rebuilds the stack without that seed, the others keeping their Adam moments and step counts;
    the copies still match their single envs."""
    envs = BatchedMorphogeneticEnv(num_envs=3, kernel_dir=kernel_dir, **SMALL)
    singles = [gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **SMALL) for _ in range(3)]
    envs.reset(seed=0)
    for i, single in enumerate(singles):
        single.reset(seed=i)
    layout, blueprints = envs.envs[0].layout, envs.envs[0].task.blueprints
    germinate = layout.encode(Action(GERMINATE, 1, 0, blueprints.index("low_rank")))
    advance, cull = layout.encode(Action(ADVANCE, 1, 0)), layout.encode(Action(CULL, 1, 0))

    def step(actions):
        obs, rewards, *_ = envs.step(np.array(actions))
        for i, single in enumerate(singles):
            o, r, *_ = single.step(int(actions[i]))
            np.testing.assert_allclose(obs["nodes"][i], o["nodes"], atol=OBS_ATOL, rtol=0)
            assert abs(r - rewards[i]) <= REWARD_ATOL

    step([germinate] * 3)
    step([advance] * 3)  # TRAINING in all three: the graph has run under vmap once
    step([0] * 3)  # now stacked
    (batch,) = envs._batches.values()
    (stack,) = batch.stacks[3].values()  # column 3: the Sequential's second KasminaLayer
    kernels = [env.layers[1].kernels["0"] for env in envs.envs]
    assert stack.kernels == kernels
    leaf = stack.leaves[0]
    for g, kernel in enumerate(kernels):
        p = next(iter(kernel.parameters()))
        assert p.untyped_storage().data_ptr() == leaf.untyped_storage().data_ptr()
        assert torch.equal(p, leaf[g])
    before = next(iter(kernels[2].parameters())).detach().clone()
    step([0] * 3)
    assert not torch.equal(next(iter(kernels[2].parameters())), before)  # trained in place
    interval = SMALL["decision_interval"]
    # Every optimizer step since TRAINING, those before the stack was built included.
    assert stack.steps[0].tolist() == [3 * interval] * 3
    moments = stack.exp_avgs[0][[0, 2]].clone()
    step([cull, 0, 0])
    (stack,) = batch.stacks[3].values()
    assert stack.kernels == kernels[1:]  # rebuilt without copy 0's seed
    # The others carried their state over: one more interval of steps, not reset.
    assert stack.steps[0].tolist() == [4 * interval, 4 * interval]
    assert not torch.equal(stack.exp_avgs[0][1], torch.zeros_like(moments[1]))
    assert count_vmapped["vmapped"] > 0
    envs.close()


def test_a_fork_of_a_stacked_copy_owns_its_seeds(kernel_dir, count_vmapped):
    """A fork of a copy whose seed trains in a stack gets the seed's current weights as tensors of
    its own (not views of the stack): stepping the fork leaves the batched copy as it was."""
    envs = BatchedMorphogeneticEnv(num_envs=3, kernel_dir=kernel_dir, **SMALL)
    envs.reset(seed=0)
    layout, blueprints = envs.envs[0].layout, envs.envs[0].task.blueprints
    envs.step(np.full(3, layout.encode(Action(GERMINATE, 1, 0, blueprints.index("low_rank")))))
    envs.step(np.full(3, layout.encode(Action(ADVANCE, 1, 0))))
    envs.step(np.zeros(3, dtype=np.int64))
    (batch,) = envs._batches.values()
    (stack,) = batch.stacks[3].values()
    copy = envs.envs[1]
    fork = copy.fork()
    mine = next(iter(copy.layers[1].kernels["0"].parameters()))
    theirs = next(iter(fork.layers[1].kernels["0"].parameters()))
    assert torch.equal(mine, theirs)
    assert mine.untyped_storage().data_ptr() == stack.leaves[0].untyped_storage().data_ptr()
    assert theirs.untyped_storage().data_ptr() != stack.leaves[0].untyped_storage().data_ptr()
    before = mine.detach().clone()
    fork.step(0)
    assert not torch.equal(theirs, before)  # the fork's seed trained
    assert torch.equal(mine, before)  # the batched copy's did not move
    envs.close()


def test_a_cleared_gradient_unmarks_only_its_own_stacked_seed(kernel_dir):
    """After a batch-wide non-finite gradient, each copy's own check may clear its seeds'
    gradients: only a seed whose lent gradient was cleared is not stepped. A parameter that had
    no gradient at all (None, never lent) must not unmark the others."""
    env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **SMALL).unwrapped
    env.reset(seed=0)
    layer = env.layers[1]
    blueprint = env.generator.propose(layer.out_shape, "residual_mlp", env.task.param_budget)
    kernels = [
        load_or_compile(blueprint, layer.out_shape, env.store, env.cache)[0] for _ in range(3)
    ]
    stack = stacks._SeedStack(kernels, lr=1e-3)
    stack.leaves[0].grad = torch.ones_like(stack.leaves[0])  # the others: no gradient
    stack.used = [True, True, True]
    stack.lend_grads()
    assert stack.params[0][1].grad is not None and stack.params[1][1].grad is None
    stack.params[0][1].grad = None  # copy 1's check faulted its seed
    stack.take_back_grads()
    assert stack.used == [True, False, True]
    assert all(p.grad is None for params in stack.params for p in params)
    env.close()


def test_linear_kernels_run_as_a_stacked_program(kernel_dir):
    """Graphs of linear layers and elementwise ops (residual_mlp, low_rank, squeeze_excite) run
    on the stacked tensors directly, one baddbmm per linear: bit for bit each kernel's own call,
    forward and backward. Any other graph is left to vmap."""
    env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, **SMALL).unwrapped
    env.reset(seed=0)
    layer = env.layers[1]
    for name, expected in [("residual_mlp", True), ("low_rank", True), ("squeeze_excite", True),
                           ("norm", False), ("attention", False)]:  # fmt: skip
        blueprint = env.generator.propose(layer.out_shape, name, env.task.param_budget)
        kernels = [
            load_or_compile(blueprint, layer.out_shape, env.store, env.cache)[0] for _ in range(3)
        ]
        program = programs._stacked_program(kernels[0].graph)
        assert (program is not None) == expected, name
        if program is None:
            continue
        for i, kernel in enumerate(kernels):
            with torch.no_grad():
                for t in kernel.flat_state():
                    t.normal_(generator=torch.Generator().manual_seed(i))
        states = [
            torch.stack([p.detach() for p in t]).requires_grad_(True)
            for t in zip(*(k.flat_state() for k in kernels))
        ]
        x = torch.randn(3, 32, *layer.out_shape, generator=torch.Generator().manual_seed(7))
        y = program(states, x)
        y.square().sum().backward()
        for i, kernel in enumerate(kernels):
            own = [t.detach().requires_grad_(True) for t in kernel.flat_state()]
            ref = kernel.graph.forward(*own, x[i])[0]
            ref.square().sum().backward()
            assert torch.equal(y[i], ref), name
            for state, t in zip(states, own):
                assert torch.equal(state.grad[i], t.grad), name
    env.close()
