"""The benchmark suite: agents x tasks x seeds -> a tidy CSV, an IQM table with CIs, figures.

```bash
python -m esper_gym.evaluate                                   # baselines, spirals + fashion_mnist, 5 seeds
python -m esper_gym.evaluate agents=[tamiyo,heuristic,random,noop] checkpoints.tamiyo=outputs/<run>
python -m esper_gym.evaluate tasks=[spirals] seeds=2 task_overrides.spirals.max_epochs=4
python -m esper_gym.evaluate tasks=[spirals,spirals_deep] ...  # a variant: another host graph
python -m esper_gym.evaluate 'tasks=[spirals]' contexts=test   # held-out contexts (esper_gym.contexts)
python -m esper_gym.evaluate 'agents=[schedule,lookahead,noop]' contexts=test oracle.family.counts=[1]
python -m esper_gym.evaluate -m reward.weights.param_cost=0,0.2,1  # writes result.json per job
```

What a run does (`evaluate(...)`, plain values in, nothing Hydra below `main`):
1. Builds one job per (agent, task, seed): seeds `first_seed + i`, the held-out seeds of
   `esper_gym.train`'s evaluation (disjoint from its training seeds), the same for every agent.
   An agent is a baseline name (`esper_gym.agents.baselines.make_agent` with
   `agent_kwargs.<name>`; `random` is seeded with the episode seed; `lookahead` is built with
   the env itself and forks it, in the worker that plays) or any name with a Tamiyo checkpoint
   in `checkpoints` (a `checkpoint.pt` or the train run dir holding it), acting greedily. A
   task is a registered task name or a `variants` entry (`{task: <registered>, <Task field>:
   value, ...}`, e.g. `spirals_deep`: spirals on a 3-hidden-layer host);
   `task_overrides.<name>.<field>` replaces Task fields.
   `contexts=train|test` makes every env draw a context of that split at each reset (from the
   episode seed: every agent meets the same contexts); null plays the fixed tasks.
2. Runs the jobs in a process pool of `n_jobs` spawned workers (1: in this process), each
   episode exactly reproducible from its seed: the numbers do not depend on `n_jobs`.
   With `contexts` and `oracle.enabled`, the same pool also plays the per-context oracle's
   selection episodes (every plan of the schedule family in every context a scored seed plays,
   on `oracle.selection_seeds` seeds that are never scored: `esper_gym.oracle`), then one
   `oracle` episode per (task, seed) with the plan chosen for its context.
3. Writes to `out_dir`: `episodes.csv` (one row per episode, columns `CSV_COLUMNS` then
   `reward/<component>` summed over the episode; `cost_steps`, `cost_s`: env steps the agent
   simulated on forks and their seconds, 0 for agents that only act), `events.jsonl` (every
   seed-lifecycle event of every episode, tagged with agent/task/seed), `replays.json` (env id,
   env kwargs, context, seed, actions, return and test accuracy of every episode: `python -m
   esper_gym.validate` replays them and checks the numbers), `summary.csv` (per task and agent: IQM and 95%
   stratified-bootstrap CI of each metric, and whether its interval overlaps the best agent's;
   `privileged`: an upper reference, not a competitor (the PRIVILEGED baselines such as
   lookahead, and the oracle; marked † in results.md); against the strongest non-privileged
   baseline of the task (`reference`): P(improvement) `p_improve[_lo,_hi]` and the paired
   per-seed difference `paired_diff`, `paired_lo`, `paired_hi` of the return; then the
   decision metrics of `decision_summary`; on the oracle's rows `value_of_reacting[_lo,_hi,_n]`:
   oracle - schedule, paired on common seeds), `results.md` (the Markdown tables, headed by the
   contexts played, then the cost of agents that simulate before acting and the value of
   reacting), `oracle_selection.csv` (every selection episode, the plan chosen per context),
   `pareto.png`, `performance_profiles.png`, `lifecycle.png` (one episode's seed timeline), `learning_curves.png` / `reward_sweep.png` when their inputs are given, and
   `result.json` (config, summary rows, file names: what a multirun sweep plot reads).
4. With `logger=wandb`, logs every episode, the IQMs, the table and the figures to W&B.

A checkpoint is only usable on a task whose spaces match those it was trained on (same
`max_nodes`, `seed_slots` and blueprint library; the host itself may differ: that is the
zero-shot transfer of experiments/transfer.py); a mismatch is refused before any episode runs.

Hydra is imported only inside `main`, so the plain functions here (and the pool's workers) do
not pay for it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from esper_gym import config_dir, numerics, plots, stats, validate
from esper_gym import oracle as oracle_lib
from esper_gym.episode import play_episode
from esper_gym.tasks import TASKS, Task, get_task

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
# Metrics of the summary table: per (task, agent), IQM and CI of each.
SUMMARY_METRICS = (
    "test_acc",
    "val_acc",
    "params_added",
    "return",
    "faults",
    "wall_s",
    "cost_steps",
)


# --------------------------------------------------------------------------- jobs


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
        fields = dict(common or {})
        if name in variants:
            variant = dict(variants[name])
            base = variant.pop("task", None)
            if base not in TASKS:
                raise ValueError(
                    f"variant {name!r}: task={base!r} is not a registered task; "
                    f"known: {', '.join(TASKS)}"
                )
            fields |= variant
        elif name in TASKS:
            base = name
        else:
            known = [*TASKS, *variants]
            raise ValueError(f"unknown task {name!r}; known: {', '.join(known)}")
        fields |= dict(overrides.get(name) or {})
        fields = {k: _tuples(v) for k, v in fields.items() if v is not None}
        spec = TaskSpec(name, base, fields)
        spec.build()
        specs.append(spec)
    return specs


def _tuples(value: Any) -> Any:
    """Lists from a config become tuples (Task fields such as blueprints, hidden are tuples)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


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


