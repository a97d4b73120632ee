"""Stable-Baselines3 agents on the model graph: PPO and sb3-contrib's MaskablePPO.

Both use `GraphFeaturesExtractor`, which runs Tamiyo's message-passing trunk
(`esper_gym.agents.graph.GraphEncoder`) over the Dict observation and hands SB3 a fixed-size graph
embedding; SB3's own MLP heads then map it to the flat action logits and the value. That loses
Tamiyo's per-node heads (the action head is sized for one `max_nodes`), which is the point of
having both: the SB3 agents are the off-the-shelf reference.

```python
env = gym.make("Esper/Spirals-v0")
model = make_maskable_ppo(env, n_steps=256, seed=0)   # masks from env.action_masks()
model.learn(10_000)
```
Plain PPO ignores the mask: a masked action runs as WAIT and pays the invalid-action penalty.

Checkpoints: `save_model` is SB3's `save` plus the task and blueprint library it was trained on;
`load_model` is SB3's `load` made safe for a checkpoint from a shared folder (SB3 unpickles the
`":serialized:"` entries of the archive with cloudpickle, which runs any code the archive names).
"""

from __future__ import annotations

import copy
import io
import json
import os
import zipfile
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import is_masking_supported
from stable_baselines3 import PPO
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from esper_gym.agents.graph import GraphEncoder, obs_to_batch
from esper_gym.agents.records import check_env_record
from esper_gym.agents.tamiyo.checkpoint import (
    BOOL,
    CheckpointError,
    check_adam_state,
    check_env_entry,
    check_table,
    check_tensors,
    int_in,
    number_in,
    one_of,
    read_checkpoint,
    torch_load_checked,
    zip_members,
)


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


# ---------------------------------------------------------------------------------------------
# Checkpoints that load without unpickling
# ---------------------------------------------------------------------------------------------

RECORD_MEMBER = "esper_gym.json"  # {"task", "blueprints"}: what the model was trained on
# What SB3 (2.x) writes into a PPO / MaskablePPO archive; anything else is refused.
ARCHIVE_MEMBERS = frozenset(
    {
        "data",
        "policy.pth",
        "policy.optimizer.pth",
        "pytorch_variables.pth",
        "_stable_baselines3_version",
        "system_info.txt",
        RECORD_MEMBER,
    }
)
# The entries of the archive's `data` JSON that SB3 writes with cloudpickle (before and after
# `learn`). `load_model` hands SB3 this run's own values for all of them (`custom_objects`), and
# SB3's `json_to_data` takes a key found in `custom_objects` as is, before it looks at the
# entry: so nothing from the archive is unpickled. Spaces, schedules and policy classes come
# from this run's config; the rollout state (last obs, episode buffers) starts fresh, as
# `load(env=...)` resets the env anyway.
REPLACED = (
    "policy_class",
    "policy_kwargs",
    "observation_space",
    "action_space",
    "lr_schedule",
    "clip_range",
    "clip_range_vf",
    "rollout_buffer_class",
    "rollout_buffer_kwargs",
    "action_noise",
    "_last_obs",
    "_last_original_obs",
    "_last_episode_starts",
    "ep_info_buffer",
    "ep_success_buffer",
)


# The plain entries of `data` that SB3's `load` copies onto the model (`model.__dict__.update`),
# each with its check: a hostile value would train forever (num_timesteps=-1e12), allocate a
# rollout buffer of 300 GiB (n_steps=1e9) or make the policy NaN (gamma=NaN). Ranges are
# generous for real runs (conf/agent: n_steps 64, batch 32, 4 epochs) and bounded. Every one
# must be there (SB3 2.x writes them all); anything else is refused.
COUNT = int_in(0, 10**12)
DATA = {
    "verbose": int_in(0, 2),
    "num_timesteps": COUNT,
    "_total_timesteps": COUNT,
    "_num_timesteps_at_start": COUNT,
    "_episode_num": COUNT,
    "_n_updates": COUNT,
    "seed": (lambda v: v is None or int_in(0, 2**32 - 1)[0](v), "None or an int in [0, 2**32-1]"),
    "start_time": number_in(0, 1e20),  # time.time_ns() at the last learn
    "learning_rate": number_in(0.0, 1.0),
    "tensorboard_log": one_of(None),  # a path from a file would make SB3 write there
    "use_sde": one_of(False),  # discrete actions: PPO has no state-dependent exploration
    "sde_sample_freq": int_in(-1, 10**6),
    "_current_progress_remaining": number_in(-1e6, 1.0),
    "_stats_window_size": int_in(1, 10**6),
    "n_envs": int_in(1, 4096),  # replaced by the env's own count on load
    "n_steps": int_in(1, 2**14),  # x envs = rollout buffer rows
    "batch_size": int_in(2, 2**20),  # SB3 asserts > 1
    "n_epochs": int_in(1, 1000),
    "gamma": number_in(0.0, 1.0),
    "gae_lambda": number_in(0.0, 1.0),
    "ent_coef": number_in(0.0, 10.0),
    "vf_coef": number_in(0.0, 10.0),
    "max_grad_norm": number_in(0.0, 1e6, lo_open=True),
    "normalize_advantage": BOOL,
    "target_kl": (
        lambda v: v is None or number_in(0.0, 1e6, lo_open=True)[0](v),
        "None or a finite number in (0, 1e6]",
    ),
}
MAX_DATA_BYTES = 64 << 20  # the JSON `data` member: ~16 KB, more with pickled rollout state


