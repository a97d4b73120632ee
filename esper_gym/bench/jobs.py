"""Seeded episodes: the one env constructor (`make_env`), and every agent playing the same
episode seeds, their metrics collected.

`play_agents(env, players, seeds)` is what `esper_gym.train` runs after training: each agent
plays one episode per seed on the same env, so agents are compared on common seeds (the same
seed gives every agent the same context, data order and host initialisation).

`esper_gym.evaluate`'s episodes are `Job`s: one (agent, task, seed) each, `make_jobs` builds
them (checkpoints refused before any episode), `run_job` plays one (in a pool worker) and
returns its CSV row, lifecycle events and replay record (`esper_gym.bench.records`), and
`run_jobs` plays many on an executor ("local": a pool of spawned processes). An episode is a
pure function of its job: the numbers do not depend on the executor or the number of workers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

import esper_gym
from esper_gym import numerics
from esper_gym.bench import records
from esper_gym.episode import play_episode
from esper_gym.reward import resolve_weights
from esper_gym.tasks import TASKS, Task, get_task

EVAL_SEED = 1_000_000  # held-out evaluation episodes are seeds EVAL_SEED + i, in every run

# A task of the user's own has no registered id: the env class itself, with no TimeLimit
# (its episodes end when the training budget is spent).
CUSTOM_SPEC = gym.envs.registration.EnvSpec("Esper/Custom-v0", entry_point=esper_gym.ENTRY_POINT)


def make_env(
    env_id: str | None = None, threads: int | None = None, gate: str | None = None, **kwargs: Any
) -> gym.Env:
    """The one env constructor: gym.make of a registered id (`env_id`), or of the unregistered
    env when None (kwargs then carry the whole `task`, a Task), after setting torch's thread
    count (async env workers are fresh processes); kwargs are MorphogeneticEnv's. `gate`: behind
    the schedule gate (esper_gym.agents.gate) with that rule."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    env = gym.make(env_id or CUSTOM_SPEC, **kwargs)
    if gate is None:
        return env
    from esper_gym.agents.gate import ScheduleGate

    return ScheduleGate(env, gate)


@dataclass(frozen=True)
class BatchedFactory:
    """The env constructor of env.vectorization=batched: called, one env (probes, evaluation);
    `vector(num_envs)`, the batched simulator Tamiyo trains on (esper_gym.vector)."""

    env_id: str | None
    threads: int | None
    kwargs: dict
    gate: str | None = None  # behind the schedule gate (esper_gym.agents.gate)

    def __call__(self, **overrides: Any) -> gym.Env:
        return make_env(self.env_id, self.threads, self.gate, **{**self.kwargs, **overrides})

    def vector(self, num_envs: int) -> gym.vector.VectorEnv:
        envs = self._vector(num_envs)
        if self.gate is None:
            return envs
        from esper_gym.agents.gate import VectorScheduleGate

        return VectorScheduleGate(envs, self.gate)

    def _vector(self, num_envs: int) -> gym.vector.VectorEnv:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        if self.env_id is None:
            from esper_gym.vector import BatchedMorphogeneticEnv

            return BatchedMorphogeneticEnv(num_envs=num_envs, **self.kwargs)
        return gym.make_vec(
            self.env_id, num_envs, vectorization_mode="vector_entry_point", **self.kwargs
        )


# actor(episode seed) -> act(obs) -> action: a learner samples from a generator seeded with the
# episode seed, so an episode is the same in every run.
Actor = Callable[[int], Callable[[dict], int]]


