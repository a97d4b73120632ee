"""KasminaLayer: a host layer with seed slots that can grow kernels while the host trains.

Forward of a layer with host `f` and slots i with kernels `k_i`:

    h   = f(x)
    out = h + sum_i delta_i
    delta_i = Fit(k_i(h.detach()))        TRAINING    (value exactly 0; see below)
            = alpha_i * k_i(h)            BLENDING / PROBATION / FOSSILIZED
            = 0                           any other state (kernel not run)

TRAINING isolates the host: the forward value is exactly `h` and the host's gradients are exactly
those of the host alone, because the kernel reads a detached `h` and `Fit` outputs zeros. In the
backward pass `Fit` turns the task-loss gradient g = dL/d(out) into a least-squares target for
the kernel, the pseudo-residual r = -eta * B * g (B: batch size, so that r is the per-sample
gradient of a batch-mean loss): the kernel is fit to what the host misses, as in gradient
boosting. For an MSE head with eta = 0.5, r is exactly the residual y - h. The plain
straight-through form (out = h + s - s.detach()) has no such fixed point: the kernel keeps
stepping along -g and its loss diverges once it overshoots, which a test here shows.

With no running seed and telemetry off, forward is a single call of the host: no loop over
slots, no reduction, no device sync.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from esper_gym.kasmina.lifecycle import (
    ADVANCE_TO,
    CULLABLE,
    RUNNING,
    SeedState,
    check_transition,
)
from esper_gym.kasmina.recovery import CircuitBreaker, FaultRecord, guarded_call
from esper_gym.kasmina.seed import seed_delta, seed_mode
from esper_gym.kasmina.telemetry import (
    HealthSignal,
    SlotSignal,
    grad_norm,
    out_grad_norm,
    recorded_stats,
    weight_norm,
)

BLEND_SCHEDULES = ("linear", "cosine")
# States whose kernel reads the host's activation without detaching it: its backward reaches the
# host's gradients, so the trainer checks those before the host optimizer steps.
COUPLED = frozenset({SeedState.BLENDING, SeedState.PROBATION, SeedState.FOSSILIZED})


class _Tap(torch.autograd.Function):
    """Identity; its backward keeps in `sink[key]` (a tensor: no sync) whether the gradient
    passing through is finite. Tapped on both sides of a coupled kernel, it tells whether the
    kernel's backward turned a finite gradient into NaN/Inf (then the seed is to blame) or only
    passed one on from a later layer."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, sink: dict, key: str) -> torch.Tensor:
        ctx.sink, ctx.key = sink, key
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        ctx.sink[ctx.key] = torch.isfinite(g).all()
        return g, None, None


