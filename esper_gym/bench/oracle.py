"""The per-context oracle of a schedule family, and the value of reacting.

A controller earns its keep only where reacting to the run pays (DESIGN.md, "Baselines"). The
oracle measures how much there is to earn: for every context that `esper_gym.evaluate` scores,
it plays each plan of the schedule family (the family `experiments/tune_schedule.py` searched,
`family` in conf/schedule_plans.yaml) on **selection seeds** that are never scored, in that
context (`reset(options={"context": i})`), picks the plan with the highest mean return (ties:
the plan with fewer germinations), and plays it on the scored seeds of that context. It knows
the context, which no agent is told, and picks with episodes of it: a reference row (the
upper bound of open-loop plans), not a competitor, and never the "strongest baseline".

`value_of_reacting` = oracle - schedule (the single plan tuned on train contexts), the mean
per-seed difference on common seeds with its paired bootstrap CI: how much an agent that knew
which plan suits the context could gain over the best fixed plan. A context set separates
controllers only where this is well above the noise of a paired comparison.

Cost: (plans searched) x `selection_seeds` episodes per distinct scored context, plus one
episode per scored seed. Selection on 2 seeds picked noise (a plan's mean over 2 episodes has
the paired sd of one, about 0.3-0.5 of return), so the default is 8 seeds; what keeps it
affordable is the **pruned family**: where tune_schedule.py was run with `--per-context`, the
task's entry in conf/schedule_plans.yaml lists `plans` (NoOp, the best single plan and every
plan that was the best of some train context), and the oracle searches those (spirals_budget:
see the entry) instead of the whole family (spirals 57 plans, fashion_mnist 21).
A `family` given here (fields replacing the tuned family's) searches that family instead.

Beside it, from a table of every plan's return on the scored episodes themselves (plans x
contexts x seeds; experiments/value_of_reacting.py plays one):
- `hindsight`: the best plan of each episode, picked after seeing it. A loose ceiling: no
  policy can know which plan an episode's noise favours, so it is above any controller's mean
  and above the oracle.
- `references`: the in-sample means of the best fixed plan <= the per-context best (oracle) <=
  hindsight (an identity of maxima; tests/test_oracle.py checks it on a toy table).
- `loso_value_of_reacting`: the value of reacting with both choices made leave-one-seed-out
  (the scored seed never helps choose its own plan), its context-cluster bootstrap CI, the
  paired sd of one episode and their ratio.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from esper_gym.agents.baselines import tuned_plans
from esper_gym.bench import stats
from esper_gym.bench.jobs import Job, TaskSpec, print_progress

ORACLE = "oracle"  # its rows' agent name in episodes.csv and the tables
SELECT = "oracle/select"  # selection episodes (never scored, never in episodes.csv)
FAMILY_FIELDS = ("counts", "starts", "gaps", "blueprints", "layers")


def plan_family(counts, starts, gaps, blueprints, layers) -> list[tuple[dict, ...]]:
    """Every plan of the family, empty plan (NoOp) first, no duplicates: for each count k of
    `counts`, start, gap, blueprint and layer rule, k germinations of that blueprint at progress
    `start + i * gap` (i < k; plans reaching progress 1 are dropped), all in the `first` or
    `last` layer or one `next` after another (one germination: `next` is `first`)."""
    plans: dict[tuple, tuple[dict, ...]] = {(): ()}
    for k, start, gap, bp, rule in itertools.product(counts, starts, gaps, blueprints, layers):
        times = [round(start + i * gap, 4) for i in range(k)]
        if k == 0 or times[-1] >= 1:
            continue
        rule = "first" if k == 1 and rule == "next" else rule  # one seed: next is first
        plan = tuple({"at": t, "blueprint": bp, "layer": rule} for t in times)
        plans.setdefault(tuple(tuple(g.values()) for g in plan), plan)
    return list(plans.values())


def tuned_family(task: str) -> dict[str, list]:
    """The family experiments/tune_schedule.py searched for `task` (conf/schedule_plans.yaml)."""
    import yaml

    from esper_gym import config_dir
    from esper_gym.agents.baselines import PLANS_FILE

    path = config_dir() / PLANS_FILE
    plans = yaml.safe_load(path.read_text()) or {}
    if task not in plans or "family" not in plans[task]:
        raise ValueError(
            f"no schedule family for task {task!r} in {path} (tuned: {', '.join(plans) or 'none'})"
            f"; give oracle.family={{{', '.join(FAMILY_FIELDS)}}}"
        )
    return {k: list(plans[task]["family"][k]) for k in FAMILY_FIELDS}


@dataclass(frozen=True)
class OracleConfig:
    """What the oracle searches and on which seeds.

    `selection_seeds` episodes per (context, plan), from seeds `selection_first_seed + j`
    (they must not meet the scored seeds: checked by `selection_seed_list`). `family`: fields
    of `plan_family` that replace the task's tuned family (conf/schedule_plans.yaml); unset
    fields keep the tuned ones, so `{counts: [1]}` searches its single-germination plans."""

    enabled: bool = True
    selection_seeds: int = 8
    selection_first_seed: int = 2_000_000
    family: Mapping[str, Sequence] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.selection_seeds
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"oracle.selection_seeds={n!r} must be an integer >= 1")
        first = self.selection_first_seed
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise ValueError(f"oracle.selection_first_seed={first!r} must be an integer >= 0")
        unknown = sorted(set(self.family or {}) - set(FAMILY_FIELDS))
        if unknown:
            raise ValueError(f"oracle.family fields {unknown}; allowed: {', '.join(FAMILY_FIELDS)}")

    @classmethod
    def from_mapping(cls, value: Any) -> OracleConfig:
        """An OracleConfig from a config mapping (None values keep the defaults), or as is."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"oracle={value!r} must be a mapping of {list(cls.__annotations__)}")
        unknown = sorted(set(value) - set(cls.__annotations__))
        if unknown:
            raise ValueError(f"oracle fields {unknown}; allowed: {list(cls.__annotations__)}")
        kwargs = {k: v for k, v in value.items() if v is not None}
        if "family" in kwargs:
            kwargs["family"] = {k: v for k, v in dict(kwargs["family"]).items() if v is not None}
        return cls(**kwargs)

    def plans(self, task: str) -> list[tuple[dict, ...]]:
        """The plans searched for registered task `task`: its pruned family where it has one
        and no `family` is given here, else the (tuned, overridden) family."""
        given = dict(self.family or {})
        if not given:
            pruned = tuned_plans(task)
            if pruned is not None:
                return pruned
        fields = given if set(given) == set(FAMILY_FIELDS) else tuned_family(task) | given
        return plan_family(*(fields[k] for k in FAMILY_FIELDS))

    def selection_seed_list(self, scored: Sequence[int]) -> list[int]:
        seeds = [self.selection_first_seed + j for j in range(self.selection_seeds)]
        shared = sorted(set(seeds) & set(scored))
        if shared:
            raise ValueError(
                f"oracle selection seeds {shared} are also scored seeds: selection would see "
                f"the episodes it is scored on; move oracle.selection_first_seed "
                f"(now {self.selection_first_seed})"
            )
        return seeds


