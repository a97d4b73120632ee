"""A validated artifact, loaded and run: `load_program`, the checks before a graph first runs
for real (a dry run on the meta device and the cost bound), `KernelTemplate` and `Kernel`.

Only archives that `esper_gym.kernels.validator` rebuilt ever reach `torch.export.load` here.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from esper_gym.kernels.blueprints import blueprint_from_dict
from esper_gym.kernels.validator import KernelMetadata, KernelRejected, Shape, validated_archive

# A kernel's intermediates for one sample may not exceed this (checked on the meta device
# before a kernel first runs): allowed ops can still allocate without bound (cat of x with
# itself, doubled 30 times).
MAX_BYTES_PER_SAMPLE = 4 * 2**20


def load_artifact(
    artifact: bytes,
    meta: KernelMetadata | None = None,
    expected_shape: Sequence[int] | None = None,
) -> torch.export.ExportedProgram:
    """validate_artifact, then torch.export.load of the rebuilt archive (never of `artifact`),
    then a dry run of the graph on shapes (`KernelTemplate.from_program`) before anyone runs it,
    and with `meta`, its cost against its blueprint's (`check_cost`)."""
    return _checked_load(artifact, meta, expected_shape)[0]


def _checked_load(
    artifact: bytes, meta: KernelMetadata | None, expected_shape: Sequence[int] | None = None
) -> tuple[torch.export.ExportedProgram, KernelTemplate]:
    """What `load_artifact` does, and the template it dry-ran (an unpickled Kernel needs it)."""
    _, canonical = validated_archive(artifact, meta, expected_shape)
    name = meta.sha256 if meta is not None else hashlib.sha256(artifact).hexdigest()
    program = load_program(canonical, name)
    template = KernelTemplate.from_program(program)
    if meta is not None:
        check_cost(template.cost, meta.blueprint, meta.input_shape, name)
    return program, template


class _LoadFailure(logging.Filter):
    """Keeps the error torch.export.load logs (with a traceback) before it raises a generic
    one ("check the warnings above"), and drops that log record."""

    error: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.error = record.exc_info[1]
            return False
        return True


def load_program(canonical: bytes, name: str) -> torch.export.ExportedProgram:
    """torch.export.load of an archive `validated_archive` rebuilt. An archive the static checks
    pass can still fail inside torch (a schema version, a dangling tensor name): that is a
    one-line KernelRejected naming kernel `name` and torch's own reason, never a raw error."""
    caught = _LoadFailure()
    logger = logging.getLogger("torch.export")
    logger.addFilter(caught)
    try:
        return torch.export.load(io.BytesIO(canonical))
    except Exception as e:
        reason: BaseException = caught.error or e
        while reason.__cause__ is not None:  # the innermost error says what was wrong
            reason = reason.__cause__
        text = " ".join(f"{type(reason).__name__}: {reason}".split())
        raise KernelRejected(f"kernel {name}: torch.export.load failed: {text}"[:400]) from None
    finally:
        logger.removeFilter(caught)


