"""esper-gym: Gymnasium environments for morphogenetic training.

Importing the package registers the `Esper/*` environment ids (string entry points, so nothing
heavy is imported until `gym.make`). Each id also has a vector entry point, the batched
simulator (`esper_gym.vector`): `gym.make_vec(id, num_envs=N,
vectorization_mode="vector_entry_point")`; "sync" and "async" give gymnasium's own.
"""

import importlib.resources
import pathlib

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

ENTRY_POINT = "esper_gym.env:MorphogeneticEnv"
VECTOR_ENTRY_POINT = "esper_gym.vector.env:BatchedMorphogeneticEnv"

# id -> (task name, max_episode_steps). The TimeLimit sits far beyond every task's own budget:
# episodes end by `terminated` when the training budget is spent; truncation is the user's.
ENV_IDS = {
    "Esper/Spirals-v0": ("spirals", 1000),
    "Esper/SpiralsFaulty-v0": ("spirals_faulty", 1000),
    "Esper/FashionMNIST-v0": ("fashion_mnist", 1000),
    "Esper/FashionMNISTCNN-v0": ("fashion_mnist_cnn", 1000),
    "Esper/FashionMNISTResNet-v0": ("fashion_mnist_resnet", 1000),
    "Esper/CIFAR10-v0": ("cifar10", 2000),
}

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