def mean_metrics(episodes: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of every numeric metric over the episodes (NaN where an episode has none)."""
    first = episodes[0] if episodes else {}
    keys = [k for k, v in first.items() if isinstance(v, (int, float)) and k != "seed"]
    return {k: float(np.mean([float(e[k]) for e in episodes])) for k in keys}


def baseline_actor(name: str, env: gym.Env, seed: int, agent: Any = None) -> Actor:
    """A baseline's actor: `agent` (built from its config), else make_agent's defaults for
    `name` (random seeded with `seed`); one agent acts in every episode."""
    from esper_gym.agents.baselines import make_agent

    if agent is None:
        agent = make_agent(name, env, **({"seed": seed} if name == "random" else {}))
    return lambda _seed: agent.act


def play_agents(
    env: gym.Env,
    players: Mapping[str, Actor],
    seeds: Sequence[int],
    logger=None,
) -> dict[str, dict[str, Any]]:
    """Each player plays one episode per seed on `env`, in order; returns
    `{name: {"episodes": [{"seed": s, **metrics}], "mean": mean_metrics}}`. With a logger
    (esper_gym.logger), each episode is logged under `eval/<name>` and the means go to the
    run summary as `eval/<name>/<metric>_mean`."""
    results = {}
    for name, actor in players.items():
        if logger is not None:
            logger.progress(len(seeds), f"eval {name}")
        episodes = []
        for seed in seeds:
            episode, _ = play_episode(env, actor(seed), seed)
            episodes.append({"seed": seed, **episode})
            if logger is not None:
                logger.log_episode(episode, prefix=f"eval/{name}")
        means = mean_metrics(episodes)
        results[name] = {"episodes": episodes, "mean": means}
        if logger is not None:
            logger.progress(None)
            logger.summary({f"eval/{name}/{k}_mean": v for k, v in means.items()})
    return results


# ----------------------------------------------------------------- evaluate's jobs

# One row per episode, in this order; then one `reward/<component>` column per component.
CSV_COLUMNS = (
    "agent",
    "task",
    "base_task",
    "seed",
    "val_acc",
    "test_acc",
    "params",
    "host_params",
    "params_added",
    "return",
    "length",
    "faults",
    "invalid_actions",
    "interventions",
    "diverged",
    "wall_s",
    "n_layers",
    "layers",
    "seed_slots",
    "decision_interval",
    "budget_steps",
    "checkpoint",
    "contexts",
    "context_index",
    "context",
    "germinations",
    "useful_seeds",
    "false_positives",
    "decision_quality",
    "false_positive_rate",
    "first_useful_progress",
    "plan",
    "cost_steps",
    "cost_s",
)
# A checkpointed policy's settings in agent_kwargs: none since TamiyoPolicy.actor's MC-dropout
# gate was removed (docs/agents.md).
CHECKPOINT_KWARGS: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskSpec:
    """A task as evaluated: `label` in the tables, a registered `base` task and Task field
    `overrides` (a variant such as a deeper host, or a smaller budget)."""

    label: str
    base: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> Task:
        return get_task(self.base, **dict(self.overrides))


def resolve_tasks(
    names: Sequence[str],
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    common: Mapping[str, Any] | None = None,
) -> list[TaskSpec]:
    """TaskSpecs for `names`: each a registered task or a key of `variants` (whose `task` entry
    names the registered base and whose other entries are Task fields). `common` (e.g. device,
    blueprint library) applies to every task, then the variant's fields, then `overrides[name]`;
    None values mean "keep the registered value". Every spec is built once here, so an unknown
    task or a bad field fails before any episode."""
    variants, overrides = dict(variants or {}), dict(overrides or {})
    specs = []
    for name in names:
        fields = _set(common)
        if name in variants:
            variant = dict(variants[name])
            base = variant.pop("task", None)
            if base not in TASKS:
                raise ValueError(
                    f"variant {name!r}: task={base!r} is not a registered task; "
                    f"known: {', '.join(TASKS)}"
                )
            fields |= _set(variant)
        elif name in TASKS:
            base = name
        else:
            known = [*TASKS, *variants]
            raise ValueError(f"unknown task {name!r}; known: {', '.join(known)}")
        fields |= _set(overrides.get(name))
        spec = TaskSpec(name, base, {k: records.tuples(v) for k, v in fields.items()})
        spec.build()
        specs.append(spec)
    return specs


def _set(fields: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields that are set (None: keep the value of the layer below)."""
    return {k: v for k, v in (fields or {}).items() if v is not None}


def task_env(
    task: TaskSpec,
    reward_weights: Mapping[str, float] | None = None,
    kernel_dir: str | None = None,
    contexts: str | None = None,
    show_context: bool = False,
    threads: int | None = None,
    gate: str | None = None,
) -> gym.Env:
    """The env of a TaskSpec, by `make_env` (the unregistered env: no TimeLimit, every task
    ends by its budget). `show_context` only adds the context's factors to the observation:
    the episode is the same. `gate`: behind the schedule gate, as the checkpoint was trained."""
    return make_env(
        None,
        threads,
        gate,
        task=task.build(),
        reward_weights=dict(reward_weights or {}) or None,
        kernel_dir=kernel_dir,
        contexts=contexts,
        show_context=show_context,
    )


@dataclass(frozen=True)
class Job:
    """One episode to play: `agent` on `task` from `seed`."""

    agent: str
    task: TaskSpec
    seed: int
    checkpoint: str | None = None  # a Tamiyo checkpoint; None: `agent` is a baseline
    reward_weights: Mapping[str, float] | None = None
    kernel_dir: str | None = None
    greedy: bool = False  # sample the policy, seeded with `seed`; True: argmax
    threads: int | None = 1
    contexts: str | None = None  # "train"/"test": each reset draws a context of that split
    agent_kwargs: Mapping[str, Any] | None = None  # a baseline's settings (make_agent kwargs)
    plan: tuple | None = None  # the oracle: play this schedule plan (ScheduleAgent)
    context: int | None = None  # play this context of the split (reset option), not the drawn one
    show_context: bool = False  # the checkpoint was trained seeing the context's factors
    gate: str | None = None  # the checkpoint was trained behind the schedule gate (its rule)


def checkpoint_file(
    path: str | os.PathLike, suffix: str = ".pt", key: str = "checkpoints"
) -> pathlib.Path:
    """The one checkpoint resolver: the file `path`, or the `checkpoint<suffix>` in the run dir
    `path` (.pt Tamiyo, .zip SB3). ValueError naming `key` (the config key that gave the path)
    if there is none, or if the dir holds the other kind."""
    kinds = {".pt": "a Tamiyo checkpoint for agent=tamiyo", ".zip": "an SB3 model for "}
    kinds[".zip"] += "agent=sb3_ppo or maskable_ppo"
    p = pathlib.Path(path)
    if p.is_dir():
        other = {".pt": ".zip", ".zip": ".pt"}[suffix]
        if not (p / f"checkpoint{suffix}").exists() and (p / f"checkpoint{other}").exists():
            raise ValueError(
                f"{key}={str(path)!r} holds checkpoint{other} ({kinds[other]}), not "
                f"checkpoint{suffix} ({kinds[suffix]})"
            )
        p = p / f"checkpoint{suffix}"
    if not p.is_file():
        raise ValueError(f"{key}={str(path)!r}: no checkpoint at {p}")
    return p  # a file of the other kind is refused by its loader, saying which it is


def make_jobs(
    agents: Sequence[str],
    tasks: Sequence[TaskSpec],
    seeds: int | Sequence[int],
    checkpoints: Mapping[str, str | None] | None = None,
    first_seed: int = EVAL_SEED,
    **job_kwargs: Any,
) -> list[Job]:
    """Every (agent, task, seed) job; `seeds` is a count (seeds `first_seed + i`) or a list.
    A name with a checkpoint is a Tamiyo policy; any other name must be a baseline."""
    from esper_gym.agents.baselines import AGENTS

    checkpoints = {k: v for k, v in (checkpoints or {}).items() if v}
    for agent in agents:
        if agent not in checkpoints and agent not in AGENTS:
            raise ValueError(
                f"agent {agent!r} is not a baseline ({', '.join(AGENTS)}) and has no checkpoint "
                f"(checkpoints.{agent}=<checkpoint.pt or train run dir>)"
            )
    seed_list = [first_seed + i for i in range(seeds)] if isinstance(seeds, int) else list(seeds)
    bad = [s for s in seed_list if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(
            f"episode seeds must be integers >= 0 (numpy seeds), got {bad[:5]} "
            f"(first_seed={first_seed!r})"
        )
    if not seed_list:
        raise ValueError(f"seeds={seeds!r}: no episode to play (a count >= 1, or a list)")
    ckpts = {
        a: str(checkpoint_file(checkpoints[a], key=f"checkpoints.{a}"))
        for a in agents
        if a in checkpoints
    }
    shows = {}  # agent -> whether its checkpoint was trained seeing the context (env.show_context)
    gates = {}  # agent -> the schedule gate its checkpoint was trained behind (env.gate)
    contexts = job_kwargs.get("contexts")
    for agent, path in ckpts.items():  # refused here, before any episode of any job runs
        ckpt = load_checkpoint(path)
        record = ckpt.env if isinstance(ckpt.env, dict) else {}
        shows[agent], gates[agent] = bool(record.get("show_context")), record.get("gate")
        if shows[agent] and contexts is None:
            raise ValueError(
                f"checkpoint {path} ({agent}) was trained with env.show_context (the context's "
                "factors in its observation): evaluate it on contexts, contexts=test (or train)"
            )
        for task in tasks:
            env = task_env(task, contexts=contexts, show_context=shows[agent], gate=gates[agent])
            check_checkpoint(ckpt, path, env)
    return [
        Job(
            agent,
            task,
            seed,
            ckpts.get(agent),
            show_context=shows.get(agent, False),
            gate=gates.get(agent),
            **job_kwargs,
        )
        for task in tasks
        for agent in agents
        for seed in seed_list
    ]


def with_agent_kwargs(
    jobs: Sequence[Job], agent_kwargs: Mapping[str, Mapping[str, Any]] | None
) -> list[Job]:
    """`jobs` with each agent's `agent_kwargs[name]`: a baseline's make_agent kwargs, or a
    checkpointed policy's actor settings (CHECKPOINT_KWARGS, none today). A name
    that is neither, or a checkpoint setting that is not one, is refused."""
    from esper_gym.agents.baselines import AGENTS

    kwargs = {k: dict(v) for k, v in (agent_kwargs or {}).items() if v}
    checkpointed = {j.agent for j in jobs if j.checkpoint}
    unknown = sorted(set(kwargs) - set(AGENTS) - checkpointed)
    if unknown:
        raise ValueError(
            f"agent_kwargs for {unknown}: not baselines ({', '.join(AGENTS)}) nor agents with "
            "a checkpoint"
        )
    for name in sorted(set(kwargs) & checkpointed):
        bad = sorted(set(kwargs[name]) - set(CHECKPOINT_KWARGS))
        if bad:
            raise ValueError(
                f"agent_kwargs.{name}: {bad} are not settings of a checkpointed policy; "
                f"allowed: {', '.join(CHECKPOINT_KWARGS) or 'none'}"
            )
    return [
        dataclasses.replace(j, agent_kwargs=kwargs[j.agent]) if j.agent in kwargs else j
        for j in jobs
    ]


def check_players(jobs: Sequence[Job]) -> None:
    """Build each baseline of `jobs` once per task, before any episode runs: a rule with no
    tuned parameters for a task (conf/rule_params.yaml), or a bad setting, fails here and not
    after every episode before it has been played."""
    envs: dict[tuple, gym.Env] = {}
    seen = set()
    try:
        for job in jobs:
            key = (job.agent, job.task.label, repr(job.agent_kwargs))
            if job.checkpoint or job.plan is not None or key in seen:
                continue
            seen.add(key)
            where = (job.task.label, job.contexts)
            if where not in envs:
                envs[where] = task_env(job.task, contexts=job.contexts)
            try:
                make_player(job, envs[where])
            except (ValueError, TypeError) as exc:
                raise ValueError(f"agent {job.agent!r} on task {job.task.label!r}: {exc}") from exc
    finally:
        for env in envs.values():
            env.close()


def check_compatible(policy, env) -> None:
    """Refuse a Tamiyo policy whose input/output sizes do not fit `env`'s spaces."""
    space = env.observation_space
    max_nodes, node_dim = space["nodes"].shape
    need = {
        "node_dim": node_dim,
        "global_dim": space["globals"].shape[0],
        "edge_dim": space["edge_attr"].shape[1],
        "per_node_actions": (env.action_space.n - 1) // max_nodes,
    }
    have = {k: policy.init_kwargs.get(k) for k in need}
    if have != need:
        diff = {k: (have[k], need[k]) for k in need if have[k] != need[k]}
        raise ValueError(
            f"checkpoint does not fit task {env.unwrapped.task.name!r}: (checkpoint, task) = "
            f"{diff}; seed_slots and the blueprint library must match those it was trained with"
        )


def load_checkpoint(checkpoint: str | os.PathLike, env=None):
    """Tamiyo's checked loader; with `env` the policy's sizes must fit it before it is built."""
    from esper_gym.agents.tamiyo import load_checkpoint as load

    return load(checkpoint, env=env)


def check_checkpoint(ckpt, path, env) -> None:
    """Refuse a checkpoint that cannot act on `env`: other sizes (`check_compatible`) or another
    blueprint library (its GERMINATE actions would pick other blueprints). The task may differ:
    that is zero-shot transfer."""
    from esper_gym.agents.tamiyo import check_env_record, env_record

    check_compatible(ckpt.policy, env)
    check_env_record(ckpt.env, env_record(env), path, same_task=False)


@dataclass
class _Checkpointed:
    """A checkpointed policy's player: `act` samples (seeded by the episode seed) or argmaxes."""

    act: Callable[..., int]


def make_player(job: Job, env):
    """The job's agent on `env`: an object with `act(obs, info) -> action` and, for agents that
    spend compute beyond acting (lookahead), `episode_cost() -> {cost_steps, cost_s, ...}`.
    Baselines are built by `make_agent` with `job.agent_kwargs`; a baseline that needs the env
    itself (NEEDS_ENV, e.g. lookahead forks it) gets `env` there, in the process that plays."""
    if job.checkpoint:
        ckpt = load_checkpoint(job.checkpoint, env)
        check_checkpoint(ckpt, job.checkpoint, env)
        policy = ckpt.policy.eval()
        actor = policy.actor(greedy=job.greedy, seed=job.seed, **(job.agent_kwargs or {}))
        return _Checkpointed(actor)
    from esper_gym.agents.baselines import ScheduleAgent, make_agent

    if job.plan is not None:  # the oracle's plan for this context
        blueprints = env.unwrapped.task.blueprints
        return ScheduleAgent(env.observation_space, env.action_space, job.plan, blueprints)
    kwargs = dict(job.agent_kwargs or {})
    if job.agent == "random":
        kwargs.setdefault("seed", job.seed)
    return make_agent(job.agent, env, **kwargs)


def run_job(job: Job) -> dict[str, Any]:
    """Play one job; returns {"row": CSV row, "events": [...], "replay": record}. Runs in a
    pool worker."""
    numerics.apply()  # a worker of a portable run: oneDNN off (its variables came with it)
    env = task_env(
        job.task,
        job.reward_weights,
        job.kernel_dir,
        job.contexts,
        job.show_context,
        job.threads,
        job.gate,
    )
    player = make_player(job, env)
    actions: list[int] = []

    def recorded(obs, info=None) -> int:  # every action, for the replay file
        actions.append(int(player.act(obs)))
        return actions[-1]

    options = None if job.context is None else {"context": job.context}
    metrics, events = play_episode(env, recorded, job.seed, options)
    env.close()
    # What the agent simulated besides the episode (forked env steps, their seconds): 0 for
    # agents that only act.
    cost = player.episode_cost() if hasattr(player, "episode_cost") else {}
    row = {
        "agent": job.agent,
        "task": job.task.label,
        "base_task": job.task.base,
        "seed": job.seed,
        "checkpoint": job.checkpoint or "",
        **metrics,
        "cost_steps": int(cost.get("cost_steps", 0)),
        "cost_s": float(cost.get("cost_s", 0.0)),
    }
    tag = {"agent": job.agent, "task": job.task.label, "seed": job.seed}
    replay = records.record(
        agent=job.agent,
        task=job.task.label,
        base_task=job.task.base,
        overrides=job.task.overrides,
        # The weights in force (the task's own under the run's): what a replay must use.
        reward_weights=dataclasses.asdict(
            resolve_weights(env.unwrapped.task.reward_weights, job.reward_weights)
        ),
        contexts=job.contexts,
        context_index=metrics["context_index"],
        seed=job.seed,
        actions=actions,
        episode_return=metrics["return"],
        test_acc=metrics["test_acc"],
        threads=job.threads,
        numerics=numerics.current(),  # this process's: the one that played the episode
    )
    return {"row": row, "events": [{**tag, **e} for e in events], "replay": replay}


EXECUTORS = ("local", "ray")


def run_jobs(
    jobs: Sequence[Job],
    executor: str = "local",
    n_jobs: int = 1,
    progress: bool | Callable[[int, int, Mapping[str, Any]], None] = True,
) -> list[dict]:
    """Results of `run_job` for every job, in the order of `jobs`, played on `executor`;
    `progress(done, total, row)` after each (True: `print_progress`).

    "local": n_jobs > 1, a pool of spawned worker processes (spawn, not fork: torch and fork
    do not mix), each keeping its imports between jobs; 1, this process. Episodes are seeded,
    so the order in which they finish changes nothing. "ray": Ray tasks, one CPU each, on the
    embedded Ray (n_jobs CPUs) or the cluster joined (esper_gym.bench.ray_executor): the same
    results; a job whose process dies is retried once, then reported by seed (JobsFailed)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}; allowed: {', '.join(EXECUTORS)}")
    report = print_progress if progress is True else progress or None
    if executor == "ray":
        from esper_gym.bench.ray_executor import run_jobs_ray

        return run_jobs_ray(jobs, run_job, report, n_jobs if n_jobs > 1 else None)
    if n_jobs <= 1 or len(jobs) <= 1:
        results = []
        for i, job in enumerate(jobs):
            results.append(run_job(job))
            if report:
                report(i + 1, len(jobs), results[-1]["row"])
        return results
    out: list[dict | None] = [None] * len(jobs)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(n_jobs, len(jobs)), mp_context=ctx) as pool:
        futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            out[futures[future]] = future.result()
            if report:
                report(done, len(jobs), out[futures[future]]["row"])
    return out


def print_progress(done: int, total: int, row: Mapping[str, Any]) -> None:
    """One line per finished episode."""
    cost = f"  forked {row['cost_steps']} steps {row['cost_s']:.1f}s" if row["cost_steps"] else ""
    print(
        f"[{done}/{total}] {row['task']:<16} {row['agent']:<12} seed {row['seed']:<8} "
        f"test_acc {row['test_acc']:.4f}  +params {row['params_added']:<6} "
        f"return {row['return']:+.3f}  {row['wall_s']:.1f}s{cost}",
        flush=True,
    )


def episodes_frame(results: Sequence[Mapping[str, Any]]):
    """The tidy episodes table (a DataFrame): CSV_COLUMNS, then the reward components
    (sorted)."""
    import pandas as pd

    df = pd.DataFrame([r["row"] for r in results])
    rewards = sorted(c for c in df.columns if c.startswith("reward/"))
    return df[[*CSV_COLUMNS, *rewards]]
