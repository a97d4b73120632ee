"""Scale-out: env steps/s of Tamiyo's training with rollouts on Ray actors against one process.

1. Side by side (alternated, repeated, so load from other processes hits both alike): whole
   `python -m esper_gym.train` commands on spirals with `env.runners=2 env.num_envs=16` and
   `env.runners=0 env.num_envs=32` (the same 32 copies, the same episodes). Env steps/s of the
   whole command (startup included) and of training alone (the median of charts/steps_per_s
   over its updates, from train_metrics.csv).
2. Where an update's time goes with K = 1, 2, 4, 8 actors of `--per-actor` copies each: the
   medians over updates of timing/{rollout_s (the slowest actor's own), update_s (learner: GAE
   and PPO epochs), broadcast_s (ray.put of the weights), transfer_s (waiting for the rollouts
   beyond the slowest actor's own time: scheduling, serialisation, copies)}.
3. A K-core machine projected from those parts (`projection`): where the learner becomes the
   bottleneck.

The load average (1 min) before each run goes in the table: on a machine shared with other
work, actors compete with it for cores, so K actors are only K times faster where K cores are
free. Writes results/bench_scale.md (with the command that made it) unless --no-write:

    python experiments/bench_scale.py --repeats 2 --steps 2048 --rollout-steps 32
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = [
    "task=spirals",
    "agent=tamiyo",
    "env.vectorization=batched",
    "eval.episodes=0",
    "logger=none",
    "threads=1",
    "agent.ppo.teacher=null",  # PPO from the first step: no imitation warm start in the learner
]
TIMING = ("timing/rollout_s", "timing/update_s", "timing/broadcast_s", "timing/transfer_s")


def run(args: list[str], out: pathlib.Path) -> dict:
    """One whole training command: env steps, seconds, load average before, per-update medians."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "esper_gym.train", *COMMON, *args, f"hydra.run.dir={out}"]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    steps = int(json.loads((out / "results.json").read_text())["global_step"])
    with open(out / "train_metrics.csv") as f:
        rows = list(csv.DictReader(f))

    def median(key: str) -> float:
        values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        return statistics.median(values) if values else float("nan")

    return {
        "steps": steps,
        "seconds": seconds,
        "load": load,
        "train_sps": median("charts/steps_per_s"),
        **{k: median(k) for k in TIMING},
    }


