import copy
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import esper_gym
from esper_gym.actions import ADVANCE, CULL, GERMINATE, Action
from esper_gym.data import DatasetNotFoundError
from esper_gym.env import MorphogeneticEnv
from esper_gym.kasmina import SeedState
from esper_gym.kernels import KernelStore
from esper_gym.tasks import Task, get_task
from tests.conftest import SMALL, small_kwargs, write_tiny_cifar
from tests.hostile import Float64Delta, NanBackward


def make(env_id="Esper/Spirals-v0", **kw):
    return gym.make(env_id, **{**SMALL, **kw})


def rollout(env, actions, seed):
    obs, info = env.reset(seed=seed)
    trace = [(obs, 0.0, info)]
    for a in actions:
        if not obs["action_mask"][a]:
            a = 0
        obs, r, term, trunc, info = env.step(a)
        trace.append((obs, r, info))
        if term or trunc:
            break
    return trace


def strip(info):
    # Wall-clock and cache-state telemetry differ between replays; everything else may not.
    return {k: v for k, v in info.items() if k not in ("wall_s", "telemetry")}


@pytest.mark.parametrize("env_id", sorted(esper_gym.ENV_IDS))
def test_check_env_passes_without_warnings(env_id, tmp_path, kernel_dir):
    kw = small_kwargs(env_id, tmp_path)
    env = gym.make(env_id, kernel_dir=kernel_dir, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=False)
    assert [str(w.message) for w in caught] == []


def test_seeded_rollouts_are_identical(kernel_dir):
    layout = make(kernel_dir=kernel_dir).unwrapped.layout
    plan = [
        layout.encode(Action(GERMINATE, 1, 0, 0)),
        layout.encode(Action(ADVANCE, 1, 0)),
        0,
        layout.encode(Action(ADVANCE, 1, 0)),
        0,
        0,
    ]
    a = rollout(make(kernel_dir=kernel_dir), plan, seed=3)
    b = rollout(make(kernel_dir=kernel_dir), plan, seed=3)
    c = rollout(make(kernel_dir=kernel_dir), plan, seed=4)
    assert len(a) == len(b) == 7
    for (oa, ra, ia), (ob, rb, ib) in zip(a, b):
        for key in oa:
            np.testing.assert_array_equal(oa[key], ob[key])
        assert ra == rb and strip(ia) == strip(ib)
    assert a[-1][2]["val_acc"] != c[-1][2]["val_acc"]


def test_reset_does_not_touch_the_global_torch_rng(kernel_dir):
    env = make(kernel_dir=kernel_dir)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    env.reset(seed=0)
    env.step(0)
    assert torch.equal(torch.rand(3), expected)


