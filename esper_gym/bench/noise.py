"""How much signal one growth decision leaves in the reward: plan variants that change one
decision of the tuned schedule, played on common seeds, and the noise decomposition of their
returns (paired, same context, unpaired). The command and what it prints:
experiments/reward_noise.py."""

from __future__ import annotations

import dataclasses

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
