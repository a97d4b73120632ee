"""Is vmap's per-call overhead what bounds the batched simulator's seed kernels? (issue 9)

For a group of n copies of one blueprint's validated kernel graph on a spirals layer, times
forward + backward over a batch of 128, side by side in one run, three ways:
`torch.func.vmap` of the graph (what esper_gym.vector runs), the same vmap traced once with
`make_fx` (no functorch work per call), and one direct call per copy. The last column is
vmap / make_fx: how much a per-shape traced batched graph would save.

    python experiments/bench_vmap_trace.py
"""

from __future__ import annotations

import tempfile
import time

import gymnasium as gym
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import esper_gym  # noqa: F401  (registers the ids)
from esper_gym.kernels import load_or_compile


def timed(fn, states, x, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn(states(), x).sum().backward()
    return (time.perf_counter() - start) / reps * 1e6


def group_times(kernels: list, shape: tuple) -> tuple[float, float, float]:
    """(vmap, make_fx-traced vmap, direct calls) microseconds for one group's forward+backward."""
    graph = kernels[0].graph
    x = torch.randn(len(kernels), 128, *shape, requires_grad=True)

    def states():
        return [torch.stack(t) for t in zip(*(k.flat_state() for k in kernels))]

    vmapped = torch.func.vmap(lambda state, xi: graph.forward(*state, xi)[0])
    traced = make_fx(vmapped)([s.detach() for s in states()], x.detach())

    def direct(_states, xs):
        return torch.stack([k(xs[i]) for i, k in enumerate(kernels)])

    for _ in range(2):  # the second round is the one returned (warm)
        times = tuple(timed(f, states, x, 300) for f in (vmapped, traced, direct))
    return times


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as kernel_dir:
        env = gym.make("Esper/Spirals-v0", kernel_dir=kernel_dir).unwrapped
        env.reset(seed=0)
        layer = env.layers[1]
        print(
            f"{'blueprint':<16}{'n':>3}{'vmap us':>9}{'make_fx us':>11}{'direct us':>10}{'ratio':>7}"
        )
        for name in ("residual_mlp", "low_rank", "norm", "squeeze_excite"):
            if not env.generator.fits(layer.out_shape, name, env.task.param_budget):
                continue
            blueprint = env.generator.propose(layer.out_shape, name, env.task.param_budget)
            for n in (4, 8, 16):
                kernels = [
                    load_or_compile(blueprint, layer.out_shape, env.store, env.cache)[0]
                    for _ in range(n)
                ]
                a, b, c = group_times(kernels, layer.out_shape)
                print(f"{name:<16}{n:>3}{a:>9.0f}{b:>11.0f}{c:>10.0f}{a / b:>7.2f}")
        env.close()


if __name__ == "__main__":
    main()
