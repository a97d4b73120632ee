"""Checkpoints from a shared folder (issue 22): a Tamiyo checkpoint.pt or an SB3 checkpoint.zip
must not run code, hang or exhaust memory; each refusal is one line naming the file and the key,
and comes before anything the file describes is built."""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import threading
import time
import zipfile

import gymnasium as gym
import pytest
import torch

import esper_gym  # noqa: F401  (registers the ids)
from esper_gym.agents.tamiyo import (
    CheckpointError,
    TamiyoPolicy,
    load_checkpoint,
    save_checkpoint,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST_S = 2.0  # a refusal reads a small file and checks it: it never builds what it describes
ENV = {"task": "spirals", "blueprints": ["residual_mlp", "low_rank"]}
KWARGS = dict(node_dim=5, global_dim=3, edge_dim=2, per_node_actions=4, hidden=8, layers=1)


def refused(load, path, key: str, error=CheckpointError) -> str:
    """Run `load()`; assert it raises `error` within FAST_S with a one-line message naming
    `path` and `key`. Returns the message."""
    start = time.perf_counter()
    with pytest.raises(error) as err:
        load()
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert elapsed < FAST_S, f"refused after {elapsed:.1f}s: {message}"
    assert "\n" not in message, message
    assert str(path) in message, message
    assert key in message, message
    return message


# --- Tamiyo checkpoint.pt -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tamiyo_ckpt(tmp_path_factory) -> pathlib.Path:
    torch.manual_seed(0)
    policy = TamiyoPolicy(**KWARGS)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3, eps=1e-5)
    sum(p.sum() for p in policy.parameters()).backward()
    optimizer.step()  # the optimizer state then has moments of every parameter
    path = tmp_path_factory.mktemp("tamiyo") / "checkpoint.pt"
    config = {"lr": 1e-3, "guards": {"enabled": True, "patience": 5}, "teacher": None}
    save_checkpoint(path, policy, optimizer, 128, config, env=ENV)
    return path


def tamper(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    """A copy of the checkpoint `src` at `dst`, with `edit(state)` applied to its dict."""
    state = torch.load(src, weights_only=True)
    edit(state)
    torch.save(state, dst)
    return dst


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(state):
        target = state
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return edit


def _delete(*keys):
    def edit(state):
        target = state
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]

    return edit


def _group(key, value):
    return lambda s: s["optimizer"]["param_groups"][0].__setitem__(key, value)


def _nested(depth):
    value = 0
    for _ in range(depth):
        value = [value]
    return value


