"""Lookahead: try candidate decisions on forks of the running episode, commit the best.

"Try before you commit", as Firefly (Wu et al., 2020) and SensLI grow a network only after
measuring what the growth would buy. Every `every` env steps (1: at every step, where the cost is
affordable) the agent forks the running episode (`MorphogeneticEnv.fork()`: host, seeds,
optimizers, data order and RNG copied) once per (candidate, continuation), plays the candidate
and then the continuation on the fork, for `horizon` steps in all or (`horizon=None`, the
default) to the end of the episode, and commits the candidate whose summed reward is highest.
Between decisions it plays the continuation that won the last decision.

**The continuation is a policy worth continuing with** (`continuation`):
- "schedule": the task's tuned open-loop plan (`ScheduleAgent`, conf/schedule_plans.yaml;
  `make_agent` builds it) from where the run stands: its due germinations still happen;
- "noop": no further growth (ADVANCE the first live seed the mask allows, else WAIT), the old
  continuation, which scores every candidate as if nothing else would ever grow: it undervalues
  waiting wherever growth pays (a candidate "grow later" is scored as "never grow");
- "best" (default): both; a candidate scores the better of its two rollouts.
Each decision is a rollout step over those base policies (Bertsekas' rollout algorithm): with
exact forks and the base policies' own actions among the candidates, the committed episode's
return is at least what its first decision predicted, so at least the best of the schedule's and
NoOp's returns on the same seed. The continuations keep their own state (the schedule's next
entry) along the committed run: a germination the schedule wanted and the lookahead declined
stays due, and is tried again.

Why to the end by default: growth pays its accuracy once (the reward is the accuracy's change)
but its parameter rent every step to the end. A short horizon sees a fresh seed's early gain and
little of the rent, so it grows too much.

It reads the env, not only the observation: it sees the future of this very run (its data
order, its initialisation). No deployed controller has that, so it is **privileged**
(`esper_gym.agents.baselines.PRIVILEGED`): an upper reference for "measure, then decide", never
the bar a learned controller is compared with.

Candidates at a decision (a small subset of the flat action space, so the cost is bounded): each
continuation's own action now (the winning continuation's first), WAIT, GERMINATE of each of
`blueprints` in the first free slot of each host layer where the mask allows it, and (`cull`)
CULL of each live seed the mask allows. Ties go to the first (the continuation's own action:
growth has to earn its place). Cost per decision: at most candidates x continuations x
(horizon, or the steps left) forked env steps; `episode_cost()` reports the forked steps and the
time spent in rollouts this episode (`esper_gym.evaluate`'s `cost_steps`, `cost_s` columns).
Measured on Esper/SpiralsBudget-v0 (32 decisions, test context 3, seed 1_000_000, one busy
CPU thread, continuation "best"): `every=4` 2,120 forked steps, 77 s, return 2.66; `every=1`
8,668 forked steps, 359 s, return 2.62 (schedule 2.32, NoOp 0.96 on that episode).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from esper_gym.actions import ADVANCE, CULL, GERMINATE, WAIT, Action

CONTINUATIONS = ("best", "schedule", "noop")


class Advance:
    """The "noop" continuation: ADVANCE the first live seed the mask allows, else WAIT."""

    def __init__(self, layout) -> None:
        self.layout = layout

    def act(self, obs: Mapping[str, np.ndarray], info: dict | None = None) -> int:
        mask, lay = obs["action_mask"], self.layout
        for n in range(lay.max_nodes):
            for s in range(lay.slots):
                a = lay.encode(Action(ADVANCE, n, s))
                if mask[a]:
                    return a
        return lay.encode(Action(WAIT))


class LookaheadAgent:
    """Commit, every `every` steps, the candidate with the best forked return over `horizon`
    steps (None: to the end of the episode) followed by `continuation` (module docstring).
    `schedule`: the schedule continuation, an agent with `act(obs)` whose state is copied for
    each rollout (make_agent gives the task's tuned ScheduleAgent); "best" without one falls
    back to "noop" with a warning. `cull`: CULL of live seeds is a candidate too.

    `env` is the env the agent acts in (any wrapper of a `MorphogeneticEnv`); the agent forks
    `env.unwrapped` at each decision, so it must be the env whose observations `act` is given.
    `blueprints`: the candidate blueprints (None: the task's whole library, 4x the default
    cost; conv hosts want conv3x3 among them). The defaults are those of conf/agent/lookahead.yaml.
    The candidate scores of the last decision are kept in `last_scores` ({action: return})."""

    def __init__(
        self,
        observation_space,
        action_space,
        env,
        every: int = 8,
        horizon: int | None = None,
        blueprints: Sequence[str] | None = ("residual_mlp", "low_rank"),
        continuation: str = "best",
        cull: bool = True,
        schedule=None,
    ) -> None:
        for name, value in (("every", every), ("horizon", horizon)):
            if value is None and name == "horizon":
                continue
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"lookahead {name}={value!r} must be an integer >= 1")
        base = getattr(env, "unwrapped", env)
        if not callable(getattr(base, "fork", None)):
            raise TypeError(f"lookahead needs an env with fork() (MorphogeneticEnv), got {env!r}")
        library = tuple(base.task.blueprints)
        names = library if blueprints is None else tuple(blueprints)
        unknown = [b for b in names if b not in library]
        if unknown or not names:
            raise ValueError(
                f"lookahead blueprints={list(names)}: {unknown or 'none'} not in the task's "
                f"library; allowed: {', '.join(library)}"
            )
        if continuation not in CONTINUATIONS:
            raise ValueError(
                f"lookahead continuation={continuation!r}; allowed: {', '.join(CONTINUATIONS)}"
            )
        if not isinstance(cull, bool):
            raise ValueError(f"lookahead cull={cull!r} must be true or false")
        if continuation != "noop" and schedule is None:
            if continuation == "schedule":
                raise ValueError(
                    "lookahead continuation='schedule' needs schedule= (make_agent gives the "
                    "task's tuned plan; run experiments/tune_schedule.py for the task)"
                )
            warnings.warn(
                f"lookahead: no tuned schedule for {base.task.name!r}; continuing with noop only",
                stacklevel=2,
            )
            continuation = "noop"
        self.env = env
        self.every = int(every)
        self.continuation = continuation
        self.cull = cull
        self.horizon = None if horizon is None else int(horizon)
        self.blueprints = names
        self._bp_index = [library.index(b) for b in names]
        self.layout = base.layout
        self.policies = {}  # name -> the continuation's state as of the episode's start
        if continuation in ("best", "schedule"):
            self.policies["schedule"] = copy.deepcopy(schedule)
        if continuation in ("best", "noop"):
            self.policies["noop"] = Advance(self.layout)
        self.last_scores: dict[int, float] = {}
        self._start_episode()

    def _start_episode(self) -> None:
        self._reset_cost()
        self.states = {k: copy.deepcopy(p) for k, p in self.policies.items()}
        for state in self.states.values():
            if callable(getattr(state, "reset", None)):
                state.reset()
        self.following = next(iter(self.policies))

    def _reset_cost(self) -> None:
        self.forked_steps = 0
        self.rollout_s = 0.0
        self.decisions = 0

    def episode_cost(self) -> dict[str, float]:
        """This episode's cost: `cost_steps` (env steps simulated on forks), `cost_s` (seconds
        spent forking and rolling out), `decisions` (steps at which candidates were tried)."""
        return {
            "cost_steps": self.forked_steps,
            "cost_s": self.rollout_s,
            "decisions": self.decisions,
        }

    def default(self, mask: np.ndarray) -> int:
        """The "noop" continuation's action: ADVANCE the first seed the mask allows (only
        GERMINATED, TRAINING and PROBATION seeds can be advanced), else WAIT."""
        return Advance(self.layout).act({"action_mask": mask})

    def candidates(self, mask: np.ndarray, first: Sequence[int] | None = None) -> list[int]:
        """`first` (the continuations' own actions; None: the noop continuation's), WAIT,
        GERMINATE of each candidate blueprint in the first slot of each layer where the mask
        allows one of them, and (`cull`) CULL of each seed the mask allows; no repeats."""
        lay = self.layout
        out = list(first) if first is not None else [self.default(mask)]
        out.append(lay.encode(Action(WAIT)))
        for n in range(len(self.env.unwrapped.layers)):
            for s in range(lay.slots):
                germs = [lay.encode(Action(GERMINATE, n, s, b)) for b in self._bp_index]
                allowed = [a for a in germs if mask[a]]
                if allowed:
                    out += allowed
                    break
        if self.cull:
            for n in range(len(self.env.unwrapped.layers)):
                out += [c for s in range(lay.slots) if mask[c := lay.encode(Action(CULL, n, s))]]
        return list(dict.fromkeys(out))

    def rollout(self, action: int, policy=None) -> float:
        """Summed reward of `action` then `policy`'s actions (a copy of a continuation's state;
        None: the noop continuation) for `horizon` steps in all, or to the end of the episode,
        on a fork of the env. `policy` is played (its state moves on)."""
        policy = policy or Advance(self.layout)
        start = time.perf_counter()
        fork = self.env.unwrapped.fork()
        total = 0.0
        steps = 0
        while self.horizon is None or steps < self.horizon:
            steps += 1
            obs, reward, terminated, truncated, _ = fork.step(action)
            self.forked_steps += 1
            total += reward
            if terminated or truncated:
                break
            action = policy.act(obs)
        fork.close()
        self.rollout_s += time.perf_counter() - start
        return total

    def act(self, obs: Mapping[str, np.ndarray], info: dict | None = None) -> int:
        base = self.env.unwrapped
        if base.steps == 0:  # a new episode: its cost starts from zero, continuations afresh
            self._start_episode()
        mask = obs["action_mask"]
        # Each continuation's own action now, and its state after taking it.
        after = {k: copy.deepcopy(state) for k, state in self.states.items()}
        own = {k: int(policy.act(obs)) for k, policy in after.items()}
        if base.steps % self.every:
            return self._commit(own[self.following], own, after)
        order = [self.following, *(k for k in own if k != self.following)]
        candidates = self.candidates(mask, [own[k] for k in order])
        if len(candidates) == 1:
            return self._commit(candidates[0], own, after)
        self.decisions += 1
        scores, winners = [], []
        for a in candidates:
            tried = {
                k: self.rollout(a, copy.deepcopy(after[k] if own[k] == a else self.states[k]))
                for k in order
            }
            best = max(order, key=lambda k: tried[k])  # ties: the first (the one followed)
            scores.append(tried[best])
            winners.append(best)
        self.last_scores = dict(zip(candidates, scores))
        # argmax keeps the first of equal scores: the continuation's own action wins ties.
        i = int(np.argmax(scores))
        self.following = winners[i]
        return self._commit(candidates[i], own, after)

    def _commit(self, action: int, own: dict, after: dict) -> int:
        """Move each continuation's state along the committed run: as it would be after its
        own action where that is the action taken, else as it was (its wish stays due)."""
        self.states = {k: after[k] if own[k] == action else self.states[k] for k in self.states}
        return action
