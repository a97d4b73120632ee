"""Health signals: what a layer reports about itself after an interval of training.

Statistics come from one recorded pass per interval (the trainer turns `record` on for one
batch), so telemetry costs one forward's worth of reductions per interval, not per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SlotSignal:
    state: int  # SeedState value
    alpha: float
    age: int  # optimizer steps since germination
    faults: int
    contribution: float  # val accuracy with the seed on minus with it off (0 until measured)
    params: int
    blueprint: str = ""


@dataclass
class HealthSignal:
    layer: str
    kind: str  # "linear" | "conv"
    fan_in: int
    fan_out: int
    act_mean: float
    act_var: float
    dead_ratio: float  # share of units that were <= 0 for every sample of the recorded batch
    grad_norm: float
    weight_norm: float
    latency_ms: float  # forward time of the layer (host + running seeds) on the recorded batch
    params: int  # host + kernel parameters
    slots: list[SlotSignal] = field(default_factory=list)


@torch.no_grad()
def activation_stats(h: torch.Tensor) -> torch.Tensor:
    """[mean, var, dead_ratio] of an activation (B, D) or (B, C, H, W), as one tensor.

    A unit is a feature (linear) or a channel (conv); it is dead when no sample and no position
    of the batch makes it positive. Kept as a tensor so that no device sync happens here.
    """
    h = h.detach().float()
    units = h.transpose(0, 1).reshape(h.shape[1], -1)
    dead = (units.amax(dim=1) <= 0).float().mean()
    return torch.stack([h.mean(), h.var(unbiased=False), dead])