ATTACKS = {
    # policy_kwargs: each sizes the network, checked before it is built
    "layers_huge": (_set("policy_kwargs", "layers", 2_000_000), "policy_kwargs.layers"),
    "hidden_huge": (_set("policy_kwargs", "hidden", 30_000), "policy_kwargs.hidden"),
    "hidden_str": (_set("policy_kwargs", "hidden", "64"), "policy_kwargs.hidden"),
    "hidden_bool": (_set("policy_kwargs", "hidden", True), "policy_kwargs.hidden"),
    "node_dim_zero": (_set("policy_kwargs", "node_dim", 0), "policy_kwargs.node_dim"),
    "per_node_negative": (
        _set("policy_kwargs", "per_node_actions", -1),
        "policy_kwargs.per_node_actions",
    ),
    "dropout_nan": (_set("policy_kwargs", "dropout", math.nan), "policy_kwargs.dropout"),
    "dropout_one": (_set("policy_kwargs", "dropout", 1.0), "policy_kwargs.dropout"),
    "wait_bias_inf": (_set("policy_kwargs", "wait_bias", math.inf), "policy_kwargs.wait_bias"),
    "wait_bias_bigint": (_set("policy_kwargs", "wait_bias", 10**400), "policy_kwargs.wait_bias"),
    "gated_str": (_set("policy_kwargs", "gated", "yes"), "policy_kwargs.gated"),
    "kwarg_unknown": (_set("policy_kwargs", "activation", "os:system"), "activation"),
    "kwarg_missing": (_delete("policy_kwargs", "hidden"), "hidden"),
    "kwargs_not_dict": (_set("policy_kwargs", [1, 2]), "policy_kwargs"),
    # the other entries
    "step_negative": (_set("global_step", -1), "global_step"),
    "step_float": (_set("global_step", 1e18), "global_step"),
    "config_str": (_set("config", "x"), "config"),
    "config_tensor": (_set("config", {"lr": torch.zeros(3)}), "config"),
    "config_deep": (_set("config", {"a": _nested(50)}), "config"),
    "rng_short": (_set("torch_rng", torch.zeros(10, dtype=torch.uint8)), "torch_rng"),
    "rng_float": (_set("torch_rng", torch.zeros(5056)), "torch_rng"),
    "env_import_path": (_set("env", {**ENV, "task": "os:system"}), "env.task"),
    "env_blueprint_path": (
        _set("env", {**ENV, "blueprints": ["evil.module:Blueprint"]}),
        "env.blueprints",
    ),
    "env_blueprints_str": (_set("env", {**ENV, "blueprints": "residual_mlp"}), "env.blueprints"),
    "env_unknown": (_set("env", {**ENV, "host": "evil:make"}), "host"),
    "env_no_task": (_set("env", {"blueprints": ENV["blueprints"]}), "task"),
    "entry_unknown": (_set("extra", 1), "extra"),
    "entry_missing": (_delete("policy"), "policy"),
    # the weights must be the network's own shapes
    "weight_shape": (
        _set("policy", "encoder.node_in.weight", torch.zeros(8, 6)),
        "policy.encoder.node_in.weight",
    ),
    "weight_dtype": (
        _set("policy", "encoder.node_in.weight", torch.zeros(8, 5, dtype=torch.float64)),
        "policy.encoder.node_in.weight",
    ),
    "weight_not_tensor": (_set("policy", "ret_mean", 3.0), "policy.ret_mean"),
    "weight_unknown": (_set("policy", "extra.weight", torch.zeros(1)), "extra.weight"),
    "weight_missing": (_delete("policy", "value_head.2.bias"), "value_head.2.bias"),
    "kwargs_vs_weights": (_set("policy_kwargs", "hidden", 16), "policy.encoder.node_in.weight"),
    # the optimizer state
    "optimizer_str": (_set("optimizer", "adam"), "optimizer"),
    "optimizer_lr_nan": (_group("lr", math.nan), "optimizer.param_groups[0].lr"),
    "optimizer_eps_zero": (_group("eps", 0.0), "optimizer.param_groups[0].eps"),
    "optimizer_betas": (_group("betas", (0.9, 2.0)), "optimizer.param_groups[0].betas"),
    "optimizer_maximize": (_group("maximize", True), "optimizer.param_groups[0].maximize"),
    "optimizer_group_unknown": (_group("evil", 1), "evil"),
    "optimizer_params": (_group("params", [0, 1]), "optimizer.param_groups[0].params"),
    "optimizer_moment_shape": (
        _set("optimizer", "state", 0, "exp_avg", torch.zeros(10**3)),
        "optimizer.state[0].exp_avg",
    ),
    "optimizer_index": (
        _set("optimizer", "state", 10**6, {"step": torch.tensor(1.0)}),
        "optimizer.state[1000000]",
    ),
    "optimizer_step_nan": (
        _set("optimizer", "state", 0, "step", torch.tensor(math.nan)),
        "optimizer.state[0].step",
    ),
}


def test_untampered_checkpoint_loads(tamiyo_ckpt):
    ckpt = load_checkpoint(tamiyo_ckpt)
    assert ckpt.global_step == 128 and ckpt.env == ENV
    assert ckpt.config["guards"] == {"enabled": True, "patience": 5}
    assert ckpt.policy.init_kwargs["hidden"] == 8
    torch.optim.Adam(ckpt.policy.parameters()).load_state_dict(ckpt.optimizer_state)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tampered_tamiyo_checkpoint_is_refused_fast_naming_the_key(
    tamiyo_ckpt, tmp_path, attack, monkeypatch
):
    edit, key = ATTACKS[attack]
    bad = tamper(tamiyo_ckpt, tmp_path / "bad.pt", edit)
    if not attack.startswith(("weight_", "optimizer_", "kwargs_vs_")):  # those need the network
        # refused before the network is built: a loader that builds first fails here, fast,
        # instead of allocating what the file describes (hidden=30000: GBs)
        def built(**kwargs):
            raise AssertionError(f"TamiyoPolicy built from a checkpoint refused later: {attack}")

        monkeypatch.setattr("esper_gym.agents.tamiyo.checkpoint.TamiyoPolicy", built)
    refused(lambda: load_checkpoint(bad), bad, key)


