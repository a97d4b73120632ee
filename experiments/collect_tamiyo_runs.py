"""Commit-sized results of Tamiyo training runs: checkpoints, learning curves (CSV + figure).

Each run dir is one `python -m esper_gym.train` run (seed S) holding `checkpoint.pt` and
`train_metrics.csv`. Writes `<checkpoints>/tamiyo_seed<S>.pt` (the checkpoint after checking
that it loads with `weights_only=True`), `<out>/learning_curves.csv` (every run's rows, with
a `run` column) and `<out>/learning_curves.png`.

    for S in 0 1 2; do python -m esper_gym.train env.contexts=train env.vectorization=batched \\
        env.num_envs=16 agent.ppo.total_steps=32768 eval.episodes=0 logger=none seed=$S \\
        hydra.run.dir=outputs/tamiyo_seeds/seed$S; done
    python experiments/collect_tamiyo_runs.py outputs/tamiyo_seeds/seed0 outputs/tamiyo_seeds/seed1 \\
        outputs/tamiyo_seeds/seed2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import pandas as pd
import torch

from esper_gym import plots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="train run dirs")
    parser.add_argument(
        "--checkpoints", type=pathlib.Path, default=pathlib.Path("results/checkpoints")
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/tamiyo"))
    args = parser.parse_args()
    args.checkpoints.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    curves = []
    for run in args.runs:
        seed = json.loads((run / "run.json").read_text())["seed"]
        ckpt = run / "checkpoint.pt"
        torch.load(ckpt, weights_only=True)  # what is committed must load without pickle code
        target = args.checkpoints / f"tamiyo_seed{seed}.pt"
        shutil.copyfile(ckpt, target)
        curve = pd.read_csv(run / "train_metrics.csv")
        curve.insert(0, "run", f"seed{seed}")
        curves.append(curve)
        print(f"{target}: {target.stat().st_size / 1e3:.0f} kB, {len(curve)} updates")
    table = pd.concat(curves, ignore_index=True)
    table.to_csv(args.out / "learning_curves.csv", index=False)
    plots.learning_curves(table, args.out / "learning_curves.png")
    print(f"{args.out / 'learning_curves.csv'}, {args.out / 'learning_curves.png'}")


if __name__ == "__main__":
    main()
