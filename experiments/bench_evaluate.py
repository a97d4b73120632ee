"""evaluate's wall time with the local process pool and with Ray tasks, side by side.

Runs one `python -m esper_gym.evaluate` command with `executor=local` and with `executor=ray`
(alternated, repeated, so load from other processes hits both alike), times each whole command
and checks that both wrote the same summary.csv, less its wall times (the jobs' results do not depend on where they
ran). The default command is the baselines command of docs/benchmark.md:

    python experiments/bench_evaluate.py --repeats 1 --report results/bench_evaluate.txt
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from report import report  # experiments/report.py: --report writes the output

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASELINES = ["agents=[schedule,heuristic,noop]", "tasks=[spirals]", "contexts=test", "seeds=5"]


def run(args: list[str], out: pathlib.Path) -> tuple[float, str]:
    """(seconds, summary.csv) of one whole evaluate command."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "esper_gym.evaluate", *args, f"out_dir={out}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, timeless((out / "summary.csv").read_text())


def timeless(csv_text: str) -> str:
    """summary.csv less its wall-time columns (seconds differ from run to run)."""
    rows = [line.split(",") for line in csv_text.strip().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if not name.startswith("wall_s")]
    return "\n".join(",".join(row[i] for i in keep) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("args", nargs="*", default=BASELINES, help="evaluate's overrides")
    parser.add_argument("--report", default=None, help="also write the output here")
    args = parser.parse_args()
    with report(args.report):
        run_bench(args)


def run_bench(args: argparse.Namespace) -> None:
    print(f"python -m esper_gym.evaluate {' '.join(args.args)} n_jobs={args.n_jobs} executor=...")
    times: dict[str, list[float]] = {"local": [], "ray": []}
    summaries: dict[str, set[str]] = {"local": set(), "ray": set()}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for executor in times:
                out = pathlib.Path(tmp) / f"{executor}{i}"
                extra = [f"executor={executor}", f"n_jobs={args.n_jobs}"]
                seconds, summary = run([*args.args, *extra], out)
                times[executor].append(seconds)
                summaries[executor].add(summary)
                print(f"executor={executor} run {i}: {seconds:.1f} s", flush=True)
    local, ray = statistics.median(times["local"]), statistics.median(times["ray"])
    print(f"median wall: local {local:.1f} s, ray {ray:.1f} s (ray / local {ray / local:.2f})")
    same = summaries["local"] == summaries["ray"] and len(summaries["local"]) == 1
    print(f"summary.csv (less wall_s) identical across executors and repeats: {same}")


if __name__ == "__main__":
    main()
