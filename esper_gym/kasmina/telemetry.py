"""Health signals: what a layer reports about itself after an interval of training.

Statistics come from one recorded pass per interval (the trainer turns `record` on for one
batch), so telemetry costs one forward's worth of reductions per interval, not per batch.
"""

from __future__ import annotations

import math
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
    # Effective rank of the layer's output on the recorded batch / its width (`effective_rank`).
    eff_rank: float = 0.0
    # Root-mean-square over the recorded batch of each sample's loss gradient with respect to the
    # layer's output (its "gradient mass": what a seed reading and adding to that output is fed).
    out_grad: float = 0.0


# Each function takes one activation (B, ...) or, with copies=True, a stack of copies' activations
# (copies, B, ...) (the batched simulator records all its copies of a layer in one call) and
# returns one copy's value, or one per copy stacked. The stacked forms keep their own reduction
# shapes: a copy's value may differ from its single env's in the last bits.


@torch.no_grad()
def activation_stats(h: torch.Tensor, copies: bool = False) -> torch.Tensor:
    """[mean, var, dead_ratio] of an activation (B, D) or (B, C, H, W), as one tensor (3,);
    (copies, 3) for a stack.

    A unit is a feature (linear) or a channel (conv); it is dead when no sample and no position
    of the batch makes it positive. Kept as a tensor so that no device sync happens here.
    """
    h = h.detach().float()
    if not copies:
        units = h.transpose(0, 1).reshape(h.shape[1], -1)
        dead = (units.amax(dim=1) <= 0).float().mean()
        return torch.stack([h.mean(), h.var(unbiased=False), dead])
    n, units = h.shape[0], h.shape[2]
    dead = (h.transpose(1, 2).reshape(n, units, -1).amax(dim=2) <= 0).float().mean(1)
    flat = h.flatten(1)
    return torch.stack([flat.mean(1), flat.var(1, unbiased=False), dead], 1)


@torch.no_grad()
def effective_rank(h: torch.Tensor, copies: bool = False) -> torch.Tensor:
    """Effective rank of an activation (B, D) or (B, C, H, W) divided by its width (D or C): a
    0-dim tensor in (0, 1]; 0 for an all-zero activation or one with NaN/Inf entries; (copies,)
    for a stack.

    The effective rank (Roy & Vetterli 2007) of the matrix whose columns are the units and whose
    rows are the samples (and positions, for a conv) is exp(entropy of its singular values
    normalised to sum to 1): 1 when one direction carries all the energy, the width when every
    unit direction carries the same. Uncentred, like NORTH* (Maile et al. 2022), which reads the
    same quantity as "how much of its width a layer uses". A Linear layer's output has rank at
    most fan_in + 1 and the number of rows, so a narrow input bounds the ratio below 1.

    The singular values are the square roots of the eigenvalues of the units x units Gram
    matrix: one contraction however many conv positions, in float64 (in float32 the rounding
    of the Gram matrix alone adds ~0.5% of spurious rank). The activation is first divided by
    its largest magnitude (the measure is scale-free), so the squares cannot overflow; a
    non-finite activation (a diverging host) gives a zero Gram matrix, not an exception. No
    device sync here. A stack takes one batched Gram product and eigvalsh (each copy's value
    agrees with its own to ~1e-16).
    """
    lead = h.shape[:1] if copies else ()  # the copies dimension, if any
    units = h.shape[len(lead) + 1]
    m = h.detach().reshape(*lead, h.shape[len(lead)], units, -1).double()
    if copies:
        m = m / m.abs().flatten(1).amax(1).clamp_min(1e-300).view(-1, 1, 1, 1)
        gram = torch.einsum("nbcp,nbdp->ncd", m, m)
    else:
        m = m / m.abs().amax().clamp_min(1e-300)
        gram = torch.einsum("bcp,bdp->cd", m, m)
    gram = torch.nan_to_num(gram, nan=0.0, posinf=0.0, neginf=0.0)
    s = torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt()
    total = s.sum(-1)
    entropy = torch.special.entr(s / total.clamp_min(1e-300)[..., None]).sum(-1)  # -p log p
    return torch.where(total > 0, entropy.exp() / units, torch.zeros_like(total)).float()


def recorded_stats(out: torch.Tensor, copies: bool = False) -> torch.Tensor:
    """What a recorded forward keeps of its output: [mean, var, dead_ratio, eff_rank], (4,) or
    (copies, 4)."""
    if copies:
        return torch.cat([activation_stats(out, True), effective_rank(out, True)[:, None]], 1)
    return torch.cat([activation_stats(out), effective_rank(out)[None]])


@torch.no_grad()
def grad_norm(grads: list[torch.Tensor], copies: bool = False) -> torch.Tensor:
    """The norm of a layer's host gradients (a norm of the per-tensor norms; no sync); with
    copies=True, `grads` are stacked (copies, ...) and there is one per copy, (copies,)."""
    if not copies:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    rows = [row for g in grads for row in g.unbind(0)]
    norms = torch.stack(torch._foreach_norm(rows)).view(len(grads), -1)
    return torch.linalg.vector_norm(norms.t().contiguous(), dim=1)


@torch.no_grad()
def weight_norm(weight, copies: bool = False) -> float | list[float]:
    """The norm of a host weight (one sync); with copies=True, `weight` is the copies' rows (a
    sequence) and there is one per copy, in one call."""
    if not copies:
        return float(torch.linalg.vector_norm(weight))
    return torch.stack(torch._foreach_norm(weight)).tolist()


@torch.no_grad()
def out_grad_norm(g: torch.Tensor, copies: bool = False) -> torch.Tensor:
    """The RMS per-sample norm of a batch-mean loss's gradient g = dL/d(out) (B, ...): row i is
    sample i's gradient / B, so it is sqrt(B) * ||g||; (copies,) for a stack, in which g[j] is
    copy j's own gradient (the loss is the sum of the copies' batch means). No sync here."""
    if copies:
        norms = torch.linalg.vector_norm(g.detach().float().flatten(1), dim=1)
        return norms * math.sqrt(g.shape[1])
    return torch.linalg.vector_norm(g.detach().float()) * math.sqrt(g.shape[0])


def seed_latency_ms(layers) -> dict[str, float]:
    """Each running seed's kernel time on the last recorded batch, by "layer.slot"."""
    from esper_gym.kasmina.lifecycle import RUNNING

    return {
        f"{layer.name}.{slot.index}": slot.latency_ms
        for layer in layers
        for slot in layer.slots
        if slot.state in RUNNING
    }


def latency_ratio(layers) -> float:
    """Running seeds' kernel time / the host layers' own time, on the recorded batch."""
    seeds = sum(seed_latency_ms(layers).values())
    if seeds == 0.0:
        return 0.0
    host = sum(layer.latency_s * 1e3 for layer in layers) - seeds
    return seeds / host if host > 0 else 0.0
