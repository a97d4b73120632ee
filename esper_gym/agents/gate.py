"""The schedule gate: an agent's action mask cut to the tuned schedule's action, so that what it
learns is *whether* to follow the plan, not the plan.

At each step the mask offers the schedule's action (`ScheduleAgent`, conf/schedule_plans.yaml)
and, where that action is a germination, the plan's action without it (advance a live seed,
else WAIT): the refusal. Everywhere else the plan's action is the only one. `declined`:
- "drop": a refused germination leaves the plan, so each of the plan's germinations is one
  yes-or-no decision; the agent can grow as planned or less, never more or earlier;
- "defer": a refused germination stays due, so it can also come later (never growing then takes
  a refusal at every step left, which a sampling policy almost never plays).

- "plans": no single plan; the mask offers the next action of every plan of the task's pruned
  family (`plans` in conf/schedule_plans.yaml, the plans ever best on train contexts: the
  oracle's choice set) that agrees with every action played so far. The agent picks a plan
  branch by branch as the run shows itself (grow now or wait, one seed more or stop, which
  blueprint), where the oracle picks one before the run from its selection episodes.
- "counts": the same family, each plan's seeds grown at one moment (a burst) in reverse layer
  order (`count_first`), so that a burst's first germination names its size: its layer is
  the number of seeds minus one. How many seeds to grow is then one decision, taken with the
  first seed, where under "plans" it is one "another seed?" branch a step per seed, the first
  of which (behind a three-seed plan at 0 or 0.25) the agent learns to refuse before the
  later ones pay (results/tamiyo_pace/plans).

A seed once grown advances as the plan says, refused germination or not. The gate is part of
the agent: a checkpoint trained behind it records it (`env_record`'s "gate") and is evaluated
behind it. `ScheduleGate` wraps one env; `VectorScheduleGate` a vector env (the batched
simulator), one `Gate` per copy: the same rule over an extra dimension.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import gymnasium as gym
import numpy as np

from esper_gym.actions import GERMINATE

GATES = ("defer", "drop", "plans", "counts")
FAMILY_GATES = ("plans", "counts")  # the rules that offer a family, not one plan


def check_gate(gate) -> str | None:
    if gate is not None and gate not in GATES:
        raise ValueError(f"gate={gate!r}; allowed: null (no gate), {', '.join(GATES)}")
    return gate


def gate_plans(task: str, declined: str) -> list[tuple]:
    """The plans (tuples of Germination) a gate of rule `declined` offers on `task`: the tuned
    schedule's (drop, defer), the pruned family (plans) or the family in `count_first` order
    (counts). ValueError, naming the command that writes them, if none."""
    from esper_gym.agents.baselines import parse_plan, tuned_plan, tuned_plans

    if check_gate(declined) not in FAMILY_GATES:
        return [tuned_plan(task)]
    family = tuned_plans(task)
    if not family:
        raise ValueError(
            f"gate {declined!r}: task {task!r} has no pruned plan family (`plans` in "
            "conf/schedule_plans.yaml); write it with `python experiments/tune_schedule.py "
            f"--task {task} --per-context 2`, or use the drop gate"
        )
    plans = [parse_plan(plan) for plan in family]
    return [count_first(p) for p in plans] if declined == "counts" else plans


def count_first(plan: tuple) -> tuple:
    """`plan` with every burst (germinations at the same `at`) grown in reverse layer order, its
    layers made indices: a burst of k seeds in layers i..i+k-1 grows i+k-1 first, so that the
    first germination of a burst from the first layer says how many seeds it grows. The same
    seeds, each burst's last seed one step earlier. ValueError for a `middle` or `last` rule
    (their index depends on the host)."""
    from esper_gym.agents.baselines import Germination

    layers, last = [], -1
    for g in plan:
        if g.layer in ("middle", "last"):
            raise ValueError(f"count_first: layer rule {g.layer!r}; allowed: first, next, an index")
        last = {"first": 0, "next": last + 1}.get(g.layer, g.layer)
        layers.append(last)
    out = []
    for _, burst in itertools.groupby(zip(plan, layers), key=lambda gl: gl[0].at):
        out += [Germination(g.at, g.blueprint, layer) for g, layer in reversed(list(burst))]
    return tuple(out)


def plans_digest(task: str, declined: str) -> str:
    """sha256 (hex) of the plans a gate of rule `declined` offers on `task` (`gate_plans`): a
    checkpoint records it, so that it is never played behind another action set than the one
    it was trained behind (conf/schedule_plans.yaml is rewritten by tune_schedule.py)."""
    import hashlib
    import json

    plans = [[[g.at, g.blueprint, g.layer] for g in p] for p in gate_plans(task, declined)]
    return hashlib.sha256(json.dumps(plans).encode()).hexdigest()


class Gate:
    """One copy's gate: the plans still in play (`live`) and their proposals. Under drop and
    defer the family is the one tuned plan (`schedule`) and `proposal` its action; under plans
    and counts `schedule` and `proposal` are the first live plan's (NoOp's while it is live)."""

    def __init__(self, env: gym.Env, declined: str) -> None:
        from esper_gym.agents.baselines import make_agent

        self.declined = check_gate(declined)
        self.layout = env.unwrapped.layout
        plans = gate_plans(env.unwrapped.base_task.name, declined)
        self.family = [make_agent("schedule", env, plan=plan) for plan in plans]
        self.schedule = self.family[0]
        self.reset()

    def reset(self) -> None:
        for plan in self.family:
            plan.reset()
        self.live = list(self.family)  # the plans that agree with every action played
        self.proposals = [0]
        self.proposal = 0

    def cut(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The mask for `obs` (the env's own mask): the proposals, and the refusal."""
        mask = np.zeros_like(obs["action_mask"])
        if self.declined in FAMILY_GATES:
            self.proposals = [int(plan.act(obs)) for plan in self.live]
            self.proposal = self.proposals[0]
            mask[self.proposals] = 1
            return mask
        # The plan's place before acting, restored if a germination is refused (every step of
        # every copy: two ints, not a deep copy of the agent).
        self._before = (self.schedule.done, self.schedule.last_layer)
        self.proposal = int(self.schedule.act(obs))
        mask[self.proposal] = 1
        if self.layout.decode(self.proposal).kind == GERMINATE:
            mask[self.schedule.advance_or_wait(obs)] = 1
        return mask

    def chose(self, action: int) -> None:
        """The agent played `action` on the last cut mask."""
        action = int(action)
        if self.declined in FAMILY_GATES:
            live = [p for p, a in zip(self.live, self.proposals) if a == action]
            if not live:
                raise ValueError(
                    f"action {action} is not one the gate offered; allowed: "
                    f"{sorted(set(self.proposals))}"
                )
            self.live = live
        elif action != self.proposal and self.declined == "defer":
            self.schedule.done, self.schedule.last_layer = self._before  # it stays due


