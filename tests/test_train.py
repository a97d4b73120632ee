"""End to end: `python -m esper_gym.train` in a subprocess on a tiny spirals task.

- Tamiyo trains, writes a W&B offline run (read back from its `.wandb` file: training curves,
  evaluation episodes, summary, resolved config, group) and a checkpoint; a second invocation
  with `resume=` continues from the saved global step under the same W&B run id.
- Each baseline (one `-m` sweep, `logger=none`) returns real episode metrics in results.json.
- Slow: the SB3 agents, the joblib launcher, a bad value refused from the command line, the
  CIFAR experiment on a tiny CIFAR-10 copy.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import struct
import subprocess
import sys

import pytest

from tests.conftest import write_tiny_cifar

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The tiny spirals of tests/conftest.py: 6 decisions an episode, well under a second each.
TINY = [
    "task.max_epochs=6",
    "task.decision_interval=8",
    "task.dataset_kwargs={n_train:1024,n_val:256,n_test:256}",
    "task.eval_size=256",
    "task.blend_steps=8",
    "task.embargo_steps=8",
]


def train(tmp_path: pathlib.Path, *overrides: str, check: bool = True):
    """Run the entry point from the repo root (how users run it) with every output under
    tmp_path; returns the CompletedProcess."""
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    env.pop("WANDB_MODE", None)
    flags = [o for o in overrides if o.startswith("-")]  # argparse wants them before overrides
    overrides = tuple(o for o in overrides if not o.startswith("-"))
    cmd = [
        sys.executable,
        "-m",
        "esper_gym.train",
        *flags,
        *TINY,
        f"env.kernel_dir={tmp_path / 'kernels'}",
        "logger.progress=false",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# ------------------------------------------------------------------ W&B offline run reader


def wandb_records(path: str):
    """Records of a W&B transaction log (`run-<id>.wandb`) as protobuf `Record`s.

    wandb 0.31 has no Python reader for it any more (sdk.internal.datastore is gone), so this
    reads the format directly: a 7-byte header, then LevelDB-log records in 32 KiB blocks, each
    with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32 * 1024, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb_run(run_dir: str) -> dict:
    """{'run': RunRecord, 'config': dict, 'history': [row dicts], 'summary': dict}."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    out = {"run": None, "config": {}, "history": [], "summary": {}}

    def key(item):
        return item.key or "/".join(item.nested_key)

    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update(
                {key(i): json.loads(i.value_json) for i in record.run.config.update}
            )
        elif kind == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
    return out


# ------------------------------------------------------------------------------- tests


def test_tamiyo_logs_to_wandb_offline_and_resumes(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = [
        "agent=tamiyo",
        "env.num_envs=1",
        "agent.ppo.rollout_steps=8",
        "agent.ppo.checkpoint_every=1",
        "agent.ppo.uncertainty_samples=2",
        "agent.ppo.teacher=null",  # steps counted exactly: PPO only
    ]
    evaluate = ["eval.episodes=2", "eval.compare=[noop]"]
    train(tmp_path, *common, *evaluate, "agent.ppo.total_steps=16", f"hydra.run.dir={first}")

    # The checkpoint holds the global step it reached.
    from esper_gym.agents.tamiyo import load_checkpoint

    assert load_checkpoint(first / "checkpoint.pt").global_step == 16
    results = json.loads((first / "results.json").read_text())
    assert results["global_step"] == 16 and results["agent"] == "tamiyo"

    (run_dir,) = glob.glob(str(first / "wandb" / "offline-run-*"))
    run = read_wandb_run(run_dir)
    assert run["run"].run_group == "spirals-tamiyo"
    assert run["run"].display_name == "tamiyo-seed0"
    assert run["config"]["task"]["max_epochs"] == 6.0  # the resolved config
    assert run["config"]["task_resolved"]["decision_interval"] == 8
    assert run["config"]["agent"]["ppo"]["total_steps"] == 16
    train_rows = [r for r in run["history"] if "losses/policy" in r]
    assert [r["_step"] for r in train_rows] == [8, 16]  # one row per PPO update
    for row in train_rows:
        for key in ("losses/value", "losses/entropy", "charts/steps_per_s", "actions/germinate"):
            assert key in row, key
    eval_rows = [r for r in run["history"] if "eval/tamiyo/return" in r]
    assert [r["eval/tamiyo/episode"] for r in eval_rows] == [0, 1]
    for row in eval_rows:
        assert 0 < row["eval/tamiyo/test_acc"] <= 1
        assert row["eval/tamiyo/length"] == 6
        assert "eval/tamiyo/reward/accuracy" in row and "eval/tamiyo/reward/param_cost" in row
        assert row["eval/tamiyo/params"] >= row["eval/tamiyo/host_params"]
    assert len([r for r in run["history"] if "eval/noop/return" in r]) == 2
    summary = run["summary"]
    for key in ("val_acc", "test_acc", "params_added", "faults", "invalid_actions", "return"):
        assert f"eval/tamiyo/{key}_mean" in summary, key
    assert summary["global_step"] == 16
    assert summary["eval/tamiyo/return_mean"] == pytest.approx(results["objective"])
    run_id = run["run"].run_id

    # Resume: same run id, training continues from step 16 up to the new budget.
    proc = train(
        tmp_path,
        *common,
        "eval.episodes=0",
        "agent.ppo.total_steps=32",
        f"resume={first / 'checkpoint.pt'}",
        f"hydra.run.dir={second}",
    )
    assert load_checkpoint(second / "checkpoint.pt").global_step == 32
    assert "no evaluation (eval.episodes=0)" in proc.stdout and "nan" not in proc.stdout
    (run_dir,) = glob.glob(str(second / "wandb" / "offline-run-*"))
    resumed = read_wandb_run(run_dir)
    assert resumed["run"].run_id == run_id
    assert [r["_step"] for r in resumed["history"] if "losses/policy" in r] == [24, 32]
    assert json.loads((second / "results.json").read_text())["global_step"] == 32


def test_each_baseline_returns_real_episode_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train(
        tmp_path,
        "-m",
        "agent=noop,random,heuristic",
        "logger=none",
        "eval.episodes=1",
        "eval.compare=[]",
        f"hydra.sweep.dir={sweep}",
    )
    seen = {}
    for results_file in sorted(sweep.glob("*/results.json")):
        results = json.loads(results_file.read_text())
        name = results["agent"]
        assert results["global_step"] == 0 and results["checkpoint"] is None  # no training
        assert not list(results_file.parent.glob("wandb"))  # logger=none wrote no run
        (episode,) = results["eval"][name]["episodes"]
        assert episode["seed"] == 1_000_000  # the held-out seeds
        assert 0 < episode["val_acc"] <= 1 and 0 < episode["test_acc"] <= 1
        assert episode["length"] == 6 and not episode["diverged"]
        assert episode["params"] >= episode["host_params"] > 0
        assert episode["params"] == episode["host_params"] + episode["params_added"]
        assert episode["return"] == pytest.approx(
            sum(v for k, v in episode.items() if k.startswith("reward/"))
        )
        seen[name] = episode
        assert f"agent={name}" in proc.stdout  # the printed table
    assert set(seen) == {"noop", "random", "heuristic"}
    assert seen["noop"]["params_added"] == 0 and seen["noop"]["interventions"] == 0
    assert seen["heuristic"]["params_added"] > 0  # it grows the host


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["sb3_ppo", "maskable_ppo"])
def test_sb3_agents_train_checkpoint_and_resume(tmp_path, agent):
    first, second = tmp_path / "first", tmp_path / "second"
    common = [f"agent={agent}", "agent.build.n_steps=8", "agent.build.batch_size=8"]
    common += ["env.num_envs=1", "eval.episodes=1", "eval.compare=[]", "logger=none"]
    train(tmp_path, *common, "agent.total_timesteps=16", f"hydra.run.dir={first}")
    assert json.loads((first / "results.json").read_text())["global_step"] == 16
    assert (first / "checkpoint.zip").is_file()
    train(
        tmp_path,
        *common,
        "agent.total_timesteps=32",
        f"resume={first}",
        f"hydra.run.dir={second}",
    )
    results = json.loads((second / "results.json").read_text())
    assert results["global_step"] == 32
    assert 0 < results["eval"][agent]["mean"]["test_acc"] <= 1
    if agent == "maskable_ppo":
        assert results["eval"][agent]["mean"]["invalid_actions"] == 0


@pytest.mark.slow
def test_reward_sweep_with_joblib_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    train(
        tmp_path,
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "agent=heuristic",
        "reward.weights.param_cost=0,0.2",
        "seed=0,1",
        "eval.episodes=1",
        "eval.compare=[]",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = sorted(sweep.glob("*/results.json"))
    assert len(jobs) == 4
    costs = set()
    for job in jobs:
        config = (job.parent / ".hydra" / "config.yaml").read_text()
        costs.add("param_cost: 0.0" in config)
        (episode,) = json.loads(job.read_text())["eval"]["heuristic"]["episodes"]
        assert 0 < episode["test_acc"] <= 1
        # Assert on the job's own reward weights: free params cost nothing.
        if "param_cost: 0.0" in config:
            assert episode["reward/param_cost"] == 0
        else:
            assert episode["reward/param_cost"] < 0
    assert costs == {True, False}
    assert (sweep / "multirun.yaml").is_file()


@pytest.mark.slow
def test_bad_value_fails_at_start_from_the_command_line(tmp_path):
    proc = train(tmp_path, "task.max_epochs=-1", "logger=none", check=False)
    assert proc.returncode != 0
    assert "max_epochs" in proc.stderr and "ConfigError" in proc.stderr
    proc = train(tmp_path, "reward.weights.param_cost=abc", check=False)
    assert proc.returncode != 0 and "reward.weights.param_cost" in proc.stderr


@pytest.mark.slow
def test_cifar_experiment_runs_on_tiny_cifar(tmp_path):
    data = write_tiny_cifar(tmp_path)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "esper_gym.train",
            "+experiment=cifar",
            f"task.data_dir={data}",
            "task.dataset_kwargs={val_size:20}",
            "task.eval_size=20",
            "task.batch_size=16",
            "task.max_epochs=1",
            "task.decision_interval=2",
            "env.num_envs=1",
            "env.vectorization=sync",
            "agent.ppo.total_steps=8",
            "agent.ppo.rollout_steps=4",
            "eval.episodes=1",
            "eval.compare=[noop]",
            "logger=none",
            f"env.kernel_dir={tmp_path / 'kernels'}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "cifar10" and results["global_step"] == 8


def readme_block(first_line: str) -> str:
    """The code block of the documentation's recipe (docs/own-model.md, "Your own model and
    data") whose first line is `first_line`: what a user copies."""
    text = (ROOT / "docs" / "own-model.md").read_text()
    start = text.index(f"\n{first_line}\n") + 1
    return text[start : text.index("```", start)]


