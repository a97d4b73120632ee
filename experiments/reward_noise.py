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
import dataclasses
import pathlib
import tempfile

import gymnasium as gym
import numpy as np
import pandas as pd

import esper_gym
from esper_gym.agents.baselines import Germination, ScheduleAgent, tuned_plan
from esper_gym.bench import stats
from esper_gym.contexts import context_space
from esper_gym.tasks import get_task

TASK_IDS = {task: env_id for env_id, (task, _) in esper_gym.ENV_IDS.items()}


def variants(plan: tuple[Germination, ...]) -> dict[str, tuple[Germination, ...]]:
    """The schedule and one-decision changes to it: its last germination dropped, moved later
    (+0.2 progress), and (for plans of one germination) one more at 0.2."""
    last = plan[-1]
    out = {"schedule": plan, "drop last": plan[:-1]}
    if last.at + 0.2 < 1:
        out["last +0.2"] = (*plan[:-1], dataclasses.replace(last, at=round(last.at + 0.2, 3)))
    if len(plan) == 1:
        out["one more"] = (*plan, Germination(0.2, last.blueprint, "next"))
    return out


def play(envs, plan, blueprints, seeds: list[int], context: int) -> list[dict]:
    """One episode of `plan` per seed in train context `context`, all seeds at once: copy i
    of the batched simulator plays `reset(seed=seeds[i], options={"context": context})`, as
    a single env would (esper_gym.vector)."""
    agents = [
        ScheduleAgent(envs.single_observation_space, envs.single_action_space, plan, blueprints)
        for _ in seeds
    ]
    obs, _ = envs.reset(seed=list(seeds), options={"context": context})
    rewards = [[] for _ in seeds]
    test_acc = [None] * len(seeds)
    while any(acc is None for acc in test_acc):
        actions = [agent.act({k: v[i] for k, v in obs.items()}) for i, agent in enumerate(agents)]
        obs, reward, terminated, truncated, info = envs.step(np.array(actions))
        for i in range(len(seeds)):
            if test_acc[i] is not None:
                continue  # its first episode is over; the copy autoreset into another
            rewards[i].append(float(reward[i]))
            if terminated[i] or truncated[i]:
                test_acc[i] = 100.0 * float(info["final_info"]["test_acc"][i])
    return [
        {"return": float(np.sum(r)), "test_acc": acc, "context": context, "rewards": r}
        for r, acc in zip(rewards, test_acc)
    ]


def run(task: str, contexts: int, seeds: int, val_scale: int, kernel_dir: str) -> pd.DataFrame:
    """Every plan variant on `seeds` seeds in each of `contexts` train contexts (drawn once,
    seeded), under both validation settings."""
    base = get_task(task)
    n_val = int(base.dataset_kwargs.get("n_val", base.eval_size))
    settings = {
        "own split": {},
        f"{val_scale}x split": {
            "dataset_kwargs": {**base.dataset_kwargs, "n_val": n_val * val_scale},
            "eval_size": base.eval_size * val_scale,
        },
    }
    plans = variants(tuned_plan(task))
    n_train = len(context_space(base).contexts("train"))
    chosen = np.random.default_rng(0).choice(n_train, size=contexts, replace=False).tolist()
    rows = []
    for setting, overrides in settings.items():
        envs = gym.make_vec(
            TASK_IDS[task], num_envs=seeds, vectorization_mode="vector_entry_point",
            contexts="train", kernel_dir=kernel_dir, **overrides,
        )  # fmt: skip
        blueprints = get_task(task, **overrides).blueprints
        for k, context in enumerate(chosen):
            ids = list(range(k * seeds, (k + 1) * seeds))  # distinct seeds in every context
            for name, plan in plans.items():
                for seed, result in zip(ids, play(envs, plan, blueprints, ids, context)):
                    rows.append({"setting": setting, "variant": name, "seed": seed, **result})
            print(f"{setting}: context {context} done", flush=True)
        envs.close()
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for setting, part in df.groupby("setting", sort=False):
        base = part[part.variant == "schedule"].set_index("seed")
        # Contexts set the budget, so episodes differ in length: the sd at each step index over
        # the seeds whose episode reaches it.
        length = max(len(r) for r in base["rewards"])
        steps = np.full((len(base), length), np.nan)
        for k, r in enumerate(base["rewards"]):
            steps[k, : len(r)] = r
        reached = (~np.isnan(steps)).sum(0) >= 2
        step_sd = float(np.nanstd(steps[:, reached], 0, ddof=1).mean())
        for name, var in part[part.variant != "schedule"].groupby("variant", sort=False):
            var = var.set_index("seed").loc[base.index]
            diff = (var["return"] - base["return"]).to_numpy()
            acc = (var["test_acc"] - base["test_acc"]).to_numpy()
            ci = stats.paired_difference([diff])
            acc_ci = stats.paired_difference([acc])
            sd_paired = float(diff.std(ddof=1))
            sd_unpaired = float(np.sqrt(var["return"].var() + base["return"].var()))
            # Other seed, same context: the spread left to a critic that knows the context.
            same = [
                var["return"][s] - base["return"][t]
                for s in base.index
                for t in base.index
                if s != t and base["context"][s] == base["context"][t]
            ]
            sd_context = float(np.std(same, ddof=1)) if len(same) > 1 else np.nan
            effect = float(diff.mean())
            out.append(
                {
                    "setting": setting,
                    "variant": name,
                    "effect": effect,
                    "effect_lo": ci.lo,
                    "effect_hi": ci.hi,
                    "sd_paired": sd_paired,
                    "sd_unpaired": sd_unpaired,
                    "sd_same_context": sd_context,
                    "same_context_pairs": len(same),
                    "seeds_paired": (2 * sd_paired / effect) ** 2 if effect else np.inf,
                    "seeds_unpaired": (2 * sd_unpaired / effect) ** 2 if effect else np.inf,
                    "seeds_same_context": (2 * sd_context / effect) ** 2 if effect else np.inf,
                    "test_acc_effect": float(acc.mean()),
                    "test_acc_lo": acc_ci.lo,
                    "test_acc_hi": acc_ci.hi,
                    "agree": float(np.mean(np.sign(diff) == np.sign(acc))),
                    "step_sd": step_sd,
                    "seeds": len(diff),
                }
            )
    return pd.DataFrame(out)


def render(summary: pd.DataFrame) -> str:
    lines = [
        f"{'setting':<11}{'variant':<11}{'effect [95% CI]':>24}{'sd paired':>10}"
        f"{'sd ctx':>8}{'sd unpaired':>12}{'seeds@2sd p/c/u':>17}{'test_acc effect [95% CI]':>27}"
        f"{'agree':>7}{'step sd':>8}"
    ]
    for r in summary.itertuples():
        effect = f"{r.effect:+.3f} [{r.effect_lo:+.3f}, {r.effect_hi:+.3f}]"
        acc = f"{r.test_acc_effect:+.2f} [{r.test_acc_lo:+.2f}, {r.test_acc_hi:+.2f}]"
        need = f"{r.seeds_paired:.0f}/{r.seeds_same_context:.0f}/{r.seeds_unpaired:.0f}"
        lines.append(
            f"{r.setting:<11}{r.variant:<11}{effect:>24}{r.sd_paired:>10.3f}{r.sd_same_context:>8.3f}"
            f"{r.sd_unpaired:>12.3f}{need:>17}{acc:>27}{r.agree:>7.2f}{r.step_sd:>8.3f}"
        )
    return "\n".join(lines)


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
