"""conf/: every option of every group composes, resolves, validates and instantiates; bad values
fail at composition or validation with a message that names the key.

Options are found by listing each group's directory, so a new yaml file is covered without
touching this file.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

import esper_gym
from esper_gym import config
from esper_gym.kernels.blueprints import DEFAULT_LIBRARY, FAULT_LIBRARY
from esper_gym.reward import RewardWeights
from esper_gym.tasks import TASKS

CONF = pathlib.Path(__file__).resolve().parents[1] / "conf"
config.register_configs()  # the schemas (what `python -m esper_gym.train` registers at import)


def groups() -> list[str]:
    """Every directory under conf/ that holds yaml options, as a group path ("hydra/launcher")."""
    found = {p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")}
    return sorted(g for g in found if g != ".")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# The launcher plugins' own options are structured configs, not files: named here.
ALL_OPTIONS = [(g, o) for g in groups() for o in options(g)] + [
    ("hydra/launcher", "joblib"),
    ("hydra/launcher", "submitit_slurm"),
]


def override_for(group: str, option: str) -> str:
    # experiment/ is not in the defaults list (it is added), every other group is.
    return f"+{group}={option}" if group == "experiment" else f"{group}={option}"


def load(*overrides: str, hydra_node: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="test"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_node)


def targets(node, path=""):
    """(path, mapping) of every mapping with a `_target_` in a plain (resolved) container."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from targets(item, f"{path}[{i}]")


def test_groups_are_the_documented_ones():
    expected = {"env", "task", "agent", "reward", "blueprints", "generator", "logger", "experiment"}
    assert expected | {"hydra/launcher"} <= set(groups())
    for group in expected:
        assert options(group), group


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_resolves_and_instantiates(group, option):
    hydra_node = group.startswith("hydra/")
    cfg = load(override_for(group, option), hydra_node=hydra_node)
    if hydra_node:
        launcher = cfg.hydra.launcher
        OmegaConf.to_container(launcher, resolve=True)
        assert get_class(launcher._target_)  # the plugin is installed and importable
        return
    plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert plain["seed"] == 0
    # Each group node is typed by its schema, whichever option filled it.
    for name, schema in config.GROUP_SCHEMAS.items():
        assert OmegaConf.get_type(cfg[name]) is schema, name
    config.validate(cfg)
    for path, node in targets(plain):
        obj = instantiate(node)
        assert obj is not None, path
        if isinstance(obj, functools.partial):
            assert callable(obj.func), path


def test_default_config_is_the_fast_task_with_tamiyo():
    cfg = load()
    assert cfg.task.name == "spirals" and cfg.agent.name == "tamiyo"
    assert cfg.logger.kind == "wandb" and cfg.logger.mode is None  # W&B's own, else offline
    assert cfg.logger.group == "spirals-tamiyo"
    ppo = instantiate(cfg.agent.ppo, seed=cfg.seed)
    # a few minutes on 2 cores (conf/agent/tamiyo.yaml says what was measured)
    assert type(ppo).__name__ == "PPOConfig" and ppo.total_steps <= 8192


def test_every_task_option_maps_to_its_registered_env():
    covered = set()
    for option in options("task"):
        cfg = load(f"task={option}")
        env_task, _ = esper_gym.ENV_IDS[cfg.task.env_id]
        assert env_task == cfg.task.name == option
        covered.add(cfg.task.env_id)
    assert covered == set(esper_gym.ENV_IDS)  # and every registered env has an option


def test_task_fields_override_and_mappings_merge():
    cfg = load("task=fashion_mnist", "task.max_epochs=0.5", "task.host_kwargs={hidden:[16]}")
    task = config.validate(cfg)
    assert task.max_epochs == 0.5 and task.dataset == "fashion_mnist"
    assert list(task.host_kwargs["hidden"]) == [16]
    cfg = load("task.dataset_kwargs={n_train:512}")
    assert config.task_overrides(cfg)["dataset_kwargs"] == {"n_train": 512}
    assert config.validate(cfg).lr == TASKS["spirals"].lr  # unset fields keep registered values


def test_blueprint_libraries():
    assert config.validate(load()).blueprints == DEFAULT_LIBRARY
    # The faulty task keeps its own library under the default blueprints option...
    assert (
        config.validate(load("task=spirals_faulty")).blueprints == DEFAULT_LIBRARY + FAULT_LIBRARY
    )
    assert config.validate(load("blueprints=with_faults")).blueprints == (
        DEFAULT_LIBRARY + FAULT_LIBRARY
    )
    assert config.validate(load("blueprints=mlp_only")).blueprints == ("residual_mlp", "low_rank")