def context_index(task, split: str | None, seed: int) -> int:
    """The context index an env of `task` (a Task) draws at `reset(seed=seed)` (-1 without
    contexts): the first draw of the episode's np_random, as MorphogeneticEnv.reset does."""
    if split is None:
        return -1
    from gymnasium.utils import seeding

    from esper_gym.contexts import context_space

    rng, _ = seeding.np_random(seed)
    return context_space(task).sample(split, rng)[0]


def balanced_seeds(task, split: str, per_context: int, first: int) -> list[int]:
    """The episode seeds, from `first` on, that give every context of `split` exactly
    `per_context` episodes: for each context, the first seeds that draw it (`context_index`).
    Contexts are drawn uniformly, so about per_context x contexts x 2 seeds are looked at; the
    search stops (ValueError) after 100 times that."""
    from esper_gym.contexts import context_space

    n = len(context_space(task).contexts(split))
    counts, seeds = [0] * n, []
    for seed in range(first, first + 100 * n * per_context):
        c = context_index(task, split, seed)
        if counts[c] < per_context:
            counts[c] += 1
            seeds.append(seed)
            if len(seeds) == n * per_context:
                return seeds
    raise ValueError(f"no {per_context} seeds per context of {split} found from {first} on")


def pick(returns: Mapping[int, Sequence[float]], plans: Sequence[tuple]) -> int:
    """The plan index with the highest mean selection return; among equals the one with fewer
    germinations, then the first (tune_schedule's rule)."""
    return min(returns, key=lambda i: (-round(float(np.mean(returns[i])), 9), len(plans[i]), i))


def describe(plan: Sequence[Mapping]) -> str:
    return ", ".join(f"{g['at']}:{g['blueprint']}:{g['layer']}" for g in plan) or "(none)"