def test_env_pickles_mid_episode_and_continues_identically(kernel_dir):
    env = make(kernel_dir=kernel_dir).unwrapped
    env.reset(seed=1)
    germ = env.layout.encode(Action(GERMINATE, 0, 0, 0))
    env.step(germ)
    env.step(env.layout.encode(Action(ADVANCE, 0, 0)))
    clone = pickle.loads(pickle.dumps(env))
    for _ in range(2):
        o1, r1, *_, i1 = env.step(0)
        o2, r2, *_, i2 = clone.step(0)
        assert r1 == r2 and strip(i1) == strip(i2)
        np.testing.assert_array_equal(o1["nodes"], o2["nodes"])
    # The training seed's weights too (its Adam state must survive the copy, not restart).
    k1, k2 = env.layers[0].kernels["0"], clone.layers[0].kernels["0"]
    for p1, p2 in zip(k1.parameters(), k2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_async_vector_env_runs_two_workers(kernel_dir):
    # "module:id" makes each spawned worker import esper_gym, which registers the ids.
    fns = [lambda: gym.make("esper_gym:Esper/Spirals-v0", kernel_dir=kernel_dir, **SMALL)] * 2
    venv = gym.vector.AsyncVectorEnv(fns, shared_memory=False, context="spawn")
    try:
        obs, _ = venv.reset(seed=[0, 1])
        assert obs["nodes"].shape[0] == 2
        for _ in range(3):
            obs, rewards, _term, _trunc, _infos = venv.step(np.zeros(2, dtype=np.int64))
        assert rewards.shape == (2,) and np.isfinite(rewards).all()
        assert not np.array_equal(obs["nodes"][0], obs["nodes"][1])  # different seeds
    finally:
        venv.close()


def test_masked_action_runs_as_wait_with_penalty(kernel_dir):
    env = make(kernel_dir=kernel_dir).unwrapped
    obs, _ = env.reset(seed=0)
    advance = env.layout.encode(Action(ADVANCE, 0, 0))  # slot is DORMANT: masked
    assert obs["action_mask"][advance] == 0 and not env.action_masks()[advance]
    _, _, _, _, info = env.step(advance)
    assert info["invalid_action"] is True
    assert info["reward_components"]["invalid_action"] == -env.reward_fn.weights.invalid_action
    assert info["reward_components"]["intervention"] == 0.0
    assert all(s.state == SeedState.DORMANT for layer in env.layers for s in layer.slots)


def test_germinated_kernel_runs_and_grows_the_model(kernel_dir):
    env = make(kernel_dir=kernel_dir).unwrapped
    env.reset(seed=0)
    _, _, _, _, info = env.step(env.layout.encode(Action(GERMINATE, 1, 0, 0)))
    assert info["params_added"] > 0 and info["events"][0]["to"] == "GERMINATED"
    env.step(env.layout.encode(Action(ADVANCE, 1, 0)))
    slot = env.layers[1].slots[0]
    assert slot.state == SeedState.TRAINING
    # The compiled kernel ran on every optimizer step, plus once to measure its contribution.
    assert slot.calls == env.task.decision_interval + 1
    assert slot.kernel_sha and slot.kernel_sha in env.store
    obs, *_ = env.step(0)
    from esper_gym.observation import NODE_FEATURES, SLOT_FEATURES

    col = len(NODE_FEATURES) + SLOT_FEATURES.index("contribution")
    assert obs["nodes"][1][col] == pytest.approx(slot.contribution * 10, abs=1e-6)
    x = env.trainer.x_val[:64]
    with torch.no_grad(), env.layers[1].seed_override(0, 1.0):
        grown = env.model(x)
    assert not torch.allclose(grown, env.model(x))  # the seed learned a non-zero delta


def test_host_divergence_ends_the_episode_with_a_penalty(kernel_dir):
    env = make(kernel_dir=kernel_dir, optimizer="sgd", lr=1e12).unwrapped
    env.reset(seed=0)
    done, steps = False, 0
    while not done:
        obs, _reward, done, _trunc, info = env.step(0)
        steps += 1
        assert steps < 20
    assert info["diverged"] and "NaN/Inf" in info["divergence"]
    assert info["reward_components"]["divergence"] == -env.reward_fn.weights.divergence
    assert all(np.isfinite(v).all() for k, v in obs.items() if k != "action_mask")


def test_any_task_field_is_a_make_kwarg_and_bad_ones_are_named(kernel_dir):
    env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir, seed_slots=3, decision_interval=4)
    assert env.unwrapped.task.seed_slots == 3 and env.unwrapped.task.decision_interval == 4
    with pytest.raises(ValueError, match="unknown Task field"):
        gym.make("Esper/Spirals-v0", seeds_slots=3)
    with pytest.raises(ValueError, match="batch_size=-1"):
        gym.make("Esper/Spirals-v0", batch_size=-1)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


def test_user_registers_their_own_host_and_dataset(kernel_dir):
    def wide_mlp(input_shape, num_classes, slots, config):
        from esper_gym.hosts import mlp

        return mlp(input_shape, num_classes, slots, config, hidden=(24,))

    task = Task(
        name="mine",
        host=wide_mlp,
        dataset="spirals",
        dataset_kwargs={"n_train": 512, "arms": 3},
        max_epochs=1,
        decision_interval=4,
    )
    gym.register(
        "MyLab/Mine-v0", entry_point="esper_gym.env:MorphogeneticEnv", kwargs={"task": task}
    )
    env = gym.make("MyLab/Mine-v0", kernel_dir=kernel_dir)
    obs, _ = env.reset(seed=0)
    assert int(obs["node_mask"].sum()) == 2
    assert env.unwrapped.layers[0].host.out_features == 24
    assert env.unwrapped.data.num_classes == 3