def test_policy_sizes_are_checked_against_the_env_before_building(tamiyo_ckpt, tmp_path):
    from tests.test_tamiyo import GraphBandit

    env = GraphBandit()
    space = TamiyoPolicy.for_space(env.observation_space, hidden=8, layers=1).init_kwargs
    fits = tamper(tamiyo_ckpt, tmp_path / "fits.pt", lambda s: s["policy_kwargs"].update(space))
    # sized for the bandit's spaces, with weights of another network: the kwargs pass, the
    # weights do not; and with the original kwargs the env refuses before the weights count
    refused(lambda: load_checkpoint(fits, env=env), fits, "policy.encoder.node_in.weight")
    message = refused(lambda: load_checkpoint(tamiyo_ckpt, env=env), tamiyo_ckpt, "node_dim")
    assert f"needs {space['node_dim']}" in message


def _sb3_zip(path: pathlib.Path) -> pathlib.Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data", "{}")
        archive.writestr("policy.pth", b"")
    return path


def test_file_that_is_not_a_complete_checkpoint_is_refused(tamiyo_ckpt, tmp_path):
    raw = tamiyo_ckpt.read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(raw[: len(raw) // 2])
    refused(lambda: load_checkpoint(half), half, "not a complete zip")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n" * 100)
    refused(lambda: load_checkpoint(text), text, "not a complete zip")
    # the central directory intact, a tensor's bytes cut: torch's own reader refuses
    infos = zipfile.ZipFile(tamiyo_ckpt).infolist()
    record = next(i for i in infos if "/data/" in i.filename and i.file_size > 64)
    corrupt = tmp_path / "corrupt.pt"
    with zipfile.ZipFile(tamiyo_ckpt) as src, zipfile.ZipFile(corrupt, "w") as dst:
        for info in infos:
            blob = src.read(info.filename)
            dst.writestr(info, blob[:16] if info.filename == record.filename else blob)
    refused(lambda: load_checkpoint(corrupt), corrupt, "torch.load")
    missing = tmp_path / "absent.pt"
    refused(lambda: load_checkpoint(missing), missing, "cannot open")


def test_directory_device_and_oversized_files_are_refused_unread(tmp_path):
    refused(lambda: load_checkpoint(tmp_path), tmp_path, "not a regular file")
    zero = tmp_path / "zero.pt"
    zero.symlink_to("/dev/zero")
    refused(lambda: load_checkpoint(zero), zero, "not a regular file")
    big = tmp_path / "big.pt"
    with open(big, "wb") as f:
        f.truncate(300 << 20)  # sparse: nothing written, and nothing should be read
    refused(lambda: load_checkpoint(big), big, "bytes")


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    from esper_gym.agents.sb3 import load_model

    fifo = tmp_path / "checkpoint.pt"
    os.mkfifo(fifo)
    for load in (lambda: load_checkpoint(fifo), lambda: load_model(fifo, None, None, {})):
        outcome = []

        def run(load=load, outcome=outcome):
            try:
                load()
            except Exception as exc:  # recorded and checked below
                outcome.append(exc)

        thread = threading.Thread(target=run, daemon=True)  # a hang must not hang the suite
        thread.start()
        thread.join(FAST_S)
        assert not thread.is_alive(), "blocked opening a FIFO"
        assert isinstance(outcome[0], CheckpointError), outcome
        assert "not a regular file" in str(outcome[0])


def test_huge_pickle_is_refused_before_unpickling(tmp_path):
    bloat = tmp_path / "bloat.pt"
    torch.save({"config": list(range(600_000))}, bloat)  # a 1+ MiB pickle of small objects
    refused(lambda: load_checkpoint(bloat), bloat, "data.pkl")


def test_sb3_checkpoint_given_to_tamiyo_says_which_loader_it_needs(tmp_path):
    from esper_gym.bench.jobs import checkpoint_file, make_jobs, resolve_tasks

    archive = _sb3_zip(tmp_path / "checkpoint.zip")
    message = refused(lambda: load_checkpoint(archive), archive, "SB3")
    assert "load_model" in message and "checkpoint.pt" in message
    # evaluate: a run dir holding only an SB3 model, and the archive named directly
    with pytest.raises(ValueError, match=r"SB3 model .*agent=tamiyo"):
        checkpoint_file(tmp_path)
    tasks = resolve_tasks(["spirals"])
    refused(lambda: make_jobs(["mine"], tasks, 1, {"mine": str(archive)}), archive, "SB3")


def test_train_resume_of_the_other_kind_says_which_agent_resumes_it(tmp_path):
    from esper_gym.train import ConfigError, _checkpoint_file

    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds checkpoint\.pt.*agent=tamiyo"):
        _checkpoint_file(str(tmp_path), ".zip")
    other = tmp_path / "sb3"
    other.mkdir()
    (other / "checkpoint.zip").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds checkpoint\.zip.*maskable_ppo"):
        _checkpoint_file(str(other), ".pt")


def test_every_committed_checkpoint_still_loads():
    found = sorted(p for p in (ROOT / "results").rglob("*") if p.suffix in (".pt", ".zip"))
    assert found, "no committed checkpoints under results/"
    # Only Tamiyo checkpoints are committed; an SB3 checkpoint.zip would need load_model with
    # the model its config builds, which a results folder does not record.
    assert all(p.suffix == ".pt" for p in found), [p for p in found if p.suffix != ".pt"]
    from esper_gym.tasks import TASKS

    for path in found:
        record = load_checkpoint(path).env
        first = record["task"].split("+")[0]  # a mixture's tasks share their sizes
        env = gym.make(TASKS[first].gym_id)  # the sizes it was trained with
        ckpt = load_checkpoint(path, env=env)
        assert ckpt.global_step > 0 and ckpt.env["blueprints"], path
        assert ckpt.torch_rng is not None  # the Adam state: kept, or left out (--policy-only)


# --- SB3 checkpoint.zip -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sb3_setup(tmp_path_factory):
    """(checkpoint.zip of a tiny MaskablePPO, a fresh model to load it into, its env record)."""
    from esper_gym.agents.sb3 import make_maskable_ppo, save_model
    from esper_gym.agents.tamiyo import env_record

    kernels = tmp_path_factory.mktemp("kernels")
    env = gym.make("Esper/Spirals-v0", kernel_dir=kernels, max_epochs=1, decision_interval=10)
    model = make_maskable_ppo(env, hidden=16, layers=1, n_steps=16, batch_size=16, seed=0)
    path = tmp_path_factory.mktemp("sb3") / "checkpoint.zip"
    save_model(model, path, env_record(env))
    fresh = make_maskable_ppo(env, hidden=16, layers=1, n_steps=16, batch_size=16, seed=1)
    return path, fresh, env_record(env)


def rewrite(src, dst, data=None, members=None) -> pathlib.Path:
    """Copy the SB3 archive `src` to `dst` with `data(dict)` applied to its `data` JSON and
    `members[name](bytes) -> bytes` to other members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            blob = zin.read(info.filename)
            if info.filename == "data" and data is not None:
                entries = json.loads(blob)
                data(entries)
                blob = json.dumps(entries).encode()  # NaN and Infinity as Python writes them
            if info.filename in (members or {}):
                blob = members[info.filename](blob)
            zout.writestr(info, blob)
    return dst


def _torch_edit(edit):
    def apply(blob: bytes) -> bytes:
        state = torch.load(io.BytesIO(blob), weights_only=True)
        edit(state)
        out = io.BytesIO()
        torch.save(state, out)
        return out.getvalue()

    return apply


SB3_DATA_ATTACKS = {  # test id: the entry written into `data` (refusals name its key)
    "num_timesteps": {"num_timesteps": -1e12},  # would train forever
    "n_steps": {"n_steps": 1e9},  # a 300 GiB rollout buffer
    "n_steps_as_int": {"n_steps": 10**9},
    "gamma": {"gamma": math.nan},  # a NaN policy
    "gae_lambda": {"gae_lambda": 2.0},
    "batch_size": {"batch_size": 1},
    "learning_rate": {"learning_rate": math.inf},
    "seed": {"seed": -5},
    "tensorboard_log": {"tensorboard_log": "/etc"},
    "use_sde": {"use_sde": True},
    "verbose": {"verbose": "2"},
    "target_kl": {"target_kl": -1.0},
    "unknown": {"device": "cuda:7"},  # not an entry SB3 writes: refused, listing those allowed
}


@pytest.mark.parametrize("attack", sorted(SB3_DATA_ATTACKS))
def test_sb3_data_entry_out_of_range_is_refused_fast_naming_it(sb3_setup, tmp_path, attack):
    from esper_gym.agents.sb3 import UnsafeCheckpointError, load_model

    path, fresh, record = sb3_setup
    entry = SB3_DATA_ATTACKS[attack]
    bad = rewrite(path, tmp_path / "bad.zip", data=lambda d: d.update(entry))
    (key,) = entry
    message = refused(
        lambda: load_model(bad, fresh, fresh.get_env(), record),
        bad,
        key if attack == "unknown" else f"data.{key}=",
        UnsafeCheckpointError,
    )
    if attack == "unknown":
        assert "allowed: verbose, num_timesteps" in message


def test_sb3_data_entry_missing_is_refused(sb3_setup, tmp_path):
    from esper_gym.agents.sb3 import UnsafeCheckpointError, load_model

    path, fresh, record = sb3_setup
    bad = rewrite(path, tmp_path / "bad.zip", data=lambda d: d.pop("gamma"))
    refused(lambda: load_model(bad, fresh, fresh.get_env(), record), bad, "gamma",
            UnsafeCheckpointError)  # fmt: skip


def test_sb3_deeply_nested_json_is_refused(sb3_setup, tmp_path):
    from esper_gym.agents.sb3 import UnsafeCheckpointError, load_model

    path, fresh, record = sb3_setup
    deep = {"data": lambda _: b'{"gamma": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"}
    bad = rewrite(path, tmp_path / "bad.zip", members=deep)
    refused(lambda: load_model(bad, fresh, fresh.get_env(), record), bad, "data",
            UnsafeCheckpointError)  # fmt: skip


SB3_TENSOR_ATTACKS = {
    "policy_shape": (
        "policy.pth",
        lambda s: s.__setitem__(next(iter(s)), torch.zeros(7, 7)),
        "policy.pth.",
    ),
    "policy_unknown": ("policy.pth", lambda s: s.__setitem__("x", torch.zeros(1)), "'x'"),
    "optimizer_eps": (
        "policy.optimizer.pth",
        lambda s: s["param_groups"][0].__setitem__("eps", math.nan),
        "policy.optimizer.pth.param_groups[0].eps",
    ),
    "optimizer_groups": (
        "policy.optimizer.pth",
        lambda s: s.__setitem__("param_groups", s["param_groups"] * 2),
        "policy.optimizer.pth.param_groups",
    ),
}


@pytest.mark.parametrize("attack", sorted(SB3_TENSOR_ATTACKS))
def test_sb3_weights_and_optimizer_are_checked_against_the_model(sb3_setup, tmp_path, attack):
    from esper_gym.agents.sb3 import load_model

    member, edit, key = SB3_TENSOR_ATTACKS[attack]
    path, fresh, record = sb3_setup
    bad = rewrite(path, tmp_path / "bad.zip", members={member: _torch_edit(edit)})
    refused(lambda: load_model(bad, fresh, fresh.get_env(), record), bad, key)


def test_sb3_record_naming_an_import_path_is_refused(sb3_setup, tmp_path):
    from esper_gym.agents.sb3 import RECORD_MEMBER, load_model

    path, fresh, record = sb3_setup
    evil = json.dumps({**record, "task": "evil.module:make_task"}).encode()
    bad = rewrite(path, tmp_path / "bad.zip", members={RECORD_MEMBER: lambda _: evil})
    refused(lambda: load_model(bad, fresh, fresh.get_env(), record), bad, "env.task")


def test_sb3_loader_refuses_a_tamiyo_checkpoint_and_broken_files(sb3_setup, tamiyo_ckpt, tmp_path):
    from esper_gym.agents.sb3 import load_model

    _, fresh, record = sb3_setup
    message = refused(
        lambda: load_model(tamiyo_ckpt, fresh, fresh.get_env(), record), tamiyo_ckpt, "Tamiyo"
    )
    assert "agent=tamiyo" in message
    half = tmp_path / "half.zip"
    raw = sb3_setup[0].read_bytes()
    half.write_bytes(raw[: len(raw) // 2])
    refused(lambda: load_model(half, fresh, fresh.get_env(), record), half, "not a complete zip")
    refused(lambda: load_model(tmp_path, fresh, fresh.get_env(), record), tmp_path, "regular")


def test_sb3_untampered_checkpoint_still_loads(sb3_setup):
    from esper_gym.agents.sb3 import load_model

    path, fresh, record = sb3_setup
    model = load_model(path, fresh, fresh.get_env(), record)
    assert model.n_steps == 16 and model.gamma == 0.99
