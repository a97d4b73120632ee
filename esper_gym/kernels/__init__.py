"""Blueprints to kernels: templates, generator, torch.export compiler, validator, runtime kernel,
store and cache. This package only re-exports; the path a GERMINATE takes is
`library.load_or_compile`.
"""

from esper_gym.kernels.blueprints import (
    BLUEPRINTS,
    DEFAULT_LIBRARY,
    EXTRA_LIBRARY,
    FAULT_LIBRARY,
    Blueprint,
    blueprint_from_dict,
    host_kind,
)
from esper_gym.kernels.cache import CacheStats, KernelCache, KernelIncompatible
from esper_gym.kernels.compiler import compile_blueprint, recipe_key
from esper_gym.kernels.generator import BlueprintGenerator, ProposalContext
from esper_gym.kernels.kernel import Kernel, KernelCost, KernelTemplate, instantiate, load_artifact
from esper_gym.kernels.library import load_or_compile
from esper_gym.kernels.store import KernelStore, SeedOutcome
from esper_gym.kernels.validator import (
    SAFE_PICKLE_GLOBALS,
    ArtifactInfo,
    KernelMetadata,
    KernelRejected,
    inspect_artifact,
    validate_artifact,
)

__all__ = [
    "BLUEPRINTS",
    "DEFAULT_LIBRARY",
    "EXTRA_LIBRARY",
    "FAULT_LIBRARY",
    "SAFE_PICKLE_GLOBALS",
    "ArtifactInfo",
    "Blueprint",
    "BlueprintGenerator",
    "CacheStats",
    "Kernel",
    "KernelCache",
    "KernelCost",
    "KernelIncompatible",
    "KernelMetadata",
    "KernelRejected",
    "KernelStore",
    "KernelTemplate",
    "ProposalContext",
    "SeedOutcome",
    "blueprint_from_dict",
    "compile_blueprint",
    "host_kind",
    "inspect_artifact",
    "instantiate",
    "load_artifact",
    "load_or_compile",
    "recipe_key",
    "validate_artifact",
]
