"""Hydra entry point: train an agent on a task, evaluate it on held-out seeds, log everything.

```bash
python -m esper_gym.train                                     # spirals: Tamiyo, then vs baselines
python -m esper_gym.train agent=heuristic logger=none         # a baseline: nothing to train
python -m esper_gym.train +experiment=fashion_mnist           # a named experiment (conf/experiment)
python -m esper_gym.train -m reward.weights.param_cost=0,0.05,0.2 seed=0,1,2   # a sweep
python -m esper_gym.train resume=outputs/2025-01-01/12-00-00  # continue that run's training
```

A run (`run(cfg, run_dir)`), in order:
1. `validate(cfg)` builds the Task, the RewardWeights and the agent's budget from the composed
   config, so a bad value stops the run before any work with a message naming the key. (Wrong
   types, unknown keys and unknown group options already fail while Hydra composes, against
   the schemas registered below.)
2. The logger starts (`logger=wandb`: a W&B run, offline unless `logger.mode=online`, grouped
   `<task>-<agent>`) with the resolved config plus the resolved Task.
3. An agent that learns (`agent.kind`: `tamiyo`, `sb3`) trains on `env.num_envs` copies of the
   env (`env.vectorization`: by default Tamiyo on 8 copies in the batched simulator, SB3 on 2
   sync envs), episodes seeded from `seed`; its curves are logged against
   the global env step and its checkpoint is written to the run dir. `resume=<checkpoint or run
   dir>` continues that training from its saved global step (weights, optimizer, step count) up
   to the budget of this config, and keeps logging to the same W&B run id. Baselines skip this.
4. The agent, then every baseline named in `eval.compare`, plays `eval.episodes` episodes on the
   held-out seeds `eval.first_seed + i`: the same seeds in every run (so the runs of a sweep are
   compared on the same episodes), disjoint from the training seeds (`seed + k`, k < first_seed).
   A learner samples its policy (what it was trained to do) from an RNG seeded with the episode
   seed, so an episode is the same in every run; `eval.greedy=true` takes the argmax instead.
   Each episode is logged (`eval/<agent>/...`: return, length, final val/test accuracy, params,
   params added, faults, invalid actions, each reward component summed over the episode) and
   the means go to the run summary.
5. `results.json` (the episodes and their means) is written to the run dir, a table is printed,
   and the agent's mean evaluation return is returned (the objective a Hydra sweeper optimises).

Run dir (Hydra's `outputs/<date>/<time>`, `multirun/<date>/<time>/<job>` for `-m`):
`.hydra/` (composed config, overrides), `results.json`, `run.json` (agent, W&B run id),
`checkpoint.pt` and `train_metrics.csv` (tamiyo: the learning curve, one row per update) or `checkpoint.zip` (sb3), `wandb/offline-run-*` (logger=wandb).

This is the only module (with `esper_gym.evaluate`) that imports hydra or omegaconf: everything
it calls takes plain values.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import inspect
import json
import math
import pathlib
import shutil
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

import esper_gym
from esper_gym.episode import play_episode
from esper_gym.logger import CsvMetrics, make_logger
from esper_gym.reward import RewardWeights
from esper_gym.tasks import TASKS, Task, get_task

# task name -> its registered env id (every registered task has one)
TASK_ENV_IDS = {task: env_id for env_id, (task, _) in esper_gym.ENV_IDS.items()}

# ---------------------------------------------------------------------------------------------
# Schemas: what each config group may hold, with types Hydra checks while composing.
# ---------------------------------------------------------------------------------------------


def _conf_type(tp: Any) -> Any:
    """The closest annotation OmegaConf can check for a dataclass field's type: tuples become
    lists, mappings `dict[str, Any]`, a union keeps `str` if it has it (`str | Callable` is a
    name in a config file) or its one other member, and anything else is `Any`."""
    if tp in (int, float, str, bool):
        return tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        inner = str if str in members else _conf_type(members[0]) if len(members) == 1 else Any
        return inner | None if len(members) < len(args) else inner
    if origin in (list, tuple, collections.abc.Sequence):
        return list[_conf_type(args[0]) if args else Any]
    if origin in (dict, collections.abc.Mapping):
        return dict[str, Any]
    return Any


def _mirror(cls: type, name: str, *, head: list, exclude=(), all_optional=False) -> type:
    """A schema dataclass with `head` fields, then every field of `cls` but `exclude` with its
    type made checkable (`_conf_type`) and its default. `all_optional`: no defaults of `cls`,
    every field `... | None = None` ("keep the registered value"), except that a mapping is
    `Any = None`: OmegaConf can put a dict (`task.host_kwargs={hidden:[64,64]}`) into an
    `Any` None node but not into a None `Dict` one. Generated, so a field added to `cls` is
    configurable at once."""
    hints = typing.get_type_hints(cls)
    out = list(head)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp = _conf_type(hints[f.name])
        if all_optional and tp == dict[str, Any]:
            out.append((f.name, Any, field(default=None)))
        elif all_optional:
            out.append((f.name, tp | None, field(default=None)))
        else:
            out.append((f.name, tp, field(default=f.default)))
    return dataclasses.make_dataclass(name, out)


# task/: the registered task plus Task field overrides. `blueprints` comes from blueprints/ and
# `device` from env/, so each has one place to be set. A `name` that is not registered is a task
# of the user's own (their config dir): Task's defaults plus the fields set, env_id null.
TaskConf = _mirror(
    Task,
    "TaskConf",
    head=[("name", str, field(default=MISSING)), ("env_id", str | None, field(default=None))],
    exclude=("name", "blueprints", "device"),
    all_optional=True,
)

RewardWeightsConf = _mirror(
    RewardWeights,
    "RewardWeightsConf",
    head=[("_target_", str, field(default="esper_gym.reward.RewardWeights"))],
)


@dataclass
class RewardConf:
    """`weights`: RewardWeights; `computer`: a `_target_` node, the reward callable (default
    esper_gym.reward.RewardComputer), called with `weights=` if its constructor takes it."""

    weights: RewardWeightsConf = field(default_factory=RewardWeightsConf)
    computer: Any = None


def _signature_schema(cls: type, name: str) -> type:
    """A schema dataclass for a `_target_` node of `cls`: `_target_` then every parameter of
    its constructor, typed (`_conf_type`) and defaulted as there (generator/ options)."""
    hints = typing.get_type_hints(cls.__init__)
    out = [("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))]
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        tp = _conf_type(hints.get(param.name, Any))
        default = param.default
        if isinstance(default, (list, tuple)):
            out.append((param.name, tp, field(default_factory=lambda d=default: list(d))))
        else:
            out.append((param.name, tp, field(default=default)))
    return dataclasses.make_dataclass(name, out)


def _generator_schemas() -> dict[str, type]:
    from esper_gym.kernels import BlueprintGenerator
    from esper_gym.kernels.karn import KarnGenerator

    return {
        "template_schema": _signature_schema(BlueprintGenerator, "TemplateGeneratorConf"),
        "karn_schema": _signature_schema(KarnGenerator, "KarnGeneratorConf"),
    }


@dataclass
class BlueprintsConf:
    """The blueprint library (the GERMINATE actions, in this order). `names: null` is the task's
    own library (DEFAULT_LIBRARY; spirals_faulty adds FAULT_LIBRARY); `add` is appended."""

    names: list[str] | None = None
    add: list[str] = field(default_factory=list)


@dataclass
class EnvConf:
    kernel_dir: str | None = None  # None: $ESPER_KERNEL_DIR or ~/.cache/esper_gym/kernels
    device: str = "cpu"
    num_envs: int | None = None  # None: `num_envs(cfg)`, 8 on the batched simulator, else 2
    # off | measured: measured wall-clock and cache features in the observation (not
    # reproducible bit for bit; see MorphogeneticEnv)
    telemetry: str = "off"
    # sync: one process (gymnasium SyncVectorEnv, SB3 DummyVecEnv); async: one process per env
    # (AsyncVectorEnv / SubprocVecEnv, spawn context); batched: the batched simulator
    # (esper_gym.vector: the copies' training as stacked tensors, in one process; tamiyo only);
    # auto: batched for tamiyo, sync for SB3 (`vectorization(cfg)`)
    vectorization: str = "auto"
    # null: every episode is the task as configured; train: each training episode draws a train
    # context (esper_gym.contexts) and the evaluation after training plays test contexts
    contexts: str | None = None
    show_context: bool = False  # append the context's factors to the observation's globals
    # tamiyo: registered tasks trained alongside `task` by one policy (num_envs copies each; the
    # evaluation after training plays `task`); their task fields are the registered ones
    also_train_on: list[str] = field(default_factory=list)


class AgentKind(enum.Enum):
    baseline = "baseline"  # esper_gym.agents.baselines: no training
    tamiyo = "tamiyo"  # esper_gym.agents.tamiyo.train (PPO over the model graph)
    sb3 = "sb3"  # esper_gym.agents.sb3 factory -> model.learn


@dataclass
class GuardConf:
    """esper_gym.agents.tamiyo.GuardConfig, written out like PPOConf (tests/test_config.py)."""

    enabled: bool = True
    patience: int = 5
    wait_share_max: float | None = 0.95
    entropy_min: float | None = 0.05
    explained_variance_min: float | None = 0.0


@dataclass
class PPOConf:
    """esper_gym.agents.tamiyo.PPOConfig, less `seed`, `num_envs`, `async_envs` (from `seed` and env/).

    Written out rather than generated: importing esper_gym.agents.tamiyo (torch_geometric) costs seconds
    that a baseline run or a config check should not pay. tests/test_config.py checks that the
    fields and defaults match PPOConfig's."""

    _target_: str = "esper_gym.agents.tamiyo.PPOConfig"
    total_steps: int = 20_000
    rollout_steps: int = 64
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    ent_floor: float = 0.0
    ent_floor_coef: float = 0.1
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    lr: float = 3e-4
    update_epochs: int = 4
    minibatches: int = 4
    target_kl: float | None = None
    anneal_lr: bool = True
    lr_final: float = 0.0
    norm_adv: bool = True
    norm_returns: bool = True
    hidden: int = 64
    layers: int = 3
    dropout: float = 0.1
    checkpoint_every: int = 10
    uncertainty_samples: int = 8
    wait_bias: float = 0.0
    gated: bool = False
    teacher: str | None = None
    imitation_episodes: int = 64
    imitation_epochs: int = 10
    guards: GuardConf = field(default_factory=GuardConf)