def test_reward_options_give_weights_over_the_tasks_own():
    from esper_gym.config import build_reward_weights, build_task

    def weights(*overrides):
        cfg = load(*overrides)
        return build_reward_weights(cfg, build_task(cfg))

    assert weights() == RewardWeights()
    assert weights("reward=frugal").param_cost > RewardWeights().param_cost
    only = weights("reward=accuracy_only")
    assert only.accuracy > 0
    assert all(v == 0 for k, v in dataclasses.asdict(only).items() if k != "accuracy")
    assert weights("reward.weights.param_cost=0").param_cost == 0.0
    assert weights("task=spirals_budget").param_cost == 0.5  # the task's own preference
    assert weights("task=spirals_budget", "reward=frugal").param_cost == 1.0  # set: it wins


def test_experiments_override_task_agent_and_budgets():
    cifar = load("+experiment=cifar")
    assert cifar.task.name == "cifar10" and cifar.agent.name == "tamiyo"
    assert cifar.agent.ppo.total_steps == 4096 != load().agent.ppo.total_steps  # its own budget
    assert load("+experiment=fashion_mnist").task.name == "fashion_mnist"
    # Command-line overrides still win over the experiment's.
    assert load("+experiment=spirals", "agent.ppo.total_steps=64").agent.ppo.total_steps == 64


def test_ppo_schema_mirrors_ppoconfig():
    from esper_gym.agents.tamiyo import PPOConfig

    mine = {f.name: f.default for f in dataclasses.fields(config.PPOConf) if f.name != "_target_"}
    theirs = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    assert set(theirs) - set(mine) == {"seed", "num_envs", "async_envs", "runners", "ray_address"}
    assert {k: theirs[k] for k in mine} == mine


# --------------------------------------------------------------------------- bad values


def test_unknown_task_option_fails_naming_the_group():
    with pytest.raises(MissingConfigException) as err:
        load("task=imagenet")
    assert "task/imagenet" in str(err.value) and "spirals" in str(err.value)  # lists options


def test_unknown_task_name_fails_naming_the_key():
    with pytest.raises(config.ConfigError, match=r"task\.name='imagenet'"):
        config.validate(load("task.name=imagenet"))


def test_a_task_of_your_own_is_built_from_its_fields():
    cfg = load(
        "task.name=mine",
        "task.env_id=null",
        "task.host=tests.test_library:my_host",
        "task.dataset=tests.test_library:make_blobs",
        "task.dataset_kwargs={n_train:400}",
    )
    task = config.validate(cfg)
    assert (task.name, task.host, task.lr) == ("mine", "tests.test_library:my_host", 1e-2)
    assert task.dataset_kwargs == {"n_train": 400} and task.decision_interval == 20  # defaults
    env = config.env_factory(cfg)()
    assert env.unwrapped.task == task and env.spec.max_episode_steps is None
    with pytest.raises(config.ConfigError, match=r"task\.\*: task 'mine': host='nolab:net'"):
        config.validate(load("task.name=mine", "task.env_id=null", "task.host=nolab:net"))


