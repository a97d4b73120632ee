"""Paired differences of some agents against several others, from an evaluation's episodes.csv.

`esper_gym.evaluate` compares every agent with one reference per task (the non-privileged
baseline with the highest IQM return). A claim often needs more: the agent against its teacher,
against NoOp, or against the baseline with the highest mean paired difference. This prints, for
each (task, agent, other, metric), the mean per-seed difference agent - other on common seeds
with its paired bootstrap 95% CI (esper_gym.bench.stats.paired_difference, as evaluate computes it),
and writes the table as CSV next to the episodes.

    python experiments/paired_table.py results/tamiyo/test_contexts \
        --agents tamiyo0 tamiyo1 tamiyo2 --against schedule gradmax north noop \
        --metrics return test_acc params_added

`--by-context`: the CIs resample whole contexts (an evaluation on contexts, `context_index`):
what carries to other contexts of the split, not only to other seeds of the contexts played.

`--pool NAME=a,b` (repeatable) also writes pooled.csv: the agents a, b (one checkpoint per
training seed, say) as one agent NAME, their paired differences joined (bench.paired.pooled_table).

`--also DIR` (repeatable) adds the agents of another evaluate run's episodes.csv that played the
same episodes (refused unless every agent both hold has the very same per-seed returns), e.g. the
oracle of a main evaluation for a later one that left it out. Where the episodes hold the oracle
and the schedule, each agent's share of the oracle's advantage over the schedule
(bench.oracle.oracle_gap_share) is printed and written to oracle_share.csv beside the table.

`--per-context` also writes per_context.csv: per test context, each agent's mean paired
difference against each other agent and both one's most frequent germination plans.

`--merge` adds the evaluation episodes of `python -m esper_gym.train` runs (their
`results.json`: the trained agent and `eval.compare`), e.g. an SB3 agent, which
`esper_gym.evaluate` cannot load. Its episodes pair with the evaluate run's only if they are the
same episodes (train's `eval.first_seed` and contexts as evaluate's `first_seed` and `contexts`):
every agent both hold must have the very same per-seed returns, or the merge is refused.
"""

from __future__ import annotations

import argparse
import pathlib

import pandas as pd

from esper_gym.bench.oracle import ORACLE, oracle_gap_share
from esper_gym.bench.paired import (  # noqa: F401  (the logic lives in the package)
    EPISODE_FIELDS,
    markdown,
    merge,
    other_players,
    paired_table,
    per_context,
    pooled_table,
    train_episodes,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=pathlib.Path, help="an evaluate out_dir (episodes.csv)")
    parser.add_argument("--agents", nargs="+", required=True)
    parser.add_argument("--against", nargs="+", required=True)
    parser.add_argument("--metrics", nargs="+", default=["return"])
    parser.add_argument(
        "--merge", nargs="*", type=pathlib.Path, default=[],
        help="results.json of esper_gym.train runs whose evaluation played the same episodes",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=pathlib.Path, default=None, help="default: <results>/paired.csv"
    )
    parser.add_argument(
        "--also", nargs="*", type=pathlib.Path, default=[],
        help="evaluate out_dirs whose episodes.csv played the same episodes (their other agents)",
    )  # fmt: skip
    parser.add_argument("--pool", nargs="*", default=[], help="NAME=agent,agent,...")
    parser.add_argument(
        "--per-context", action="store_true", help="also write per_context.csv beside the table"
    )
    parser.add_argument(
        "--by-context", action="store_true",
        help="CIs resample whole contexts (context_index), not episodes",
    )  # fmt: skip
    args = parser.parse_args()
    episodes = pd.read_csv(args.results / "episodes.csv")
    for path in args.merge:
        episodes = merge(episodes, train_episodes(path), path)
    for path in args.also:
        episodes = merge(
            episodes, other_players(episodes, pd.read_csv(path / "episodes.csv")), path
        )
    table = paired_table(episodes, args.agents, args.against, args.metrics, args.by_context)
    out = args.out or args.results / "paired.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    for metric in args.metrics:
        print(markdown(table, metric), end="\n\n")
    print(f"wrote {out}")
    if args.per_context:
        rows = per_context(episodes, args.agents, args.against)
        rows.to_csv(out.with_name("per_context.csv"), index=False)
        print(f"wrote {out.with_name('per_context.csv')}")
    shares = oracle_gap_share(episodes[episodes["agent"].isin([*args.agents, ORACLE, "schedule"])])
    if len(shares):
        shares.to_csv(out.with_name("oracle_share.csv"), index=False)
        for row in shares.itertuples():
            print(f"{row.task} {row.agent}: oracle share {row.oracle_gap_share:.3f}")
        print(f"wrote {out.with_name('oracle_share.csv')}")
    if args.pool:
        pools = {}
        for spec in args.pool:
            name, _, members = spec.partition("=")
            if not name or not members:
                raise SystemExit(f"--pool {spec!r}: expected NAME=agent,agent,...")
            pools[name] = members.split(",")
        pooled = pooled_table(episodes, pools, args.against, args.metrics, args.by_context)
        pooled_out = out.with_name("pooled.csv")
        pooled.to_csv(pooled_out, index=False)
        for metric in args.metrics:
            print(markdown(pooled, metric), end="\n\n")
        print(f"wrote {pooled_out}")


if __name__ == "__main__":
    main()
