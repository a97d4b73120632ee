"""Running return statistics for the critic (`PPOConfig.norm_returns`), PopArt style: the value
head predicts normalised returns and is rescaled whenever the statistics move."""

from __future__ import annotations

import torch

from esper_gym.agents.tamiyo.policy import TamiyoPolicy


@torch.no_grad()
def update_return_stats(policy: TamiyoPolicy, x: torch.Tensor) -> None:
    """Running mean/var of returns (parallel Welford), kept as buffers so they checkpoint.

    The value head's last layer is rescaled with them (PopArt's "preserving outputs"): the
    value in return units, `head * std + mean`, is the same before and after, so the values
    stored during the rollout stay comparable to the new predictions (else the first update's
    clipped value loss sees every sample shifted and has no gradient)."""
    old_mean, old_std = policy.ret_mean.clone(), (policy.ret_var + 1e-8).sqrt()
    _welford(policy, x)
    new_std = (policy.ret_var + 1e-8).sqrt()
    last = policy.value_head[-1]
    last.weight.mul_(old_std / new_std)
    last.bias.mul_(old_std).add_(old_mean - policy.ret_mean).div_(new_std)


@torch.no_grad()
def _welford(policy: TamiyoPolicy, x: torch.Tensor) -> None:
    count, mean, var = policy.ret_count, policy.ret_mean, policy.ret_var
    b_count, b_mean, b_var = x.numel(), x.mean(), x.var(unbiased=False)
    if count == 0:
        policy.ret_mean.copy_(b_mean)
        policy.ret_var.copy_(b_var.clamp_min(1e-4))
        policy.ret_count.fill_(b_count)
        return
    total = count + b_count
    delta = b_mean - mean
    policy.ret_mean.copy_(mean + delta * b_count / total)
    m2 = var * count + b_var * b_count + delta**2 * count * b_count / total
    policy.ret_var.copy_((m2 / total).clamp_min(1e-4))
