"""Figures of the benchmark, as PNG files (matplotlib, Agg backend: no display needed).

| function               | input                                         | figure                              |
|------------------------|-----------------------------------------------|-------------------------------------|
| `pareto`               | episodes table (task, agent, params_added, test_acc) | accuracy vs params added per task, agent IQMs with CIs, Pareto front |
| `learning_curves`      | training metrics table (step, episodic return[, run]) | episodic return vs env steps |
| `lifecycle_timeline`   | `info["events"]` of one episode               | per seed slot, its state over env steps |
| `reward_sweep`         | `load_sweep(multirun_dir, param)`             | final accuracy and params added vs a reward weight |
| `log_figures`          | a RunLogger and {name: png}                   | the PNGs as W&B images              |

Every plotting function writes `path` (parents created), closes its figure and returns the path.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, also on a machine without a display

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from esper_gym.bench.stats import iqm, performance_profile, stratified_bootstrap_ci
from esper_gym.kasmina.lifecycle import SeedState

PathLike = str | os.PathLike

# One colour per agent, stable across figures (agents not listed take the next free colour).
AGENT_COLORS = {"tamiyo": "C3", "heuristic": "C0", "random": "C2", "noop": "C7"}
STATE_COLORS = {
    SeedState.DORMANT: "#f2f2f2",
    SeedState.GERMINATED: "#c6dbef",
    SeedState.TRAINING: "#6baed6",
    SeedState.BLENDING: "#fd8d3c",
    SeedState.PROBATION: "#fdd0a2",
    SeedState.FOSSILIZED: "#31a354",
    SeedState.CULLED: "#de2d26",
    SeedState.EMBARGOED: "#969696",
}


def agent_colors(agents: Iterable[str]) -> dict[str, str]:
    colors, spare = {}, iter(f"C{i}" for i in (1, 4, 5, 6, 8, 9))
    for agent in agents:
        colors[agent] = AGENT_COLORS.get(agent) or next(spare, "k")
    return colors


def _save(fig, path: PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points not dominated when fewer parameters (x) and higher accuracy (y) are better,
    sorted by x. A point is dominated if another has x <= and y >= with one strictly better."""
    front, best_y = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front