@dataclass
class AgentConf:
    """`build`: a `_target_` factory called with `env=` (baselines: esper_gym.agents.baselines.make_agent,
    sb3: esper_gym.agents.sb3.make_ppo / make_maskable_ppo, with `_partial_: true`); `ppo`: Tamiyo's
    PPOConfig; `total_timesteps`: the sb3 training budget."""

    name: str = MISSING
    kind: AgentKind = MISSING
    build: Any = None
    ppo: PPOConf | None = None
    total_timesteps: int = 0


@dataclass
class LoggerConf:
    kind: str = "wandb"  # wandb | none
    mode: str | None = None  # offline | online | disabled | None: W&B's own setting, else offline
    project: str = "esper-gym"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    dir: str | None = None  # None: the Hydra run dir
    tags: list[str] = field(default_factory=list)
    progress: bool = True  # tqdm bar, shown only on a terminal


@dataclass
class EvalConf:
    episodes: int = 5
    first_seed: int = 1_000_000
    compare: list[str] = field(default_factory=list)
    greedy: bool = False  # learners sample their policy, seeded per episode (True: argmax)


@dataclass
class TrainConf:
    """The top level of conf/config.yaml; the groups carry their own schemas."""

    seed: int = 0
    resume: str | None = None
    threads: int | None = 1  # torch threads per process; None: torch's default
    eval: EvalConf = field(default_factory=EvalConf)
    env: Any = MISSING
    task: Any = MISSING
    agent: Any = MISSING
    reward: Any = MISSING
    blueprints: Any = MISSING
    generator: Any = MISSING
    logger: Any = MISSING


