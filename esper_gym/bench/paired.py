"""Paired differences of agents against several others, and merging a train run's evaluation
episodes into an evaluate run's (refused unless the common agents played the very same
episodes). The command: experiments/paired_table.py."""

from __future__ import annotations

import json
import pathlib

import pandas as pd

from esper_gym.bench import stats

COLUMNS = ["task", "agent", "other", "metric", "n", "diff", "lo", "hi"]


def paired_table(
    episodes: pd.DataFrame,
    agents: list[str],
    against: list[str],
    metrics: list[str],
    by_context: bool = False,
) -> pd.DataFrame:
    """Each agent's mean per-seed difference against each of `against`, per task and metric,
    with its paired bootstrap CI: `pooled_table` with one agent per pool."""
    table = pooled_table(episodes, {a: [a] for a in agents}, against, metrics, by_context)
    return table[COLUMNS] if len(table) else table


def pooled_table(
    episodes: pd.DataFrame,
    pools: dict[str, list[str]],
    against: list[str],
    metrics: list[str],
    by_context: bool = False,
) -> pd.DataFrame:
    """`paired_table` with each pool's members (e.g. one checkpoint per training seed) taken as
    one agent: their per-seed differences against `other` joined, one pair per (member, seed),
    and the mean of each metric over the pool's episodes (`<metric>_mean`). `by_context`: the
    CI resamples whole contexts (`context_index`), not episodes: what carries to other contexts
    of the split, not only to other seeds of these."""
    known = set(episodes["agent"])
    missing = [a for a in [*(m for ms in pools.values() for m in ms), *against] if a not in known]
    if missing:
        raise SystemExit(f"agents {missing} are not in the episodes; there: {sorted(known)}")
    rows = []
    for task, block in episodes.groupby("task", sort=False):
        for name, members in pools.items():
            mine = block[block["agent"].isin(members)]
            for other in against:
                both = mine.merge(
                    block[block["agent"] == other], on="seed", suffixes=("", "_other")
                )
                if both.empty or other in members:
                    continue  # not both on this task (a merged train run's task only)
                for metric in metrics:
                    diff = (both[metric] - both[f"{metric}_other"]).to_numpy(float)
                    if by_context:
                        groups = both["context_index"].to_numpy()
                        ci = stats.cluster_bootstrap_ci(
                            [diff[groups == c] for c in sorted(set(groups))]
                        )
                    else:
                        ci = stats.paired_difference([diff])
                    rows.append(
                        {"task": task, "agent": name, "members": ",".join(members),
                         "other": other, "metric": metric, "n": len(diff),
                         f"{metric}_mean": float(mine[metric].mean()),
                         "diff": ci.estimate, "lo": ci.lo, "hi": ci.hi}
                    )  # fmt: skip
    return pd.DataFrame(rows)


EPISODE_FIELDS = ("return", "test_acc", "params_added")


def train_episodes(path: pathlib.Path) -> pd.DataFrame:
    """The evaluation episodes in a train run's results.json, as episodes.csv rows."""
    results = json.loads(path.read_text())
    rows = [
        {"agent": agent, "task": results["task"], "seed": ep["seed"],
         **{k: ep[k] for k in EPISODE_FIELDS}}
        for agent, block in results["eval"].items()
        for ep in block["episodes"]
    ]  # fmt: skip
    return pd.DataFrame(rows)


def merge(episodes: pd.DataFrame, extra: pd.DataFrame, source) -> pd.DataFrame:
    """`episodes` plus the agents of `extra` it lacks; refused unless every agent in both has
    the same return on every common (task, seed): the proof that they are the same episodes."""
    keys = ["agent", "task", "seed"]
    both = episodes.merge(extra, on=keys, suffixes=("", "_extra"))
    if both.empty:
        raise SystemExit(f"{source}: no (agent, task, seed) in common: cannot show they pair")
    off = both[(both["return"] - both["return_extra"]).abs() > 1e-9]
    if len(off):
        first = off.iloc[0]
        raise SystemExit(
            f"{source}: {first['agent']} on {first['task']} seed {first['seed']} returned "
            f"{first['return_extra']!r} there, {first['return']!r} here: not the same episodes "
            "(match eval.first_seed and contexts to the evaluate run)"
        )
    new = extra[~extra["agent"].isin(set(episodes["agent"]))]
    return pd.concat([episodes, new], ignore_index=True)


def per_context(episodes: pd.DataFrame, agents, against) -> pd.DataFrame:
    """Per (task, context_index, agent, other): the mean paired return difference over the
    seeds both played, and each one's most frequent germination plan ("-": none)."""
    rows = []
    for (task, ctx), eps in episodes.groupby(["task", "context_index"]):
        by = {a: g.set_index("seed") for a, g in eps.groupby("agent")}
        for agent in (a for a in agents if a in by):
            for other in (o for o in against if o in by):
                seeds = by[agent].index.intersection(by[other].index)
                diff = by[agent].loc[seeds, "return"] - by[other].loc[seeds, "return"]
                plan = {
                    a: by[a].loc[seeds, "plan"].fillna("-").mode().iloc[0] for a in (agent, other)
                }
                rows.append({"task": task, "context_index": ctx, "agent": agent, "other": other,
                             "diff": diff.mean(), "n": len(seeds), "agent_plan": plan[agent],
                             "other_plan": plan[other]})  # fmt: skip
    return pd.DataFrame(rows)


def other_players(episodes: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """`extra` less the agents that are other players under a name `episodes` has (another
    checkpoint): they neither pair nor fit under that name (said, not dropped silently). An
    episodes file without a checkpoint column has none (older runs)."""

    def checkpoints(eps: pd.DataFrame) -> pd.Series:
        column = eps["checkpoint"] if "checkpoint" in eps else pd.Series("", index=eps.index)
        return column.fillna("").groupby(eps["agent"]).first()

    mine, theirs = checkpoints(episodes), checkpoints(extra)
    clash = sorted(a for a in theirs.index.intersection(mine.index) if theirs[a] != mine[a])
    if clash:
        print(f"not merged (another checkpoint under the same name): {', '.join(clash)}")
    return extra[~extra["agent"].isin(clash)]


def markdown(table: pd.DataFrame, metric: str) -> str:
    """One row per (task, other), one column per agent: `diff [lo, hi]` of `metric`."""
    sub = table[table["metric"] == metric]
    agents = list(dict.fromkeys(sub["agent"]))
    scale = 100 if metric.endswith("_acc") else 1  # accuracies in points
    fmt = (
        "{:+,.0f} [{:+,.0f}, {:+,.0f}]"
        if metric == "params_added"
        else "{:+.2f} [{:+.2f}, {:+.2f}]"
    )
    lines = [f"| task | {metric} vs | " + " | ".join(agents) + " |"]
    lines.append("|---|---|" + "---|" * len(agents))
    for (task, other), g in sub.groupby(["task", "other"], sort=False):
        cells = []
        for agent in agents:
            mine = g[g["agent"] == agent]
            if mine.empty:
                cells.append("–")
                continue
            r = mine.iloc[0]
            cells.append(fmt.format(r["diff"] * scale, r["lo"] * scale, r["hi"] * scale))
        lines.append(f"| {task} | {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