class Kernel(nn.Module):
    """A seed's kernel: the validated graph of an artifact, run directly, with its own tensors.

    The graph is the ExportedProgram's lifted `graph_module`: its parameters and buffers are
    inputs, so one graph serves every kernel made from the same artifact (it is shared, not
    copied) and each kernel passes its own tensors. Calling it directly skips what
    `ExportedProgram.module()` adds around the graph (input-constraint pre-hook, pytree
    flattening; ~3x the cost of a small kernel's call); shapes are checked by the caller
    (`guarded_call`). Parameters and buffers are registered as p0, p1, .../b0, ... in the
    graph's input order; `named_state()` gives them under the original module's names.

    It pickles (and deep-copies) as its artifact bytes, metadata and live tensors; unpickling
    validates the artifact again before loading it, and puts the very same tensor objects back,
    so an optimizer pickled alongside still points at the kernel's parameters. Train/eval
    behaviour was fixed at export time (no blueprint uses dropout or batch norm).
    """

    def __init__(
        self,
        graph: torch.fx.GraphModule,
        names: Sequence[str],
        tensors: Sequence[torch.Tensor],
        artifact: bytes | None = None,
        meta: KernelMetadata | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "graph", graph)  # shared between kernels: not a submodule
        self.names = tuple(names)
        self.artifact, self.meta = artifact, meta
        self._slots: list[str] = []
        for i, tensor in enumerate(tensors):
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(f"p{i}", tensor)
                self._slots.append(f"p{i}")
            else:
                self.register_buffer(f"b{i}", tensor)
                self._slots.append(f"b{i}")

    def flat_state(self) -> list[torch.Tensor]:
        """The graph's state inputs, in its order."""
        return [getattr(self, slot) for slot in self._slots]

    def named_state(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.flat_state()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph.forward(*self.flat_state(), x)[0]

    def __reduce__(self):
        if self.artifact is None:
            raise TypeError("a Kernel instantiated without its artifact bytes cannot be pickled")
        meta = self.meta.to_json() if self.meta is not None else None
        return (_rebuild_kernel, (self.artifact, meta, self.flat_state(), self.training))


def _rebuild_kernel(artifact: bytes, meta_json: str | None, tensors: list, training: bool):
    meta = KernelMetadata.from_json(meta_json) if meta_json is not None else None
    template = _checked_load(artifact, meta)[1]
    if len(tensors) != len(template.tensors):
        raise KernelRejected(f"pickled kernel has {len(tensors)} tensors, its graph takes more")
    kernel = Kernel(template.graph, template.names, tensors, artifact, meta)
    kernel.training = training
    return kernel


@dataclass(frozen=True)
class KernelTemplate:
    """What every kernel made from one artifact shares: the graph, and the initial tensors."""

    graph: torch.fx.GraphModule
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    cost: KernelCost  # measured by the dry run, before the graph ever runs for real

    @classmethod
    def from_program(cls, program: torch.export.ExportedProgram) -> KernelTemplate:
        signature = program.graph_signature
        names, tensors = [], []
        for spec in signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                continue
            if spec.kind == InputKind.PARAMETER or (
                spec.kind == InputKind.BUFFER and spec.persistent
            ):
                tensor = program.state_dict[spec.target]
            else:  # non-persistent buffers and lifted constants
                tensor = program.constants[spec.target]
            names.append(spec.target)
            tensors.append(tensor)
        user = [s for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
        if len(user) != 1 or signature.input_specs[-1] is not user[0]:
            raise KernelRejected("a kernel's graph takes its state, then one tensor")
        if [s.kind for s in signature.output_specs] != [OutputKind.USER_OUTPUT]:
            raise KernelRejected("a kernel's graph returns one tensor and mutates nothing")
        cost = dry_run(program.graph_module, tensors, user[0].arg.name)
        return cls(program.graph_module, tuple(names), tuple(tensors), cost)

    def instantiate(self, artifact: bytes | None = None, meta: KernelMetadata | None = None):
        """A fresh trainable `Kernel` that owns clones of the initial tensors (aliases within
        the program stay aliases); training it never touches the template or other kernels."""
        clones: dict[int, torch.Tensor] = {}
        for tensor in self.tensors:
            if id(tensor) not in clones:
                copy = tensor.detach().clone()
                if isinstance(tensor, nn.Parameter):
                    copy = nn.Parameter(copy, requires_grad=tensor.requires_grad)
                clones[id(tensor)] = copy
        return Kernel(self.graph, self.names, [clones[id(t)] for t in self.tensors], artifact, meta)


# --- cost bound --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelCost:
    """What one sample through a kernel's forward costs, counted on the meta device."""

    flops: float
    bytes: float  # every tensor its ops allocate: an upper bound of its peak memory


# A kernel may cost at most COST_FACTOR times its blueprint template's own cost for the same slot
# shape, in FLOPs and in bytes, or COST_FLOOR, whichever is more. An honest artifact costs what
# its template costs (the same ops, counted the same way; measured ratios 0.96-1.00 over every
# blueprint, default and largest size, on linear and conv shapes), so 8x leaves room for a
# torch version that exports an op differently, while an allowed-ops-only graph that does
# quadratic work (attention over a sequence thousands long built from a 32-wide slot) is
# 10^3-10^5x over. The floor keeps tiny templates (norm on D=2:
# ~10 FLOPs) from refusing a kernel for rounding; within it a batch of 128 costs ~13 MFLOP and
# 8 MiB, about a millisecond's work.
COST_FACTOR = 8.0
COST_FLOOR = KernelCost(flops=1e5, bytes=2.0**16)


class _CostMode(TorchDispatchMode):
    """Adds up what the aten ops a run dispatches would cost: torch's FLOP formula where it has
    one (matmuls, convolutions), else one per element of the op's largest operand; and the
    bytes of every tensor an op allocates (views allocate nothing). On the meta device nothing
    is computed, and attention is dispatched as its math decomposition, whose L x S scores (what
    the batched simulator's vmap rewrite materialises) are counted like any other tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        else:
            sizes = [t.numel() for t in tree_leaves((args, kwargs, out)) if _is_tensor(t)]
            self.flops += max(sizes, default=0)
        self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(out) if _is_tensor(t))
        return out


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


@functools.lru_cache(maxsize=1024)
def template_cost(blueprint_json: str, shape: Shape, batch: int = 256) -> KernelCost:
    """What one sample costs the blueprint's own module (its canonical JSON) on a slot of `shape`:
    built and run on the meta device, so no weights and no arithmetic."""
    blueprint = blueprint_from_dict(json.loads(blueprint_json))
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        module = blueprint.build(shape)
    x = torch.empty((batch, *shape), device="meta")
    with torch.no_grad(), _CostMode() as cost:
        module(x)
    return KernelCost(cost.flops / batch, cost.bytes / batch)


def cost_problem(cost: KernelCost, blueprint: dict[str, Any], shape: Sequence[int]) -> str | None:
    """Why a kernel costing `cost` may not serve as `blueprint` on a slot of `shape` (None: it
    may): over max(COST_FACTOR x the template's own cost, COST_FLOOR) in FLOPs or bytes."""
    shape = tuple(int(s) for s in shape)
    try:
        ref = template_cost(json.dumps(blueprint, sort_keys=True), shape)
    except Exception as e:  # an unknown or unbuildable blueprint leaves nothing to compare to
        return (
            f"its blueprint {blueprint} cannot be built for shape {shape} to bound its cost ({e})"
        )
    flops = max(COST_FACTOR * ref.flops, COST_FLOOR.flops)
    nbytes = max(COST_FACTOR * ref.bytes, COST_FLOOR.bytes)
    if cost.flops <= flops and cost.bytes <= nbytes:
        return None
    return (
        f"costs {cost.flops:.3g} FLOPs and {cost.bytes:.3g} bytes per sample; its blueprint "
        f"{blueprint.get('name')} costs {ref.flops:.3g} FLOPs and {ref.bytes:.3g} bytes for shape "
        f"{shape}, so the budget is {flops:.3g} FLOPs and {nbytes:.3g} bytes "
        f"(max({COST_FACTOR:g}x, {COST_FLOOR.flops:.3g} FLOPs, {COST_FLOOR.bytes:.3g} bytes))"
    )


def check_cost(
    cost: KernelCost, blueprint: dict[str, Any], shape: Sequence[int], name: str
) -> None:
    """KernelRejected (naming kernel `name`, its cost and the budget) if `cost_problem`."""
    problem = cost_problem(cost, blueprint, shape)
    if problem is not None:
        raise KernelRejected(f"kernel {name}: {problem}")


def dry_run(
    graph: torch.fx.GraphModule, tensors: list, input_name: str, batch: int = 256
) -> KernelCost:
    """Run the graph once on the meta device (shapes only: no memory, no arithmetic) before
    it ever runs for real: KernelRejected if its intermediates need more than
    MAX_BYTES_PER_SAMPLE per sample, or its output is not the shape its graph declares.
    Returns what one sample costs (`_CostMode`), for `check_cost`."""
    placeholders = {n.name: n for n in graph.graph.nodes if n.op == "placeholder"}
    outputs = [n for n in graph.graph.nodes if n.op == "output"]
    if input_name not in placeholders or len(outputs) != 1 or len(outputs[0].args[0]) != 1:
        raise KernelRejected(
            "a kernel's graph takes its input as a placeholder, returns one tensor"
        )
    feature_shape = tuple(int(d) for d in placeholders[input_name].meta["val"].shape[1:])
    (out_node,) = outputs[0].args[0]
    declared = tuple(int(d) for d in out_node.meta["val"].shape[1:])
    budget = batch * MAX_BYTES_PER_SAMPLE
    used = 0

    class Probe(torch.fx.Interpreter):
        def run_node(self, n):
            nonlocal used
            out = super().run_node(n)
            for value in tree_leaves(out):
                if isinstance(value, torch.Tensor) and n.op == "call_function":
                    used += value.numel() * value.element_size()
            if used > budget:
                raise KernelRejected(
                    f"kernel needs over {used // batch} bytes of intermediates per sample at "
                    f"node {n.name}; at most {MAX_BYTES_PER_SAMPLE} allowed"
                )
            return out

    state = [torch.empty_like(t, device="meta") for t in tensors]
    x = torch.empty((batch, *feature_shape), device="meta")
    try:
        with torch.no_grad(), _CostMode() as cost:
            (out,) = Probe(graph).run(*state, x)
    except KernelRejected:
        raise
    except Exception as e:  # a graph that cannot even run on shapes is not a kernel
        raise KernelRejected(
            f"kernel graph fails on shapes: {type(e).__name__}: {e}"[:300]
        ) from None
    if tuple(out.shape) != (batch, *declared):
        raise KernelRejected(f"kernel returns {tuple(out.shape)}, its graph declares {declared}")
    return KernelCost(cost.flops / batch, cost.bytes / batch)


def instantiate(
    program: torch.export.ExportedProgram,
    artifact: bytes | None = None,
    meta: KernelMetadata | None = None,
) -> Kernel:
    """A fresh trainable `Kernel` from `program` that owns its parameters and buffers.

    Pass the `artifact` the program came from to make the kernel picklable. Loops that make
    many kernels from one program should keep its `KernelTemplate` (the cache does).
    """
    return KernelTemplate.from_program(program).instantiate(artifact, meta)