class ScheduleGate(gym.Wrapper):
    """One env behind a `Gate` (module docstring)."""

    def __init__(self, env: gym.Env, declined: str = "drop") -> None:
        super().__init__(env)
        self.gate = Gate(env, declined)
        self.declined = declined

    @property
    def proposal(self) -> int:
        return self.gate.proposal

    def _cut(self, obs: dict) -> dict:
        self.mask = self.gate.cut(obs)
        return {**obs, "action_mask": self.mask}

    def action_masks(self) -> np.ndarray:
        """The cut mask (sb3-contrib's MaskablePPO reads masks here, not in the observation)."""
        return self.mask.astype(bool)

    def reset(self, **kwargs):
        self.gate.reset()
        obs, info = self.env.reset(**kwargs)
        return self._cut(obs), info

    def step(self, action):
        self.gate.chose(action)
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._cut(obs), reward, terminated, truncated, info


class VectorScheduleGate(gym.vector.VectorWrapper):
    """A vector env that autoresets in the same step (the batched simulator) behind one `Gate`
    per copy; a copy whose episode ended has its gate reset for the new one."""

    def __init__(self, env: gym.vector.VectorEnv, declined: str = "drop") -> None:
        super().__init__(env)
        copies = getattr(env.unwrapped, "envs", None)
        if copies is None or len(copies) != env.num_envs:
            raise TypeError(f"{env!r}: the gate needs a vector env that exposes its copies (envs)")
        self.gates = [Gate(e, declined) for e in copies]
        self.declined = declined

    def _cut(self, obs: dict) -> dict:
        masks = obs["action_mask"].copy()
        for i, gate in enumerate(self.gates):
            masks[i] = gate.cut({k: v[i] for k, v in obs.items()})
        return {**obs, "action_mask": masks}

    def reset(self, **kwargs):
        for gate in self.gates:
            gate.reset()
        obs, info = self.env.reset(**kwargs)
        return self._cut(obs), info

    def step(self, actions):
        for gate, action in zip(self.gates, np.asarray(actions)):
            gate.chose(int(action))
        obs, reward, terminated, truncated, info = self.env.step(actions)
        for i in np.flatnonzero(np.logical_or(terminated, truncated)):
            self.gates[i].reset()  # obs[i] is the next episode's first observation
        return self._cut(obs), reward, terminated, truncated, info


def gate_of(env) -> str | None:
    """The `declined` rule of the gate `env` is behind (None: no gate)."""
    while isinstance(env, (gym.Wrapper, gym.vector.VectorWrapper)):
        if isinstance(env, (ScheduleGate, VectorScheduleGate)):
            return env.declined
        env = env.env
    return None
