"""esper_gym.validate: every evaluated episode replays to its reported numbers; a tampered or
malformed replay file is refused, naming the episode and the field."""

import json
import pathlib

import pandas as pd
import pytest

from esper_gym import validate
from esper_gym.evaluate import evaluate, resolve_tasks
from esper_gym.validate import ReplayError
from tests.conftest import SMALL

TASK = {**SMALL, "blueprints": ("residual_mlp", "low_rank")}


@pytest.fixture(scope="module")
def replays(tmp_path_factory, kernel_dir):
    """A fresh evaluate run on test contexts: 2 agents x 2 seeds."""
    out = tmp_path_factory.mktemp("replay")
    tasks = resolve_tasks(["spirals"], overrides={"spirals": TASK})
    evaluate(
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
    assert validate.validate(path, kernel_dir) == 4


def test_the_command_line_replays_in_a_fresh_process(replays, kernel_dir):
    # A fresh interpreter has torch's default thread count: the recorded one must be restored.
    import subprocess
    import sys

    path = replays / validate.FILE_NAME
    cmd = [sys.executable, "-m", "esper_gym.validate", str(path), "--kernel-dir", kernel_dir]
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
        validate.validate(path, kernel_dir)
    assert validate.main([str(path), "--kernel-dir", kernel_dir, "-q"]) == 1
    assert "REFUSED: episode 0" in capsys.readouterr().err


def test_an_altered_return_is_refused_even_by_one_ulp(replays, tmp_path, kernel_dir):
    import math

    path = _tampered(
        replays, tmp_path, lambda ep: ep.update({"return": math.nextafter(ep["return"], 99)})
    )
    with pytest.raises(ReplayError, match=r"episode 0 .*field 'return' = .* but the replay gives"):
        validate.validate(path, kernel_dir)


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
            validate.validate(_tampered(replays, tmp_path, change), kernel_dir)


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
            "'env_kwargs.dataset_kwargs.data_dir' names a place on disk",
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