def make_jobs(
    agents: Sequence[str],
    tasks: Sequence[TaskSpec],
    seeds: int | Sequence[int],
    checkpoints: Mapping[str, str | None] | None = None,
    first_seed: int = 1_000_000,
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
    ckpts = {a: str(checkpoint_file(checkpoints[a])) for a in agents if a in checkpoints}
    shows = {}  # agent -> whether its checkpoint was trained seeing the context (env.show_context)
    contexts = job_kwargs.get("contexts")
    for agent, path in ckpts.items():  # refused here, before any episode of any job runs
        ckpt = load_checkpoint(path)
        shows[agent] = bool(ckpt.env.get("show_context")) if isinstance(ckpt.env, dict) else False
        if shows[agent] and contexts is None:
            raise ValueError(
                f"checkpoint {path} ({agent}) was trained with env.show_context (the context's "
                "factors in its observation): evaluate it on contexts, contexts=test (or train)"
            )
        for task in tasks:
            check_checkpoint(
                ckpt, path, make_env(task, contexts=contexts, show_context=shows[agent])
            )
    return [
        Job(agent, task, seed, ckpts.get(agent), show_context=shows.get(agent, False), **job_kwargs)
        for task in tasks
        for agent in agents
        for seed in seed_list
    ]


def checkpoint_file(path: str | os.PathLike) -> pathlib.Path:
    """A checkpoint file, or the `checkpoint.pt` in a train run dir."""
    p = pathlib.Path(path)
    if p.is_dir():
        if not (p / "checkpoint.pt").exists() and (p / "checkpoint.zip").exists():
            raise ValueError(
                f"{p} holds an SB3 model (checkpoint.zip, agent=sb3_ppo or maskable_ppo): "
                "checkpoints= takes Tamiyo checkpoints (checkpoint.pt, agent=tamiyo)"
            )
        p = p / "checkpoint.pt"
    if not p.is_file():
        raise FileNotFoundError(f"no Tamiyo checkpoint at {p}")
    return p  # the loader refuses an SB3 checkpoint.zip named directly, saying what it is


# ------------------------------------------------------------------------ episodes


def make_env(
    task: TaskSpec, reward_weights=None, kernel_dir=None, contexts=None, show_context=False
):
    """The env of a TaskSpec (MorphogeneticEnv; no TimeLimit: every task ends by its budget).
    `show_context` only adds the context's factors to the observation: the episode is the same."""
    from esper_gym.env import MorphogeneticEnv

    return MorphogeneticEnv(
        task=task.build(),
        reward_weights=dict(reward_weights or {}) or None,
        kernel_dir=kernel_dir,
        contexts=contexts,
        show_context=show_context,
    )


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
            f"checkpoint does not fit task {env.task.name!r}: (checkpoint, task) = {diff}; "
            "seed_slots and the blueprint library must match those it was trained with"
        )


def load_checkpoint(checkpoint: str | os.PathLike, env=None):
    """Tamiyo's checked loader; with `env` the policy's sizes must fit it before it is built."""
    from esper_gym.agents.tamiyo import load_checkpoint as load

    return load(checkpoint, env=env)


def load_policy(checkpoint: str | os.PathLike):
    return load_checkpoint(checkpoint).policy.eval()


def check_checkpoint(ckpt, path, env) -> None:
    """Refuse a checkpoint that cannot act on `env`: other sizes (`check_compatible`) or another
    blueprint library (its GERMINATE actions would pick other blueprints). The task may differ:
    that is zero-shot transfer."""
    from esper_gym.agents.tamiyo import check_env_record, env_record

    check_compatible(ckpt.policy, env)
    check_env_record(ckpt.env, env_record(env), path, same_task=False)


def make_actor(job: Job, env):
    """`act(obs, info) -> action` for the job's agent on `env`."""
    return make_player(job, env).act


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
        return ScheduleAgent(env.observation_space, env.action_space, job.plan, env.task.blueprints)
    kwargs = dict(job.agent_kwargs or {})
    if job.agent == "random":
        kwargs.setdefault("seed", job.seed)
    return make_agent(job.agent, env, **kwargs)