VALUE_COLUMNS = ("value_of_reacting", "value_of_reacting_lo", "value_of_reacting_hi")


def value_of_reacting(
    episodes: pd.DataFrame,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    schedule: str = "schedule",
    metric: str = "return",
) -> pd.DataFrame:
    """Per task (and `stats.ALL_TASKS` over several), oracle - `schedule` on `metric`: the mean
    per-seed difference on the seeds both played (the same seed: the same context, data and
    init), its paired bootstrap CI (`stats.paired_difference`) and `value_of_reacting_n`
    (seeds paired). Tasks where either is missing get no row."""
    rows, strata = [], []
    for task in dict.fromkeys(episodes["task"]):
        mine = episodes[episodes["task"] == task]
        both = mine[mine["agent"] == ORACLE].merge(
            mine[mine["agent"] == schedule], on="seed", suffixes=("", "_schedule")
        )
        if both.empty:
            continue
        diff = (both[metric] - both[f"{metric}_schedule"]).to_numpy(float)
        strata.append(diff)
        rows.append((task, [diff]))
    if len(rows) > 1:
        rows.append((stats.ALL_TASKS, strata))
    out = []
    for task, diffs in rows:
        ci = stats.paired_difference(diffs, reps, confidence, seed)
        out.append(
            {
                "task": task,
                "agent": ORACLE,
                "value_of_reacting": ci.estimate,
                "value_of_reacting_lo": ci.lo,
                "value_of_reacting_hi": ci.hi,
                "value_of_reacting_n": sum(len(d) for d in diffs),
            }
        )
    return pd.DataFrame(out, columns=["task", "agent", *VALUE_COLUMNS, "value_of_reacting_n"])


def oracle_gap_share(
    episodes: pd.DataFrame, schedule: str = "schedule", metric: str = "return"
) -> pd.DataFrame:
    """Per task and agent (not the oracle or `schedule`), the share of the oracle's advantage
    over `schedule` that the agent recovers: mean(agent - schedule) / mean(oracle - schedule)
    over the seeds all three played (paired: same context, data and init). 1: as good as the
    per-context best plan; 0: no better than the best fixed plan; negative: worse. NaN where the
    oracle is not above the schedule on those seeds (there is no gap to recover)."""
    out = []
    for task in dict.fromkeys(episodes["task"]):
        mine = episodes[episodes["task"] == task]
        by_agent = {a: g.set_index("seed")[metric] for a, g in mine.groupby("agent", sort=False)}
        if ORACLE not in by_agent or schedule not in by_agent:
            continue
        for agent, values in by_agent.items():
            if agent in (ORACLE, schedule):
                continue
            seeds = values.index.intersection(by_agent[ORACLE].index).intersection(
                by_agent[schedule].index
            )
            base = by_agent[schedule].loc[seeds]
            gap = float((by_agent[ORACLE].loc[seeds] - base).mean()) if len(seeds) else math.nan
            gained = float((values.loc[seeds] - base).mean()) if len(seeds) else math.nan
            share = gained / gap if gap > 0 else math.nan
            out.append({"task": task, "agent": agent, "oracle_gap_share": share})
    return pd.DataFrame(out, columns=["task", "agent", "oracle_gap_share"])


# --- a table of every plan on the scored episodes: hindsight, references, leave-one-seed-out --
HINDSIGHT = "hindsight"  # its rows' agent name


def returns_cube(
    table: pd.DataFrame, metric: str = "return"
) -> tuple[np.ndarray, list, list, list]:
    """(returns[plans, contexts, seeds], plan ids, contexts, seeds) from a long table with
    columns plan_id, context, seed and `metric`. Every plan must have played every (context,
    seed) cell: the comparisons are paired."""
    plans = sorted(table["plan_id"].unique())
    contexts = sorted(table["context"].unique())
    seeds = sorted(table["seed"].unique())
    cube = np.full((len(plans), len(contexts), len(seeds)), np.nan)
    p = {v: i for i, v in enumerate(plans)}
    c = {v: i for i, v in enumerate(contexts)}
    s = {v: i for i, v in enumerate(seeds)}
    for row in table[["plan_id", "context", "seed", metric]].itertuples(index=False):
        cube[p[row[0]], c[row[1]], s[row[2]]] = row[3]
    if np.isnan(cube).any():
        raise ValueError("the returns table is not complete: every plan on every (context, seed)")
    return cube, plans, contexts, seeds