# Group schemas are `<group>/schema`: every option's defaults list starts with `- schema`, so an
# option is checked whichever primary config (train's, evaluate's) composes it.
GROUP_SCHEMAS = {
    "env": EnvConf,
    "task": TaskConf,
    "agent": AgentConf,
    "reward": RewardConf,
    "blueprints": BlueprintsConf,
    "logger": LoggerConf,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConf)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=node)
    # generator/: one schema per generator class (their parameters differ); an option of your
    # own may use one, or none (its target's constructor then checks the values).
    for name, node in _generator_schemas().items():
        cs.store(group="generator", name=name, node=node)


register_configs()

# ---------------------------------------------------------------------------------------------
# Validation and building
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A composed config with a value that cannot run; the message names the key."""


def _plain(node: Any) -> Any:
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


def task_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The gym.make keyword arguments that replace Task fields: the set task.* fields, the
    blueprint library and the device."""
    registered = TASKS.get(cfg.task.name) or Task(name=cfg.task.name)
    overrides = {}
    for key, value in _plain(cfg.task).items():
        if key in ("name", "env_id") or value is None:
            continue
        if isinstance(getattr(registered, key), collections.abc.Mapping):
            # *_kwargs: typed Any in the schema (see _mirror), so their type is checked here
            if not isinstance(value, dict):
                raise ConfigError(f"task.{key}={value!r} must be a mapping, e.g. {{key:value}}")
            value = {**getattr(registered, key), **value}  # keys merged into the registered ones
        overrides[key] = value
    library = cfg.blueprints.names
    if library is not None or cfg.blueprints.add:
        base = list(library) if library is not None else list(registered.blueprints)
        overrides["blueprints"] = tuple(dict.fromkeys([*base, *cfg.blueprints.add]))
    overrides["device"] = cfg.env.device
    return overrides


