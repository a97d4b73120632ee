"""Tamiyo as a gate over the schedule: can PPO learn *whether* to follow the tuned plan?

On spirals_budget, Tamiyo with the flat action space learns a germination hazard (a small
chance to act at every step; its greedy decoding is NoOp), not a decision
(results/tamiyo_budget/README.md). This restricts what it can do to what the observability
experiment (experiments/observability.py) shows is worth learning: at each step it may take the
tuned schedule's action, or, where that action is a germination, the plan's action without it
(`esper_gym.agents.gate.ScheduleGate`, which `python -m esper_gym.train env.gate=drop` uses;
its refusal was WAIT before 2026-12-07's last session, see results/tamiyo_budget/README.md).
The policy, PPO and the imitation warm start are Tamiyo's own (conf/agent/tamiyo.yaml's values,
plus the levers given here); only the mask is new.

Trains `--seeds` runs on train contexts, with the context hidden (`hid`) or shown in the
globals (`ctx`, a controller told the context: the observability gate's +0.18 ceiling), then
plays each on every test context x 8 held-out seeds (sampled, the evaluate default, and
greedy), with the schedule and NoOp on the same seeds. Paired differences, 95% bootstrap CIs
over contexts.

```bash
python experiments/schedule_gate.py --seeds 0 1 --views hid ctx --total-steps 32768 \
    --report results/tamiyo_budget/schedule_gate.txt
```
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import report  # noqa: E402

from esper_gym.agents.gate import ScheduleGate  # noqa: E402
from esper_gym.bench import stats  # noqa: E402

FIRST_TEST_SEED = 1_000_000  # esper_gym.evaluate's held-out seeds


def make_env(
    task: str,
    split: str,
    show: bool,
    kernel_dir: str | None,
    gate: bool = True,
    declined: str = "defer",
):
    from esper_gym.env import MorphogeneticEnv

    env = MorphogeneticEnv(task=task, contexts=split, show_context=show, kernel_dir=kernel_dir)
    return ScheduleGate(env, declined) if gate else env


def ppo_config(seed: int, total_steps: int, levers: dict):
    """conf/agent/tamiyo.yaml's PPO values (read as data), then `levers`."""
    import yaml

    from esper_gym.agents.tamiyo.config import GuardConfig, PPOConfig

    conf = yaml.safe_load((ROOT / "conf" / "agent" / "tamiyo.yaml").read_text())["ppo"]
    conf.pop("_target_", None)
    guards = GuardConfig(**conf.pop("guards"))
    values = {**conf, **levers, "seed": seed, "total_steps": total_steps}
    guard_values = values.pop("guards", {})
    return PPOConfig(**values, guards=GuardConfig(**{**vars(guards), **guard_values}))


def train_one(
    task: str,
    seed: int,
    view: str,
    total_steps: int,
    levers: dict,
    out: str,
    declined: str,
    reuse: bool,
):
    import functools

    import torch

    from esper_gym.agents.tamiyo import ppo

    torch.set_num_threads(1)
    path = pathlib.Path(out) / f"gate_{view}_s{seed}.pt"
    if reuse and path.exists():  # scored again (e.g. on train contexts), not retrained
        return str(path)
    kernels = str(pathlib.Path(out) / "kernels")
    make = functools.partial(make_env, task, "train", view == "ctx", kernels, declined=declined)
    ppo.train(ppo_config(seed, total_steps, levers), make, checkpoint_path=path)
    return str(path)