def test_missing_dataset_is_a_clear_error(tmp_path, kernel_dir):
    env = gym.make("Esper/FashionMNIST-v0", data_dir=str(tmp_path / "none"), kernel_dir=kernel_dir)
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        env.reset(seed=0)


def test_faulty_kernels_are_caught_and_the_episode_goes_on(kernel_dir):
    env = make("Esper/SpiralsFaulty-v0", kernel_dir=kernel_dir, max_faults=2).unwrapped
    env.reset(seed=0)
    raise_bp = env.task.blueprints.index("fault_raise")
    env.step(env.layout.encode(Action(GERMINATE, 0, 0, raise_bp)))
    _, _reward, term, _, info = env.step(env.layout.encode(Action(ADVANCE, 0, 0)))
    assert info["faults"] == 2 and set(info["fault_kinds"]) == {"exception"}
    assert info["reward_components"]["fault"] == -2 * env.reward_fn.weights.fault
    assert env.layers[0].slots[0].state == SeedState.EMBARGOED  # culled, then embargoed
    assert any("circuit breaker" in e["reason"] for e in info["events"])
    assert np.isfinite(info["train_loss"]) and not term


def test_cull_mask_and_render(kernel_dir):
    env = make(kernel_dir=kernel_dir, render_mode="ansi").unwrapped
    env.reset(seed=0)
    env.step(env.layout.encode(Action(GERMINATE, 0, 1, 0)))
    cull = env.layout.encode(Action(CULL, 0, 1))
    assert env.action_masks()[cull]
    env.step(cull)
    assert not env.action_masks()[cull]
    text = env.render()
    assert "fc0" in text and "embargoed" in text


def test_cifar10_env_reads_the_pickle_batches(tmp_path, kernel_dir):
    root = write_tiny_cifar(tmp_path)
    kw = small_kwargs("Esper/CIFAR10-v0", tmp_path)
    assert kw["data_dir"] == str(root)
    env = gym.make("Esper/CIFAR10-v0", kernel_dir=kernel_dir, **kw)
    obs, _ = env.reset(seed=0)
    assert env.unwrapped.data.input_shape == (3, 32, 32)
    assert obs["nodes"][0][1] == 1.0  # first node is a conv layer
    MorphogeneticEnv.step(env.unwrapped, 0)


class Zero(torch.nn.Module):
    """A healthy parameter-free kernel: a zero delta with a finite backward."""

    def forward(self, x):
        return x * 0


def _blending(env, layer: int, slot: int, kernel, name: str) -> None:
    """Germinate `kernel` straight into a slot (as a kernel that passed validation would be) and
    take it to BLENDING with alpha > 0, between two env steps."""
    env.layers[layer].germinate(slot, kernel, name)
    env.layers[layer].advance(slot)  # TRAINING
    env.layers[layer].advance(slot)  # BLENDING
    env.layers[layer].step_seeds()  # alpha 1/blend_steps: the kernel reads the undetached h


def _host_state(env) -> list[torch.Tensor]:
    return [p.detach().clone() for p in env.trainer.host_params]


def test_kernel_returning_float64_is_a_fault_and_the_episode_goes_on(kernel_dir):
    env = make(kernel_dir=kernel_dir, max_faults=2).unwrapped
    env.reset(seed=0)
    env.layers[0].germinate(0, Float64Delta(), "float64")
    env._update_mask()
    _, _, term, _, info = env.step(env.layout.encode(Action(ADVANCE, 0, 0)))
    assert info["fault_kinds"] == ["dtype", "dtype"]  # two TRAINING calls, then the breaker
    assert env.layers[0].slots[0].state == SeedState.EMBARGOED
    assert np.isfinite(info["train_loss"]) and not term
    while not term:
        _, _, term, _, info = env.step(0)
    # Every faulting call fell back to the host path: the run is exactly the WAIT-only run.
    (*_, (_, _, waited)) = rollout(make(kernel_dir=kernel_dir).unwrapped, [0] * 10, seed=0)
    assert not info["diverged"] and info["test_acc"] == waited["test_acc"]


