"""Env overhead: an episode of the env / the plain training loop of the same host and schedule.

Both sides train the same host (same init, data order, optimizer, batch size and number of
optimizer steps) and evaluate the same validation subset after every decision interval: the
plain side is a bare PyTorch loop over `nn.Linear`/`nn.Conv2d` layers, the env side is
`env.step(WAIT)` until the episode ends (KasminaLayers, telemetry, observation, reward).
Episodes alternate env/plain and the ratio is the median over rounds. Goal on fashion_mnist:
<= 1.05. Also prints env steps/s.

    python experiments/bench_env_overhead.py --task fashion_mnist --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import gymnasium as gym
import torch
from torch.nn import functional as F

import esper_gym
from esper_gym.hosts import plain_copy
from esper_gym.trainer import make_optimizer


def env_episode(env, seed: int) -> float:
    start = time.perf_counter()
    env.reset(seed=seed)
    done = False
    while not done:
        _, _, done, truncated, _ = env.step(0)
        done = done or truncated
    return time.perf_counter() - start


def plain_episode(env, seed: int) -> float:
    """The same run without the env: reset builds host and data order, then a bare loop."""
    env.reset(seed=seed)  # same host init and data order as the env episode (not timed)
    model = plain_copy(env.unwrapped.model)
    trainer = env.unwrapped.trainer
    task = env.unwrapped.task
    optimizer = make_optimizer(task, model.parameters())
    x_val, y_val = trainer.x_val, trainer.y_val
    start = time.perf_counter()
    for _ in range(env.unwrapped.episode_steps):
        model.train()
        for _ in range(task.decision_interval):
            x, y = trainer._next_batch()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            float((model(x_val).argmax(1) == y_val).float().mean())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="fashion_mnist")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-epochs", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    env_id = next(i for i, (t, _) in esper_gym.ENV_IDS.items() if t == args.task)
    kw = {"max_epochs": args.max_epochs} if args.max_epochs else {}
    with tempfile.TemporaryDirectory() as kernel_dir:
        env = gym.make(env_id, kernel_dir=kernel_dir, **kw)
        env_episode(env, 0)  # warm-up: dataset load, first allocations
        ratios, t_env, t_plain = [], [], []
        for r in range(args.rounds):
            pair = [("env", env_episode), ("plain", plain_episode)]
            times = dict((name, fn(env, r)) for name, fn in (pair if r % 2 == 0 else pair[::-1]))
            ratios.append(times["env"] / times["plain"])
            t_env.append(times["env"])
            t_plain.append(times["plain"])
        steps = env.unwrapped.episode_steps
    print(
        f"{args.task}: {steps} env steps x {env.unwrapped.task.decision_interval} optimizer steps\n"
        f"  plain loop  {statistics.median(t_plain):.3f} s/episode\n"
        f"  env         {statistics.median(t_env):.3f} s/episode "
        f"({steps / statistics.median(t_env):.0f} env steps/s)\n"
        f"  ratio env/plain: median {statistics.median(ratios):.3f} "
        f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
