"""The Hydra schema of conf/evaluate.yaml (`EvaluateConf`) and its builder (`build_evaluate`:
composed config in, `esper_gym.bench.suite.EvalConfig` out). Beside esper_gym.config, whose group
schemas (env/, reward/, blueprints/, logger/) it shares; there only for the 700-line rule.

The spellings of `esper_gym.train` are accepted where they mean the same (docs/research-loop.md):
`task.<Task field>=v` sets that field of every evaluated task (as `task_overrides.<task>.<field>`
sets it for one), `eval.episodes`/`eval.first_seed`/`eval.greedy` are `seeds`/`first_seed`/
`greedy`. `seed=` (train's training seed) means nothing here and is refused, one line.
"""

import dataclasses
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from esper_gym import config
from esper_gym.bench.jobs import EVAL_SEED, EXECUTORS, TaskSpec, resolve_tasks
from esper_gym.bench.oracle import OracleConfig
from esper_gym.bench.suite import EvalConfig
from esper_gym.config import ConfigError, _mirror
from esper_gym.tasks import TASKS, Task

# task_overrides: one node per registered task with every Task field (None: keep), so
# `task_overrides.spirals.max_epochs=4` needs no `+` and a typo in a field name fails while Hydra
# composes; `variants` entries have the same fields plus `task` (the registered base).
TaskFieldsConf = _mirror(
    Task, "TaskFieldsConf", head=[], exclude=("name",), all_optional=True, module=__name__
)
TaskVariantConf = _mirror(
    Task,
    "TaskVariantConf",
    head=[("task", str, field(default=MISSING))],
    exclude=("name",),
    all_optional=True,
    module=__name__,
)
TaskOverridesConf = dataclasses.make_dataclass(
    "TaskOverridesConf",
    [(name, TaskFieldsConf, field(default_factory=TaskFieldsConf)) for name in TASKS],
)
TaskOverridesConf.__module__ = __name__
# `task.<field>`, train's spelling: every task (blueprints/ and env.device set those two).
EveryTaskConf = _mirror(
    Task,
    "EveryTaskConf",
    head=[],
    exclude=("name", "blueprints", "device"),
    all_optional=True,
    module=__name__,
)


@dataclass
class TrainEvalConf:
    """Train's `eval.*` spellings (None: not given): episodes = seeds, first_seed, greedy."""

    episodes: int | None = None
    first_seed: int | None = None
    greedy: bool | None = None


@dataclass
class BootstrapConf:
    reps: int = 2000
    confidence: float = 0.95
    seed: int = 0


@dataclass
class TimelineConf:
    agent: str | None = None
    task: str | None = None
    seed: int | None = None


@dataclass
class OracleFamilyConf:
    counts: list[int] | None = None
    starts: list[float] | None = None
    gaps: list[float] | None = None
    blueprints: list[str] | None = None
    layers: list[str] | None = None


@dataclass
class OracleConf:
    enabled: bool = True
    selection_seeds: int = 2
    selection_first_seed: int = OracleConfig.selection_first_seed  # never scored (checked)
    family: OracleFamilyConf = field(default_factory=OracleFamilyConf)


@dataclass
class PlotsConf:
    enabled: bool = True
    timeline: TimelineConf = field(default_factory=TimelineConf)
    learning_curves: str | None = None
    sweep_dir: str | None = None
    sweep_param: str = "reward.weights.param_cost"


@dataclass
class EvaluateConf:
    """The top level of conf/evaluate.yaml (which says what each key means)."""

    agents: list[str] = field(default_factory=lambda: ["heuristic", "random", "noop"])
    tasks: list[str] = field(default_factory=lambda: ["spirals", "fashion_mnist"])
    seeds: int = 5
    seeds_per_context: int | None = None  # with contexts: this many episodes in every context
    first_seed: int = EVAL_SEED
    executor: str = "local"
    n_jobs: int = 2
    threads: int | None = 1
    numerics: str = "portable"
    greedy: bool = False
    contexts: str | None = None
    checkpoints: dict[str, str | None] = field(default_factory=dict)
    agent_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    oracle: OracleConf = field(default_factory=OracleConf)
    task_overrides: TaskOverridesConf = field(default_factory=TaskOverridesConf)
    variants: dict[str, TaskVariantConf] = field(default_factory=dict)
    out_dir: str | None = None
    rank_by: str = "test_acc"
    bootstrap: BootstrapConf = field(default_factory=BootstrapConf)
    plots: PlotsConf = field(default_factory=PlotsConf)
    task: EveryTaskConf = field(default_factory=EveryTaskConf)  # train's spelling
    eval: TrainEvalConf = field(default_factory=TrainEvalConf)  # train's spelling
    seed: int | None = None  # train's training seed: refused (evaluate has no training)
    env: config.EnvConf = MISSING
    reward: config.RewardConf = MISSING
    blueprints: config.BlueprintsConf = MISSING
    logger: config.LoggerConf = MISSING


def register_configs() -> None:
    """Train's schemas (the groups' `<group>_schema`) and `evaluate_schema`."""
    config.register_configs()
    node = OmegaConf.structured(EvaluateConf)
    # Any name may be given a checkpoint or settings: `checkpoints.<name>=`, no `+` needed.
    OmegaConf.set_struct(node.checkpoints, False)
    OmegaConf.set_struct(node.agent_kwargs, False)
    ConfigStore.instance().store(name="evaluate_schema", node=node)


