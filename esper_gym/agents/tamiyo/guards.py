"""Failure modes PPO slides into without an error (`GuardConfig` says which and how long), checked
after every update: `check_guards` stops a collapsing run with `TrainingCollapse`."""

from __future__ import annotations

import math

from esper_gym.agents.tamiyo.config import GuardConfig


class TrainingCollapse(RuntimeError):
    """A guard of `GuardConfig` fired: the run stopped rather than train a degenerate policy."""


# (name, metric, config field, fires when, what to try)
GUARDS = (
    (
        "WAIT collapse",
        "diagnostics/wait_share",
        "wait_share_max",
        lambda value, threshold: value > threshold,
        "the policy waits although growth is valid; raise ent_coef, lower wait_bias, or check "
        "that growth can pay under the reward weights",
    ),
    (
        "entropy collapse",
        "diagnostics/entropy",
        "entropy_min",
        lambda value, threshold: value < threshold,
        "the policy stopped exploring; raise ent_coef or set ent_floor, or lower lr",
    ),
    (
        "critic failure",
        "losses/explained_variance",
        "explained_variance_min",
        lambda value, threshold: value <= threshold,
        "the value function explains none of the returns; check norm_returns, lower gamma or "
        "lr, raise vf_coef",
    ),
)


def check_guards(
    metrics: dict, guards: GuardConfig, history: dict[str, list[float]], global_step: int
) -> None:
    """Append this update's guarded metrics to `history` (metric -> values of the current run of
    bad updates, emptied by a healthy one) and raise `TrainingCollapse` when a guard's run
    reaches `guards.patience`."""
    if not guards.enabled:
        return
    for name, metric, key, bad, advice in GUARDS:
        threshold = getattr(guards, key)
        value = metrics.get(metric, math.nan)
        if threshold is None or not math.isfinite(value) or not bad(value, threshold):
            history[metric] = []
            continue
        history.setdefault(metric, []).append(float(value))
        if len(history[metric]) >= guards.patience:
            recent = ", ".join(f"{v:.3g}" for v in history[metric])
            raise TrainingCollapse(
                f"{name} at global step {global_step}: {metric} was [{recent}] for "
                f"{len(history[metric])} consecutive updates (threshold guards.{key}="
                f"{threshold}). {advice[0].upper()}{advice[1:]}. To train on regardless: "
                f"guards.{key}=null (agent.ppo.guards.{key}=null on the esper_gym.train command "
                "line), or guards.enabled=false for every guard."
            )
