"""What the count gate's reordering alone is worth: each multi-seed plan of a task's family
played in its own order and in `count_first` order (the same seeds, a burst grown from its
last layer), paired on the same contexts and seeds.

The count gate (esper_gym/agents/gate.py) offers the family in `count_first` order, the oracle
and the plan-family gate in the family's. A return difference between the two orders is then
part of what separates a policy behind the count gate from the oracle, not a decision. Seeds
from 3,000,000 (disjoint from the training, selection and scored test seeds).

```bash
python experiments/burst_order.py --task spirals_pace --contexts test --seeds 1 \
    --report results/tamiyo_pace/counts/burst_order.txt             # 8 min, one core
```
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import report  # noqa: E402

from esper_gym.agents.baselines import make_agent  # noqa: E402
from esper_gym.agents.gate import count_first, gate_plans  # noqa: E402
from esper_gym.bench.stats import paired_difference  # noqa: E402
from esper_gym.env import MorphogeneticEnv  # noqa: E402
from esper_gym.episode import play_episode  # noqa: E402

FIRST_SEED = 3_000_000


def plan_name(plan) -> str:
    return " ".join(f"{g.at}:{g.blueprint}:{g.layer}" for g in plan)


def order_effects(
    task: str, contexts: str, seeds: int, n_contexts: int | None = None, **env_kwargs
) -> list[tuple[str, list[float]]]:
    """(plan, count_first order's return minus the plan's own, one per (context, seed)) for
    every plan of `task`'s family that `count_first` reorders."""
    env = MorphogeneticEnv(task=task, contexts=contexts, **env_kwargs)
    n = len(env.context_space.contexts(contexts))
    out = []
    for plan in gate_plans(task, "plans"):
        reordered = count_first(plan)
        if [g.layer for g in reordered] == list(range(len(plan))):
            continue  # one seed per burst: the same plan
        diffs = []
        for context in range(min(n, n_contexts or n)):
            for j in range(seeds):
                seed = FIRST_SEED + context * seeds + j
                returns = []
                for p in (plan, reordered):
                    agent = make_agent("schedule", env, plan=list(p))
                    row, _ = play_episode(env, agent.act, seed, {"context": context})
                    returns.append(row["return"])
                diffs.append(returns[1] - returns[0])
        out.append((plan_name(plan), diffs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="spirals_pace")
    parser.add_argument("--contexts", default="test", choices=["train", "test"])
    parser.add_argument("--seeds", type=int, default=1, help="episodes per context")
    parser.add_argument("--report", type=pathlib.Path, default=None)
    args = parser.parse_args()
    with report(args.report):
        effects = order_effects(args.task, args.contexts, args.seeds)
        print(f"{args.task}, {args.contexts} contexts, {args.seeds} seed(s) each from {FIRST_SEED}")
        print("| plan (family order) | episodes | count_first order minus own [95% CI] |")
        print("|---|---|---|")
        for name, diffs in effects:
            ci = paired_difference([diffs])
            print(f"| {name} | {len(diffs)} | {ci.estimate:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}] |")


if __name__ == "__main__":
    main()