def build_evaluate(cfg: DictConfig, run_dir: str | os.PathLike) -> EvalConfig:
    """The EvalConfig of the composed config; ConfigError (one line, naming the key) for a
    value that cannot run, before any episode."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if cfg.seed is not None:
        raise ConfigError(
            f"seed={cfg.seed}: evaluate plays seeds first_seed + i for i < seeds (a count); "
            "eval.first_seed and eval.episodes (train's spellings) mean the same"
        )
    seeds = cfg.eval.episodes if cfg.eval.episodes is not None else cfg.seeds
    key = "eval.episodes" if cfg.eval.episodes is not None else "seeds"
    first = cfg.eval.first_seed if cfg.eval.first_seed is not None else cfg.first_seed
    if seeds < 1:
        raise ConfigError(f"{key}={seeds}: the episodes per (agent, task) must be >= 1")
    if first < 0:
        raise ConfigError(f"first_seed={first} must be an integer >= 0 (it seeds numpy)")
    if cfg.executor not in EXECUTORS:
        raise ConfigError(f"executor={cfg.executor!r}; allowed: {', '.join(EXECUTORS)}")
    if cfg.n_jobs < 1:
        raise ConfigError(f"n_jobs={cfg.n_jobs} must be >= 1")
    config.check_device(cfg.env.device)
    every = {k: v for k, v in plain["task"].items() if v is not None}
    try:
        common = {"device": cfg.env.device, **every}
        specs = resolve_tasks(plain["tasks"], plain["variants"], plain["task_overrides"], common)
        if cfg.blueprints.names is not None or cfg.blueprints.add:
            # blueprints/ sets every task's library (null names: each task's own, plus `add`).
            names, add = cfg.blueprints.names, list(cfg.blueprints.add)
            specs = [_with_library(s, names, add) for s in specs]
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"tasks: {exc}") from exc
    if cfg.seeds_per_context is not None:
        seeds = _per_context(cfg, specs, first)
    weights = config.build_reward_weights(cfg)  # the set values: each task layers them
    greedy = cfg.eval.greedy if cfg.eval.greedy is not None else cfg.greedy
    boot, plots = cfg.bootstrap, cfg.plots
    return EvalConfig(
        agents=plain["agents"],
        tasks=specs,
        seeds=seeds,
        out_dir=cfg.out_dir or str(run_dir),
        checkpoints=plain["checkpoints"],
        first_seed=first,
        executor=cfg.executor,
        n_jobs=cfg.n_jobs,
        reward_weights=weights,
        kernel_dir=cfg.env.kernel_dir,
        greedy=greedy,
        threads=cfg.threads,
        contexts=cfg.contexts,
        agent_kwargs=plain["agent_kwargs"],
        oracle=plain["oracle"],
        rank_by=cfg.rank_by,
        reps=boot.reps,
        confidence=boot.confidence,
        bootstrap_seed=boot.seed,
        make_plots=plots.enabled,
        timeline=plain["plots"]["timeline"],
        learning_curves=plots.learning_curves,
        sweep_dir=plots.sweep_dir,
        sweep_param=plots.sweep_param,
        config=plain,
    )


def _per_context(cfg: DictConfig, specs, first: int) -> list[int]:
    """seeds_per_context=K: every context of the split K times (oracle.balanced_seeds); `seeds`
    is not used. The seeds are common to every task, so tasks whose contexts are drawn
    differently (another space) are refused: run one evaluate per task."""
    from esper_gym.bench.oracle import balanced_seeds

    k = cfg.seeds_per_context
    if k < 1 or cfg.contexts is None:
        raise ConfigError(
            f"seeds_per_context={k}: needs contexts=test (or train) and a count >= 1; null "
            "plays `seeds` episodes, each drawing its context"
        )
    try:
        lists = {spec.label: balanced_seeds(spec.build(), cfg.contexts, k, first) for spec in specs}
    except ValueError as exc:
        raise ConfigError(f"seeds_per_context={k}: {exc}") from exc
    if len({tuple(v) for v in lists.values()}) > 1:
        raise ConfigError(
            f"seeds_per_context={k}: tasks {', '.join(lists)} draw their contexts from different "
            "spaces, so no one list of seeds plays each of their contexts K times; evaluate "
            "one task at a time"
        )
    return next(iter(lists.values()))


def _with_library(spec: TaskSpec, names, add) -> TaskSpec:
    """`spec` with the blueprint library `names` (None: its own) plus `add`."""
    base = list(names) if names is not None else list(spec.build().blueprints)
    library = tuple(dict.fromkeys([*base, *add]))
    return dataclasses.replace(spec, overrides={**spec.overrides, "blueprints": library})


def init_logger(cfg: DictConfig, out_dir: str | os.PathLike):
    """The run's logger (logger/; None for `none`), started with the resolved config."""
    from esper_gym.logger import make_logger

    log = cfg.logger
    if log.kind == "none":
        return None
    return make_logger(log.kind, progress=log.progress).init(
        OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        project=log.project,
        group=log.group,
        name=log.name,
        mode=log.mode,
        dir=log.dir or str(pathlib.Path(out_dir)),
        entity=log.entity,
        tags=list(log.tags),
    )