def test_nan_backward_of_a_blending_kernel_never_reaches_the_host(kernel_dir):
    env = make(kernel_dir=kernel_dir).unwrapped
    env.reset(seed=0)
    _blending(env, 0, 0, NanBackward(), "nan_backward")
    slot = env.layers[0].slots[0]
    assert slot.state == SeedState.BLENDING and slot.alpha > 0

    # The kernel really poisons the host's gradients (checked on a copy)...
    twin = copy.deepcopy(env.model)
    x, y = env.trainer.x_val[:32], env.trainer.y_val[:32]
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    poisoned = [p.grad for p in twin.parameters() if p.grad is not None]
    assert not all(torch.isfinite(g).all() for g in poisoned)

    # ...but the host step is skipped, the fault recorded against the seed, the seed culled.
    before = _host_state(env)
    stats = env.trainer.run_interval(1)
    after = _host_state(env)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(a).all() for a in after)
    assert not stats.diverged
    events, faults = env.layers[0].drain()
    assert [(f.kind, f.layer, f.slot, f.blueprint) for f in faults] == [
        ("host_grad", "fc0", 0, "nan_backward")
    ]
    assert slot.state == SeedState.EMBARGOED  # culled, then embargoed by the same step
    (cull,) = [e for e in events if e["to"] == "CULLED"]
    assert cull["reason"].startswith("host_grad fault") and cull["slot"] == 0

    # The episode goes on to its budget with a finite host.
    term = False
    while not term:
        _, _, term, _, info = env.step(0)
    assert not info["diverged"] and 0 < info["test_acc"] <= 1
    assert all(torch.isfinite(p).all() for p in env.trainer.host_params)


def test_host_gradient_fault_blames_only_the_seed_that_sent_it(kernel_dir):
    env = make(kernel_dir=kernel_dir).unwrapped
    env.reset(seed=0)
    # fc0's seed is upstream of the culprit (the NaN reaches it, passed on), fc2's downstream.
    _blending(env, 0, 0, Zero(), "zero")
    _blending(env, 1, 0, NanBackward(), "nan_backward")
    _blending(env, 2, 0, Zero(), "zero")
    _, _, term, _, info = env.step(0)
    assert info["fault_kinds"] == ["host_grad"]
    assert env.layers[1].slots[0].state == SeedState.EMBARGOED
    assert env.layers[0].slots[0].state == SeedState.PROBATION  # blended on, untouched
    assert env.layers[2].slots[0].state == SeedState.PROBATION
    assert not term and np.isfinite(info["train_loss"])


# --- bad input gets a clear error up front ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latency_budget_ms": "5"}, "latency_budget_ms='5'; allowed: None"),
        ({"latency_budget_ms": -1}, "latency_budget_ms=-1; allowed: None"),
        ({"latency_budget_ms": float("nan")}, "latency_budget_ms=nan; allowed: None"),
        ({"batch_size": 32.5}, "batch_size=32.5 must be an integer >= 1"),
        ({"decision_interval": 2.0}, "decision_interval=2.0 must be an integer >= 1"),
        ({"max_epochs": float("inf")}, "max_epochs=inf must be a finite number > 0"),
        ({"lr": float("nan")}, "lr=nan must be a finite number > 0"),
        ({"blend_steps": 1.5}, "blend_steps=1.5 must be an integer >= 1"),
        ({"reward_weights": {"fault": float("nan")}}, "fault=nan must be a finite number >= 0"),
        ({"reward_weights": {"accuracy": float("inf")}}, "accuracy=inf must be a finite number"),
    ],
)
def test_bad_values_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError) as err:
        gym.make("Esper/Spirals-v0", **kwargs)
    assert message in str(err.value)


def test_numpy_integers_are_accepted_as_counts():
    task = get_task("spirals", batch_size=np.int64(64), decision_interval=np.int32(4))
    assert task.batch_size == 64 and type(task.batch_size) is int
    assert type(task.decision_interval) is int


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"grow": 5}, TypeError, "grow=5 must be a blueprint name or a list of names"),
        ({"grow": ["residual_mlp", 3]}, TypeError, "grow=['residual_mlp', 3] must be"),
        ({"grow": "nope"}, ValueError, "grow=['nope']: not in this task's blueprints"),
        ({"grwo": "residual_mlp"}, ValueError, "unknown reset option(s) ['grwo']; allowed"),
        ("residual_mlp", TypeError, "options='residual_mlp' must be a dict or None"),
    ],
)
def test_bad_reset_options_are_named(options, error, message, kernel_dir):
    env = make(kernel_dir=kernel_dir).unwrapped
    with pytest.raises(error) as err:
        env.reset(seed=0, options=options)
    assert message in str(err.value)
    assert env.trainer is None  # refused before any work