def play(task, agent, view, path, context, seed, greedy, declined="defer", split="test"):
    """One test episode: the gate policy (checkpoint `path`), or the schedule / NoOp."""
    import torch

    from esper_gym.agents.baselines import make_agent
    from esper_gym.agents.tamiyo import load_checkpoint
    from esper_gym.episode import play_episode

    torch.set_num_threads(1)
    env = make_env(task, split, view == "ctx", None, gate=path is not None, declined=declined)
    if path is not None:
        act = load_checkpoint(path, env=env).policy.actor(greedy=greedy, seed=seed)
    else:
        act = make_agent(agent, env).act
    metrics, _ = play_episode(env, act, seed, {"context": context})
    env.close()
    return float(metrics["return"]), int(metrics.get("germinations", 0))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="spirals_budget")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--views", nargs="+", default=["hid", "ctx"], choices=["hid", "ctx"])
    p.add_argument("--total-steps", type=int, default=32768)
    p.add_argument("--test-seeds", type=int, default=8)
    p.add_argument("--out", default="outputs/schedule_gate", help="checkpoints and kernels")
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument(
        "--teacher", default="schedule", help="the imitation warm start; none: PPO from the start"
    )
    p.add_argument(
        "--declined", default="defer", choices=["defer", "drop"], help="ScheduleGate's rule"
    )
    p.add_argument(
        "--reuse", action="store_true", help="score the checkpoints in --out, train none anew"
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "train"],
        help="contexts to score on (train: to choose a decoding without the test episodes)",
    )
    p.add_argument("--report", default=None)
    args = p.parse_args(argv)
    # The levers of results/tamiyo_budget (gamma 1, groups of 4 sharing a seed), no anchor:
    # the mask already keeps it on the plan. No entropy floor: most steps offer one action,
    # and a floor would then buy its entropy at the few real decisions. An even start at
    # them (wait_bias 0): the warm start's cross-entropy is 0 on the forced steps, so it
    # barely moves the switch from the default's WAIT-leaning 0.88.
    levers = {
        "num_envs": 16,
        "wait_bias": 0.0,
        "gamma": 1.0,
        "group_advantages": 4,
        "ent_floor": 0.0,
        "guards": {"wait_share_max": None, "entropy_min": None},
        "teacher": None if args.teacher == "none" else args.teacher,
    }
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with report(args.report):
        print(f"levers: {levers}, total_steps {args.total_steps}, declined: {args.declined}")
        start = time.perf_counter()
        runs = [(s, v) for v in args.views for s in args.seeds]
        with concurrent.futures.ProcessPoolExecutor(args.n_jobs, mp_context=ctx) as pool:
            jobs = {
                r: pool.submit(
                    train_one,
                    args.task,
                    *r,
                    args.total_steps,
                    levers,
                    args.out,
                    args.declined,
                    args.reuse,
                )
                for r in runs
            }
            paths = {r: f.result() for r, f in jobs.items()}
        print(f"trained {len(runs)} runs in {time.perf_counter() - start:.0f}s")
        from esper_gym.tasks import get_task

        n_ctx = len(get_task(args.task).context_space.contexts(args.split))
        cells = [(c, FIRST_TEST_SEED + j) for c in range(n_ctx) for j in range(args.test_seeds)]
        agents = [("schedule", "hid", None, False), ("noop", "hid", None, False)]
        agents += [
            (f"gate_{v}_s{s}{'_greedy' if g else ''}", v, paths[(s, v)], g)
            for (s, v) in runs
            for g in (False, True)
        ]
        with concurrent.futures.ProcessPoolExecutor(args.n_jobs, mp_context=ctx) as pool:
            futures = {
                (a[0], c, s): pool.submit(
                    play, args.task, *a[:3], c, s, a[3], args.declined, args.split
                )
                for a in agents
                for c, s in cells
            }
            played = {k: f.result() for k, f in futures.items()}
        contexts = np.array([c for c, _ in cells])

        def returns(name):
            return np.array([played[(name, c, s)][0] for c, s in cells])

        print(
            f"\n{len(cells)} {args.split}-context episodes per agent ({n_ctx} contexts x "
            f"{args.test_seeds} seeds {FIRST_TEST_SEED}..)\n"
        )
        print("| agent | mean return | germinations / episode | vs schedule | vs NoOp |")
        print("|---|---|---|---|---|")
        for name, *_ in agents:
            r = returns(name)
            germs = np.mean([played[(name, c, s)][1] for c, s in cells])
            row = [f"{r.mean():.3f}", f"{germs:.2f}"]
            for ref in ("schedule", "noop"):
                diff = r - returns(ref)
                ci = stats.cluster_bootstrap_ci(
                    [diff[contexts == c] for c in range(n_ctx)], args.reps
                )
                row.append(f"{ci.estimate:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}]")
            print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
