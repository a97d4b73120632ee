"""Honest aggregate statistics for a few seeds: interquartile mean and stratified bootstrap CIs.

This follows the rliable practice (Agarwal et al., 2021, "Deep RL at the edge of the statistical
precipice"): with 5-10 runs per task, report the interquartile mean (IQM) rather than the mean
(outlier-prone) or the median (high variance), with a 95% percentile confidence interval from a
*stratified* bootstrap: runs are resampled with replacement within each task, never across
tasks, so every resample keeps the task mix of the experiment.

| function                     | what it is                                                        |
|------------------------------|-------------------------------------------------------------------|
| `iqm(x, axis)`               | mean of the middle 50% with fractional trimming                   |
| `stratified_bootstrap_ci`    | percentile CI of a statistic, resampling within each stratum      |
| `overlaps(a, b)`             | whether two closed intervals share a point                       |
| `summarize(df, ...)`         | per (task, agent) IQM + CI of several metrics, and an all-tasks row |
| `markdown_table(summary)`    | the README table, with a column saying which intervals overlap    |

Everything statistical here is numpy; pandas only shapes the tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

ALL_TASKS = "all tasks"


def _trim_weights(n: int) -> np.ndarray:
    """Weights of the n sorted values in the IQM: the share of each value's quantile cell
    [i/n, (i+1)/n] that falls inside [0.25, 0.75], normalised to sum to 1.

    Fractional trimming: with n = 5 the 2nd and 4th values count 3/4 as much as the middle one,
    instead of being kept or dropped whole (which makes the IQM jump as n changes)."""
    if n < 1:
        raise ValueError("IQM of an empty sample")
    lo = np.arange(n) / n
    hi = (np.arange(n) + 1) / n
    share = np.clip(np.minimum(hi, 0.75) - np.maximum(lo, 0.25), 0.0, None)
    return share / share.sum()


def iqm(x, axis: int = -1) -> np.ndarray | float:
    """Interquartile mean of `x` along `axis`: the mean of the middle 50% of the values, with
    fractional trimming (see `_trim_weights`). NaN in, NaN out. A float for 1-D input.

    Equal to the plain mean for n <= 2 and for n = 4 the mean of the two middle values."""
    a = np.asarray(x, dtype=float)
    if a.size == 0:
        raise ValueError("IQM of an empty sample")
    a = np.sort(np.moveaxis(a, axis, -1), axis=-1)
    out = a @ _trim_weights(a.shape[-1])
    return float(out) if np.ndim(out) == 0 else out


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval [lo, hi]."""

    estimate: float
    lo: float
    hi: float

    def overlaps(self, other: Interval) -> bool:
        return overlaps((self.lo, self.hi), (other.lo, other.hi))


