"""HostTrainer: the real training loop of an episode, one decision interval at a time.

The trainer owns the host optimizer (over the parameters the host had when it was built), one
fused Adam over every running seed of the model (a param group per seed, at the seed's own
learning rate; rebuilt, state carried over, when the set of running seeds changes), the data
order (a `torch.Generator` the env seeds), and the evaluation on a fixed validation subset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from esper_gym.data import Dataset
from esper_gym.kasmina import RUNNING, KasminaLayer, SeedState, kasmina_layers
from esper_gym.kernels import Kernel
from esper_gym.tasks import Task

# Modules that behave differently in train and eval mode, and modules of ours that do not.
_MODAL = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)
_MODE_FREE = (KasminaLayer, Kernel)

SPIKE_FACTOR = 2.0  # a step's loss above this multiple of the running mean counts as a spike
EVAL_CHUNK = 4096  # samples per forward in `evaluate`
# Adam's constants, for every Adam here: the host's and the seeds' (and the batched simulator's
# stacked steps, `adam_step`).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class IntervalStats:
    steps: int
    mean_loss: float
    last_loss: float
    loss_spikes: int
    diverged: bool
    # Share of the interval's training samples the model classified right in its training
    # forward (before that step's update): the running training accuracy of the interval.
    train_acc: float


def make_optimizer(task: Task, params) -> torch.optim.Optimizer:
    if task.optimizer == "sgd":
        return torch.optim.SGD(params, lr=task.lr, momentum=0.9, weight_decay=task.weight_decay)
    # fused: one kernel for all parameters; on CPU it halves the step time of small hosts.
    return torch.optim.Adam(
        params, lr=task.lr, weight_decay=task.weight_decay, betas=ADAM_BETAS, eps=ADAM_EPS,
        fused=True,
    )  # fmt: skip


def adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr: float, weight_decay: float):
    """What a fused Adam of `make_optimizer` computes for these tensors (their step counts
    already advanced), in one call, without torch.optim's bookkeeping: the batched simulator
    steps the rows of its stacked tensors with it, each row as its copy's own optimizer would."""
    torch._fused_adam_(
        params, grads, exp_avgs, exp_avg_sqs, [], steps,
        amsgrad=False, lr=lr, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1],
        weight_decay=weight_decay, eps=ADAM_EPS, maximize=False,
        grad_scale=None, found_inf=None,
    )  # fmt: skip


class FiniteCheck:
    """Whether a list of tensors holds NaN/Inf, in one fused kernel (the one AMP's GradScaler
    uses, here with scale 1, which leaves the values as they are) and one sync."""

    def __init__(self, device: torch.device) -> None:
        self.found = torch.zeros(1, device=device)
        self.one = torch.ones(1, device=device)

    def any_nonfinite(self, tensors: list[torch.Tensor]) -> bool:
        self.found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, self.found, self.one)
        return bool(self.found.item())


