"""conf/evaluate.yaml (esper_gym.config.evaluate): train's spellings mean the same here, a bad value
is one line before any episode, and committed results are never overwritten."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

import esper_gym
from esper_gym.bench.jobs import make_jobs, resolve_tasks
from esper_gym.bench.suite import EvalConfig, check_out_dir, evaluate
from esper_gym.config import ConfigError
from esper_gym.config import evaluate as config_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
config_evaluate.register_configs()


def built(*overrides: str, run_dir="run"):
    with initialize_config_dir(str(esper_gym.config_dir()), version_base="1.3"):
        cfg = compose("evaluate", list(overrides))
    return config_evaluate.build_evaluate(cfg, run_dir)


def test_train_spellings_are_aliases_with_the_same_meaning():
    conf = built(
        "tasks=[spirals,spirals_deep]",
        "task.max_epochs=2",  # every task, as task_overrides.<task>.max_epochs for one
        "task_overrides.spirals.eval_size=256",
        "eval.episodes=3",
        "eval.first_seed=7",
        "eval.greedy=true",
        "checkpoints.mine=outputs/x",  # any name, no `+`
        "+checkpoints.other=outputs/y",
    )
    assert [t.build().max_epochs for t in conf.tasks] == [2, 2]
    assert conf.tasks[0].build().eval_size == 256
    assert (conf.seeds, conf.first_seed, conf.greedy) == (3, 7, True)
    assert conf.checkpoints["mine"] == "outputs/x" and conf.checkpoints["other"] == "outputs/y"
    assert conf.out_dir == "run"  # the Hydra run dir unless out_dir is given
    plain = built("seeds=2", "first_seed=9")
    assert (plain.seeds, plain.first_seed, plain.greedy) == (2, 9, False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seeds=0", r"seeds=0: the episodes per \(agent, task\) must be >= 1"),
        ("eval.episodes=0", r"eval.episodes=0"),
        ("seed=3", r"seed=3: evaluate plays seeds first_seed \+ i"),
        ("first_seed=-1", r"first_seed=-1 must be"),
        ("tasks=[nope]", r"tasks: unknown task 'nope'"),
        ("executor=nowhere", r"executor='nowhere'; allowed: local"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        built(override)


def test_zero_seeds_through_the_python_api_is_a_value_error_not_a_key_error():
    with pytest.raises(ValueError, match="seeds=0: no episode to play"):
        make_jobs(["noop"], resolve_tasks(["spirals"]), 0)


def test_a_config_error_ends_the_command_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "esper_gym.evaluate", "seeds=0", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: seeds=0")


def test_a_folder_of_committed_files_is_never_written_into(tmp_path):
    committed = ROOT / "results" / "baselines_test"
    if not (ROOT / ".git").exists() or not committed.is_dir():
        pytest.skip("not a git checkout with committed results")
    before = {p: p.stat().st_mtime_ns for p in committed.iterdir()}
    with pytest.raises(ValueError, match=r"holds files tracked by git .*never overwritten"):
        check_out_dir(committed)
    conf = EvalConfig(["noop"], resolve_tasks(["spirals"]), 1, committed, progress=False)
    with pytest.raises(ValueError, match="tracked by git"):
        evaluate(conf)  # refused before any episode
    assert {p: p.stat().st_mtime_ns for p in committed.iterdir()} == before
    check_out_dir(tmp_path)  # outside a git checkout: no check
    check_out_dir(tmp_path / "new")  # a folder that does not exist yet
    ignored = ROOT / "outputs"  # git-ignored: nothing tracked there
    if ignored.is_dir():
        check_out_dir(ignored)


def test_seeds_per_context_plays_every_context_the_same_number_of_times():
    from collections import Counter

    from esper_gym.bench.oracle import context_index
    from esper_gym.tasks import TASKS

    conf = built("tasks=[spirals_pace]", "contexts=test", "seeds_per_context=3", "seeds=1")
    drawn = Counter(context_index(TASKS["spirals_pace"], "test", s) for s in conf.seeds)
    assert len(drawn) == 24 and set(drawn.values()) == {3}  # all 24, three each
    assert conf.seeds == sorted(conf.seeds) and conf.seeds[0] >= 1_000_000
    with pytest.raises(ConfigError, match="seeds_per_context=3: needs contexts=test"):
        built("tasks=[spirals_pace]", "seeds_per_context=3")
    with pytest.raises(ConfigError, match="seeds_per_context=0"):
        built("tasks=[spirals_pace]", "contexts=test", "seeds_per_context=0")
    with pytest.raises(ConfigError, match="draw their contexts from different spaces"):
        built("tasks=[spirals_pace,spirals]", "contexts=test", "seeds_per_context=2")
    same = built("tasks=[spirals,spirals_faulty]", "contexts=test", "seeds_per_context=1")
    assert len(same.seeds) == 96  # one space: each of its 96 test contexts once
