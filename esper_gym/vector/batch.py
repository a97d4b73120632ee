"""The batched trainer: one decision interval of a batch of copies as stacked tensors.

Copies whose hosts have the same architecture, task hyper-parameters and dataset form a batch
(all of them, without contexts). A batch's host must be an `nn.Sequential` of `nn.Flatten`,
parameter-free elementwise activations and KasminaLayers wrapping `nn.Linear` (the MLP hosts:
spirals, fashion_mnist), trained with Adam; any other copy (a CNN host, an SGD task) trains
on its own trainer in the same step: correct, not faster. A batch holds each host layer's
weights for all copies as one stacked leaf tensor per parameter (copies, out, in), which the
forward reads and the backward fills with one gradient; each copy's own parameters are views of
their rows (`param.data`), so that anything that looks at one copy (telemetry, the culprit
search after a poisoned host gradient, contributions, `env.envs[i]`, a fork) sees its real,
current module. The host Adam state is stacked alike, with a step count per copy, and steps in
one `trainer.adam_step` over the copies' rows: what each copy's own fused Adam computes on its
own tensors; a copy whose step is skipped (non-finite gradients) is left out of that call.
Membership changes (a reset gives a copy a new host) restack, carrying the others' state.

Seed kernels: the running seeds of one layer that share a kernel graph (one blueprint and
size: the copies load it through one shared cache), in any slot and mode (TRAINING, fitted to
the pseudo-residual; or blended at the copy's alpha), form a group: with at least `VMAP_MIN`
members its graph runs once for all of them (`programs`), from their stacked tensors when the
group trains together (`stacks._SeedStack`). Smaller groups, the raising fault kernel and a
group output of the wrong shape, dtype or device run one guarded call per copy, exactly as
the single env makes it. Deltas are added per slot index in slot order (one `index_add`
each), by kasmina.seed's rule. Faults stay per copy: recovery's checks run on the group's
stacked output (one sync when every copy is fine) and a fault is recorded for that copy
alone, whose delta is dropped (the rest of its group runs again without it, so that its
kernel gets no backward); a group's wall time is shared out among its copies for the latency
budget. Non-finite gradients are checked with one fused check over all copies (HostTrainer's
`FiniteCheck`); when it fires, each copy runs the single env's own check
(`HostTrainer.check_grads`) on its rows of the stacked gradients, so a copy's skipped step,
quarantined seed or faulted seed gradient is that copy's alone.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from esper_gym.kasmina import KasminaLayer, SeedState
from esper_gym.kasmina.recovery import check_output, guarded_call
from esper_gym.kasmina.seed import seed_delta, seed_mode
from esper_gym.kasmina.telemetry import grad_norm, out_grad_norm, recorded_stats
from esper_gym.trainer import (
    EVAL_CHUNK,
    FiniteCheck,
    IntervalStats,
    adam_step,
    set_contribution,
)
from esper_gym.vector.programs import _NOT_VMAPPABLE, _VMAPPABLE, _vmapped_call
from esper_gym.vector.stacks import _HostStack, _own_tensors, _SeedStack

if TYPE_CHECKING:
    from esper_gym.env import MorphogeneticEnv

# Below this many copies a group runs one call per copy: vmap's fixed cost (~0.1 ms of pytree
# and batching-rule setup) is more than a few small direct calls on a CPU.
VMAP_MIN = 4


class _Batch:
    """Copies with one host architecture, trained as stacked tensors by one fused Adam.

    Host weights and their Adam state are stacked per layer (`_HostStack`, one row per copy,
    each copy's own step count). The seeds' Adam holds the copies' running seeds (one group
    per seed learning rate); its state is keyed by parameter, so it is each copy's own,
    created and dropped as the copy's seeds come and go, exactly as the copy's own trainer
    would."""

    def __init__(self, task) -> None:
        self.task = task
        self.envs: list[MorphogeneticEnv] = []
        self.trainers: list = []
        # The running seeds' Adam: (lr, params) per seed learning rate, and per parameter its
        # (exp_avg, exp_avg_sq, step), as torch.optim.Adam(fused=True) keeps them.
        self._seed_groups: list[tuple[float, list[torch.Tensor]]] = []
        self._seed_state: dict[torch.Tensor, tuple[torch.Tensor, ...]] = {}
        self._opt_key: tuple = ()
        self._live: set[nn.Module] = set()  # the kernels of the running seeds, as last synced
        self._untried: set = set()
        self._stale = False  # a seed was culled since the last `_sync_optimizer`
        self._seed_keys: list[tuple] = []
        # Groups of at least VMAP_MIN running seeds of one layer sharing a kernel graph, their
        # tensors stacked (_SeedStack); stacks[k] maps a graph to its stack for column k.
        self.stacks: dict[int, dict[Any, _SeedStack]] = {}
        self._stack_list: list[_SeedStack] = []  # the same stacks, flat
        self.host: dict[int, _HostStack] = {}  # column index -> that layer's stacked weights
        self._finite = FiniteCheck(torch.device(task.device))  # HostTrainer's gradient check

    def set_members(self, envs: list[MorphogeneticEnv]) -> None:
        self.envs = envs
        trainers = [env.trainer for env in envs]
        # columns[k][j]: module k of copy j's Sequential
        self.columns = list(zip(*(list(env.model) for env in envs)))
        self._column_of = {
            layer: k
            for k, column in enumerate(self.columns)
            for layer in column
            if isinstance(layer, KasminaLayer)
        }
        if len(trainers) != len(self.trainers) or any(
            a is not b for a, b in zip(trainers, self.trainers)
        ):
            self._restack(trainers)
        self.trainers = trainers

    def _restack(self, trainers: list) -> None:
        """Stack the members' host weights into one leaf per (layer, weight or bias), and point
        each copy's own parameters at their rows. Adam state moves along with a copy that was
        a member before (or comes from its own trainer's optimizer: empty after a reset)."""
        old_rows = {t: j for j, t in enumerate(self.trainers)}
        host = {}
        for k, column in enumerate(self.columns):
            if isinstance(column[0], KasminaLayer):
                names = ["weight"] + (["bias"] if column[0].host.bias is not None else [])
                host[k] = _HostStack(
                    [[getattr(layer.host, name) for layer in column] for name in names],
                    self.host.get(k),
                    [old_rows.get(t) for t in trainers],
                    trainers,
                )
        self.host = host
        self._host_params = [t for stack in host.values() for t in stack.tensors]
        self._step_tensors = [step for stack in host.values() for step in stack.steps_of]
        self._adam_lists = [
            [row for stack in host.values() for rows in getattr(stack, name) for row in rows]
            for name in ("param_rows", "exp_avg_rows", "exp_avg_sq_rows", "step_rows")
        ]

    # ----------------------------------------------------------------- training
    def run_interval(self) -> list[IntervalStats]:
        """HostTrainer.run_interval for every copy at once."""
        trainers = self.trainers
        steps = self.task.decision_interval
        first = trainers[0]
        device = first.device
        layers = [layer for t in trainers for layer in t.layers]
        # (steps, copies, batch): each copy's batches, drawn from its own data order
        indices = torch.stack([t.interval_indices(steps) for t in trainers], 1)
        idle = dict.fromkeys(layers, 0)  # optimizer steps a layer had nothing to step
        losses, hits = [], []
        for step in range(steps):
            record = step == steps - 1
            # Before the forward: a stacked seed must run from its stack to get its gradient.
            # Within an interval the running seeds change only by a cull (`_drop_culled`).
            if step == 0 or self._stale or any(g in _VMAPPABLE for g in self._untried):
                self._sync_optimizer()
            x, y = first.x_train[indices[step]].to(device), first.y_train[indices[step]].to(device)
            logits = self.forward(x, record)
            hits.append((logits.detach().argmax(2) == y).sum(1))
            # The batch mean per copy, bit for bit F.cross_entropy(logits_i, y_i) and its
            # gradient; classes on dim 1 (the K-dim form) runs ~7x faster than (N*B, C) rows.
            loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
            for tensor in self._host_params:
                tensor.grad = None
            for _, params in self._seed_groups:
                for p in params:
                    p.grad = None
            for stack in self._stack_list:
                for leaf in stack.leaves:
                    leaf.grad = None
            loss.sum().backward()
            skipped = self._check_grads(loss, x, y)
            if record:
                self._capture_grads(skipped)
            self._drop_culled()
            self._host_step(skipped)
            self._seed_step()
            for layer in layers:
                if layer.busy:
                    layer.step_seeds()
                else:  # step_seeds would only count the step; a layer cannot turn busy now
                    idle[layer] += 1
            losses.append(loss.detach())
        for layer, count in idle.items():
            if count:
                layer.count_idle_steps(count)
        # One transfer: (copies, steps) losses, then each copy's hit count.
        values = torch.cat([torch.stack(losses).float(), torch.stack(hits).sum(0)[None].float()])
        values = values.cpu().t().tolist()
        seen = steps * indices.shape[2]
        return [t.interval_stats(v[:-1], v[-1], seen) for t, v in zip(trainers, values)]

    def _check_grads(self, loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> set[int]:
        """HostTrainer's gradient check for every copy: one reduction and one sync over all
        copies' losses and checked gradients; only when that is not finite, each copy's own
        check (which skips that copy's step, or faults its seeds, by clearing their grads).
        Returns the copies whose step is skipped."""
        grads, coupled = [], False
        for t in self.trainers:
            t.sync_seeds()
            coupled = coupled or any(layer.coupled for layer in t.layers)
            grads += [p.grad for _, _, params in t.seeds for p in params if p.grad is not None]
        seed_stacks = self._stack_list
        grads += [
            leaf.grad for stack in seed_stacks for leaf in stack.leaves if leaf.grad is not None
        ]
        if coupled:  # every copy's host gradients: a superset of the coupled copies' own
            grads += [p.grad for p in self._host_params if p.grad is not None]
        # One fused check (as HostTrainer's) and one sync over every copy's loss and gradients.
        if not self._finite.any_nonfinite([loss.detach(), *grads]):
            return set()
        # Each copy's own check reads (and may clear) its own parameters' gradients: lend it
        # its rows of the stacked gradients (host and seeds); a copy whose host gradients it
        # cleared skips its step, a seed whose gradients it cleared is not stepped.
        for stack in seed_stacks:
            stack.lend_grads()
        stacks = list(self.host.values())
        skipped = set()
        for i, t in enumerate(self.trainers):
            params = [p for stack in stacks for p in stack.params[i]]
            for stack in stacks:
                for p, tensor in zip(stack.params[i], stack.tensors):
                    p.grad = None if tensor.grad is None else tensor.grad[i]
            t.check_grads(loss[i], x[i], y[i])
            if any(p.grad is None for p in params):
                skipped.add(i)
            for p in params:
                p.grad = None
        for stack in seed_stacks:
            stack.take_back_grads()
        return skipped

    def _host_step(self, skipped: set[int]) -> None:
        """The copies' host Adam step: one fused call over every copy's rows, which is what
        each copy's own fused Adam computes on its own tensors (elementwise, with the copy's
        own step count); a skipped copy's rows are left out."""
        params, exp_avgs, exp_avg_sqs, steps = self._adam_lists
        grads = [
            row
            for stack in self.host.values()
            for tensor in stack.tensors
            for row in tensor.grad.unbind(0)
        ]
        if skipped:
            n = len(self.trainers)
            keep = [k for k in range(len(params)) if k % n not in skipped]
            params, grads, exp_avgs, exp_avg_sqs, steps = (
                [rows[k] for k in keep] for rows in (params, grads, exp_avgs, exp_avg_sqs, steps)
            )
            torch._foreach_add_(steps, 1)
        else:
            torch._foreach_add_(self._step_tensors, 1)
        if not params:
            return
        adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, self.task.lr, self.task.weight_decay)

    @torch.no_grad()
    def _capture_grads(self, skipped: set[int]) -> None:
        """KasminaLayer.capture_grad of every copy's layers (not the skipped copies': their
        gradients were cleared), from per-row norms of the stacked gradients."""
        for k, stack in self.host.items():
            if any(tensor.grad is None for tensor in stack.tensors):
                continue
            per_copy = grad_norm([tensor.grad for tensor in stack.tensors], copies=True)
            for j, layer in enumerate(self.columns[k]):
                if j not in skipped:
                    layer.set_grad_norm(per_copy[j])

    def _sync_optimizer(self) -> None:
        """Make the seeds' Adam hold exactly the copies' running seeds, state carried over for
        those that ran before: the seeds of one layer sharing a vmappable kernel graph, at least
        VMAP_MIN of them, in a `_SeedStack` (their tensors stacked); the others one parameter
        at a time (one list per learning rate). The host weights step in `_host_step`."""
        for t in self.trainers:
            t.sync_seeds()
        # Which seeds run, and which of them are TRAINING: a stack's members are in the order
        # the training forward runs them (_seed_deltas), so that it reads the stack as it is.
        key = tuple(
            (t, t.seed_key, tuple(slot.state == SeedState.TRAINING for _, slot, _ in t.seeds))
            for t in self.trainers
        )
        self._stale = False
        self._seed_keys = [t.seed_key for t in self.trainers]
        if key == self._opt_key and not any(g in _VMAPPABLE for g in self._untried):
            return
        self._opt_key = key
        # Every seed parameter's Adam state, wherever it was kept: (exp_avg, exp_avg_sq, step).
        state = dict(self._seed_state)
        for stack in self._stack_list:
            state.update(stack.adam_state())
        groups: dict[tuple, list[tuple[KasminaLayer, nn.Module, list[torch.Tensor]]]] = {}
        order: dict[nn.Module, tuple[bool, int]] = {}
        for t in self.trainers:
            for layer, slot, params in t.seeds:
                kernel = layer.kernels[str(slot.index)]
                order[kernel] = (slot.state != SeedState.TRAINING, slot.index)
                groups.setdefault((self._column_of[layer], kernel.graph), []).append(
                    (layer, kernel, params)
                )
        self.stacks, seeds = {}, {}
        # Graphs not run under vmap yet: their groups are stacked once vmap has run them.
        self._untried = set()
        for (k, graph), members in groups.items():
            known = graph in _VMAPPABLE or graph in _NOT_VMAPPABLE
            if len(members) >= VMAP_MIN and not known:
                self._untried.add(graph)
            if len(members) >= VMAP_MIN and graph in _VMAPPABLE:
                members.sort(key=lambda member: order[member[1]])  # stable: copies in order
                stack = _SeedStack([kernel for _, kernel, _ in members], members[0][0].config.lr)
                stack.load_adam_state(state)
                self.stacks.setdefault(k, {})[graph] = stack
            else:
                for layer, kernel, params in members:
                    seeds.setdefault(layer.config.lr, []).extend(params)
                    _own_tensors(kernel, state)
        self._stack_list = [stack for stacks in self.stacks.values() for stack in stacks.values()]
        self._live = {kernel for members in groups.values() for _, kernel, _ in members}
        self._seed_groups = list(seeds.items())
        self._seed_state = {}
        for _, params in self._seed_groups:
            for p in params:
                self._seed_state[p] = state.get(p) or (
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                    torch.tensor(0.0, dtype=torch.float32, device=p.device),
                )

    def _drop_culled(self) -> None:
        """After the gradient check: a seed culled during this optimizer step (its breaker
        tripped, or it was quarantined) is not stepped, as the single env drops its param group
        before stepping. The stacks are rebuilt before the next forward."""
        # A trainer replaces its `seed_key` tuple only when its running seeds change.
        if all(t.seed_key is key for t, key in zip(self.trainers, self._seed_keys)):
            return
        self._stale = True
        live = {kernel for t in self.trainers for kernel in t.seed_key}
        for kernel in self._live - live:
            for p in kernel.parameters():
                p.grad = None
            for stack in self._stack_list:
                if kernel in stack.rows:
                    stack.used[stack.rows[kernel]] = False

    @torch.no_grad()
    def _seed_step(self) -> None:
        """The seeds' Adam step: what torch.optim.Adam(fused=True) does with these groups (no
        weight decay), without its per-step bookkeeping; a parameter without a gradient (a
        faulted seed's, a skipped copy's, a stacked seed that did not run) keeps its state and
        step count. One fused call per learning rate, over single parameters and stack rows."""
        lists: dict[float, tuple[list, list, list, list, list]] = {}
        for lr, group in self._seed_groups:
            params = [p for p in group if p.grad is not None]
            if params:
                states = [self._seed_state[p] for p in params]
                rows = lists.setdefault(lr, ([], [], [], [], []))
                rows[0].extend(params)
                rows[1].extend(p.grad for p in params)
                rows[2].extend(state[0] for state in states)
                rows[3].extend(state[1] for state in states)
                rows[4].extend(state[2] for state in states)
        for rows in lists.values():  # the single parameters' step counts (stacks do their own)
            torch._foreach_add_(rows[4], 1)
        for stack in self._stack_list:
            stack.adam_rows(lists.setdefault(stack.lr, ([], [], [], [], [])))
        for lr, (params, grads, exp_avgs, exp_avg_sqs, steps) in lists.items():
            if not params:
                continue
            adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, 0.0)

    # --------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, members: list[int]) -> list[tuple[float, float]]:
        """HostTrainer.evaluate() (the validation subset) of copies `members` (indices into
        this batch); keeps each copy's per-sample hits for its contributions."""
        first = self.trainers[members[0]]
        x, y = first.x_val, first.y_val
        m = len(members)
        loss_sum = [0.0] * m
        hits = []
        for start in range(0, len(x), EVAL_CHUNK):
            xb, yb = x[start : start + EVAL_CHUNK], y[start : start + EVAL_CHUNK]
            logits = self.forward(xb.unsqueeze(0).expand(m, *xb.shape), False, members)
            loss = F.cross_entropy(logits.transpose(1, 2), yb.expand(m, -1), reduction="none")
            loss_sum = [a + b for a, b in zip(loss_sum, loss.sum(1).tolist())]
            hits.append(logits.argmax(2) == yb)
        hits = torch.cat(hits, 1)
        counts = hits.sum(1).tolist()
        results = []
        for j, i in enumerate(members):
            self.trainers[i].val_hits = hits[j]
            results.append((int(counts[j]) / len(x), loss_sum[j] / len(x)))
        return results

    @torch.no_grad()
    def measure_contributions(self, members: list[int]) -> None:
        """HostTrainer.measure_contributions of copies `members` (after `evaluate`): pass k
        overrides each copy's k-th running seed (found as the copy's own loop finds it, so a
        seed its breaker culled in an earlier pass is skipped) in one stacked forward."""
        trainers = self.trainers
        first = trainers[members[0]]
        n = first.contribution_samples()
        x, y = first.x_val[:n], first.y_val[:n]
        pending = {j: trainers[j].contribution_passes() for j in members}
        current: dict[int, float] = {}
        while True:
            passes = []  # (copy, layer, slot, whether it is TRAINING)
            for j in members:
                next_pass = next(pending[j], None)
                if next_pass is not None:
                    passes.append((j, *next_pass))
            if not passes:
                return
            for j, *_ in passes:
                if j not in current:
                    current[j] = trainers[j].val_accuracy(n)
            copies = [j for j, *_ in passes]
            with contextlib.ExitStack() as stack:
                for _, layer, slot, training in passes:
                    stack.enter_context(layer.seed_override(slot.index, 1.0 if training else 0.0))
                logits = self.forward(x.unsqueeze(0).expand(len(copies), *x.shape), False, copies)
                hits = (logits.argmax(2) == y).sum(1).tolist()
            for (j, _, slot, training), h in zip(passes, hits):
                set_contribution(slot, int(h) / n, current[j], training)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, record: bool, members: list[int] | None = None):
        """The copies' models on x of shape (copies, B, ...): one stacked pass per layer."""
        columns, rows = self.columns, None
        if members is not None and len(members) < len(self.trainers):
            columns = [[column[i] for i in members] for column in columns]
            rows = torch.tensor(members, device=x.device)
        for k, column in enumerate(columns):
            module = column[0]
            if isinstance(module, KasminaLayer):
                tensors = self.host[k].tensors
                if rows is not None:
                    tensors = [tensor.index_select(0, rows) for tensor in tensors]
                x = _layer_forward(column, x, record, self.stacks.get(k), *tensors)
            elif isinstance(module, nn.Flatten):
                x = x.flatten(2)
            else:
                x = module(x)  # elementwise and parameter-free (see env._batch_key)
        return x


