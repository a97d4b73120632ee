"""Phase 1 execution: KasminaLayer, its seed slots and their fault handling."""

from esper_gym.kasmina.layer import (
    KasminaLayer,
    SeedConfig,
    SeedSlot,
    blend_alpha,
    kasmina_layers,
)
from esper_gym.kasmina.lifecycle import (
    ADVANCE_TO,
    CULLABLE,
    GROWING,
    PRESENT,
    RUNNING,
    TRANSITIONS,
    UNBLENDED,
    IllegalTransition,
    SeedState,
    check_transition,
)
from esper_gym.kasmina.recovery import FAULT_KINDS, CircuitBreaker, FaultRecord
from esper_gym.kasmina.telemetry import HealthSignal, SlotSignal

__all__ = [
    "ADVANCE_TO",
    "CULLABLE",
    "FAULT_KINDS",
    "GROWING",
    "PRESENT",
    "RUNNING",
    "TRANSITIONS",
    "UNBLENDED",
    "CircuitBreaker",
    "FaultRecord",
    "HealthSignal",
    "IllegalTransition",
    "KasminaLayer",
    "SeedConfig",
    "SeedSlot",
    "SeedState",
    "SlotSignal",
    "blend_alpha",
    "check_transition",
    "kasmina_layers",
]
