"""Imitation warm start (`PPOConfig.teacher`): before PPO, play a baseline on the training envs
and fit the policy to its actions and the critic to its returns."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esper_gym.agents.graph import index_obs, obs_to_batch
from esper_gym.agents.tamiyo.config import PPOConfig
from esper_gym.agents.tamiyo.popart import update_return_stats


def make_teacher(name: str, env: gym.Env):
    """A baseline to imitate (esper_gym.agents.baselines.make_agent with its tuned settings).
    Privileged agents are refused: a controller trained to copy one would use, through its
    teacher, access that no deployed controller has."""
    from esper_gym.agents.baselines import AGENTS, PRIVILEGED, make_agent

    allowed = sorted(set(AGENTS) - PRIVILEGED)
    if name not in allowed:
        raise ValueError(f"teacher={name!r} cannot be imitated; allowed: {', '.join(allowed)}")
    try:
        return make_agent(name, env)
    except ValueError as err:  # e.g. no tuned schedule for this task
        raise ValueError(f"{err}. Or train without a warm start: agent.ppo.teacher=null") from err


def imitate(policy, optimizer, envs, teachers, obs, config: PPOConfig, budget: int | None = None):
    """Warm start: play `teachers` (one per env of `envs`, starting from observations `obs`)
    until `config.imitation_episodes` episodes have ended and every copy has ended at least one
    (with several tasks, a task of long episodes is not left out), or until one more step of
    every env would pass `budget` env steps (the run's total_steps), then fit `policy` for
    `config.imitation_epochs` epochs: cross-entropy to the teacher's action plus `vf_coef` times
    the value loss to its discounted return (in the return statistics' units, which these
    returns set). Dropout is off, as in PPO. Steps of episodes still in flight when the last one
    ends train nothing (their returns are unknown) but are counted.

    Returns (the envs' observations after the last step, env steps played, metrics): imitation/{steps,
    episodes, teacher_return (mean undiscounted), loss, agreement (share of the teacher's actions
    that are the policy's most likely action after the fit)}."""
    n_envs = len(teachers)
    for teacher in teachers:
        if hasattr(teacher, "reset"):
            teacher.reset()
    paths = [{"obs": [], "actions": [], "rewards": []} for _ in range(n_envs)]
    data = {"obs": [], "actions": [], "returns": []}
    ended: list[float] = []
    copy_ended = np.zeros(n_envs, bool)
    steps = 0
    budget = float("inf") if budget is None else budget
    while (len(ended) < config.imitation_episodes or not copy_ended.all()) and (
        steps + n_envs <= budget
    ):
        acts = np.array([t.act(index_obs(obs, i)) for i, t in enumerate(teachers)])
        for i, path in enumerate(paths):
            path["obs"].append(index_obs(obs, i))
            path["actions"].append(int(acts[i]))
        obs, reward, terminated, truncated, _ = envs.step(acts)
        steps += n_envs
        for i, path in enumerate(paths):
            path["rewards"].append(float(reward[i]))
            if not (terminated[i] or truncated[i]):
                continue
            # A time-limit cut has no critic to bootstrap from yet: its return is the rewards'.
            ret, returns = 0.0, []
            for r in reversed(path["rewards"]):
                ret = r + config.gamma * ret
                returns.append(ret)
            data["obs"] += path["obs"]
            data["actions"] += path["actions"]
            data["returns"] += returns[::-1]
            ended.append(float(sum(path["rewards"])))
            copy_ended[i] = True
            paths[i] = {"obs": [], "actions": [], "rewards": []}
            if hasattr(teachers[i], "reset"):
                teachers[i].reset()

    if not data["obs"]:  # the budget ended before any episode did: nothing to fit
        nan = float("nan")
        metrics = {"imitation/steps": steps, "imitation/episodes": 0}
        metrics.update({f"imitation/{k}": nan for k in ("teacher_return", "loss", "agreement")})
        return obs, steps, metrics
    b_obs = {k: np.stack([o[k] for o in data["obs"]]) for k in data["obs"][0]}
    b_actions = torch.as_tensor(data["actions"])
    b_returns = torch.as_tensor(data["returns"], dtype=torch.float32)
    if config.norm_returns:
        update_return_stats(policy, b_returns)
    scale = (policy.ret_var + 1e-8).sqrt() if config.norm_returns else torch.ones(())
    size = len(b_actions)
    minibatch = max(n_envs * config.rollout_steps // config.minibatches, 1)  # PPO's
    policy.eval()
    for _epoch in range(config.imitation_epochs):
        perm = torch.randperm(size)
        for lo in range(0, size, minibatch):
            mb = perm[lo : lo + minibatch]
            logits, value = policy(obs_to_batch(index_obs(b_obs, mb.numpy())))
            ce = F.cross_entropy(logits, b_actions[mb])
            v_loss = 0.5 * (((value - b_returns[mb]) / scale) ** 2).mean()
            loss = ce + config.vf_coef * v_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
    with torch.no_grad():
        agree, total_loss = 0, 0.0
        for lo in range(0, size, 1024):
            idx = np.arange(lo, min(lo + 1024, size))
            logits, value = policy(obs_to_batch(index_obs(b_obs, idx)))
            agree += int((logits.argmax(1) == b_actions[idx]).sum())
            total_loss += float(F.cross_entropy(logits, b_actions[idx], reduction="sum"))
    metrics = {
        "imitation/steps": steps,
        "imitation/episodes": len(ended),
        "imitation/teacher_return": float(np.mean(ended)),
        "imitation/loss": total_loss / size,
        "imitation/agreement": agree / size,
    }
    return obs, steps, metrics
