"""Decision latency of Tamiyo on CPU: one observation -> one action, graph conversion included.

    python experiments/bench_tamiyo_latency.py [--decisions 1000] [--checkpoint run.pt]

Observations are real ones from `Esper/Spirals-v0` (a random agent plays, so seeds are in every
state). Reports median and p95 of `TamiyoPolicy.act` against the 5 ms goal, and the same
split into conversion (`obs_to_batch`, and `esper_gym.observation.to_pyg` for reference) and
the network's forward pass.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch
from report import report  # experiments/report.py: --report writes the output

import esper_gym  # noqa: F401  (registers the ids)
from esper_gym.agents.baselines import RandomAgent
from esper_gym.agents.tamiyo import TamiyoPolicy, load_checkpoint, obs_to_batch
from esper_gym.observation import to_pyg

GOAL_MS = 5.0


def collect_observations(env_id: str, n: int, seed: int = 0) -> list[dict]:
    env = gym.make(env_id)
    agent = RandomAgent(seed=seed)
    observations = []
    obs, _ = env.reset(seed=seed)
    while len(observations) < n:
        observations.append(obs)
        obs, _, terminated, truncated, _ = env.step(agent.act(obs))
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return observations


def time_ms(fn, observations: list[dict], decisions: int) -> np.ndarray:
    for obs in observations[:20]:  # warm-up
        fn(obs)
    times = np.empty(decisions)
    for i in range(decisions):
        obs = observations[i % len(observations)]
        start = time.perf_counter()
        fn(obs)
        times[i] = (time.perf_counter() - start) * 1e3
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Esper/Spirals-v0")
    parser.add_argument("--decisions", type=int, default=1000)
    parser.add_argument("--checkpoint", default=None, help="a train() checkpoint (default: fresh)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--report",
        default=None,
        help="also write the output here (results/bench_tamiyo_latency.txt)",
    )
    args = parser.parse_args()
    with report(args.report):
        run_bench(args)


def run_bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)

    observations = collect_observations(args.env, 100)
    if args.checkpoint:
        policy = load_checkpoint(args.checkpoint).policy
    else:
        space = gym.make(args.env).observation_space
        policy = TamiyoPolicy.for_space(space)  # the defaults: hidden 64, 3 layers
    policy.eval()

    @torch.inference_mode()
    def forward(batch):
        return policy(batch)

    batches = [obs_to_batch(o) for o in observations]
    rows = {
        "act (obs -> action, total)": time_ms(policy.act, observations, args.decisions),
        "  obs_to_batch": time_ms(obs_to_batch, observations, args.decisions),
        "  forward": time_ms(forward, batches, args.decisions),
        "  (to_pyg, for reference)": time_ms(to_pyg, observations, args.decisions),
    }
    params = sum(p.numel() for p in policy.parameters())
    print(
        f"Tamiyo decision latency on {args.env}: {args.decisions} decisions, "
        f"{torch.get_num_threads()} thread(s), {params} parameters, "
        f"{int(observations[0]['node_mask'].sum())} nodes, "
        f"{observations[0]['action_mask'].shape[0]} actions"
    )
    print(f"{'':28s} {'median ms':>10s} {'p95 ms':>10s}")
    for name, t in rows.items():
        print(f"{name:28s} {np.median(t):10.3f} {np.percentile(t, 95):10.3f}")
    act = rows["act (obs -> action, total)"]
    verdict = "meets" if np.percentile(act, 95) < GOAL_MS else "misses"
    print(f"goal {GOAL_MS} ms per decision: p95 {np.percentile(act, 95):.2f} ms {verdict} it")


if __name__ == "__main__":
    main()
