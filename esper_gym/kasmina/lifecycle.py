"""Seed lifecycle: the states and the one table of allowed transitions.

```
DORMANT ─► GERMINATED ─► TRAINING ─► BLENDING ─► PROBATION ─► FOSSILIZED
                 │            │           │            │            │
                 └────────────┴───────────┴─► CULLED ◄─┴────────────┘ (fossils: breaker only)
                                               │
                                               ▼
                                  EMBARGOED (n steps) ─► DORMANT
```
Everything else (the layer, the action mask, the heuristic agent) asks this module.
"""

from __future__ import annotations

import enum


class SeedState(enum.IntEnum):
    DORMANT = 0
    GERMINATED = 1  # kernel loaded, not run
    TRAINING = 2  # kernel learns from the task loss; the host's output is untouched
    BLENDING = 3  # alpha ramps 0 -> 1
    PROBATION = 4  # alpha 1, still removable
    FOSSILIZED = 5  # permanent part of the host, alpha 1
    CULLED = 6  # kernel dropped; becomes EMBARGOED on the next step
    EMBARGOED = 7  # slot unusable for a while so that germinate/cull churn cannot repeat at once


S = SeedState
TRANSITIONS: dict[SeedState, frozenset[SeedState]] = {
    S.DORMANT: frozenset({S.GERMINATED}),
    S.GERMINATED: frozenset({S.TRAINING, S.CULLED}),
    S.TRAINING: frozenset({S.BLENDING, S.CULLED}),
    S.BLENDING: frozenset({S.PROBATION, S.CULLED}),
    S.PROBATION: frozenset({S.FOSSILIZED, S.CULLED}),
    # Only the circuit breaker may cull a fossil: a fossil that keeps faulting must not stay.
    S.FOSSILIZED: frozenset({S.CULLED}),
    S.CULLED: frozenset({S.EMBARGOED}),
    S.EMBARGOED: frozenset({S.DORMANT}),
}

# The named state sets: every "which seeds are ..." question asks one of these.
# Growing: a kernel is loaded and the seed is still on its way to FOSSILIZED (agents advance these).
GROWING = frozenset({S.GERMINATED, S.TRAINING, S.BLENDING, S.PROBATION})
# Unblended: growing seeds below alpha 1 (PROBATION is at 1): they have not taken over yet.
UNBLENDED = frozenset({S.GERMINATED, S.TRAINING, S.BLENDING})
# Present: the slot holds a kernel, growing or fossilized (the `live_seeds` global counts these).
PRESENT = GROWING | {S.FOSSILIZED}
# Running: the kernel takes part in the forward pass (a GERMINATED kernel is loaded, not run).
RUNNING = frozenset({S.TRAINING, S.BLENDING, S.PROBATION, S.FOSSILIZED})
# Cullable by the agent: exactly the growing seeds (a fossil is permanent as far as the agent is
# concerned; only the circuit breaker culls it).
CULLABLE = GROWING
# What an agent's ADVANCE does; BLENDING -> PROBATION happens by itself when the ramp completes.
ADVANCE_TO: dict[SeedState, SeedState] = {
    S.GERMINATED: S.TRAINING,
    S.TRAINING: S.BLENDING,
    S.PROBATION: S.FOSSILIZED,
}


class IllegalTransition(ValueError):
    """A seed was asked to move along an edge that is not in TRANSITIONS."""


def check_transition(src: SeedState, dst: SeedState) -> None:
    if dst not in TRANSITIONS[src]:
        allowed = ", ".join(s.name for s in sorted(TRANSITIONS[src])) or "nothing"
        raise IllegalTransition(
            f"illegal seed transition {src.name} -> {dst.name}; from {src.name} only: {allowed}"
        )
