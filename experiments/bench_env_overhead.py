"""Env overhead: time of an episode in the env / the plain training loop of the same schedule.

Both sides train the same host (same init, optimizer, batch size, optimizer steps) and evaluate
the same validation subset after every decision interval: the plain side is a bare PyTorch
loop over `nn.Linear`/`nn.Conv2d` layers, the env side is `env.step(WAIT)` (KasminaLayers,
telemetry, contribution, observation, reward). The two run interleaved, one decision interval
at a time and alternating which goes first, so that load from other processes hits both alike;
the ratio is total env time / total plain time over all episodes. Goal on fashion_mnist: <= 1.05.

`--seeds N` grafts `residual_mlp` seeds (alpha 1, trained with the host) on the first N layers
right after reset, on both sides: the env's are kernels loaded from validated artifacts in
KasminaLayers; the plain loop's are the same blueprint built as eager modules holding the same
initial weights, added as `h + seed(h)` in a hand-written forward, trained by one Adam with a
param group per seed. Goal on spirals with 2 seeds: <= 1.3.

    python experiments/bench_env_overhead.py --task fashion_mnist --episodes 5
    python experiments/bench_env_overhead.py --task spirals --episodes 5 --seeds 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

import gymnasium as gym
import torch
from report import report  # experiments/report.py: --report writes the output
from torch.nn import functional as F

import esper_gym
from esper_gym.hosts import plain_copy
from esper_gym.kernels import BLUEPRINTS, load_or_compile
from esper_gym.trainer import make_optimizer


class Grown(torch.nn.Module):
    """A hand-written grown layer: the host layer plus an eager seed module."""

    def __init__(self, layer: torch.nn.Module, seed: torch.nn.Module):
        super().__init__()
        self.layer, self.seed = layer, seed

    def forward(self, x):
        h = self.layer(x)
        return h + self.seed(h)


def graft_seeds(env, plain, count: int):
    """Graft `count` residual_mlp seeds on both sides; returns the plain side's seed modules."""
    u = env.unwrapped
    seeds = []
    plain_layers = [m for m in plain.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for layer, plain_layer in list(zip(u.layers, plain_layers))[:count]:
        blueprint = u.generator.propose(layer.out_shape, "residual_mlp", u.task.param_budget)
        kernel, meta = load_or_compile(blueprint, layer.out_shape, u.store, u.cache)
        layer.graft(0, kernel, "residual_mlp", meta.sha256)
        eager = BLUEPRINTS["residual_mlp"](
            **{k: v for k, v in meta.blueprint.items() if k != "name"}
        )
        eager = eager.build(layer.out_shape)
        eager.load_state_dict(kernel.named_state())
        seeds.append(eager)
        parent, name = next(
            (parent, name)
            for parent in plain.modules()
            for name, child in parent.named_children()
            if child is plain_layer
        )
        setattr(parent, name, Grown(plain_layer, eager))
    return seeds


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


def episode(env, seed: int, seeds: int = 0) -> tuple[float, float, float]:
    """(env seconds, plain seconds, reset seconds) of one interleaved episode."""
    u = env.unwrapped
    start = time.perf_counter()
    env.reset(seed=seed)
    reset_s = time.perf_counter() - start
    model = plain_copy(u.model)
    host_params = list(model.parameters())
    seed_modules = graft_seeds(env, model, seeds) if seeds else []
    groups = [{"params": host_params}] + [
        {"params": list(m.parameters()), "lr": u.task.seed_config().lr, "weight_decay": 0.0}
        for m in seed_modules
    ]
    optimizer = make_optimizer(u.task, groups)
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
    parser.add_argument("--seeds", type=int, default=0, help="grafted seeds per episode")
    parser.add_argument(
        "--report", default=None, help="also write the output here (results/bench_env_overhead.txt)"
    )
    args = parser.parse_args()
    with report(args.report):
        run_bench(args)


def run_bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    env_id = next(i for i, (t, _) in esper_gym.ENV_IDS.items() if t == args.task)
    kw = {"max_epochs": args.max_epochs} if args.max_epochs else {}
    with tempfile.TemporaryDirectory() as kernel_dir:
        env = gym.make(env_id, kernel_dir=kernel_dir, **kw)
        episode(env, 0, args.seeds)  # warm-up: dataset load, first allocations, compiles
        runs = [episode(env, seed, args.seeds) for seed in range(1, args.episodes + 1)]
    u = env.unwrapped
    t_env, t_plain = sum(r[0] for r in runs), sum(r[1] for r in runs)
    steps = u.episode_steps * len(runs)
    per_episode = ", ".join(f"{e / p:.3f}" for e, p, _ in runs)
    print(
        f"{args.task}: {len(runs)} episodes x {u.episode_steps} env steps x "
        f"{u.task.decision_interval} optimizer steps, {args.seeds} live seeds\n"
        f"  plain loop  {t_plain / len(runs):.3f} s/episode\n"
        f"  env         {t_env / len(runs):.3f} s/episode ({steps / t_env:.0f} env steps/s)\n"
        f"  env reset   {sum(r[2] for r in runs) / len(runs):.3f} s/episode (not in the ratio)\n"
        f"  ratio env/plain: {t_env / t_plain:.3f} (per episode: {per_episode})"
    )


if __name__ == "__main__":
    main()
