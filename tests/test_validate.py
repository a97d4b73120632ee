"""esper_gym.validate: every evaluated episode replays to its reported numbers; a tampered or
malformed replay file is refused, naming the episode and the field."""

import json
import pathlib

import pandas as pd
import pytest

from esper_gym import validate
from esper_gym.evaluate import EvalConfig, evaluate, resolve_tasks
from esper_gym.validate import ReplayError
from tests.conftest import SMALL

TASK = {**SMALL, "blueprints": ("residual_mlp", "low_rank")}


@pytest.fixture(scope="module")
def replays(tmp_path_factory, kernel_dir):
    """A fresh evaluate run on test contexts: 2 agents x 2 seeds."""
    out = tmp_path_factory.mktemp("replay")
    tasks = resolve_tasks(["spirals"], overrides={"spirals": TASK})
    evaluate(
        EvalConfig(
            ["heuristic", "random"],
            tasks,
            seeds=2,
            out_dir=out,
            first_seed=11,
            n_jobs=1,
            kernel_dir=kernel_dir,
            contexts="test",
            reps=100,
            make_plots=False,
            progress=False,
        )
    )
    return out


def _tampered(replays, tmp_path, change) -> pathlib.Path:
    doc = json.loads((replays / validate.FILE_NAME).read_text())
    change(doc["episodes"][0])
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(doc))
    return path


def test_every_episode_is_recorded_and_replays_exactly_on_cpu(replays, kernel_dir):
    path = replays / validate.FILE_NAME
    episodes = validate.load(path)
    csv = pd.read_csv(replays / "episodes.csv")
    assert len(episodes) == len(csv) == 4
    assert min(len(ep["actions"]) for ep in episodes) >= 2  # so dropping one leaves a list
    for ep, row in zip(episodes, csv.to_dict("records")):
        assert (ep["agent"], ep["seed"], ep["env_id"]) == (
            row["agent"],
            row["seed"],
            "Esper/Spirals-v0",
        )
        assert len(ep["actions"]) == row["length"]
        assert ep["return"] == row["return"] and ep["test_acc"] == row["test_acc"]
        assert ep["context_index"] == row["context_index"] >= 0
        assert ep["env_kwargs"]["contexts"] == "test"
        assert ep["env_kwargs"]["max_epochs"] == SMALL["max_epochs"]
        assert "device" not in ep["env_kwargs"]
        assert ep["threads"] == 1
    assert validate.validate(path, kernel_dir, custom=True) == 4


