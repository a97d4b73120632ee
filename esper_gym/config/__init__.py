"""Every Hydra schema and builder of the entry points: composed config in, plain values out.

- Schemas: a dataclass per config group (`EnvConf`, `TaskConf`, `AgentConf`, `RewardConf`,
  `BlueprintsConf`, `LoggerConf`; `TrainConf` the top of conf/config.yaml), checked while Hydra
  composes. `TaskConf`, `RewardWeightsConf` and `PPOConf` are generated from the dataclasses
  whose defaults they mirror (Task, RewardWeights, PPOConfig). `register_configs()` stores them
  as top-level configs (`<group>_schema`), never options of their groups; an option names its
  schema with `- /<group>_schema@_here_` (train's groups need none: TrainConf types them).
- Builders: `validate(cfg)` checks what can be checked before any work (ConfigError naming the
  key); `build(cfg, run_dir)` also resolves once what `auto`/null values stand for into a
  `Built`; `make_env` is the one env constructor, `env_factory` the picklable one.
- `one_line_errors()`: a config error ends an entry point with `error: <message>`, exit 2.
"""

import collections.abc
import contextlib
import dataclasses
import difflib
import enum
import functools
import inspect
import json
import os
import pathlib
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
from hydra.core.config_store import ConfigStore
from hydra.utils import get_object, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

import esper_gym
from esper_gym.agents.tamiyo.config import PPOConfig
from esper_gym.bench import jobs
from esper_gym.bench.jobs import (  # noqa: F401  (the one env constructor, the eval seeds)
    CUSTOM_SPEC,
    EVAL_SEED,
    BatchedFactory,
    make_env,
)
from esper_gym.config.mirror import _conf_type, _mirror
from esper_gym.reward import RewardWeights, resolve_weights
from esper_gym.tasks import TASKS, Task, get_task

TASK_ENV_IDS = esper_gym.TASK_ENV_IDS  # task name -> its registered env id
VECTORIZATIONS = ("auto", "sync", "async", "batched")


class ConfigError(ValueError):
    """A composed config with a value that cannot run; the message names the key."""


# --- Schemas -------------------------------------------------------------------------------------


# task/: the registered task plus Task field overrides. `blueprints` comes from blueprints/ and
# `device` from env/, so each has one place to be set. A `name` that is not registered is a task
# of the user's own (their config dir): Task's defaults plus the fields set, env_id null.
TaskConf = _mirror(
    Task,
    "TaskConf",
    head=[("name", str, field(default=MISSING)), ("env_id", str | None, field(default=None))],
    exclude=("name", "blueprints", "device"),
    all_optional=True,
    module=__name__,
)

# reward.weights: every weight None ("the task's own, else RewardWeights' default") unless set.
RewardWeightsConf = _mirror(
    RewardWeights,
    "RewardWeightsConf",
    head=[],
    all_optional=True,
    module=__name__,
)

# agent.ppo: PPOConfig (its defaults, the only ones) less `seed`, `num_envs`, `async_envs`,
# `runners`, `ray_address`, which come from `seed`, env/ and ray.
PPOConf = _mirror(
    PPOConfig,
    "PPOConf",
    head=[("_target_", str, field(default="esper_gym.agents.tamiyo.PPOConfig"))],
    exclude=("seed", "num_envs", "async_envs", "runners", "ray_address"),
    module=__name__,
)
GuardConf = typing.get_type_hints(PPOConf)["guards"]


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
        "generator_template_schema": _signature_schema(BlueprintGenerator, "TemplateGenConf"),
        "generator_karn_schema": _signature_schema(KarnGenerator, "KarnGeneratorConf"),
    }


@dataclass
class BlueprintsConf:
    """The blueprint library (the GERMINATE actions, in this order). `names: null` is the task's
    own library (DEFAULT_LIBRARY; spirals_faulty adds FAULT_LIBRARY); `add` is appended."""

    names: list[str] | None = None
    add: list[str] = field(default_factory=list)


