"""What a gated Tamiyo checkpoint decides at each branch of its gate, on train contexts.

Behind `env.gate` most steps offer one action; the policy decides only where the gate offers
several (esper_gym.agents.gate). This plays each checkpoint behind its recorded gate on every
train context of its task, `--seeds` episodes each (seeds from 3,000,000: disjoint from the
training, selection and test seeds), sampling as evaluate does, and reports at its branch
points the probability the policy gave to growing:

- `first`: no seed grown yet, by progress (when does it grow, if at all);
- `another`: a seed already grown, a germination offered again (one seed more, or stop);

at the first growth, the probability of each size of plan the offered germinations open
(behind `counts` a germination names its plan's size; behind `plans` one germination can open
plans of several sizes, "1/3"); and how many seeds its episodes grew. Train contexts only: this is a diagnosis of the policy,
made where it was trained, not a score.

```bash
python experiments/gate_branches.py results/tamiyo_pace/plans/steps294k/checkpoints/*.pt \
    --seeds 1 --report results/tamiyo_pace/plans/steps294k/gate_branches.txt
```
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import report  # noqa: E402

from esper_gym.actions import GERMINATE  # noqa: E402
from esper_gym.agents.gate import ScheduleGate  # noqa: E402
from esper_gym.agents.tamiyo import load_checkpoint  # noqa: E402
from esper_gym.agents.tamiyo.policy import obs_to_batch  # noqa: E402
from esper_gym.env import MorphogeneticEnv  # noqa: E402
from esper_gym.observation import ObsView  # noqa: E402

FIRST_SEED = 3_000_000


def branches(
    path: str, seeds: int, contexts: int | None = None, **env_kwargs
) -> tuple[dict, collections.Counter, str, dict]:
    """(p(grow) at branch points keyed by (kind, progress), seeds grown per episode, gate, and
    at first-growth branches p keyed by (progress, sizes of the plans a germination opens)) on
    the first `contexts` train contexts (None: all)."""
    ckpt = load_checkpoint(path)
    gate, task = ckpt.env.get("gate"), ckpt.env.get("task")
    if gate is None or task is None or "+" in task:
        raise SystemExit(f"{path}: not a gated checkpoint of one task (env record {ckpt.env})")
    env = ScheduleGate(MorphogeneticEnv(task=task, contexts="train", **env_kwargs), gate)
    policy = load_checkpoint(path, env=env).policy.eval()  # sizes checked against this env
    layout = env.unwrapped.layout
    probs, grown = collections.defaultdict(list), collections.Counter()
    sized = collections.defaultdict(list)
    n_contexts = len(env.unwrapped.context_space.contexts("train"))
    for context in range(min(n_contexts, contexts or n_contexts)):
        for j in range(seeds):
            seed = FIRST_SEED + context * seeds + j
            obs, _ = env.reset(seed=seed, options={"context": context})
            generator = torch.Generator().manual_seed(seed)
            done, n_grown = False, 0
            while not done:
                with torch.inference_mode():
                    p = policy(obs_to_batch(obs))[0][0].softmax(-1).numpy()
                offered = np.flatnonzero(obs["action_mask"])
                grow = [a for a in offered if layout.decode(a).kind == GERMINATE]
                if len(offered) > 1 and grow:
                    kind = "another" if n_grown else "first"
                    progress = round(float(ObsView(obs).glob("progress")), 2)
                    probs[kind, progress].append(float(p[grow].sum()))
                    if not n_grown:
                        for size, p_size in plan_sizes(env.gate, grow, p).items():
                            sized[progress, size].append(p_size)
                action = int(torch.multinomial(torch.as_tensor(p), 1, generator=generator))
                n_grown += layout.decode(action).kind == GERMINATE
                obs, _, terminated, truncated, _ = env.step(action)
                done = terminated or truncated
            grown[n_grown] += 1
    return probs, grown, gate, sized


def plan_sizes(gate, grow: list[int], p: np.ndarray) -> dict[str, float]:
    """p of the germinations `grow`, keyed by the sizes of the live plans each one opens."""
    out = collections.defaultdict(float)
    for a in grow:
        sizes = {len(plan.plan) for plan, b in zip(gate.live, gate.proposals) if b == a}
        out["/".join(map(str, sorted(sizes)))] += float(p[a])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--seeds", type=int, default=2, help="episodes per train context")
    parser.add_argument("--report", type=pathlib.Path, default=None)
    args = parser.parse_args()
    with report(args.report):
        for path in args.checkpoints:
            probs, grown, gate, sized = branches(path, args.seeds)
            print(f"\n{path} (gate {gate}), {sum(grown.values())} train-context episodes")
            print("| branch | progress | times offered | mean p(grow) |")
            print("|---|---|---|---|")
            for (kind, progress), ps in sorted(probs.items()):
                print(f"| {kind} | {progress:.2f} | {len(ps)} | {np.mean(ps):.3f} |")
            counts = ", ".join(f"{k}: {grown[k]}" for k in sorted(grown))
            print(f"seeds grown per episode: {counts}")
            print("\n| first growth at | plan size | mean p |\n|---|---|---|")
            for (progress, size), ps in sorted(sized.items()):
                print(f"| {progress:.2f} | {size} | {np.mean(ps):.3f} |")


if __name__ == "__main__":
    main()
