"""Does growth pay on each task? Static host vs ceiling vs heuristic growth, over seeds.

- static: the host as built, never grown (NoOp agent);
- ceiling: the host with every slot grown from step 0 (`reset(options={"grow": ...})`), i.e.
  the capacity that full growth would add, trained for the same budget;
- heuristic: the hand-written growth rule of esper_gym/agents/baselines.py.

Prints a Markdown table of test accuracy (mean ± std) and parameters per task.

    python experiments/tasks_report.py --tasks spirals fashion_mnist fashion_mnist_cnn --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import gymnasium as gym
import torch

import esper_gym
from esper_gym.agents.baselines import make_agent, run_episode

GROW = ("residual_mlp", "conv3x3")  # the kernels full growth would add, linear / conv layers


def env_id(task: str) -> str:
    for id_, (name, _) in esper_gym.ENV_IDS.items():
        if name == task:
            return id_
    raise SystemExit(
        f"unknown task {task!r}; registered: {[t for t, _ in esper_gym.ENV_IDS.values()]}"
    )


def ceiling_episode(env, seed: int) -> dict:
    env.reset(seed=seed, options={"grow": GROW})
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(0)
        done = terminated or truncated
    return {"test_acc": info["test_acc"], "params": info["params"]}


def fmt(values: list[float], scale: float = 100.0) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.pstdev(values) * scale
    return f"{mean:.2f} ± {std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["spirals", "fashion_mnist"])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as kernel_dir:
        for task in args.tasks:
            results = {"static": [], "ceiling": [], "heuristic": []}
            start = time.perf_counter()
            for seed in range(args.seeds):
                env = gym.make(env_id(task), kernel_dir=kernel_dir)
                for name in ("static", "heuristic"):
                    agent = make_agent("noop" if name == "static" else "heuristic", env)
                    results[name].append(run_episode(env, agent, seed=seed))
                results["ceiling"].append(ceiling_episode(env, seed))
            elapsed = time.perf_counter() - start
            acc = {k: [r["test_acc"] for r in v] for k, v in results.items()}
            params = {k: statistics.fmean(r["params"] for r in v) for k, v in results.items()}
            rows.append(
                f"| {task} | {fmt(acc['static'])} ({params['static']:.0f}) "
                f"| {fmt(acc['ceiling'])} ({params['ceiling']:.0f}) "
                f"| {fmt(acc['heuristic'])} ({params['heuristic']:.0f}) | {elapsed:.0f} s |"
            )
            print(rows[-1], flush=True)
    print(f"\nTest accuracy % (mean ± std over {args.seeds} seeds; parameters in brackets)\n")
    print("| task | static host | ceiling (all slots grown) | heuristic growth | wall |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
