"""ConcatVectorEnv: one gymnasium VectorEnv made of several, e.g. one per task.

    envs = ConcatVectorEnv([spirals_vec, fashion_vec])   # 16 + 16 copies -> num_envs 32

A learner that acts on a batch of observations (Tamiyo: one forward over all graphs) then
trains on the episodes of several tasks at once with one policy. Every Esper task has the same
observation and action spaces (`max_nodes` node slots, the same action layout), so their
observations stack; what differs (host widths, data, budgets) is in the observation itself.

Copies keep their order: sub-env k holds indices `offsets[k] .. offsets[k] + n_k`. `reset(seed)`
gives sub-env k the seed `seed + offsets[k]`, so copy i starts from `seed + i` as it would in
one vector env of that size. Infos are merged key by key as gymnasium's vector envs lay them out
(an array per key, with a boolean `_key` array marking the copies that have it); a key some
sub-envs lack is absent (False) for their copies, nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.vector import VectorEnv
from gymnasium.vector.utils import batch_space


class ConcatVectorEnv(VectorEnv):
    def __init__(self, envs: Sequence[VectorEnv]) -> None:
        if not envs:
            raise ValueError("ConcatVectorEnv needs at least one vector env")
        first = envs[0]
        for k, env in enumerate(envs[1:], 1):
            if env.single_observation_space != first.single_observation_space:
                raise ValueError(
                    f"vector env {k} has observation space {env.single_observation_space}, "
                    f"env 0 has {first.single_observation_space}: they cannot be stacked"
                )
            if env.single_action_space != first.single_action_space:
                raise ValueError(
                    f"vector env {k} has action space {env.single_action_space}, env 0 has "
                    f"{first.single_action_space}"
                )
            mode = env.metadata.get("autoreset_mode")
            if mode != first.metadata.get("autoreset_mode"):
                raise ValueError(
                    f"vector env {k} autoresets in mode {mode}, env 0 in "
                    f"{first.metadata.get('autoreset_mode')}: one learner cannot read both"
                )
        self.envs = list(envs)
        self.sizes = [env.num_envs for env in self.envs]
        self.offsets = np.cumsum([0, *self.sizes])[:-1].tolist()
        self.num_envs = sum(self.sizes)
        self.single_observation_space = first.single_observation_space
        self.single_action_space = first.single_action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.metadata = dict(first.metadata)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        results = [
            env.reset(seed=None if seed is None else seed + offset, options=options)
            for env, offset in zip(self.envs, self.offsets)
        ]
        return _concat([r[0] for r in results]), merge_infos([r[1] for r in results], self.sizes)

    def step(self, actions):
        actions = np.asarray(actions)
        results = [
            env.step(actions[offset : offset + n])
            for env, offset, n in zip(self.envs, self.offsets, self.sizes)
        ]
        obs, reward, terminated, truncated, infos = zip(*results)
        return (
            _concat(obs),
            np.concatenate(reward),
            np.concatenate(terminated),
            np.concatenate(truncated),
            merge_infos(infos, self.sizes),
        )

    def close_extras(self, **kwargs: Any) -> None:
        for env in self.envs:
            env.close()


def _concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def merge_infos(infos: Sequence[dict], sizes: Sequence[int]) -> dict:
    """Vector infos of sub-envs of `sizes` copies -> one vector info over all copies."""
    keys = list(dict.fromkeys(k for info in infos for k in info if not k.startswith("_")))
    merged: dict[str, Any] = {}
    for key in keys:
        values = [info.get(key) for info in infos]
        if all(v is None or isinstance(v, dict) for v in values):  # nested info: merge inside
            merged[key] = merge_infos([v or {} for v in values], sizes)
            present = [
                info.get(f"_{key}", np.ones(n, bool)) if key in info else np.zeros(n, bool)
                for info, n in zip(infos, sizes)
            ]
            merged[f"_{key}"] = np.concatenate(present)
            continue
        like = next(np.asarray(v) for v in values if v is not None)
        parts, present = [], []
        for info, value, n in zip(infos, values, sizes):
            if value is None:
                fill = np.empty(n, object) if like.dtype == object else np.zeros(n, like.dtype)
                parts.append(fill)
                present.append(np.zeros(n, bool))
            else:
                parts.append(np.asarray(value))
                present.append(np.asarray(info.get(f"_{key}", np.ones(n, bool))))
        dtype = object if any(p.dtype == object for p in parts) else None
        merged[key] = np.concatenate(parts) if dtype is None else _object_concat(parts)
        merged[f"_{key}"] = np.concatenate(present)
    return merged


def _object_concat(parts: list[np.ndarray]) -> np.ndarray:
    out = np.empty(sum(len(p) for p in parts), object)
    i = 0
    for part in parts:
        for value in part:
            out[i] = value
            i += 1
    return out
