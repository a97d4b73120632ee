"""`python -m esper_gym.train` from the command line (issue 24 §2/§3): a joblib sweep of the
default agent, the budget it is given, what it says about the kernel store, and config errors
as one line (exit status 2) unless HYDRA_FULL_ERROR=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_train import ROOT, TINY


def run_train(tmp_path, *args: str, full_error: bool = False, timeout: int = 300):
    env = {**os.environ, "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, "-m", "esper_gym.train", *flags, *TINY, "logger=none"]
    cmd += ["logger.progress=false", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_joblib_sweep_of_the_default_agent(tmp_path):
    """The README's sweep with the joblib launcher, on the default agent (tamiyo): the schemas'
    annotations must resolve in the launcher's worker processes (they once named classes of
    `__main__`: NameError: name 'GuardConf' is not defined)."""
    sweep = tmp_path / "sweep"
    proc = run_train(
        tmp_path,
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "reward.weights.param_cost=0,0.2",
        "agent.ppo.total_steps=8",
        "agent.ppo.rollout_steps=8",
        "agent.ppo.imitation_episodes=1",
        "agent.ppo.uncertainty_samples=0",
        "env.num_envs=1",
        "eval.episodes=1",
        "eval.compare=[]",
        f"env.kernel_dir={tmp_path / 'kernels'}",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    jobs = sorted(sweep.glob("*/results.json"))
    assert len(jobs) == 2
    for job in jobs:
        results = json.loads(job.read_text())
        assert results["agent"] == "tamiyo" and results["global_step"] > 0
        assert (job.parent / "checkpoint.pt").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.max_epochs=-1"], "max_epochs"),
        (["task.name=spiral"], "did you mean 'spirals'"),
        (["agent=noop", "resume=nowhere"], "resume='nowhere'"),
    ],
)
def test_a_config_error_is_one_line_and_exit_status_2(tmp_path, overrides, message):
    proc = run_train(tmp_path, "agent=noop", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    if overrides == ["task.name=spiral"]:  # a typo is not steered to a task of your own
        assert "task of your own" not in lines[0] and "env_id" not in lines[0]


def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    proc = run_train(tmp_path, "agent=noop", "task.max_epochs=-1", full_error=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_cuda_on_a_cpu_build_is_refused_up_front(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_train(tmp_path, "agent=noop", "env.device=cuda")
    assert proc.returncode == 2, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert line.startswith("error: env.device='cuda'") and "CUDA" in line


def test_the_kernel_store_is_printed_and_run_isolates_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        tmp_path,
        "agent=heuristic",
        "eval.episodes=1",
        "eval.compare=[]",
        "env.kernel_dir=run",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("kernel store: ")]
    assert str(run_dir / "kernels") in line
    assert (run_dir / "kernels").is_dir() and any((run_dir / "kernels").iterdir())
