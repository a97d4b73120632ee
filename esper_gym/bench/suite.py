"""The benchmark suite: agents x tasks x seeds -> a tidy CSV, an IQM table with CIs, figures.

`evaluate(EvalConfig(...))` (plain values; `python -m esper_gym.evaluate` builds the EvalConfig
from conf/evaluate.yaml with `esper_gym.config.build_evaluate`):
1. Builds one job per (agent, task, seed) (`esper_gym.bench.jobs`): seeds `first_seed + i`, the
   held-out seeds of `esper_gym.train`'s evaluation (EVAL_SEED, disjoint from its training
   seeds), the same for every agent. An agent is a baseline name
   (`esper_gym.agents.baselines.make_agent` with `agent_kwargs[name]`; `random` is seeded with
   the episode seed; `lookahead` is built with the env itself and forks it, in the worker that
   plays) or any name with a Tamiyo checkpoint in `checkpoints` (a `checkpoint.pt` or the train
   run dir holding it). A task is a TaskSpec (`resolve_tasks`: a registered task name or a
   variant with Task fields replaced). `contexts=train|test` makes every env draw a context of
   that split at each reset (from the episode seed: every agent meets the same contexts); None
   plays the fixed tasks.
2. Runs the jobs on `executor` ("local": a process pool of `n_jobs` spawned workers; 1: in this
   process), each episode exactly reproducible from its seed: the numbers do not depend on
   `n_jobs`. With `contexts` and `oracle.enabled`, the same pool also plays the per-context
   oracle's selection episodes (every plan of the schedule family in every context a scored
   seed plays, on `oracle.selection_seeds` seeds that are never scored:
   `esper_gym.bench.oracle`), then one `oracle` episode per (task, seed) with the plan chosen
   for its context.
3. Writes to `out_dir` (refused if it holds files tracked by git: committed results are never
   overwritten): `episodes.csv` (one row per episode, columns `CSV_COLUMNS` then
   `reward/<component>` summed over the episode; `cost_steps`, `cost_s`: env steps the agent
   simulated on forks and their seconds, 0 for agents that only act), `events.jsonl` (every
   seed-lifecycle event of every episode, tagged with agent/task/seed), `replays.json` (env id,
   env kwargs, context, seed, actions, return and test accuracy of every episode: `python -m
   esper_gym.validate` replays them and checks the numbers), `summary.csv` (per task and agent:
   IQM and 95% stratified-bootstrap CI of each metric, and whether its interval overlaps the
   best agent's; `privileged`: an upper reference, not a competitor (the PRIVILEGED baselines
   such as lookahead, and the oracle; marked † in results.md); against the strongest
   non-privileged baseline of the task (`reference`): P(improvement) `p_improve[_lo,_hi]` and
   the paired per-seed difference `paired_diff`, `paired_lo`, `paired_hi` of the return; then
   the decision metrics of `decision_summary`; on the oracle's rows
   `value_of_reacting[_lo,_hi,_n]`: oracle - schedule, paired on common seeds), `results.md`
   (the Markdown tables, headed by the contexts played, then the cost of agents that simulate
   before acting and the value of reacting), `oracle_selection.csv` (every selection episode,
   the plan chosen per context), `pareto.png`, `performance_profiles.png`, `lifecycle.png` (one
   episode's seed timeline), `learning_curves.png` / `reward_sweep.png` when their inputs are
   given, and `result.json` (config, summary rows, file names: what a multirun sweep plot
   reads).
4. With a logger (a started RunLogger), logs every episode, the IQMs, the table and figures.

A checkpoint is only usable on a task whose spaces match those it was trained on (same
`max_nodes`, `seed_slots` and blueprint library; the host itself may differ: that is the
zero-shot transfer of experiments/transfer.py); a mismatch is refused before any episode runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from esper_gym.bench import jobs as jobs_lib
from esper_gym.bench import oracle as oracle_lib
from esper_gym.bench import plots, records, report, stats
from esper_gym.bench.jobs import EVAL_SEED, TaskSpec
from esper_gym.bench.report import DECISION_METRICS, SUMMARY_METRICS


@dataclass
class EvalConfig:
    """What `evaluate` runs (see the module docstring); conf/evaluate.yaml's keys, resolved."""

    agents: Sequence[str]
    tasks: Sequence[TaskSpec]
    seeds: int | Sequence[int]  # a count (seeds first_seed + i) or the list of episode seeds
    out_dir: str | os.PathLike
    checkpoints: Mapping[str, str | None] = field(default_factory=dict)
    first_seed: int = EVAL_SEED
    executor: str = "local"
    n_jobs: int = 1
    reward_weights: Mapping[str, float] | None = None
    kernel_dir: str | None = None
    greedy: bool = False  # checkpointed policies sample, seeded by the episode seed; True: argmax
    threads: int | None = 1
    contexts: str | None = None  # "train" | "test": every episode draws a context of that split
    agent_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    oracle: oracle_lib.OracleConfig | Mapping[str, Any] | None = None  # needs `contexts`
    rank_by: str = "test_acc"
    reps: int = 2000  # bootstrap
    confidence: float = 0.95
    bootstrap_seed: int = 0
    make_plots: bool = True
    timeline: Mapping[str, Any] | None = None  # lifecycle.png's {agent, task, seed}
    learning_curves: str | None = None
    sweep_dir: str | None = None
    sweep_param: str = "reward.weights.param_cost"
    config: Mapping[str, Any] = field(default_factory=dict)  # recorded in result.json
    progress: bool = True


