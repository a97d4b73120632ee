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
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import pathlib
import sys
import time

import numpy as np
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esper_gym import config_dir  # noqa: E402
from esper_gym.agents.baselines import LAYER_RULES, PLANS_FILE, ScheduleAgent  # noqa: E402
from esper_gym.episode import play_episode  # noqa: E402
from esper_gym.evaluate import TaskSpec, make_env  # noqa: E402
from esper_gym.oracle import plan_family as family  # noqa: E402 (the oracle's family too)
from esper_gym.stats import iqm  # noqa: E402

HEADER = """\
# Tuned open-loop plans of the `schedule` agent, one per task (esper_gym.agents.baselines).
# Written by experiments/tune_schedule.py on train contexts and train seeds only; `agents=[schedule]`
# (esper_gym.evaluate) plays the plan of the task. `family`, `size`, `seeds` and `episodes` say
# what was searched; `mean_return` is the plan's mean over those train episodes.
"""


def score(task: str, contexts: str | None, plan, seed: int, kernel_dir) -> float:
    """The return of one episode of `plan` from `seed` (runs in a pool worker)."""
    import torch

    torch.set_num_threads(1)
    env = make_env(TaskSpec(task, task), kernel_dir=kernel_dir, contexts=contexts)
    agent = ScheduleAgent(env.observation_space, env.action_space, plan, env.task.blueprints)
    metrics, _ = play_episode(env, agent.act, seed)
    env.close()
    return float(metrics["return"])


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
    args = p.parse_args(argv)

    plans = family(args.counts, args.starts, args.gaps, args.blueprints, args.layers)
    seeds = list(range(args.seeds))
    jobs = [(i, j) for i in range(len(plans)) for j in range(len(seeds))]
    print(f"{args.task}: {len(plans)} plans x {len(seeds)} train seeds = {len(jobs)} episodes")
    returns = np.full((len(plans), len(seeds)), np.nan)
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.n_jobs, mp_context=ctx) as pool:
        futures = {
            pool.submit(score, args.task, args.contexts, plans[i], seeds[j], args.kernel_dir): (
                i,
                j,
            )
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
        "wall_s": round(wall),
        "command": "python experiments/tune_schedule.py " + " ".join(argv or sys.argv[1:]),
    }
    out = pathlib.Path(args.out)
    plans_doc = (yaml.safe_load(out.read_text()) if out.exists() else None) or {}
    plans_doc[args.task] = entry
    out.write_text(HEADER + yaml.safe_dump(plans_doc, sort_keys=False, default_flow_style=None))
    print(f"wrote the {args.task} plan to {out}")


if __name__ == "__main__":
    main()