def pareto(
    episodes: pd.DataFrame,
    path: PathLike,
    x: str = "params_added",
    y: str = "test_acc",
    reps: int = 2000,
    seed: int = 0,
) -> pathlib.Path:
    """Accuracy vs parameters added, one panel per task.

    Small dots: single episodes. Large markers with error bars: each agent's IQM of x and of y
    with their 95% bootstrap CIs. Dashed steps: the Pareto front of the agents' IQM points
    (an agent on it is not beaten on both accuracy and size by another agent)."""
    tasks = list(dict.fromkeys(episodes["task"]))
    colors = agent_colors(dict.fromkeys(episodes["agent"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        block = episodes[episodes["task"] == task]
        centres = []
        for agent, group in block.groupby("agent", sort=False):
            c = colors[agent]
            ax.scatter(group[x], group[y], s=14, alpha=0.35, color=c, linewidths=0)
            cx = stratified_bootstrap_ci([group[x]], iqm, reps, seed=seed)
            cy = stratified_bootstrap_ci([group[y]], iqm, reps, seed=seed)
            ax.errorbar(
                cx.estimate,
                cy.estimate,
                xerr=[[cx.estimate - cx.lo], [cx.hi - cx.estimate]],
                yerr=[[cy.estimate - cy.lo], [cy.hi - cy.estimate]],
                fmt="o",
                ms=8,
                color=c,
                capsize=3,
                label=f"{agent} (n={len(group)})",
            )
            centres.append((cx.estimate, cy.estimate))
        front = pareto_front(centres)
        if len(front) > 1:
            fx, fy = zip(*front)
            ax.step(fx, fy, where="post", ls="--", color="k", lw=1, label="Pareto front (IQMs)")
        elif front:
            ax.plot(*front[0], marker="*", ms=14, color="k", ls="", label="Pareto front (IQMs)")
        ax.set_title(task)
        ax.set_xlabel("parameters added by growth")
        ax.set_ylabel(y.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Accuracy vs growth (IQM, 95% bootstrap CI)")
    return _save(fig, path)


def performance_profiles(
    episodes: pd.DataFrame,
    path: PathLike,
    metric: str = "return",
    reps: int = 2000,
    seed: int = 0,
    points: int = 101,
) -> pathlib.Path:
    """rliable's performance profile, one panel per task: for each threshold tau on `metric`,
    the fraction of an agent's runs scoring above tau, with a 95% bootstrap band. A curve that
    lies above another everywhere is stochastically dominant: better at every threshold, not
    only on average. One panel per task because returns are not on a common scale across tasks."""
    tasks = list(dict.fromkeys(episodes["task"]))
    colors = agent_colors(dict.fromkeys(episodes["agent"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        block = episodes[episodes["task"] == task]
        lo_x, hi_x = block[metric].min(), block[metric].max()
        pad = 0.05 * (hi_x - lo_x) or 0.5
        taus = np.linspace(lo_x - pad, hi_x + pad, points)
        for agent, group in block.groupby("agent", sort=False):
            prof, lo, hi = performance_profile([group[metric]], taus, reps, seed=seed)
            ax.plot(taus, prof, color=colors[agent], label=f"{agent} (n={len(group)})")
            ax.fill_between(taus, lo, hi, color=colors[agent], alpha=0.15, linewidth=0)
        ax.set_title(task)
        ax.set_xlabel(f"{metric.replace('_', ' ')} threshold tau")
        ax.set_ylabel(f"fraction of runs with {metric} > tau")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Performance profiles (rliable score distributions, 95% bootstrap bands)")
    return _save(fig, path)


def learning_curves(
    metrics: pd.DataFrame | PathLike,
    path: PathLike,
    x: str = "global_step",
    y: str = "charts/episodic_return",
    group: str | None = "run",
) -> pathlib.Path:
    """`y` against `x` (env steps), one line per value of `group` (a column naming the run or
    seed; ignored if absent). `metrics` is a table or a CSV path (rows without `y` are skipped:
    the learner logs returns only in updates where an episode ended)."""
    df = pd.read_csv(metrics) if not isinstance(metrics, pd.DataFrame) else metrics
    if x not in df.columns or y not in df.columns:
        raise KeyError(f"learning curves need columns {x!r} and {y!r}; got {list(df.columns)}")
    df = df.dropna(subset=[y])
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = df.groupby(group, sort=False) if group and group in df.columns else [("", df)]
    for name, g in groups:
        g = g.sort_values(x)
        ax.plot(g[x], g[y], lw=1.2, label=str(name) if name != "" else None)
    ax.set_xlabel("env steps")
    ax.set_ylabel(y.split("/")[-1].replace("_", " "))
    ax.grid(alpha=0.3)
    if group and group in df.columns:
        ax.legend(fontsize=8)
    ax.set_title("Learning curve")
    return _save(fig, path)


def lifecycle_segments(
    events: Iterable[Mapping[str, Any]], total_steps: int
) -> dict[tuple[str, int], list[dict]]:
    """Per (layer, slot), the states it went through: dicts with start, end (optimizer steps),
    state (SeedState), blueprint and the reason of the transition that ended it ("" if the
    episode ended it). Every slot starts DORMANT at step 0; the events are taken in order."""
    segments: dict[tuple[str, int], list[dict]] = {}
    open_: dict[tuple[str, int], dict] = {}
    for e in events:
        key = (str(e["layer"]), int(e["slot"]))
        seg = open_.get(key) or {
            "start": 0,
            "state": SeedState.DORMANT,
            "blueprint": "",
            "reason": "",
        }
        if SeedState[e["from"]] != seg["state"]:
            raise ValueError(
                f"event {dict(e)} does not follow the slot's state {seg['state'].name}"
            )
        seg |= {"end": int(e["step"]), "reason": str(e.get("reason", ""))}
        segments.setdefault(key, []).append(seg)
        open_[key] = {
            "start": int(e["step"]),
            "state": SeedState[e["to"]],
            "blueprint": str(e.get("blueprint") or seg["blueprint"]),
            "reason": "",
        }
    for key, seg in open_.items():
        segments[key].append(seg | {"end": max(total_steps, seg["start"])})
    return segments


def lifecycle_timeline(
    events: Iterable[Mapping[str, Any]],
    path: PathLike,
    total_steps: int,
    decision_interval: int = 1,
    slots: Sequence[tuple[str, int]] = (),
    title: str = "Seed lifecycle",
) -> pathlib.Path:
    """One horizontal bar per seed slot, coloured by its state over the episode, on an axis of
    env steps (optimizer step / `decision_interval`).

    `events` are the dicts of `info["events"]` of one episode (step = optimizer step, layer,
    slot, blueprint, from, to, reason), in order. `slots` adds (layer, slot) rows that never
    left DORMANT. A germination is labelled with its blueprint; an X marks a cull by the
    circuit breaker, a bar a cull by the agent."""
    events = list(events)
    segments = lifecycle_segments(events, total_steps)
    for key in slots:
        segments.setdefault(
            (str(key[0]), int(key[1])),
            [{"start": 0, "end": total_steps, "state": SeedState.DORMANT, "blueprint": ""}],
        )
    rows = sorted(segments, key=lambda k: (_layer_order(k[0]), k[1]))
    d = max(decision_interval, 1)
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(len(rows), 2) + 1.4))
    for i, key in enumerate(rows):
        for seg in segments[key]:
            start, end = seg["start"] / d, seg["end"] / d
            width = max(end - start, 0.15)  # CULLED lasts one optimizer step: keep it visible
            ax.barh(
                i, width, left=start, height=0.6, color=STATE_COLORS[seg["state"]], edgecolor="none"
            )
            if seg["state"] == SeedState.GERMINATED and seg["blueprint"]:
                ax.text(start, i - 0.32, seg["blueprint"], fontsize=7, va="bottom")
    # Cull markers: the reason belongs to the transition *into* CULLED.
    for e in events:
        if e["to"] == SeedState.CULLED.name:
            i = rows.index((str(e["layer"]), int(e["slot"])))
            breaker = "circuit breaker" in str(e.get("reason", ""))
            ax.plot(e["step"] / d, i, marker="X" if breaker else "|", color="k", ms=9, ls="")
    ax.set_yticks(range(len(rows)), [f"{layer} / slot {s}" for layer, s in rows])
    ax.set_ylim(len(rows) - 0.5, -0.8)  # first layer on top; room for the top label
    ax.set_xlim(0, total_steps / d)
    ax.set_xlabel("env step" if d > 1 else "optimizer step")
    handles = [Patch(color=c, label=s.name.lower()) for s, c in STATE_COLORS.items()]
    handles.append(plt.Line2D([], [], marker="X", color="k", ls="", label="breaker cull"))
    handles.append(plt.Line2D([], [], marker="|", color="k", ls="", label="agent cull"))
    ax.legend(handles=handles, fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title(title)
    return _save(fig, path)


def _layer_order(name: str) -> tuple:
    """Layers in data-flow order: trailing numbers numerically ("fc2" before "fc10")."""
    digits = "".join(ch for ch in reversed(name) if ch.isdigit())[::-1]
    stem = name[: len(name) - len(digits)] if digits else name
    return (stem, int(digits) if digits else -1, name)


# ------------------------------------------------------------------------ sweeps


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _param_value(job_dir: pathlib.Path, param: str) -> Any:
    """`param` (dotted) of one Hydra job: from `.hydra/config.yaml`, else `.hydra/overrides.yaml`."""
    import yaml  # PyYAML (a Hydra dependency); the files are plain YAML

    config = job_dir / ".hydra" / "config.yaml"
    if config.is_file():
        value = _lookup(yaml.safe_load(config.read_text()) or {}, param)
        if value is not None:
            return value
    overrides = job_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        for item in yaml.safe_load(overrides.read_text()) or []:
            key, _, value = str(item).lstrip("+~").partition("=")
            if key == param:
                return yaml.safe_load(value)
    return None


def load_sweep(multirun_dir: PathLike, param: str) -> pd.DataFrame:
    """Every evaluation episode of a Hydra multirun, with the value of `param` in its job.

    Reads each job directory below `multirun_dir` that holds `results.json` (written by
    `esper_gym.train`: `eval.<agent>.episodes`) or `result.json` (written by
    `esper_gym.evaluate`: its `episodes.csv`). Columns: job, agent, seed, `param`, and the
    episode's metrics. Jobs without `param` in their config are skipped."""
    rows = []
    root = pathlib.Path(multirun_dir)
    for marker in sorted([*root.rglob("results.json"), *root.rglob("result.json")]):
        job_dir = marker.parent
        value = _param_value(job_dir, param)
        if value is None:
            continue
        data = json.loads(marker.read_text())
        if marker.name == "results.json":
            for agent, res in data.get("eval", {}).items():
                for episode in res.get("episodes", []):
                    rows.append({"job": job_dir.name, "agent": agent, param: value, **episode})
        else:
            csv = job_dir / data.get("episodes_csv", "episodes.csv")
            for episode in pd.read_csv(csv).to_dict("records"):
                rows.append({"job": job_dir.name, param: value, **episode})
    return pd.DataFrame(rows)


def reward_sweep(
    sweep: pd.DataFrame,
    param: str,
    path: PathLike,
    metrics: Sequence[str] = ("test_acc", "params_added"),
    reps: int = 2000,
    seed: int = 0,
) -> pathlib.Path:
    """Each metric against the swept `param`, one line per agent: the IQM over the episodes
    (all seeds of all jobs) at each value with its 95% bootstrap CI as a band."""
    if sweep.empty:
        raise ValueError(f"no sweep results with {param!r} to plot")
    colors = agent_colors(dict.fromkeys(sweep["agent"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for agent, group in sweep.groupby("agent", sort=False):
            xs, mid, lo, hi = [], [], [], []
            for value, g in sorted(group.groupby(param), key=lambda kv: float(kv[0])):
                vals = g[metric].dropna().to_numpy(dtype=float)
                if vals.size == 0:
                    continue
                ci = stratified_bootstrap_ci([vals], iqm, reps, seed=seed)
                xs.append(float(value))
                mid.append(ci.estimate)
                lo.append(ci.lo)
                hi.append(ci.hi)
            ax.plot(xs, mid, marker="o", color=colors[agent], label=agent)
            ax.fill_between(xs, lo, hi, color=colors[agent], alpha=0.2)
        ax.set_xlabel(param)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Reward-weight sweep over {param} (IQM, 95% bootstrap CI)")
    return _save(fig, path)


# ------------------------------------------------------------------------ W&B


def log_figures(logger: Any, figures: Mapping[str, PathLike], tables: Mapping | None = None):
    """Log PNGs (and pandas tables) to the logger's W&B run as `plots/<name>` images (and
    `tables/<name>`). A NullLogger, or a RunLogger that is not running, logs nothing."""
    run = getattr(logger, "run", None)
    if run is None:
        return
    import wandb

    payload = {f"plots/{name}": wandb.Image(os.fspath(p)) for name, p in figures.items()}
    for name, df in (tables or {}).items():
        payload[f"tables/{name}"] = wandb.Table(dataframe=df.reset_index(drop=True))
    run.log(payload)