def run_job(job: Job) -> dict[str, Any]:
    """Play one job; returns {"row": CSV row, "events": [...]}. Runs in a pool worker."""
    numerics.apply()  # a worker of a portable run: oneDNN off (its variables came with it)
    if job.threads is not None:
        import torch

        torch.set_num_threads(job.threads)
    env = make_env(job.task, job.reward_weights, job.kernel_dir, job.contexts, job.show_context)
    player = make_player(job, env)
    actions: list[int] = []

    def recorded(obs, info=None) -> int:  # every action, for the replay file (validate.py)
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
    replay = validate.record(
        agent=job.agent,
        task=job.task.label,
        base_task=job.task.base,
        overrides=job.task.overrides,
        reward_weights=job.reward_weights,
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


def run_jobs(jobs: Sequence[Job], n_jobs: int = 1, progress: bool = True) -> list[dict]:
    """Results of `run_job` for every job, in the order of `jobs`.

    n_jobs > 1: a pool of spawned worker processes (spawn, not fork: torch and fork do not
    mix); each worker keeps its imports between jobs. Episodes are seeded, so the order in
    which they finish changes nothing."""
    if n_jobs <= 1 or len(jobs) <= 1:
        results = []
        for i, job in enumerate(jobs):
            results.append(run_job(job))
            if progress:
                _report(i + 1, len(jobs), results[-1]["row"])
        return results
    out: list[dict | None] = [None] * len(jobs)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(n_jobs, len(jobs)), mp_context=ctx) as pool:
        futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            out[futures[future]] = future.result()
            if progress:
                _report(done, len(jobs), out[futures[future]]["row"])
    return out


def _report(done: int, total: int, row: Mapping[str, Any]) -> None:
    if row["agent"] == oracle_lib.SELECT and done % 25 and done != total:
        return  # the oracle's selection episodes: hundreds, one line in 25
    cost = f"  forked {row['cost_steps']} steps {row['cost_s']:.1f}s" if row["cost_steps"] else ""
    print(
        f"[{done}/{total}] {row['task']:<16} {row['agent']:<12} seed {row['seed']:<8} "
        f"test_acc {row['test_acc']:.4f}  +params {row['params_added']:<6} "
        f"return {row['return']:+.3f}  {row['wall_s']:.1f}s{cost}",
        flush=True,
    )


