"""Imitation warm start (`PPOConfig.teacher`): before PPO, play a baseline on the training envs
and fit the policy to its actions and the critic to its returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    play = TeacherPlay(envs, teachers, obs, config.gamma)
    episodes: list[Episode] = []
    while (cut := imitation_cut(episodes, play.steps, len(teachers), config, budget)) is None:
        episodes += play.play(1)
    steps = cut * len(teachers)
    return play.obs, steps, fit_imitation(policy, optimizer, episodes, steps, config, len(teachers))


@dataclass
class Episode:
    """One teacher episode: it ended after `step` steps of every copy (1 for the first), on copy
    `copy`; its observations, the teacher's actions, the discounted returns from each step, and
    the undiscounted return."""

    step: int
    copy: int
    obs: list[dict[str, np.ndarray]]
    actions: list[int]
    returns: list[float]
    total: float


class TeacherPlay:
    """`teachers` (one per env of the vector env `envs`) playing from observations `obs`; the
    paths of episodes in flight carry over from one `play` to the next. A runner on a Ray actor
    plays its own copies with one (esper_gym.agents.tamiyo.runners)."""

    def __init__(self, envs, teachers, obs, gamma: float):
        self.envs, self.teachers, self.obs, self.gamma = envs, list(teachers), obs, gamma
        for teacher in self.teachers:
            if hasattr(teacher, "reset"):
                teacher.reset()
        self.paths = [_path() for _ in self.teachers]
        self.steps = 0  # of every copy

    def play(self, n_steps: int) -> list[Episode]:
        """n_steps steps of every copy: the episodes that ended, by step then copy. A time-limit
        cut has no critic to bootstrap from yet: its return is the rewards'."""
        ended = []
        for _ in range(n_steps):
            obs = self.obs
            acts = np.array([t.act(index_obs(obs, i)) for i, t in enumerate(self.teachers)])
            for i, path in enumerate(self.paths):
                path["obs"].append(index_obs(obs, i))
                path["actions"].append(int(acts[i]))
            self.obs, reward, terminated, truncated, _ = self.envs.step(acts)
            self.steps += 1
            for i, path in enumerate(self.paths):
                path["rewards"].append(float(reward[i]))
                if not (terminated[i] or truncated[i]):
                    continue
                ret, returns = 0.0, []
                for r in reversed(path["rewards"]):
                    ret = r + self.gamma * ret
                    returns.append(ret)
                total = float(sum(path["rewards"]))
                ended.append(
                    Episode(self.steps, i, path["obs"], path["actions"], returns[::-1], total)
                )
                self.paths[i] = _path()
                if hasattr(self.teachers[i], "reset"):
                    self.teachers[i].reset()
        return ended


def _path() -> dict[str, list]:
    return {"obs": [], "actions": [], "rewards": []}


def imitation_cut(
    episodes: Sequence[Episode], played: int, n_envs: int, config: PPOConfig, budget: int | None
) -> int | None:
    """How many steps of every copy the warm start takes, once `played` steps of all `n_envs`
    copies have given `episodes`: the first step count after which `config.imitation_episodes`
    episodes have ended and every copy has ended one, or the last one within `budget` env steps
    (None: no budget); None while neither is reached in `played`. The one rule for one process
    and for Ray runners that play ahead in chunks."""
    last = played if budget is None else min(played, budget // n_envs)
    copies = set()
    for ended, ep in enumerate(sorted(episodes, key=lambda e: (e.step, e.copy)), 1):
        if ep.step > last:
            break
        copies.add(ep.copy)
        if ended >= config.imitation_episodes and len(copies) == n_envs:
            return ep.step
    if budget is not None and (played + 1) * n_envs > budget:
        return last
    return None


def fit_imitation(policy, optimizer, episodes, steps: int, config: PPOConfig, n_envs: int):
    """Fit `policy` to the teacher `episodes` that ended within `steps` env steps (by step, then
    copy); metrics as `imitate`'s."""
    kept = sorted((e for e in episodes if e.step * n_envs <= steps), key=lambda e: (e.step, e.copy))
    data = {"obs": [], "actions": [], "returns": []}
    for ep in kept:
        data["obs"] += ep.obs
        data["actions"] += ep.actions
        data["returns"] += ep.returns
    if not data["obs"]:  # the budget ended before any episode did: nothing to fit
        nan = float("nan")
        metrics = {"imitation/steps": steps, "imitation/episodes": 0}
        metrics.update({f"imitation/{k}": nan for k in ("teacher_return", "loss", "agreement")})
        return metrics
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
        "imitation/episodes": len(kept),
        "imitation/teacher_return": float(np.mean([e.total for e in kept])),
        "imitation/loss": total_loss / size,
        "imitation/agreement": agree / size,
    }
    return metrics
