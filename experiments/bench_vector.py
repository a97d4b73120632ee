"""Batched simulator vs SyncVectorEnv: env steps per second, side by side, one thread.

For each task and N, the batched env (`gym.make_vec(id, num_envs=N,
vectorization_mode="vector_entry_point")`) and a `gymnasium.vector.SyncVectorEnv` of N
`gym.make(id)` envs (same-step autoreset, as Tamiyo uses) run the same policy: WAIT, or a
growing policy (masked random actions: a kind drawn among the valid ones, wait 0.3, germinate
0.3, advance 0.35, cull 0.05, then one of its valid actions, so that seeds germinate, train,
blend and fossilize). The two sides run interleaved in chunks of `--chunk` steps, so that load
from other processes hits both alike; throughput is N * steps / seconds stepping (resets inside
the timed steps count, as in training). Both sides follow the same trajectories (same seeds,
same policy draws, equivalent envs). Every blueprint is compiled into the store before timing.
`live` is the mean number of live seeds per copy over the timed steps.

    python experiments/bench_vector.py                              # N in 1 8 32 128
    python experiments/bench_vector.py --ns 1 8 32 --steps 20 --tasks spirals

Recorded (2 shared cores, another session's training jobs running, one torch thread;
`nice -n 19 python experiments/bench_vector.py --ns 8 32 --steps 12 --warmup 3 --chunk 4`),
before (the previous commit, 97c15ab: copies' weights stacked every forward, one torch Adam
over every copy's tensors) and after (stacked host leaves), run back to back:

    task          policy     N   before: batched/s  speed-up   after: batched/s  speed-up  live
    spirals       wait       8               519.5     2.38x              897.1     3.83x  0.00
    spirals       wait      32               636.6     2.87x             1213.7     5.38x  0.00
    spirals       grow       8               153.9     2.46x              167.5     2.81x  1.43
    spirals       grow      32               169.6     2.84x              207.2     3.50x  1.49
    fashion_mnist wait       8                42.4     1.64x               50.2     1.98x  0.00
    fashion_mnist wait      32                38.0     1.56x               47.0     1.84x  0.00
    fashion_mnist grow       8                13.8     1.30x               15.3     1.40x  1.49
    fashion_mnist grow      32                17.5     1.39x               19.9     1.58x  1.54

(sync/s in both runs: spirals 217-235 wait, 59-63 grow; fashion_mnist 24-26 wait, 11-13
grow; N=1 runs the copy on its own trainer.) A second pair of runs gave, batched/s before ->
after: spirals wait 528 -> 864 (N=8), 638 -> 1258 (N=32); grow 146 -> 179, 161 -> 215 (2.41x ->
3.01x: the single env gained from the same commits' per-step savings too, sync 66 -> 71);
fashion_mnist wait 41 -> 52, 37 -> 46; grow 13.0 -> 14.1, 16.7 -> 19.1. What bounds it now, from profiles at
N=32: with seeds, the seed kernels themselves: ~45 live seeds spread over ~11 (layer, graph)
groups, most below VMAP_MIN, each a direct call of its graph (~0.1 ms forward and backward on a
CPU, much of it the ops' own arithmetic: vmap saves little per member even at 8), plus their
fit/blend bookkeeping and the autograd engine over those small graphs (~60% of a growing step).
Without seeds, the per-copy step (mask, observation, reward, infos: ~0.4 ms per copy) and the
stacked matmuls. fashion_mnist is bound by arithmetic: the host matmuls and the batch gathers
(128 x 784 floats per copy per optimizer step) cost the same stacked or not.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch

import esper_gym
from esper_gym.actions import ActionLayout
from esper_gym.kernels import load_or_compile

WEIGHTS = {"wait": 0.3, "germinate": 0.3, "advance": 0.35, "cull": 0.05}
TASK_IDS = {task: env_id for env_id, (task, _) in esper_gym.ENV_IDS.items()}


def grow_action(mask: np.ndarray, layout: ActionLayout, rng: np.random.Generator) -> int:
    """A masked random action, its kind drawn first (WEIGHTS) among the valid kinds."""
    kinds: dict[str, list[int]] = {}
    for a in np.flatnonzero(mask):
        kinds.setdefault(layout.decode(int(a)).kind, []).append(int(a))
    names = list(kinds)
    p = np.array([WEIGHTS[k] for k in names])
    kind = names[rng.choice(len(names), p=p / p.sum())]
    return int(rng.choice(kinds[kind]))


def make(kind: str, env_id: str, n: int, kernel_dir: str, kwargs: dict):
    if kind == "batched":
        return gym.make_vec(
            env_id, num_envs=n, vectorization_mode="vector_entry_point", kernel_dir=kernel_dir,
            **kwargs,
        )  # fmt: skip
    return gym.make_vec(
        env_id,
        num_envs=n,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
        kernel_dir=kernel_dir,
        **kwargs,
    )


def prewarm(env_id: str, kernel_dir: str, kwargs: dict) -> None:
    """Compile every blueprint for every layer into the store first: a compile (~0.1-1 s)
    inside the timed steps would fall on whichever side germinates that recipe first."""
    env = gym.make(env_id, kernel_dir=kernel_dir, **kwargs).unwrapped
    env.reset(seed=0)
    for layer in env.layers:
        for name in env.task.blueprints:
            if env.generator.fits(layer.out_shape, name, env.task.param_budget):
                blueprint = env.generator.propose(layer.out_shape, name, env.task.param_budget)
                load_or_compile(blueprint, layer.out_shape, env.store, env.cache)
    env.close()


class Side:
    """One vector env and its policy state."""

    def __init__(self, kind, env_id, n, kernel_dir, kwargs, policy, seed):
        self.envs = make(kind, env_id, n, kernel_dir, kwargs)
        single = gym.make(env_id, kernel_dir=kernel_dir, **kwargs).unwrapped
        self.layout, self.policy = single.layout, policy
        self.rng = np.random.default_rng(seed)
        self.obs, _ = self.envs.reset(seed=seed)
        self.seconds, self.steps, self.live = 0.0, 0, []

    def run(self, steps: int, timed: bool = True) -> None:
        for _ in range(steps):
            masks = self.obs["action_mask"].astype(bool)
            if self.policy == "wait":
                actions = np.zeros(len(masks), dtype=np.int64)
            else:
                actions = np.array([grow_action(m, self.layout, self.rng) for m in masks])
            start = time.perf_counter()
            self.obs, _, _, _, info = self.envs.step(actions)
            if timed:
                self.seconds += time.perf_counter() - start
                self.steps += 1
                self.live.append(float(np.mean(info["seeds_live"])))

    def rate(self) -> float:
        return self.envs.num_envs * self.steps / self.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["spirals", "fashion_mnist"])
    parser.add_argument("--ns", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--policies", nargs="+", default=["wait", "grow"])
    parser.add_argument("--steps", type=int, default=30, help="timed vector steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed vector steps first")
    parser.add_argument("--chunk", type=int, default=5, help="steps per side per turn")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{'task':<14}{'policy':<7}{'N':>5}"
        f"{'batched/s':>11}{'sync/s':>9}{'speed-up':>10}{'live':>6}"
    )
    with tempfile.TemporaryDirectory() as kernel_dir:
        for task in args.tasks:
            env_id = TASK_IDS[task]
            prewarm(env_id, kernel_dir, {})
            for policy in args.policies:
                for n in args.ns:
                    sides = [
                        Side(kind, env_id, n, kernel_dir, {}, policy, seed=0)
                        for kind in ("batched", "sync")
                    ]
                    for side in sides:
                        side.run(args.warmup, timed=False)
                    while sides[0].steps < args.steps:
                        for side in sides:
                            side.run(min(args.chunk, args.steps - side.steps))
                    batched, sync = sides
                    print(
                        f"{task:<14}{policy:<7}{n:>5}{batched.rate():>11.1f}{sync.rate():>9.1f}"
                        f"{batched.rate() / sync.rate():>9.2f}x{np.mean(batched.live):>6.2f}",
                        flush=True,
                    )
                    for side in sides:
                        side.envs.close()


if __name__ == "__main__":
    main()
