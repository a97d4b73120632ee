"""Benchmark tasks: what is trained, on what, for how long, and what may grow.

A `Task` is plain data. `get_task("spirals", decision_interval=10)` returns a registered task
with fields replaced; every field can also be given to `gym.make` as a keyword argument.

Your own host and data: `host` and `dataset` also take a callable (a host builder; a function
returning a `Dataset`), a `Dataset` object, or the import path of a callable as a string
(`"mylab.models:make_host"` or `"mylab.models.make_host"`), which is what a config file names.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from esper_gym.contexts import (
    CIFAR_CONTEXTS,
    CONV_CONTEXTS,
    FASHION_CONTEXTS,
    SPIRALS_BUDGET_CONTEXTS,
    SPIRALS_CONTEXTS,
    SPIRALS_PACE_CONTEXTS,
    ContextSpace,
)
from esper_gym.data import DATASET_NAMES, Dataset, load_dataset
from esper_gym.hosts import HOSTS
from esper_gym.kasmina import SeedConfig
from esper_gym.kernels.blueprints import BLUEPRINTS, DEFAULT_LIBRARY, FAULT_LIBRARY
from esper_gym.reward import RewardWeights

OPTIMIZERS = ("adam", "sgd")
# Fields that count things (steps, samples, slots): integers >= 1.
COUNTS = (
    "batch_size",
    "decision_interval",
    "eval_size",
    "contribution_size",
    "param_budget",
    "max_nodes",
    "seed_slots",
    "blend_steps",
    "embargo_steps",
    "max_faults",
)
# Fields that are amounts: finite numbers > 0.
AMOUNTS = ("lr", "max_epochs", "seed_lr")


def _is_import_path(value: str) -> bool:
    return ":" in value or "." in value


def import_object(path: str) -> Any:
    """The object an import path names: `"package.module:attr"` or `"package.module.attr"`."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError("an import path looks like 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"cannot import {module_name!r} ({exc}); is it installed or on PYTHONPATH?"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Task:
    """One benchmark task.

    Budgets: the episode trains the host for `max_epochs` passes over the training split,
    `decision_interval` optimizer steps per env step. `param_budget` caps the parameters of one
    kernel (the generator scales a blueprint down to fit it).

    Data: `dataset` is a registered name, a `Dataset`, a callable returning one (called with
    `dataset_kwargs`, see `esper_gym.data.load_dataset`) or its import path. The dataset's own
    validation split is set by its loader (`dataset_kwargs` `val_size`, `n_val` for spirals);
    `eval_size` is how many of those examples each evaluation uses (all of them when the split
    is smaller).

    Registration: `TASKS` is the one table of the benchmark's tasks. A registered task names
    its gymnasium id (`gym_id`, registered by `import esper_gym` with `max_episode_steps` as
    its TimeLimit) and its context distribution (`context_space`, what `contexts="train"` or
    `"test"` draws from). A task of your own leaves `gym_id` None (register it yourself with
    `gym.register`) and may bring a `ContextSpace` of its own.

    Preferences: `reward_weights` (RewardWeights fields) are the task's reward weights, used by
    the env when the caller gives none (None: the RewardWeights defaults). `show_rent=True`
    appends the reward's `param_cost` to the observation's globals (after the measured ones,
    before the context's): the rent is the user's preference, so the agent may see it. Off for
    every task but spirals_budget, whose observation shape it changes.
    """

    name: str = "spirals"
    dataset: str | Dataset | Callable[..., Dataset] = "spirals"
    dataset_kwargs: Mapping[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    host: str | Callable = "mlp"
    host_kwargs: Mapping[str, Any] = field(default_factory=dict)
    optimizer: str = "adam"
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 128
    decision_interval: int = 20
    max_epochs: float = 20.0
    eval_size: int = 1024
    # Seeds' contributions (accuracy with the seed on minus off) are measured every step on
    # the first `contribution_size` samples of the validation subset: one small extra pass per
    # live seed instead of a full one. The reward does not read them; observations and agents do.
    contribution_size: int = 256
    seed_slots: int = 2
    param_budget: int = 5_000
    blueprints: tuple[str, ...] = DEFAULT_LIBRARY
    max_nodes: int = 8
    seed_lr: float = 3e-3
    blend_steps: int = 40
    blend_schedule: str = "linear"
    embargo_steps: int = 40
    max_faults: int = 3
    latency_budget_ms: float | None = None
    device: str = "cpu"
    reward_weights: Mapping[str, float] | None = None
    show_rent: bool = False
    # Registration, not training knobs: compare=False, so a task equals its unregistered copy
    # (gym.make's own max_episode_steps= sets an env's TimeLimit; this one is the id's default).
    # Named gym_id, not env_id: train.py's Hydra schema (TaskConf) mirrors every Task field
    # and already has an env_id of its own.
    gym_id: str | None = field(default=None, compare=False)
    max_episode_steps: int | None = field(default=None, compare=False)
    context_space: ContextSpace | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Checked here so that a bad value fails at gym.make with its name, not at reset or
        # deep in the first episode (a float batch size slices tensors, inf epochs overflow).
        for key in COUNTS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"task {self.name!r}: {key}={value!r} must be an integer >= 1")
            object.__setattr__(self, key, int(value))  # numpy integers become plain ints
        for key in AMOUNTS:
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or not value > 0
            ):
                raise ValueError(f"task {self.name!r}: {key}={value!r} must be a finite number > 0")
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, numbers.Real) or not 0 <= wd < math.inf:
            raise ValueError(
                f"task {self.name!r}: weight_decay={wd!r} must be a finite number >= 0"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"task {self.name!r}: optimizer={self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}"
            )
        unknown = [b for b in self.blueprints if b not in BLUEPRINTS]
        if unknown or not self.blueprints:
            raise ValueError(
                f"task {self.name!r}: unknown blueprints {unknown}; known: {', '.join(BLUEPRINTS)}"
            )
        object.__setattr__(self, "blueprints", tuple(self.blueprints))
        if self.reward_weights is not None:
            try:
                RewardWeights(**dict(self.reward_weights))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"task {self.name!r}: reward_weights: {exc}") from None
        if not isinstance(self.show_rent, bool):
            raise ValueError(f"task {self.name!r}: show_rent={self.show_rent!r} must be a bool")
        steps = self.max_episode_steps
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ValueError(
                f"task {self.name!r}: max_episode_steps={steps!r} must be None or an integer >= 1"
            )
        if not (self.context_space is None or isinstance(self.context_space, ContextSpace)):
            raise ValueError(
                f"task {self.name!r}: context_space={self.context_space!r} must be None or an "
                "esper_gym.contexts.ContextSpace"
            )
        try:
            self.seed_config()  # validates the seed fields (latency budget, blend schedule)
        except ValueError as exc:
            raise ValueError(f"task {self.name!r}: {exc}") from None
        self.host_builder()  # an unknown host name or import path fails here, not at reset
        if isinstance(self.dataset, str) and _is_import_path(self.dataset):
            self._resolve("dataset", self.dataset)
        elif isinstance(self.dataset, str):
            if self.dataset.strip().lower().replace("-", "_") not in DATASET_NAMES:
                raise ValueError(
                    f"task {self.name!r}: dataset={self.dataset!r}; allowed: "
                    f"{', '.join(DATASET_NAMES)}, the import path of a function returning a "
                    "Dataset ('module:function'), a Dataset or a callable"
                )
        elif not (isinstance(self.dataset, Dataset) or callable(self.dataset)):
            raise ValueError(
                f"task {self.name!r}: dataset={self.dataset!r} is not a name, a Dataset or a "
                "callable returning one"
            )

    def _resolve(self, key: str, path: str) -> Any:
        try:
            obj = import_object(path)
        except ValueError as exc:
            raise ValueError(f"task {self.name!r}: {key}={path!r}: {exc}") from None
        if not (callable(obj) or isinstance(obj, Dataset)):
            raise ValueError(f"task {self.name!r}: {key}={path!r} is not callable")
        return obj

    def host_builder(self) -> Callable:
        """The host builder: `host` itself, a registered one, or the one its import path names."""
        if callable(self.host):
            return self.host
        if isinstance(self.host, str) and _is_import_path(self.host):
            return self._resolve("host", self.host)
        if self.host not in HOSTS:
            raise ValueError(
                f"task {self.name!r}: host={self.host!r}; allowed: {', '.join(HOSTS)}, a "
                "builder(input_shape, num_classes, slots, config) or its import path "
                "('module:function')"
            )
        return HOSTS[self.host]

    def load_data(self) -> Dataset:
        """The task's Dataset (`dataset` resolved and loaded with `dataset_kwargs`)."""
        source = self.dataset
        if isinstance(source, str) and _is_import_path(source):
            source = self._resolve("dataset", source)
        try:
            return load_dataset(source, data_dir=self.data_dir, **dict(self.dataset_kwargs))
        except TypeError as exc:  # a keyword the loader does not take: say which knob
            raise TypeError(f"task {self.name!r}: dataset_kwargs: {exc}") from exc

    def seed_config(self) -> SeedConfig:
        return SeedConfig(
            blend_steps=self.blend_steps,
            blend_schedule=self.blend_schedule,
            embargo_steps=self.embargo_steps,
            max_faults=self.max_faults,
            lr=self.seed_lr,
            latency_budget_ms=self.latency_budget_ms,
        )

    def budget_steps(self, n_train: int) -> int:
        """Optimizer steps in an episode, rounded up to whole decision intervals."""
        steps = math.ceil(self.max_epochs * n_train / self.batch_size)
        return math.ceil(steps / self.decision_interval) * self.decision_interval

    def episode_steps(self, n_train: int) -> int:
        return self.budget_steps(n_train) // self.decision_interval


