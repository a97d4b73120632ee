"""Baseline policies: NoOp, Random (masked), a Heuristic growth rule and an open-loop Schedule;
the published growth rules (north, fragrow, gradmax) live in esper_gym.agents.rules, the
privileged lookahead in esper_gym.agents.lookahead.

They see only the observation (and its action mask), like every agent, except the PRIVILEGED
ones (lookahead steps forks of the running env): upper references, not competitors. The layout
of the flat action space is recovered from the spaces, so one agent works on every task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from gymnasium import spaces

from esper_gym.actions import ADVANCE, CULL, GERMINATE, Action
from esper_gym.agents.lookahead import LookaheadAgent
from esper_gym.agents.rules import RULES, rule_params
from esper_gym.episode import play_episode
from esper_gym.kasmina.lifecycle import GROWING, SeedState
from esper_gym.observation import ObsView, layout_from_spaces
from esper_gym.observation import layout_from_shapes as layout_from_shapes  # re-export (tamiyo)


class NoOpAgent:
    """Always WAIT: the static host."""

    def __init__(self, observation_space=None, action_space=None) -> None:
        pass

    def act(self, obs: Mapping[str, np.ndarray], info: dict | None = None) -> int:
        return 0


class RandomAgent:
    """Uniform over the valid actions of the mask."""

    def __init__(self, observation_space=None, action_space=None, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, obs: Mapping[str, np.ndarray], info: dict | None = None) -> int:
        valid = np.flatnonzero(obs["action_mask"])
        return int(self.rng.choice(valid))


class HeuristicAgent:
    """A hand-written growth rule.

    In order of priority, each step:
    1. cull a seed whose measured contribution is below `-cull_below` (after `min_age`);
    2. move seeds on: GERMINATED -> TRAINING at once; TRAINING -> BLENDING once it is
       `train_age` old (a fraction of the training budget); PROBATION -> FOSSILIZED when its
       contribution is not negative;
    3. on a validation plateau (no new best for `patience` steps, or the last step gained less
       than `min_gain`), when no seed is in progress and the run is not in its last `late`
       fraction, germinate in the layer with the worst health (most dead units; earlier layers
       first on ties), using the first blueprint of `preference` that the mask allows;
    4. otherwise WAIT.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        blueprints: tuple[str, ...] | None = None,
        preference: tuple[str, ...] = ("residual_mlp", "conv3x3", "bottleneck", "low_rank"),
        patience: int = 2,
        min_gain: float = 0.005,
        train_age: float = 0.05,
        cull_below: float = 0.01,
        late: float = 0.7,
    ) -> None:
        from esper_gym.kernels.blueprints import DEFAULT_LIBRARY

        self.layout = layout_from_spaces(observation_space, action_space)
        self.blueprints = tuple(blueprints or DEFAULT_LIBRARY)[: self.layout.blueprints]
        order = [self.blueprints.index(p) for p in preference if p in self.blueprints]
        self.order = order + [b for b in range(len(self.blueprints)) if b not in order]
        self.patience, self.min_gain, self.train_age = patience, min_gain, train_age
        self.cull_below, self.late = cull_below, late

    def act(self, obs: Mapping[str, np.ndarray], info: dict | None = None) -> int:
        view, mask = ObsView(obs), obs["action_mask"]
        n_nodes = view.n_nodes
        lay = self.layout
        in_progress = False
        for n in range(n_nodes):
            for s in range(lay.slots):
                state = view.state(n, s)
                contribution = float(view.slot(s, "contribution")[n]) / 10.0
                age = float(view.slot(s, "age")[n])
                cull = lay.encode(Action(CULL, n, s))
                advance = lay.encode(Action(ADVANCE, n, s))
                old = age >= self.train_age
                if state in (SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATION):
                    in_progress |= state != SeedState.PROBATION
                    if old and contribution < -self.cull_below and mask[cull]:
                        return cull
                if state == SeedState.GERMINATED and mask[advance]:
                    return advance
                if state == SeedState.TRAINING and old and mask[advance]:
                    return advance
                if state == SeedState.PROBATION and contribution >= 0 and mask[advance]:
                    return advance
        gain = view.glob("acc_delta") / 10.0
        started = view.glob("progress") > 0
        plateau = view.glob("plateau") * 10.0 >= self.patience or (started and gain < self.min_gain)
        if plateau and not in_progress and view.glob("progress") < self.late:
            dead = view.node("dead_ratio")
            candidates = sorted(range(n_nodes), key=lambda n: (-float(dead[n]), n))
            for n in candidates:
                for s in range(lay.slots):
                    for b in self.order:
                        a = lay.encode(Action(GERMINATE, n, s, b))
                        if mask[a]:
                            return a
        return 0


