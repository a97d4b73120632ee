"""Commit-sized results of Tamiyo training runs: checkpoints, learning curves (CSV + figure).

Each run dir is one `python -m esper_gym.train` run (seed S) holding `checkpoint.pt` and
`train_metrics.csv`. Writes `<checkpoints>/tamiyo_seed<S>.pt` (the checkpoint after checking
that it loads with `weights_only=True`; `--policy-only`: the policy without the Adam state, a
third the size, for evaluation only), `<out>/learning_curves.csv` (every run's rows, with
a `run` column) and `<out>/learning_curves.png`.

    for S in 0 1 2; do python -m esper_gym.train env.contexts=train env.vectorization=batched \\
        env.num_envs=16 'env.also_train_on=[fashion_mnist]' agent.ppo.total_steps=32768 \\
        agent.ppo.imitation_episodes=256 agent.ppo.imitation_epochs=30 eval.episodes=0 \\
        logger=none seed=$S hydra.run.dir=outputs/tamiyo_mix/seed$S; done
    python experiments/collect_tamiyo_runs.py outputs/tamiyo_mix/seed0 outputs/tamiyo_mix/seed1 \\
        outputs/tamiyo_mix/seed2

With several tasks the figure has one line per (run, task): `charts/episodic_return/<task>`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import pandas as pd
import torch

from esper_gym.agents.tamiyo import load_checkpoint, save_checkpoint
from esper_gym.bench import plots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="train run dirs")
    parser.add_argument(
        "--checkpoints", type=pathlib.Path, default=pathlib.Path("results/checkpoints")
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/tamiyo"))
    parser.add_argument(
        "--policy-only", action="store_true",
        help="commit the policy without the Adam state (a third the size; it evaluates, it does "
        "not resume)",
    )  # fmt: skip
    args = parser.parse_args()
    args.checkpoints.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    curves = []
    for run in args.runs:
        seed = json.loads((run / "run.json").read_text())["seed"]
        ckpt = run / "checkpoint.pt"
        torch.load(ckpt, weights_only=True)  # what is committed must load without pickle code
        target = args.checkpoints / f"tamiyo_seed{seed}.pt"
        if args.policy_only:
            loaded = load_checkpoint(ckpt)  # checked, then written again without the optimizer
            save_checkpoint(
                target, loaded.policy, None, loaded.global_step, loaded.config, loaded.env
            )
        else:
            shutil.copyfile(ckpt, target)
        curve = pd.read_csv(run / "train_metrics.csv")
        curve.insert(0, "run", f"seed{seed}")
        curves.append(curve)
        print(f"{target}: {target.stat().st_size / 1e3:.0f} kB, {len(curve)} updates")
    table = pd.concat(curves, ignore_index=True)
    table.to_csv(args.out / "learning_curves.csv", index=False)
    plots.learning_curves(per_task(table), args.out / "learning_curves.png")
    print(f"{args.out / 'learning_curves.csv'}, {args.out / 'learning_curves.png'}")


def per_task(table: pd.DataFrame, y: str = "charts/episodic_return") -> pd.DataFrame:
    """Runs on several tasks log `<y>/<task>`: one curve per (run, task), since the tasks'
    returns are on different scales (their mean would mostly show the mix). Else `table`."""
    tasks = [c[len(y) + 1 :] for c in table.columns if c.startswith(f"{y}/")]
    if not tasks:
        return table
    parts = [
        pd.DataFrame(
            {
                "global_step": table["global_step"],
                "run": table["run"] + f" {t}",
                y: table[f"{y}/{t}"],
            }
        )
        for t in tasks
    ]
    return pd.concat(parts, ignore_index=True)


if __name__ == "__main__":
    main()