def build_task(cfg: DictConfig) -> Task:
    _check_task_name(cfg)
    try:
        if cfg.task.name not in TASKS:  # the user's own task: Task's defaults, fields replaced
            return Task(name=cfg.task.name, **task_overrides(cfg))
        return get_task(cfg.task.name, **task_overrides(cfg))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"task.*: {exc}") from exc


def _check_task_name(cfg: DictConfig) -> None:
    name, env_id = cfg.task.name, cfg.task.env_id
    if name not in TASKS:
        if env_id is not None:
            raise ConfigError(
                f"task.name={name!r} is not a registered task ({', '.join(TASKS)}), so it is "
                f"a task of your own, built from the task.* fields: leave task.env_id null "
                f"(it is {env_id!r})"
            )
        return
    if env_id not in esper_gym.ENV_IDS:
        raise ConfigError(
            f"task.env_id={env_id!r} is not registered; known: {', '.join(esper_gym.ENV_IDS)}"
        )
    if esper_gym.ENV_IDS[env_id][0] != name:
        raise ConfigError(
            f"task.env_id={env_id!r} runs task {esper_gym.ENV_IDS[env_id][0]!r}, "
            f"not task.name={name!r}"
        )


def build_reward_weights(cfg: DictConfig) -> RewardWeights:
    try:
        return instantiate(cfg.reward.weights)
    except Exception as exc:  # instantiate wraps the dataclass's own message
        raise ConfigError(f"reward.weights: {exc.__cause__ or exc}") from exc


def build_reward_fn(cfg: DictConfig, weights: RewardWeights | None = None):
    """The reward callable of `reward.computer` (`weights=` passed if its constructor takes
    it); ConfigError naming the key if it cannot be built or is not callable."""
    weights = weights or build_reward_weights(cfg)
    node = cfg.reward.get("computer")
    if node is None:
        from esper_gym.reward import RewardComputer

        return RewardComputer(weights)
    target = node.get("_target_") if OmegaConf.is_dict(node) else None
    if not target:
        raise ConfigError(f"reward.computer={_plain(node)!r} needs a _target_ (a class path)")
    try:
        target_obj = get_object(target)
    except Exception as exc:
        raise ConfigError(
            f"reward.computer._target_={target!r} cannot be imported ({exc.__cause__ or exc}); "
            "put its module on PYTHONPATH"
        ) from exc
    try:
        params = inspect.signature(target_obj).parameters
        takes = "weights" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes = False
    kwargs = {"weights": weights} if takes and "weights" not in node else {}
    try:
        # "object": the computer gets a RewardWeights, not the DictConfig instantiate would
        # wrap it in (whose attribute reads cost ~4 us each, 8 per env step).
        fn = instantiate(node, _convert_="object", **kwargs)
    except Exception as exc:
        raise ConfigError(f"reward.computer ({target}): {exc.__cause__ or exc}") from exc
    if not callable(fn):
        raise ConfigError(
            f"reward.computer._target_={target!r} built {type(fn).__name__}, which is not "
            "callable: it must take a StepOutcome and return (reward, components)"
        )
    return fn


def build_generator(cfg: DictConfig):
    """The blueprint generator of `generator` (None without the group: the env's default);
    ConfigError naming the key if it cannot be built."""
    node = cfg.get("generator")
    if node is None:
        return None
    try:
        generator = instantiate(node)
    except Exception as exc:
        raise ConfigError(f"generator ({node.get('_target_')}): {exc.__cause__ or exc}") from exc
    missing = [m for m in ("propose", "fits") if not callable(getattr(generator, m, None))]
    if missing:
        raise ConfigError(
            f"generator._target_={node.get('_target_')!r} lacks {missing} "
            "(the protocol: esper_gym.kernels.generator)"
        )
    return generator


def _positive(value: Any, key: str, allow_zero: bool = False) -> None:
    if value is None or isinstance(value, bool) or not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be {bound}")


