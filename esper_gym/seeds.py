"""One record per germination, followed to its end: what `info["seeds"]` reports and what the
kernel store learns from (`SeedOutcome`, Karn's history).

A seed's record opens at GERMINATE and follows its slot each step. Its fate is settled once:
"fossilized" (its contribution measured in the step it fossilized), "culled" (its last
contribution measured before the cull) or, when the episode ends with it still growing,
"live". The info entry keeps following a fossil's slot (state and contribution) to the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from esper_gym.kasmina import SeedState

# A lifecycle event's target state -> the fate it settles.
FATE = {SeedState.FOSSILIZED.name: "fossilized", SeedState.CULLED.name: "culled"}


@dataclass
class SeedRecord:
    step: int  # env step of the germination
    progress: float  # share of the training budget spent then
    layer: int
    layer_name: str
    slot: int
    blueprint: dict[str, Any]  # Blueprint.to_dict() of the kernel grown
    params: int
    start: int  # optimizer step of the germination (the outcome's age counts from it)
    features: dict[str, float]  # the node's health at germination (the outcome's features)
    contribution: float = 0.0  # the last measured while the seed is followed
    state: str = SeedState.GERMINATED.name
    culled: bool = False
    fate: str | None = None  # settled once: fossilized, culled or live
    fate_contribution: float = 0.0
    age: int = 0  # optimizer steps from germination to its fate

    def info(self) -> dict[str, Any]:
        """The `info["seeds"]` entry: `outcome` is CULLED for a culled seed, else its state."""
        return {
            "step": self.step,
            "progress": self.progress,
            "layer": self.layer,
            "layer_name": self.layer_name,
            "slot": self.slot,
            "blueprint": self.blueprint["name"],
            "params": self.params,
            "contribution": self.contribution,
            "state": self.state,
            "outcome": SeedState.CULLED.name if self.culled else self.state,
        }


@dataclass
class SeedLog:
    """The episode's seed records, in germination order."""

    records: list[SeedRecord] = field(default_factory=list)

    def add(self, record: SeedRecord) -> None:
        self.records.append(record)

    def follow(self, events: Sequence[dict], slots, steps_done: int) -> list[SeedRecord]:
        """Follow every open record through this step's lifecycle `events`; `slots(layer,
        slot)` is the slot now. Returns the records whose fate was settled now, in event order.
        """
        culled = {(e["layer"], e["slot"]) for e in events if e["to"] == SeedState.CULLED.name}
        for r in self.records:
            if r.culled:
                continue
            if (r.layer_name, r.slot) in culled:
                r.culled = True  # keeps the contribution measured before the cull
                continue
            slot = slots(r.layer, r.slot)
            r.state, r.contribution = slot.state.name, float(slot.contribution)
        settled = []
        for event in events:
            if event["to"] not in FATE:
                continue
            for r in self._open():
                if (r.layer_name, r.slot) == (event["layer"], event["slot"]):
                    # A fossil was measured after this step (followed above); a culled seed's
                    # measure died with it (its record kept the one of the step before).
                    self._settle(r, FATE[event["to"]], r.contribution, steps_done)
                    settled.append(r)
                    break
        return settled

    def end(self, steps_done: int) -> list[SeedRecord]:
        """The episode ended: every open record's fate is "live"."""
        open_ = self._open()
        for r in open_:
            self._settle(r, "live", r.contribution, steps_done)
        return open_

    def info(self) -> list[dict[str, Any]]:
        return [r.info() for r in self.records]

    def _open(self) -> list[SeedRecord]:
        return [r for r in self.records if r.fate is None]

    @staticmethod
    def _settle(r: SeedRecord, fate: str, contribution: float, steps_done: int) -> None:
        r.fate, r.fate_contribution, r.age = fate, contribution, steps_done - r.start


def node_context(layer, progress: float, val_acc: float) -> dict[str, float]:
    """The node's health now, plus where the episode is: what a generator is given and what a
    seed's record keeps as its features at germination."""
    sig = layer.health()
    return {
        "act_mean": sig.act_mean,
        "act_var": sig.act_var,
        "dead_ratio": sig.dead_ratio,
        "grad_norm": sig.grad_norm,
        "weight_norm": sig.weight_norm,
        "fan_in": float(sig.fan_in),
        "fan_out": float(sig.fan_out),
        "progress": progress,
        "val_acc": val_acc,
    }


def finite_or(value: float, fallback: float) -> float:
    return value if math.isfinite(value) else fallback
