"""Action encoding: one flat `Discrete(A)` for WAIT and every slot-level decision.

Layout, with N = max_nodes, S = seed slots per layer, B = blueprints in the library:

    0                                   WAIT
    1 + (n * S + s) * (B + 2) + b       GERMINATE blueprint b in slot s of layer n   (b < B)
    1 + (n * S + s) * (B + 2) + B       ADVANCE slot s of layer n
    1 + (n * S + s) * (B + 2) + B + 1   CULL slot s of layer n

So A = 1 + N * S * (B + 2), and the slot-level block of node n is contiguous: a policy can
emit (S * (B + 2)) logits per node and one global logit for WAIT, then concatenate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from esper_gym.kasmina import ADVANCE_TO, CULLABLE, SeedState

WAIT, GERMINATE, ADVANCE, CULL = "wait", "germinate", "advance", "cull"


@dataclass(frozen=True)
class Action:
    kind: str
    layer: int = -1
    slot: int = -1
    blueprint: int = -1

    def describe(self, blueprints: tuple[str, ...] = ()) -> str:
        if self.kind == WAIT:
            return "wait"
        where = f"layer{self.layer}.slot{self.slot}"
        if self.kind == GERMINATE:
            name = blueprints[self.blueprint] if blueprints else str(self.blueprint)
            return f"germinate({where}, {name})"
        return f"{self.kind}({where})"


@dataclass(frozen=True)
class ActionLayout:
    max_nodes: int
    slots: int
    blueprints: int

    @property
    def per_slot(self) -> int:
        return self.blueprints + 2

    @property
    def per_node(self) -> int:
        return self.slots * self.per_slot

    @property
    def size(self) -> int:
        return 1 + self.max_nodes * self.per_node

    def decode(self, index: int) -> Action:
        if not 0 <= index < self.size:
            raise ValueError(
                f"action {index} out of range: the action space is Discrete({self.size})"
            )
        if index == 0:
            return Action(WAIT)
        cell, j = divmod(index - 1, self.per_slot)
        layer, slot = divmod(cell, self.slots)
        if j < self.blueprints:
            return Action(GERMINATE, layer, slot, j)
        return Action(ADVANCE if j == self.blueprints else CULL, layer, slot)

    def encode(self, action: Action) -> int:
        if action.kind == WAIT:
            return 0
        base = 1 + (action.layer * self.slots + action.slot) * self.per_slot
        if action.kind == GERMINATE:
            return base + action.blueprint
        if action.kind == ADVANCE:
            return base + self.blueprints
        if action.kind == CULL:
            return base + self.blueprints + 1
        raise ValueError(
            f"unknown action kind {action.kind!r}; allowed: wait, germinate, advance, cull"
        )


def action_mask(layout: ActionLayout, layers, offered) -> np.ndarray:
    """Which actions are valid now (int8, 1 = valid), from each slot's lifecycle state: WAIT
    always; GERMINATE in a DORMANT slot for the blueprints `offered(layer)` says fit it;
    ADVANCE and CULL where the lifecycle table allows them."""
    mask = np.zeros(layout.size, np.int8)
    mask[0] = 1
    for n, layer in enumerate(layers):
        for s, slot in enumerate(layer.slots):
            base = layout.encode(Action(GERMINATE, n, s, 0))
            if slot.state == SeedState.DORMANT:
                mask[base : base + layout.blueprints] = offered(layer)
            mask[base + layout.blueprints] = slot.state in ADVANCE_TO
            mask[base + layout.blueprints + 1] = slot.state in CULLABLE
    return mask
