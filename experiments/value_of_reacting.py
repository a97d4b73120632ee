"""Value of reacting on a task's test contexts: what a controller that reads the run could gain.

Plays every plan of the task's pruned schedule family (conf/schedule_plans.yaml `plans`, from
`tune_schedule.py --per-context`; else its whole `family`) and each `--agents` on every test
context x `--seeds` held-out seeds (`1_000_000 + j`, the same seeds in every context, each
context played with `reset(options={"context": i})`): one table of returns, every row paired
with every other on the same (context, seed) (the same context, data and host init).

From it (esper_gym.bench.oracle, esper_gym.bench.stats):
- value of reacting = per-context best plan - best single plan, both chosen leave-one-seed-out
  (the scored seed never helps choose), with a 95% bootstrap CI over contexts, the paired sd of
  one episode's difference and their ratio; the hindsight bound (best plan of each episode);
  the same with the plan chosen per level of the static factors only (what the first
  observation shows: how much of the value needs no reacting);
- each agent's paired difference against the train-tuned schedule and against NoOp.
Writes results/value_of_reacting/<task>.csv (the table) and <task>.md (the tables, with the
command at the top); `--from-csv` recomputes them from the table without playing.

```bash
nice -n 10 python experiments/value_of_reacting.py --task spirals_budget --seeds 8 --n-jobs 2
# agents tuned later, on the same episodes (added to the table):
nice -n 10 python experiments/value_of_reacting.py --task spirals_budget --agents reactive \
    --agents-only
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
import pandas as pd

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esper_gym.agents.baselines import tuned_plan  # noqa: E402
from esper_gym.bench import oracle, stats  # noqa: E402
from esper_gym.tasks import get_task  # noqa: E402

FIRST_SEED = 1_000_000  # esper_gym.evaluate's held-out seeds
STATIC = ("width", "depth", "classes")  # factors the first observation shows (the host, classes)


def play(task: str, split: str, kind: str, name: str, plan, context: int, seed: int, kernel_dir):
    """One episode (a pool worker): a plan (ScheduleAgent) or a named agent (make_agent)."""
    import torch

    from esper_gym.agents.baselines import ScheduleAgent, make_agent
    from esper_gym.env import MorphogeneticEnv
    from esper_gym.episode import play_episode

    torch.set_num_threads(1)
    env = MorphogeneticEnv(task=task, kernel_dir=kernel_dir, contexts=split)
    if kind == "plan":
        agent = ScheduleAgent(env.observation_space, env.action_space, plan, env.task.blueprints)
    else:
        agent = make_agent(name, env)
    start = time.perf_counter()
    metrics, _ = play_episode(env, agent.act, seed, {"context": int(context)})
    env.close()
    return {
        "return": float(metrics["return"]),
        "test_acc": float(metrics.get("test_acc", np.nan)),
        "params_added": int(metrics.get("params_added", 0)),
        "germinations": int(metrics.get("germinations", 0)),
        "wall_s": time.perf_counter() - start,
    }


def plans_of(task: str) -> list[tuple[dict, ...]]:
    return oracle.tuned_plans(task) or oracle.OracleConfig(family={}).plans(task)


def run(args) -> pd.DataFrame:
    plans = plans_of(args.task)
    space = get_task(args.task).context_space
    contexts = list(range(len(space.contexts(args.split))))
    if args.n_contexts:
        contexts = contexts[: args.n_contexts]
    seeds = [FIRST_SEED + j for j in range(args.seeds)]
    jobs = (
        []
        if args.agents_only
        else [("plan", oracle.describe(p), i, p) for i, p in enumerate(plans)]
    )
    jobs += [("agent", a, -1, None) for a in args.agents]
    cells = [(job, c, s) for job in jobs for c in contexts for s in seeds]
    n_plans = len(jobs) - len(args.agents)
    print(
        f"{args.task}: {n_plans} plans + {len(args.agents)} agents x {len(contexts)} "
        f"{args.split} contexts x {len(seeds)} seeds = {len(cells)} episodes",
        flush=True,
    )
    rows, start = [], time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.n_jobs, mp_context=ctx) as pool:
        futures = {
            pool.submit(play, args.task, args.split, kind, name, plan, c, s, args.kernel_dir): (
                kind,
                name,
                pid,
                c,
                s,
            )
            for (kind, name, pid, plan), c, s in cells
        }
        for done, f in enumerate(concurrent.futures.as_completed(futures), 1):
            kind, name, pid, c, s = futures[f]
            rows.append(
                {"kind": kind, "name": name, "plan_id": pid, "context": c, "seed": s, **f.result()}
            )
            if done % 100 == 0:
                print(
                    f"  {done}/{len(cells)} episodes, {time.perf_counter() - start:.0f}s",
                    flush=True,
                )
    print(f"played in {time.perf_counter() - start:.0f}s", flush=True)
    return pd.DataFrame(rows).sort_values(["kind", "plan_id", "name", "context", "seed"])


def _paired(a: np.ndarray, b: np.ndarray, reps: int) -> str:
    """mean(a - b) [95% CI, bootstrap over contexts], sd of one episode's difference, ratio."""
    diff = a - b  # contexts x seeds
    ci = stats.cluster_bootstrap_ci(list(diff), reps)
    sd = float(diff.std(ddof=1))
    return f"{ci.estimate:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}] | {sd:.3f} | {ci.estimate / sd:+.2f}"


