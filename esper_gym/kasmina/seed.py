"""The seed forward rule and the TRAINING fit, for one seed or a stack of copies' seeds.

What a running seed adds to its layer's host output h (KasminaLayer's docstring says why):

    TRAINING           Fit(k(h.detach()))    value exactly 0; its backward fits k to the residual
    BLENDING and on    alpha * k(h)
    overridden         alpha * k(h.detach()) (contribution passes: `seed_override`)

KasminaLayer applies it to one seed at a time, h of shape (B, ...); the batched simulator to a
stack of the copies' seeds of one layer in one mode, (copies, B, ...). Both call these
functions, so the rule has one home; where the two forms must round differently (a stack's
per-copy fit losses), the function keeps each form's own ops.
"""

from __future__ import annotations

import torch

from esper_gym.kasmina.lifecycle import SeedState


def seed_mode(slot, grad_enabled: bool) -> tuple[float, bool, bool] | None:
    """How a running seed acts in this forward: (alpha, training, reads the detached h), or None
    when it adds nothing (a TRAINING seed adds exactly 0 without a backward; alpha 0)."""
    if slot.state == SeedState.TRAINING and slot.alpha_override is None:
        return (1.0, True, True) if grad_enabled else None
    if slot.alpha_override is None:
        return (slot.alpha, False, False) if slot.alpha != 0.0 else None
    # Measuring a contribution only reads the model: the host's gradients stay untouched.
    return (slot.alpha_override, False, True) if slot.alpha_override != 0.0 else None


def seed_delta(s: torch.Tensor, alpha, training: bool, fit_step: float, fit_loss):
    """(term, weight): the seed adds `weight * term` to h, for its kernel output `s`.

    One seed: s (B, ...), `alpha` a float, `fit_loss` its slot's list; the caller adds with
    `torch.add(h, term, alpha=weight)` (one op). A stack of copies' seeds in one mode: s
    (copies, B, ...), `alpha` and `fit_loss` one per copy (lists); each copy's alpha is applied
    here (multiplied, then the caller adds), and weight is 1.
    """
    stacked = isinstance(alpha, (list, tuple))
    if training:
        return Fit.apply(s, fit_step, fit_loss, stacked), 1.0
    if not stacked:
        return s, alpha
    if all(a == 1.0 for a in alpha):
        return s, 1.0
    alphas = torch.tensor(alpha, dtype=s.dtype, device=s.device)
    return s * alphas.view((len(alpha),) + (1,) * (s.dim() - 1)), 1.0


class Fit(torch.autograd.Function):
    """Value 0; backward gives the kernel output s the gradient of
    (1/B) * sum_i 0.5 * ||s_i - r_i||^2 with r_i = -eta * B * g_i, i.e. s/B + eta * g.

    `stacked`: s is (copies, B, ...), each copy's own seed; each gets the gradient of its own fit
    loss, and `sink` is one list per copy."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, eta: float, sink: list, stacked: bool = False):
        ctx.save_for_backward(s)
        ctx.eta, ctx.sink, ctx.stacked = eta, sink, stacked
        return torch.zeros_like(s)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (s,) = ctx.saved_tensors
        batch = s.shape[1] if ctx.stacked else s.shape[0]
        residual = s + ctx.eta * batch * g
        # The fit loss, kept as a tensor (no sync) for telemetry and tests.
        if ctx.stacked:
            losses = 0.5 * residual.detach().pow(2).flatten(1).sum(1) / batch
            for sink, loss in zip(ctx.sink, losses):
                sink[:] = [loss]
        else:
            ctx.sink[:] = [0.5 * residual.detach().pow(2).sum() / batch]
        return residual / batch, None, None, None
