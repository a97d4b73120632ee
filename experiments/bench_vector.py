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

`--policies uniform` is the best case for the batched env: every copy germinates residual_mlp in
slot 0 of the first two layers and advances both to FOSSILIZED, so that each layer's seeds form
one group of N. On spirals it also times `Floor`, the same copies' arithmetic written by hand as
stacked tensors (host and seeds by `baddbmm`, the same optimizer steps, evaluation and
contribution passes, one fused Adam over whole leaves; no lifecycle, masks, faults, telemetry,
observation or reward): a lower bound on the time of any simulator of those copies, and
`floor÷sync` the most any of them could gain over the single envs on this machine.

The committed run, with the command that made it: results/bench_vector.txt

    python experiments/bench_vector.py --ns 8 32 --steps 12 --warmup 3 --chunk 4 \
        --policies wait grow uniform --report results/bench_vector.txt

Stacks and stacked programs pay where groups are large (one blueprint in one slot across
copies, as a trained policy plays: `uniform`), less under random growth, whose live seeds fall
mostly in groups of 1-3.

What bounds it. The floor is about 6x the single envs (`floor÷sync`): the seeds' own
arithmetic (residual_mlp's GELU and its backward, the batched matmuls, the evaluation on 1,024
samples) is what a single env also pays, and no batching removes it, so
spirals' 8x at N=32 with live seeds is out of reach on one CPU thread. The batched env runs at
about 0.6 of the floor: its Adam step goes row by row so that each copy's update is bit-for-bit
its single env's (one fused call per whole leaf was ~9x cheaper in a microbenchmark, but takes
one step count per leaf and differs in the last bits for sizes off the vector width), plus the
fault checks, lifecycle and telemetry per optimizer step, and vmap for the graphs that are not
stacked programs. Under random growth, groups below VMAP_MIN run one direct call per copy (vmap
gains nothing under 4), and a contribution pass per seed index forwards every copy. Without
seeds, the per-copy step (mask, observation, reward, infos: ~0.13 ms per copy) and the stacked
matmuls. fashion_mnist is bound by arithmetic: the host matmuls and the batch gathers (128 x 784
floats per copy per optimizer step) cost the same stacked or not (its first layer, forward and
backward: 4.7 ms stacked vs 6.6 ms as 32 separate linears).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch
from report import report  # experiments/report.py: --report writes the output
from torch.nn import functional as F

import esper_gym
from esper_gym.actions import ADVANCE, GERMINATE, Action, ActionLayout
from esper_gym.kernels import load_or_compile

WEIGHTS = {"wait": 0.3, "germinate": 0.3, "advance": 0.35, "cull": 0.05}
UNIFORM_BLUEPRINT = "residual_mlp"  # what the uniform policy grows (and Floor computes)
TASK_IDS = {task: env_id for env_id, (task, _) in esper_gym.ENV_IDS.items()}


def uniform_action(mask: np.ndarray, layout: ActionLayout, blueprint: int) -> int:
    """Germinate `blueprint` in slot 0 of layers 0 and 1, then advance each seed as far as it
    goes (to FOSSILIZED): every copy holds the same two seeds, the best case for grouping."""
    for layer in (0, 1):
        for action in (Action(GERMINATE, layer, 0, blueprint), Action(ADVANCE, layer, 0)):
            a = layout.encode(action)
            if mask[a]:
                return a
    return 0


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
        self.blueprints = single.task.blueprints
        self.rng = np.random.default_rng(seed)
        self.obs, _ = self.envs.reset(seed=seed)
        self.seconds, self.steps, self.live = 0.0, 0, []

    def run(self, steps: int, timed: bool = True) -> None:
        for _ in range(steps):
            masks = self.obs["action_mask"].astype(bool)
            if self.policy == "wait":
                actions = np.zeros(len(masks), dtype=np.int64)
            elif self.policy == "uniform":
                b = self.blueprints.index(UNIFORM_BLUEPRINT)
                actions = np.array([uniform_action(m, self.layout, b) for m in masks])
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