def report(table: pd.DataFrame, task: str, split: str, commands: list[str], reps: int) -> str:
    plans = table[table["kind"] == "plan"]
    cube, plan_ids, contexts, seeds = oracle.returns_cube(plans)
    names = plans.drop_duplicates("plan_id").set_index("plan_id")["name"]
    sizes = [0 if names[p] == "(none)" else names[p].count(",") + 1 for p in plan_ids]
    value = oracle.loso_value_of_reacting(cube, sizes, reps)
    refs = oracle.references(cube, sizes)
    # Static facts only: the plan chosen per level of the factors the first observation shows.
    space = get_task(task).context_space
    levels = [space.contexts(split)[c] for c in contexts]
    static = [f for f in STATIC if f in space.names]
    groups = {}
    for i, ctx in enumerate(levels):
        groups.setdefault(tuple(ctx[f] for f in static), []).append(i)
    fixed, per_context = oracle.loso_choices(cube, sizes)
    c_idx, s_idx = np.indices(fixed.shape)
    base = cube[fixed, c_idx, s_idx]
    by_static = np.zeros_like(base)
    for members in groups.values():
        sub = cube[:, members]
        for s in range(len(seeds)):
            rest = np.delete(sub, s, axis=2)
            best = oracle.references(rest, sizes)["best_fixed_plan"]
            by_static[members, s] = cube[best, members, s]
    lines = [
        f"# Value of reacting: {task}, {len(contexts)} {split} contexts x {len(seeds)} seeds",
        "",
        *(f"`{c}`  " for c in commands),
        "",
        f"Plans searched: {len(plan_ids)} (the pruned family of conf/schedule_plans.yaml). "
        "Differences are per episode (context, seed), paired on common seeds; CIs are 95% "
        "bootstraps over contexts; sd is the paired sd of one episode's difference; ratio = "
        "mean / sd. Choices of plan are leave-one-seed-out (the scored seed never helps choose).",
        "",
        "| comparison | mean [95% CI] | paired sd | ratio |",
        "|---|---|---|---|",
        f"| value of reacting: per-context best - best single plan | "
        f"{_paired(cube[per_context, c_idx, s_idx], base, reps)} |",
        f"| static facts only ({', '.join(static) or 'none'}): per-level best - best single "
        f"plan | {_paired(by_static, base, reps)} |",
        f"| hindsight (best plan of each episode) - best single plan | "
        f"{_paired(cube.max(axis=0), base, reps)} |",
    ]
    agents = table[table["kind"] == "agent"]
    sched = tuned_plan(task)
    sched_name = oracle.describe([dict(vars(g)) for g in sched])
    ref = {"best single plan (LOSO)": base}
    if sched_name in set(names):
        pid = names[names == sched_name].index[0]
        ref = {"schedule (tuned on train)": cube[plan_ids.index(pid)], **ref}
    noop_pid = names[names == "(none)"].index
    if len(noop_pid):
        ref["noop"] = cube[plan_ids.index(noop_pid[0])]
    if "schedule (tuned on train)" in ref:
        lines.append(
            f"| per-context best - schedule (tuned on train: {sched_name}) | "
            f"{_paired(cube[per_context, c_idx, s_idx], ref['schedule (tuned on train)'], reps)} |"
        )
    for name, g in agents.groupby("name", sort=False):
        wide = g.pivot(index="context", columns="seed", values="return").loc[contexts, seeds]
        for ref_name, ref_values in ref.items():
            lines.append(f"| {name} - {ref_name} | {_paired(wide.to_numpy(), ref_values, reps)} |")
    lines += [
        "",
        "In-sample means (no leave-one-out; best fixed <= oracle <= hindsight): "
        f"best fixed plan {refs['best_fixed']:.3f} ({names[plan_ids[refs['best_fixed_plan']]]}),"
        f" per-context best {refs['oracle']:.3f}, hindsight {refs['hindsight']:.3f}.",
        f"LOSO: value {value['value']:+.3f} [{value['lo']:+.3f}, {value['hi']:+.3f}], paired sd "
        f"{value['sd']:.3f}, ratio {value['ratio']:+.2f}, hindsight {value['hindsight']:+.3f}.",
        "",
        "| plan | mean return | contexts where best (in-sample) |",
        "|---|---|---|",
    ]
    wins = pd.Series(refs["oracle_plans"]).value_counts()
    for i, p in enumerate(plan_ids):
        lines.append(f"| {names[p]} | {cube[i].mean():.3f} | {int(wins.get(i, 0))} |")
    for name, g in agents.groupby("name", sort=False):
        lines.append(f"| agent {name} | {g['return'].mean():.3f} | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--n-contexts", type=int, default=0, help="first N contexts (0: all)")
    p.add_argument("--agents", nargs="*", default=["reactive"])
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--kernel-dir", default=None)
    p.add_argument("--out-dir", default=str(ROOT / "results" / "value_of_reacting"))
    p.add_argument("--from-csv", action="store_true", help="recompute from the saved table")
    p.add_argument(
        "--agents-only", action="store_true", help="play only --agents, added to the saved table"
    )
    args = p.parse_args(argv)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"{args.task}.csv"
    command = "python experiments/value_of_reacting.py " + " ".join(argv or sys.argv[1:])
    if args.from_csv:
        table = pd.read_csv(csv)
    elif args.agents_only:
        old = pd.read_csv(csv)
        old = old[~((old["kind"] == "agent") & old["name"].isin(args.agents))]
        table = pd.concat([old, run(args)], ignore_index=True)
        table.to_csv(csv, index=False)
    else:
        table = run(args)
        table.to_csv(csv, index=False)
    # The commands that made the table: an --agents-only run adds to the plans' run.
    commands = [command]
    md_path = out / f"{args.task}.md"
    if (args.agents_only or args.from_csv) and md_path.exists():
        prefix = "`python experiments/value_of_reacting.py"
        old = [ln.strip().strip("`").strip() for ln in md_path.read_text().splitlines()]
        old = [ln for ln in old if ln.startswith(prefix[1:]) and "--from-csv" not in ln]
        commands = list(dict.fromkeys(old if args.from_csv and old else [*old, command]))
    md = report(table, args.task, args.split, commands, args.reps)
    md_path.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