def validate(cfg: DictConfig) -> Task:
    """Everything that can be checked before any work; returns the resolved Task."""
    task = build_task(cfg)
    build_reward_fn(cfg)
    build_generator(cfg)
    if cfg.env.num_envs is not None:
        _positive(cfg.env.num_envs, "env.num_envs")
    if cfg.env.vectorization not in VECTORIZATIONS:
        raise ConfigError(
            f"env.vectorization={cfg.env.vectorization!r}; allowed: {', '.join(VECTORIZATIONS)}"
        )
    if cfg.env.vectorization == "batched" and cfg.agent.kind == AgentKind.sb3:
        raise ConfigError(
            "env.vectorization=batched is a gymnasium VectorEnv for agent.kind=tamiyo; SB3 "
            "trains on its own VecEnv: use sync or async"
        )
    if cfg.env.telemetry not in ("off", "measured"):
        raise ConfigError(f"env.telemetry={cfg.env.telemetry!r}; allowed: off, measured")
    if cfg.env.get("contexts") not in (None, "train"):
        raise ConfigError(
            f"env.contexts={cfg.env.contexts!r}; allowed: null (the configured task), train "
            "(evaluation then plays the held-out test contexts; never train on them)"
        )
    for name in cfg.env.also_train_on:
        if name not in TASK_ENV_IDS or name == cfg.task.name:
            allowed = sorted(set(TASK_ENV_IDS) - {cfg.task.name})
            raise ConfigError(
                f"env.also_train_on has {name!r}; allowed: registered tasks other than "
                f"task={cfg.task.name}: {', '.join(allowed)}"
            )
    if cfg.env.also_train_on and cfg.agent.kind != AgentKind.tamiyo:
        raise ConfigError(
            "env.also_train_on trains one Tamiyo policy on several tasks: tamiyo only"
        )
    _positive(cfg.eval.episodes, "eval.episodes", allow_zero=True)
    # Episode seeds go to numpy, which refuses negative ones: fail here, not after training.
    for key, value in (("seed", cfg.seed), ("eval.first_seed", cfg.eval.first_seed)):
        if value < 0:
            raise ConfigError(f"{key}={value} must be an integer >= 0 (it seeds numpy)")
    if cfg.threads is not None:
        _positive(cfg.threads, "threads")
    from esper_gym.agents.baselines import AGENTS

    unknown = [name for name in cfg.eval.compare if name not in AGENTS]
    if unknown:
        raise ConfigError(f"eval.compare: unknown baselines {unknown}; known: {', '.join(AGENTS)}")
    kind = cfg.agent.kind
    if kind == AgentKind.tamiyo:
        if cfg.agent.ppo is None:
            raise ConfigError("agent.kind=tamiyo needs agent.ppo (PPOConfig fields)")
        for key in ("total_steps", "rollout_steps", "update_epochs", "minibatches", "lr"):
            _positive(cfg.agent.ppo[key], f"agent.ppo.{key}")
        for key in ("gamma", "gae_lambda", "clip_coef", "ent_coef", "vf_coef", "dropout"):
            _positive(cfg.agent.ppo[key], f"agent.ppo.{key}", allow_zero=True)
    elif kind == AgentKind.sb3:
        _positive(cfg.agent.total_timesteps, "agent.total_timesteps")
    if kind != AgentKind.tamiyo and cfg.agent.build is None:
        raise ConfigError(f"agent.kind={kind.value} needs agent.build (a _target_ factory)")
    if cfg.resume is not None and kind == AgentKind.baseline:
        raise ConfigError(f"resume={cfg.resume!r}: agent {cfg.agent.name!r} does not train")
    if cfg.logger.kind not in ("wandb", "none"):
        raise ConfigError(f"logger.kind={cfg.logger.kind!r}; allowed: wandb, none")
    if cfg.logger.mode not in (None, "offline", "online", "disabled"):
        raise ConfigError(f"logger.mode={cfg.logger.mode!r}; allowed: offline, online, disabled")
    return task


# A task of the user's own has no registered id: the env class itself, with no TimeLimit
# (its episodes end when the training budget is spent).
CUSTOM_SPEC = gym.envs.registration.EnvSpec("Esper/Custom-v0", entry_point=esper_gym.ENTRY_POINT)