# The TimeLimit of the registered ids sits far beyond every task's own budget: episodes end by
# `terminated` when the training budget is spent; truncation is the user's.
EPISODE_LIMIT = 1000

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        # 8 optimizer steps per decision keeps spirals the fast task: hundreds of env steps/s.
        Task(
            name="spirals",
            decision_interval=8,
            gym_id="Esper/Spirals-v0",
            max_episode_steps=EPISODE_LIMIT,
            context_space=SPIRALS_CONTEXTS,
        ),
        # The budget-conscious benchmark: rent 0.5 a doubling (10x the default), shown in the
        # globals; contexts hide what decides whether growth pays (noise, lr, budget), and
        # every context has 32 decisions (decision_interval scales with the epochs: 6, 12, 20).
        Task(
            name="spirals_budget",
            decision_interval=20,
            reward_weights={"param_cost": 0.5},
            show_rent=True,
            gym_id="Esper/SpiralsBudget-v0",
            max_episode_steps=EPISODE_LIMIT,
            context_space=SPIRALS_BUDGET_CONTEXTS,
        ),
        # The same rent, one budget; the hidden factor is the learning rate, which the run
        # shows as its pace: a controller that reads the run can tell when growth pays.
        Task(
            name="spirals_pace",
            decision_interval=20,
            reward_weights={"param_cost": 0.5},
            show_rent=True,
            gym_id="Esper/SpiralsPace-v0",
            max_episode_steps=EPISODE_LIMIT,
            context_space=SPIRALS_PACE_CONTEXTS,
        ),
        # The reliability benchmark: the library also offers fault-injecting blueprints.
        Task(
            name="spirals_faulty",
            blueprints=DEFAULT_LIBRARY + FAULT_LIBRARY,
            latency_budget_ms=20.0,
            gym_id="Esper/SpiralsFaulty-v0",
            max_episode_steps=EPISODE_LIMIT,
            context_space=SPIRALS_CONTEXTS,
        ),
        Task(
            name="fashion_mnist",
            dataset="fashion_mnist",
            # A rank-32 linear classifier: every nonlinearity has to be grown. A ReLU MLP of
            # width 32 or 64 gained nothing from growth (README, "Tasks").
            host="mlp",
            host_kwargs={"hidden": (32,), "activation": "none"},
            lr=2e-3,
            batch_size=128,
            decision_interval=50,
            max_epochs=2.0,
            eval_size=2000,
            param_budget=20_000,
            seed_lr=2e-3,
            blend_steps=100,
            embargo_steps=100,
            gym_id="Esper/FashionMNIST-v0",
            max_episode_steps=EPISODE_LIMIT,
            context_space=FASHION_CONTEXTS,
        ),
        Task(
            name="fashion_mnist_cnn",
            dataset="fashion_mnist",
            host="cnn",
            host_kwargs={"channels": (8, 16)},
            lr=3e-3,
            batch_size=128,
            decision_interval=50,
            max_epochs=2.0,
            eval_size=2000,
            param_budget=5_000,
            seed_lr=3e-3,
            blend_steps=100,
            embargo_steps=100,
            gym_id="Esper/FashionMNISTCNN-v0",
            max_episode_steps=EPISODE_LIMIT,
            context_space=CONV_CONTEXTS,
        ),
        Task(
            # A residual CNN: its graph has skip edges (the residual blocks' shortcuts), which
            # the observation traces from the forward (esper_gym.hosts.data_flow_edges).
            name="fashion_mnist_resnet",
            dataset="fashion_mnist",
            host="resnet",
            host_kwargs={"channels": (4, 8), "blocks": 1},
            lr=3e-3,
            batch_size=128,
            decision_interval=50,
            max_epochs=1.0,
            eval_size=2000,
            param_budget=5_000,
            seed_lr=3e-3,
            blend_steps=100,
            embargo_steps=100,
            gym_id="Esper/FashionMNISTResNet-v0",
            max_episode_steps=EPISODE_LIMIT,
            context_space=CONV_CONTEXTS,
        ),
        Task(
            name="cifar10",
            dataset="cifar10",
            host="resnet",
            host_kwargs={"channels": (16, 32), "blocks": 1},
            lr=2e-3,
            batch_size=128,
            decision_interval=100,
            max_epochs=10.0,
            eval_size=2000,
            param_budget=20_000,
            seed_lr=2e-3,
            blend_steps=200,
            embargo_steps=200,
            gym_id="Esper/CIFAR10-v0",
            max_episode_steps=2 * EPISODE_LIMIT,
            context_space=CIFAR_CONTEXTS,
        ),
    )
}

# Task name -> ContextSpace of the registered tasks that have contexts: a view of TASKS.
CONTEXTS: dict[str, ContextSpace] = {
    t.name: t.context_space for t in TASKS.values() if t.context_space is not None
}


def get_task(task: str | Task = "spirals", **overrides: Any) -> Task:
    """A registered task (by name) or a given Task, with `overrides` replacing fields."""
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; registered: {', '.join(TASKS)}")
        task = TASKS[task]
    elif not isinstance(task, Task):
        raise TypeError(f"task must be a task name or a Task, got {type(task).__name__}")
    names = {f.name for f in dataclasses.fields(Task)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown Task field(s) {bad}; allowed: {', '.join(sorted(names))}")
    return dataclasses.replace(task, **overrides) if overrides else task
