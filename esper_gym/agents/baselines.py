"""Baseline policies: NoOp, Random (masked) and a Heuristic growth rule.

They see only the observation (and its action mask), like every agent. The layout of the flat
action space is recovered from the spaces, so one agent works on every task.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from gymnasium import spaces

from esper_gym.actions import ADVANCE, CULL, GERMINATE, Action, ActionLayout
from esper_gym.episode import play_episode
from esper_gym.kasmina.lifecycle import SeedState
from esper_gym.observation import GLOBAL_FEATURES, NODE_FEATURES, SLOT_FEATURES

G = {name: i for i, name in enumerate(GLOBAL_FEATURES)}
N = {name: i for i, name in enumerate(NODE_FEATURES)}
SL = {name: i for i, name in enumerate(SLOT_FEATURES)}


def layout_from_spaces(
    observation_space: spaces.Dict, action_space: spaces.Discrete
) -> ActionLayout:
    max_nodes, node_dim = observation_space["nodes"].shape
    slots = (node_dim - len(NODE_FEATURES)) // len(SLOT_FEATURES)
    per_node = (int(action_space.n) - 1) // max_nodes
    return ActionLayout(max_nodes, slots, per_node // slots - 2)


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

    def _slot(self, node: np.ndarray, s: int) -> tuple[SeedState, float, float]:
        base = len(NODE_FEATURES) + s * len(SLOT_FEATURES)
        state = SeedState(int(np.argmax(node[base : base + len(SeedState)])))
        contribution = float(node[base + SL["contribution"]]) / 10.0
        age = float(node[base + SL["age"]])
        return state, contribution, age

    def act(self, obs: Mapping[str, np.ndarray], info: dict | None = None) -> int:
        mask, nodes = obs["action_mask"], obs["nodes"]
        n_nodes = int(obs["node_mask"].sum())
        glob = obs["globals"]
        lay = self.layout
        in_progress = False
        for n in range(n_nodes):
            for s in range(lay.slots):
                state, contribution, age = self._slot(nodes[n], s)
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
        gain = glob[G["acc_delta"]] / 10.0
        started = glob[G["progress"]] > 0
        plateau = glob[G["plateau"]] * 10.0 >= self.patience or (started and gain < self.min_gain)
        if plateau and not in_progress and glob[G["progress"]] < self.late:
            candidates = sorted(
                range(n_nodes), key=lambda n: (-float(nodes[n][N["dead_ratio"]]), n)
            )
            for n in candidates:
                for s in range(lay.slots):
                    for b in self.order:
                        a = lay.encode(Action(GERMINATE, n, s, b))
                        if mask[a]:
                            return a
        return 0


AGENTS = {"noop": NoOpAgent, "random": RandomAgent, "heuristic": HeuristicAgent}
# Agents with access no deployed controller has (e.g. forks of the running episode): upper
# references, never the "strongest baseline" a learned controller is compared with.
PRIVILEGED: frozenset[str] = frozenset()


def make_agent(name: str, env, **kwargs):
    """A baseline by name for `env` (uses only its spaces and, for the heuristic, its blueprints)."""
    if name not in AGENTS:
        raise ValueError(f"unknown baseline {name!r}; allowed: {', '.join(AGENTS)}")
    if name == "heuristic" and "blueprints" not in kwargs:
        kwargs["blueprints"] = env.unwrapped.task.blueprints
    return AGENTS[name](env.observation_space, env.action_space, **kwargs)


def run_episode(env, agent, seed: int | None = None) -> dict:
    """Play one episode with `agent.act`; the metrics of `esper_gym.episode.play_episode`."""
    return play_episode(env, agent.act, seed)[0]
