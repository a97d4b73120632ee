"""Paired differences of some agents against several others, from an evaluation's episodes.csv.

`esper_gym.evaluate` compares every agent with one reference per task (the non-privileged
baseline with the highest IQM return). A claim often needs more: the agent against its teacher,
against NoOp, or against the baseline with the highest mean paired difference. This prints, for
each (task, agent, other, metric), the mean per-seed difference agent - other on common seeds
with its paired bootstrap 95% CI (esper_gym.stats.paired_difference, as evaluate computes it),
and writes the table as CSV next to the episodes.

    python experiments/paired_table.py results/tamiyo/test_contexts \
        --agents tamiyo0 tamiyo1 tamiyo2 --against schedule gradmax north noop \
        --metrics return test_acc params_added
"""

from __future__ import annotations

import argparse
import pathlib

import pandas as pd

from esper_gym import stats


def paired_table(
    episodes: pd.DataFrame, agents: list[str], against: list[str], metrics: list[str]
) -> pd.DataFrame:
    known = set(episodes["agent"])
    missing = [a for a in [*agents, *against] if a not in known]
    if missing:
        raise SystemExit(f"agents {missing} are not in the episodes; there: {sorted(known)}")
    rows = []
    for task, block in episodes.groupby("task", sort=False):
        for agent in agents:
            for other in against:
                both = block[block["agent"] == agent].merge(
                    block[block["agent"] == other], on="seed", suffixes=("", "_other")
                )
                for metric in metrics:
                    diff = (both[metric] - both[f"{metric}_other"]).to_numpy(float)
                    ci = stats.paired_difference([diff])
                    rows.append(
                        {
                            "task": task,
                            "agent": agent,
                            "other": other,
                            "metric": metric,
                            "n": len(diff),
                            "diff": ci.estimate,
                            "lo": ci.lo,
                            "hi": ci.hi,
                        }
                    )
    return pd.DataFrame(rows)


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
            r = g[g["agent"] == agent].iloc[0]
            cells.append(fmt.format(r["diff"] * scale, r["lo"] * scale, r["hi"] * scale))
        lines.append(f"| {task} | {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=pathlib.Path, help="an evaluate out_dir (episodes.csv)")
    parser.add_argument("--agents", nargs="+", required=True)
    parser.add_argument("--against", nargs="+", required=True)
    parser.add_argument("--metrics", nargs="+", default=["return"])
    args = parser.parse_args()
    episodes = pd.read_csv(args.results / "episodes.csv")
    table = paired_table(episodes, args.agents, args.against, args.metrics)
    table.to_csv(args.results / "paired.csv", index=False)
    for metric in args.metrics:
        print(markdown(table, metric), end="\n\n")
    print(f"wrote {args.results / 'paired.csv'}")


if __name__ == "__main__":
    main()
