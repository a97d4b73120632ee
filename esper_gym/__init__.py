"""esper-gym: Gymnasium environments for morphogenetic training.

Importing the package registers the `Esper/*` environment ids (string entry points, so nothing
heavy is imported until `gym.make`).
"""

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

ENTRY_POINT = "esper_gym.env:MorphogeneticEnv"

# id -> (task name, max_episode_steps). The TimeLimit sits far beyond every task's own budget:
# episodes end by `terminated` when the training budget is spent; truncation is the user's.
ENV_IDS = {
    "Esper/Spirals-v0": ("spirals", 1000),
    "Esper/SpiralsFaulty-v0": ("spirals_faulty", 1000),
    "Esper/FashionMNIST-v0": ("fashion_mnist", 1000),
    "Esper/FashionMNISTCNN-v0": ("fashion_mnist_cnn", 1000),
    "Esper/CIFAR10-v0": ("cifar10", 2000),
}

for _id, (_task, _steps) in ENV_IDS.items():
    if _id not in registry:
        register(
            id=_id,
            entry_point=ENTRY_POINT,
            max_episode_steps=_steps,
            kwargs={"task": _task},
        )
