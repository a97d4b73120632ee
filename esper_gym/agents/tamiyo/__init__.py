"""Tamiyo: a graph policy (PyG) and its PPO learner.

    config.py      PPOConfig, GuardConfig: the settings and their defaults (no torch)
    policy.py      TamiyoPolicy: actor-critic over the model graph (trunk: agents/graph.py)
    ppo.py         train(): PPO in CleanRL's order (rollout, GAE, update, log)
    imitation.py   the warm start from a baseline teacher
    popart.py      running return statistics for the critic
    guards.py      check_guards: stop a collapsing run (TrainingCollapse)
    checkpoint.py  save_checkpoint, load_checkpoint and every check on an untrusted file

`from esper_gym.agents.tamiyo import X` works for each of these names; a name's module is
imported on first use, so `esper_gym.agents.tamiyo.PPOConfig` (a Hydra `_target_`) costs no
torch or torch_geometric import.
"""

from __future__ import annotations

import importlib

# name -> the submodule that defines it
_HOMES = {
    "config": ("GuardConfig", "PPOConfig"),
    "policy": ("MASKED", "TamiyoPolicy", "space_kwargs"),
    "ppo": ("explained_variance", "make_vector_env", "train"),
    "imitation": ("imitate", "make_teacher"),
    "guards": ("GUARDS", "TrainingCollapse", "check_guards"),
    "checkpoint": (
        "ADAM_GROUP",
        "ADAM_STATE",
        "BOOL",
        "CHECKPOINT_KEYS",
        "MAX_CHECKPOINT_BYTES",
        "MAX_GLOBAL_STEP",
        "MAX_PICKLE_BYTES",
        "MAX_PLAIN_DEPTH",
        "MAX_PLAIN_ITEMS",
        "OPTIONAL_KEYS",
        "POLICY_KWARGS",
        "SB3_MEMBERS",
        "Checkpoint",
        "CheckpointError",
        "check_adam_state",
        "check_env_entry",
        "check_table",
        "check_tensors",
        "int_in",
        "load_checkpoint",
        "number_in",
        "one_of",
        "read_checkpoint",
        "save_checkpoint",
        "torch_load_checked",
        "zip_members",
    ),
    # shared with the SB3 agents, defined outside this package
    "esper_gym.agents.graph": ("GraphBatch", "GraphEncoder", "obs_to_batch"),
    "esper_gym.agents.records": ("check_env_record", "env_record", "mixture_record"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if "." not in module:
        module = f"{__name__}.{module}"
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly next time
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
