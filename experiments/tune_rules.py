"""Tune the growth rules (`north`, `fragrow`, `gradmax`; `reactive`) on train contexts.

A published rule is only a fair baseline with thresholds fit to the task, as the schedule's plan
is (experiments/tune_schedule.py). This script grid-searches a small stated family of parameters
per rule on **train contexts and train seeds only** (seeds `0..seeds-1`, disjoint from the
held-out seeds `1_000_000 + i` that esper_gym.evaluate scores), every candidate on the same
seeds (same contexts, data and inits: common random numbers), and writes each rule's best to
`conf/rule_params.yaml`, where `agents=[north, fragrow, gradmax]` (params: null) find them.

The family (all combinations of the flags' values; the other parameters keep their defaults:
`hidden_only` true, blueprint preference residual_mlp, conv3x3, bottleneck, low_rank):
- north: `--thresholds` (effective rank / width that triggers growth) x `--lates` (no growth
  after this training progress);
- fragrow: `--growths` (number of seeds) x `--alphas` (sigmoid offset of the interval);
- gradmax: `--intervals` (progress between seeds) x `--starts` (progress of the first) x
  `--growths`;
- reactive (not published; the rule that reads the run): `--looks` (progress from which it
  reads) x `--min-slopes` (val accuracy per unit progress below which learning has stalled; -1
  turns it off) x `--max-slopes` (above which the run learns fast enough alone) x `--max-accs`
  (val accuracy above which the run is done) x `--max-gaps` (how far training accuracy may sit
  below validation accuracy: label noise; 1 turns the check off) x `--reactive-growths` (seeds
  once triggered); `window` 3, `late` 0.6 and `hidden_only` false keep their defaults. A first
  search (min slope 0.3/1/2 x max acc 0.8/1 x max gap 0.02/1 x growths 2/3, no max slope)
  chose a slope floor that skipped the slow runs where growth pays most: -0.20 against the
  schedule on spirals_budget's test contexts (results/value_of_reacting/spirals_budget.md).

```bash
nice python experiments/tune_rules.py --task spirals --contexts train --seeds 8 --n-jobs 2
nice -n 10 python experiments/tune_rules.py --task spirals_budget --rules reactive --seeds 24
```
Selection is by mean return over the train episodes, ties broken by grid order (the first,
most conservative, candidate); NoOp is scored on the same seeds for reference.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import multiprocessing
import pathlib
import sys
import time

import numpy as np
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esper_gym import config_dir  # noqa: E402
from esper_gym.agents.baselines import NoOpAgent  # noqa: E402
from esper_gym.agents.rules import PARAMS_FILE, RULES  # noqa: E402
from esper_gym.bench.jobs import TaskSpec, task_env  # noqa: E402
from esper_gym.bench.stats import iqm  # noqa: E402
from esper_gym.episode import play_episode  # noqa: E402

HEADER = """\
# Tuned parameters of the growth rules, per task and rule (esper_gym.agents.rules).
# Written by experiments/tune_rules.py on train contexts and train seeds only; `agents=[north,
# fragrow, gradmax, reactive]` (esper_gym.evaluate, params: null) play the task's entry.
# `family`, `size`, `seeds` and `episodes` say what was searched; `mean_return` is the chosen
# parameters' mean over those train episodes, `noop_mean_return` NoOp's on the same episodes;
# `wall_s` is the whole run's (every rule and NoOp). An entry with `tuned: false` would hold
# the rule's defaults, not searched (see its `note`).
"""


def grids(args) -> dict[str, list[dict]]:
    """Every candidate of each rule's family (module docstring), in grid order."""

    def product(**axes) -> list[dict]:
        keys = list(axes)
        return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]

    return {
        "north": product(threshold=args.thresholds, late=args.lates),
        "fragrow": product(growths=args.growths, alpha=args.alphas),
        "gradmax": [
            p
            for p in product(interval=args.intervals, start=args.starts, growths=args.growths)
            if p["start"] + (p["growths"] - 1) * p["interval"] < 1  # every seed fits the run
        ],
        "reactive": product(
            look=args.looks,
            min_slope=args.min_slopes,
            max_slope=args.max_slopes,
            max_acc=args.max_accs,
            max_gap=args.max_gaps,
            growths=args.reactive_growths,
        ),
    }


