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

Cost: (plans in the family) x `selection_seeds` episodes per distinct scored context, plus one
episode per scored seed. The spirals family has 57 plans and fashion_mnist's 21; with the
default 2 selection seeds and 5 scored seeds that is up to 570 + 210 short episodes, about 1 s
each on one busy CPU thread (measured: 114 spirals selection episodes in 2 minutes of one
worker). A smaller `family` (fields replacing the tuned family's) keeps a quick run quick.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from esper_gym import stats

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
    selection_seeds: int = 2
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
        """The plans searched for registered task `task`."""
        given = dict(self.family or {})
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
