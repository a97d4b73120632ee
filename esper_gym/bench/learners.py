"""Training the learners `esper_gym.train` evaluates: Tamiyo (PPO) and SB3 models, from plain
values (esper_gym.config builds them from the composed config). Each returns
`(actor, global_step, checkpoint path)`, where `actor(episode seed)` is that episode's
`act(obs)` (`esper_gym.bench.jobs.Actor`): the policy sampled from a generator seeded with the
episode seed, or its argmax with `greedy`."""

from __future__ import annotations

import inspect
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

from esper_gym.bench.jobs import Actor


def train_tamiyo(
    ppo, makers, run_dir: pathlib.Path, logger, resume: pathlib.Path | None, greedy: bool
) -> tuple[Actor, int, pathlib.Path]:
    """Train (or continue from `resume`) Tamiyo with PPOConfig `ppo` on `makers` (one env
    constructor, or one per task); the checkpoint and the learning curve (train_metrics.csv,
    continued when resumed) go to `run_dir`, every metric also to `logger`."""
    from esper_gym.agents.tamiyo import load_checkpoint, train
    from esper_gym.logger import CsvMetrics

    ckpt = run_dir / "checkpoint.pt"
    logger.progress(ppo.total_steps, "tamiyo")
    curve = CsvMetrics(run_dir / "train_metrics.csv", resume=resume is not None)

    def log(metrics, step=None):
        logger.log(metrics, step)
        curve(metrics, step)

    policy = train(ppo, makers, log=log, checkpoint_path=ckpt, resume_from=resume)
    logger.progress(None)
    if not ckpt.exists() and resume is not None:  # the budget was already spent: nothing new
        shutil.copyfile(resume, ckpt)
    actor = lambda seed: policy.actor(greedy=greedy, seed=seed)  # noqa: E731
    return actor, load_checkpoint(ckpt).global_step, ckpt


def train_sb3(
    build: Callable[..., Any],
    make: Callable,
    *,
    num_envs: int,
    use_async: bool,
    seed: int,
    total_timesteps: int,
    run_dir: pathlib.Path,
    logger,
    resume: pathlib.Path | None,
    greedy: bool,
    name: str = "sb3",
) -> tuple[Actor, int, pathlib.Path]:
    """Train (or continue) the SB3 model `build(env=venv, seed=seed)` on `num_envs` envs of
    `make` up to `total_timesteps`; checkpoint.zip goes to `run_dir`. SB3 samples from torch's
    global RNG: the actor seeds it with the episode seed."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import KVWriter, Logger
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from esper_gym.agents.records import env_record
    from esper_gym.agents.sb3 import load_model, save_model

    venv = make_vec_env(
        make,
        n_envs=num_envs,
        seed=seed,
        vec_env_cls=SubprocVecEnv if use_async else DummyVecEnv,
        vec_env_kwargs={"start_method": "spawn"} if use_async else None,
    )
    probe = make()
    record = env_record(probe)  # the task and library: checked on resume, saved with the model
    probe.close()
    model = build(env=venv, seed=seed)
    if resume is not None:
        try:  # never SB3's plain `load`: it unpickles the archive's ":serialized:" entries
            model = load_model(resume, model, venv, record)
        except Exception:
            venv.close()
            raise

    class Forward(KVWriter):  # every SB3 log dump goes to `logger`
        def write(self, key_values, key_excluded, step=0):
            logger.log({k: v for k, v in key_values.items() if isinstance(v, (int, float))}, step)

    model.set_logger(Logger(folder=None, output_formats=[Forward()]))
    logger.progress(total_timesteps, name)
    if total_timesteps > model.num_timesteps:
        model.learn(total_timesteps - model.num_timesteps, reset_num_timesteps=resume is None)
    logger.progress(None)
    venv.close()
    ckpt = run_dir / "checkpoint.zip"
    save_model(model, ckpt, record)
    masked = "action_masks" in inspect.signature(model.predict).parameters

    def act(obs: dict) -> int:
        kw = {"action_masks": obs["action_mask"].astype(bool)} if masked else {}
        return int(model.predict(obs, deterministic=greedy, **kw)[0])

    def actor(episode_seed: int):
        if not greedy:
            import torch

            torch.manual_seed(episode_seed)
        return act

    return actor, int(model.num_timesteps), ckpt
