"""HostTrainer: the real training loop of an episode, one decision interval at a time.

The trainer owns the host optimizer (over the parameters the host had when it was built;
kernels carry their own optimizers in their slots), the data order (a `torch.Generator` the env
seeds), and the evaluation on a fixed validation subset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from esper_gym.data import Dataset
from esper_gym.kasmina import KasminaLayer, SeedState, kasmina_layers
from esper_gym.tasks import Task

SPIKE_FACTOR = 2.0  # a step's loss above this multiple of the running mean counts as a spike


@dataclass(frozen=True)
class IntervalStats:
    steps: int
    mean_loss: float
    last_loss: float
    loss_spikes: int
    diverged: bool


def make_optimizer(task: Task, params) -> torch.optim.Optimizer:
    if task.optimizer == "sgd":
        return torch.optim.SGD(params, lr=task.lr, momentum=0.9, weight_decay=task.weight_decay)
    # fused: one kernel for all parameters; on CPU it halves the step time of small hosts.
    return torch.optim.Adam(params, lr=task.lr, weight_decay=task.weight_decay, fused=True)


class HostTrainer:
    def __init__(
        self, model: nn.Module, data: Dataset, task: Task, generator: torch.Generator
    ) -> None:
        self.model, self.task, self.generator = model, task, generator
        self.device = torch.device(task.device)
        self.layers: list[KasminaLayer] = kasmina_layers(model)
        self.optimizer = make_optimizer(task, list(model.parameters()))
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

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pos + self.task.batch_size > len(self._order):
            self._order = torch.randperm(len(self.x_train), generator=self.generator)
            self._pos = 0
        idx = self._order[self._pos : self._pos + self.task.batch_size]
        self._pos += self.task.batch_size
        return self.x_train[idx].to(self.device), self.y_train[idx].to(self.device)

    def run_interval(self, steps: int | None = None) -> IntervalStats:
        """Train for `steps` optimizer steps (default: the task's decision interval).

        Telemetry reads the last batch of the interval. Losses stay on the device until the end
        of the interval: one sync per interval, not per step.
        """
        steps = steps or self.task.decision_interval
        self.model.train()
        losses = []
        for i in range(steps):
            last = i == steps - 1
            if last:  # set once: nn.Module.__setattr__ per step would cost ~8% on small hosts
                for layer in self.layers:
                    layer.record = True
            x, y = self._next_batch()
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if last:
                for layer in self.layers:
                    layer.capture_grad()
            self.optimizer.step()
            for layer in self.layers:
                layer.step_seeds()
            losses.append(loss.detach())
        for layer in self.layers:
            layer.record = False
        self.steps_done += steps
        values = torch.stack(losses).float().cpu().tolist()
        diverged = not all(map(_finite, values))
        spikes = 0
        for v in values:
            if self._loss_ema is not None and _finite(v) and v > SPIKE_FACTOR * self._loss_ema:
                spikes += 1
            if _finite(v):
                self._loss_ema = v if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * v
        finite = [v for v in values if _finite(v)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        return IntervalStats(steps, mean, values[-1], spikes, diverged)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None):
        """(accuracy, mean loss) on the validation subset, or on (x, y)."""
        x = self.x_val if x is None else x
        y = self.y_val if y is None else y
        self.model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, len(x), 4096):
            xb, yb = (
                x[start : start + 4096].to(self.device),
                y[start : start + 4096].to(self.device),
            )
            logits = self.model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
        self.model.train()
        return correct / len(x), loss_sum / len(x)

    def measure_contributions(self, val_acc: float) -> None:
        """Each live seed's contribution: val accuracy with it on minus with it off.

        TRAINING seeds do not act on the output yet, so "on" means alpha 1 (what advancing it
        would give); blending and later seeds are "on" at their alpha, which is the current
        model, so `val_acc` is reused and only the "off" pass is run.
        """
        for layer in self.layers:
            for slot in layer.slots:
                if slot.state == SeedState.TRAINING:
                    with layer.seed_override(slot.index, 1.0):
                        on, _ = self.evaluate()
                    slot.contribution = on - val_acc
                elif slot.state in (SeedState.BLENDING, SeedState.PROBATION, SeedState.FOSSILIZED):
                    with layer.seed_override(slot.index, 0.0):
                        off, _ = self.evaluate()
                    slot.contribution = val_acc - off


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")
