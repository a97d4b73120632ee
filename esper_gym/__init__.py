"""esper-gym: Gymnasium environments for morphogenetic training.

Importing the package registers the `Esper/*` environment ids of the registered tasks
(`esper_gym.tasks.TASKS`, each with its `gym_id` and `max_episode_steps`); the entry points
are strings, so the env modules themselves load at `gym.make`. Each id also has a vector
entry point, the batched simulator (`esper_gym.vector`): `gym.make_vec(id, num_envs=N,
vectorization_mode="vector_entry_point")`; "sync" and "async" give gymnasium's own.
"""

import importlib.resources
import pathlib

from gymnasium.envs.registration import register, registry

from esper_gym.tasks import TASKS

__version__ = "0.1.0"

ENTRY_POINT = "esper_gym.env:MorphogeneticEnv"
VECTOR_ENTRY_POINT = "esper_gym.vector.env:BatchedMorphogeneticEnv"

# Views of TASKS, the one registry: env id -> (task name, max_episode_steps), and task name ->
# env id. The TimeLimit sits far beyond every task's own budget (esper_gym.tasks).
ENV_IDS = {t.gym_id: (t.name, t.max_episode_steps) for t in TASKS.values() if t.gym_id}
TASK_ENV_IDS = {name: env_id for env_id, (name, _) in ENV_IDS.items()}

for _id, (_task, _steps) in ENV_IDS.items():
    if _id not in registry:
        register(
            id=_id,
            entry_point=ENTRY_POINT,
            vector_entry_point=VECTOR_ENTRY_POINT,
            max_episode_steps=_steps,
            kwargs={"task": _task},
        )


def config_dir() -> pathlib.Path:
    """The Hydra config directory that `esper_gym.train` and `esper_gym.evaluate` compose from.

    The repository keeps it as the top-level `conf/`; the wheel ships that folder as package
    data, `esper_gym/conf`, so an installed package finds it next to its own modules. A clone
    (editable install, or run from the repository root) has no `esper_gym/conf` and uses
    `conf/` beside the package.
    """
    packaged = pathlib.Path(str(importlib.resources.files(__name__) / "conf"))
    for candidate in (packaged, pathlib.Path(__file__).resolve().parent.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"esper_gym's Hydra configs are missing: no config.yaml in {packaged} (an installed "
        "wheel) nor in conf/ beside the package (a clone); reinstall esper-gym"
    )
