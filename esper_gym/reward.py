"""Reward: a weighted sum of named components, every one reported in `info["reward_components"]`.

| component       | per step                                              | default weight |
|-----------------|-------------------------------------------------------|----------------|
| accuracy        | + w * (val_acc_t - val_acc_{t-1})  (accuracy in 0..1) | 10.0           |
| param_cost      | - w * log2(1 + kernel params / host params) / T       | 0.05           |
| latency_cost    | - w * log2(1 + kernel MACs / host MACs) / T  (or measured time, below) | 0.05 |
| stability       | - w * loss spikes in the interval                     | 0.05           |
| fault           | - w * kernel faults in the interval                   | 0.2            |
| invalid_action  | - w * (the action was masked, so it ran as WAIT)      | 0.1            |
| intervention    | - w * (the action was not WAIT)                       | 0.01           |
| divergence      | - w * (the host's loss became NaN/Inf; ends episode)  | 5.0            |

T is the number of steps of the episode, so a cost weight is the price of one doubling of the
host (ratio 1) carried for the whole episode, on every task whatever its length. The rent is
logarithmic in size because accuracy grows roughly with the log of model size: an 18x growth of
a tiny host costs 4.2 doublings, not 18. With accuracy weighted 10 (a point is 0.1), the
defaults price a doubling of parameters and compute held all episode at one accuracy point
(half for each). A linear rent made WAIT out-earn growth that bought 14 points on spirals.

Why it cannot be farmed: the accuracy term telescopes, so over an episode it sums to
w * (final - initial accuracy) whatever path led there; costs are rents paid every step for what
is present, so parking a seed that does nothing only costs; and a seed in TRAINING does not
change the host's output, so a germinate -> cull cycle leaves accuracy exactly where WAIT would
and pays the intervention cost on every action. Tests in tests/test_reward.py try each exploit.

`RewardComputer(weights, latency="measured")` prices latency on measured wall-clock time
instead: log2(1 + kernel time / host time), both timed on the interval's recorded batch
(`StepOutcome.latency_ratio`). It charges what kernels really cost on this machine (a kernel
with few MACs but many small ops is slow), at the price of reproducibility: the same seed and
actions no longer give bit-identical rewards.

Any object with the same call signature can replace `RewardComputer`: the env takes
`reward_fn`, Hydra `reward.computer._target_=mylab.MyReward` (called with `weights=` when its
constructor takes a `weights` argument).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RewardWeights:
    accuracy: float = 10.0
    param_cost: float = 0.05
    latency_cost: float = 0.05
    stability: float = 0.05
    fault: float = 0.2
    invalid_action: float = 0.1
    intervention: float = 0.01
    divergence: float = 5.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"reward weight {name}={value!r} must be a number")
            # NaN would pass `< 0` and turn every reward into NaN; inf makes inf - inf = NaN.
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"reward weight {name}={value} must be a finite number >= 0 (costs are "
                    "subtracted already)"
                )


@dataclass(frozen=True)
class StepOutcome:
    """What happened in one env step, as the reward sees it."""

    val_acc_before: float
    val_acc: float
    param_ratio: float  # kernel params present / host params
    macs_ratio: float  # kernel MACs present / host MACs
    loss_spikes: int
    faults: int
    invalid_action: bool
    intervened: bool
    diverged: bool
    episode_steps: int = 1
    # measured kernel time / host layers' time on the interval's recorded batch (wall clock)
    latency_ratio: float = 0.0


LATENCY_SOURCES = ("macs", "measured")


def resolve_weights(*layers: Mapping[str, float] | None) -> RewardWeights:
    """The weights in force: RewardWeights' defaults, then each layer's values in turn (a
    task's own preference, then what the caller or the config set; None values and None
    layers keep the layer below)."""
    values = asdict(RewardWeights())
    for layer in layers:
        values |= {k: v for k, v in dict(layer or {}).items() if v is not None}
    return RewardWeights(**values)


class RewardComputer:
    """The weighted sum of the module docstring. `latency`: what latency_cost prices, "macs"
    (counted multiply-adds: reproducible) or "measured" (wall-clock kernel time)."""

    def __init__(self, weights: RewardWeights | dict | None = None, latency: str = "macs") -> None:
        if isinstance(weights, dict):
            weights = RewardWeights(**weights)
        self.weights = weights or RewardWeights()
        if latency not in LATENCY_SOURCES:
            raise ValueError(f"reward latency={latency!r}; allowed: {', '.join(LATENCY_SOURCES)}")
        self.latency = latency

    def __call__(self, outcome: StepOutcome) -> tuple[float, dict[str, float]]:
        w, o = self.weights, outcome
        gain = 0.0 if o.diverged else o.val_acc - o.val_acc_before
        per_step = 1.0 / max(o.episode_steps, 1)
        latency = o.latency_ratio if self.latency == "measured" else o.macs_ratio
        # A wall-clock ratio can be NaN/inf on a clock glitch: never let it poison the return.
        latency = latency if math.isfinite(latency) and latency > 0 else 0.0
        components = {
            "accuracy": w.accuracy * gain,
            "param_cost": -w.param_cost * math.log2(1.0 + o.param_ratio) * per_step,
            "latency_cost": -w.latency_cost * math.log2(1.0 + latency) * per_step,
            "stability": -w.stability * o.loss_spikes,
            "fault": -w.fault * o.faults,
            "invalid_action": -w.invalid_action * float(o.invalid_action),
            "intervention": -w.intervention * float(o.intervened),
            "divergence": -w.divergence * float(o.diverged),
        }
        return float(sum(components.values())), components