def make_env(env_id: str | None, threads: int | None = None, **kwargs: Any) -> gym.Env:
    """gym.make, after setting torch's thread count (async env workers are fresh processes).
    `env_id=None`: the unregistered env (kwargs then carry the whole `task`)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return gym.make(env_id or CUSTOM_SPEC, **kwargs)


VECTORIZATIONS = ("auto", "sync", "async", "batched")


def vectorization(cfg: DictConfig) -> str:
    """env.vectorization resolved: `auto` is the fastest the agent can train on, the batched
    simulator for Tamiyo and one process for SB3 (which has its own VecEnv)."""
    mode = cfg.env.get("vectorization") or "auto"
    if mode == "auto":
        kind = cfg.agent.get("kind")
        return "batched" if kind in (AgentKind.tamiyo, AgentKind.tamiyo.value) else "sync"
    return mode


def num_envs(cfg: DictConfig) -> int:
    """env.num_envs, or when null: 8 copies on the batched simulator (a copy there costs a
    fraction of a single env), 2 envs otherwise."""
    if cfg.env.get("num_envs") is not None:
        return int(cfg.env.num_envs)
    return 8 if vectorization(cfg) == "batched" else 2


@dataclasses.dataclass(frozen=True)
class BatchedFactory:
    """The env constructor of env.vectorization=batched: called, one env (probes, evaluation);
    `vector(num_envs)`, the batched simulator Tamiyo trains on (esper_gym.vector)."""

    env_id: str | None
    threads: int | None
    kwargs: dict

    def __call__(self, **overrides: Any) -> gym.Env:
        return make_env(self.env_id, self.threads, **{**self.kwargs, **overrides})

    def vector(self, num_envs: int) -> gym.vector.VectorEnv:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        if self.env_id is None:
            from esper_gym.vector import BatchedMorphogeneticEnv

            return BatchedMorphogeneticEnv(num_envs=num_envs, **self.kwargs)
        return gym.make_vec(
            self.env_id, num_envs, vectorization_mode="vector_entry_point", **self.kwargs
        )


def env_factory(cfg: DictConfig, task: str | None = None) -> Callable[[], gym.Env]:
    """A picklable no-argument env constructor for the configured task (vector envs need it),
    or for the registered `task` (env.also_train_on): its registered fields, with this run's
    blueprint library, device, reward, generator, contexts and vectorization."""
    env_id = cfg.task.env_id
    if task is not None and task != cfg.task.name:
        env_id = TASK_ENV_IDS[task]
        kwargs = {k: v for k, v in task_overrides(cfg).items() if k in ("blueprints", "device")}
    elif cfg.task.name in TASKS:
        kwargs = dict(task_overrides(cfg))
    else:
        # A task of the user's own goes whole; it holds strings only (host and dataset by
        # import path), so it pickles into env workers.
        kwargs = {"task": build_task(cfg)}
    kwargs["reward_fn"] = build_reward_fn(cfg)
    generator = build_generator(cfg)
    if generator is not None:
        kwargs["generator"] = generator
    kwargs["kernel_dir"] = cfg.env.kernel_dir
    if cfg.env.get("telemetry") not in (None, "off"):
        kwargs["telemetry"] = cfg.env.telemetry
    if cfg.env.get("contexts") is not None:
        kwargs["contexts"] = cfg.env.contexts
    if cfg.env.get("show_context"):
        kwargs["show_context"] = True
    if vectorization(cfg) == "batched":
        return BatchedFactory(env_id, cfg.threads, kwargs)
    return functools.partial(make_env, env_id, cfg.threads, **kwargs)


# ---------------------------------------------------------------------------------------------
# Episodes
# ---------------------------------------------------------------------------------------------


def mean_metrics(episodes: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of every numeric metric over the episodes (NaN where an episode has none)."""
    first = episodes[0] if episodes else {}
    keys = [k for k, v in first.items() if isinstance(v, (int, float)) and k != "seed"]
    return {k: float(np.mean([float(e[k]) for e in episodes])) for k in keys}


# ---------------------------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------------------------


def _checkpoint_file(resume: str, suffix: str) -> pathlib.Path:
    path = pathlib.Path(resume)
    if path.is_dir():
        other = {".pt": ".zip", ".zip": ".pt"}[suffix]
        if not (path / f"checkpoint{suffix}").exists() and (path / f"checkpoint{other}").exists():
            needs = "agent=tamiyo" if other == ".pt" else "agent=sb3_ppo or maskable_ppo"
            raise ConfigError(
                f"resume={resume!r} holds checkpoint{other}, not checkpoint{suffix}: "
                f"it resumes with {needs}"
            )
        path = path / f"checkpoint{suffix}"
    if not path.is_file():
        raise ConfigError(f"resume={resume!r}: no checkpoint at {path}")
    return path  # a file of the other kind is refused by its loader, saying which it is