def test_the_command_line_replays_in_a_fresh_process(replays, kernel_dir):
    # A fresh interpreter has torch's default thread count: the recorded one must be restored.
    import subprocess
    import sys

    path = replays / validate.FILE_NAME
    cmd = [sys.executable, "-m", "esper_gym.validate", str(path), "--custom"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 episodes" in done.stdout and "reproduced" in done.stdout


def test_one_altered_action_is_refused(replays, tmp_path, kernel_dir, capsys):
    def change(ep):  # the first action becomes another one: the run (or its penalty) changes
        ep["actions"][0] = 1 if ep["actions"][0] == 0 else 0

    path = _tampered(replays, tmp_path, change)
    with pytest.raises(
        ReplayError, match=r"episode 0 \(heuristic, spirals, seed 11\): field '(return|test_acc)'"
    ):
        validate.validate(path, kernel_dir, custom=True)
    assert validate.main([str(path), "--kernel-dir", kernel_dir, "--custom", "-q"]) == 1
    assert "REFUSED: episode 0" in capsys.readouterr().err


def test_an_altered_return_is_refused_even_by_one_ulp(replays, tmp_path, kernel_dir):
    import math

    path = _tampered(
        replays, tmp_path, lambda ep: ep.update({"return": math.nextafter(ep["return"], 99)})
    )
    with pytest.raises(ReplayError, match=r"episode 0 .*field 'return' = .* but the replay gives"):
        validate.validate(path, kernel_dir, custom=True)


def test_extra_missing_or_out_of_range_actions_and_wrong_context_are_refused(
    replays, tmp_path, kernel_dir
):
    cases = [
        (lambda ep: ep["actions"].append(0), "field 'actions' has .* the episode ended after"),
        (lambda ep: ep["actions"].pop(), "field 'actions' ends after .* the episode goes on"),
        (
            lambda ep: ep["actions"].__setitem__(0, 10_000),
            r"field 'actions'\[0\] = 10000 is not an",
        ),
        (lambda ep: ep.update({"context_index": ep["context_index"] + 1}), "field 'context_index'"),
    ]
    for change, message in cases:
        with pytest.raises(ReplayError, match="episode 0 .*" + message):
            validate.validate(_tampered(replays, tmp_path, change), kernel_dir, custom=True)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda ep: ep.update({"seed": "11"}), "'seed'"),
        (lambda ep: ep.update({"seed": -1}), "'seed'"),
        (lambda ep: ep.update({"actions": [0, 1.5]}), r"'actions'\[1\]"),
        (lambda ep: ep.update({"actions": [True]}), r"'actions'\[0\]"),
        (lambda ep: ep.update({"actions": []}), "'actions'"),
        (lambda ep: ep.update({"return": "6.1"}), "'return'"),
        (lambda ep: ep.update({"test_acc": 1.5}), "'test_acc'"),
        (lambda ep: ep.update({"threads": 0}), "'threads'"),
        (lambda ep: ep.update({"env_id": "CartPole-v1"}), "'env_id'"),
        (lambda ep: ep.update({"pickle": "x"}), r"unknown fields \['pickle'\]"),
        (lambda ep: ep.pop("actions"), r"missing fields \['actions'\]"),
        (lambda ep: ep["env_kwargs"].update({"data_dir": "/etc"}), "'env_kwargs.data_dir' is not"),
        (lambda ep: ep["env_kwargs"].update({"device": "cuda"}), "'env_kwargs.device' is not"),
        (lambda ep: ep["env_kwargs"].update({"kernel_dir": "/tmp"}), "'env_kwargs.kernel_dir'"),
        (
            lambda ep: ep["env_kwargs"].update({"dataset_kwargs": {"data_dir": "/"}}),
            "'env_kwargs.dataset_kwargs.data_dir' is not allowed for dataset 'spirals'",
        ),
        (lambda ep: ep["env_kwargs"].update({"contexts": "all"}), "'env_kwargs.contexts'"),
        (
            lambda ep: ep["env_kwargs"].update({"reward_weights": {"accuracy": "x"}}),
            "reward_weights",
        ),
    ],
)
def test_a_malformed_episode_is_refused_naming_the_field(replays, tmp_path, change, field):
    with pytest.raises(ReplayError, match=r"episode 0.*" + field):
        validate.load(_tampered(replays, tmp_path, change))


def test_non_json_nan_and_foreign_files_are_refused(tmp_path):
    import pickle

    bad = tmp_path / "bad.json"
    bad.write_bytes(pickle.dumps({"format": validate.FORMAT}))
    with pytest.raises(ReplayError, match="not a readable JSON replay file"):
        validate.load(bad)
    bad.write_text('{"format": "esper-gym-replays", "version": 1, "episodes": [{"return": NaN}]}')
    with pytest.raises(ReplayError, match="NaN is not a number"):
        validate.load(bad)
    bad.write_text(json.dumps({"format": "other", "episodes": []}))
    with pytest.raises(ReplayError, match="not a replay file"):
        validate.load(bad)
    bad.write_text(json.dumps({"format": validate.FORMAT, "version": 1, "episodes": []}))
    with pytest.raises(ReplayError, match=r"list of 1\.\."):
        validate.load(bad)


# ------------------------------------------------------------------------ hostile replay files


