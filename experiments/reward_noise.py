"""How much signal does one growth decision leave in the reward? Paired vs unpaired, and a
larger validation split, on the train contexts of a task (issue 16, "the reward is noisy").

A decision is a change to the tuned schedule (conf/schedule_plans.yaml): the variants below
drop or move one of its germinations. In each of `--contexts` train contexts, for `--seeds`
seeds each, every plan plays the same episode (same context, host init and data order:
`reset(seed=s, options={"context": c})`), under two validation settings:
the task's own split and one `--val-scale` times larger (`dataset_kwargs n_val` and
`eval_size`; the reward is the change in accuracy on it). Per (setting, variant) it prints:

- `effect`: mean over seeds of return(variant) - return(schedule), with a paired bootstrap 95%
  CI (esper_gym.bench.stats.paired_difference);
- `sd paired`: the spread of that per-seed difference (what a paired reward, one that compares
  both choices on common random numbers, would have to resolve);
- `sd ctx`: the spread of return(variant, seed s) - return(schedule, seed t) over pairs of
  different seeds that drew the same context (what is left to a critic that knows the context:
  host init and data order still differ);
- `sd unpaired`: sqrt(var(variant) + var(schedule)) over seeds (what PPO has to resolve when
  its critic predicts nothing of the context: its rollouts of the two choices run on different
  seeds and contexts);
- `seeds@2sd`: episodes per choice needed for the effect to be two standard errors from 0,
  (2 sd / effect)^2, for the paired, same-context and unpaired spreads;
- `test_acc effect`: the same paired difference in test accuracy (percentage points) on the
  test split no reward sees, and `agree`: the share of seeds where the reward's difference and
  the test accuracy's have the same sign.

And per setting, `step sd`: the per-step reward's sd over seeds at a fixed step of the schedule,
averaged over steps (the noise on one step's reward).

    python experiments/reward_noise.py --task spirals --contexts 6 --seeds 4 --out results/reward_noise

Train seeds and contexts only: nothing here is tuned, and no test context is played.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

from esper_gym.bench.noise import (  # noqa: F401  (the logic lives in the package)
    TASK_IDS,
    play,
    render,
    run,
    summarize,
    variants,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="spirals", choices=sorted(TASK_IDS))
    parser.add_argument("--contexts", type=int, default=6, help="train contexts, drawn once")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per context")
    parser.add_argument("--val-scale", type=int, default=8)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write CSVs + table here")
    args = parser.parse_args()
    if args.seeds < 2 or args.contexts < 2:
        parser.error(f"--seeds={args.seeds} --contexts={args.contexts}: need at least 2 of each")
    if args.val_scale < 2:
        parser.error(f"--val-scale={args.val_scale}: must be >= 2 (1 is the task's own split)")
    with tempfile.TemporaryDirectory() as kernel_dir:
        df = run(args.task, args.contexts, args.seeds, args.val_scale, kernel_dir)
    summary = summarize(df)
    table = render(summary)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        df.drop(columns="rewards").to_csv(args.out / f"episodes_{args.task}.csv", index=False)
        summary.to_csv(args.out / f"summary_{args.task}.csv", index=False)
        (args.out / f"summary_{args.task}.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
