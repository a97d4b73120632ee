"""Does growth pay on each task? Static host vs ceiling vs heuristic growth, over seeds.

- static: the host as built, never grown (NoOp agent);
- ceiling: the host with every slot grown from step 0 (`reset(options={"grow": ...})`), i.e.
  the capacity that full growth would add, trained for the same budget;
- heuristic: the hand-written growth rule of esper_gym/agents/baselines.py.

Prints a Markdown table of test accuracy (mean ± std) and parameters per task.

    python experiments/tasks_report.py --tasks spirals fashion_mnist fashion_mnist_cnn --seeds 3

With `--contexts train|test`, the same three per context instead: `--n-contexts` contexts of
that split (drawn once with a fixed generator, the same for every mode), each played from
`--seeds` seeds (`reset(options={"context": i})`), so the headroom (ceiling - static) and
what the heuristic captures of it are visible context by context; `--out` writes the rows
as CSV.

    python experiments/tasks_report.py --tasks spirals fashion_mnist --contexts test \
        --n-contexts 4 --seeds 2 --out results/contexts/headroom.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch
from report import report  # experiments/report.py: --report writes the output

import esper_gym
from esper_gym.agents.baselines import make_agent
from esper_gym.episode import play_episode
from esper_gym.tasks import CONTEXTS

GROW = ("residual_mlp", "conv3x3")  # the kernels full growth would add, linear / conv layers


def env_id(task: str) -> str:
    for id_, (name, _) in esper_gym.ENV_IDS.items():
        if name == task:
            return id_
    raise SystemExit(
        f"unknown task {task!r}; registered: {[t for t, _ in esper_gym.ENV_IDS.values()]}"
    )


def ceiling_episode(env, seed: int, options: dict | None = None) -> dict:
    env.reset(seed=seed, options={"grow": GROW, **(options or {})})
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(0)
        done = terminated or truncated
    return {"test_acc": info["test_acc"], "params": info["params"]}


def fmt(values: list[float], scale: float = 100.0) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.pstdev(values) * scale
    return f"{mean:.2f} ± {std:.2f}"


def agent_episode(env, name: str, seed: int, options: dict | None = None) -> dict:
    agent = make_agent("noop" if name == "static" else name, env)
    reset = env.reset

    def seeded_reset(**kw):  # play_episode resets with the seed only; add the context pick
        return reset(**{**kw, "options": options})

    env.reset = seeded_reset
    try:
        return play_episode(env, agent.act, seed)[0]
    finally:
        env.reset = reset


def context_label(context: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in context.items())


def contexts_report(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as kernel_dir:
        for task in args.tasks:
            space = CONTEXTS[task]
            pool = space.contexts(args.contexts)
            picks = np.random.default_rng(0).choice(len(pool), args.n_contexts, replace=False)
            env = gym.make(env_id(task), kernel_dir=kernel_dir, contexts=args.contexts)
            for index in sorted(int(i) for i in picks):
                start = time.perf_counter()
                options = {"context": index}
                acc = {"static": [], "ceiling": [], "heuristic": []}
                for seed in range(args.seeds):
                    for name in ("static", "heuristic"):
                        acc[name].append(agent_episode(env, name, seed, options)["test_acc"])
                    acc["ceiling"].append(ceiling_episode(env, seed, options)["test_acc"])
                mean = {k: 100 * statistics.fmean(v) for k, v in acc.items()}
                row = {
                    "task": task,
                    "split": args.contexts,
                    "context_index": index,
                    "context": context_label(pool[index]),
                    "seeds": args.seeds,
                    **{f"{k}_test_acc": round(v, 2) for k, v in mean.items()},
                    "headroom": round(mean["ceiling"] - mean["static"], 2),
                    "heuristic_gain": round(mean["heuristic"] - mean["static"], 2),
                    "wall_s": round(time.perf_counter() - start, 1),
                }
                rows.append(row)
                print(row, flush=True)
    print(
        f"\nTest accuracy % per {args.contexts} context (mean over {args.seeds} seeds); "
        "headroom = ceiling - static, heuristic gain = heuristic - static\n"
    )
    print("| task | context | static | ceiling | heuristic | headroom | heuristic gain |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['context_index']}: {r['context']} | {r['static_test_acc']:.2f} "
            f"| {r['ceiling_test_acc']:.2f} | {r['heuristic_test_acc']:.2f} "
            f"| {r['headroom']:+.2f} | {r['heuristic_gain']:+.2f} |"
        )
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["spirals", "fashion_mnist"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--contexts", choices=("train", "test"), default=None)
    parser.add_argument("--n-contexts", type=int, default=4)
    parser.add_argument("--out", default=None, help="CSV of the per-context rows")
    parser.add_argument(
        "--report", default=None, help="also write the output here (results/tasks_report.txt)"
    )
    args = parser.parse_args()
    with report(args.report):
        run_bench(args)


def run_bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if args.contexts:
        contexts_report(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as kernel_dir:
        for task in args.tasks:
            results = {"static": [], "ceiling": [], "heuristic": []}
            start = time.perf_counter()
            for seed in range(args.seeds):
                env = gym.make(env_id(task), kernel_dir=kernel_dir)
                for name in ("static", "heuristic"):
                    results[name].append(agent_episode(env, name, seed))
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
