"""Ray: PPO rollouts on actors (esper_gym.agents.tamiyo.runners) and evaluate's jobs as Ray tasks
(esper_gym.bench.ray_executor). Those marked `ray` are skipped without Ray
(`pip install "esper-gym[ray]"`)."""

import logging
import os
import signal
import sys
import threading

import numpy as np
import pytest
import torch

from esper_gym.agents.baselines import layout_from_spaces
from esper_gym.agents.tamiyo import PPOConfig, TamiyoPolicy
from esper_gym.agents.tamiyo import train as ppo_train
from esper_gym.agents.tamiyo.ppo import build_vector_env
from esper_gym.agents.tamiyo.runners import RemoteRunners, Runner
from esper_gym.bench.jobs import BatchedFactory, TaskSpec, make_jobs, run_job, run_jobs
from esper_gym.bench.ray_executor import JobsFailed, run_jobs_ray
from tests.conftest import SMALL


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray")
    from esper_gym.agents.tamiyo.runners import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


def test_without_ray_runners_are_a_one_line_config_error(monkeypatch):
    """No ray installed: env.runners > 0 is refused before any work, naming the extra."""
    from hydra import compose, initialize_config_dir

    import esper_gym
    from esper_gym import config
    from esper_gym.agents.tamiyo.runners import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    config.register_configs()
    with initialize_config_dir(config_dir=str(esper_gym.config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["env.runners=2"])
    with pytest.raises(config.ConfigError, match=r'needs Ray: pip install "esper-gym\[ray\]"'):
        config.validate(cfg)
    with pytest.raises(ImportError, match="esper-gym"):
        import_ray()
    with pytest.raises(ValueError, match="esper-gym"):  # evaluate's one-line error too
        run_jobs([], "ray")


def _maker(kernel_dir) -> BatchedFactory:
    from esper_gym import TASK_ENV_IDS

    env_id = TASK_ENV_IDS["spirals"]
    return BatchedFactory(env_id, 1, {**SMALL, "kernel_dir": kernel_dir})


def _policy_parts(make):
    probe = make()
    space = probe.observation_space
    layout = layout_from_spaces(space, probe.action_space)
    probe.close()
    kind_of = np.array([layout.decode(a).kind for a in range(layout.size)])
    torch.manual_seed(0)
    return TamiyoPolicy.for_space(space, dropout=0.0), kind_of


@pytest.mark.ray
def test_two_runners_play_the_episodes_of_one_process(kernel_dir, ray):
    """runners=2 num_envs=2 gives copy i of runner r the seed of copy 2r+i of one process of 4:
    with a fixed (greedy) policy, the same observations, rewards and dones bit for bit,
    through an autoreset (episodes of 6 steps)."""
    make = _maker(kernel_dir)
    policy, kind_of = _policy_parts(make)
    n_steps = 8
    local = Runner(build_vector_env([make], 4), policy, kind_of, ["spirals"] * 4, 0.99)
    local.reset(7)
    one = local.collect(None, n_steps, greedy=True)
    local.close()
    remote = RemoteRunners(2, [make], 2, False, policy, kind_of, ["spirals"] * 2, 0.99)
    try:
        remote.reset(7)
        two, timing = remote.collect(policy, n_steps, greedy=True)
    finally:
        remote.close()
    assert set(timing) == {"timing/broadcast_s", "timing/rollout_s", "timing/transfer_s"}
    assert one["dones"].sum() > 0  # an episode ended in the rollout
    for k in one["obs"]:
        np.testing.assert_array_equal(one["obs"][k], two["obs"][k], err_msg=k)
        np.testing.assert_array_equal(one["next_obs"][k], two["next_obs"][k], err_msg=k)
    for k in ("actions", "rewards", "dones"):
        assert torch.equal(one[k], two[k]), k
    for k in ("values", "logprobs"):  # batches of 2 and of 4: the same to rounding
        torch.testing.assert_close(one[k], two[k])
    assert one["finished"]["returns"] == two["finished"]["returns"]


@pytest.mark.ray
def test_ppo_trains_on_runners_and_a_killed_runner_is_restarted(kernel_dir, caplog, ray):
    """PPO with runners=2: whole updates of 2 x num_envs copies, the parts timed. A runner
    whose process is killed mid-rollout is restarted by Ray, its rollout collected again (a
    warning says so), and training goes on to the end of its budget."""
    make = _maker(kernel_dir)
    config = PPOConfig(
        total_steps=48, num_envs=2, rollout_steps=6, update_epochs=1, seed=0, runners=2
    )
    logs = []
    killed = {}
    real_start = RemoteRunners.start

    def start_and_kill(self, policy, n_steps, step=0, greedy=False):
        if not killed:  # the first rollout: kill runner 1's process while it plays
            pid = self.pids()[1]
            killed["pid"] = pid
            threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
        return real_start(self, policy, n_steps, step, greedy)

    RemoteRunners.start = start_and_kill
    try:
        with caplog.at_level(logging.WARNING, "esper_gym.agents.tamiyo.runners"):
            ppo_train(config, make, log=lambda m, s: logs.append((s, m)))
    finally:
        RemoteRunners.start = real_start
    assert [s for s, _ in logs] == [24, 48]
    assert all(m["timing/rollout_s"] > 0 and "timing/update_s" in m for _, m in logs)
    # Each rollout was played by the policy that was updated on it (started after the update
    # before it): the first ratio is 1 up to the rounding of other batch sizes.
    assert all(m["losses/ratio_start"] < 1e-4 for _, m in logs)
    assert "runner 1 died mid-rollout" in caplog.text


def _row(result: dict) -> dict:
    """A job's CSV row less what depends on the process (seconds, kernel cache telemetry),
    NaN as a string (NaN != NaN)."""
    row = result["row"]
    row = {k: v for k, v in row.items() if not k.endswith("_s") and not k.startswith("telemetry/")}
    return {k: "nan" if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()}


@pytest.mark.ray
def test_ray_jobs_match_the_local_pool_and_failures_name_their_seed(kernel_dir, tmp_path, ray):
    """executor=ray: the rows of the local executor, in job order, one progress count over
    all jobs; a job whose process dies once is retried; one that dies twice is reported by
    seed (JobsFailed), the other results kept."""
    task = TaskSpec("spirals", "spirals", {k: v for k, v in SMALL.items()})
    jobs = make_jobs(["noop", "random"], [task], 2, kernel_dir=kernel_dir)
    local = run_jobs(jobs, progress=False)
    seen = []
    remote = run_jobs(jobs, "ray", 2, progress=lambda d, t, row: seen.append((d, t)))
    assert [_row(r) for r in remote] == [_row(r) for r in local]
    assert [r["replay"] for r in remote] == [r["replay"] for r in local]
    assert sorted(seen) == [(i, len(jobs)) for i in range(1, len(jobs) + 1)]

    marker = str(tmp_path / "died")

    def dies_once(job):  # a worker that dies the first time round
        if job.seed == jobs[0].seed and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return run_job(job)

    again = run_jobs_ray(jobs[:2], dies_once)
    assert [_row(r) for r in again] == [_row(r) for r in local[:2]]

    def always_dies(job):
        if job.seed == jobs[1].seed:
            os._exit(1)
        return run_job(job)

    with pytest.raises(JobsFailed, match=rf"1 of 2 jobs failed.*seed {jobs[1].seed}") as info:
        run_jobs_ray(jobs[:2], always_dies)
    assert _row(info.value.results[0]) == _row(local[0]) and info.value.results[1] is None


@pytest.mark.ray
def test_the_warm_start_on_runners_is_the_one_process_warm_start(kernel_dir, ray):
    """With runners=2 num_envs=2 the runners play the imitation warm start's teacher episodes
    (chunks of 8 steps, cut where one process stops), and this process fits: the same
    episodes, steps and fitted weights as runners=0 num_envs=4, bit for bit."""
    make = _maker(kernel_dir)
    results = {}
    for runners, num_envs in ((0, 4), (2, 2)):
        config = PPOConfig(
            total_steps=48,  # the warm start only: 6-step episodes, 8 of them by step 12
            num_envs=num_envs,
            runners=runners,
            teacher="schedule",
            imitation_episodes=6,
            imitation_epochs=3,
            seed=0,
        )
        logs = []
        policy = ppo_train(config, make, log=lambda m, s, logs=logs: logs.append((s, m)))
        results[runners] = (logs, policy.state_dict())
    (one_logs, one), (two_logs, two) = results[0], results[2]
    assert [s for s, _ in one_logs] == [s for s, _ in two_logs] == [48]
    assert one_logs[0][1]["imitation/episodes"] == 8
    assert one_logs[0][1] == two_logs[0][1]
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k