LAYER_RULES = ("first", "middle", "last", "next")
PLANS_FILE = "schedule_plans.yaml"  # in esper_gym.config_dir(): experiments/tune_schedule.py


@dataclass(frozen=True)
class Germination:
    """One entry of a schedule: at training progress `at` (0..1), germinate `blueprint` in the
    layer that `layer` names: first, middle or last host layer, `next` (the layer after the
    previous germination's, wrapping; the first layer for the first germination), or a layer
    index (an int >= 0, wrapping as `next` does)."""

    at: float
    blueprint: str
    layer: str | int = "first"

    def __post_init__(self) -> None:
        if isinstance(self.at, bool) or not isinstance(self.at, int | float):
            raise ValueError(f"germination at={self.at!r} must be a progress fraction in [0, 1)")
        if not 0 <= self.at < 1:
            raise ValueError(f"germination at={self.at} must be a progress fraction in [0, 1)")
        index = isinstance(self.layer, int) and not isinstance(self.layer, bool)
        if (index and self.layer < 0) or (not index and self.layer not in LAYER_RULES):
            raise ValueError(
                f"layer rule {self.layer!r}; allowed: {', '.join(LAYER_RULES)}, or a layer "
                "index (an int >= 0)"
            )


def parse_plan(plan) -> tuple[Germination, ...]:
    """A plan from config: a list of {at, blueprint, layer} mappings (or Germinations)."""
    if isinstance(plan, str | bytes) or not hasattr(plan, "__iter__"):
        raise ValueError(f"a schedule plan is a list of {{at, blueprint, layer}}, got {plan!r}")
    out = [g if isinstance(g, Germination) else Germination(**dict(g)) for g in plan]
    return tuple(sorted(out, key=lambda g: g.at))


def tuned_plan(task: str) -> tuple[Germination, ...]:
    """The plan experiments/tune_schedule.py chose for `task` (conf/schedule_plans.yaml)."""
    import yaml

    from esper_gym import config_dir

    path = config_dir() / PLANS_FILE
    plans = yaml.safe_load(path.read_text()) or {}
    if task not in plans:
        raise ValueError(
            f"no tuned schedule for task {task!r} in {path} (tuned: {', '.join(plans) or 'none'});"
            f" run `python experiments/tune_schedule.py --task {task} --contexts train`, or pass"
            " plan=[{at, blueprint, layer}, ...]"
        )
    return parse_plan(plans[task]["plan"])


def tuned_plans(task: str) -> list[tuple[dict, ...]] | None:
    """The pruned family of `task` (`plans` of its conf/schedule_plans.yaml entry, written by
    `tune_schedule.py --per-context`: the oracle's choice set), NoOp first; None where the
    entry has none."""
    import yaml

    from esper_gym import config_dir

    entry = (yaml.safe_load((config_dir() / PLANS_FILE).read_text()) or {}).get(task) or {}
    if not entry.get("plans"):
        return None
    plans = [tuple(dict(g) for g in plan) for plan in entry["plans"]]
    return sorted(plans, key=lambda p: len(p) > 0)  # stable: NoOp first, the rest in order


