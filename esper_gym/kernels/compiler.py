"""Blueprint -> torch.export artifact bytes + KernelMetadata: `compile_blueprint`, `recipe_key`.

What happens to the bytes afterwards lives next door: the static checks in
`esper_gym.kernels.validator`, loading and running in `esper_gym.kernels.kernel`.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Sequence

import torch

from esper_gym import numerics
from esper_gym.kernels.blueprints import Blueprint
from esper_gym.kernels.kernel import (
    COST_FACTOR,
    COST_FLOOR,
    MAX_BYTES_PER_SAMPLE,
    Kernel,
    KernelCost,
    KernelTemplate,
    check_cost,
    cost_problem,
    instantiate,
    load_artifact,
    load_program,
)
from esper_gym.kernels.validator import (
    ALLOWED_OPS,
    MAX_NODES,
    SAFE_PICKLE_GLOBALS,
    ArtifactInfo,
    KernelMetadata,
    KernelRejected,
    Shape,
    inspect_artifact,
    is_fault_blueprint,
    op_schema_problem,
    scan_pickle,
    shape_problem,
    validate_artifact,
    validated_archive,
)

__all__ = [  # the export, then the names that lived here before the split
    "ALLOWED_OPS",
    "COST_FACTOR",
    "COST_FLOOR",
    "FORMAT_VERSION",
    "MAX_BYTES_PER_SAMPLE",
    "MAX_NODES",
    "SAFE_PICKLE_GLOBALS",
    "ArtifactInfo",
    "Kernel",
    "KernelCost",
    "KernelMetadata",
    "KernelRejected",
    "KernelTemplate",
    "Shape",
    "check_cost",
    "compile_blueprint",
    "cost_problem",
    "inspect_artifact",
    "instantiate",
    "is_fault_blueprint",
    "load_artifact",
    "load_program",
    "op_schema_problem",
    "recipe_key",
    "scan_pickle",
    "shape_problem",
    "validate_artifact",
    "validated_archive",
]

# Part of every recipe key: bump it when a template's code changes so that stored artifacts
# compiled from the old code stop matching new recipes.
FORMAT_VERSION = 1

# Batch of the example input. Export specialises sizes 0 and 1, so the example must be >= 2;
# the exported batch dimension stays dynamic and batch 1 runs fine.
_EXAMPLE_BATCH = 2


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def recipe_key(
    blueprint: Blueprint, shape: Sequence[int], dtype: torch.dtype | str = "float32", seed: int = 0
) -> str:
    """sha256 of the canonical JSON of everything that determines an artifact's bytes.

    Includes the torch version (archives are tied to it), FORMAT_VERSION (template code) and
    the numerics the weights were drawn under (`numerics.tag()`): a template's initial weights
    come from ATen's random kernels, which draw other floats on another CPU capability, so an
    artifact compiled natively must never serve a portable run (or another capability's).
    """
    recipe = {
        "blueprint": blueprint.to_dict(),
        "shape": [int(s) for s in shape],
        "dtype": _dtype_name(dtype),
        "seed": int(seed),
        "torch": torch.__version__,
        "format": FORMAT_VERSION,
        "numerics": numerics.tag(),
    }
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def compile_blueprint(
    blueprint: Blueprint,
    shape: Sequence[int],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[bytes, KernelMetadata]:
    """Build `blueprint` for slot `shape`, torch.export it with a dynamic batch, save to bytes.

    The same (blueprint, shape, seed, dtype) gives the same bytes. The initial weights come from
    the CPU RNG seeded with `seed` inside `fork_rng`, so the caller's global RNG is untouched.
    ValueError if the blueprint does not support `shape`.
    """
    shape = tuple(int(s) for s in shape)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        module = blueprint.build(shape).to(dtype)
    example = torch.zeros((_EXAMPLE_BATCH, *shape), dtype=dtype)
    program = torch.export.export(
        module, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
    )
    # Stack traces embed absolute source paths and line numbers: identical kernels compiled from
    # different checkouts would hash differently (and leak paths) if they stayed in.
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    # The output shape as traced, not assumed: fault_shape's differs from its input's.
    (out,) = next(n for n in program.graph.nodes if n.op == "output").args[0]
    output_shape = tuple(int(s) for s in out.meta["val"].shape[1:])
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    artifact = buffer.getvalue()
    meta = KernelMetadata(
        sha256=hashlib.sha256(artifact).hexdigest(),
        blueprint=blueprint.to_dict(),
        input_shape=shape,
        output_shape=output_shape,
        param_count=sum(p.numel() for p in module.parameters()),
        dtype=_dtype_name(dtype),
        compile_seconds=time.perf_counter() - start,
        size_bytes=len(artifact),
        torch_version=torch.__version__,
        recipe_key=recipe_key(blueprint, shape, dtype, seed),
    )
    return artifact, meta