def projection(parts: dict[int, dict], per_actor: int, rollout_steps: int) -> list[str]:
    """A K-core machine, projected from the parts: each actor on its own core takes what one
    actor alone took here (K=1's rollout: no time-sharing), the learner's update, broadcast and
    transfer are what K actors' batches took here (the actors are idle during the update, so
    it ran uncontended). Env steps/s = K * copies * steps / (rollout + update + broadcast +
    transfer). The learner is the bottleneck once its update outlasts a rollout."""
    rollout = parts[1]["timing/rollout_s"]
    lines = [
        "",
        "#### 3. Projected on a K-core machine (one actor per core)",
        "",
        f"Rollout per update: {rollout:.2f} s (K=1 above, one actor alone on a core). Update, "
        "broadcast and transfer: as measured at each K (the update runs while the actors wait).",
        "",
        "| K | env steps per update | projected env steps/s | update ÷ rollout |",
        "|---|---|---|---|",
    ]
    for k, r in sorted(parts.items()):
        serial = r["timing/update_s"] + r["timing/broadcast_s"] + r["timing/transfer_s"]
        steps = k * per_actor * rollout_steps
        share = r["timing/update_s"] / rollout
        lines.append(f"| {k} | {steps} | {steps / (rollout + serial):.0f} | {share:.2f} |")
    k_max = max(parts)
    per_sample = parts[k_max]["timing/update_s"] / (k_max * per_actor * rollout_steps)
    k_learner = rollout / (per_sample * per_actor * rollout_steps)
    lines += [
        "",
        f"The update costs {1e3 * per_sample:.3f} ms per env step (K={k_max}), so it outlasts "
        f"a rollout from K ≈ {k_learner:.0f} actors of {per_actor} copies: past that the "
        "learner is the bottleneck, and env steps/s approach "
        f"{1 / per_sample:.0f} (the update alone) however many actors run.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4096, help="agent.ppo.total_steps")
    parser.add_argument("--rollout-steps", type=int, default=64)
    parser.add_argument("--per-actor", type=int, default=8, help="env.num_envs in part 2")
    parser.add_argument("--actors", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    budget = [
        f"agent.ppo.total_steps={args.steps}",
        f"agent.ppo.rollout_steps={args.rollout_steps}",
    ]
    arms = {
        "runners=0 num_envs=32": ["env.runners=0", "env.num_envs=32"],
        "runners=2 num_envs=16": ["env.runners=2", "env.num_envs=16"],
    }
    lines = [
        "**Scale-out on Ray: env steps/s (experiments/bench_scale.py)**",
        "",
        "```",
        f"python experiments/bench_scale.py {' '.join(sys.argv[1:])}".rstrip(),
        "```",
        "",
        f"Machine: {os.cpu_count()} cores, shared with other work (load average per run below). "
        f"Common: `{' '.join(COMMON + budget)}`.",
        "",
        "#### 1. Side by side (alternated)",
        "",
        "| arm | repeat | env steps | wall s | env steps/s (command) | env steps/s (training) "
        "| load avg (1 min) |",
        "|---|---|---|---|---|---|---|",
    ]
    results: dict[str, list[dict]] = {k: [] for k in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, arm in arms.items():
                r = run([*arm, *budget], pathlib.Path(tmp) / f"arm{list(arms).index(name)}_{i}")
                results[name].append(r)
                line = (
                    f"| {name} | {i} | {r['steps']} | {r['seconds']:.1f} | "
                    f"{r['steps'] / r['seconds']:.1f} | {r['train_sps']:.1f} | {r['load']:.2f} |"
                )
                print(line, flush=True)
                lines.append(line)
        lines += ["", "Medians over repeats:", ""]
        medians = {}
        for name, rs in results.items():
            cmd = statistics.median(r["steps"] / r["seconds"] for r in rs)
            train = medians[name] = statistics.median(r["train_sps"] for r in rs)
            lines.append(f"- {name}: {cmd:.1f} env steps/s (command), {train:.1f} (training)")
        one, two = medians.values()
        lines.append(f"- training, runners=2 / runners=0: {two / one:.2f}x (ratio of the medians)")
        lines += [
            "",
            f"#### 2. Per-part times, K actors of {args.per_actor} copies each (medians over "
            "updates, seconds per update)",
            "",
            "| K | copies | env steps/s (training) | actor rollout | learner update | broadcast "
            "| transfer | load avg (1 min) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        parts: dict[int, dict] = {}
        for k in args.actors:
            n = k * args.per_actor
            steps = max(args.steps, 2 * n * args.rollout_steps)  # at least two updates
            arm = [
                f"env.runners={k}",
                f"env.num_envs={args.per_actor}",
                f"agent.ppo.total_steps={steps}",
                f"agent.ppo.rollout_steps={args.rollout_steps}",
            ]
            r = run(arm, pathlib.Path(tmp) / f"k{k}")
            parts[k] = r
            line = (
                f"| {k} | {n} | {r['train_sps']:.1f} | {r['timing/rollout_s']:.2f} | "
                f"{r['timing/update_s']:.2f} | {r['timing/broadcast_s']:.4f} | "
                f"{r['timing/transfer_s']:.2f} | {r['load']:.2f} |"
            )
            print(line, flush=True)
            lines.append(line)
    if 1 in parts:
        lines += projection(parts, args.per_actor, args.rollout_steps)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        out = ROOT / "results" / "bench_scale.md"
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
