"""Rollout collection for Tamiyo's PPO: in this process, or on Ray actors.

A `Runner` is one vector env (the batched simulator, usually) of `num_envs` copies per task
acting with a policy: `collect(weights, n_steps)` plays `n_steps` steps of every copy and
returns the rollout arrays (observations, actions, log-probabilities, rewards, dones, values,
entropies, the last observations) and the episodes that ended in it. PPO's learner
(esper_gym.agents.tamiyo.ppo) runs GAE and the update on them.

- `runners=0` (the default): one Runner in the learner's process, acting with the learner's own
  policy object and torch's global RNG: the run is the one it always was, bit for bit.
- `runners=K`: K Ray actors (`RemoteRunners`), each a Runner with one torch thread and one CPU
  (`num_cpus=1`). At each update the learner `ray.put`s its weights once (one object, read by
  every actor) and concatenates the K rollouts along the env axis. Runner r resets with seed
  offset r * (copies per runner): with one task, copy i of runner r plays the episodes of copy
  r * num_envs + i of one process, so `runners=2 num_envs=16` plays the episodes of
  `runners=0 num_envs=32` (actions are sampled from each actor's own torch generator, so a
  sampling policy's trajectories differ; a greedy one's are the same, tests/test_ray.py).
- Faults: an actor whose process dies is restarted by Ray (`max_restarts`); the learner logs a
  warning, resets the new actor's envs (new episodes, seeds offset by the global step as on
  resume) and collects that runner's rollout again. Training goes on.

Ray is optional (`pip install "esper-gym[ray]"`); `init_ray` joins a cluster (`address=auto`
or an address, after `ray start`) or starts one embedded in this process.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch.distributions import Categorical

from esper_gym.actions import CULL

LOG = logging.getLogger(__name__)

RAY_MISSING = 'Ray is not installed (env.runners > 0, executor=ray): pip install "esper-gym[ray]"'
MAX_RESTARTS = 3  # per actor; then the run stops with Ray's error
# How long a restarted actor may take to answer: a new process, its imports and its envs, which
# on a loaded machine (more processes than cores) took over a minute.
RESTART_WAIT_S = 600.0


def final_obs(info: dict, i: int) -> dict[str, np.ndarray]:
    """Env i's last observation before a same-step autoreset. Gymnasium's vector envs give
    `final_obs` as a per-env object array of dicts for Dict spaces (a dict of arrays is
    accepted too)."""
    final = info["final_obs"]
    obs = final[i] if not isinstance(final, dict) else {k: v[i] for k, v in final.items()}
    return {k: np.asarray(v) for k, v in obs.items()}


class Runner:
    """`envs` (a vector env) acting with `policy`; `kind_of[a]` is action a's kind (CULLs are
    counted per episode), `env_task[i]` copy i's task name, `gamma` the discount (a copy cut by
    a time limit gets gamma * V(final obs) added to its last reward). Episode returns, lengths
    and culls carry over from one `collect` to the next."""

    def __init__(self, envs, policy, kind_of: np.ndarray, env_task: Sequence[str], gamma: float):
        self.envs, self.policy, self.kind_of = envs, policy, kind_of
        self.env_task, self.gamma = list(env_task), gamma
        n = envs.num_envs
        self.next_obs: dict[str, np.ndarray] | None = None
        self.next_done = torch.zeros(n)
        self.ep_return, self.ep_length = np.zeros(n), np.zeros(n, dtype=int)
        self.ep_culls = np.zeros(n, dtype=int)

    def reset(self, seed: int | None) -> dict[str, np.ndarray]:
        self.next_obs, _ = self.envs.reset(seed=seed)
        return self.next_obs

    def collect(self, weights: dict | None, n_steps: int, greedy: bool = False) -> dict[str, Any]:
        """Play n_steps steps of every copy with `weights` loaded into the policy (None: the
        policy as it is); `greedy`: the argmax action (a log-probability of it is still kept).
        Returns {obs: {key: (n_steps, n_envs, ...)}, actions, logprobs, rewards, dones, values,
        entropies: (n_steps, n_envs) tensors, next_obs, next_done, finished: {returns, lengths,
        culls, tasks} of the episodes that ended, collect_s: seconds}."""
        start = time.perf_counter()
        policy, envs, n_envs = self.policy, self.envs, self.envs.num_envs
        if weights is not None:
            policy.load_state_dict(weights)
        space = envs.single_observation_space
        obs_buf = {k: np.zeros((n_steps, n_envs, *s.shape), s.dtype) for k, s in space.items()}
        actions = torch.zeros(n_steps, n_envs, dtype=torch.long)
        logprobs = torch.zeros(n_steps, n_envs)
        rewards = torch.zeros(n_steps, n_envs)
        dones = torch.zeros(n_steps, n_envs)
        values = torch.zeros(n_steps, n_envs)
        entropies = torch.zeros(n_steps, n_envs)
        finished: dict[str, list] = {"returns": [], "lengths": [], "culls": [], "tasks": []}
        ep_return, ep_length, ep_culls = self.ep_return, self.ep_length, self.ep_culls
        from esper_gym.agents.graph import obs_to_batch

        policy.eval()  # act with dropout off
        next_obs, next_done = self.next_obs, self.next_done
        for step in range(n_steps):
            for k in obs_buf:
                obs_buf[k][step] = next_obs[k]
            dones[step] = next_done
            with torch.no_grad():
                logits, value = policy(obs_to_batch(next_obs))
                dist = Categorical(logits=logits)
                action = dist.probs.argmax(-1) if greedy else dist.sample()
                entropies[step] = dist.entropy()
            actions[step], logprobs[step], values[step] = action, dist.log_prob(action), value

            next_obs, reward, terminated, truncated, info = envs.step(action.numpy())
            done = np.logical_or(terminated, truncated)
            ep_return += reward
            ep_length += 1
            ep_culls += self.kind_of[action.numpy()] == CULL
            reward = torch.as_tensor(reward, dtype=torch.float32)
            for i in np.flatnonzero(done):
                finished["returns"].append(ep_return[i])
                finished["tasks"].append(self.env_task[i])
                finished["lengths"].append(ep_length[i])
                finished["culls"].append(ep_culls[i])
                ep_return[i], ep_length[i], ep_culls[i] = 0.0, 0, 0
                if truncated[i] and not terminated[i]:
                    # Cut by a time limit, not ended: bootstrap from the real final state.
                    with torch.no_grad():
                        reward[i] += self.gamma * policy(obs_to_batch(final_obs(info, i)))[1][0]
            rewards[step] = reward
            next_done = torch.as_tensor(done, dtype=torch.float32)
        self.next_obs, self.next_done = next_obs, next_done
        return {
            "obs": obs_buf,
            "actions": actions,
            "logprobs": logprobs,
            "rewards": rewards,
            "dones": dones,
            "values": values,
            "entropies": entropies,
            "next_obs": next_obs,
            "next_done": next_done,
            "finished": finished,
            "collect_s": time.perf_counter() - start,
        }

    def close(self) -> None:
        self.envs.close()


def concat_rollouts(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The K runners' rollouts as one: every array joined along the env axis (runner r's
    copies after runner r-1's), the finished episodes in runner order."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {
        "obs": {k: np.concatenate([p["obs"][k] for p in parts], 1) for k in parts[0]["obs"]},
        "next_obs": {
            k: np.concatenate([p["next_obs"][k] for p in parts], 0) for k in parts[0]["next_obs"]
        },
        "next_done": torch.cat([p["next_done"] for p in parts]),
        "finished": {k: [x for p in parts for x in p["finished"][k]] for k in parts[0]["finished"]},
        "collect_s": max(p["collect_s"] for p in parts),
    }
    for k in ("actions", "logprobs", "rewards", "dones", "values", "entropies"):
        out[k] = torch.cat([p[k] for p in parts], 1)
    return out


# --- Ray -----------------------------------------------------------------------------------------


class RayMissing(ImportError, ValueError):
    """Ray is not installed. A ValueError too: an entry point ends with its one line."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayMissing(RAY_MISSING) from None
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Ray, initialised once: `address` None starts it embedded in this process (no dashboard,
    workers' logs not copied to this terminal) with `num_cpus` logical CPUs (None: the cores);
    "auto" or "host:port" (or Ray's own RAY_ADDRESS variable) joins the cluster `ray start`
    made (its CPUs are the cluster's)."""
    ray = import_ray()
    if not ray.is_initialized():
        joins = address is not None or bool(os.environ.get("RAY_ADDRESS"))  # ray.init reads it
        kwargs: dict[str, Any] = {} if joins else {"num_cpus": num_cpus}
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
            logging_level=logging.WARNING,
            configure_logging=False,
            **kwargs,
        )
    return ray


def resolve_runners(runners: int | str, address: str | None = None) -> int:
    """env.runners as a count: "auto" is the CPUs Ray sees (the cluster's with an address)."""
    if runners == "auto":
        ray = init_ray(address)
        return max(int(ray.cluster_resources().get("CPU", 1)), 1)
    runners = int(runners)
    if runners < 0:
        raise ValueError(f"runners={runners}: 0 (in this process), a count >= 1, or auto")
    return runners


class RunnerRestarted(RuntimeError):
    """A restarted actor asked to collect before the learner reset its envs."""


def _actor_errors(ray) -> tuple[type, ...]:
    """The errors of an actor that died, is restarting (Ray >= 2.22) or was restarted."""
    unavailable = getattr(ray.exceptions, "ActorUnavailableError", None)
    return (ray.exceptions.RayActorError, RunnerRestarted) + ((unavailable,) if unavailable else ())


class RunnerActor:
    """A Runner in a Ray actor: builds its own vector env (one copy of the learner's layout,
    `num_envs` per task) and its own policy (`TamiyoPolicy(**policy_kwargs)`, the learner's
    weights loaded at each collect), acts with its own torch RNG, one torch thread."""

    def __init__(
        self,
        makers: Sequence[Callable],
        num_envs: int,
        use_async: bool,
        policy_kwargs: dict,
        kind_of: np.ndarray,
        env_task: Sequence[str],
        gamma: float,
    ):
        torch.set_num_threads(1)
        from esper_gym.agents.tamiyo.policy import TamiyoPolicy

        envs = build_vector_env(makers, num_envs, use_async)
        torch.set_num_threads(1)  # a maker's `threads` may have set more
        policy = TamiyoPolicy(**policy_kwargs)
        self.runner = Runner(envs, policy, kind_of, env_task, gamma)
        self.makers, self.num_envs, self.gamma = list(makers), num_envs, gamma
        self.teaching = None

    def pid(self) -> int:
        return os.getpid()

    def reset(self, seed: int, torch_seed: int) -> None:
        torch.manual_seed(torch_seed)
        self.runner.reset(seed)
        self.teaching = None

    def collect(self, weights: dict, n_steps: int, greedy: bool = False) -> dict[str, Any]:
        if self.runner.next_obs is None:  # Ray restarted this actor: its episodes are gone
            raise RunnerRestarted(f"runner in process {os.getpid()} was restarted: not reset")
        return self.runner.collect(weights, n_steps, greedy)

    def teach(self, teacher: str, n_steps: int) -> list:
        """n_steps more steps of the imitation warm start's teacher (`teacher`, one per copy,
        each task's own) on this runner's copies, from its last reset: the episodes that
        ended (esper_gym.agents.tamiyo.imitation.TeacherPlay)."""
        from esper_gym.agents.tamiyo.imitation import TeacherPlay, make_teacher

        if self.runner.next_obs is None:
            raise RunnerRestarted(f"runner in process {os.getpid()} was restarted: not reset")
        if self.teaching is None:
            teachers = []
            for make in self.makers:
                probe = make()
                teachers += [make_teacher(teacher, probe) for _ in range(self.num_envs)]
                probe.close()
            runner = self.runner
            self.teaching = TeacherPlay(runner.envs, teachers, runner.next_obs, self.gamma)
        return self.teaching.play(n_steps)


class RemoteRunners:
    """K `RunnerActor`s; `collect(policy, n_steps)` broadcasts the policy's weights (one
    `ray.put`) and returns their rollouts joined (`concat_rollouts`) and the times of the parts:
    timing/{broadcast_s, rollout_s (the slowest actor's own), transfer_s (waiting for the
    rollouts beyond that)}. A runner whose actor died is restarted by Ray; its rollout is
    collected again after a warning, from new episodes (seeds offset by `step`, as on resume)."""

    def __init__(
        self,
        k: int,
        makers: Sequence[Callable],
        num_envs: int,
        use_async: bool,
        policy,
        kind_of: np.ndarray,
        env_task: Sequence[str],
        gamma: float,
        address: str | None = None,
        max_restarts: int = MAX_RESTARTS,
    ):
        ray = self.ray = init_ray(address, None if address else max(k, os.cpu_count() or 1))
        remote = ray.remote(num_cpus=1, max_restarts=max_restarts, max_task_retries=0)(RunnerActor)
        self.per_runner = num_envs * len(makers)
        # The policy's sizes only (its weights come with each collect): small arguments, held
        # by value, so that a restart (which re-runs the constructor) never misses them.
        kwargs = dict(policy.init_kwargs)
        self.actors = [
            remote.remote(makers, num_envs, use_async, kwargs, kind_of, env_task, gamma)
            for _ in range(k)
        ]
        self.seed = 0
        self.restarts = 0

    def _torch_seed(self, r: int, step: int) -> int:
        return int(np.random.SeedSequence([self.seed, step, r]).generate_state(1)[0])

    def reset(self, seed: int, step: int = 0) -> None:
        """Runner r's copies reset with seed + r * copies per runner; its torch RNG from
        (seed, step, r)."""
        self.seed = seed
        self.ray.get(
            [
                a.reset.remote(seed + r * self.per_runner, self._torch_seed(r, step))
                for r, a in enumerate(self.actors)
            ]
        )

    def pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def collect(
        self, policy, n_steps: int, step: int = 0, greedy: bool = False
    ) -> tuple[dict, dict]:
        return self.finish(self.start(policy, n_steps, step, greedy))

    def start(self, policy, n_steps: int, step: int = 0, greedy: bool = False) -> dict:
        """Broadcast the policy's weights (a copy: the policy may change meanwhile) and start
        every runner's rollout; `finish` waits for them. PPO starts the next rollout as soon
        as its update is done, so that its logging and checkpoints overlap the rollout."""
        start = time.perf_counter()
        weights = self.ray.put({k: v.detach().clone() for k, v in policy.state_dict().items()})
        refs = [a.collect.remote(weights, n_steps, greedy) for a in self.actors]
        return {
            "refs": refs,
            "weights": weights,
            "n_steps": n_steps,
            "step": step,
            "greedy": greedy,
            "start": start,
            "broadcast_s": time.perf_counter() - start,
        }

    def finish(self, pending: dict) -> tuple[dict, dict]:
        """The rollouts `start` began, joined, and the times of the parts (as `collect`)."""
        ray, weights, refs = self.ray, pending["weights"], pending["refs"]
        n_steps, step, greedy = pending["n_steps"], pending["step"], pending["greedy"]
        start, broadcast_s = pending["start"], pending["broadcast_s"]
        parts: list[dict | None] = [None] * len(refs)
        for r, ref in enumerate(refs):
            for attempt in range(MAX_RESTARTS + 1):
                try:
                    parts[r] = ray.get(ref)
                    break
                except _actor_errors(ray):
                    if attempt == MAX_RESTARTS:
                        raise
                    self.restarts += 1
                    LOG.warning(
                        "runner %d died mid-rollout (restart %d): restarted, its envs reset "
                        "(new episodes, seed offset %d) and its rollout collected again",
                        *(r, self.restarts, step),
                    )
                    actor = self.actors[r]
                    seeds = (self.seed + step + r * self.per_runner, self._torch_seed(r, step))
                    self._retry(lambda a=actor, s=seeds: ray.get(a.reset.remote(*s)))
                    ref = actor.collect.remote(weights, n_steps, greedy)
        rollout = concat_rollouts(parts)
        total = time.perf_counter() - start
        timing = {
            "timing/broadcast_s": broadcast_s,
            "timing/rollout_s": rollout["collect_s"],
            "timing/transfer_s": max(total - broadcast_s - rollout["collect_s"], 0.0),
        }
        return rollout, timing

    def imitate(
        self, teacher: str, config, budget: int | None, seed: int, step: int = 0, chunk: int = 8
    ) -> tuple[list, int]:
        """The imitation warm start's episodes, played by the runners in chunks of `chunk` steps
        until the warm start's rule (`imitation_cut`) says where it ends: (episodes, with copy
        indices over all runners, env steps). The same episodes as one process of all the
        copies would play with one task (copy i of runner r is copy r * num_envs + i there).
        An actor that dies meanwhile is restarted and the warm start played again from the
        same seeds, after a warning (the teachers replay it exactly). The runners reset with
        `seed` and `step` first, as `reset`."""
        from esper_gym.agents.tamiyo.imitation import imitation_cut

        ray, n_envs = self.ray, self.per_runner * len(self.actors)
        for attempt in range(MAX_RESTARTS + 1):
            try:
                self.reset(seed, step)
                episodes, played = [], 0
                while (cut := imitation_cut(episodes, played, n_envs, config, budget)) is None:
                    parts = ray.get([a.teach.remote(teacher, chunk) for a in self.actors])
                    for r, part in enumerate(parts):
                        for ep in part:
                            ep.copy += r * self.per_runner
                            episodes.append(ep)
                    played += chunk
                return episodes, cut * n_envs
            except _actor_errors(ray):
                if attempt == MAX_RESTARTS:
                    raise
                self.restarts += 1
                LOG.warning(
                    "a runner died in the imitation warm start (restart %d): played "
                    "again from the same seeds",
                    self.restarts,
                )
                self._retry(lambda: self.pids())

    def _retry(self, call: Callable, wait_s: float = RESTART_WAIT_S):
        """`call()` until the restarted actor answers (it is unavailable while restarting)."""
        ray, deadline = self.ray, time.monotonic() + wait_s
        while True:
            try:
                return call()
            except _actor_errors(ray):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []


def make_vector_env(make_env: Callable[[], gym.Env], num_envs: int, use_async: bool = False):
    """num_envs copies, autoreset in the same step (the final obs comes back in info). A
    make_env with a `vector(num_envs)` method builds its own: env.vectorization=batched gives
    the batched simulator (esper_gym.vector), whose autoreset is the same."""
    mode = gym.vector.AutoresetMode.SAME_STEP
    if callable(getattr(make_env, "vector", None)) and not use_async:
        envs = make_env.vector(num_envs)
        if envs.metadata.get("autoreset_mode") != mode:
            raise ValueError(f"{make_env!r}.vector() must autoreset in the same step ({mode})")
        return envs
    if use_async:
        # Spawn, not fork: torch and fork do not mix. Graph obs are small; no shared memory.
        # make_env must be picklable (a module-level function or functools.partial).
        return gym.vector.AsyncVectorEnv(
            [make_env] * num_envs, context="spawn", shared_memory=False, autoreset_mode=mode
        )
    return gym.vector.SyncVectorEnv([make_env] * num_envs, autoreset_mode=mode)


def build_vector_env(
    makers: Sequence[Callable[[], gym.Env]], num_envs: int, use_async: bool = False
) -> gym.vector.VectorEnv:
    """num_envs copies of each maker's env: one vector env, or their concatenation
    (esper_gym.multitask.ConcatVectorEnv) for several tasks."""
    if len(makers) == 1:
        return make_vector_env(makers[0], num_envs, use_async)
    from esper_gym.multitask import ConcatVectorEnv

    return ConcatVectorEnv([make_vector_env(m, num_envs, use_async) for m in makers])
