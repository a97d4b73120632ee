"""Behaviour pins: seeded fixed-task episodes played with fixed action sequences must give the
same rewards and accuracies, bit for bit, through every refactor (single envs and the batched
simulator). A change that alters them is a behaviour change: say so and re-pin on purpose
(`python -m tests.test_digests` prints the new digests)."""

from __future__ import annotations

import hashlib
import pathlib
import tempfile

import gymnasium as gym
import numpy as np
import pytest

from esper_gym.actions import ADVANCE, CULL, GERMINATE, WAIT, Action
from tests.conftest import small_kwargs

# (kind, layer, slot, blueprint name): a plan exercising germinate, advance through blending,
# a second seed, a cull and a mid-episode germination; invalid ones are penalised WAITs.
PLAN = [
    (GERMINATE, 0, 0, "low_rank"),
    (ADVANCE, 0, 0, None),
    (GERMINATE, 1, 0, "norm"),
    (ADVANCE, 0, 0, None),
    (WAIT, 0, 0, None),
    (CULL, 1, 0, None),
    (GERMINATE, 1, 1, "residual_mlp"),
    (ADVANCE, 1, 1, None),
]
CASES = {  # env id -> (extra kwargs, seed)
    "Esper/Spirals-v0": ({}, 3),
    "Esper/Spirals-v0/contexts": ({"contexts": "train"}, 5),
    "Esper/SpiralsFaulty-v0": ({}, 1),
    "Esper/FashionMNIST-v0": ({}, 0),
    "Esper/FashionMNISTCNN-v0": ({}, 0),
    "Esper/FashionMNISTResNet-v0": ({}, 2),
    "Esper/CIFAR10-v0": ({}, 0),
}
DIGESTS = {  # pinned on 1076ce1, before the "One house" refactor
    "Esper/Spirals-v0": "e18bfbde5bdc41e8",
    "Esper/Spirals-v0/contexts": "2be246de69dcb0e8",
    "Esper/SpiralsFaulty-v0": "4ef777e0a3b67858",
    "Esper/FashionMNIST-v0": "7284fb264adc6e2a",
    "Esper/FashionMNISTCNN-v0": "8a005deaf8624b6a",
    "Esper/FashionMNISTResNet-v0": "ef11a2bda5dd4f32",
    "Esper/CIFAR10-v0": "f043c8f12f2fac65",
}


def _action(u, step: int) -> int:
    """The plan's action at `step` for the unwrapped env `u`."""
    kind, layer, slot, name = PLAN[step % len(PLAN)]
    if kind == WAIT:
        return 0
    library = u.task.blueprints
    if kind == GERMINATE:
        name = name if name in library else library[0]
        action = Action(
            GERMINATE, layer % len(u.layers), slot % u.task.seed_slots, library.index(name)
        )
    else:
        action = Action(kind, layer % len(u.layers), slot % u.task.seed_slots)
    return u.layout.encode(action)


def _play(case: str, tmp: pathlib.Path) -> list[float]:
    env_id = case.removesuffix("/contexts")
    extra, seed = CASES[case]
    env = gym.make(env_id, kernel_dir=str(tmp / "kernels"), **small_kwargs(env_id, tmp), **extra)
    _, info = env.reset(seed=seed)
    numbers, done, step = [], False, 0
    while not done:
        _, reward, terminated, truncated, info = env.step(_action(env.unwrapped, step))
        numbers += [reward, info["val_acc"]]
        done, step = terminated or truncated, step + 1
    env.close()
    return [*numbers, info["test_acc"]]


def digest(numbers: list[float]) -> str:
    return hashlib.sha256(" ".join(float(x).hex() for x in numbers).encode()).hexdigest()[:16]


@pytest.mark.parametrize("case", list(CASES))
def test_fixed_episodes_are_bit_identical(case, tmp_path):
    assert digest(_play(case, tmp_path)) == DIGESTS[case]


@pytest.mark.parametrize("env_id", ["Esper/Spirals-v0", "Esper/CIFAR10-v0"])
def test_the_batched_simulator_plays_the_same_pinned_episodes(env_id, tmp_path):
    extra, seed = CASES[env_id]
    n = 3
    envs = gym.make_vec(
        env_id, num_envs=n, vectorization_mode="vector_entry_point",
        kernel_dir=str(tmp_path / "kernels"), **small_kwargs(env_id, tmp_path), **extra,
    )  # fmt: skip
    envs.reset(seed=[seed + 100, seed, seed + 200])  # copy 1 plays the pinned episode
    numbers = [[] for _ in range(n)]
    done, step = np.zeros(n, bool), 0
    while not done[1]:
        actions = np.zeros(n, np.int64)
        actions[1] = _action(envs.unwrapped.envs[1], step)
        _, rewards, terminated, truncated, infos = envs.step(actions)
        ended = terminated[1] or truncated[1]
        info = infos["final_info"] if ended else infos
        numbers[1] += [rewards[1], info["val_acc"][1]]
        if ended:
            numbers[1].append(info["test_acc"][1])
        done |= terminated | truncated
        step += 1
    envs.close()
    assert digest(numbers[1]) == DIGESTS[env_id]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            print(f'    "{case}": "{digest(_play(case, pathlib.Path(tmp)))}",')
