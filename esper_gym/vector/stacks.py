"""Tensors stacked across a batch's copies: a host layer's weights, and a group of seeds'.

Each stack holds one leaf tensor per parameter, (copies, ...), which the batched forward reads
and the backward fills with one gradient; each copy's own parameter is a view of its row
(`param.data`), so that anything reading one copy (telemetry, a per-copy check, the culprit
search, a fork) sees its current weights. Adam's state is stacked alike, each row with its own
step count, and steps through `trainer.adam_step`, row by row: what each copy's own fused Adam
computes. (Pickling one copy by itself writes the whole stacked storage its parameters and its
stacked seeds' tensors view; a fork's deep copy clones only its rows of parameters, and copies
a stacked kernel buffer with its whole stack (no shipped blueprint has one). Host and seed Adam
state stay with the batch: a fork of a copy starts its own Adam moments afresh.)
"""

from __future__ import annotations

import torch
from torch import nn


def _own_tensors(kernel: nn.Module, state: dict) -> None:
    """A seed that left a stack gets tensors (and Adam state in `state`) of its own, rather
    than views that keep the old stack's storage alive."""
    for t in kernel.flat_state():
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():  # a row of a stack
            t.data = t.data.clone()
            if t in state:
                state[t] = tuple(s.clone() for s in state[t])


