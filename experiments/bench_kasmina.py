"""Execution-layer benchmark, every figure measured side by side in one run.

1. Training-step time of the shipped hosts (the registered tasks' own host, host_kwargs and
   batch size) with dormant KasminaLayers / the same plain hosts. Plain and wrapped steps
   alternate in short blocks and the ratio is the median over blocks, so drift of a noisy
   machine hits both sides alike. Goal: <= 1.02.
2. Kernel cache hit latency (goal < 50 us), and what a germination costs on a hit.
3. Compile time and artifact load time (validation + torch.export.load) per template.

    python experiments/bench_kasmina.py [--blocks 20] [--steps 200] [--out results/bench_kasmina]

writes every figure to <out>.json and the printed report to <out>.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import torch
from torch.nn import functional as F

from esper_gym.hosts import build_host, plain_copy
from esper_gym.kasmina import SeedConfig, kasmina_layers
from esper_gym.kernels import (
    BLUEPRINTS,
    DEFAULT_LIBRARY,
    BlueprintGenerator,
    KernelCache,
    KernelStore,
    KernelTemplate,
    compile_blueprint,
    load_artifact,
    load_or_compile,
)
from esper_gym.tasks import TASKS

# Input shape and classes of each dataset (the data itself is not needed to time a step).
DATASET_SHAPES = {"spirals": ((2,), 5), "fashion_mnist": ((1, 28, 28), 10)}
SHIPPED = ("spirals", "fashion_mnist", "fashion_mnist_cnn")  # the hosts the README's rows name
REPORT: list[str] = []  # the printed lines, also written to <out>.txt


def say(line: str = "") -> None:
    print(line)
    REPORT.append(line)


def step_time(model, opt, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def describe(model) -> str:
    """The host as the README names it: layer widths (MLP) or conv channels (CNN)."""
    layers = [layer.host for layer in kasmina_layers(model)]
    convs = [m.out_channels for m in layers if isinstance(m, torch.nn.Conv2d)]
    if convs:
        return "cnn conv" + "-".join(map(str, convs)) + f" + linear {layers[-1].in_features}"
    widths = [layers[0].in_features] + [m.out_features for m in layers]
    return "mlp " + "-".join(map(str, widths))


def overhead(task_name: str, blocks: int, steps: int) -> dict:
    task = TASKS[task_name]
    input_shape, classes = DATASET_SHAPES[task.dataset]
    batch = task.batch_size
    torch.manual_seed(0)
    wrapped = build_host(
        task.host_builder(), input_shape, classes, 2, SeedConfig(), **dict(task.host_kwargs)
    )
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
    row = {
        "task": task_name,
        "host": describe(wrapped),
        "params": sum(p.numel() for p in plain.parameters()),
        "batch": batch,
        "blocks": blocks,
        "steps_per_block": steps,
        "plain_us": statistics.median(t_plain) * 1e6,
        "dormant_kasmina_us": statistics.median(t_wrapped) * 1e6,
        "ratio_median": statistics.median(ratios),
        "ratio_iqr": [_q(ratios, 0.25), _q(ratios, 0.75)],
    }
    say(
        f"{task_name + ' ' + row['host']:<44} plain {row['plain_us']:8.1f} us  "
        f"dormant-kasmina {row['dormant_kasmina_us']:8.1f} us  ratio {row['ratio_median']:.4f} "
        f"(IQR {row['ratio_iqr'][0]:.4f}-{row['ratio_iqr'][1]:.4f})"
    )
    return row


def _q(values, q):
    v = sorted(values)
    return v[min(int(q * len(v)), len(v) - 1)]


def kernels(store_dir: str) -> dict:
    store = KernelStore(store_dir)
    cache = KernelCache(store)
    generator = BlueprintGenerator(DEFAULT_LIBRARY)
    shapes = {"linear": (32,), "conv": (8, 14, 14)}
    say()
    say(
        f"{'template':<22}{'shape':<14}{'params':>8}{'compile ms':>12}{'load ms':>10}"
        f"{'instantiate ms':>16}{'bytes':>9}"
    )
    templates = []
    for name in DEFAULT_LIBRARY:
        for kind, shape in shapes.items():
            if kind not in BLUEPRINTS[name].host_kinds:
                continue
            blueprint = generator.propose(shape, name, 20_000)
            t0 = time.perf_counter()
            artifact, meta = compile_blueprint(blueprint, shape)
            compile_ms = (time.perf_counter() - t0) * 1e3
            loads = []
            for _ in range(5):  # validate, torch.export.load, template (graph + dry run on shapes)
                t0 = time.perf_counter()
                template = KernelTemplate.from_program(load_artifact(artifact, meta, shape))
                loads.append((time.perf_counter() - t0) * 1e3)
            insts = []
            for _ in range(20):  # what a germination does once the template is in memory
                t0 = time.perf_counter()
                template.instantiate(artifact, meta)
                insts.append((time.perf_counter() - t0) * 1e3)
            inst_ms = statistics.median(insts)
            store.put(artifact, meta)
            load_ms = statistics.median(loads)
            templates.append(
                {
                    "template": name,
                    "shape": list(shape),
                    "params": meta.param_count,
                    "compile_ms": compile_ms,
                    "load_ms": load_ms,
                    "instantiate_ms": inst_ms,
                    "bytes": len(artifact),
                }
            )
            say(
                f"{name:<22}{shape!s:<14}{meta.param_count:>8}{compile_ms:>12.1f}"
                f"{load_ms:>10.2f}{inst_ms:>16.2f}{len(artifact):>9}"
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
    result = {
        "templates": templates,
        "cache_hit_us": {"median": statistics.median(hits) * 1e6, "p95": _q(hits, 0.95) * 1e6},
        "germination_on_hit_ms": statistics.median(germs) * 1e3,
    }
    say()
    say(
        f"cache hit latency: median {result['cache_hit_us']['median']:.1f} us, "
        f"p95 {result['cache_hit_us']['p95']:.1f} us (goal < 50 us)"
    )
    say(
        f"germination on a store+cache hit (lookup, validate nothing new, own copy): "
        f"median {result['germination_on_hit_ms']:.2f} ms"
    )
    say(f"cache stats: {cache.stats}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="results/bench_kasmina", help="<out>.json, <out>.txt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]  # a busy machine widens the IQRs: say how busy it was
    say(
        f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs, load average "
        f"{load_before:.2f}, {args.blocks} blocks x {args.steps} steps (CNN: fewer, see each row)"
    )
    say()
    hosts = []
    for name in SHIPPED:
        cnn = TASKS[name].host == "cnn"  # a CNN step costs ~20x an MLP's: fewer, so it ends
        blocks = max(args.blocks // 3, 4) if cnn else args.blocks
        steps = max(args.steps // 5, 5) if cnn else args.steps
        hosts.append(overhead(name, blocks, steps))
    with tempfile.TemporaryDirectory() as tmp:
        figures = kernels(tmp)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = [load_before, os.getloadavg()[0]]
    say(f"load average (1 min) at start and end: {load[0]:.2f}, {load[1]:.2f}")
    meta = {"torch": torch.__version__, "threads": 1, "cpus": os.cpu_count(), "loadavg": load}
    out.with_suffix(".json").write_text(json.dumps({**meta, "hosts": hosts, **figures}, indent=2))
    out.with_suffix(".txt").write_text("\n".join(REPORT) + "\n")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