def _best(means: np.ndarray, sizes: Sequence[int] | None) -> int:
    """argmax over the first axis; ties (to 1e-9): the fewer germinations, then the first."""
    sizes = sizes if sizes is not None else [0] * len(means)
    return min(range(len(means)), key=lambda i: (-round(float(means[i]), 9), sizes[i], i))


def references(returns: np.ndarray, sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """In-sample means over every (context, seed) of `returns` [plans, contexts, seeds]: the
    best fixed plan (one plan for all), the oracle (the best plan of each context by its mean)
    and hindsight (the best plan of each episode). best_fixed <= oracle <= hindsight always."""
    r = np.asarray(returns, float)
    fixed = _best(r.mean(axis=(1, 2)), sizes)
    per_context = [_best(r[:, c].mean(axis=1), sizes) for c in range(r.shape[1])]
    oracle = np.mean([r[per_context[c], c].mean() for c in range(r.shape[1])])
    return {
        "best_fixed": float(r[fixed].mean()),
        "best_fixed_plan": fixed,
        "oracle": float(oracle),
        "oracle_plans": per_context,
        "hindsight": float(r.max(axis=0).mean()),
    }


def loso_choices(returns: np.ndarray, sizes: Sequence[int] | None = None):
    """(fixed[c, s], per_context[c, s]): the plan the best single plan and the per-context best
    are for episode (c, s) when chosen without seed s (leave-one-seed-out)."""
    r = np.asarray(returns, float)
    _, n_ctx, n_seeds = r.shape
    if n_seeds < 2:
        raise ValueError("leave-one-seed-out needs >= 2 seeds per context")
    fixed = np.zeros((n_ctx, n_seeds), int)
    per_context = np.zeros((n_ctx, n_seeds), int)
    for s in range(n_seeds):
        rest = np.delete(r, s, axis=2)
        f = _best(rest.mean(axis=(1, 2)), sizes)
        fixed[:, s] = f
        for c in range(n_ctx):
            per_context[c, s] = _best(rest[:, c].mean(axis=1), sizes)
    return fixed, per_context


def loso_value_of_reacting(
    returns: np.ndarray,
    sizes: Sequence[int] | None = None,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Value of reacting on `returns` [plans, contexts, seeds], leave-one-seed-out: per
    episode (c, s), the per-context best plan minus the best single plan, each chosen on the
    other seeds, both played on (c, s) itself (paired). `value` is their mean, `lo`/`hi` its
    CI from a bootstrap over contexts (clusters: a context's seeds share its choice), `sd` the
    paired sd of one episode's difference, `ratio` = value / sd; `hindsight` the mean of the
    best plan of each episode minus the LOSO best single plan (a loose ceiling). `sizes`
    (germinations per plan) break ties toward the smaller plan."""
    r = np.asarray(returns, float)
    fixed, per_context = loso_choices(r, sizes)
    c_idx, s_idx = np.indices(fixed.shape)
    base = r[fixed, c_idx, s_idx]
    diff = r[per_context, c_idx, s_idx] - base
    ci = stats.cluster_bootstrap_ci(list(diff), reps, confidence, seed)
    sd = float(diff.std(ddof=1))
    return {
        "value": ci.estimate,
        "lo": ci.lo,
        "hi": ci.hi,
        "sd": sd,
        "ratio": ci.estimate / sd if sd > 0 else math.nan,
        "hindsight": float((r.max(axis=0) - base).mean()),
        "episodes": int(diff.size),
        "contexts": int(r.shape[1]),
        "seeds": int(r.shape[2]),
    }


def hindsight(
    plan_episodes: pd.DataFrame, keys: Sequence[str] = ("task", "seed"), metric: str = "return"
) -> pd.DataFrame:
    """The per-seed hindsight bound as agent rows: for each `keys` group (an episode: the same
    task and seed, so the same context, data and init) of `plan_episodes` (one row per plan
    played on it), the row of the plan with the highest `metric`, agent `HINDSIGHT`. For
    esper_gym.evaluate: play every plan of the (pruned) family on the scored seeds, then these
    rows sit next to the oracle's; never a competitor (it picks after seeing the episode)."""
    best = plan_episodes.loc[plan_episodes.groupby(list(keys), sort=False)[metric].idxmax()]
    return best.assign(agent=HINDSIGHT).reset_index(drop=True)


def value_of_reacting_noise(
    episodes: pd.DataFrame, schedule: str = "schedule", metric: str = "return"
) -> pd.DataFrame:
    """Per task, the paired sd of one episode's oracle - `schedule` difference on common seeds
    (`value_of_reacting_sd`) and value_of_reacting / that sd (`value_of_reacting_ratio`): a
    task separates controllers only where the ratio is well above 0 (DESIGN.md, "Baselines").
    Columns to join on (task, agent) beside `value_of_reacting`'s."""
    out = []
    for task in dict.fromkeys(episodes["task"]):
        mine = episodes[episodes["task"] == task]
        both = mine[mine["agent"] == ORACLE].merge(
            mine[mine["agent"] == schedule], on="seed", suffixes=("", "_schedule")
        )
        if len(both) < 2:
            continue
        diff = (both[metric] - both[f"{metric}_schedule"]).to_numpy(float)
        sd = float(diff.std(ddof=1))
        ratio = float(diff.mean()) / sd if sd > 0 else math.nan
        out.append(
            {
                "task": task,
                "agent": ORACLE,
                "value_of_reacting_sd": sd,
                "value_of_reacting_ratio": ratio,
            }
        )
    cols = ["task", "agent", "value_of_reacting_sd", "value_of_reacting_ratio"]
    return pd.DataFrame(out, columns=cols)


# ----------------------------------------------------------- evaluate's oracle episodes


def selection_jobs(
    cfg: OracleConfig,
    tasks: Sequence[TaskSpec],
    jobs: Sequence[Job],
    common: Mapping[str, Any],
) -> list[tuple[Job, tuple[str, int, int]]]:
    """The oracle's selection episodes, each with its (task label, context, plan index): every
    plan of the family, on every selection seed, in every context a scored seed of the task
    plays (`context_index`). Selection seeds never meet scored seeds."""
    scored = sorted({j.seed for j in jobs})
    sel_seeds = cfg.selection_seed_list(scored)
    out = []
    for task in tasks:
        plans = cfg.plans(task.base)
        built = task.build()
        played = {context_index(built, common["contexts"], s) for s in scored}
        for c in sorted(played):
            for i, plan in enumerate(plans):
                for s in sel_seeds:
                    job = Job(SELECT, task, s, plan=plan, context=c, **common)
                    out.append((job, (task.label, c, i)))
    return out


def choices(
    selection: Sequence[tuple[Job, tuple[str, int, int]]], results: Sequence[Mapping]
) -> tuple[dict[tuple[str, int], tuple], pd.DataFrame]:
    """The plan picked per (task label, context) from the selection episodes (`pick`), and
    every selection episode as a table (task, context_index, plan_id, plan, seed, return,
    mean_return of the plan in that context, chosen)."""
    returns: dict[tuple[str, int], dict[int, list[float]]] = {}
    plans: dict[tuple[str, int], dict[int, tuple]] = {}
    rows = []
    for (job, (label, c, i)), r in zip(selection, results):
        returns.setdefault((label, c), {}).setdefault(i, []).append(float(r["row"]["return"]))
        plans.setdefault((label, c), {})[i] = job.plan
        rows.append(
            {
                "task": label,
                "context_index": c,
                "plan_id": i,
                "plan": describe(job.plan),
                "seed": job.seed,
                "return": float(r["row"]["return"]),
            }
        )
    picks, best = {}, {}
    for key, by_plan in returns.items():
        family = [plans[key][i] for i in sorted(plans[key])]
        best[key] = pick(by_plan, family)
        picks[key] = plans[key][best[key]]
    table = pd.DataFrame(rows)
    if not table.empty:
        keys = list(zip(table["task"], table["context_index"]))
        table["mean_return"] = [np.mean(returns[k][i]) for k, i in zip(keys, table["plan_id"])]
        table["chosen"] = [best[k] == i for k, i in zip(keys, table["plan_id"])]
    return picks, table


def scoring_jobs(
    tasks: Sequence[TaskSpec],
    jobs: Sequence[Job],
    picks: Mapping[tuple[str, int], tuple],
    common: Mapping[str, Any],
) -> list[tuple[Job, int]]:
    """One `oracle` episode per (task, scored seed): the plan picked for the seed's context,
    played from the seed as every agent's episode is (no context option: the seed draws it)."""
    out = []
    for task in tasks:
        built = task.build()
        for s in sorted({j.seed for j in jobs if j.task == task}):
            c = context_index(built, common["contexts"], s)
            out.append((Job(ORACLE, task, s, plan=picks[(task.label, c)], **common), c))
    return out


def progress(done: int, total: int, row: Mapping[str, Any]) -> None:
    """`print_progress`, but one line in 25 for the selection episodes (hundreds of them)."""
    if row["agent"] != SELECT or not done % 25 or done == total:
        print_progress(done, total, row)