def stratified_bootstrap_ci(
    strata: Sequence[Sequence[float]],
    statistic: Callable[..., np.ndarray] = iqm,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap CI of `statistic` over the pooled values of all strata.

    Each of the `reps` resamples draws, for every stratum (task) separately, as many values as
    it has, with replacement, and evaluates `statistic(pooled, axis=-1)` on the concatenation.
    The interval is the (1-confidence)/2 and 1-(1-confidence)/2 percentiles of the `reps`
    statistics; `estimate` is the statistic of the data itself. One stratum gives the ordinary
    bootstrap. Deterministic for a given `seed`. A stratum of one value contributes it to every
    resample (the CI then has no width from it: one seed says nothing about spread).
    """
    groups = [np.asarray(s, dtype=float).ravel() for s in strata]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("every stratum needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    if reps < 1:
        raise ValueError(f"reps={reps} must be >= 1")
    rng = np.random.default_rng(seed)
    # (reps, n_k) indices per stratum, all resamples at once: 2000 x a few seeds is tiny.
    samples = np.concatenate(
        [g[rng.integers(0, g.size, size=(reps, g.size))] for g in groups], axis=1
    )
    stats = np.asarray(statistic(samples, axis=-1), dtype=float)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    estimate = float(statistic(np.concatenate(groups), axis=-1))
    return Interval(estimate, float(lo), float(hi))


def overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether the closed intervals a = (lo, hi) and b = (lo, hi) share at least one point.

    Overlapping 95% intervals do not prove two agents equal; separate ones are the evidence
    that the difference is not seed noise."""
    return bool(a[0] <= b[1] and b[0] <= a[1])


# --------------------------------------------------------------------------- tables

METRICS = ("test_acc", "val_acc", "params_added", "return")


def summarize(
    df: pd.DataFrame,
    metrics: Sequence[str] = METRICS,
    rank_by: str = "test_acc",
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    all_tasks: bool = True,
) -> pd.DataFrame:
    """One row per (task, agent) of a tidy episodes table (columns task, agent, seed, metrics).

    For every metric m: `m_iqm`, `m_lo`, `m_hi` (IQM and stratified-bootstrap CI over seeds),
    plus `n` (episodes). With `all_tasks` and more than one task, one more row per agent with
    task `"all tasks"`: IQM over all its (task, seed) episodes, seeds resampled within each task
    (only agents run on every task get it, so the rows compare like with like).

    Per task, `best` marks the agent with the highest `rank_by` IQM and `vs_best` says whether
    its `rank_by` interval overlaps the best agent's: "best", "overlaps" or "separate".
    """
    missing = [c for c in ("task", "agent", *metrics) if c not in df.columns]
    if missing:
        raise KeyError(f"episodes table lacks columns {missing}")
    if rank_by not in metrics:
        raise ValueError(f"rank_by={rank_by!r} must be one of the metrics {list(metrics)}")
    rows = []
    tasks = list(dict.fromkeys(df["task"]))
    for task in tasks:
        for agent, group in df[df["task"] == task].groupby("agent", sort=False):
            row = {"task": task, "agent": agent, "n": len(group)}
            for m in metrics:
                ci = stratified_bootstrap_ci([group[m]], iqm, reps, confidence, seed)
                row |= {f"{m}_iqm": ci.estimate, f"{m}_lo": ci.lo, f"{m}_hi": ci.hi}
            rows.append(row)
    if all_tasks and len(tasks) > 1:
        for agent, group in df.groupby("agent", sort=False):
            if set(group["task"]) != set(tasks):
                continue
            row = {"task": ALL_TASKS, "agent": agent, "n": len(group)}
            for m in metrics:
                strata = [g[m].to_numpy() for _, g in group.groupby("task", sort=False)]
                ci = stratified_bootstrap_ci(strata, iqm, reps, confidence, seed)
                row |= {f"{m}_iqm": ci.estimate, f"{m}_lo": ci.lo, f"{m}_hi": ci.hi}
            rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["best"] = False
    out["vs_best"] = ""
    for _task, idx in out.groupby("task", sort=False).groups.items():
        block = out.loc[idx]
        best = block[f"{rank_by}_iqm"].idxmax()
        best_ci = (block.at[best, f"{rank_by}_lo"], block.at[best, f"{rank_by}_hi"])
        for i in idx:
            ci = (out.at[i, f"{rank_by}_lo"], out.at[i, f"{rank_by}_hi"])
            out.at[i, "best"] = i == best
            out.at[i, "vs_best"] = (
                "best" if i == best else ("overlaps" if overlaps(ci, best_ci) else "separate")
            )
    return out


def overlap_matrix(summary: pd.DataFrame, task: str, metric: str = "test_acc") -> pd.DataFrame:
    """Agents x agents of one task: True where the two `metric` intervals overlap."""
    block = summary[summary["task"] == task].set_index("agent")
    agents = list(block.index)
    return pd.DataFrame(
        [
            [
                overlaps(
                    (block.at[a, f"{metric}_lo"], block.at[a, f"{metric}_hi"]),
                    (block.at[b, f"{metric}_lo"], block.at[b, f"{metric}_hi"]),
                )
                for b in agents
            ]
            for a in agents
        ],
        index=agents,
        columns=agents,
    )


def _fmt(value: float, kind: str) -> str:
    if not math.isfinite(value):
        return "nan"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "int":
        return f"{value:,.0f}"
    return f"{value:.2f}"


COLUMNS = {  # metric -> (header, format)
    "test_acc": ("test acc. %", "pct"),
    "val_acc": ("val acc. %", "pct"),
    "params_added": ("params added", "int"),
    "return": ("return", "float"),
}


def markdown_table(
    summary: pd.DataFrame,
    metrics: Sequence[str] = ("test_acc", "params_added", "return"),
    rank_by: str = "test_acc",
    confidence: float = 0.95,
) -> str:
    """The summary as a Markdown table: `IQM [lo, hi]` per metric, and a footnote-marked column
    saying, per task, whether each agent's `rank_by` interval overlaps the best agent's."""
    headers = ["task", "agent", "n", *(COLUMNS.get(m, (m, "float"))[0] for m in metrics)]
    headers.append(f"vs best ({COLUMNS.get(rank_by, (rank_by,))[0]}) ¹")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, r in summary.iterrows():
        cells = [str(r["task"]), f"**{r['agent']}**" if r["best"] else str(r["agent"])]
        cells.append(str(int(r["n"])))
        for m in metrics:
            kind = COLUMNS.get(m, (m, "float"))[1]
            cells.append(
                f"{_fmt(r[f'{m}_iqm'], kind)} [{_fmt(r[f'{m}_lo'], kind)}, "
                f"{_fmt(r[f'{m}_hi'], kind)}]"
            )
        cells.append(str(r["vs_best"]))
        lines.append("| " + " | ".join(cells) + " |")
    pct = round(confidence * 100)
    lines += [
        "",
        f"IQM over seeds [{pct}% stratified bootstrap CI, percentile method]. "
        f"**Bold**: highest {rank_by} IQM of the task. "
        f"¹ `overlaps`: its {rank_by} interval overlaps the best agent's, so the difference may "
        "be seed noise; `separate`: it does not. "
        f"`{ALL_TASKS}`: IQM over every (task, seed) episode, seeds resampled within each task.",
    ]
    return "\n".join(lines) + "\n"