@dataclass
class EnvConf:
    """Where and how episodes run; conf/env/default.yaml says what each value means."""

    kernel_dir: str | None = None  # None: the shared default store (`kernel_store`); run: its own
    device: str = "cpu"
    num_envs: int | None = None  # None: `num_envs(cfg)`, 8 on the batched simulator, else 2
    telemetry: str = "off"  # off | measured (wall-clock features: not reproducible bit for bit)
    vectorization: str = "auto"  # VECTORIZATIONS; auto: batched for tamiyo, sync for SB3
    contexts: str | None = None  # None: the task as configured; train: train contexts
    show_context: bool = False  # append the context's factors to the observation's globals
    gate: str | None = None  # defer | drop | plans | counts: act behind a gate (agents/gate.py)
    also_train_on: list[str] = field(default_factory=list)  # tamiyo: more registered tasks
    # tamiyo: rollouts on this many Ray actors of num_envs copies each; 0: in this process;
    # "auto": the CPUs Ray sees (int | str: OmegaConf types no such union, hence Any)
    runners: Any = 0


@dataclass
class RayConf:
    """Where Ray runs (env.runners > 0): address null starts it in this process; auto (or
    host:port) joins the cluster `ray start` made (docs/scale.md)."""

    address: str | None = None


class AgentKind(enum.Enum):
    baseline = "baseline"  # esper_gym.agents.baselines: no training
    tamiyo = "tamiyo"  # esper_gym.agents.tamiyo.train (PPO over the model graph)
    sb3 = "sb3"  # esper_gym.agents.sb3 factory -> model.learn


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
    first_seed: int = EVAL_SEED
    compare: list[str] = field(default_factory=list)
    greedy: bool = False  # learners sample their policy, seeded per episode (True: argmax)


@dataclass
class TrainConf:
    """The top level of conf/config.yaml; each group typed by its schema."""

    seed: int = 0
    resume: str | None = None
    threads: int | None = 1  # torch threads per process; None: torch's default
    eval: EvalConf = field(default_factory=EvalConf)
    env: EnvConf = MISSING
    ray: RayConf = field(default_factory=RayConf)
    task: TaskConf = MISSING
    agent: AgentConf = MISSING
    reward: RewardConf = MISSING
    blueprints: BlueprintsConf = MISSING
    generator: Any = MISSING
    logger: LoggerConf = MISSING


GROUP_SCHEMAS = dict(
    env=EnvConf,
    task=TaskConf,
    agent=AgentConf,
    reward=RewardConf,
    blueprints=BlueprintsConf,
    logger=LoggerConf,
)


