"""One episode with any policy, and the metrics every report (train, evaluate, baselines) uses."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym

from esper_gym.actions import WAIT, Action

WAIT_NAME = Action(WAIT).describe()  # what info["action"] says for a WAIT
# Episode totals the env's info carries (the last info's are the episode's).
TELEMETRY = ("cache_hit_rate", "cache_hits", "kernel_loads", "kernel_compiles")


def play_episode(
    env: gym.Env,
    act: Callable[[dict], int],
    seed: int | None = None,
    options: dict | None = None,
) -> tuple[dict[str, Any], list[dict]]:
    """Play one episode with `act(obs) -> action` from `env.reset(seed=seed, options=options)`;
    return (metrics, lifecycle events).

    Metrics: return, length, final val/test accuracy, params (host + kernels), host_params,
    params_added, faults, invalid actions, interventions (valid non-WAIT actions), diverged,
    wall_s, n_layers, layers (names joined by ";"), seed_slots, decision_interval, budget_steps,
    `telemetry/<name>` (cache_hit_rate, cache_hits, kernel_loads, kernel_compiles over the
    episode; seed_latency_ms: mean measured kernel time per running seed and step, NaN if no
    seed ran: machine- and store-dependent, like wall_s), outcomes_recorded (seed outcomes
    written to the store) and `reward/<component>` summed over the episode; `contexts` (the
    env's split, or "fixed"), `context_index` (-1 without contexts) and `context`
    (info["context"] as JSON); and the decision metrics of `decision_metrics`. Events: every
    `info["events"]` dict of
    the episode, in order.
    """
    start = time.perf_counter()
    obs, info = env.reset(seed=seed, options=options)
    context = info.get("context")
    events = list(info["events"])
    total, steps, invalid, faults, interventions = 0.0, 0, 0, 0, 0
    components: dict[str, float] = {}
    latencies: list[float] = []
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(act(obs))
        total += reward
        steps += 1
        invalid += int(info["invalid_action"])
        faults += info["faults"]
        interventions += int(info["action"] != WAIT_NAME and not info["invalid_action"])
        events += info["events"]
        latencies += env.unwrapped.telemetry_stats()["seed_latency_ms"].values()
        for key, value in info["reward_components"].items():
            components[key] = components.get(key, 0.0) + value
        done = terminated or truncated
    u = env.unwrapped
    telemetry = u.telemetry_stats()
    metrics = {
        "val_acc": info["val_acc"],
        "test_acc": info.get("test_acc", math.nan),
        "params": info["params"],
        "host_params": u.host_params,
        "params_added": info["params_added"],
        "return": total,
        "length": steps,
        "faults": faults,
        "invalid_actions": invalid,
        "interventions": interventions,
        "diverged": bool(info["diverged"]),
        "wall_s": time.perf_counter() - start,
        "n_layers": len(u.layers),
        "layers": ";".join(layer.name for layer in u.layers),
        "seed_slots": u.task.seed_slots,
        "decision_interval": u.task.decision_interval,
        "budget_steps": u.budget,
        **{f"telemetry/{k}": telemetry[k] for k in TELEMETRY},
        "telemetry/seed_latency_ms": sum(latencies) / len(latencies) if latencies else math.nan,
        "outcomes_recorded": info["outcomes_recorded"],
        "contexts": context["split"] if context else "fixed",
        "context_index": context["index"] if context else -1,
        "context": json.dumps(context, sort_keys=True) if context else "",
        **decision_metrics(info.get("seeds", [])),
        **{f"reward/{k}": v for k, v in components.items()},
    }
    return metrics, events


def useful(seed: dict) -> bool:
    """A germination that paid: its seed ended FOSSILIZED with a positive measured contribution."""
    return seed["outcome"] == "FOSSILIZED" and seed["contribution"] > 0


def false_positive(seed: dict) -> bool:
    """A germination that cost parameters and did not pay: culled, or ended contributing <= 0."""
    return seed["params"] > 0 and (seed["outcome"] == "CULLED" or seed["contribution"] <= 0)


def decision_metrics(seeds: list[dict]) -> dict[str, Any]:
    """What an episode's germinations came to, from the env's final `info["seeds"]`.

    `germinations`, `useful_seeds` (`useful`), `false_positives` (`false_positive`), their
    shares `decision_quality` and `false_positive_rate` (NaN without germinations),
    `first_useful_progress` (training progress 0..1 at which the first useful seed was
    germinated; NaN if none) and `plan`: the growth plan as "step:layer:blueprint" joined by
    ";" (what reactivity compares across contexts).
    """
    n = len(seeds)
    good = [s for s in seeds if useful(s)]
    bad = sum(false_positive(s) for s in seeds)
    return {
        "germinations": n,
        "useful_seeds": len(good),
        "false_positives": bad,
        "decision_quality": len(good) / n if n else math.nan,
        "false_positive_rate": bad / n if n else math.nan,
        "first_useful_progress": min((s["progress"] for s in good), default=math.nan),
        "plan": ";".join(f"{s['step']}:{s['layer']}:{s['blueprint']}" for s in seeds),
    }
