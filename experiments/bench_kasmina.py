"""Execution-layer benchmark, every figure measured side by side in one run.

1. Training-step time of hosts whose layers are dormant KasminaLayers / the same plain hosts.
   Plain and wrapped steps alternate in short blocks and the ratio is the median over blocks,
   so drift of a noisy machine hits both sides alike. Goal: <= 1.02.
2. Kernel cache hit latency (goal < 50 us), and what a germination costs on a hit.
3. Compile time and artifact load time (validation + torch.export.load) per template.

    python experiments/bench_kasmina.py [--blocks 20] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.nn import functional as F

from esper_gym.hosts import build_host, plain_copy
from esper_gym.kasmina import SeedConfig
from esper_gym.kernels import (
    BLUEPRINTS,
    DEFAULT_LIBRARY,
    BlueprintGenerator,
    KernelCache,
    KernelStore,
    compile_blueprint,
    instantiate,
    load_artifact,
    load_or_compile,
)


def step_time(model, opt, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def overhead(name, host, kwargs, input_shape, classes, batch, blocks, steps) -> None:
    torch.manual_seed(0)
    wrapped = build_host(host, input_shape, classes, 2, SeedConfig(), **kwargs)
    plain = plain_copy(wrapped)
    x, y = torch.randn(batch, *input_shape), torch.randint(0, classes, (batch,))
    opts = {m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for m in (wrapped, plain)}
    for m in (wrapped, plain):  # warm-up
        step_time(m, opts[m], x, y, steps)
    ratios, t_plain, t_wrapped = [], [], []
    for b in range(blocks):
        order = (plain, wrapped) if b % 2 == 0 else (wrapped, plain)
        times = {m: step_time(m, opts[m], x, y, steps) for m in order}
        ratios.append(times[wrapped] / times[plain])
        t_plain.append(times[plain])
        t_wrapped.append(times[wrapped])
    print(
        f"{name:<24} plain {statistics.median(t_plain) * 1e6:8.1f} us  "
        f"dormant-kasmina {statistics.median(t_wrapped) * 1e6:8.1f} us  "
        f"ratio {statistics.median(ratios):.4f} (IQR {_q(ratios, 0.25):.4f}-{_q(ratios, 0.75):.4f})"
    )


def _q(values, q):
    v = sorted(values)
    return v[min(int(q * len(v)), len(v) - 1)]


def kernels(store_dir: str) -> None:
    store = KernelStore(store_dir)
    cache = KernelCache(store)
    generator = BlueprintGenerator(DEFAULT_LIBRARY)
    shapes = {"linear": (32,), "conv": (8, 14, 14)}
    print(
        f"\n{'template':<22}{'shape':<14}{'params':>8}{'compile ms':>12}{'load ms':>10}"
        f"{'instantiate ms':>16}{'bytes':>9}"
    )
    for name in DEFAULT_LIBRARY:
        for kind, shape in shapes.items():
            if kind not in BLUEPRINTS[name].host_kinds:
                continue
            blueprint = generator.propose(shape, name, 20_000)
            t0 = time.perf_counter()
            artifact, meta = compile_blueprint(blueprint, shape)
            compile_ms = (time.perf_counter() - t0) * 1e3
            loads = []
            for _ in range(5):
                t0 = time.perf_counter()
                program = load_artifact(artifact, meta, expected_shape=shape)
                loads.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            instantiate(program)
            inst_ms = (time.perf_counter() - t0) * 1e3
            store.put(artifact, meta)
            print(
                f"{name:<22}{shape!s:<14}{meta.param_count:>8}{compile_ms:>12.1f}"
                f"{statistics.median(loads):>10.2f}{inst_ms:>16.2f}{len(artifact):>9}"
            )

    # Cache hits: the lookup a germination does once the program is loaded.
    blueprint = generator.propose((32,), "residual_mlp", 20_000)
    _, meta = load_or_compile(blueprint, (32,), store, cache)
    cache.get(meta.sha256, expected_shape=(32,))
    hits = []
    for _ in range(2000):
        t0 = time.perf_counter()
        cache.get(meta.sha256, expected_shape=(32,))
        hits.append(time.perf_counter() - t0)
    germs = []
    for _ in range(50):
        t0 = time.perf_counter()
        load_or_compile(blueprint, (32,), store, cache)
        germs.append(time.perf_counter() - t0)
    print(
        f"\ncache hit latency: median {statistics.median(hits) * 1e6:.1f} us, "
        f"p95 {_q(hits, 0.95) * 1e6:.1f} us (goal < 50 us)"
    )
    print(
        f"germination on a store+cache hit (lookup, validate nothing new, own copy): "
        f"median {statistics.median(germs) * 1e3:.2f} ms"
    )
    print(f"cache stats: {cache.stats}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {args.blocks} blocks x {args.steps} steps\n")
    overhead(
        "spirals mlp 2-16-16-5", "mlp", {"hidden": (16, 16)}, (2,), 5, 128, args.blocks, args.steps
    )
    overhead(
        "fmnist mlp 784-32-32-10",
        "mlp",
        {"hidden": (32, 32)},
        (1, 28, 28),
        10,
        128,
        args.blocks,
        args.steps,
    )
    overhead(
        "fmnist cnn 4-8",
        "cnn",
        {"channels": (4, 8)},
        (1, 28, 28),
        10,
        128,
        max(args.blocks // 3, 4),
        max(args.steps // 5, 5),
    )
    with tempfile.TemporaryDirectory() as tmp:
        kernels(tmp)


if __name__ == "__main__":
    main()
