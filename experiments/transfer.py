"""Zero-shot transfer: Tamiyo trained on spirals, evaluated on hosts and data it never saw.

Tamiyo reads the model as a graph, so one policy can steer a host with a different number of
layers, as long as the spaces match (same `max_nodes`, `seed_slots` and blueprint library: node
features and per-node actions then have the same sizes). This script:

1. trains Tamiyo (esper_gym.agents.tamiyo.train, PPO) on `Esper/Spirals-v0` (MLP hidden (16, 16): 3 graph
   nodes) for `--train-steps` env steps, logging its training curve to `train_metrics.csv`
   (skipped with `--checkpoint`: reuse a checkpoint, e.g. from `python -m esper_gym.train`);
2. evaluates it greedily, next to the heuristic, random and noop baselines, on the same
   held-out seeds of
   * `spirals`       in-task (the training task, new seeds),
   * `spirals_deep`  zero-shot, another graph: MLP hidden (16, 16, 16), 4 graph nodes,
   * `fashion_mnist` zero-shot, another dataset and host (784-32-10 linear bottleneck: 2 nodes);
3. writes `episodes.csv`, `summary.csv`, `transfer.md` (the table: IQM [95% CI] per task and
   agent, with the setting of each task) and `learning_curves.png`, `pareto.png` to `--out`.

```bash
nice python experiments/transfer.py --train-steps 8192 --seeds 5 --out results/transfer
nice python experiments/transfer.py --checkpoint outputs/<train run>/checkpoint.pt --out /tmp/t
```
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import gymnasium as gym
import pandas as pd

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `agents` lives at the root

from esper_gym.bench import plots, stats  # noqa: E402
from esper_gym.bench.report import SUMMARY_METRICS  # noqa: E402
from esper_gym.evaluate import EvalConfig, evaluate, resolve_tasks  # noqa: E402
from esper_gym.logger import CsvMetrics  # noqa: E402

SETTINGS = {
    "spirals": "in-task (trained here)",
    "spirals_deep": "zero-shot: other graph (4 nodes, not 3)",
    "fashion_mnist": "zero-shot: other dataset and host (2 nodes)",
}
VARIANTS = {"spirals_deep": {"task": "spirals", "host_kwargs": {"hidden": (16, 16, 16)}}}


def make_env(threads: int = 1) -> gym.Env:
    import torch

    torch.set_num_threads(threads)
    return gym.make("Esper/Spirals-v0")


def train(args, run_dir: pathlib.Path) -> pathlib.Path:
    from esper_gym.agents.tamiyo import PPOConfig
    from esper_gym.agents.tamiyo import train as ppo

    config = PPOConfig(
        total_steps=args.train_steps,
        num_envs=args.num_envs,
        rollout_steps=args.rollout_steps,
        lr=args.lr,
        seed=args.train_seed,
        checkpoint_every=2,
    )
    ckpt = run_dir / "checkpoint.pt"
    log = CsvMetrics(run_dir / "train_metrics.csv")
    ppo(config, functools.partial(make_env, 1), log=log, checkpoint_path=ckpt)
    return ckpt


def transfer_table(summary, rank_by: str = "test_acc") -> str:
    """The summary as Markdown with the transfer setting of each task in front."""
    table = stats.markdown_table(summary, rank_by=rank_by)
    lines = table.splitlines()
    out = []
    for line in lines:
        if line.startswith("| task |"):
            out.append("| setting " + line)
        elif line.startswith("|---"):
            out.append("|---" + line)
        elif line.startswith("| "):
            task = line.split("|")[1].strip()
            out.append(f"| {SETTINGS.get(task, '')} " + line)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="a trained Tamiyo checkpoint (skips training)")
    p.add_argument("--run-dir", default="outputs/transfer", help="checkpoint and train log")
    p.add_argument("--out", default="results/transfer")
    p.add_argument("--train-steps", type=int, default=8192)
    p.add_argument("--num-envs", type=int, default=4)
    p.add_argument("--rollout-steps", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--tasks", nargs="+", default=list(SETTINGS))
    p.add_argument("--kernel-dir", default=None)
    p.add_argument(
        "--tables-only", action="store_true", help="only rewrite transfer.md from --out's CSV"
    )
    args = p.parse_args(argv)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tables_only:  # rewrite transfer.md from the episodes already in --out
        episodes = pd.read_csv(out / "episodes.csv")
        ckpt = episodes.query("agent == 'tamiyo'")["checkpoint"].iloc[0]
        summary = stats.summarize(episodes, SUMMARY_METRICS)
        write_table(out, summary, ckpt, episodes["seed"].nunique())
        return
    if args.checkpoint:
        ckpt = pathlib.Path(args.checkpoint)
    else:
        run_dir = pathlib.Path(args.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        ckpt = train(args, run_dir)
        print(f"trained {args.train_steps} steps in {time.perf_counter() - start:.0f}s -> {ckpt}")
        plots.learning_curves(run_dir / "train_metrics.csv", out / "learning_curves.png")
        (out / "train_metrics.csv").write_bytes((run_dir / "train_metrics.csv").read_bytes())

    tasks = resolve_tasks(args.tasks, VARIANTS)
    result = evaluate(
        EvalConfig(
            ["tamiyo", "heuristic", "random", "noop"],
            tasks,
            args.seeds,
            out,
            checkpoints={"tamiyo": str(ckpt)},
            n_jobs=args.n_jobs,
            kernel_dir=args.kernel_dir,
            timeline={"agent": "tamiyo"},
        )
    )
    write_table(out, result.summary, ckpt, args.seeds)


def write_table(out: pathlib.Path, summary, ckpt, seeds: int) -> None:
    header = (
        f"# Zero-shot transfer of Tamiyo (checkpoint `{ckpt}`)\n\n"
        f"Trained on spirals only; {seeds} held-out seeds per (task, agent).\n\n"
    )
    text = header + transfer_table(summary)
    (out / "transfer.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
