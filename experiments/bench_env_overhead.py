"""Env overhead: time of an episode in the env / the plain training loop of the same schedule.

Both sides train the same host (same init, optimizer, batch size, optimizer steps) and evaluate
the same validation subset after every decision interval: the plain side is a bare PyTorch
loop over `nn.Linear`/`nn.Conv2d` layers, the env side is `env.step(WAIT)` (KasminaLayers,
telemetry, contribution, observation, reward). The two run interleaved, one decision interval
at a time and alternating which goes first, so that load from other processes hits both alike;
the ratio is total env time / total plain time over all episodes. Goal on fashion_mnist: <= 1.05.

    python experiments/bench_env_overhead.py --task fashion_mnist --episodes 5
"""

from __future__ import annotations

import argparse
import tempfile
import time

import gymnasium as gym
import torch
from torch.nn import functional as F

import esper_gym
from esper_gym.hosts import plain_copy
from esper_gym.trainer import make_optimizer


def plain_interval(model, optimizer, x_train, y_train, indices, x_val, y_val) -> None:
    model.train()
    for idx in indices:
        x, y = x_train[idx], y_train[idx]  # gathering the batch is part of any training loop
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        float((model(x_val).argmax(1) == y_val).float().mean())


def episode(env, seed: int) -> tuple[float, float, float]:
    """(env seconds, plain seconds, reset seconds) of one interleaved episode."""
    u = env.unwrapped
    start = time.perf_counter()
    env.reset(seed=seed)
    reset_s = time.perf_counter() - start
    model = plain_copy(u.model)
    optimizer = make_optimizer(u.task, model.parameters())
    order = torch.Generator().manual_seed(seed)
    x_train, y_train = u.data.x_train, u.data.y_train
    t_env = t_plain = 0.0
    for step in range(u.episode_steps):
        indices = [
            torch.randint(len(x_train), (u.task.batch_size,), generator=order)
            for _ in range(u.task.decision_interval)
        ]
        for side in ("env", "plain") if step % 2 == 0 else ("plain", "env"):
            start = time.perf_counter()
            if side == "env":
                env.step(0)
                t_env += time.perf_counter() - start
            else:
                plain_interval(
                    model, optimizer, x_train, y_train, indices, u.trainer.x_val, u.trainer.y_val
                )
                t_plain += time.perf_counter() - start
    return t_env, t_plain, reset_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="fashion_mnist")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--max-epochs", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    env_id = next(i for i, (t, _) in esper_gym.ENV_IDS.items() if t == args.task)
    kw = {"max_epochs": args.max_epochs} if args.max_epochs else {}
    with tempfile.TemporaryDirectory() as kernel_dir:
        env = gym.make(env_id, kernel_dir=kernel_dir, **kw)
        episode(env, 0)  # warm-up: dataset load, first allocations
        runs = [episode(env, seed) for seed in range(1, args.episodes + 1)]
    u = env.unwrapped
    t_env, t_plain = sum(r[0] for r in runs), sum(r[1] for r in runs)
    steps = u.episode_steps * len(runs)
    per_episode = ", ".join(f"{e / p:.3f}" for e, p, _ in runs)
    print(
        f"{args.task}: {len(runs)} episodes x {u.episode_steps} env steps x "
        f"{u.task.decision_interval} optimizer steps\n"
        f"  plain loop  {t_plain / len(runs):.3f} s/episode\n"
        f"  env         {t_env / len(runs):.3f} s/episode ({steps / t_env:.0f} env steps/s)\n"
        f"  env reset   {sum(r[2] for r in runs) / len(runs):.3f} s/episode (not in the ratio)\n"
        f"  ratio env/plain: {t_env / t_plain:.3f} (per episode: {per_episode})"
    )


if __name__ == "__main__":
    main()