def _one_episode(**env_kwargs) -> dict:
    """A well-formed registered-task spirals episode (its numbers are never reached)."""
    return {
        "agent": "tamiyo",
        "task": "spirals",
        "env_id": "Esper/Spirals-v0",
        "env_kwargs": env_kwargs,
        "context_index": -1,
        "seed": 0,
        "actions": [0] * 80,
        "return": 1.0,
        "test_acc": 0.5,
        "threads": 1,
    }


def _write(path: pathlib.Path, *episodes: dict) -> pathlib.Path:
    path.write_text(json.dumps({"format": validate.FORMAT, "version": 1, "episodes": episodes}))
    return path


@pytest.mark.parametrize(
    ("env_kwargs", "message"),
    [
        # An import path in a record would be code the file chooses to run.
        (
            {"dataset": "os:system", "dataset_kwargs": {"command": "touch {marker}"}},
            r"'env_kwargs.dataset' = 'os:system' allowed: spirals, fashion_mnist, cifar10",
        ),
        ({"dataset": "evilmod:make"}, r"'env_kwargs.dataset' = 'evilmod:make' allowed"),
        ({"host": "evilmod:make"}, r"'env_kwargs.host' = 'evilmod:make' allowed: mlp, cnn"),
        ({"host": "evilmod.make"}, r"'env_kwargs.host' = 'evilmod.make' allowed"),
        # Sizes that would hang the process or allocate gigabytes.
        ({"decision_interval": 10**12}, r"decision_interval' = 1000000000000 must be an integer"),
        ({"dataset_kwargs": {"n_train": 3e8}}, r"n_train' = 300000000.0 must be an integer"),
        ({"host_kwargs": {"hidden": [200000, 200000]}}, r"hidden' = \[200000, 200000\] must"),
        ({"host_kwargs": {"hidden": ["64"]}}, r"hidden' = \['64'\] must be a list"),
        ({"dataset_kwargs": {"download": True}}, r"download' is not allowed for dataset"),
        ({"blueprints": [["residual_mlp"]]}, r"'env_kwargs.blueprints' .* registered blueprints"),
        ({"reward_weights": {"accuracy": 1e300}}, r"reward_weights.accuracy' = 1e\+300 must be"),
        ({"reward_weights": {"__class__": 1.0}}, r"reward_weights.__class__' = 1.0 is not a"),
        ({"seed_slots": True}, r"'env_kwargs.seed_slots' = True must be an integer"),
    ],
)
def test_a_record_names_only_registered_things_with_bounded_values(
    tmp_path, monkeypatch, env_kwargs, message
):
    marker = tmp_path / "ran"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nmake = print\n")
    monkeypatch.chdir(tmp_path)  # `python -m` puts the cwd on sys.path: evilmod is importable
    monkeypatch.syspath_prepend(str(tmp_path))
    kwargs = json.loads(json.dumps(env_kwargs).replace("{marker}", str(marker)))
    path = _write(tmp_path / "replays.json", _one_episode(**kwargs))
    with pytest.raises(
        ReplayError, match=r"episode 0 \(tamiyo, spirals, seed 0\): field .*" + message
    ):
        validate.load(path)
    assert validate.main([str(path), "--custom", "-q"]) == 1
    assert not marker.exists()  # nothing of the file ran


