"""Honest aggregate statistics for a few seeds, as rliable reports them.

This follows rliable (Agarwal et al., 2021, "Deep RL at the edge of the statistical
precipice"), and uses its definitions so that the numbers can be set beside published ones:
the interquartile mean (IQM) is rliable's `aggregate_iqm`, i.e. scipy's `trim_mean(x, 0.25)`
(a quarter of the runs cut whole from each end), and the probability of improvement is
rliable's `probability_of_improvement` (the Mann-Whitney U statistic over n*m, averaged over
tasks). CIs are 95% percentile intervals from a *stratified* bootstrap: runs are resampled with
replacement within each task, never across tasks, as rliable's `StratifiedBootstrap` does.

Why the bootstrap loop is ours and not `rliable.library`: rliable 1.2.0 pins `arch < 8`, and
every arch < 8 fails to import under pandas >= 3 (a changed `deprecate_kwarg`); arch 8 rejects
the `random_state=` that rliable passes; and rliable draws its resamples from numpy's global RNG,
so its CIs are not reproducible from a seed. So the resampling is a few lines of numpy here, with
a seeded Generator, and the statistics it evaluates are rliable's (the vectorised forms used
inside the bootstrap are pinned equal to rliable's functions by tests/test_stats.py).

| function                     | what it is                                                        |
|------------------------------|-------------------------------------------------------------------|
| `iqm(x, axis)`               | rliable's IQM: scipy `trim_mean(x, 0.25)` along `axis`            |
| `stratified_bootstrap_ci`    | percentile CI of a statistic, resampling within each stratum      |
| `probability_of_improvement` | P(X > Y) with a stratified bootstrap CI (X and Y resampled apart) |
| `paired_difference`          | mean per-seed difference X - Y on common seeds, with its CI       |
| `cluster_bootstrap_ci`       | CI of the mean of values grouped in clusters, clusters resampled  |
| `performance_profile`        | fraction of runs scoring above each threshold, with CI bands      |
| `overlaps(a, b)`             | whether two closed intervals share a point                       |
| `summarize(df, ...)`         | per (task, agent) IQM + CI of several metrics, and an all-tasks row |
| `markdown_table(summary)`    | the README table, with a column saying which intervals overlap    |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from rliable import metrics as rly_metrics
from scipy.stats import trim_mean

ALL_TASKS = "all tasks"


def iqm(x, axis: int = -1) -> np.ndarray | float:
    """Interquartile mean of `x` along `axis`: rliable's `aggregate_iqm`, which is scipy's
    `trim_mean(x, 0.25)` (int(n/4) values cut from each end, then the mean). A float for 1-D
    input. With n < 4 nothing is cut: the plain mean."""
    a = np.asarray(x, dtype=float)
    if a.size == 0:
        raise ValueError("IQM of an empty sample")
    out = trim_mean(a, 0.25, axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def _poi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) + P(X = Y)/2 over all pairs of the last axes of x (..., n) and y (..., m): the
    Mann-Whitney U / (n m) of rliable's `probability_of_improvement`, vectorised over leading
    (bootstrap) axes."""
    d = x[..., :, None] - y[..., None, :]
    return (d > 0).mean(axis=(-2, -1)) + 0.5 * (d == 0).mean(axis=(-2, -1))


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
    groups = _strata(strata, "bootstrap")
    tail = _check(reps, confidence)
    rng = np.random.default_rng(seed)
    # (reps, n_k) indices per stratum, all resamples at once: 2000 x a few seeds is tiny.
    samples = np.concatenate(
        [g[rng.integers(0, g.size, size=(reps, g.size))] for g in groups], axis=1
    )
    stats = np.asarray(statistic(samples, axis=-1), dtype=float)
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    estimate = float(statistic(np.concatenate(groups), axis=-1))
    return Interval(estimate, float(lo), float(hi))


def overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether the closed intervals a = (lo, hi) and b = (lo, hi) share at least one point.

    Overlapping 95% intervals do not prove two agents equal; separate ones are the evidence
    that the difference is not seed noise."""
    return bool(a[0] <= b[1] and b[0] <= a[1])


def _strata(strata: Sequence[Sequence[float]], what: str) -> list[np.ndarray]:
    groups = [np.asarray(g, dtype=float).ravel() for g in strata]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError(f"{what}: every stratum (task) needs at least one value")
    return groups


def _check(reps: int, confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    if reps < 1:
        raise ValueError(f"reps={reps} must be >= 1")
    return (1 - confidence) / 2 * 100


def probability_of_improvement(
    x_strata: Sequence[Sequence[float]],
    y_strata: Sequence[Sequence[float]],
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """P(X > Y): the probability that a run of agent X scores above a run of agent Y on the same
    task (ties count 1/2), averaged over tasks; 0.5 means neither is better. Stratum k of x and
    of y are the runs of the two agents on task k. The estimate is rliable's
    `probability_of_improvement`; the CI resamples X's and Y's runs independently within each
    task (rliable's `StratifiedIndependentBootstrap`). Unpaired: see `paired_difference`."""
    xs, ys = _strata(x_strata, "P(improvement)"), _strata(y_strata, "P(improvement)")
    if len(xs) != len(ys):
        raise ValueError(f"x has {len(xs)} tasks and y {len(ys)}: they must be the same tasks")
    tail = _check(reps, confidence)
    rng = np.random.default_rng(seed)
    boot = np.zeros(reps)
    for x, y in zip(xs, ys):
        boot += _poi(
            x[rng.integers(0, x.size, (reps, x.size))], y[rng.integers(0, y.size, (reps, y.size))]
        )
    boot /= len(xs)
    estimate = np.mean(
        [rly_metrics.probability_of_improvement(x[:, None], y[:, None]) for x, y in zip(xs, ys)]
    )
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return Interval(float(estimate), float(lo), float(hi))


def paired_difference(
    diff_strata: Sequence[Sequence[float]],
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Mean of per-seed differences X - Y, with a stratified bootstrap CI over seeds.

    Stratum k holds, for task k, one difference per seed that both agents played. The same seed
    gives every agent the same context, data order and host initialisation, so most of the
    spread across seeds (a hard context, a lucky init) cancels in the difference: the paired CI
    is far narrower than two unpaired CIs whenever the agents' scores are correlated over seeds.
    The mean, not the IQM, because the differences are one sample each, not agents' scores to
    be set beside published IQMs."""
    return stratified_bootstrap_ci(diff_strata, _mean, reps, confidence, seed)


def cluster_bootstrap_ci(
    clusters: Sequence[Sequence[float]],
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Mean of every value, with a percentile CI from resampling whole clusters (e.g. the
    seeds of one context, which share a choice made on that context) with replacement: honest
    where values within a cluster are correlated, which resampling single values is not."""
    tail = _check(reps, confidence)  # percent in each tail
    groups = [np.asarray(c, dtype=float).ravel() for c in clusters]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("cluster bootstrap: every cluster needs at least one value")
    sums = np.array([g.sum() for g in groups])
    sizes = np.array([g.size for g in groups])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(groups), size=(reps, len(groups)))
    boot = sums[pick].sum(axis=1) / sizes[pick].sum(axis=1)
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return Interval(float(sums.sum() / sizes.sum()), float(lo), float(hi))


def _mean(x, axis: int = -1):
    return np.mean(x, axis=axis)


def performance_profile(
    strata: Sequence[Sequence[float]],
    taus: Sequence[float],
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rliable's score distribution: for each threshold tau, the fraction of runs (all tasks
    pooled) scoring above tau, and its stratified-bootstrap CI band. Returns (profile, lo, hi),
    each of len(taus)."""
    groups = _strata(strata, "performance profile")
    tail = _check(reps, confidence)
    t = np.asarray(taus, dtype=float)
    rng = np.random.default_rng(seed)
    samples = np.concatenate(
        [g[rng.integers(0, g.size, size=(reps, g.size))] for g in groups], axis=1
    )
    boot = (samples[:, :, None] > t).mean(axis=1)  # (reps, taus)
    profile = (np.concatenate(groups)[:, None] > t).mean(axis=0)
    lo, hi = np.percentile(boot, [tail, 100 - tail], axis=0)
    return profile, lo, hi


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
    baselines: Sequence[str] | None = None,
    compare_on: str = "return",
    privileged: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per (task, agent) of a tidy episodes table (columns task, agent, seed, metrics).

    For every metric m: `m_iqm`, `m_lo`, `m_hi` (IQM and stratified-bootstrap CI over seeds),
    plus `n` (episodes). With `all_tasks` and more than one task, one more row per agent with
    task `"all tasks"`: IQM over all its (task, seed) episodes, seeds resampled within each task
    (only agents run on every task get it, so the rows compare like with like).

    Per task, `best` marks the agent with the highest `rank_by` IQM and `vs_best` says whether
    its `rank_by` interval overlaps the best agent's: "best", "overlaps" or "separate". Agents in
    `privileged` (upper references such as an oracle) are never `best`: they are compared with
    the best of the others.

    With `baselines` (the agent names that count as non-privileged baselines), every row also
    compares the agent with the task's `reference`: the baseline with the highest `compare_on`
    IQM in that row's task (for the all-tasks row: the highest all-tasks IQM). `p_improve`,
    `p_improve_lo`, `p_improve_hi`: P(agent > reference) on `compare_on` with its CI;
    `paired_diff`, `paired_lo`, `paired_hi`: the mean per-seed difference agent - reference over
    the seeds both played, with its CI; `paired_n`: those seeds. NaN on the reference's own row
    and where no baseline was run.
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
        competitors = block[~block["agent"].isin(list(privileged))]
        best = (competitors if len(competitors) else block)[f"{rank_by}_iqm"].idxmax()
        best_ci = (block.at[best, f"{rank_by}_lo"], block.at[best, f"{rank_by}_hi"])
        for i in idx:
            ci = (out.at[i, f"{rank_by}_lo"], out.at[i, f"{rank_by}_hi"])
            out.at[i, "best"] = i == best
            out.at[i, "vs_best"] = (
                "best" if i == best else ("overlaps" if overlaps(ci, best_ci) else "separate")
            )
    if baselines is not None:
        _compare_to_reference(out, df, baselines, compare_on, reps, confidence, seed)
    return out


COMPARISON_COLUMNS = (
    "reference",
    "p_improve",
    "p_improve_lo",
    "p_improve_hi",
    "paired_diff",
    "paired_lo",
    "paired_hi",
    "paired_n",
)


def _compare_to_reference(out, df, baselines, metric, reps, confidence, seed) -> None:
    """Fill COMPARISON_COLUMNS of `summarize`'s table `out` in place (see `summarize`)."""
    if metric not in df.columns:
        raise KeyError(f"compare_on={metric!r} is not a column of the episodes table")
    for col in COMPARISON_COLUMNS:
        out[col] = None if col == "reference" else float("nan")
    for task, idx in out.groupby("task", sort=False).groups.items():
        block = out.loc[idx]
        candidates = block[block["agent"].isin(list(baselines))]
        if candidates.empty:
            continue
        ref = candidates.at[candidates[f"{metric}_iqm"].idxmax(), "agent"]
        rows = df if task == ALL_TASKS else df[df["task"] == task]
        ref_rows = rows[rows["agent"] == ref]
        for i in idx:
            out.at[i, "reference"] = ref
            agent = out.at[i, "agent"]
            if agent == ref:
                continue
            mine = rows[rows["agent"] == agent]
            tasks = list(dict.fromkeys(mine["task"]))
            xs = [mine.loc[mine["task"] == t, metric].to_numpy(float) for t in tasks]
            ys = [ref_rows.loc[ref_rows["task"] == t, metric].to_numpy(float) for t in tasks]
            if any(y.size == 0 for y in ys):
                continue
            poi = probability_of_improvement(xs, ys, reps, confidence, seed)
            # Pair by (task, seed): the same seed is the same context, data and init.
            both = mine.merge(ref_rows, on=["task", "seed"], suffixes=("", "_ref"))
            if both.duplicated(["task", "seed"]).any():
                raise ValueError(f"agent {agent!r} or {ref!r} has a seed twice on one task")
            diffs = [
                (g[metric] - g[f"{metric}_ref"]).to_numpy(float)
                for _, g in both.groupby("task", sort=False)
            ]
            row = {"p_improve": poi.estimate, "p_improve_lo": poi.lo, "p_improve_hi": poi.hi}
            if diffs:
                pd_ci = paired_difference(diffs, reps, confidence, seed)
                row |= {"paired_diff": pd_ci.estimate, "paired_lo": pd_ci.lo}
                row |= {"paired_hi": pd_ci.hi, "paired_n": len(both)}
            for k, v in row.items():
                out.at[i, k] = v


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
    privileged: Sequence[str] = (),
) -> str:
    """The summary as a Markdown table: `IQM [lo, hi]` per metric, and a footnote-marked column
    saying, per task, whether each agent's `rank_by` interval overlaps the best agent's.
    Agents in `privileged` (upper references: they see what no deployed controller sees) are
    marked `†` and footnoted."""
    headers = ["task", "agent", "n", *(COLUMNS.get(m, (m, "float"))[0] for m in metrics)]
    headers.append(f"vs best ({COLUMNS.get(rank_by, (rank_by,))[0]}) ¹")
    compared = "reference" in summary.columns and summary["reference"].notna().any()
    if compared:
        headers += ["reference ²", "P(> reference) ²", "paired diff. ²"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, r in summary.iterrows():
        name = f"{r['agent']} †" if r["agent"] in privileged else str(r["agent"])
        cells = [str(r["task"]), f"**{name}**" if r["best"] else name]
        cells.append(str(int(r["n"])))
        for m in metrics:
            kind = COLUMNS.get(m, (m, "float"))[1]
            cells.append(
                f"{_fmt(r[f'{m}_iqm'], kind)} [{_fmt(r[f'{m}_lo'], kind)}, "
                f"{_fmt(r[f'{m}_hi'], kind)}]"
            )
        cells.append(str(r["vs_best"]))
        if compared:
            cells.append(str(r["reference"]) if pd.notna(r["reference"]) else "n/a")
            for m in ("p_improve", "paired"):
                est = r["p_improve" if m == "p_improve" else "paired_diff"]
                cells.append(
                    "–" if pd.isna(est) else f"{est:.2f} [{r[f'{m}_lo']:.2f}, {r[f'{m}_hi']:.2f}]"
                )
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
    if compared:
        lines.append(
            "² Against the reference: the strongest non-privileged baseline of the task (highest "
            "IQM return). P(> reference): probability that a run of the agent beats a run of the "
            "reference (0.5: neither), rliable's definition. Paired diff.: mean per-seed "
            "return difference agent - reference on common seeds (same context, data and init)."
        )
    marked = [a for a in dict.fromkeys(summary["agent"]) if a in privileged]
    if marked:
        lines.append(
            f"† Privileged ({', '.join(marked)}): an upper reference, not a competitor; it sees "
            "what no deployed controller sees (lookahead: forks of this very run; oracle: the "
            "context, and episodes of it), and is never the reference ²."
        )
    return "\n".join(lines) + "\n"