def register_configs() -> None:
    """Store the schemas as top-level configs: `train_schema`, `<group>_schema` and
    `generator_<template|karn>_schema` (one per generator class: their parameters differ; an
    option of your own may use one, or none). None is an option of a group."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConf)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(name=f"{group}_schema", node=node)
    for name, node in _generator_schemas().items():
        cs.store(name=name, node=node)


# --- Validation and building ---------------------------------------------------------------------


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
        if env_id is None:  # a task of the user's own
            return
        close = difflib.get_close_matches(name, TASKS, n=1)
        if close:
            raise ConfigError(
                f"task.name={name!r} is not a registered task: did you mean {close[0]!r}? "
                f"(registered: {', '.join(TASKS)})"
            )
        raise ConfigError(
            f"task.name={name!r} is not a registered task ({', '.join(TASKS)}), so it is "
            f"a task of your own, built from the task.* fields: leave task.env_id null "
            f"(it is {env_id!r})"
        )
    if env_id not in esper_gym.ENV_IDS:
        raise ConfigError(
            f"task.env_id={env_id!r} is not registered; known: {', '.join(esper_gym.ENV_IDS)}"
        )
    if esper_gym.ENV_IDS[env_id][0] != name:
        raise ConfigError(
            f"task.env_id={env_id!r} runs task {esper_gym.ENV_IDS[env_id][0]!r}, "
            f"not task.name={name!r}"
        )


def build_reward_weights(cfg: DictConfig, task: Task | None = None) -> RewardWeights | dict:
    """With `task`: the weights in force for it (its own preference, then `reward.weights`'
    set values). Without: only the set values, for each task to layer over its own."""
    values = _plain(cfg.reward.weights)
    try:
        resolved = resolve_weights(task.reward_weights if task else None, values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"reward.weights: {exc}") from exc
    return resolved if task is not None else {k: v for k, v in values.items() if v is not None}


def build_reward_fn(cfg: DictConfig, task: Task | None = None):
    """The reward callable of `reward.computer` (`weights=`, the weights in force for `task`,
    passed if its constructor takes it); ConfigError naming the key if it cannot be built or
    is not callable."""
    weights = build_reward_weights(cfg, task or build_task(cfg))
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


def build_agent(cfg: DictConfig, **kwargs: Any) -> Any:
    """The agent of `agent.build` (a `_partial_` factory) called with `kwargs` (`env=`,
    `seed=`); None without one."""
    return None if cfg.agent.build is None else instantiate(cfg.agent.build)(**kwargs)


def _positive(value: Any, key: str, allow_zero: bool = False) -> None:
    if value is None or isinstance(value, bool) or not (value >= 0 if allow_zero else value > 0):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _one_of(value: Any, key: str, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        raise ConfigError(f"{key}={value!r}; allowed: {shown}")


def check_device(device: str) -> None:
    """ConfigError unless this torch build has `device` (env.device)."""
    if device == "cpu":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"env.device={device!r} is not a torch device: {exc}") from None
    count = {"cuda": torch.cuda.device_count, "mps": lambda: int(torch.backends.mps.is_available())}
    if dev.type in count and count[dev.type]() <= (dev.index or 0):
        raise ConfigError(
            f"env.device={device!r}: this torch build ({torch.__version__}) has no "
            f"{dev.type.upper()} device{'' if dev.index is None else f' {dev.index}'}; "
            "use env.device=cpu"
        )


def check_runners(runners: Any, kind: Any) -> None:
    """env.runners: 0, a count or auto; above 0 only for tamiyo, and only with Ray installed."""
    if runners == 0:
        return
    if runners != "auto" and (isinstance(runners, bool) or not isinstance(runners, int)):
        raise ConfigError(f"env.runners={runners!r}: 0 (in this process), a count >= 1, or auto")
    if runners != "auto" and runners < 0:
        raise ConfigError(f"env.runners={runners}: 0 (in this process), a count >= 1, or auto")
    if kind != AgentKind.tamiyo:
        raise ConfigError(f"env.runners={runners}: Ray rollout runners are Tamiyo's (agent=tamiyo)")
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f'env.runners={runners} needs Ray: pip install "esper-gym[ray]"')


def validate(cfg: DictConfig) -> Task:
    """Everything that can be checked before any work; returns the resolved Task."""
    from esper_gym.agents.baselines import AGENTS

    task = build_task(cfg)
    build_reward_fn(cfg, task)
    build_generator(cfg)
    check_device(cfg.env.device)
    env, kind = cfg.env, cfg.agent.kind
    if env.num_envs is not None:
        _positive(env.num_envs, "env.num_envs")
    _one_of(env.vectorization, "env.vectorization", VECTORIZATIONS)
    if env.vectorization == "batched" and kind == AgentKind.sb3:
        raise ConfigError(
            "env.vectorization=batched is a gymnasium VectorEnv for agent.kind=tamiyo; SB3 "
            "trains on its own VecEnv: use sync or async"
        )
    _one_of(env.telemetry, "env.telemetry", ("off", "measured"))
    check_runners(env.get("runners", 0), kind)
    if env.get("contexts") not in (None, "train"):
        raise ConfigError(
            f"env.contexts={env.contexts!r}; allowed: null (the configured task), train "
            "(evaluation then plays the held-out test contexts; never train on them)"
        )
    if env.get("gate") is not None:
        from esper_gym.agents.gate import GATES, gate_plans

        _one_of(env.gate, "env.gate", (None, *GATES))
        for name in (task.name, *env.also_train_on):
            try:  # the gate cuts the mask to the tuned schedule's action (plans: its family's)
                gate_plans(name, env.gate)
            except ValueError as exc:
                raise ConfigError(f"env.gate={env.gate}: {exc}") from None
    for name in env.also_train_on:
        if name not in TASK_ENV_IDS or name == cfg.task.name:
            allowed = sorted(set(TASK_ENV_IDS) - {cfg.task.name})
            raise ConfigError(
                f"env.also_train_on has {name!r}; allowed: registered tasks other than "
                f"task={cfg.task.name}: {', '.join(allowed)}"
            )
    if env.also_train_on and kind != AgentKind.tamiyo:
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
    unknown = [name for name in cfg.eval.compare if name not in AGENTS]
    if unknown:
        raise ConfigError(f"eval.compare: unknown baselines {unknown}; known: {', '.join(AGENTS)}")
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
    _one_of(cfg.logger.kind, "logger.kind", ("wandb", "none"))
    _one_of(cfg.logger.mode, "logger.mode", (None, "offline", "online", "disabled"))
    return task


# --- Envs ----------------------------------------------------------------------------------------


def vectorization(cfg: DictConfig) -> str:
    """env.vectorization resolved: `auto` is the fastest the agent can train on, the batched
    simulator for Tamiyo and one process for SB3 (which has its own VecEnv)."""
    mode = cfg.env.get("vectorization") or "auto"
    if mode == "auto":
        kind = cfg.agent.get("kind")
        return "batched" if kind in (AgentKind.tamiyo, AgentKind.tamiyo.value) else "sync"
    return mode


def num_envs(cfg: DictConfig, mode: str | None = None) -> int:
    """env.num_envs, or when null: 8 copies on the batched simulator (a copy there costs a
    fraction of a single env), 2 envs otherwise."""
    if cfg.env.get("num_envs") is not None:
        return int(cfg.env.num_envs)
    return 8 if (mode or vectorization(cfg)) == "batched" else 2


def env_factory(
    cfg: DictConfig,
    task: str | None = None,
    *,
    mode: str | None = None,
    kernel_dir: str | None = None,
) -> Callable[[], gym.Env]:
    """A picklable no-argument env constructor for the configured task (vector envs need it),
    or for the registered `task` (env.also_train_on): its registered fields, with this run's
    blueprint library, device, reward, generator, contexts and vectorization (`mode`, resolved
    by `vectorization(cfg)` if None). `kernel_dir`: the resolved store (`build` passes it),
    else env.kernel_dir as it is."""
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
    kwargs["reward_fn"] = build_reward_fn(cfg, build_task(cfg))
    generator = build_generator(cfg)
    if generator is not None:
        kwargs["generator"] = generator
    kwargs["kernel_dir"] = kernel_dir if kernel_dir is not None else cfg.env.kernel_dir
    if cfg.env.get("telemetry") not in (None, "off"):
        kwargs["telemetry"] = cfg.env.telemetry
    if cfg.env.get("contexts") is not None:
        kwargs["contexts"] = cfg.env.contexts
    if cfg.env.get("show_context"):
        kwargs["show_context"] = True
    gate = cfg.env.get("gate")
    if (mode or vectorization(cfg)) == "batched":
        return BatchedFactory(env_id, cfg.threads, kwargs, gate)
    return functools.partial(make_env, env_id, cfg.threads, gate, **kwargs)


def contexts_line(cfg: DictConfig) -> str:
    """What the run trains on, said at its start: a task whose benchmark is its held-out test
    contexts (evaluate contexts=test) learns nothing of them from the one fixed configuration."""
    split = cfg.env.get("contexts")
    registered = TASKS.get(cfg.task.name)
    space = registered.context_space if registered is not None else None
    if split is not None or space is None:
        return f"contexts: {split or 'none (the fixed task)'}"
    return (
        f"contexts: none (the fixed task). {cfg.task.name} has {len(space.contexts('train'))} "
        "train contexts and is benchmarked on held-out test ones: env.contexts=train trains "
        "on the former"
    )


def kernel_store(kernel_dir: str | None, run_dir: str | os.PathLike) -> str:
    """env.kernel_dir resolved: `run` is `<run_dir>/kernels`; null the shared default store."""
    if kernel_dir == "run":
        return str(pathlib.Path(run_dir) / "kernels")
    if kernel_dir is None:
        from esper_gym.env import default_kernel_dir

        return str(default_kernel_dir())
    return str(kernel_dir)


@dataclass(frozen=True)
class Built:
    """What a run needs, built and resolved once from the composed config."""

    task: Task  # the resolved Task
    vectorization: str  # sync | async | batched (never auto)
    num_envs: int  # copies a learner collects from (per task)
    kernel_dir: str  # the compiled kernel store in use
    make: Callable[..., gym.Env]  # the task's env constructor (`env_factory`)
    makers: tuple  # make, then one per env.also_train_on task
    resume: pathlib.Path | None  # the checkpoint file `resume=` names
    ppo: PPOConfig | None  # agent.ppo with seed, num_envs, async_envs (tamiyo)

    @property
    def env_makers(self) -> Callable | list[Callable]:
        """What the learner trains on: `make`, or every maker when there are several tasks."""
        return list(self.makers) if len(self.makers) > 1 else self.make


def build(cfg: DictConfig, run_dir: str | os.PathLike) -> Built:
    """`validate(cfg)`, then the env constructors with vectorization, num_envs and the kernel
    store resolved, the checkpoint to resume and Tamiyo's PPOConfig."""
    task = validate(cfg)
    mode = vectorization(cfg)
    store = kernel_store(cfg.env.kernel_dir, run_dir)
    makers = tuple(
        env_factory(cfg, name, mode=mode, kernel_dir=store)
        for name in (None, *cfg.env.also_train_on)
    )
    n = num_envs(cfg, mode)
    ppo = None
    if cfg.agent.kind == AgentKind.tamiyo:
        try:
            ppo = instantiate(
                cfg.agent.ppo,
                seed=cfg.seed,
                num_envs=n,
                async_envs=mode == "async",
                runners=cfg.env.get("runners", 0),
                ray_address=cfg.get("ray", {}).get("address"),
            )
        except Exception as exc:  # PPOConfig's own check, wrapped by instantiate
            raise ConfigError(f"agent.ppo: {exc.__cause__ or exc}") from exc
    resume = None
    if cfg.resume:
        resume = checkpoint_file(cfg.resume, ".pt" if ppo is not None else ".zip")
    return Built(task, mode, n, store, makers[0], makers, resume, ppo)


