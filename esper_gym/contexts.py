"""Per-task context distributions and their disjoint train/test split (the contextual benchmark).

A fixed task makes the best growth policy an open-loop schedule: every episode is the same run
with another seed. A *context* is a set of `Task` fields drawn at `reset` (host width and depth,
learning rate, training budget, decision interval, parameter budget, label noise, input noise,
class subsets, spiral arms): the runs differ in when, where and whether growth pays, so a
controller that reads the run can beat a schedule (measured in the README, "Contexts").

A task's contexts are its `Task.context_space` (the registered tasks' are set in `TASKS`,
esper_gym.tasks), a `ContextSpace`: a grid of `Factor`s (each a few levels). **The split holds out
combinations, not ranges**: the full grid is shuffled once with a fixed seed (`split_seed`) and
its first `test_share` becomes the test contexts, the rest the train contexts. Every level of
every factor occurs in both splits (checked by `ContextSpace.__post_init__`), so a test context
is an unseen *combination* of seen values (CARL's interpolation setting): a policy that
memorised the train contexts' schedules meets runs it never saw.

A space with `fixed_decisions=True` scales `decision_interval` with `epochs_scale`, so every
context has the same number of decisions: the training budget does not leak through the step
size of `progress` (1/24 against 1/80 on spirals' own space).

Factors act on a task as follows (`apply_context`); scales multiply the task's own value, so a
user's overrides (`gym.make(..., max_epochs=4, contexts="train")`) still set the scale:

| factor          | Task field(s)                                                            |
|-----------------|--------------------------------------------------------------------------|
| width, depth    | host_kwargs: mlp `hidden=(width,) * depth`; cnn/resnet `channels=(width, 2 width, ...)[:depth]` |
| lr_scale        | lr = task.lr * value                                                     |
| epochs_scale    | max_epochs = task.max_epochs * value (and decision_interval with it, where the space's `fixed_decisions`) |
| interval_scale  | decision_interval = round(task.decision_interval * value)                |
| budget_scale    | param_budget = round(task.param_budget * value)                          |
| arms, noise     | dataset_kwargs (spirals: arm count, geometric noise)                     |
| label_noise, input_noise, classes | dataset_kwargs (`esper_gym.data.shift_dataset`)        |
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # tasks.py imports this module: each Task names its ContextSpace
    from esper_gym.tasks import Task

SPLITS = ("train", "test")
DATASET_FACTORS = ("arms", "noise", "label_noise", "input_noise", "classes")
SCALE_FACTORS = {
    "lr_scale": "lr",
    "epochs_scale": "max_epochs",
    "interval_scale": "decision_interval",
    "budget_scale": "param_budget",
}
HOST_FACTORS = ("width", "depth")
LOG_FACTORS = ("width", *SCALE_FACTORS)  # normalised on a log scale (doublings matter)


@dataclass(frozen=True)
class Factor:
    name: str
    levels: tuple[float, ...]

    def __post_init__(self) -> None:
        known = (*HOST_FACTORS, *SCALE_FACTORS, *DATASET_FACTORS)
        if self.name not in known:
            raise ValueError(f"factor {self.name!r}; allowed: {', '.join(known)}")
        if len(self.levels) < 2 or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"factor {self.name!r}: needs >= 2 distinct levels, got {self.levels}")

    def normalise(self, value: float) -> float:
        """`value` mapped to [0, 1] over this factor's levels (log scale for widths/scales)."""
        f = math.log if self.name in LOG_FACTORS else float
        lo, hi = f(min(self.levels)), f(max(self.levels))
        return (f(value) - lo) / (hi - lo)