def episodes_frame(results: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The tidy episodes table: CSV_COLUMNS, then the reward components (sorted)."""
    df = pd.DataFrame([r["row"] for r in results])
    rewards = sorted(c for c in df.columns if c.startswith("reward/"))
    return df[[*CSV_COLUMNS, *rewards]]


# ---------------------------------------------------------------------------- run


@dataclass
class EvalResult:
    episodes: pd.DataFrame
    summary: pd.DataFrame
    table: str
    files: dict[str, str]


def evaluate(
    agents: Sequence[str],
    tasks: Sequence[TaskSpec],
    seeds: int | Sequence[int],
    out_dir: str | os.PathLike,
    *,
    checkpoints: Mapping[str, str | None] | None = None,
    first_seed: int = 1_000_000,
    n_jobs: int = 1,
    reward_weights: Mapping[str, float] | None = None,
    kernel_dir: str | None = None,
    greedy: bool = False,
    threads: int | None = 1,
    contexts: str | None = None,
    reps: int = 2000,
    confidence: float = 0.95,
    bootstrap_seed: int = 0,
    rank_by: str = "test_acc",
    make_plots: bool = True,
    timeline: Mapping[str, Any] | None = None,
    learning_curves: str | None = None,
    sweep_dir: str | None = None,
    sweep_param: str = "reward.weights.param_cost",
    logger=None,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    agent_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    oracle: oracle_lib.OracleConfig | Mapping[str, Any] | None = None,
) -> EvalResult:
    """Run every (agent, task, seed) episode and write the tables and figures to `out_dir`
    (see the module docstring). `timeline` picks the episode of `lifecycle.png`
    ({agent, task, seed}; default: the first agent that is not noop, first task, first seed).
    `logger` (a RunLogger, already started) gets the episodes, IQMs, table and figures.
    `contexts` ("train", "test" or None) is the context split every episode draws from.
    `agent_kwargs[name]`: settings of baseline `name` (make_agent kwargs, e.g. lookahead's
    `horizon`). `oracle` (an `esper_gym.oracle.OracleConfig` or its fields; needs `contexts`):
    adds the per-context oracle's episodes (agent `oracle`), `oracle_selection.csv`, and per
    task `value_of_reacting` (oracle - schedule, paired) on the oracle's summary rows."""
    if contexts is not None:
        from esper_gym.contexts import check_split, context_space

        check_split(contexts)
        for task in tasks:  # a task without a context distribution fails before any episode
            context_space(task.build())
    oracle_cfg = None if oracle is None else oracle_lib.OracleConfig.from_mapping(oracle)
    if oracle_cfg is not None and (not oracle_cfg.enabled or contexts is None):
        oracle_cfg = None  # the fixed tasks have one context each: nothing to react to
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        reward_weights=dict(reward_weights or {}) or None,
        kernel_dir=kernel_dir,
        greedy=greedy,
        threads=threads,
        contexts=contexts,
    )
    jobs = make_jobs(agents, tasks, seeds, checkpoints, first_seed, **common)
    jobs = with_agent_kwargs(jobs, agent_kwargs)
    selection = oracle_selection_jobs(oracle_cfg, tasks, jobs, common) if oracle_cfg else []
    done = run_jobs([*jobs, *(job for job, _ in selection)], n_jobs, progress)
    results = done[: len(jobs)]
    files = {"episodes": "episodes.csv", "events": "events.jsonl", "replays": validate.FILE_NAME}
    oracle_info: dict[str, Any] = {}
    if oracle_cfg:
        picks, chosen = oracle_choices(selection, done[len(jobs) :])
        chosen.to_csv(out / "oracle_selection.csv", index=False)
        files["oracle_selection"] = "oracle_selection.csv"
        scoring = oracle_scoring_jobs(tasks, jobs, picks, common)
        scored = run_jobs([job for job, _ in scoring], n_jobs, progress)
        for (_, expected), r in zip(scoring, scored):
            if r["row"]["context_index"] != expected:  # context_index() must follow env.reset
                raise RuntimeError(
                    f"oracle: seed {r['row']['seed']} played context {r['row']['context_index']}"
                    f", its plan was chosen for context {expected}"
                )
        results += scored
        oracle_info = {
            "selection_seeds": oracle_cfg.selection_seed_list([j.seed for j in jobs]),
            "plans": {t.label: len(oracle_cfg.plans(t.base)) for t in tasks},
            "contexts": {t.label: len({c for (lbl, c) in picks if lbl == t.label}) for t in tasks},
        }
    episodes = episodes_frame(results)
    episodes.to_csv(out / files["episodes"], index=False)
    validate.write(out / files["replays"], [r["replay"] for r in results])
    with open(out / files["events"], "w") as f:
        for r in results:
            for e in r["events"]:
                f.write(json.dumps(e) + "\n")

    summary = stats.summarize(
        episodes,
        SUMMARY_METRICS,
        rank_by,
        reps,
        confidence,
        bootstrap_seed,
        baselines=comparison_baselines(agents),
        privileged=privileged_agents(episodes["agent"].unique()),
    )
    decisions = decision_summary(episodes)
    summary = summary.merge(decisions, on=["task", "agent"], how="left")
    summary.insert(2, "contexts", contexts or "fixed")
    privileged = privileged_agents(summary["agent"])
    summary.insert(3, "privileged", summary["agent"].isin(privileged))
    if oracle_cfg:
        reacting = oracle_lib.value_of_reacting(episodes, reps, confidence, bootstrap_seed)
        summary = summary.merge(reacting, on=["task", "agent"], how="left")
        shares = oracle_lib.oracle_gap_share(episodes)
        summary = summary.merge(shares, on=["task", "agent"], how="left")
    table = (
        f"Contexts: {CONTEXT_LABEL[contexts]}\n\n"
        + stats.markdown_table(
            summary, rank_by=rank_by, confidence=confidence, privileged=privileged
        )
        + "\n"
        + decision_table(decisions)
        + cost_lines(episodes)
        + (reacting_lines(summary, oracle_info, confidence) if oracle_cfg else "")
    )
    summary.to_csv(out / "summary.csv", index=False)
    (out / "results.md").write_text(table)
    files |= {"summary": "summary.csv", "table": "results.md"}

    figures: dict[str, pathlib.Path] = {}
    if make_plots:
        figures["pareto"] = plots.pareto(episodes, out / "pareto.png", reps=reps)
        figures["profiles"] = plots.performance_profiles(
            episodes, out / "performance_profiles.png", reps=reps
        )
        pick = pick_timeline(episodes, timeline)
        if pick is not None:
            figures["lifecycle"] = timeline_figure(results, pick, out / "lifecycle.png")
        if learning_curves:
            figures["learning_curves"] = plots.learning_curves(
                learning_curves, out / "learning_curves.png"
            )
        if sweep_dir:
            sweep = plots.load_sweep(sweep_dir, sweep_param)
            figures["reward_sweep"] = plots.reward_sweep(
                sweep, sweep_param, out / "reward_sweep.png"
            )
    files |= {name: p.name for name, p in figures.items()}

    result = {
        "config": dict(config or {}),
        "oracle": oracle_info,
        "files": files,
        "episodes_csv": files["episodes"],
        "summary": json.loads(summary.to_json(orient="records")),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    if logger is not None:
        for row in episodes.to_dict("records"):
            logger.log_episode(row, prefix=f"eval/{row['task']}/{row['agent']}")
        logger.summary(
            {
                f"{r['task']}/{r['agent']}/{m}_iqm": r[f"{m}_iqm"]
                for r in summary.to_dict("records")
                for m in SUMMARY_METRICS
            }
            | {
                f"{r['task']}/{r['agent']}/{m}": r[m]
                for r in decisions.to_dict("records")
                for m in DECISION_METRICS
            }
        )
        plots.log_figures(logger, figures, tables={"summary": summary, "episodes": episodes})
    print(table)
    return EvalResult(episodes, summary, table, files)


def with_agent_kwargs(
    jobs: Sequence[Job], agent_kwargs: Mapping[str, Mapping[str, Any]] | None
) -> list[Job]:
    """`jobs` with each agent's `agent_kwargs[name]`: a baseline's make_agent kwargs, or a
    checkpointed policy's actor settings (CHECKPOINT_KWARGS: the uncertainty gate). A name
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
                f"allowed: {', '.join(CHECKPOINT_KWARGS)}"
            )
    return [
        dataclasses.replace(j, agent_kwargs=kwargs[j.agent]) if j.agent in kwargs else j
        for j in jobs
    ]


# A checkpointed policy's settings in agent_kwargs: TamiyoPolicy.actor's uncertainty gate.
CHECKPOINT_KWARGS = ("gate", "gate_samples", "gate_kinds")


def oracle_selection_jobs(
    cfg: oracle_lib.OracleConfig,
    tasks: Sequence[TaskSpec],
    jobs: Sequence[Job],
    common: Mapping[str, Any],
) -> list[tuple[Job, tuple[str, int, int]]]:
    """The oracle's selection episodes, each with its (task label, context, plan index): every
    plan of the family, on every selection seed, in every context a scored seed of the task
    plays (`oracle_lib.context_index`). Selection seeds never meet scored seeds."""
    scored = sorted({j.seed for j in jobs})
    sel_seeds = cfg.selection_seed_list(scored)
    out = []
    for task in tasks:
        plans = cfg.plans(task.base)
        built = task.build()
        played = {oracle_lib.context_index(built, common["contexts"], s) for s in scored}
        for c in sorted(played):
            for i, plan in enumerate(plans):
                for s in sel_seeds:
                    job = Job(oracle_lib.SELECT, task, s, plan=plan, context=c, **common)
                    out.append((job, (task.label, c, i)))
    return out


def oracle_choices(
    selection: Sequence[tuple[Job, tuple[str, int, int]]], results: Sequence[Mapping]
) -> tuple[dict[tuple[str, int], tuple], pd.DataFrame]:
    """The plan picked per (task label, context) from the selection episodes
    (`oracle_lib.pick`), and every selection episode as a table (task, context_index, plan_id,
    plan, seed, return, mean_return of the plan in that context, chosen)."""
    returns: dict[tuple[str, int], dict[int, list[float]]] = {}
    plans: dict[tuple[str, int], dict[int, tuple]] = {}
    rows = []
    for (job, (label, c, i)), r in zip(selection, results):
        returns.setdefault((label, c), {}).setdefault(i, []).append(float(r["row"]["return"]))
        plans.setdefault((label, c), {})[i] = job.plan
        rows.append(
            {
                "task": label,
                "context_index": c,
                "plan_id": i,
                "plan": oracle_lib.describe(job.plan),
                "seed": job.seed,
                "return": float(r["row"]["return"]),
            }
        )
    picks, best = {}, {}
    for key, by_plan in returns.items():
        family = [plans[key][i] for i in sorted(plans[key])]
        best[key] = oracle_lib.pick(by_plan, family)
        picks[key] = plans[key][best[key]]
    table = pd.DataFrame(rows)
    if not table.empty:
        keys = list(zip(table["task"], table["context_index"]))
        table["mean_return"] = [np.mean(returns[k][i]) for k, i in zip(keys, table["plan_id"])]
        table["chosen"] = [best[k] == i for k, i in zip(keys, table["plan_id"])]
    return picks, table


def oracle_scoring_jobs(
    tasks: Sequence[TaskSpec],
    jobs: Sequence[Job],
    picks: Mapping[tuple[str, int], tuple],
    common: Mapping[str, Any],
) -> list[tuple[Job, int]]:
    """One `oracle` episode per (task, scored seed): the plan picked for the seed's context,
    played from the seed as every agent's episode is (no context option: the seed draws it)."""
    out = []
    for task in tasks:
        built = task.build()
        for s in sorted({j.seed for j in jobs if j.task == task}):
            c = oracle_lib.context_index(built, common["contexts"], s)
            out.append((Job(oracle_lib.ORACLE, task, s, plan=picks[(task.label, c)], **common), c))
    return out


def privileged_agents(names) -> list[str]:
    """The agents of `names` that are upper references, not competitors: the privileged
    baselines (they fork the run) and the per-context oracle (it knows the context)."""
    from esper_gym.agents.baselines import PRIVILEGED

    return [a for a in dict.fromkeys(names) if a in PRIVILEGED or a == oracle_lib.ORACLE]


def cost_lines(episodes: pd.DataFrame) -> str:
    """Per (task, agent) that simulated beyond its episode (lookahead): the mean forked env
    steps, rollout seconds and wall seconds per episode, as Markdown lines ("" if none)."""
    spent = episodes[episodes["cost_steps"] > 0]
    if spent.empty:
        return ""
    lines = ["", "Cost per episode (mean over episodes), agents that simulate before acting:"]
    for (task, agent), g in spent.groupby(["task", "agent"], sort=False):
        lines.append(
            f"- {agent} on {task}: {g['cost_steps'].mean():,.0f} forked env steps, "
            f"{g['cost_s'].mean():.1f} s of rollouts, {g['wall_s'].mean():.1f} s wall"
        )
    return "\n".join(lines) + "\n"


def reacting_lines(summary: pd.DataFrame, info: Mapping[str, Any], confidence: float) -> str:
    """The value of reacting per task (the oracle's summary rows), as Markdown lines."""
    pct = round(confidence * 100)
    seeds = info.get("selection_seeds", [])
    lines = [
        "",
        f"Value of reacting: oracle - schedule, return, mean per-seed difference on common "
        f"seeds [{pct}% paired bootstrap CI]. The oracle plays, per context, the plan of the "
        f"schedule family with the best mean return on {len(seeds)} selection seed(s) "
        f"({', '.join(map(str, seeds))}) that are never scored; it knows the context, so it is "
        "a reference (†), not a competitor.",
    ]
    rows = summary[summary["agent"] == oracle_lib.ORACLE]
    for r in rows.to_dict("records"):
        plans = info.get("plans", {}).get(r["task"])
        n_ctx = info.get("contexts", {}).get(r["task"])
        where = f" ({plans} plans x {n_ctx} contexts)" if plans else ""
        if pd.isna(r.get("value_of_reacting", float("nan"))):
            lines.append(f"- {r['task']}: n/a (no `schedule` episodes to pair with){where}")
            continue
        lines.append(
            f"- {r['task']}: {r['value_of_reacting']:+.3f} [{r['value_of_reacting_lo']:+.3f}, "
            f"{r['value_of_reacting_hi']:+.3f}] over {int(r['value_of_reacting_n'])} seeds{where}"
        )
    if "oracle_gap_share" in summary:
        shares = summary.dropna(subset=["oracle_gap_share"])
        shares = shares[shares["task"] != stats.ALL_TASKS]
        if len(shares):
            lines.append(
                "\nShare of the oracle's advantage over schedule recovered, (agent - schedule) / "
                "(oracle - schedule), mean per-seed differences on common seeds:"
            )
            for task, group in shares.groupby("task", sort=False):
                cells = ", ".join(
                    f"{a} {v:+.2f}" for a, v in zip(group.agent, group.oracle_gap_share)
                )
                lines.append(f"- {task}: {cells}")
    return "\n".join(lines) + "\n"


def comparison_baselines(agents: Sequence[str]) -> list[str]:
    """The agents that may be the reference of the P(improvement) and paired columns: the
    non-privileged baselines (esper_gym.agents.baselines), never a checkpoint or a privileged
    agent (one that sees the future is an upper reference, not a bar to beat)."""
    from esper_gym.agents.baselines import AGENTS, PRIVILEGED

    return [a for a in agents if a in AGENTS and a not in PRIVILEGED]


CONTEXT_LABEL = {
    None: "fixed (each task as registered; only the seed changes)",
    "train": "train (contexts drawn from each task's train split, esper_gym.contexts)",
    "test": "test (held-out contexts: combinations never in the train split, esper_gym.contexts)",
}
# Per (task, agent), from the germinations of all its episodes (esper_gym.episode).
DECISION_METRICS = (
    "germinations",
    "decision_quality",
    "false_positive_rate",
    "first_useful_progress",
    "useful_episodes",
    "distinct_contexts",
    "distinct_plans",
    "plan_entropy",
)


def decision_summary(episodes: pd.DataFrame) -> pd.DataFrame:
    """Decision quality per (task, agent), pooled over its episodes:

    - `germinations`: GERMINATE actions executed, all episodes;
    - `decision_quality`: share of them whose seed ended FOSSILIZED with a positive measured
      contribution (the seeds' target: > 80%); NaN without germinations;
    - `false_positive_rate`: share that cost parameters and were culled or ended contributing
      <= 0 (target: < 5%);
    - `first_useful_progress`: median training progress (0..1) at which the episode's first
      useful seed was germinated, over the episodes that had one; `useful_episodes`: their share;
    - reactivity: `distinct_contexts` played, `distinct_plans` (distinct (step, layer,
      blueprint) germination sequences) and `plan_entropy` (Shannon entropy of the plans, in
      bits; 0 when every episode grew the same way, log2(episodes) when no two agreed). An
      open-loop schedule has one plan whatever the context.
    """
    rows = []
    for (task, agent), g in episodes.groupby(["task", "agent"], sort=False):
        n_germ = int(g["germinations"].sum())
        first = g["first_useful_progress"].dropna()
        counts = g["plan"].fillna("").value_counts().to_numpy(dtype=float)
        p = counts / counts.sum()
        rows.append(
            {
                "task": task,
                "agent": agent,
                "germinations": n_germ,
                "decision_quality": g["useful_seeds"].sum() / n_germ if n_germ else float("nan"),
                "false_positive_rate": (
                    g["false_positives"].sum() / n_germ if n_germ else float("nan")
                ),
                "first_useful_progress": float(first.median()) if len(first) else float("nan"),
                "useful_episodes": len(first) / len(g),
                "distinct_contexts": int(g["context_index"].nunique()),
                "distinct_plans": len(counts),
                "plan_entropy": float(-(p * np.log2(p)).sum()) + 0.0,
            }
        )
    return pd.DataFrame(rows, columns=["task", "agent", *DECISION_METRICS])


def decision_table(decisions: pd.DataFrame) -> str:
    """`decision_summary` as Markdown."""

    def pct(v: float) -> str:
        return "n/a" if pd.isna(v) else f"{100 * v:.0f}%"

    lines = [
        "| task | agent | germinations | decision quality | false positives | first useful "
        "growth (progress) | episodes with useful growth | contexts | distinct plans | plan "
        "entropy (bits) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in decisions.to_dict("records"):
        first = (
            "n/a" if pd.isna(r["first_useful_progress"]) else f"{r['first_useful_progress']:.2f}"
        )
        lines.append(
            f"| {r['task']} | {r['agent']} | {r['germinations']} | {pct(r['decision_quality'])} "
            f"| {pct(r['false_positive_rate'])} | {first} | {pct(r['useful_episodes'])} "
            f"| {r['distinct_contexts']} | {r['distinct_plans']} | {r['plan_entropy']:.2f} |"
        )
    lines += [
        "",
        "Decision quality: share of germinations whose seed ended FOSSILIZED with a positive "
        "measured contribution (target > 80%). False positives: share that cost parameters and "
        "were culled or ended contributing <= 0 (target < 5%). First useful growth: median "
        "training progress at which an episode's first useful seed was germinated. Plans: "
        "(step, layer, blueprint) germination sequences; distinct plans and their entropy "
        "across episodes (contexts) measure reactivity.",
    ]
    return "\n".join(lines) + "\n"


def pick_timeline(
    episodes: pd.DataFrame, choice: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The (agent, task, seed) of the lifecycle figure: `choice`'s set entries, the rest from
    the first episode of an agent that is not noop (None if there is no such episode)."""
    choice = {k: v for k, v in (choice or {}).items() if v is not None}
    candidates = episodes
    for key in ("agent", "task", "seed"):
        if key in choice:
            candidates = candidates[candidates[key] == choice[key]]
    if "agent" not in choice:
        growing = candidates[candidates["agent"] != "noop"]
        candidates = growing if not growing.empty else candidates
    if candidates.empty:
        return None
    first = candidates.iloc[0]
    return {"agent": first["agent"], "task": first["task"], "seed": int(first["seed"])}


def timeline_figure(results: Sequence[Mapping], pick: Mapping[str, Any], path) -> pathlib.Path:
    """The lifecycle timeline of the episode `pick` among `results` (from `run_jobs`)."""
    for r in results:
        row = r["row"]
        if (row["agent"], row["task"], int(row["seed"])) == (
            pick["agent"],
            pick["task"],
            int(pick["seed"]),
        ):
            events = [
                {k: e[k] for k in e if k not in ("agent", "task", "seed")} for e in r["events"]
            ]
            return plots.lifecycle_timeline(
                events,
                path,
                total_steps=int(row["budget_steps"]),
                decision_interval=int(row["decision_interval"]),
                slots=episode_slots(row),
                title=f"Seed lifecycle: {row['agent']} on {row['task']}, seed {row['seed']}",
            )
    raise KeyError(f"no episode {dict(pick)}")


def episode_slots(row: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Every (layer, slot) of an episode's host, from its CSV row."""
    return [
        (name, s) for name in str(row["layers"]).split(";") for s in range(int(row["seed_slots"]))
    ]


def load_events(path: str | os.PathLike, agent: str, task: str, seed: int) -> list[dict]:
    """The events of one episode from an `events.jsonl` written by `evaluate`."""
    out = []
    with open(path) as f:
        for line in f:
            e = json.loads(line)
            if (e["agent"], e["task"], int(e["seed"])) == (agent, task, int(seed)):
                out.append({k: v for k, v in e.items() if k not in ("agent", "task", "seed")})
    return out


# --------------------------------------------------------------------------- Hydra


def _schemas():
    """The structured config of conf/evaluate.yaml (registered as `evaluate_schema`).

    `task_overrides` has one node per registered task with every Task field (None: keep), so
    `task_overrides.spirals.max_epochs=4` needs no `+` and a typo in a field name fails while
    Hydra composes; `variants` entries have the same fields plus `task` (the registered base).
    """
    # make_dataclass, not class statements: this module has `from __future__ import
    # annotations`, and OmegaConf cannot resolve string annotations of function-local classes.
    from typing import Any as AnyT
    from typing import Dict, List, Optional  # noqa: UP035 (OmegaConf reads typing generics)

    from omegaconf import MISSING

    from esper_gym.train import _mirror

    def conf(name: str, *items) -> type:
        return dataclasses.make_dataclass(name, [(n, t, field(default=d)) for n, t, d in items])

    def sub(cls: type):
        return field(default_factory=cls)

    fields_conf = _mirror(Task, "TaskFieldsConf", head=[], exclude=("name",), all_optional=True)
    variant_conf = _mirror(
        Task,
        "TaskVariantConf",
        head=[("task", str, field(default=MISSING))],
        exclude=("name",),
        all_optional=True,
    )
    overrides_conf = dataclasses.make_dataclass(
        "TaskOverridesConf", [(name, fields_conf, sub(fields_conf)) for name in TASKS]
    )
    bootstrap_conf = conf(
        "BootstrapConf", ("reps", int, 2000), ("confidence", float, 0.95), ("seed", int, 0)
    )
    timeline_conf = conf(
        "TimelineConf",
        ("agent", Optional[str], None),  # noqa: UP045
        ("task", Optional[str], None),  # noqa: UP045
        ("seed", Optional[int], None),  # noqa: UP045
    )
    family_conf = conf(
        "OracleFamilyConf",
        ("counts", Optional[List[int]], None),  # noqa: UP006, UP045
        ("starts", Optional[List[float]], None),  # noqa: UP006, UP045
        ("gaps", Optional[List[float]], None),  # noqa: UP006, UP045
        ("blueprints", Optional[List[str]], None),  # noqa: UP006, UP045
        ("layers", Optional[List[str]], None),  # noqa: UP006, UP045
    )
    oracle_conf = dataclasses.make_dataclass(
        "OracleConf",
        [
            ("enabled", bool, field(default=True)),
            ("selection_seeds", int, field(default=2)),
            ("selection_first_seed", int, field(default=2_000_000)),
            ("family", family_conf, sub(family_conf)),
        ],
    )
    plots_conf = dataclasses.make_dataclass(
        "PlotsConf",
        [
            ("enabled", bool, field(default=True)),
            ("timeline", timeline_conf, sub(timeline_conf)),
            ("learning_curves", Optional[str], field(default=None)),  # noqa: UP045
            ("sweep_dir", Optional[str], field(default=None)),  # noqa: UP045
            ("sweep_param", str, field(default="reward.weights.param_cost")),
        ],
    )
    return dataclasses.make_dataclass(
        "EvaluateConf",
        [
            ("agents", List[str], field(default_factory=lambda: ["heuristic", "random", "noop"])),  # noqa: UP006
            ("tasks", List[str], field(default_factory=lambda: ["spirals", "fashion_mnist"])),  # noqa: UP006
            ("seeds", int, field(default=5)),
            ("first_seed", int, field(default=1_000_000)),
            ("n_jobs", int, field(default=2)),
            ("threads", Optional[int], field(default=1)),  # noqa: UP045
            ("numerics", str, field(default="portable")),
            ("greedy", bool, field(default=False)),
            ("contexts", Optional[str], field(default=None)),  # noqa: UP045
            ("checkpoints", Dict[str, Optional[str]], field(default_factory=dict)),  # noqa: UP006, UP045
            ("agent_kwargs", Dict[str, Dict[str, AnyT]], field(default_factory=dict)),  # noqa: UP006
            ("oracle", oracle_conf, sub(oracle_conf)),
            ("task_overrides", overrides_conf, sub(overrides_conf)),
            ("variants", Dict[str, variant_conf], field(default_factory=dict)),  # noqa: UP006
            ("out_dir", Optional[str], field(default=None)),  # noqa: UP045
            ("rank_by", str, field(default="test_acc")),
            ("bootstrap", bootstrap_conf, sub(bootstrap_conf)),
            ("plots", plots_conf, sub(plots_conf)),
            *((group, AnyT, field(default=MISSING)) for group in GROUPS),
        ],
    )


GROUPS = ("env", "reward", "blueprints", "logger")  # the groups shared with esper_gym.train


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    from esper_gym.train import register_configs as register_groups

    register_groups()  # the group schemas (env/, reward/, blueprints/, logger/)
    ConfigStore.instance().store(name="evaluate_schema", node=_schemas())


def run_from_config(cfg, run_dir: str | os.PathLike) -> EvalResult:
    """`python -m esper_gym.evaluate`: the composed config -> `evaluate(...)`."""
    from omegaconf import OmegaConf

    from esper_gym.logger import make_logger
    from esper_gym.train import build_reward_weights

    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    common = {"device": cfg.env.device}
    specs = resolve_tasks(plain["tasks"], plain["variants"], plain["task_overrides"], common)
    if cfg.blueprints.names is not None or cfg.blueprints.add:
        # blueprints/ sets the library of every task (null names: each task's own, plus `add`).
        specs = [_with_library(s, cfg.blueprints.names, list(cfg.blueprints.add)) for s in specs]
    weights = dataclasses.asdict(build_reward_weights(cfg))
    out_dir = cfg.out_dir or run_dir
    log = cfg.logger
    logger = None
    if log.kind != "none":
        logger = make_logger(log.kind, progress=log.progress).init(
            plain,
            project=log.project,
            group=log.group,
            name=log.name,
            mode=log.mode,
            dir=log.dir or str(out_dir),
            entity=log.entity,
            tags=list(log.tags),
        )
    try:
        return evaluate(
            plain["agents"],
            specs,
            cfg.seeds,
            out_dir,
            checkpoints=plain["checkpoints"],
            first_seed=cfg.first_seed,
            n_jobs=cfg.n_jobs,
            reward_weights=weights,
            kernel_dir=cfg.env.kernel_dir,
            greedy=cfg.greedy,
            threads=cfg.threads,
            contexts=cfg.contexts,
            reps=cfg.bootstrap.reps,
            confidence=cfg.bootstrap.confidence,
            bootstrap_seed=cfg.bootstrap.seed,
            rank_by=cfg.rank_by,
            make_plots=cfg.plots.enabled,
            timeline=plain["plots"]["timeline"],
            learning_curves=cfg.plots.learning_curves,
            sweep_dir=cfg.plots.sweep_dir,
            sweep_param=cfg.plots.sweep_param,
            logger=logger,
            config=plain,
            agent_kwargs=plain["agent_kwargs"],
            oracle=plain["oracle"],
        )
    finally:
        if logger is not None:
            logger.finish()


def _with_library(spec: TaskSpec, names, add) -> TaskSpec:
    """`spec` with the blueprint library `names` (None: its own) plus `add`."""
    base = list(names) if names is not None else list(spec.build().blueprints)
    library = tuple(dict.fromkeys([*base, *add]))
    return dataclasses.replace(spec, overrides={**spec.overrides, "blueprints": library})


def main() -> None:
    """Hydra entry point (conf/evaluate.yaml, `esper_gym.config_dir()`); see the module
    docstring."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    register_configs()

    @hydra.main(config_path=str(config_dir()), config_name="evaluate", version_base="1.3")
    def _main(cfg) -> float:
        # Re-executes the command in that mode if it is not (before any episode: the variables
        # must be set before torch loads MKL); workers inherit it.
        numerics.ensure(cfg.numerics)
        result = run_from_config(cfg, HydraConfig.get().runtime.output_dir)
        # The objective a sweeper optimises: the first agent's IQM return over all its episodes.
        first = result.episodes[result.episodes["agent"] == result.episodes["agent"].iloc[0]]
        return float(stats.iqm(first["return"].to_numpy(dtype=float)))

    _main()


if __name__ == "__main__":
    main()


__all__ = [
    "CSV_COLUMNS",
    "EvalResult",
    "Job",
    "TaskSpec",
    "evaluate",
    "load_events",
    "make_jobs",
    "play_episode",
    "resolve_tasks",
    "run_job",
    "run_jobs",
]