def test_a_relabelled_easier_task_is_refused_unless_asked_for_and_then_marked_custom(
    replays, tmp_path, kernel_dir, capsys
):
    # Honest numbers of another task: SMALL spirals, easier and rescored, labelled as spirals.
    path = _tampered(replays, tmp_path, lambda ep: ep.update({"agent": "tamiyo"}))
    with pytest.raises(
        ReplayError,
        match=r"not the registered task of Esper/Spirals-v0: .*"
        r"max_epochs=6.0 \(20.0\)",
    ):
        validate.validate(path, kernel_dir)
    assert validate.main([str(path), "--kernel-dir", kernel_dir]) == 1
    err = capsys.readouterr().err
    assert err.count("REFUSED") == 4 and "--custom" in err  # every episode checked, not the first
    assert validate.main([str(path), "--kernel-dir", kernel_dir, "--custom"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok (CUSTOM task: ") == 4 and "(4 of them custom tasks)" in out
    # The same record relabelled as another task is a difference too.
    path = _tampered(replays, tmp_path, lambda ep: ep.update({"task": "fashion_mnist"}))
    with pytest.raises(ReplayError, match=r"task label 'fashion_mnist' \('spirals'\)"):
        validate.validate(path, kernel_dir)
    # Reward weights that rescore the episode are part of the task.
    path = _write(tmp_path / "rescored.json", _one_episode(reward_weights={"accuracy": 1000.0}))
    with pytest.raises(ReplayError, match=r"reward_weights.accuracy=1000.0 \(10.0\)"):
        validate.validate(path, kernel_dir)


def test_replay_files_that_are_not_regular_files_are_refused_at_once(tmp_path):
    import os
    import time

    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    start = time.monotonic()
    for path in (zero, fifo, tmp_path):
        with pytest.raises(ReplayError, match="not a regular file"):
            validate.load(path)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ReplayError, match="nested too deeply"):
        validate.load(deep)
    assert time.monotonic() - start < 5
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(validate.MAX_FILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ReplayError, match="bytes; a replay file is at most"):
        validate.load(big)


def test_any_failure_is_one_line_naming_the_episode_and_every_episode_is_reported(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "nowhere"))
    good_shape_no_data = {**_one_episode(), "task": "cifar10", "env_id": "Esper/CIFAR10-v0"}
    malformed = {**_one_episode(), "seed": "0"}
    heavy = _one_episode(
        host_kwargs={"hidden": [1024, 1024, 1024, 1024]},
        dataset_kwargs={"n_train": 100_000},
        batch_size=4096,
        max_epochs=100.0,
    )
    path = _write(tmp_path / "replays.json", good_shape_no_data, malformed, heavy)
    assert validate.main([str(path), "--custom", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4, err  # one line per episode, then the count
    assert err[0].startswith("REFUSED: episode 0 (tamiyo, cifar10, seed 0): cannot be replayed")
    assert err[1].startswith("REFUSED: episode 1") and "field 'seed'" in err[1]
    assert err[2].startswith("REFUSED: episode 2") and "multiply-adds of training" in err[2]
    assert "3 episode(s) refused, 0 reproduced" in err[3]


def test_replays_do_not_write_to_the_default_kernel_store(replays, tmp_path, monkeypatch):
    store = tmp_path / "default_store"
    monkeypatch.setenv("ESPER_KERNEL_DIR", str(store))
    assert validate.validate(replays / validate.FILE_NAME, custom=True) == 4
    assert not store.exists()  # kernels and outcome rows went to a throwaway store


def test_every_dataset_takes_the_shift_kwargs_within_bounds():
    """esper_gym.data.SHIFT_KWARGS are allowed for every registered dataset, bounded."""
    from esper_gym.bench.records import DATASET_KWARGS, check_episode
    from esper_gym.data import SHIFT_KWARGS

    assert all(set(SHIFT_KWARGS) <= set(allowed) for allowed in DATASET_KWARGS.values())
    shift = {"classes": 3, "label_noise": 0.2, "input_noise": 0.5, "shift_seed": 7}
    check_episode(0, {**_one_episode(dataset_kwargs=shift), "numerics": None})
    for bad in ({"classes": 1}, {"label_noise": 1.5}, {"input_noise": -1}, {"shift_seed": 2**40}):
        with pytest.raises(ReplayError, match=f"dataset_kwargs.{next(iter(bad))}"):
            check_episode(0, {**_one_episode(dataset_kwargs=bad), "numerics": None})