class HostTrainer:
    def __init__(
        self, model: nn.Module, data: Dataset, task: Task, generator: torch.Generator
    ) -> None:
        self.model, self.task, self.generator = model, task, generator
        self.device = torch.device(task.device)
        self.layers: list[KasminaLayer] = kasmina_layers(model)
        self.host_params = list(model.parameters())  # kernels are added later, in their slots
        self.optimizer = make_optimizer(task, self.host_params)
        for layer in self.layers:
            layer.external_optimizer = True
        # The optimizer holding the running seeds' param groups: the host's own when the task's
        # optimizer is Adam (one fused step for everything), else an Adam of their own.
        self.seed_optimizer: torch.optim.Optimizer | None = None
        # kernel -> its param group; keyed by the object (not its id) so that a copy of the env
        # (pickle, env.fork), whose kernels are new objects, keeps its groups and Adam state.
        self._seed_groups: dict[nn.Module, dict] = {}
        # The running seeds that have parameters, as (layer, slot, params), and the kernels of
        # all running seeds, as of the last `sync_seeds` (a new tuple when they change).
        self.seeds: list[tuple[KasminaLayer, object, list[torch.Tensor]]] = []
        self.seed_key: tuple = ()
        self._running_seen: tuple = (None,)
        self._finite = FiniteCheck(self.device)  # the fast path of the per-step gradient check
        # The current model's per-sample hits on the validation subset (the last `evaluate`).
        self.val_hits: torch.Tensor | None = None
        # Modules whose forward may read `training` (dropout, norms with running stats, and any
        # module defined outside torch.nn); switching only these keeps evaluate from walking
        # the whole module tree twice per call. Kernels' train/eval behaviour is fixed at export.
        self.modal = [
            m
            for m in model.modules()
            if isinstance(m, _MODAL)
            or not (type(m).__module__.startswith("torch.nn.") or isinstance(m, _MODE_FREE))
        ]
        self.x_train, self.y_train = data.x_train, data.y_train
        if len(data.x_val) == 0:
            raise ValueError(
                f"task {task.name!r}: dataset {data.name!r} has an empty validation split, which "
                "the env evaluates on every step; give it one (dataset_kwargs val_size, or n_val "
                "for spirals)"
            )
        n_val = min(task.eval_size, len(data.x_val))  # a smaller split is used whole
        self.x_val = data.x_val[:n_val].to(self.device)
        self.y_val = data.y_val[:n_val].to(self.device)
        self.steps_done = 0
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0
        self._loss_ema: float | None = None

    def _next_indices(self) -> torch.Tensor:
        """The training-split indices of the next batch (a new permutation every epoch)."""
        if self._pos + self.task.batch_size > len(self._order):
            self._order = torch.randperm(len(self.x_train), generator=self.generator)
            self._pos = 0
        idx = self._order[self._pos : self._pos + self.task.batch_size]
        self._pos += self.task.batch_size
        return idx

    def interval_indices(self, steps: int) -> torch.Tensor:
        """(steps, batch_size): the indices of the next `steps` batches, drawn exactly as
        `steps` calls of `_next_indices` would draw them, in one slice per permutation."""
        size, parts = self.task.batch_size, []
        while steps:
            if self._pos + size > len(self._order):
                self._order = torch.randperm(len(self.x_train), generator=self.generator)
                self._pos = 0
            k = min(steps, (len(self._order) - self._pos) // size)
            parts.append(self._order[self._pos : self._pos + k * size].view(k, size))
            self._pos += k * size
            steps -= k
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._next_indices()
        return self.x_train[idx].to(self.device), self.y_train[idx].to(self.device)

    def run_interval(self, steps: int | None = None) -> IntervalStats:
        """Train for `steps` optimizer steps (default: the task's decision interval).

        Telemetry reads the last batch of the interval. Losses and hits stay on the device until
        the end of the interval: one sync per interval, not per step.
        """
        steps = steps or self.task.decision_interval
        self._set_training(True)
        losses, hits, seen = [], [], 0
        for i in range(steps):
            last = i == steps - 1
            if last:  # set once: nn.Module.__setattr__ per step would cost ~8% on small hosts
                for layer in self.layers:
                    layer.record = True
            x, y = self._next_batch()
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            hits.append((logits.detach().argmax(1) == y).sum())
            seen += len(y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Checked before telemetry reads the gradients: a skipped step leaves none to read.
            safe = self._host_grads_safe(loss, x, y)
            if last:
                for layer in self.layers:
                    layer.capture_grad()
            if safe:
                self.optimizer.step()
                if self.seed_optimizer not in (None, self.optimizer):
                    self.seed_optimizer.step()
                    self.seed_optimizer.zero_grad(set_to_none=True)
            for layer in self.layers:
                layer.step_seeds()
            losses.append(loss.detach())
        for layer in self.layers:
            layer.record = False
        # One transfer for both: the losses, then the hit count (exact in float32 below 2**24).
        values = torch.cat([torch.stack(losses).float(), torch.stack(hits).sum()[None].float()])
        *values, correct = values.cpu().tolist()
        return self.interval_stats(values, correct, seen)

    def interval_stats(self, values: list[float], correct: float, seen: int) -> IntervalStats:
        """Count the interval's steps and read its per-step losses (spikes, divergence) and its
        training hits (`correct` of `seen` samples)."""
        steps = len(values)
        self.steps_done += steps
        diverged = not all(map(_finite, values))
        spikes = 0
        for v in values:
            if self._loss_ema is not None and _finite(v) and v > SPIKE_FACTOR * self._loss_ema:
                spikes += 1
            if _finite(v):
                self._loss_ema = v if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * v
        finite = [v for v in values if _finite(v)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        return IntervalStats(steps, mean, values[-1], spikes, diverged, correct / max(seen, 1))

    def sync_seeds(self) -> None:
        """Keep a param group per running seed (at the seed's learning rate, no weight decay) in
        one optimizer: the host's own when it is Adam, so that one fused step updates host and
        seeds together; else one fused Adam of their own. Groups are added and dropped as the
        set of running seeds changes (germinate, advance into TRAINING, cull); each seed's Adam
        state lives as long as it runs."""
        # A layer replaces its `_running` tuple on every state change: if none was replaced
        # since the last call, the set of running seeds is the same (the per-step common case).
        running = tuple(layer.running for layer in self.layers)
        if len(running) == len(self._running_seen) and all(
            a is b for a, b in zip(running, self._running_seen)
        ):
            return
        self._running_seen = running
        live = [
            (layer, slot, layer.kernels[str(slot.index)])
            for layer in self.layers
            if layer.busy
            for slot in layer.slots
            if slot.state in RUNNING and slot.optimizer is None and str(slot.index) in layer.kernels
        ]
        key = tuple(kernel for _, _, kernel in live)
        if len(key) == len(self.seed_key) and all(a is b for a, b in zip(key, self.seed_key)):
            return
        self.seed_key = key
        seeds = [
            (layer, slot, kernel, [p for p in kernel.parameters() if p.requires_grad])
            for layer, slot, kernel in live
        ]
        self.seeds = [(layer, slot, params) for layer, slot, _, params in seeds if params]
        wanted = {kid: (layer, params) for layer, _, kid, params in seeds if params}
        if self.seed_optimizer is None and self.task.optimizer == "adam":
            self.seed_optimizer = self.optimizer
        for kid in [k for k in self._seed_groups if k not in wanted]:
            group = self._seed_groups.pop(kid)
            groups = self.seed_optimizer.param_groups
            # By identity: `list.remove` would compare the groups' tensors with ==.
            del groups[next(i for i, g in enumerate(groups) if g is group)]
            for p in group["params"]:
                self.seed_optimizer.state.pop(p, None)
        for kid, (layer, params) in wanted.items():
            if kid in self._seed_groups:
                continue
            group = {"params": params, "lr": layer.config.lr, "weight_decay": 0.0}
            if self.seed_optimizer is None:  # an SGD host: the seeds get an Adam of their own
                self.seed_optimizer = torch.optim.Adam(
                    [group], betas=ADAM_BETAS, eps=ADAM_EPS, fused=True
                )
            else:
                self.seed_optimizer.add_param_group(group)
            self._seed_groups[kid] = self.seed_optimizer.param_groups[-1]

    def _host_grads_safe(self, loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> bool:
        """One finiteness check per step over the host's and the seeds' gradients (one fused
        norm, one sync), before any optimizer steps.

        A seed whose own gradient is NaN/Inf loses this step's update and records a
        "nonfinite_grad" fault (its breaker decides). A host gradient made non-finite by a
        coupled seed's backward (BLENDING or later: it reads the undetached activation) returns
        False: the step is skipped (host and seeds) and the seeds responsible are culled, so the
        host's weights stay finite. Host gradients are only checked while a seed is coupled;
        otherwise they are the host's alone. A non-finite loss is the host diverging, not a seed
        fault: it is left to the interval's divergence check, as without seeds.
        """
        self.sync_seeds()
        return self.check_grads(loss, x, y)

    def check_grads(self, loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> bool:
        """`_host_grads_safe` once the seed param groups are in sync (`sync_seeds`)."""
        coupled = any(layer.coupled for layer in self.layers)
        host = [p.grad for p in self.host_params if p.grad is not None] if coupled else []
        seeds = [[p.grad for p in params if p.grad is not None] for _, _, params in self.seeds]
        grads = host + [g for seed in seeds for g in seed]
        if not grads:
            return True
        # The common case, all finite: one fused check and one sync. Only a step with a
        # non-finite value pays for the per-tensor norms that say whose it is.
        if not self._finite.any_nonfinite([loss.detach(), *grads]):
            return True
        values = torch.stack([loss.detach(), *torch._foreach_norm(grads)])
        flags = torch.isfinite(values).tolist()
        if flags[0] and not all(flags[1 : 1 + len(host)]):
            # A coupled seed's backward poisoned the host: the NaN also flows into every seed
            # upstream of it, so those seeds are not at fault; only the culprits are culled.
            for layer, slot in self._culprits(x, y):
                layer.quarantine(
                    slot.index,
                    "host_grad",
                    "its backward sent NaN/Inf into the host's gradients; host step skipped",
                )
            self.model.zero_grad(set_to_none=True)  # the whole step is skipped, seeds' too
            return False
        at = 1 + len(host)
        for (layer, slot, params), seed in zip(self.seeds, seeds):
            if not all(flags[at : at + len(seed)]):
                for p in params:
                    p.grad = None
                layer.record_fault(slot, "nonfinite_grad", "kernel gradient contains NaN or Inf")
            at += len(seed)
        return True

    def _culprits(self, x: torch.Tensor, y: torch.Tensor) -> list:
        """(layer, slot) of the coupled seeds whose backward turned a finite gradient into a
        non-finite one, found by running the batch again with taps on both sides of every
        coupled kernel (a seed upstream of the culprit only passes the NaN on). If none did
        (e.g. a huge but finite output overflowed a later layer), every coupled seed is."""
        coupled = [(layer, s) for layer in self.layers for s in layer.coupled_slots()]
        for _, slot in coupled:
            slot.grad_ok.clear()  # a kernel that does not run this time leaves no flag
        self.model.zero_grad(set_to_none=True)
        for layer in self.layers:
            layer.diagnose = True
        try:
            F.cross_entropy(self.model(x), y).backward()
        finally:
            for layer in self.layers:
                layer.diagnose = False
        return [(layer, s) for layer, s in coupled if _made_nonfinite(s.grad_ok)] or coupled

    def record_untrained(self) -> None:
        """Telemetry of an episode's first observation: one recorded forward and backward on
        a validation batch, no optimizer step."""
        n = self.task.batch_size
        for layer in self.layers:
            layer.record = True
        F.cross_entropy(self.model(self.x_val[:n]), self.y_val[:n]).backward()
        for layer in self.layers:
            layer.capture_grad()
            layer.record = False
        self.model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None):
        """(accuracy, mean loss) on the validation subset, or on (x, y)."""
        on_val = x is None
        x = self.x_val if x is None else x
        y = self.y_val if y is None else y
        self._set_training(False)
        hits, loss_sum = [], 0.0
        for start in range(0, len(x), EVAL_CHUNK):
            xb, yb = (
                x[start : start + EVAL_CHUNK].to(self.device),
                y[start : start + EVAL_CHUNK].to(self.device),
            )
            logits = self.model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            hits.append(logits.argmax(1) == yb)
        self._set_training(True)
        hits = torch.cat(hits)
        if on_val:
            self.val_hits = hits  # the current model's per-sample hits, for contributions
        return int(hits.sum()) / len(x), loss_sum / len(x)

    def _set_training(self, mode: bool) -> None:
        for module in self.modal:
            module.training = mode

    def measure_contributions(self, val_acc: float) -> None:
        """Each live seed's contribution: accuracy with it on minus with it off, on the first
        `task.contribution_size` samples of the validation subset (the same samples every step).

        TRAINING seeds do not act on the output yet, so "on" means alpha 1 (what advancing it
        would give); blending and later seeds are "on" at their alpha, which is the current
        model, whose hits on those samples the last `evaluate()` kept: only the other pass runs.
        """
        n = self.contribution_samples()
        x, y = self.x_val[:n], self.y_val[:n]
        current = None
        for layer, slot, training in self.contribution_passes():
            if current is None:
                current = self.val_accuracy(n)
            with layer.seed_override(slot.index, 1.0 if training else 0.0):
                accuracy = self._accuracy(x, y)
            set_contribution(slot, accuracy, current, training)

    def contribution_samples(self) -> int:
        """How many validation samples (the first ones) contributions are measured on."""
        return min(self.task.contribution_size, len(self.x_val))

    def contribution_passes(self):
        """The passes `measure_contributions` runs, one per running seed, as (layer, slot,
        whether it is TRAINING: measured at alpha 1, else at 0). A generator: a seed is looked
        at after the passes before it, so that one its breaker culled meanwhile is skipped."""
        for layer in self.layers:
            for slot in layer.slots:
                if slot.state in RUNNING:
                    yield layer, slot, slot.state == SeedState.TRAINING

    def val_accuracy(self, n: int) -> float:
        """The current model's accuracy on the first n validation samples: from the hits the
        last `evaluate` kept, else one pass."""
        if self.val_hits is not None:
            return float(self.val_hits[:n].float().mean())
        return self._accuracy(self.x_val[:n], self.y_val[:n])

    @torch.no_grad()
    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        # `evaluate` without the loss: contributions only compare hits (~20% of a small pass).
        self._set_training(False)
        hits = int((self.model(x).argmax(1) == y).sum())
        self._set_training(True)
        return hits / len(x)


def set_contribution(slot, accuracy: float, current: float, training: bool) -> None:
    """A seed's contribution from its pass's `accuracy`: on (alpha 1) minus the current model
    for a TRAINING seed, which does not act on the output yet; else the current model minus
    off (alpha 0)."""
    slot.contribution = accuracy - current if training else current - accuracy


def _made_nonfinite(taps: dict) -> bool:
    """A coupled seed's taps: a finite gradient reached its kernel and a non-finite one left."""
    return "in" in taps and "out" in taps and bool(taps["out"]) and not bool(taps["in"])


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")