def _layer_forward(
    layers: list[KasminaLayer],
    x: torch.Tensor,
    record: bool,
    stacks: dict[Any, _SeedStack] | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """KasminaLayer.forward of each copy's layer on its slice of x (copies, B, in), with the
    copies' host weights stacked: weight (copies, out, in), bias (copies, out); `stacks`: this
    layer's seed stacks by kernel graph."""
    if record:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
    if bias is not None:
        # bit for bit F.linear per copy, both ways
        h = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    else:
        h = torch.bmm(x, weight.transpose(1, 2))
    if any(layer.running for layer in layers):
        out = _seed_deltas(layers, h, record, stacks or {})
    else:
        out = h
    if record:
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        share = (time.perf_counter() - start) / len(layers)
        for layer, row in zip(layers, recorded_stats(out, copies=True).unbind(0)):
            layer.set_recorded(row, share)
        if out.requires_grad:  # the backward of this batch leaves each copy's output gradient
            out.register_hook(functools.partial(_keep_out_grads, layers))
    return out


def _keep_out_grads(layers: list[KasminaLayer], g: torch.Tensor) -> None:
    """KasminaLayer's output-gradient hook, per copy."""
    for layer, norm in zip(layers, out_grad_norm(g, copies=True)):
        layer.set_out_grad(norm)


def _seed_deltas(
    layers: list[KasminaLayer], h: torch.Tensor, record: bool, stacks: dict[Any, _SeedStack]
) -> torch.Tensor:
    """h plus every running seed's delta, per copy, by kasmina.seed's rule (`seed_mode`,
    `seed_delta`) as KasminaLayer applies it: the deltas are added in slot order, one
    `index_add` per slot index (a copy appears once in each: no two adds to one row race, on
    any device)."""
    grad = torch.is_grad_enabled()
    groups: dict[int, list[_Member]] = {}  # by kernel graph: every slot and mode together
    for j, layer in enumerate(layers):
        for slot in layer.running:
            mode = seed_mode(slot, grad)
            if mode is None:
                continue
            kernel = layer.kernels[str(slot.index)]
            member = _Member(j, layer, slot, kernel, *mode)
            groups.setdefault(id(kernel.graph), []).append(member)
    if not groups:
        return h
    # Rows as views: stacking a group's rows backpropagates to them without the full-size
    # zero fill an index_select's backward does per group.
    rows, detached = h.unbind(0), h.detach().unbind(0)
    by_slot: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for members in groups.values():
        members.sort(key=lambda m: (not m.training, m.slot.index))  # runs of (mode, slot)
        inputs = [detached[m.j] if m.detach else rows[m.j] for m in members]
        kept, y = _group_outputs(members, inputs, record, stacks.get(members[0].kernel.graph))
        start = 0
        while start < len(kept):
            first = kept[start]
            end = start + 1
            while (
                end < len(kept)
                and kept[end].training == first.training
                and kept[end].slot.index == first.slot.index
            ):
                end += 1
            run = kept[start:end]
            part, _ = seed_delta(  # a stack's weight is 1: its alphas are applied in `part`
                y[start:end],
                [m.alpha for m in run],
                first.training,
                first.layer.config.fit_step,
                [m.slot.fit_loss for m in run],
            )
            copies, deltas = by_slot.setdefault(first.slot.index, ([], []))
            copies += [m.j for m in run]
            deltas.append(part)
            start = end
    out = None
    for index in sorted(by_slot):
        copies, deltas = by_slot[index]
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
        rows = torch.tensor(copies, device=h.device)
        # The first add makes a new tensor (h's rows feed the kernels); the next ones add into
        # it in place (index_add's backward saves neither its input nor its output).
        out = h.index_add(0, rows, delta) if out is None else out.index_add_(0, rows, delta)
    return h if out is None else out


@dataclass(slots=True)
class _Member:
    """One running seed of one copy (row j of the batch) in a kernel group."""

    j: int
    layer: KasminaLayer
    slot: Any
    kernel: nn.Module
    alpha: float
    training: bool  # fitted to the pseudo-residual (value 0), else blended at alpha
    detach: bool  # reads the detached h


def _group_outputs(
    members: list[_Member], inputs: list[torch.Tensor], record: bool, stack: _SeedStack | None
):
    """Run one group's kernels on their inputs, stacked under vmap or one guarded call per
    copy; record each copy's faults as guarded_call would. Members held in `stack` (all of
    them, or the stack is not used) run from its tensors, so that their gradients reach it; a
    member that runs with grad enabled is marked as used there. Returns the members whose
    output is used and those outputs stacked (members' order)."""
    config = members[0].layer.config
    budget = None if config.latency_budget_ms is None else config.latency_budget_ms / 1e3
    graph = members[0].kernel.graph
    if stack is not None and not all(m.kernel in stack.rows for m in members):
        stack = None
    kept, y = _run_group(members, inputs, record, budget, graph, stack)
    if stack is not None and torch.is_grad_enabled():
        for m in kept:
            stack.used[stack.rows[m.kernel]] = True
    return kept, y


def _states(members: list[_Member], stack: _SeedStack | None) -> list[torch.Tensor]:
    """The group's kernel tensors stacked in members' order: the stack's own (or its rows),
    else stacked from each kernel's tensors."""
    if stack is not None:
        return stack.select([stack.rows[m.kernel] for m in members])
    return [torch.stack(tensors) for tensors in zip(*(m.kernel.flat_state() for m in members))]


def _run_group(members, inputs, record, budget, graph, stack):
    """_group_outputs' work: (kept members, their outputs stacked)."""
    result = None
    if stack is not None or (len(members) >= VMAP_MIN and graph not in _NOT_VMAPPABLE):
        x = torch.stack(inputs)
        result = _vmapped_call(graph, _states(members, stack), x)
    if result is not None:
        y, elapsed = result
        share = elapsed / len(members)
        # guarded_call's checks, on the whole group at once (one sync when every copy is fine)
        checks = check_output(y, x, share, budget, copies=True)
        kept = []
        for k, (m, (keep, fault, msg)) in enumerate(zip(members, checks)):
            if record:
                m.slot.latency_ms = share * 1e3
            if fault is not None:
                m.layer.record_fault(m.slot, fault, msg)
            if keep:
                m.slot.calls += 1
                kept.append(k)
        if len(kept) == len(members):
            return members, y
        # Run the healthy ones again without the faulted: a dropped row's backward would still
        # reach its kernel (0 * NaN), which the single env never runs backward.
        sub = [members[k] for k in kept]
        if sub and (stack is not None or len(sub) >= VMAP_MIN):
            again = _vmapped_call(graph, _states(sub, stack), x[kept])
            if again is not None:
                return sub, again[0]
        # One guarded call each (their latency was counted already): a kernel that ran under
        # vmap on the whole group but fails on its own is a fault, not a crash.
        ran, outs = [], []
        for k, m in zip(kept, sub):
            y_m, fault, msg = guarded_call(_kernel_call(m, stack), inputs[k], None)
            if fault is not None:
                m.layer.record_fault(m.slot, fault, msg)
            if y_m is not None:
                ran.append(m)
                outs.append(y_m)
        return ran, torch.stack(outs) if outs else y[:0]
    kept, outs = [], []
    for m, x in zip(members, inputs):
        y_m = m.layer.run_seed(m.slot, x, _kernel_call(m, stack), record)
        if y_m is not None:
            kept.append(m)
            outs.append(y_m)
    if not outs:
        return [], None
    return kept, outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)


def _kernel_call(m: _Member, stack: _SeedStack | None):
    """A member's kernel as one call: from its stack's row (so that its gradient reaches the
    stack), or the kernel itself."""
    if stack is None:
        return m.kernel
    return functools.partial(_row_forward, m.kernel.graph, stack.states, stack.rows[m.kernel])


def _row_forward(graph, states: list[torch.Tensor], row: int, x: torch.Tensor) -> torch.Tensor:
    return graph.forward(*(state[row] for state in states), x)[0]
