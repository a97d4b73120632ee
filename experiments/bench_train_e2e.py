"""End to end: env steps/s of Tamiyo's training on spirals, this checkout vs an older one.

Runs `python -m esper_gym.train ... eval.episodes=0 logger=none` in both checkouts, alternating
(old, new, old, new, ...) so that load from other processes hits both alike, and times each
whole command (startup included: the older checkout does not report its training time alone).
Prints env steps/s per run and the ratio of the medians. Issue 9's criterion: the batched simulator at
N=32 against commit cc0398b's defaults (2,048 steps, 2 sync envs), goal >= 6x:

    git worktree add /tmp/esper-cc0398b cc0398b
    python experiments/bench_train_e2e.py --old /tmp/esper-cc0398b --repeats 2

The old checkout runs with this interpreter (the same torch and libraries) and its own code
first on the path.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from report import report  # experiments/report.py: --report writes the output

ROOT = pathlib.Path(__file__).resolve().parents[1]
OLD_ARGS = ["agent.ppo.total_steps=2048"]
NEW_ARGS = [
    "agent.ppo.total_steps=8192",
    "env.vectorization=batched",
    "env.num_envs=32",
]
COMMON = ["eval.episodes=0", "logger=none", "threads=1"]


def run(checkout: pathlib.Path, args: list[str], out: pathlib.Path) -> tuple[int, float]:
    """(env steps, seconds) of one whole training command in `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "esper_gym.train", *args, *COMMON, f"hydra.run.dir={out}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {checkout}:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    return int(results["global_step"]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", type=pathlib.Path, required=True, help="the older checkout")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--old-args", nargs="*", default=OLD_ARGS)
    parser.add_argument("--new-args", nargs="*", default=NEW_ARGS)
    parser.add_argument(
        "--report", default=None, help="also write the output here (results/bench_train_e2e.txt)"
    )
    args = parser.parse_args()
    with report(args.report):
        run_bench(args)


def run_bench(args: argparse.Namespace) -> None:
    rates: dict[str, list[float]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for side, checkout, extra in (
                ("old", args.old.resolve(), args.old_args),
                ("new", ROOT, args.new_args),
            ):
                steps, seconds = run(checkout, extra, pathlib.Path(tmp) / f"{side}{i}")
                rates[side].append(steps / seconds)
                print(
                    f"{side} run {i}: {steps} env steps in {seconds:.1f} s = {steps / seconds:.0f}/s"
                )
    old, new = statistics.median(rates["old"]), statistics.median(rates["new"])
    print(f"old ({args.old}: {' '.join(args.old_args)}): {old:.0f} env steps/s (median)")
    print(f"new ({' '.join(args.new_args)}): {new:.0f} env steps/s (median)")
    print(f"ratio new/old: {new / old:.2f}")


if __name__ == "__main__":
    main()