# --- Runs: checkpoints, logger, errors -----------------------------------------------------------


def checkpoint_file(resume: str, suffix: str) -> pathlib.Path:
    """The checkpoint `resume=` names (the file, or the run dir holding `checkpoint<suffix>`:
    .pt Tamiyo, .zip SB3), by the one resolver (esper_gym.bench.jobs); ConfigError if there is
    none or it is of the other kind."""
    try:
        return jobs.checkpoint_file(resume, suffix, key="resume")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def previous_run_id(resume: str | None) -> str | None:
    """The W&B run id recorded next to the checkpoint being resumed (None if there is none)."""
    if not resume:
        return None
    path = pathlib.Path(resume)
    meta = (path if path.is_dir() else path.parent) / "run.json"
    return json.loads(meta.read_text()).get("wandb_id") if meta.is_file() else None


def init_logger(cfg: DictConfig, run_dir: pathlib.Path, task: Task):
    """The run's logger (logger/), started with the resolved config plus the resolved Task; a
    resumed run keeps logging to the W&B run id recorded next to its checkpoint."""
    from esper_gym.logger import make_logger

    config = _plain(cfg)
    config["task_resolved"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(task).items()
    }
    log = cfg.logger
    keys = ("project", "group", "name", "mode", "entity")
    logger = make_logger(log.kind, progress=log.progress)
    logger.init(
        config,
        dir=log.dir or str(run_dir),
        tags=list(log.tags),
        run_id=previous_run_id(cfg.resume),
        **{k: log[k] for k in keys},
    )
    return logger


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """At an entry point: a ConfigError or ValueError ends the process with `error: <message>`
    on stderr, one line, exit status 2; HYDRA_FULL_ERROR=1 lets it (and its traceback) through."""
    try:
        yield
    except ValueError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
