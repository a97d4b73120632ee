"""Tune the `schedule` baseline: the best open-loop plan of a small family, on train contexts.

A learned controller that does not beat the best fixed schedule has learned a schedule, not to
react (DESIGN.md, "Baselines"). This script finds that schedule honestly: it scores every plan
of a stated family on **train contexts and train seeds only** (seeds `0..seeds-1`, disjoint from
the held-out seeds `1_000_000 + i` that esper_gym.evaluate scores), every plan on the same
seeds (so the same contexts, data and inits: common random numbers), and writes the plan with
the highest mean return to `conf/schedule_plans.yaml`, where `agents=[schedule]` finds it.

The family (all combinations, duplicates removed; the empty plan, i.e. NoOp, is a member):
- count: `--counts` germinations (default 1, 2, 3), all of one blueprint (`--blueprints`);
- times: the i-th at progress `start + i * gap` (`--starts` 0, 0.2; `--gaps` 0.1, 0.2);
- layer rule (`--layers`): every germination in the `first` or `last` host layer, or `next`
  (one layer after another, wrapping).
Seeds are advanced as soon as the mask allows and never culled (ScheduleAgent).

```bash
nice python experiments/tune_schedule.py --task spirals --contexts train --seeds 6 --n-jobs 2
python experiments/tune_schedule.py --task fashion_mnist --contexts train --seeds 3 --counts 1 2
```
Selection is by mean return (the quantity the agents maximise; with few seeds the mean uses
every episode, the IQM would drop half of them), ties broken by the smaller plan.

`--per-context K` plays every plan on `--n-contexts` train contexts (a fixed spread subset;
all with 0) with K train seeds each (`reset(options={"context": i})`), writes the returns
table (`--table`, default results/value_of_reacting/<task>_train.csv) and, besides the best
single plan, the **pruned family** (`plans`: NoOp, the best single plan, and every plan that is
the best of some train context by its mean over the K seeds) that the oracle, the hindsight
bound and experiments/value_of_reacting.py search instead of the whole family:
```bash
nice -n 10 python experiments/tune_schedule.py --task spirals_budget --per-context 2 \
    --n-contexts 24 --counts 1 2 3 --starts 0.0 0.25 0.5 --gaps 0.0 --layers next --n-jobs 2
```
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import pathlib
import sys
import time

import numpy as np
import pandas as pd
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esper_gym import config_dir  # noqa: E402
from esper_gym.agents.baselines import LAYER_RULES, PLANS_FILE, ScheduleAgent  # noqa: E402
from esper_gym.bench.jobs import TaskSpec, task_env  # noqa: E402
from esper_gym.bench.oracle import describe  # noqa: E402
from esper_gym.bench.oracle import plan_family as family  # noqa: E402 (the oracle's family too)
from esper_gym.bench.stats import iqm  # noqa: E402
from esper_gym.episode import play_episode  # noqa: E402

HEADER = """\
# Tuned open-loop plans of the `schedule` agent, one per task (esper_gym.agents.baselines).
# Written by experiments/tune_schedule.py on train contexts and train seeds only; `agents=[schedule]`
# (esper_gym.evaluate) plays the plan of the task. `family`, `size`, `seeds` and `episodes` say
# what was searched; `mean_return` is the plan's mean over those train episodes.
"""


def score(task: str, contexts: str | None, plan, seed: int, kernel_dir, context=None) -> float:
    """The return of one episode of `plan` from `seed` (runs in a pool worker), in context
    `context` of the split (None: the one the seed draws)."""
    import torch

    torch.set_num_threads(1)
    env = task_env(TaskSpec(task, task), kernel_dir=kernel_dir, contexts=contexts)
    agent = ScheduleAgent(
        env.observation_space, env.action_space, plan, env.unwrapped.task.blueprints
    )
    options = None if context is None else {"context": int(context)}
    metrics, _ = play_episode(env, agent.act, seed, options)
    env.close()
    return float(metrics["return"])


def train_contexts(task: str, n: int) -> list[int]:
    """`n` train context indices of `task` (all with n <= 0): a fixed spread subset, sorted."""
    from esper_gym.tasks import get_task

    total = len(get_task(task).context_space.contexts("train"))
    if n <= 0 or n >= total:
        return list(range(total))
    return sorted(np.random.default_rng(0).permutation(total)[:n].tolist())


def pruned(plans, returns: np.ndarray, best: int) -> tuple[list[int], dict[int, int]]:
    """NoOp, the best single plan and each plan that is the best of some context (`returns`:
    plans x contexts x seeds; ties: fewer germinations), and how many contexts each wins."""
    wins: dict[int, int] = {}
    for c in range(returns.shape[1]):
        mean = returns[:, c].mean(axis=1)
        i = min(range(len(plans)), key=lambda i: (-round(mean[i], 9), len(plans[i]), i))
        wins[i] = wins.get(i, 0) + 1
    return sorted({0, best, *wins}), wins


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--contexts", default="train", choices=["train"])  # never tune on test
    p.add_argument("--seeds", type=int, default=6, help="train seeds 0..seeds-1")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--starts", type=float, nargs="+", default=[0.0, 0.2])
    p.add_argument("--gaps", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--blueprints", nargs="+", default=["residual_mlp", "low_rank"])
    p.add_argument("--layers", nargs="+", default=["first", "next", "last"], choices=LAYER_RULES)
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--kernel-dir", default=None)
    p.add_argument("--out", default=str(config_dir() / PLANS_FILE))
    p.add_argument("--per-context", type=int, default=0, help="seeds per train context")
    p.add_argument("--n-contexts", type=int, default=0, help="train contexts (0: all)")
    p.add_argument("--table", default=None, help="returns table (csv) with --per-context")
    args = p.parse_args(argv)

    plans = family(args.counts, args.starts, args.gaps, args.blueprints, args.layers)
    if args.per_context:
        contexts = train_contexts(args.task, args.n_contexts)
        seeds = list(range(args.per_context))
        cells = [(c, s) for c in contexts for s in seeds]
    else:
        contexts, seeds = [None], list(range(args.seeds))
        cells = [(None, s) for s in seeds]
    jobs = [(i, j) for i in range(len(plans)) for j in range(len(cells))]
    print(f"{args.task}: {len(plans)} plans x {len(cells)} train episodes = {len(jobs)} episodes")
    returns = np.full((len(plans), len(cells)), np.nan)
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.n_jobs, mp_context=ctx) as pool:
        futures = {
            pool.submit(
                score, args.task, args.contexts, plans[i], cells[j][1], args.kernel_dir, cells[j][0]
            ): (i, j)
            for i, j in jobs
        }
        for done, f in enumerate(concurrent.futures.as_completed(futures), 1):
            returns[futures[f]] = f.result()
            if done % 25 == 0:
                print(f"  {done}/{len(jobs)} episodes, {time.perf_counter() - start:.0f}s")
    wall = time.perf_counter() - start
    mean = returns.mean(axis=1)
    # Highest mean; among equals the plan with fewer germinations (cheaper, simpler).
    order = sorted(range(len(plans)), key=lambda i: (-round(mean[i], 9), len(plans[i])))
    print(f"done in {wall:.0f}s; top plans by mean return on train contexts:")
    for i in order[:5]:
        desc = ", ".join(f"{g['at']}:{g['blueprint']}:{g['layer']}" for g in plans[i]) or "(none)"
        print(f"  {mean[i]:7.3f}  IQM {iqm(returns[i]):7.3f}  {desc}")
    noop = mean[0]
    best = order[0]
    entry = {
        "plan": [dict(g) for g in plans[best]],
        "mean_return": round(float(mean[best]), 4),
        "noop_mean_return": round(float(noop), 4),
        "runner_up_mean_return": round(float(mean[order[1]]), 4) if len(order) > 1 else None,
        "contexts": args.contexts,
        "seeds": seeds,
        "family": {
            "counts": args.counts,
            "starts": args.starts,
            "gaps": args.gaps,
            "blueprints": args.blueprints,
            "layers": args.layers,
        },
        "size": len(plans),
        "episodes": len(jobs),
        **({"contexts_played": contexts} if args.per_context else {}),
        "wall_s": round(wall),
        "command": "python experiments/tune_schedule.py " + " ".join(argv or sys.argv[1:]),
    }
    if args.per_context:
        table = returns.reshape(len(plans), len(contexts), len(seeds))
        keep, wins = pruned(plans, table, best)
        entry["plans"] = [[dict(g) for g in plans[i]] for i in keep]
        entry["plans_wins"] = [wins.get(i, 0) for i in keep]  # train contexts each is best in
        print(f"pruned family: {len(keep)} of {len(plans)} plans (NoOp, best, per-context bests)")
        for i in keep:
            print(f"  wins {wins.get(i, 0):3d}  mean {mean[i]:7.3f}  {describe(plans[i])}")
        path = pathlib.Path(
            args.table or ROOT / "results" / "value_of_reacting" / f"{args.task}_train.csv"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {
                "plan_id": i,
                "plan": describe(plans[i]),
                "context": c,
                "seed": s,
                "return": returns[i, j],
            }
            for i in range(len(plans))
            for j, (c, s) in enumerate(cells)
        ]
        pd.DataFrame(rows).to_csv(path, index=False)
        print(f"wrote the returns table to {path}")
    out = pathlib.Path(args.out)
    plans_doc = (yaml.safe_load(out.read_text()) if out.exists() else None) or {}
    plans_doc[args.task] = entry
    out.write_text(HEADER + yaml.safe_dump(plans_doc, sort_keys=False, default_flow_style=None))
    print(f"wrote the {args.task} plan to {out}")


if __name__ == "__main__":
    main()