def test_env_id_and_task_name_must_agree():
    with pytest.raises(config.ConfigError, match=r"task\.env_id"):
        config.validate(load("task.env_id=Esper/CIFAR10-v0"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("task.max_epochs=-1", "max_epochs"),
        ("task.decision_interval=0", "decision_interval"),
        ("agent.ppo.total_steps=-5", "agent.ppo.total_steps"),
        ("eval.episodes=-1", "eval.episodes"),
        ("env.num_envs=0", "env.num_envs"),
        ("reward.weights.fault=-0.5", "fault"),
        ("reward.weights.fault=nan", "fault=nan must be a finite number >= 0"),
        ("task.max_epochs=inf", "max_epochs=inf must be a finite number > 0"),
        ("task.latency_budget_ms=-1", r"latency_budget_ms=-1.0; allowed: None"),
        ("task.latency_budget_ms=nan", r"latency_budget_ms=nan; allowed: None"),
        ("eval.first_seed=-1", r"eval.first_seed=-1 must be an integer >= 0"),
        ("seed=-3", r"seed=-3 must be an integer >= 0"),
        ("env.also_train_on=[fashion]", r"also_train_on has 'fashion'; allowed: registered"),
        ("env.also_train_on=[spirals]", r"also_train_on has 'spirals'; allowed: .*fashion_mnist"),
        ("agent=heuristic env.also_train_on=[fashion_mnist]", r"also_train_on trains one Tamiyo"),
    ],
)
def test_negative_budgets_fail_naming_the_key(override, key):
    cfg = load(*override.split())  # a value of the right type: composes, validation refuses it
    with pytest.raises(config.ConfigError, match=key):
        config.validate(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("reward.weights.param_cost=abc", "reward.weights.param_cost"),
        ("task.max_epochs=many", "task.max_epochs"),
        ("agent.ppo.total_steps=lots", "agent.ppo.total_steps"),
        ("agent.kind=genius", "agent.kind"),
        ("task.max_epoch=3", "task.max_epoch"),  # a typo: not a Task field
    ],
)
def test_wrong_types_and_unknown_keys_fail_at_composition(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        load(override)
    text = f"{err.value} {err.value.__cause__}"
    assert key in text, text


def test_bad_validation_values():
    with pytest.raises(config.ConfigError, match=r"task\.dataset_kwargs"):
        config.validate(load("task.dataset_kwargs=n_train:1024"))
    with pytest.raises(config.ConfigError, match=r"eval\.compare"):
        config.validate(load("eval.compare=[oracle]"))
    with pytest.raises(config.ConfigError, match=r"env\.vectorization"):
        config.validate(load("env.vectorization=threads"))
    with pytest.raises(config.ConfigError, match=r"env\.contexts='test'.*allowed: null"):
        config.validate(load("env.contexts=test"))  # training on held-out contexts: refused
    with pytest.raises(config.ConfigError, match=r"resume"):
        config.validate(load("agent=noop", "resume=somewhere"))


def test_auto_vectorization_is_the_batched_simulator_for_tamiyo_only():
    assert config.vectorization(load()) == "batched"  # the default run: tamiyo on the fast path
    assert isinstance(config.env_factory(load()), config.BatchedFactory)
    for agent in ("sb3_ppo", "maskable_ppo", "heuristic"):
        assert config.vectorization(load(f"agent={agent}")) == "sync", agent
        assert not isinstance(config.env_factory(load(f"agent={agent}")), config.BatchedFactory)
    assert config.vectorization(load("env.vectorization=async")) == "async"
    config.validate(load("agent=sb3_ppo"))  # auto never picks batched for SB3
    with pytest.raises(config.ConfigError, match=r"env\.vectorization=batched"):
        config.validate(load("agent=sb3_ppo", "env.vectorization=batched"))


def test_env_contexts_reach_the_training_env():
    make = config.env_factory(load("env.contexts=train", "env.show_context=true"))
    env = make()
    _, info = env.reset(seed=3)
    assert env.unwrapped.contexts == "train" and info["context"]["split"] == "train"
    plain = config.env_factory(load())()
    # show_context appends one value per factor to the globals.
    extra = env.observation_space["globals"].shape[0] - plain.observation_space["globals"].shape[0]
    assert extra > 0
    assert make(contexts="test").unwrapped.contexts == "test"


def test_schemas_are_not_options_of_their_groups():
    """`task=schema` once was offered by every group and failed (Missing mandatory value): the
    schemas are top-level configs (`<group>_schema`), which no group lists."""
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="test"):
        loader = GlobalHydra.instance().config_loader()
        for group in groups():
            found = [o for o in loader.get_group_options(group) if "schema" in o]
            assert found == [], group
    with pytest.raises(MissingConfigException, match="task/schema"):
        load("task=schema")


def test_an_option_of_your_own_needs_no_schema_line(tmp_path):
    """TrainConf types every group: a task file of your own with no defaults list is checked
    against TaskConf all the same."""
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "mine.yaml").write_text("name: mine\nmax_epochs: 2\n")
    overrides = [f"hydra.searchpath=[file://{tmp_path}]", "task=mine"]
    cfg = load(*overrides)
    assert OmegaConf.get_type(cfg.task) is config.TaskConf and cfg.task.max_epochs == 2.0
    with pytest.raises(ConfigCompositionException):
        load(*overrides, "task.max_epoch=3")


def test_a_registered_task_name_with_a_typo_gets_a_suggestion():
    with pytest.raises(config.ConfigError, match=r"did you mean 'spirals'\?") as err:
        config.validate(load("task.name=spiral"))
    assert "task of your own" not in str(err.value)


def test_the_fashion_mnist_experiment_runs_one_thread_per_env_worker():
    """4 async workers x 2 threads oversubscribed 2 cores: one episode took 38.8 s against 6.2 s
    at 1 thread (conf/experiment/fashion_mnist.yaml)."""
    cfg = load("+experiment=fashion_mnist")
    assert cfg.threads == 1 and cfg.env.vectorization == "async"


def test_a_run_says_when_it_trains_on_the_fixed_configuration_of_a_contexts_benchmark():
    fixed = config.contexts_line(load("task=spirals_budget"))
    assert fixed.startswith("contexts: none (the fixed task). spirals_budget has 72 train")
    assert "env.contexts=train" in fixed
    assert config.contexts_line(load("task=spirals_budget", "env.contexts=train")) == (
        "contexts: train"
    )