def train_tamiyo(cfg: DictConfig, make: Callable, logger, run_dir: pathlib.Path):
    """Train (or continue) Tamiyo; returns (actor, global_step, checkpoint path), where
    `actor(episode_seed)` is the episode's `act(obs)`: sampling the policy from a generator
    seeded with the episode seed (argmax with `eval.greedy`)."""
    from esper_gym.agents.tamiyo import load_checkpoint, train

    config = instantiate(
        cfg.agent.ppo,
        seed=cfg.seed,
        num_envs=num_envs(cfg),
        async_envs=vectorization(cfg) == "async",
    )
    ckpt = run_dir / "checkpoint.pt"
    resume = _checkpoint_file(cfg.resume, ".pt") if cfg.resume else None
    logger.progress(config.total_steps, "tamiyo")
    # The learning curve, with or without W&B; a resumed run continues the curve it resumes.
    curve = CsvMetrics(run_dir / "train_metrics.csv", resume=resume is not None)

    def log(metrics, step=None):
        logger.log(metrics, step)
        curve(metrics, step)

    makers = [make, *(env_factory(cfg, task) for task in cfg.env.also_train_on)]
    makers = makers if len(makers) > 1 else make
    policy = train(config, makers, log=log, checkpoint_path=ckpt, resume_from=resume)
    logger.progress(None)
    if not ckpt.exists() and resume is not None:  # the budget was already spent: nothing new
        shutil.copyfile(resume, ckpt)
    global_step = load_checkpoint(ckpt).global_step
    greedy = cfg.eval.greedy
    return (lambda seed: policy.actor(greedy=greedy, seed=seed)), global_step, ckpt


def _sb3_logger(log: Callable[[dict, int], None]):
    """An SB3 Logger whose every dump goes to `log(metrics, num_timesteps)`."""
    from stable_baselines3.common.logger import KVWriter, Logger

    class Forward(KVWriter):
        def write(self, key_values, key_excluded, step=0):
            log({k: v for k, v in key_values.items() if isinstance(v, (int, float))}, step)

    return Logger(folder=None, output_formats=[Forward()])


def train_sb3(cfg: DictConfig, make: Callable, logger, run_dir: pathlib.Path):
    """Train (or continue) an SB3 model; returns (actor, global_step, checkpoint path) as
    `train_tamiyo` does (SB3 samples from torch's global RNG: the actor seeds it)."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    use_async = vectorization(cfg) == "async"
    venv = make_vec_env(
        make,
        n_envs=num_envs(cfg),
        seed=cfg.seed,
        vec_env_cls=SubprocVecEnv if use_async else DummyVecEnv,
        vec_env_kwargs={"start_method": "spawn"} if use_async else None,
    )
    from esper_gym.agents.sb3 import load_model, save_model
    from esper_gym.agents.tamiyo import env_record

    probe = make()
    record = env_record(probe)  # the task and library: checked on resume, saved with the model
    probe.close()
    model = instantiate(cfg.agent.build)(env=venv, seed=cfg.seed)
    if cfg.resume:
        try:
            # Never SB3's plain `load`: it unpickles the archive's ":serialized:" entries.
            model = load_model(_checkpoint_file(cfg.resume, ".zip"), model, venv, record)
        except Exception:
            venv.close()
            raise
    model.set_logger(_sb3_logger(logger.log))
    remaining = cfg.agent.total_timesteps - model.num_timesteps
    logger.progress(cfg.agent.total_timesteps, cfg.agent.name)
    if remaining > 0:
        model.learn(remaining, reset_num_timesteps=not cfg.resume)
    logger.progress(None)
    venv.close()
    ckpt = run_dir / "checkpoint.zip"
    save_model(model, ckpt, record)
    deterministic = cfg.eval.greedy
    masked = "action_masks" in inspect.signature(model.predict).parameters

    def act(obs: dict) -> int:
        kw = {"action_masks": obs["action_mask"].astype(bool)} if masked else {}
        action, _ = model.predict(obs, deterministic=deterministic, **kw)
        return int(action)

    def actor(seed: int) -> Callable[[dict], int]:
        if not deterministic:
            import torch

            torch.manual_seed(seed)
        return act

    return actor, int(model.num_timesteps), ckpt


def baseline_act(name: str, env: gym.Env, seed: int, build: Callable | None = None):
    """A baseline's act(obs): from the agent config's factory, else make_agent's defaults."""
    from esper_gym.agents.baselines import make_agent

    agent = build(env=env) if build is not None else None
    if agent is None:
        agent = make_agent(name, env, **({"seed": seed} if name == "random" else {}))
    return agent.act


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _previous_run_id(resume: str | None) -> str | None:
    """The W&B run id recorded next to the checkpoint being resumed (None if there is none)."""
    if not resume:
        return None
    path = pathlib.Path(resume)
    meta = (path if path.is_dir() else path.parent) / "run.json"
    return json.loads(meta.read_text()).get("wandb_id") if meta.is_file() else None


