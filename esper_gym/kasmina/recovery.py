"""Error recovery for kernel calls: detect a fault, fall back to the host path, count, trip.

A kernel call faults when it raises, returns a tensor of the wrong shape, dtype or device,
returns NaN/Inf or values out of all proportion to its input, or takes longer than its latency
budget. The caller then uses the host path for that call (the training run goes on) and the
fault is kept as a `FaultRecord`. A `CircuitBreaker` per seed trips after `max_faults` faults and
the layer culls the seed. These are the only checks: the batched simulator runs `form_fault` and
`check_output` on a stack of copies' outputs, and `guarded_call` for a seed run on its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

# "magnitude": a finite output far beyond its input's scale (see MAGNITUDE_FACTOR).
# "load": the kernel could not be built or its artifact was refused (recorded by the env).
# "nonfinite_grad": the kernel's own parameters got a NaN/Inf gradient (the layer checks).
# "host_grad": a kernel's backward sent a NaN/Inf gradient into the host (the trainer checks).
FAULT_KINDS = (
    "exception",
    "shape",
    "dtype",
    "device",
    "nonfinite",
    "magnitude",
    "nonfinite_grad",
    "host_grad",
    "slow",
    "load",
)


@dataclass(frozen=True)
class FaultRecord:
    layer: str
    slot: int
    blueprint: str
    kind: str  # one of FAULT_KINDS
    message: str
    step: int  # the layer's optimizer-step counter when it happened


@dataclass
class CircuitBreaker:
    """Counts faults of one seed; `tripped` once `max_faults` have been seen."""

    max_faults: int = 3
    faults: int = 0

    def __post_init__(self) -> None:
        if self.max_faults < 1:
            raise ValueError(f"max_faults must be >= 1, got {self.max_faults}")

    def record(self) -> bool:
        self.faults += 1
        return self.tripped

    @property
    def tripped(self) -> bool:
        return self.faults >= self.max_faults


# A kernel's output is a delta added to the host's activation h (its input, or h itself). One
# whose largest |entry| exceeds MAGNITUDE_FACTOR x (1 + max |h|) is refused: such a delta drowns
# the host's signal 10^4 times over (the 1 keeps the bound sane for an h near zero), which no
# delta fitted to the host's residual comes near, while a finite but huge one (3e38) overflows
# in the next layer, the loss or Adam's squared gradients and would otherwise end the episode as
# the host's divergence instead of a fault charged to the seed.
MAGNITUDE_FACTOR = 1e4


def max_abs(t: torch.Tensor) -> float:
    """max |t| as a float (NaN if t holds NaN or Inf; 0 if empty), with one device sync."""
    if t.numel() == 0:
        return 0.0
    # aminmax is one pass (a NaN makes both NaN); vector_norm(inf) is ~20x slower on a CPU.
    low, high = torch.stack(torch.aminmax(t.detach())).tolist()
    return max(-low, high) if math.isfinite(low) and math.isfinite(high) else math.nan


def output_fault(out: torch.Tensor, x: torch.Tensor) -> tuple[str, str] | None:
    """("nonfinite" | "magnitude", message) if kernel output `out` (of input `x`, same shape)
    holds NaN/Inf or exceeds MAGNITUDE_FACTOR x (1 + max |x|); None if it is fine. One reduction
    and one sync of `out`; `x` is only read when `out` exceeds the bound for x = 0."""
    out_max = max_abs(out)
    if not math.isfinite(out_max):
        return "nonfinite", "kernel output contains NaN or Inf"
    if out_max <= MAGNITUDE_FACTOR:
        return None
    in_max = max_abs(x)
    bound = MAGNITUDE_FACTOR * (1.0 + in_max)
    if out_max > bound:  # never when x holds NaN/Inf: a diverging host is not the seed's fault
        return "magnitude", (
            f"kernel output reaches |{out_max:.3g}| > {bound:.3g} "
            f"({MAGNITUDE_FACTOR:g} x (1 + max |input| {in_max:.3g}))"
        )
    return None


def form_fault(out, x: torch.Tensor) -> tuple[str, str] | None:
    """("shape" | "device" | "dtype", message) if a kernel output is not a tensor of its input's
    shape, device and dtype (one call's, or a stack of calls' against the stacked inputs); None
    if it is."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return "shape", f"expected output shape {tuple(x.shape)}, got {got}"
    # A float64 or off-device delta would make `h + delta` promote or raise in the host's next
    # layer, far from the kernel: refuse it here, where the fault can be named and contained.
    if out.device != x.device:
        return "device", f"expected output on {x.device}, got {out.device}"
    if out.dtype != x.dtype:
        return "dtype", f"expected output dtype {x.dtype}, got {out.dtype}"
    return None


def check_output(
    out: torch.Tensor,
    x: torch.Tensor,
    elapsed_s: float,
    latency_budget_s: float | None,
    copies: bool = False,
):
    """The faults of a well-formed kernel output (see `form_fault`): (keep the output, fault
    kind or None, message). "nonfinite" and "magnitude" drop it; "slow" keeps it (it was paid
    for already, and the breaker decides whether the seed stays).

    copies=True: `out` and `x` are stacks (copies, ...) of calls that took `elapsed_s` each;
    returns one triple per copy. One reduction and one sync over the whole stack decide when
    every copy is fine (finite and within the bound for any input); only otherwise is each
    copy checked on its own.
    """
    if not copies:  # one reduction and one sync per call of a running seed
        return _fault_or_slow(output_fault(out, x), elapsed_s, latency_budget_s)
    fine = max_abs(out) <= MAGNITUDE_FACTOR
    return [
        _fault_or_slow(None if fine else output_fault(out[k], x[k]), elapsed_s, latency_budget_s)
        for k in range(len(out))
    ]


def _fault_or_slow(fault, elapsed_s: float, budget_s: float | None) -> tuple[bool, str | None, str]:
    if fault is not None:
        return False, *fault
    if budget_s is not None and elapsed_s > budget_s:
        return True, "slow", f"kernel took {elapsed_s * 1e3:.1f} ms > {budget_s * 1e3:.1f} ms"
    return True, None, ""


def guarded_call(
    kernel, x: torch.Tensor, latency_budget_s: float | None
) -> tuple[torch.Tensor | None, str | None, str]:
    """Run `kernel(x)`; return (output or None, fault kind or None, message): the single env's
    call of a seed, and the batched simulator's for a seed that runs on its own."""
    start = time.perf_counter()
    try:
        out = kernel(x)
    except Exception as exc:
        return None, "exception", f"{type(exc).__name__}: {exc}"[:500]
    elapsed = time.perf_counter() - start
    fault = form_fault(out, x)
    if fault is not None:
        return None, *fault
    keep, kind, message = check_output(out, x, elapsed, latency_budget_s)
    return (out if keep else None), kind, message