@dataclass(frozen=True)
class SeedConfig:
    """How seeds of a layer behave. Step counts are host optimizer steps."""

    blend_steps: int = 100
    blend_schedule: str = "linear"
    embargo_steps: int = 100
    max_faults: int = 3
    lr: float = 1e-3
    fit_step: float = 0.5  # eta of the TRAINING target r = -eta * B * dL/dh
    latency_budget_ms: float | None = None  # None: no "slow" fault

    def __post_init__(self) -> None:
        if self.blend_schedule not in BLEND_SCHEDULES:
            raise ValueError(
                f"blend_schedule={self.blend_schedule!r}; allowed: {', '.join(BLEND_SCHEDULES)}"
            )
        for name in ("blend_steps", "embargo_steps", "max_faults"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("lr", "fit_step"):
            if not _finite_positive(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        # Checked here, not at the first kernel call: a string would raise mid-episode, a
        # negative budget would cull every seed, and NaN would silently switch the check off.
        budget = self.latency_budget_ms
        if budget is not None and not _finite_positive(budget):
            raise ValueError(
                f"latency_budget_ms={budget!r}; allowed: None (no latency check) or a finite "
                "number of milliseconds > 0"
            )


def _finite_positive(value) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def blend_alpha(t: int, steps: int, schedule: str) -> float:
    """Alpha after `t` of `steps` blending steps: linear or cosine ramp from 0 to 1."""
    frac = min(max(t / steps, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * frac))
    return frac


@dataclass
class SeedSlot:
    index: int
    state: SeedState = SeedState.DORMANT
    blueprint: str = ""
    kernel_sha: str = ""
    params: int = 0
    alpha: float = 0.0
    age: int = 0
    blend_t: int = 0
    embargo_left: int = 0
    contribution: float = 0.0
    calls: int = 0  # successful kernel calls, so a test (or a user) can see the kernel ran
    latency_ms: float = 0.0  # wall-clock time of its kernel call on the last recorded batch
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    optimizer: torch.optim.Optimizer | None = None
    alpha_override: float | None = None  # set by `seed_override` while measuring contribution
    fit_loss: list = field(default_factory=list)  # [tensor] of the last TRAINING backward
    # {"out": finite gradient reached the kernel, "in": finite gradient left it} (bool tensors)
    # from the trainer's last diagnostic pass.
    grad_ok: dict = field(default_factory=dict)


def host_kind(host: nn.Module) -> str:
    if isinstance(host, nn.Linear):
        return "linear"
    if isinstance(host, nn.Conv2d):
        return "conv"
    raise ValueError(f"KasminaLayer wraps nn.Linear or nn.Conv2d, got {type(host).__name__}")


class KasminaLayer(nn.Module):
    """A host layer (Linear or Conv2d) with `num_slots` seed slots.

    Args:
        host: the wrapped layer; its parameters stay the host's.
        num_slots: seed slots on this layer's output.
        name: used in telemetry, faults and the observation graph.
        config: seed behaviour (blend ramp, embargo, breaker, seed learning rate).

    Events (state changes and faults) accumulate in `events` and `faults` until the owner drains
    them with `drain()`; nothing is dropped.
    """

    def __init__(
        self,
        host: nn.Module,
        num_slots: int = 2,
        name: str = "",
        config: SeedConfig | None = None,
    ) -> None:
        super().__init__()
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.kind = host_kind(host)
        self.host = host
        self.name = name
        self.config = config or SeedConfig()
        self.slots = [
            SeedSlot(i, breaker=CircuitBreaker(self.config.max_faults)) for i in range(num_slots)
        ]
        self.kernels = nn.ModuleDict()
        self.out_shape: tuple[int, ...] | None = None  # set by the first forward
        self.record = False  # the trainer turns this on for the one batch telemetry reads
        self.diagnose = False  # the trainer turns this on to find a seed that sends NaN back
        self.external_optimizer = False  # set by HostTrainer: it steps the seeds itself
        self.step_count = 0
        self.events: list[dict] = []
        self.faults: list[FaultRecord] = []
        self._running: tuple[SeedSlot, ...] = ()
        self._busy = False  # any slot not DORMANT
        self.coupled = False  # any slot in COUPLED: its backward reaches the host's gradients
        self._stats: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None
        self._out_grad: torch.Tensor | None = None
        self._latency_s = 0.0
        self._weight_norm: float | None = None  # set_weight_norm's, if any

    @property
    def running(self) -> tuple[SeedSlot, ...]:
        """The slots whose kernel takes part in the forward, in slot order (a new tuple on every
        state change: an unchanged tuple means an unchanged set)."""
        return self._running

    @property
    def latency_s(self) -> float:
        """The layer's forward time on the last recorded batch (host and running seeds)."""
        return self._latency_s

    @property
    def busy(self) -> bool:
        """Any slot not DORMANT (step_seeds has work to do)."""
        return self._busy

    def train(self, mode: bool = True) -> KasminaLayer:
        # Kernels loaded from torch.export artifacts refuse .train()/.eval(): their train/eval
        # behaviour was fixed when they were exported, so the mode switch stops at the host.
        self.training = mode
        self.host.train(mode)
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The host is run through its `forward`, not `__call__`: a second module call per layer
        # cost 4-5% of a small MLP's training step (experiments/bench_kasmina.py). Module hooks
        # therefore belong on the KasminaLayer, not on its host.
        if not self._running and not self.record:
            return self.host.forward(x)
        if self.record:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
        h = self.host.forward(x)
        if self.out_shape is None:
            self.out_shape = tuple(h.shape[1:])
        out = h
        for slot in self._running:
            delta = self._seed_delta(slot, h)
            if delta is not None:
                out = torch.add(out, delta[0], alpha=delta[1])  # h + alpha * k(h), one op
        if self.record:
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            self._latency_s = time.perf_counter() - start
            self._stats = recorded_stats(out)
            if out.requires_grad:  # the backward of this batch leaves its output-gradient norm
                out.register_hook(self._keep_out_grad)
        return out

    def _keep_out_grad(self, g: torch.Tensor) -> None:
        self._out_grad = out_grad_norm(g)

    def _seed_delta(self, slot: SeedSlot, h: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """(term, weight) to add to `h` as `weight * term` (kasmina.seed's rule), or None when
        the seed adds nothing."""
        mode = seed_mode(slot, torch.is_grad_enabled())
        if mode is None:
            return None
        alpha, training, detach = mode
        x = h.detach() if detach else h
        # Only on the trainer's diagnostic pass (after a non-finite host gradient): the taps
        # cost a Function call and a reduction per coupled seed, every step they are on.
        tapped = self.diagnose and x is h and torch.is_grad_enabled()
        if tapped:
            x = _Tap.apply(h, slot.grad_ok, "in")
        out = self.run_seed(slot, x, self.kernels[str(slot.index)], self.record)
        if out is None:
            return None
        if tapped:
            out = _Tap.apply(out, slot.grad_ok, "out")
        return seed_delta(out, alpha, training, self.config.fit_step, slot.fit_loss)

    def run_seed(self, slot: SeedSlot, x: torch.Tensor, kernel, record: bool):
        """One guarded call of `kernel` (the slot's kernel, or a call standing for it: the
        batched simulator's row of a stack) on x: a fault is recorded, a call that gave an
        output is counted, its wall time kept in `slot.latency_ms` when `record`. Returns the
        output, or None."""
        budget = self.config.latency_budget_ms
        start = time.perf_counter()
        out, fault, msg = guarded_call(kernel, x, None if budget is None else budget / 1e3)
        if record:  # guarded_call's finiteness check has synced the device already
            slot.latency_ms = (time.perf_counter() - start) * 1e3
        if fault is not None:
            self.record_fault(slot, fault, msg)
        if out is not None:
            slot.calls += 1
        return out

    # ---------------------------------------------------------------- lifecycle
    def _set_state(self, slot: SeedSlot, new: SeedState, reason: str = "") -> None:
        check_transition(slot.state, new)
        self.events.append(
            {
                "step": self.step_count,
                "layer": self.name,
                "slot": slot.index,
                "blueprint": slot.blueprint,
                "from": slot.state.name,
                "to": new.name,
                "reason": reason,
            }
        )
        slot.state = new
        self._running = tuple(s for s in self.slots if s.state in RUNNING)
        self._busy = any(s.state != SeedState.DORMANT for s in self.slots)
        self.coupled = any(s.state in COUPLED for s in self.slots)

    def _slot(self, index: int) -> SeedSlot:
        if not 0 <= index < len(self.slots):
            raise IndexError(
                f"slot {index} out of range: layer {self.name!r} has {len(self.slots)}"
            )
        return self.slots[index]

    def germinate(
        self, index: int, kernel: nn.Module, blueprint: str = "", kernel_sha: str = ""
    ) -> None:
        """Load `kernel` into a DORMANT slot (state GERMINATED: loaded, not yet run)."""
        slot = self._slot(index)
        check_transition(slot.state, SeedState.GERMINATED)
        device = next(self.host.parameters()).device
        kernel = kernel.to(device)
        self.kernels[str(index)] = kernel
        slot.blueprint, slot.kernel_sha = blueprint, kernel_sha
        slot.params = sum(p.numel() for p in kernel.parameters())
        slot.alpha, slot.age, slot.blend_t, slot.contribution, slot.calls = 0.0, 0, 0, 0.0, 0
        slot.latency_ms = 0.0
        slot.breaker = CircuitBreaker(self.config.max_faults)
        params = [p for p in kernel.parameters() if p.requires_grad]
        # A trainer that steps every seed of the model in one fused optimizer sets
        # `external_optimizer`; a layer on its own gives each seed an optimizer of its own.
        if params and not self.external_optimizer:
            slot.optimizer = torch.optim.Adam(params, lr=self.config.lr, fused=True)
        else:
            slot.optimizer = None
        self._set_state(slot, SeedState.GERMINATED, "germinate")

    def advance(self, index: int) -> SeedState:
        """Move a seed one stage on (GERMINATED->TRAINING->BLENDING, PROBATION->FOSSILIZED)."""
        slot = self._slot(index)
        if slot.state not in ADVANCE_TO:
            allowed = ", ".join(s.name for s in ADVANCE_TO)
            raise ValueError(
                f"cannot advance slot {index} of {self.name!r} in state {slot.state.name};"
                f" advance is allowed from {allowed}"
            )
        new = ADVANCE_TO[slot.state]
        if new == SeedState.FOSSILIZED:
            slot.alpha = 1.0
        self._set_state(slot, new, "advance")
        return new

    def graft(self, index: int, kernel: nn.Module, blueprint: str = "", kernel_sha: str = ""):
        """Germinate straight to FOSSILIZED along the legal path, skipping the training and the
        ramp: builds a host that has all its growth from the start (a ceiling baseline)."""
        self.germinate(index, kernel, blueprint, kernel_sha)
        self.advance(index)
        self.advance(index)
        slot = self.slots[index]
        slot.blend_t, slot.alpha = self.config.blend_steps, 1.0
        self._set_state(slot, SeedState.PROBATION, "graft")
        self.advance(index)

    def cull(self, index: int, reason: str = "cull") -> None:
        """Drop a seed's kernel; the slot is embargoed, then dormant again."""
        slot = self._slot(index)
        self._set_state(slot, SeedState.CULLED, reason)
        del self.kernels[str(index)]
        slot.optimizer = None
        slot.alpha, slot.params, slot.contribution = 0.0, 0, 0.0

    def can_cull(self, index: int) -> bool:
        return self._slot(index).state in CULLABLE

    def coupled_slots(self) -> list[SeedSlot]:
        """Seeds whose kernel's backward can reach the host's gradients."""
        return [s for s in self.slots if s.state in COUPLED]

    def quarantine(self, index: int, kind: str, message: str) -> None:
        """Record a fault and cull the seed now, whatever its breaker count (a fossil too): used
        when the fault already cost the host a skipped optimizer step."""
        slot = self._slot(index)
        slot.breaker.record()
        self.faults.append(
            FaultRecord(self.name, slot.index, slot.blueprint, kind, message, self.step_count)
        )
        if slot.state in RUNNING | CULLABLE:
            self.cull(index, reason=f"{kind} fault: {message}")

    def record_fault(self, slot: SeedSlot, kind: str, message: str) -> None:
        self.faults.append(
            FaultRecord(self.name, slot.index, slot.blueprint, kind, message, self.step_count)
        )
        if slot.breaker.record() and slot.state in RUNNING | CULLABLE:
            self.cull(slot.index, reason=f"circuit breaker: {slot.breaker.faults} faults")

    # ------------------------------------------------------------------- stepping
    def step_seeds(self) -> None:
        """Call once after each host optimizer step: train seeds, ramp alphas, count embargoes."""
        self.step_count += 1
        if not self._busy:  # every slot dormant: nothing to train, ramp or count
            return
        for slot in self.slots:
            state = slot.state
            if state in RUNNING and slot.optimizer is not None:
                self._step_optimizer(slot)
                if slot.state != state:
                    continue  # a non-finite gradient tripped the breaker: embargo starts next step
            if state in CULLABLE or state == SeedState.FOSSILIZED:
                slot.age += 1
            if state == SeedState.BLENDING:
                slot.blend_t += 1
                slot.alpha = blend_alpha(
                    slot.blend_t, self.config.blend_steps, self.config.blend_schedule
                )
                if slot.blend_t >= self.config.blend_steps:
                    slot.alpha = 1.0
                    self._set_state(slot, SeedState.PROBATION, "blend complete")
            elif state == SeedState.CULLED:
                slot.embargo_left = self.config.embargo_steps
                self._set_state(slot, SeedState.EMBARGOED, "embargo")
            elif state == SeedState.EMBARGOED:
                slot.embargo_left -= 1
                if slot.embargo_left <= 0:
                    slot.blueprint, slot.kernel_sha, slot.age = "", "", 0
                    self._set_state(slot, SeedState.DORMANT, "embargo over")

    def _step_optimizer(self, slot: SeedSlot) -> None:
        grads = [p.grad for g in slot.optimizer.param_groups for p in g["params"]]
        grads = [g for g in grads if g is not None]
        if not grads:
            return
        # One sync per running seed per step: a NaN gradient must not reach the weights.
        if not bool(torch.isfinite(torch.stack([g.abs().sum() for g in grads])).all()):
            slot.optimizer.zero_grad(set_to_none=True)
            self.record_fault(slot, "nonfinite_grad", "kernel gradient contains NaN or Inf")
            return
        slot.optimizer.step()
        slot.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ telemetry
    def capture_grad(self) -> None:
        """After backward on the recorded batch: keep the host's gradient norm (no sync)."""
        grads = [p.grad for p in self.host.parameters() if p.grad is not None]
        if grads:
            self._grad_norm = grad_norm(grads)

    @contextlib.contextmanager
    def seed_override(self, index: int, alpha: float) -> Iterator[None]:
        """Evaluate with slot `index` forced to `alpha` (used to measure its contribution)."""
        slot = self._slot(index)
        slot.alpha_override = alpha
        if slot not in self._running and str(index) in self.kernels:
            self._running = (*self._running, slot)
        try:
            yield
        finally:
            slot.alpha_override = None
            # Recomputed, not restored: the breaker may have culled the seed meanwhile.
            self._running = tuple(s for s in self.slots if s.state in RUNNING)

    def param_count(self) -> int:
        # The host's own count is fixed (its parameters are never added or resized): kept, per
        # host module, rather than walked every step by every observation.
        cached = self.__dict__.get("_host_numel")
        if cached is None or cached[0] is not self.host:
            cached = (self.host, sum(p.numel() for p in self.host.parameters()))
            self.__dict__["_host_numel"] = cached
        return cached[1] + sum(s.params for s in self.slots)

    def fan(self) -> tuple[int, int]:
        h = self.host
        if self.kind == "linear":
            return h.in_features, h.out_features
        return h.in_channels, h.out_channels

    # Telemetry computed elsewhere: the batched simulator records many copies of a layer in
    # one stacked pass. Written to __dict__: nn.Module.__setattr__'s checks (~2 us) would be
    # paid per layer per copy per step.
    def set_recorded(self, stats: torch.Tensor, latency_s: float) -> None:
        """What a recorded forward keeps: [mean, var, dead_ratio, eff_rank] of the output (the
        `telemetry` functions) and the layer's forward time."""
        self.__dict__["_stats"], self.__dict__["_latency_s"] = stats, latency_s

    def set_grad_norm(self, norm: torch.Tensor) -> None:
        """What `capture_grad` keeps: the norm of the host's gradients."""
        self.__dict__["_grad_norm"] = norm

    def set_out_grad(self, norm: torch.Tensor) -> None:
        """What the recorded forward's hook keeps: sqrt(B) * ||dL/d(out)||."""
        self.__dict__["_out_grad"] = norm

    def set_weight_norm(self, norm: float | None) -> None:
        """The host weight's norm, computed by a caller for the current weights (the batched
        simulator, for all copies in one call), for `health` to use instead of its own; valid
        until the weights change: the caller sets None then."""
        self.__dict__["_weight_norm"] = norm

    def count_idle_steps(self, steps: int) -> None:
        """`steps` calls of `step_seeds` on a layer with every slot dormant (all they do)."""
        self.__dict__["step_count"] = self.step_count + steps

    def health(self) -> HealthSignal:
        """The layer's HealthSignal from the last recorded pass (one sync, here)."""
        stats = self._stats.tolist() if self._stats is not None else [0.0, 0.0, 0.0, 0.0]
        grad = float(self._grad_norm) if self._grad_norm is not None else 0.0
        out_grad = float(self._out_grad) if self._out_grad is not None else 0.0
        weight = self._weight_norm
        if weight is None:
            weight = weight_norm(self.host.weight)
        fan_in, fan_out = self.fan()
        return HealthSignal(
            layer=self.name,
            kind=self.kind,
            fan_in=fan_in,
            fan_out=fan_out,
            act_mean=stats[0],
            act_var=stats[1],
            dead_ratio=stats[2],
            grad_norm=grad,
            weight_norm=weight,
            latency_ms=self._latency_s * 1e3,
            params=self.param_count(),
            slots=[
                SlotSignal(
                    state=int(s.state),
                    alpha=s.alpha,
                    age=s.age,
                    faults=s.breaker.faults,
                    contribution=s.contribution,
                    params=s.params,
                    blueprint=s.blueprint,
                )
                for s in self.slots
            ],
            eff_rank=stats[3],
            out_grad=out_grad,
        )

    def drain(self) -> tuple[list[dict], list[FaultRecord]]:
        """Hand over and forget the events and faults gathered since the last drain."""
        events, faults = self.events, self.faults
        self.events, self.faults = [], []
        return events, faults

    def extra_repr(self) -> str:
        states = ",".join(s.state.name for s in self.slots)
        return f"name={self.name!r}, slots=[{states}]"


def kasmina_layers(model: nn.Module) -> list[KasminaLayer]:
    """The KasminaLayers of `model` in registration (data-flow) order."""
    return [m for m in model.modules() if isinstance(m, KasminaLayer)]