class Floor:
    """The arithmetic of a spirals env step under the uniform policy, written by hand as
    stacked tensors for N copies: the host (2-16-16-5 MLP) and one residual_mlp seed (16-64-16,
    GELU) blended at alpha 1 after each of the first two layers, `decision_interval` Adam steps
    on batches of `batch_size`, the evaluation on `eval_size` samples and one contribution pass
    per seed on `contribution_size`. No lifecycle, masks, faults, telemetry, observation or
    reward: a lower bound on what any simulator of those copies can take on this machine."""

    def __init__(self, env_id: str, n: int, kernel_dir: str, seed: int) -> None:
        env = gym.make(env_id, kernel_dir=kernel_dir).unwrapped
        env.reset(seed=seed)
        task, trainer = env.task, env.trainer
        self.task, self.n = task, n
        self.x, self.y = trainer.x_train, trainer.y_train
        self.x_val, self.y_val = trainer.x_val, trainer.y_val
        g = torch.Generator().manual_seed(seed)

        def leaf(*shape, scale=0.1):
            return (torch.randn(n, *shape, generator=g) * scale).requires_grad_(True)

        sizes = [(layer.host.in_features, layer.host.out_features) for layer in env.layers]
        self.host = [(leaf(o, i), leaf(o)) for i, o in sizes]
        self.seeds = [(leaf(64, o), leaf(64), leaf(o, 64), leaf(o)) for _, o in sizes[:2]]
        self.groups = [
            ([t for pair in self.host for t in pair], task.lr),
            ([t for seed in self.seeds for t in seed], task.seed_lr),
        ]
        self.state = {
            t: (torch.zeros_like(t), torch.zeros_like(t), torch.zeros(()))
            for params, _ in self.groups
            for t in params
        }
        self.rng = torch.Generator().manual_seed(seed)
        env.close()
        self.seconds, self.steps, self.live = 0.0, 0, [2.0]

    def forward(self, x: torch.Tensor, off: int | None = None) -> torch.Tensor:
        for k, (w, b) in enumerate(self.host):
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            if k < 2 and k != off:
                w1, b1, w2, b2 = self.seeds[k]
                hidden = F.gelu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
                x = x + torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))
            if k < 2:
                x = torch.relu(x)
        return x

    def step(self) -> None:
        task = self.task
        for _ in range(task.decision_interval):
            index = torch.randint(len(self.x), (self.n, task.batch_size), generator=self.rng)
            logits = self.forward(self.x[index])
            loss = F.cross_entropy(logits.transpose(1, 2), self.y[index], reduction="none")
            for params, _ in self.groups:
                for t in params:
                    t.grad = None
            loss.mean(1).sum().backward()
            with torch.no_grad():
                for params, lr in self.groups:
                    states = [self.state[t] for t in params]
                    steps = [s[2] for s in states]
                    torch._foreach_add_(steps, 1)
                    torch._fused_adam_(
                        params, [t.grad for t in params], [s[0] for s in states],
                        [s[1] for s in states], [], steps, amsgrad=False, lr=lr, beta1=0.9,
                        beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False,
                        grad_scale=None, found_inf=None,
                    )  # fmt: skip
        with torch.no_grad():
            x = self.x_val.expand(self.n, *self.x_val.shape)
            hits = (self.forward(x).argmax(2) == self.y_val).float().mean(1)
            m = task.contribution_size
            for k in range(2):
                (self.forward(x[:, :m], off=k).argmax(2) == self.y_val[:m]).float().mean(1)
            hits.tolist()

    def run(self, steps: int, timed: bool = True) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            if timed:
                self.seconds += time.perf_counter() - start
                self.steps += 1

    def rate(self) -> float:
        return self.n * self.steps / self.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["spirals", "fashion_mnist"])
    parser.add_argument("--ns", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument(
        "--policies", nargs="+", default=["wait", "grow"], choices=["wait", "grow", "uniform"]
    )
    parser.add_argument("--steps", type=int, default=30, help="timed vector steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed vector steps first")
    parser.add_argument("--chunk", type=int, default=5, help="steps per side per turn")
    parser.add_argument(
        "--report", default=None, help="also write the output here (results/bench_vector.txt)"
    )
    args = parser.parse_args()
    with report(args.report):
        run_bench(args)


def run_bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    print(
        f"{'task':<14}{'policy':<8}{'N':>4}{'batched/s':>11}{'sync/s':>9}{'speed-up':>10}"
        f"{'live':>6}{'floor/s':>9}{'floor÷sync':>12}"
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
                    if policy == "uniform" and task == "spirals":
                        sides.append(Floor(env_id, n, kernel_dir, seed=0))
                    for side in sides:
                        side.run(args.warmup, timed=False)
                    while sides[0].steps < args.steps:
                        for side in sides:
                            side.run(min(args.chunk, args.steps - side.steps))
                    batched, sync = sides[:2]
                    floor = (
                        f"{sides[2].rate():>9.1f}{sides[2].rate() / sync.rate():>11.2f}x"
                        if len(sides) == 3
                        else f"{'-':>9}{'-':>12}"
                    )
                    print(
                        f"{task:<14}{policy:<8}{n:>4}{batched.rate():>11.1f}{sync.rate():>9.1f}"
                        f"{batched.rate() / sync.rate():>9.2f}x{np.mean(batched.live):>6.2f}"
                        + floor,
                        flush=True,
                    )
                    for side in sides[:2]:
                        side.envs.close()


if __name__ == "__main__":
    main()