@dataclass
class EvalResult:
    episodes: pd.DataFrame
    summary: pd.DataFrame
    table: str
    files: dict[str, str]


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """ValueError if `out_dir` holds files tracked by git (committed results are never
    overwritten); no check outside a git checkout."""
    path = pathlib.Path(out_dir)
    if not path.is_dir():
        return
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--", "."], cwd=path, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return  # no git here
    if tracked.returncode == 0 and tracked.stdout.strip():
        first = tracked.stdout.split("\n")[0]
        raise ValueError(
            f"out_dir={str(out_dir)!r} holds files tracked by git ({first}, ...): committed "
            "results are never overwritten; leave out_dir unset (the run dir under outputs/) "
            "or remove them first (git rm -r) to re-record"
        )


def evaluate(conf: EvalConfig, logger=None) -> EvalResult:
    """Run every (agent, task, seed) episode and write the tables and figures to `conf.out_dir`
    (see the module docstring). `logger` (a RunLogger, already started) gets the episodes,
    IQMs, table and figures."""
    c = conf
    if c.contexts is not None:
        from esper_gym.contexts import check_split, context_space

        check_split(c.contexts)
        for task in c.tasks:  # a task without a context distribution fails before any episode
            context_space(task.build())
    oracle_cfg = None if c.oracle is None else oracle_lib.OracleConfig.from_mapping(c.oracle)
    if oracle_cfg is not None and (not oracle_cfg.enabled or c.contexts is None):
        oracle_cfg = None  # the fixed tasks have one context each: nothing to react to
    check_out_dir(c.out_dir)
    common = dict(
        reward_weights=dict(c.reward_weights or {}) or None,
        kernel_dir=c.kernel_dir,
        greedy=c.greedy,
        threads=c.threads,
        contexts=c.contexts,
    )
    jobs = jobs_lib.make_jobs(c.agents, c.tasks, c.seeds, c.checkpoints, c.first_seed, **common)
    jobs = jobs_lib.with_agent_kwargs(jobs, c.agent_kwargs)
    jobs_lib.check_players(jobs)
    out = pathlib.Path(c.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    selection = oracle_lib.selection_jobs(oracle_cfg, c.tasks, jobs, common) if oracle_cfg else []

    def run(batch: Sequence[jobs_lib.Job]) -> list[dict]:
        return jobs_lib.run_jobs(batch, c.executor, c.n_jobs, c.progress and oracle_lib.progress)

    done = run([*jobs, *(job for job, _ in selection)])
    results = done[: len(jobs)]
    files = {"episodes": "episodes.csv", "events": "events.jsonl", "replays": records.FILE_NAME}
    oracle_info: dict[str, Any] = {}
    if oracle_cfg:
        picks, chosen = oracle_lib.choices(selection, done[len(jobs) :])
        chosen.to_csv(out / "oracle_selection.csv", index=False)
        files["oracle_selection"] = "oracle_selection.csv"
        scoring = oracle_lib.scoring_jobs(c.tasks, jobs, picks, common)
        scored = run([job for job, _ in scoring])
        for (_, expected), r in zip(scoring, scored):
            if r["row"]["context_index"] != expected:  # context_index() must follow env.reset
                raise RuntimeError(
                    f"oracle: seed {r['row']['seed']} played context {r['row']['context_index']}"
                    f", its plan was chosen for context {expected}"
                )
        results += scored
        labels = [t.label for t in c.tasks]
        oracle_info = {
            "selection_seeds": oracle_cfg.selection_seed_list([j.seed for j in jobs]),
            "plans": {t.label: len(oracle_cfg.plans(t.base)) for t in c.tasks},
            "contexts": {x: len({k for (lbl, k) in picks if lbl == x}) for x in labels},
        }
    episodes = jobs_lib.episodes_frame(results)
    episodes.to_csv(out / files["episodes"], index=False)
    records.write(out / files["replays"], [r["replay"] for r in results])
    with open(out / files["events"], "w") as f:
        for r in results:
            for e in r["events"]:
                f.write(json.dumps(e) + "\n")
    summary, decisions, table = summarize(c, episodes, oracle_info if oracle_cfg else None)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "results.md").write_text(table)
    files |= {"summary": "summary.csv", "table": "results.md"}
    figures = make_figures(c, episodes, results, out) if c.make_plots else {}
    files |= {name: p.name for name, p in figures.items()}
    result = {
        "config": dict(c.config or {}),
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


def summarize(
    c: EvalConfig, episodes: pd.DataFrame, oracle_info: Mapping[str, Any] | None
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """summary.csv's table, the decision summary, and results.md's Markdown."""
    summary = stats.summarize(
        episodes,
        SUMMARY_METRICS,
        c.rank_by,
        c.reps,
        c.confidence,
        c.bootstrap_seed,
        baselines=report.comparison_baselines(c.agents),
        privileged=report.privileged_agents(episodes["agent"].unique()),
    )
    decisions = report.decision_summary(episodes)
    summary = summary.merge(decisions, on=["task", "agent"], how="left")
    summary.insert(2, "contexts", c.contexts or "fixed")
    privileged = report.privileged_agents(summary["agent"])
    summary.insert(3, "privileged", summary["agent"].isin(privileged))
    if oracle_info is not None:
        reacting = oracle_lib.value_of_reacting(episodes, c.reps, c.confidence, c.bootstrap_seed)
        summary = summary.merge(reacting, on=["task", "agent"], how="left")
        shares = oracle_lib.oracle_gap_share(episodes)
        summary = summary.merge(shares, on=["task", "agent"], how="left")
    table = (
        f"Contexts: {report.CONTEXT_LABEL[c.contexts]}\n\n"
        + stats.markdown_table(
            summary, rank_by=c.rank_by, confidence=c.confidence, privileged=privileged
        )
        + "\n"
        + report.decision_table(decisions)
        + report.cost_lines(episodes)
        + (report.reacting_lines(summary, oracle_info, c.confidence) if oracle_info else "")
    )
    return summary, decisions, table


def make_figures(
    c: EvalConfig, episodes: pd.DataFrame, results: Sequence[Mapping], out: pathlib.Path
) -> dict[str, pathlib.Path]:
    figures = {
        "pareto": plots.pareto(episodes, out / "pareto.png", reps=c.reps),
        "profiles": plots.performance_profiles(
            episodes, out / "performance_profiles.png", reps=c.reps
        ),
    }
    pick = report.pick_timeline(episodes, c.timeline)
    if pick is not None:
        figures["lifecycle"] = report.timeline_figure(results, pick, out / "lifecycle.png")
    if c.learning_curves:
        path = out / "learning_curves.png"
        figures["learning_curves"] = plots.learning_curves(c.learning_curves, path)
    if c.sweep_dir:
        sweep = plots.load_sweep(c.sweep_dir, c.sweep_param)
        path = out / "reward_sweep.png"
        figures["reward_sweep"] = plots.reward_sweep(sweep, c.sweep_param, path)
    return figures