class _SeedStack:
    """The running seeds of one layer, across the copies of a batch, that share a kernel graph,
    with their tensors stacked: one leaf (members, ...) per parameter of the graph (and one
    tensor per buffer), which vmap reads as it is and the backward fills with one gradient
    (instead of a stack of every kernel's tensors each forward, and a gradient per tensor). Each
    kernel's own tensors are views of their rows (`tensor.data`), so that anything reading one
    seed (a per-copy check, the culprit search, a fork) sees its current weights. With its Adam
    state, stacked alike (each member's own step count), and which members ran with gradients
    in this optimizer step: only those are stepped, as torch's Adam skips a parameter without a
    gradient. Built by `_Batch._sync_optimizer` whenever the set of running seeds changes."""

    def __init__(self, kernels: list[nn.Module], lr: float) -> None:
        self.kernels, self.lr = kernels, lr
        self.rows = {kernel: g for g, kernel in enumerate(kernels)}
        self.used = [False] * len(kernels)
        self._lent: list[tuple[int, torch.Tensor]] = []
        self.states: list[torch.Tensor] = []  # the graph's state inputs, stacked, in its order
        self.leaves: list[torch.Tensor] = []  # the trainable ones
        self.params: list[tuple[torch.Tensor, ...]] = []  # params[i][g]: member g's leaf i
        for tensors in zip(*(kernel.flat_state() for kernel in kernels)):
            with torch.no_grad():
                stacked = torch.stack([t.detach() for t in tensors])
            if isinstance(tensors[0], nn.Parameter) and tensors[0].requires_grad:
                stacked.requires_grad_(True)
                self.leaves.append(stacked)
                self.params.append(tensors)
            for g, t in enumerate(tensors):
                t.data = stacked.detach()[g]
                t.grad = None  # one from before the stack (its gradient is the leaf's now)
            self.states.append(stacked)
        self.exp_avgs = [torch.zeros_like(leaf) for leaf in self.leaves]
        self.exp_avg_sqs = [torch.zeros_like(leaf) for leaf in self.leaves]
        self.steps = [
            torch.zeros(len(kernels), dtype=torch.float32, device=leaf.device)
            for leaf in self.leaves
        ]
        self.param_rows = [leaf.detach().unbind(0) for leaf in self.leaves]
        self.exp_avg_rows = [m.unbind(0) for m in self.exp_avgs]
        self.exp_avg_sq_rows = [v.unbind(0) for v in self.exp_avg_sqs]
        self.step_rows = [step.unbind(0) for step in self.steps]

    def select(self, rows: list[int]) -> list[torch.Tensor]:
        """The stacked tensors of members `rows`, in that order (the leaves themselves when
        that is every member in order)."""
        if rows == list(range(len(self.kernels))):
            return self.states
        index = torch.tensor(rows, device=self.states[0].device)
        return [state.index_select(0, index) for state in self.states]

    def adam_state(self) -> dict[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Each member parameter's (exp_avg, exp_avg_sq, step), as views of this stack's rows."""
        return {
            p: (self.exp_avg_rows[i][g], self.exp_avg_sq_rows[i][g], self.step_rows[i][g])
            for i, params in enumerate(self.params)
            for g, p in enumerate(params)
        }

    @torch.no_grad()
    def load_adam_state(self, state: dict[torch.Tensor, tuple[torch.Tensor, ...]]) -> None:
        """Take each member parameter's Adam state from `state` (from `adam_state` of the stack
        it was in, or the batch's per-parameter state); a new seed starts from zeros."""
        for i, params in enumerate(self.params):
            for g, p in enumerate(params):
                if p in state:
                    m, v, step = state[p]
                    self.exp_avg_rows[i][g].copy_(m)
                    self.exp_avg_sq_rows[i][g].copy_(v)
                    self.step_rows[i][g].copy_(step)

    def adam_rows(self, lists: tuple[list, list, list, list, list]) -> None:
        """Append the members that ran with gradients this step to `lists` (params, grads,
        exp_avgs, exp_avg_sqs, steps: one row each), their step counts already advanced, and
        clear `used` for the next step."""
        used = [g for g, u in enumerate(self.used) if u]
        self.used = [False] * len(self.kernels)
        if not used:
            return
        every = len(used) == len(self.kernels)
        for i, leaf in enumerate(self.leaves):
            if leaf.grad is None:
                continue
            grads = leaf.grad.unbind(0)
            for out, rows in zip(
                lists[:4],
                (self.param_rows[i], grads, self.exp_avg_rows[i], self.exp_avg_sq_rows[i]),
            ):
                out.extend(rows if every else [rows[g] for g in used])
            if every:  # one add on the step vector, not one per row
                self.steps[i].add_(1)
            else:
                torch._foreach_add_([self.step_rows[i][g] for g in used], 1)
            lists[4].extend(self.step_rows[i] if every else [self.step_rows[i][g] for g in used])

    def lend_grads(self) -> None:
        """Give each member parameter its row of the stacked gradient (None for a member that
        did not run, or a parameter without a gradient), for a per-copy check that may clear
        it."""
        self._lent = []
        for leaf, params in zip(self.leaves, self.params):
            for g, p in enumerate(params):
                p.grad = leaf.grad[g] if leaf.grad is not None and self.used[g] else None
                if p.grad is not None:
                    self._lent.append((g, p))

    def take_back_grads(self) -> None:
        """After `lend_grads` and the checks: a member a lent gradient of which was cleared (a
        faulted seed, a skipped copy) is not stepped; the lent gradients are dropped."""
        for g, p in self._lent:
            if p.grad is None:
                self.used[g] = False
        for params in self.params:
            for p in params:
                p.grad = None
        self._lent = []


class _HostStack:
    """One host layer's weights for all the copies of a batch: one leaf tensor (copies, ...)
    per parameter (weight, bias), which the batched forward reads and the backward fills in
    one gradient; each copy's own parameter is a view of its row (`param.data`), so that
    anything reading a copy's module (telemetry, the culprit search, forks) sees its current
    weights. With its Adam state, stacked alike, and each copy's own step count."""

    def __init__(self, params: list[list[nn.Parameter]], old, old_rows, trainers) -> None:
        self.params = list(zip(*params))  # params[j]: copy j's (weight, bias)
        self.tensors, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p, column in enumerate(params):
            with torch.no_grad():
                tensor = torch.stack([param.detach() for param in column])
            m, v = torch.zeros_like(tensor), torch.zeros_like(tensor)
            step = torch.zeros(len(column), dtype=torch.float32, device=tensor.device)
            for j, (param, row, t) in enumerate(zip(column, old_rows, trainers)):
                if row is not None and old is not None:
                    m[j], v[j] = old.exp_avgs[p][row], old.exp_avg_sqs[p][row]
                    step[j] = old.steps_of[p][row]
                elif param in t.optimizer.state:  # a copy's own trainer stepped it before
                    state = t.optimizer.state[param]
                    m[j], v[j], step[j] = state["exp_avg"], state["exp_avg_sq"], state["step"]
            tensor.requires_grad_(True)
            for j, param in enumerate(column):
                param.data = tensor.detach()[j]
            self.tensors.append(tensor)
            exp_avgs.append(m)
            exp_avg_sqs.append(v)
            steps.append(step)
        self.exp_avgs, self.exp_avg_sqs, self.steps_of = exp_avgs, exp_avg_sqs, steps
        self.param_rows = [tensor.detach().unbind(0) for tensor in self.tensors]
        self.exp_avg_rows = [m.unbind(0) for m in exp_avgs]
        self.exp_avg_sq_rows = [v.unbind(0) for v in exp_avg_sqs]
        self.step_rows = [step.unbind(0) for step in steps]
