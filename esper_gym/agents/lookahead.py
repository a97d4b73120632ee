"""Lookahead: try candidate decisions on forks of the running episode, commit the best.

"Try before you commit", as Firefly (Wu et al., 2020) and SensLI grow a network only after
measuring what the growth would buy. Every `every` env steps the agent forks the running
episode (`MorphogeneticEnv.fork()`: host, seeds, optimizers, data order and RNG copied) once per
candidate, plays the candidate and then the default continuation on the fork, for `horizon`
steps in all or (`horizon=None`, the default) to the end of the episode, and commits the
candidate whose summed reward is highest. Between decisions it plays the default continuation.

Why to the end by default: growth pays its accuracy once (the reward is the accuracy's change)
but its parameter rent every step to the end. A short horizon sees a fresh seed's early gain,
which a static host would often catch up with, and little of the rent, so it grows too much
(measured on spirals test contexts: 8 seeds in an 80-step episode with horizon 8, return below
NoOp's). Played to the end on exact copies of the run, each decision is a rollout step over the
default continuation as base policy (Bertsekas' rollout algorithm): it scores each candidate by
the return it would really get if no other growth followed.

It reads the env, not only the observation: it sees the future of this very run (its data
order, its initialisation). No deployed controller has that, so it is **privileged**
(`esper_gym.agents.baselines.PRIVILEGED`): an upper reference for "measure, then decide", never
the bar a learned controller is compared with.

Candidates at a decision (a small subset of the flat action space, so the cost is bounded):
- the default continuation: ADVANCE the first live seed the mask allows (seeds move on as
  soon as they can, as `ScheduleAgent` does), else WAIT;
- GERMINATE of each of `blueprints` in the first free slot of each host layer, where the mask
  allows it.
Ties go to the default continuation (growth has to earn its place). Cost per decision: at most
(1 + layers x len(blueprints)) x (horizon, or the steps left) forked env steps; with the
defaults (every 8 steps, to the end, 2 blueprints) an 80-step spirals episode costs about 4,000
forked steps (40 s on one CPU thread). `episode_cost()` reports the forked steps and the time
spent in rollouts this episode (`esper_gym.evaluate`'s `cost_steps`, `cost_s` columns).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from esper_gym.actions import ADVANCE, GERMINATE, WAIT, Action


class LookaheadAgent:
    """Commit, every `every` steps, the candidate with the best forked return over `horizon`
    steps (None: to the end of the episode).

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
        self.env = env
        self.every = int(every)
        self.horizon = None if horizon is None else int(horizon)
        self.blueprints = names
        self._bp_index = [library.index(b) for b in names]
        self.layout = base.layout
        self.last_scores: dict[int, float] = {}
        self._reset_cost()

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
        """The continuation between decisions and in rollouts: ADVANCE the first seed the mask
        allows (only GERMINATED, TRAINING and PROBATION seeds can be advanced), else WAIT."""
        lay = self.layout
        for n in range(lay.max_nodes):
            for s in range(lay.slots):
                a = lay.encode(Action(ADVANCE, n, s))
                if mask[a]:
                    return a
        return self.layout.encode(Action(WAIT))

    def candidates(self, mask: np.ndarray) -> list[int]:
        """The default continuation, then GERMINATE of each candidate blueprint in the first
        slot of each layer where the mask allows one of them."""
        lay = self.layout
        out = [self.default(mask)]
        for n in range(len(self.env.unwrapped.layers)):
            for s in range(lay.slots):
                germs = [lay.encode(Action(GERMINATE, n, s, b)) for b in self._bp_index]
                allowed = [a for a in germs if mask[a]]
                if allowed:
                    out += allowed
                    break
        return out

    def rollout(self, action: int) -> float:
        """Summed reward of `action` then default steps (`horizon` in all, or to the end of the
        episode), on a fork of the env."""
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
            action = self.default(obs["action_mask"])
        fork.close()
        self.rollout_s += time.perf_counter() - start
        return total

    def act(self, obs: Mapping[str, np.ndarray], info: dict | None = None) -> int:
        base = self.env.unwrapped
        if base.steps == 0:  # the first decision of an episode: its cost starts from zero
            self._reset_cost()
        mask = obs["action_mask"]
        if base.steps % self.every:
            return self.default(mask)
        candidates = self.candidates(mask)
        if len(candidates) == 1:
            return candidates[0]
        self.decisions += 1
        scores = [self.rollout(a) for a in candidates]
        self.last_scores = dict(zip(candidates, scores))
        # argmax keeps the first of equal scores: the default continuation wins ties.
        return candidates[int(np.argmax(scores))]