class UnsafeCheckpointError(CheckpointError):
    """An SB3 archive that cannot be loaded without running code from it, or not ours."""


def save_model(model, path: str | os.PathLike, record: dict) -> None:
    """SB3's `save`, plus `record` (agents.records.env_record) as an extra archive member."""
    model.save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(RECORD_MEMBER, json.dumps(record))


def load_model(path: str | os.PathLike, fresh, env, record: dict):
    """Continue from the SB3 archive at `path`: `fresh` is the model this run's config builds
    (same class; its values replace every pickled entry), `env` the env to train on, `record`
    the env's `env_record` (a checkpoint of another task or library is refused).

    The file is read once (a regular file, capped: `read_checkpoint`); the checks and SB3 see
    the same bytes. Refused, before SB3 reads anything, with a one-line UnsafeCheckpointError: a
    pickled entry not in REPLACED, any other `data` entry not in DATA or out of its range, an
    unexpected or duplicated member, weights or optimizer state not of `fresh`'s shapes,
    PyTorch variables the model does not have, no record or another task's. The `.pth`
    members load with `torch.load(weights_only=True)` (tensors and plain containers only).
    """
    raw = read_checkpoint(path)
    names = zip_members(path, raw)
    if any(n.endswith("/data.pkl") for n in names) and "data" not in names:
        raise UnsafeCheckpointError(
            f"checkpoint {path} is a Tamiyo checkpoint (checkpoint.pt, torch.save), not an SB3 "
            "model: load it with esper_gym.agents.tamiyo.load_checkpoint (agent=tamiyo)"
        )
    extra = sorted(set(names) - ARCHIVE_MEMBERS)
    dupes = sorted({n for n in names if names.count(n) > 1})
    missing = sorted({"data", "policy.pth"} - set(names))
    if extra or dupes or missing:
        raise UnsafeCheckpointError(
            f"{path}: unexpected archive members {extra}, duplicated {dupes}, missing {missing}; "
            f"an SB3 checkpoint holds only {sorted(ARCHIVE_MEMBERS)}"
        )
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        if archive.getinfo("data").file_size > MAX_DATA_BYTES:
            raise UnsafeCheckpointError(
                f"checkpoint {path}: data member over {MAX_DATA_BYTES} bytes"
            )
        try:  # parsed exactly as SB3's load_from_zip_file/json_to_data will parse it
            data = json.loads(archive.read("data").decode())
        except (ValueError, RecursionError) as exc:  # also too deeply nested JSON
            raise UnsafeCheckpointError(
                f"checkpoint {path}: data is not JSON: {str(exc)[:120]}"
            ) from None
        if not isinstance(data, dict):
            raise UnsafeCheckpointError(f"checkpoint {path}: data is not a JSON object")
        pickled = [k for k, v in data.items() if isinstance(v, dict) and ":serialized:" in v]
        unknown = [k for k in pickled if k not in REPLACED]
        if unknown:
            raise UnsafeCheckpointError(
                f"{path}: entries {unknown} are pickled (':serialized:'), and SB3 would run "
                f"cloudpickle.loads on them; only {list(REPLACED)} are replaced on load"
            )
        try:  # REPLACED entries are never read: this run's values stand in for them
            check_table(path, "data", {k: v for k, v in data.items() if k not in REPLACED}, DATA)
        except CheckpointError as exc:
            raise UnsafeCheckpointError(str(exc)) from None
        check_tensors(
            path,
            "policy.pth",
            torch_load_checked(f"{path}:policy.pth", archive.read("policy.pth")),
            fresh.policy.state_dict(),
        )
        if "policy.optimizer.pth" in names:
            state = torch_load_checked(
                f"{path}:policy.optimizer.pth", archive.read("policy.optimizer.pth")
            )
            check_adam_state(path, "policy.optimizer.pth", state, list(fresh.policy.parameters()))
        if "pytorch_variables.pth" in names:
            # SB3 sets `model.<name>.data` for every name in it: only the model's own names.
            variables = torch_load_checked(
                f"{path}:pytorch_variables.pth", archive.read("pytorch_variables.pth")
            )
            allowed = set(fresh._get_torch_save_params()[1])
            if not isinstance(variables, dict) or set(variables) - allowed:
                names_found = sorted(variables) if isinstance(variables, dict) else variables
                raise UnsafeCheckpointError(
                    f"{path}: pytorch_variables {names_found}; this model has {sorted(allowed)}"
                )
        saved = {}
        if RECORD_MEMBER in names:
            try:
                saved = json.loads(archive.read(RECORD_MEMBER))
            except (ValueError, RecursionError):
                raise UnsafeCheckpointError(
                    f"checkpoint {path}: {RECORD_MEMBER} is not JSON"
                ) from None
    check_env_entry(path, saved, record)
    check_env_record(saved, record, path, same_task=True)
    custom = {key: copy.copy(getattr(fresh, key, None)) for key in REPLACED}
    return type(fresh).load(io.BytesIO(raw), env=env, custom_objects=custom, device=fresh.device)