class ScheduleAgent:
    """An open-loop plan: germinate each entry's blueprint when training progress reaches its
    `at`, advance every live seed as soon as the mask allows, never cull, otherwise WAIT.

    No decision reads telemetry (accuracy, loss, health, contributions): only the progress
    clock, the seed states and the mask, so it plays the same plan in every context. A learned
    controller that does not beat the best such plan has learned a schedule, not to react.
    A due germination whose layer has no slot the mask allows goes to the next layer that has
    one (in order, wrapping); if none does, it waits until one does (a seed finishing frees its
    slot, the param budget may forbid it for good)."""

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        plan,
        blueprints: tuple[str, ...] | None = None,
    ) -> None:
        from esper_gym.kernels.blueprints import DEFAULT_LIBRARY

        self.layout = layout_from_spaces(observation_space, action_space)
        self.blueprints = tuple(blueprints or DEFAULT_LIBRARY)[: self.layout.blueprints]
        self.plan = parse_plan(plan)
        for g in self.plan:
            if g.blueprint not in self.blueprints:
                raise ValueError(
                    f"schedule blueprint {g.blueprint!r} is not in the task's library; "
                    f"allowed: {', '.join(self.blueprints)}"
                )
        self.reset()

    def reset(self) -> None:
        self.done = 0  # plan entries germinated so far
        self.last_layer = -1

    def act(self, obs: Mapping[str, np.ndarray], info: dict | None = None) -> int:
        view, mask = ObsView(obs), obs["action_mask"]
        n_nodes = view.n_nodes
        progress = float(view.glob("progress"))
        if progress == 0 and self.done:  # a new episode (progress restarts): replay the plan
            self.reset()
        lay = self.layout
        if self.done < len(self.plan) and progress >= self.plan[self.done].at:
            g = self.plan[self.done]
            b = self.blueprints.index(g.blueprint)
            first = (
                g.layer % n_nodes
                if isinstance(g.layer, int)
                else {
                    "first": 0,
                    "middle": (n_nodes - 1) // 2,
                    "last": n_nodes - 1,
                    "next": (self.last_layer + 1) % n_nodes,
                }[g.layer]
            )
            for k in range(n_nodes):
                n = (first + k) % n_nodes
                for s in range(lay.slots):
                    a = lay.encode(Action(GERMINATE, n, s, b))
                    if mask[a]:
                        self.done += 1
                        self.last_layer = n
                        return a
        return self.advance_or_wait(obs)

    def advance_or_wait(self, obs: Mapping[str, np.ndarray]) -> int:
        """The plan's action when no germination is due: advance the first live seed the mask
        lets advance, else WAIT."""
        view, mask, lay = ObsView(obs), obs["action_mask"], self.layout
        for n in range(view.n_nodes):
            for s in range(lay.slots):
                a = lay.encode(Action(ADVANCE, n, s))
                if view.state(n, s) in GROWING and mask[a]:
                    return a
        return 0


AGENTS = {
    "noop": NoOpAgent,
    "random": RandomAgent,
    "heuristic": HeuristicAgent,
    "schedule": ScheduleAgent,
    **RULES,  # growth rules: north, fragrow, gradmax, reactive (esper_gym.agents.rules)
    "lookahead": LookaheadAgent,
}
# Agents with access no deployed controller has (e.g. forks of the running episode): upper
# references, never the "strongest baseline" a learned controller is compared with.
PRIVILEGED: frozenset[str] = frozenset({"lookahead"})
NEEDS_ENV = frozenset({"lookahead"})  # built with the env itself (they fork it), not its spaces


def make_agent(name: str, env, **kwargs):
    """A baseline by name for `env` (uses only its spaces and, for the heuristic, the schedule
    and the growth rules, its blueprints; the NEEDS_ENV agents get the env itself). A growth
    rule takes `params`: a mapping of its thresholds, or None for the task's tuned ones
    (conf/rule_params.yaml)."""
    if name not in AGENTS:
        raise ValueError(f"unknown baseline {name!r}; allowed: {', '.join(AGENTS)}")
    if (name in ("heuristic", "schedule") or name in RULES) and "blueprints" not in kwargs:
        kwargs["blueprints"] = env.unwrapped.task.blueprints
    if name in NEEDS_ENV:
        kwargs["env"] = env
    if name in RULES:  # params: None plays the values tuned on the task's train contexts
        params = rule_params(env.unwrapped.base_task.name, name, kwargs.pop("params", None))
        kwargs = {**params, **kwargs}
    if name == "schedule" and kwargs.get("plan") is None:
        # The plan tuned on the task's train contexts (the base task: contexts vary its fields).
        kwargs["plan"] = tuned_plan(env.unwrapped.base_task.name)
    if name == "lookahead" and kwargs.get("continuation") != "noop" and "schedule" not in kwargs:
        try:  # the schedule continuation: the task's tuned plan (none tuned: noop only)
            plan = tuned_plan(env.unwrapped.base_task.name)
        except ValueError:
            plan = None
        blueprints = env.unwrapped.task.blueprints
        kwargs["schedule"] = (
            None
            if plan is None
            else ScheduleAgent(env.observation_space, env.action_space, plan, blueprints)
        )
    return AGENTS[name](env.observation_space, env.action_space, **kwargs)


def run_episode(env, agent, seed: int | None = None) -> dict:
    """Play one episode with `agent.act`; the metrics of `esper_gym.episode.play_episode`."""
    return play_episode(env, agent.act, seed)[0]