def score(task: str, contexts: str, rule: str | None, params: dict, seed: int, kernel_dir):
    """The return of one episode of `rule` with `params` (None: NoOp) from `seed`."""
    import torch

    torch.set_num_threads(1)
    env = task_env(TaskSpec(task, task), kernel_dir=kernel_dir, contexts=contexts)
    if rule is None:
        agent = NoOpAgent()
    else:
        agent = RULES[rule](
            env.observation_space, env.action_space, env.unwrapped.task.blueprints, **params
        )
    metrics, _ = play_episode(env, agent.act, seed)
    env.close()
    return float(metrics["return"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--contexts", default="train", choices=["train"])  # never tune on test
    p.add_argument("--seeds", type=int, default=8, help="train seeds 0..seeds-1")
    published = [r for r in RULES if r != "reactive"]  # reactive: ask for it (--rules reactive)
    p.add_argument("--rules", nargs="+", default=published, choices=list(RULES))
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.15, 0.2, 0.25, 0.3, 0.4])
    p.add_argument("--lates", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--growths", type=int, nargs="+", default=[2, 3, 4, 6])
    p.add_argument("--alphas", type=float, nargs="+", default=[-2.0, 0.0, 2.0, 4.0])
    p.add_argument("--intervals", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--starts", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    p.add_argument("--looks", type=float, nargs="+", default=[0.1, 0.25])
    p.add_argument("--min-slopes", type=float, nargs="+", default=[-1.0, 0.3])
    p.add_argument("--max-slopes", type=float, nargs="+", default=[1.0, 3.0, 100.0])
    p.add_argument("--max-accs", type=float, nargs="+", default=[0.7, 0.85, 1.0])
    p.add_argument("--max-gaps", type=float, nargs="+", default=[1.0])
    p.add_argument("--reactive-growths", type=int, nargs="+", default=[2])
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--kernel-dir", default=None)
    p.add_argument("--out", default=str(config_dir() / PARAMS_FILE))
    args = p.parse_args(argv)

    family = {rule: cands for rule, cands in grids(args).items() if rule in args.rules}
    seeds = list(range(args.seeds))
    # (rule, candidate index) per row; NoOp first, the reference every rule is read against.
    rows = [(None, {})] + [(rule, c) for rule, cands in family.items() for c in cands]
    jobs = [(i, j) for i in range(len(rows)) for j in range(len(seeds))]
    print(f"{args.task}: {len(rows)} candidates x {len(seeds)} train seeds = {len(jobs)} episodes")
    returns = np.full((len(rows), len(seeds)), np.nan)
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.n_jobs, mp_context=ctx) as pool:
        futures = {}
        for i, j in jobs:
            rule, params = rows[i]
            job = (args.task, args.contexts, rule, params, seeds[j], args.kernel_dir)
            futures[pool.submit(score, *job)] = (i, j)
        for done, f in enumerate(concurrent.futures.as_completed(futures), 1):
            returns[futures[f]] = f.result()
            if done % 25 == 0:
                print(f"  {done}/{len(jobs)} episodes, {time.perf_counter() - start:.0f}s")
    wall = time.perf_counter() - start
    mean = returns.mean(axis=1)
    noop = float(mean[0])
    print(f"done in {wall:.0f}s; NoOp mean return {noop:.3f}")
    out = pathlib.Path(args.out)
    doc = (yaml.safe_load(out.read_text()) if out.exists() else None) or {}
    entries = doc.setdefault(args.task, {})
    command = "python experiments/tune_rules.py " + " ".join(argv or sys.argv[1:])
    for rule, cands in family.items():
        idx = [i for i, (r, _) in enumerate(rows) if r == rule]
        # Highest mean; among equals the first in grid order (stable sort).
        order = sorted(idx, key=lambda i: -round(mean[i], 9))
        print(f"{rule}: top candidates by mean return on train contexts:")
        for i in order[:3]:
            print(f"  {mean[i]:7.3f}  IQM {iqm(returns[i]):7.3f}  {rows[i][1]}")
        best = order[0]
        axes = {k: sorted({c[k] for c in cands}) for k in cands[0]}
        entries[rule] = {
            "params": dict(rows[best][1]),
            "tuned": True,
            "mean_return": round(float(mean[best]), 4),
            "noop_mean_return": round(noop, 4),
            "runner_up_mean_return": round(float(mean[order[1]]), 4) if len(order) > 1 else None,
            "contexts": args.contexts,
            "seeds": list(seeds),  # a copy per entry: no YAML anchors
            "family": axes,
            "size": len(cands),
            "episodes": len(cands) * len(seeds),
            "wall_s": round(wall),  # the whole run: every rule and NoOp together
            "command": command,
        }
    out.write_text(HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    print(f"wrote the {args.task} parameters of {', '.join(family)} to {out}")


if __name__ == "__main__":
    main()