def test_step_after_termination_raises_and_reset_starts_over(kernel_dir):
    env = make(kernel_dir=kernel_dir)  # through gym.make's wrappers (PassiveEnvChecker, ...)
    env.reset(seed=0)
    term, steps = False, 0
    while not term:
        _, _, term, _, _ = env.step(0)
        steps += 1
    done_steps = env.unwrapped.trainer.steps_done
    with pytest.raises(RuntimeError) as err:
        env.step(0)
    assert str(err.value) == (
        f"episode is over (terminated after step {steps}, {done_steps}/{done_steps} optimizer "
        "steps); call reset()"
    )
    assert env.unwrapped.trainer.steps_done == done_steps  # nothing trained past the budget
    env.reset(seed=1)
    _, _, term, _, info = env.step(0)
    assert info["step"] == 1 and not term


@pytest.mark.parametrize("env_id", list(esper_gym.ENV_IDS))
def test_every_shipped_blueprint_grows_to_the_episodes_end_on_every_id(env_id, tmp_path):
    """Each blueprint a task can germinate (the fault ones and the opt-in extra included) on a
    layer it fits, then WAIT to the end, in single envs and in the batched simulator: the seed's
    outcome row is written (a conv3x3's `norm: True` once crashed it) and nothing raises."""
    from esper_gym.kernels.blueprints import BLUEPRINTS, EXTRA_LIBRARY, FAULT_LIBRARY

    base = get_task(esper_gym.ENV_IDS[env_id][0]).blueprints
    library = tuple(dict.fromkeys((*base, *EXTRA_LIBRARY, *FAULT_LIBRARY)))
    kwargs = {**small_kwargs(env_id, tmp_path), "blueprints": library}
    kernel_dir = str(tmp_path / "kernels")
    env = gym.make(env_id, kernel_dir=kernel_dir, **kwargs)
    u = env.unwrapped

    def germination(mask, b):
        for index in np.flatnonzero(mask):
            action = u.layout.decode(int(index))
            if action.kind == GERMINATE and action.blueprint == b:
                return int(index)
        return None

    grown, first = [], []
    for b, name in enumerate(library):
        obs, _ = env.reset(seed=0)
        index = germination(obs["action_mask"], b)
        first.append(index or 0)
        if index is None:  # no layer of this host has a slot shape the blueprint supports
            assert not any(BLUEPRINTS[name]().supports(layer.out_shape) for layer in u.layers)
            continue
        done, action = False, index
        while not done:
            obs, _, terminated, truncated, info = env.step(action)
            done, action = terminated or truncated, 0
        seeds = [s for s in info["seeds"] if s["blueprint"] == name]
        assert len(seeds) == 1, (name, info["seeds"])
        grown.append(name)
    rows = u.store.outcomes()
    assert sorted(o.kind for o in rows) == sorted(grown) and rows.skipped == 0
    assert {"residual_mlp", "low_rank", "norm"} <= set(grown)
    if "Spirals" not in env_id and "FashionMNIST-v0" not in env_id:
        assert "conv3x3" in grown  # conv hosts grow conv seeds
    if "FashionMNIST" in env_id:
        return  # the batched run below: on the ids whose data loads in no time (conv: CIFAR10)
    # The batched simulator: copy b germinates blueprint b on the same first action.
    envs = gym.make_vec(
        env_id, num_envs=len(library), vectorization_mode="vector_entry_point",
        kernel_dir=str(tmp_path / "batched"), **kwargs,
    )  # fmt: skip
    envs.reset(seed=0)
    actions, done = np.array(first), np.zeros(len(library), bool)
    while not done.all():
        _, _, terminated, truncated, _ = envs.step(np.where(done, 0, actions))
        done |= terminated | truncated
        actions[:] = 0
    envs.close()  # writes the outcomes the batched env holds back for one transaction
    batched = KernelStore(tmp_path / "batched").outcomes()
    assert sorted(o.kind for o in batched) == sorted(grown) and batched.skipped == 0