def run(cfg: DictConfig, run_dir: str | pathlib.Path) -> dict[str, Any]:
    """Validate, train (learners), evaluate, log; see the module docstring. Returns the results
    (also written to `run_dir/results.json`)."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = validate(cfg)
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    make = env_factory(cfg)
    agent_name, kind = cfg.agent.name, cfg.agent.kind

    config = _plain(cfg)
    config["task_resolved"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(task).items()
    }
    log_cfg = cfg.logger
    logger = make_logger(log_cfg.kind, progress=log_cfg.progress)
    logger.init(
        config,
        project=log_cfg.project,
        group=log_cfg.group,
        name=log_cfg.name,
        mode=log_cfg.mode,
        dir=log_cfg.dir or str(run_dir),
        entity=log_cfg.entity,
        tags=list(log_cfg.tags),
        run_id=_previous_run_id(cfg.resume),
    )
    meta = {"agent": agent_name, "kind": kind.value, "task": cfg.task.name, "seed": cfg.seed}
    meta["wandb_id"] = logger.run_id
    meta["wandb_dir"] = logger.run_dir
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2))

    results: dict[str, Any] = {**meta, "global_step": 0, "checkpoint": None, "eval": {}}
    try:
        start = time.perf_counter()
        if kind == AgentKind.tamiyo:
            actor, step, ckpt = train_tamiyo(cfg, make, logger, run_dir)
        elif kind == AgentKind.sb3:
            actor, step, ckpt = train_sb3(cfg, make, logger, run_dir)
        else:
            actor, step, ckpt = None, 0, None
        results.update(global_step=step, checkpoint=ckpt and str(ckpt))
        results["train_s"] = time.perf_counter() - start

        # Trained on train contexts: scored on the held-out test contexts, as evaluate does.
        env = make(contexts="test") if cfg.env.get("contexts") == "train" else make()
        seeds = [cfg.eval.first_seed + i for i in range(cfg.eval.episodes)]
        # name -> actor(episode seed) -> act(obs); a learner samples from a per-episode seed.
        players = {agent_name: actor}
        for name in cfg.eval.compare:
            players.setdefault(name, None)
        if not seeds:  # eval.episodes=0: nothing to evaluate, and no table of NaN means
            players = {}
        for name, player in players.items():
            if player is None:  # a baseline: the configured one keeps its settings
                build = instantiate(cfg.agent.build) if name == agent_name else None
                act = baseline_act(name, env, cfg.seed, build)
                player = lambda seed, act=act: act  # noqa: E731  (one agent for every episode)
            logger.progress(len(seeds), f"eval {name}")
            episodes = []
            for seed in seeds:
                episode, _ = play_episode(env, player(seed), seed)
                episodes.append({"seed": seed, **episode})
                logger.log_episode(episode, prefix=f"eval/{name}")
            logger.progress(None)
            means = mean_metrics(episodes)
            results["eval"][name] = {"episodes": episodes, "mean": means}
            logger.summary({f"eval/{name}/{k}_mean": v for k, v in means.items()})
        env.close()
        mine = results["eval"].get(agent_name, {}).get("mean", {})
        results["objective"] = mine.get("return", math.nan)
        logger.summary({"global_step": step, "objective": results["objective"]})
    finally:
        logger.finish()
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(format_results(results))
    return results


def format_results(results: dict[str, Any]) -> str:
    """The evaluation means as a small table, one row per agent."""
    cols = ("return", "val_acc", "test_acc", "params", "params_added", "faults", "invalid_actions")
    lines = [
        f"task={results['task']} agent={results['agent']} seed={results['seed']} "
        f"global_step={results['global_step']} checkpoint={results['checkpoint']}",
        f"{'agent':<12}" + "".join(f"{c:>16}" for c in cols),
    ]
    if not results["eval"]:
        lines[1] = "no evaluation (eval.episodes=0): no episodes were played after training"
    for name, res in results["eval"].items():
        mean = res["mean"]
        lines.append(f"{name:<12}" + "".join(f"{mean.get(c, math.nan):>16.4g}" for c in cols))
    return "\n".join(lines)


# An absolute path: Hydra resolves a relative one against the calling module when main() is
# imported and called (the console script) rather than run with `python -m`.
CONF_DIR = str(esper_gym.config_dir())


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """`python -m esper_gym.train [overrides]`; returns the objective for Hydra sweepers."""
    return run(cfg, HydraConfig.get().runtime.output_dir)["objective"]


if __name__ == "__main__":
    main()