def test_readme_recipe_own_host_and_dataset_from_own_config_dir(tmp_path):
    """The README's "your own model and data" recipe, as written there: mylab.py and
    my_conf/task/mine.yaml in the user's folder, then the command from that folder."""
    (tmp_path / "mylab.py").write_text(readme_block("# mylab.py"))
    (tmp_path / "my_conf" / "task").mkdir(parents=True)
    yaml = readme_block("# my_conf/task/mine.yaml")
    (tmp_path / "my_conf" / "task" / "mine.yaml").write_text(yaml)
    (command,) = [
        line
        for line in readme_block("# from the folder that holds mylab.py and my_conf/").split("\n")
        if line.startswith("python -m esper_gym.train")
    ]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, *command.split()[1:]]
    cmd += ["eval.episodes=1", "eval.compare=[noop]", "logger.progress=false"]
    cmd += [f"env.kernel_dir={tmp_path / 'kernels'}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's esper_gym
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "mine"
    (episode,) = results["eval"]["heuristic"]["episodes"]
    (static,) = results["eval"]["noop"]["episodes"]
    # MyNet 8-32-4: (8*32 + 32) + (32*4 + 4) parameters, its two Linear layers growable
    assert episode["host_params"] == static["host_params"] == 420
    assert episode["params_added"] > 0 and static["params_added"] == 0
    assert 0.5 < static["test_acc"] <= 1  # four well separated blobs: far above chance


def test_trained_on_train_contexts_is_scored_on_test_contexts(tmp_path):
    run = tmp_path / "run"
    overrides = ["agent.ppo.total_steps=16", "agent.ppo.rollout_steps=8", "env.num_envs=1"]
    overrides += ["agent.ppo.teacher=null"]
    train(
        tmp_path,
        *overrides,
        "env.contexts=train",
        "eval.episodes=2",
        "eval.compare=[noop]",
        "logger=none",
        f"hydra.run.dir={run}",
    )
    results = json.loads((run / "results.json").read_text())
    # The learning curve is kept without W&B: one row per PPO update (16 steps / 8 per update).
    curve = (run / "train_metrics.csv").read_text().splitlines()
    header = curve[0].split(",")
    assert len(curve) == 1 + 2 and header[:2] == ["global_step", "wall_s"]
    assert "losses/entropy" in header and [r.split(",")[0] for r in curve[1:]] == ["8", "16"]
    for name in ("tamiyo", "noop"):
        episodes = results["eval"][name]["episodes"]
        assert [e["contexts"] for e in episodes] == ["test", "test"]
        assert all(e["context_index"] >= 0 for e in episodes)
    # Paired: both agents met the same test contexts on the same seeds.
    assert [e["context_index"] for e in results["eval"]["tamiyo"]["episodes"]] == [
        e["context_index"] for e in results["eval"]["noop"]["episodes"]
    ]


def test_a_new_run_in_a_reused_dir_starts_a_new_curve_and_a_resumed_one_continues(tmp_path):
    from esper_gym.logger import CsvMetrics

    path = tmp_path / "train_metrics.csv"
    old = CsvMetrics(path)
    old({"losses/policy": 1.0}, 8)
    old({"losses/policy": 2.0}, 16)
    CsvMetrics(path)({"imitation/loss": 0.5}, 4)  # a new run: the old rows are gone
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == ["global_step", "wall_s", "imitation/loss"]
    assert [line.split(",")[0] for line in lines[1:]] == ["4"]
    CsvMetrics(path, resume=True)({"losses/policy": 3.0}, 12)  # resumed: appended
    assert [line.split(",")[0] for line in path.read_text().splitlines()[1:]] == ["4", "12"]


def test_behind_the_gate_only_the_trained_agent_is_gated_in_the_run_evaluation(tmp_path):
    """env.gate=drop: the run's evaluation plays the trained policy behind the gate and the
    compared baselines as they are, on the same episodes (once, they were gated too)."""
    import gymnasium as gym

    from esper_gym.bench.jobs import baseline_actor
    from esper_gym.episode import play_episode

    run = tmp_path / "run"
    overrides = ["agent.ppo.total_steps=16", "agent.ppo.rollout_steps=8", "env.num_envs=1"]
    overrides += ["agent.ppo.teacher=null", "env.gate=drop", "eval.episodes=2"]
    train(tmp_path, *overrides, "eval.compare=[heuristic]", "logger=none", f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    env = gym.make(
        "Esper/Spirals-v0", kernel_dir=tmp_path / "kernels", max_epochs=6, decision_interval=8,
        dataset_kwargs={"n_train": 1024, "n_val": 256, "n_test": 256}, eval_size=256,
        blend_steps=8, embargo_steps=8,
    )  # fmt: skip
    for episode in results["eval"]["heuristic"]["episodes"]:
        plain, _ = play_episode(
            env, baseline_actor("heuristic", env, 0)(episode["seed"]), episode["seed"]
        )
        assert episode["germinations"] == plain["germinations"] > 0
        assert episode["return"] == plain["return"]
