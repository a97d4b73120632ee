"""Tables printed after a run: train's means (`format_results`), and evaluate's Markdown
(`decision_summary`/`decision_table`, the cost of agents that simulate, the value of reacting)
and the episode of its lifecycle figure (`pick_timeline`, `timeline_figure`)."""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

TRAIN_COLUMNS = (
    "return",
    "val_acc",
    "test_acc",
    "params",
    "params_added",
    "faults",
    "invalid_actions",
)


def format_results(results: dict[str, Any]) -> str:
    """A train run's results (esper_gym.train: results.json): a header line, then the
    evaluation means, one row per agent."""
    cols = TRAIN_COLUMNS
    lines = [
        f"task={results['task']} agent={results['agent']} seed={results['seed']} "
        f"global_step={results['global_step']} checkpoint={results['checkpoint']}",
        f"{'agent':<12}" + "".join(f"{c:>16}" for c in cols),
    ]
    if not results["eval"]:
        lines[1] = "no evaluation (eval.episodes=0): no episodes were played after training"
    for name, res in results["eval"].items():
        mean = res["mean"]
        lines.append(f"{name:<12}" + "".join(f"{mean.get(c, math.nan):>16.4g}" for c in cols))
    return "\n".join(lines)


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
    from esper_gym.bench import plots

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


def privileged_agents(names) -> list[str]:
    """The agents of `names` that are upper references, not competitors: the privileged
    baselines (they fork the run) and the per-context oracle (it knows the context)."""
    from esper_gym.agents.baselines import PRIVILEGED
    from esper_gym.bench.oracle import ORACLE

    return [a for a in dict.fromkeys(names) if a in PRIVILEGED or a == ORACLE]


def comparison_baselines(agents: Sequence[str]) -> list[str]:
    """The agents that may be the reference of the P(improvement) and paired columns: the
    non-privileged baselines (esper_gym.agents.baselines), never a checkpoint or a privileged
    agent (one that sees the future is an upper reference, not a bar to beat)."""
    from esper_gym.agents.baselines import AGENTS, PRIVILEGED

    return [a for a in agents if a in AGENTS and a not in PRIVILEGED]


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
    from esper_gym.bench import stats
    from esper_gym.bench.oracle import ORACLE

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
    rows = summary[summary["agent"] == ORACLE]
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
