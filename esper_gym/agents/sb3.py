"""Stable-Baselines3 agents on the model graph: PPO and sb3-contrib's MaskablePPO.

Both use `GraphFeaturesExtractor`, which runs Tamiyo's message-passing trunk
(`esper_gym.agents.tamiyo.GraphEncoder`) over the Dict observation and hands SB3 a fixed-size graph
embedding; SB3's own MLP heads then map it to the flat action logits and the value. That loses
Tamiyo's per-node heads (the action head is sized for one `max_nodes`), which is the point of
having both: the SB3 agents are the off-the-shelf reference.

```python
env = gym.make("Esper/Spirals-v0")
model = make_maskable_ppo(env, n_steps=256, seed=0)   # masks from env.action_masks()
model.learn(10_000)
```
Plain PPO ignores the mask: a masked action runs as WAIT and pays the invalid-action penalty.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import is_masking_supported
from stable_baselines3 import PPO
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from esper_gym.agents.tamiyo import GraphEncoder, obs_to_batch


class GraphFeaturesExtractor(BaseFeaturesExtractor):
    """Dict observation (batched, every key as float32 as SB3 passes it) -> [B, hidden].

    The observation becomes a graph batch (`obs_to_batch`, which casts edges back to indices
    and masks back to bool) and goes through `GraphEncoder`; the graph context (attentional
    pooling of the nodes joined with the globals) is the feature vector.
    Dropout defaults to 0: SB3 trains in train mode and collects in eval mode, so dropout
    noise would show up in PPO's ratio.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        hidden: int = 64,
        layers: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__(observation_space, features_dim=hidden)
        self.encoder = GraphEncoder(
            node_dim=observation_space["nodes"].shape[1],
            global_dim=observation_space["globals"].shape[0],
            edge_dim=observation_space["edge_attr"].shape[1],
            hidden=hidden,
            layers=layers,
            dropout=dropout,
        )

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = obs_to_batch(observations, device=observations["nodes"].device)
        _, context = self.encoder(batch)
        return context


def graph_policy_kwargs(
    hidden: int = 64, layers: int = 3, dropout: float = 0.0, **extra: Any
) -> dict[str, Any]:
    """policy_kwargs for a "MultiInputPolicy" on the graph observation."""
    return dict(
        features_extractor_class=GraphFeaturesExtractor,
        features_extractor_kwargs=dict(hidden=hidden, layers=layers, dropout=dropout),
        net_arch=dict(pi=[hidden], vf=[hidden]),
        share_features_extractor=True,
        **extra,
    )


def make_ppo(
    env,
    hidden: int = 64,
    layers: int = 3,
    dropout: float = 0.0,
    policy_kwargs: dict | None = None,
    **kw: Any,
) -> PPO:
    """SB3 PPO with the graph extractor. `kw` goes to `PPO` (n_steps, batch_size, seed, ...);
    `policy_kwargs` entries are added to (and override) the graph ones."""
    pk = {**graph_policy_kwargs(hidden, layers, dropout), **(policy_kwargs or {})}
    return PPO("MultiInputPolicy", env, policy_kwargs=pk, **kw)


class ObservedActionMask(gym.Wrapper):
    """`action_masks()` from the last observation's `action_mask`, for an env without one."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._mask = np.ones(env.action_space.n, bool)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._mask = np.asarray(obs["action_mask"], bool)
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._mask = np.asarray(obs["action_mask"], bool)
        return obs, reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        return self._mask


def make_maskable_ppo(
    env,
    hidden: int = 64,
    layers: int = 3,
    dropout: float = 0.0,
    policy_kwargs: dict | None = None,
    **kw: Any,
) -> MaskablePPO:
    """sb3-contrib MaskablePPO with the graph extractor; masks come from `env.action_masks()`
    (MorphogeneticEnv has it; a gym.Env without it is wrapped in `ObservedActionMask`)."""
    if isinstance(env, gym.Env) and not is_masking_supported(env):
        env = ObservedActionMask(env)
    pk = {**graph_policy_kwargs(hidden, layers, dropout), **(policy_kwargs or {})}
    return MaskablePPO("MultiInputPolicy", env, policy_kwargs=pk, **kw)