@dataclass(frozen=True)
class ContextSpace:
    """The contexts of a task: the grid of its factors, split into train and test. `name`
    names the space in messages (tasks that share factors share a space)."""

    name: str
    factors: tuple[Factor, ...]
    test_share: float = 0.25
    split_seed: int = 0
    # epochs_scale also scales decision_interval: the same decisions whatever the budget.
    fixed_decisions: bool = False

    def __post_init__(self) -> None:
        for split in SPLITS:
            contexts = self.contexts(split)
            for factor in self.factors:
                seen = {c[factor.name] for c in contexts}
                if seen != set(factor.levels):
                    raise ValueError(
                        f"contexts {self.name!r}: the {split} split lacks {factor.name} "
                        f"levels {sorted(set(factor.levels) - seen)}; change split_seed"
                    )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.factors)

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of levels, in a fixed order."""
        return [
            dict(zip(self.names, combo))
            for combo in itertools.product(*(f.levels for f in self.factors))
        ]

    def contexts(self, split: str) -> list[dict[str, Any]]:
        """The contexts of `split` ("train" or "test"), each a dict factor -> level."""
        check_split(split)
        grid = self.grid()
        order = np.random.default_rng(self.split_seed).permutation(len(grid))
        n_test = max(1, math.ceil(self.test_share * len(grid)))
        chosen = order[:n_test] if split == "test" else order[n_test:]
        return [grid[i] for i in sorted(chosen)]

    def sample(self, split: str, rng: np.random.Generator) -> tuple[int, dict[str, Any]]:
        """(index, context): one context of `split` drawn uniformly with `rng`."""
        contexts = self.contexts(split)
        index = int(rng.integers(len(contexts)))
        return index, contexts[index]

    def features(self, context: Mapping[str, Any]) -> list[float]:
        """The context as numbers in [0, 1], one per factor (what show_context appends)."""
        return [f.normalise(context[f.name]) for f in self.factors]


def check_split(split: Any) -> str:
    if split not in SPLITS:
        raise ValueError(f"contexts={split!r}; allowed: None (the fixed task), 'train', 'test'")
    return split


def _channels(width: int, depth: int) -> tuple[int, ...]:
    return tuple(int(width) * 2**i for i in range(int(depth)))


def apply_context(task: Task, context: Mapping[str, Any]) -> Task:
    """`task` with the fields `context` sets (table in the module docstring)."""
    host_kwargs = dict(task.host_kwargs)
    dataset_kwargs = dict(task.dataset_kwargs)
    fields: dict[str, Any] = {}
    if "width" in context or "depth" in context:
        if task.host == "mlp":
            hidden = tuple(host_kwargs.get("hidden", (16, 16)))
            width = context.get("width", hidden[0])
            host_kwargs["hidden"] = (int(width),) * int(context.get("depth", len(hidden)))
        elif task.host in ("cnn", "resnet"):
            channels = tuple(host_kwargs.get("channels", (8, 16)))
            width = context.get("width", channels[0])
            host_kwargs["channels"] = _channels(width, context.get("depth", len(channels)))
        else:
            raise ValueError(
                f"task {task.name!r}: width/depth contexts need host mlp, cnn or resnet, not "
                f"{task.host!r}"
            )
    for name, value in context.items():
        if name in DATASET_FACTORS:
            dataset_kwargs[name] = int(value) if name in ("arms", "classes") else float(value)
        elif name in SCALE_FACTORS:
            key = SCALE_FACTORS[name]
            scaled = getattr(task, key) * value
            fields[key] = float(scaled) if key in ("lr", "max_epochs") else max(1, round(scaled))
    space = task.context_space
    if space is not None and space.fixed_decisions and "epochs_scale" in context:
        interval = task.decision_interval * context["epochs_scale"]
        fields["decision_interval"] = max(1, round(interval * context.get("interval_scale", 1)))
    return dataclasses.replace(
        task, host_kwargs=host_kwargs, dataset_kwargs=dataset_kwargs, **fields
    )


def describe(task: Task, split: str, index: int, context: Mapping[str, Any]) -> dict[str, Any]:
    """`info["context"]`: a plain (JSON-ready) dict of the factors, the split, the context's
    index in its split, and the Task fields they resolved to."""

    def plain(v):
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v.item() if isinstance(v, np.generic) else v

    return {
        "split": split,
        "index": index,
        **plain(dict(context)),
        "fields": {
            "host_kwargs": plain(task.host_kwargs),
            "dataset_kwargs": plain(task.dataset_kwargs),
            "lr": task.lr,
            "max_epochs": task.max_epochs,
            "decision_interval": task.decision_interval,
            "param_budget": task.param_budget,
        },
    }


# Levels are chosen from measured variants that change the best growth decision (DESIGN.md,
# "Baselines"): wide hosts and 3 arms where NoOp wins, short budgets where growing at once
# pays, small hosts that need more growth, noise that caps every model.
_SPIRALS = (
    Factor("width", (8, 16, 32)),
    Factor("depth", (2, 3)),
    Factor("lr_scale", (0.3, 1.0)),
    Factor("epochs_scale", (0.3, 1.0)),
    Factor("arms", (3, 5)),
    Factor("noise", (0.05, 0.15)),
    Factor("label_noise", (0.0, 0.1)),
    Factor("budget_scale", (0.4, 1.0)),
)
# Fashion-MNIST: the fixed task barely separates controllers (DESIGN.md); a longer budget, a
# rank change, noisy labels and a 5-class subset move the static-vs-ceiling gap both ways.
_FASHION = (
    Factor("width", (16, 32, 64)),
    Factor("lr_scale", (0.25, 1.0)),
    Factor("epochs_scale", (0.5, 1.0, 3.0)),
    Factor("label_noise", (0.0, 0.2)),
    Factor("classes", (5, 10)),
    Factor("interval_scale", (1.0, 2.0)),
)
_CONV = (
    Factor("width", (4, 8)),
    Factor("depth", (1, 2)),
    Factor("lr_scale", (0.3, 1.0)),
    Factor("epochs_scale", (0.5, 1.0, 2.0)),  # 2x: ~15 s on one CPU thread, the cap
    Factor("input_noise", (0.0, 0.5)),
    Factor("label_noise", (0.0, 0.2)),
)
_CIFAR = (
    Factor("width", (8, 16)),
    Factor("depth", (1, 2)),
    Factor("lr_scale", (0.3, 1.0)),
    Factor("epochs_scale", (0.3, 1.0)),
    Factor("label_noise", (0.0, 0.2)),
    Factor("classes", (5, 10)),
)

# spirals_budget (param_cost 0.5): the factors that decide whether growth pays but that the
# first observation does not show (DESIGN.md, "Baselines"): spiral and label noise, learning
# rate, arms, the training budget (its under-trained 0.3 kept; decisions fixed, so it does not
# leak through progress). Width is the one static fact, needed for contexts to change the host.
_SPIRALS_BUDGET = (
    Factor("width", (8, 16)),
    Factor("lr_scale", (0.3, 1.0)),
    Factor("epochs_scale", (0.3, 0.6, 1.0)),
    Factor("arms", (3, 5)),
    Factor("noise", (0.05, 0.15)),
    Factor("label_noise", (0.0, 0.1)),
)
# spirals_pace (param_cost 0.5): the run's learning pace decides. Growth (two seeds at 0.5)
# gains +3.2 on average at lr_scale 0.1 and loses 0.7 at 2 (more where the host is wide)
# (measured before registering: experiments/observability.py on its train contexts). The learning
# rate is hidden at step 0 and shows in the first intervals' loss and accuracy; width and arms
# are visible static facts. One budget: every context has 32 decisions.
_SPIRALS_PACE = (
    Factor("width", (12, 16, 24, 32)),
    Factor("lr_scale", (0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 2.0)),
    Factor("arms", (3, 5)),
)

# One space per family of tasks; TASKS (esper_gym.tasks) says which task has which.
SPIRALS_CONTEXTS = ContextSpace("spirals", _SPIRALS)
FASHION_CONTEXTS = ContextSpace("fashion_mnist", _FASHION)
CONV_CONTEXTS = ContextSpace("fashion_mnist_conv", _CONV)
CIFAR_CONTEXTS = ContextSpace("cifar10", _CIFAR)
SPIRALS_BUDGET_CONTEXTS = ContextSpace("spirals_budget", _SPIRALS_BUDGET, fixed_decisions=True)
# 64 contexts: 24 test, 40 train.
SPIRALS_PACE_CONTEXTS = ContextSpace("spirals_pace", _SPIRALS_PACE, test_share=0.375)


def context_space(task: Task) -> ContextSpace:
    """The ContextSpace of `task` (its `context_space` field)."""
    if task.context_space is None:
        raise ValueError(
            f"task {task.name!r} has no context distribution (its Task.context_space is None; "
            "esper_gym.tasks.CONTEXTS lists the registered tasks that have one); pass "
            "contexts=None for the fixed task"
        )
    return task.context_space
