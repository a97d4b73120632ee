"""Blueprint -> torch.export artifact bytes + KernelMetadata, and the static checks before loading.

An artifact is what `torch.export.save` writes: a zip ("pt2 archive") holding the graph as JSON,
the weights as raw bytes, and a pickled copy of the example inputs. `torch.export.load` is not
safe on untrusted bytes: it unpickles the sample inputs with a fallback to weights_only=False,
loads `use_pickle` weights and constants with weights_only=False, sympifies (evals) the graph's
shape expressions, compiles `guards_code` into Python, and resolves op targets by attribute
lookup under `torch`. So `validate_artifact` checks all of that statically first — it never
imports, unpickles or runs anything from the artifact — and `load_artifact` calls torch only
after it passed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickletools
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper_gym.kernels.blueprints import BLUEPRINTS, Blueprint

Shape = tuple[int, ...]

# Part of every recipe key: bump it when a template's code changes so that stored artifacts
# compiled from the old code stop matching new recipes.
FORMAT_VERSION = 1

# Batch of the example input. Export specialises sizes 0 and 1, so the example must be >= 2;
# the exported batch dimension stays dynamic and batch 1 runs fine.
_EXAMPLE_BATCH = 2


class KernelRejected(ValueError):
    """An artifact failed a static check; nothing in it was imported, unpickled or executed."""


@dataclass(frozen=True)
class KernelMetadata:
    """What the store indexes about one artifact. Shapes exclude the batch dimension."""

    sha256: str
    blueprint: dict[str, Any]
    input_shape: Shape
    output_shape: Shape
    param_count: int
    dtype: str
    compile_seconds: float
    size_bytes: int
    torch_version: str
    recipe_key: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KernelMetadata:
        d = json.loads(text)
        d["input_shape"] = tuple(d["input_shape"])
        d["output_shape"] = tuple(d["output_shape"])
        return cls(**d)


@dataclass(frozen=True)
class ArtifactInfo:
    """What the static inspection read from an archive's graph JSON."""

    input_shape: Shape
    output_shape: Shape
    # Device types written as literals into the graph (e.g. a factory op's device=); such a graph
    # cannot be moved to another device. Weights are not literals: they move with `.to(device)`.
    devices: frozenset[str]


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def recipe_key(
    blueprint: Blueprint, shape: Sequence[int], dtype: torch.dtype | str = "float32", seed: int = 0
) -> str:
    """sha256 of the canonical JSON of everything that determines an artifact's bytes.

    Includes the torch version (archives are tied to it) and FORMAT_VERSION (template code).
    """
    recipe = {
        "blueprint": blueprint.to_dict(),
        "shape": [int(s) for s in shape],
        "dtype": _dtype_name(dtype),
        "seed": int(seed),
        "torch": torch.__version__,
        "format": FORMAT_VERSION,
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


# --- static validation -------------------------------------------------------------------------

# Every member torch.export.save writes for one exported program (checked against real archives).
# Left out on purpose: extra/ (free-form files), data/aotinductor/ (compiled shared objects),
# custom_obj_*/opaque_obj_* constants (unpickled unconditionally), legacy weights/<model>.pt.
_ARCHIVE_MEMBER = re.compile(
    r"archive/(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[A-Za-z0-9_]+\.json"
    r"|data/weights/(weight_\d+|[A-Za-z0-9_]+_weights_config\.json)"
    r"|data/constants/(tensor_\d+|[A-Za-z0-9_]+_constants_config\.json)"
    r"|data/sample_inputs/[A-Za-z0-9_]+\.pt)"
)
# Members of the torch.save zip that holds the sample inputs.
_TORCH_SAVE_MEMBER = re.compile(
    r"([A-Za-z0-9_]+)/(data\.pkl|data/\d+|byteorder|version|\.format_version"
    r"|\.storage_alignment|\.data/version|\.data/serialization_id)"
)

# Globals a pickle may reference: what torch.save writes for tensors (found by scanning real
# sample-input pickles: _rebuild_from_type_v2, _rebuild_tensor_v2, Tensor, FloatStorage,
# OrderedDict), plus the other typed storages and _rebuild_parameter, which torch writes the same
# way for other dtypes and for parameters. All of them only build tensors.
SAFE_PICKLE_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._tensor._rebuild_from_type_v2",
        "torch.Tensor",
        *(
            f"torch.{t}Storage"
            for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte")
        ),
        "torch.BoolStorage",
    }
)
_PICKLE_STRING_OPS = frozenset(
    {
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "UNICODE",
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
    }
)
_PICKLE_MEMO_OPS = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})

# Op targets the deserializer may resolve. It looks any "torch.x.y" up by getattr under torch
# (torch.serialization.os.system would resolve), so only aten ops and operator.* pass.
_GRAPH_TARGET = re.compile(r"(torch\.ops\.aten|_operator)\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
# Shape expressions are sympified (eval'd): allow symbols as export writes them, integers,
# arithmetic and the sympy/torch function names the deserializer itself provides.
_EXPR_SYMBOL = re.compile(
    r"Symbol\('[a-z]+\d+'(, (positive|integer|nonnegative|real|finite)=(True|False))*\)"
)
_EXPR_CHARS = re.compile(r"[A-Za-z0-9_+\-*/%(), <>=!]*")
_EXPR_NAMES = frozenset(
    {"_sym", "Max", "Min", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "True"}
    | {"False", "oo", "Mod", "PythonMod", "FloorDiv", "CleanDiv", "CeilDiv", "CeilToInt"}
    | {"FloorToInt", "TruncToInt", "ModularIndexing", "Where", "PowByNatural", "Identity"}
)


def scan_pickle(data: bytes, where: str) -> None:
    """Refuse a pickle stream that references any global outside SAFE_PICKLE_GLOBALS.

    Static: walks opcodes with pickletools.genops, never unpickles. A STACK_GLOBAL whose module
    and name are not string literals pushed right before it is refused (cannot be checked), as
    are extension-registry opcodes and malformed streams.
    """
    try:
        ops = list(pickletools.genops(data))
    except Exception as e:  # any parse failure: truncated, bad opcode, bad protocol...
        raise KernelRejected(f"{where}: malformed pickle ({e})") from None
    strings: list[str] = []
    for op, arg, _ in ops:
        if op.name in ("GLOBAL", "INST"):
            ref = arg.replace(" ", ".")
        elif op.name == "STACK_GLOBAL":
            if len(strings) < 2:
                raise KernelRejected(f"{where}: pickle uses STACK_GLOBAL on computed names")
            ref = f"{strings[-2]}.{strings[-1]}"
        elif op.name in ("EXT1", "EXT2", "EXT4"):
            raise KernelRejected(f"{where}: pickle uses the extension registry ({op.name})")
        else:
            if op.name in _PICKLE_STRING_OPS:
                strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
            elif op.name not in _PICKLE_MEMO_OPS:
                strings.clear()
            continue
        if ref not in SAFE_PICKLE_GLOBALS:
            raise KernelRejected(f"{where}: pickle references forbidden global {ref!r}")
        strings.clear()


def _open_zip(data: bytes, where: str) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        bad = archive.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise KernelRejected(f"{where}: not a readable zip archive ({e})") from None
    if bad is not None:
        raise KernelRejected(f"{where}: CRC check failed for member {bad!r}")
    names = archive.namelist()
    if len(names) != len(set(names)):
        # Python's zipfile and torch's reader could pick different copies of a duplicate.
        raise KernelRejected(f"{where}: duplicate member names")
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            # torch writes stored members; compressed ones could be decompression bombs.
            raise KernelRejected(f"{where}: member {info.filename!r} is compressed")
    return archive


def _check_torch_save(data: bytes, where: str) -> None:
    archive = _open_zip(data, where)
    roots = set()
    for name in archive.namelist():
        match = _TORCH_SAVE_MEMBER.fullmatch(name)
        if match is None:
            raise KernelRejected(f"{where}: unexpected member {name!r}")
        roots.add(match.group(1))
    if len(roots) != 1 or f"{next(iter(roots))}/data.pkl" not in archive.namelist():
        raise KernelRejected(f"{where}: not a torch.save archive (one root with data.pkl)")
    for name in archive.namelist():
        content = archive.read(name)
        if name.endswith(".pkl") or content.startswith(b"\x80"):
            scan_pickle(content, f"{where}:{name}")


def _check_expr(expr: str, where: str) -> None:
    stripped = _EXPR_SYMBOL.sub("_sym", expr)
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", stripped))
    if not _EXPR_CHARS.fullmatch(stripped) or not names <= _EXPR_NAMES:
        raise KernelRejected(f"{where}: refusing shape expression {expr!r}")


def _walk_graph(node: Any, where: str, devices: set[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _walk_graph(item, where, devices)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "target" and isinstance(value, str) and not _GRAPH_TARGET.fullmatch(value):
            raise KernelRejected(f"{where}: graph calls forbidden target {value!r}")
        elif key == "expr_str" and isinstance(value, str):
            _check_expr(value, where)
        elif key == "as_device" and isinstance(value, dict):
            devices.add(str(value.get("type")))
        elif key in ("as_custom_obj", "custom_obj_values", "guards_code") and value:
            raise KernelRejected(f"{where}: graph carries {key}, refused")
        else:
            _walk_graph(value, where, devices)


def _tensor_shape(graph: dict, arg: dict, what: str, where: str) -> Shape:
    try:
        sizes = graph["tensor_values"][arg["as_tensor"]["name"]]["sizes"]
    except (KeyError, TypeError):
        raise KernelRejected(f"{where}: the {what} is not a tensor") from None
    if not sizes or "as_expr" not in sizes[0]:
        raise KernelRejected(f"{where}: the {what} has no dynamic batch dimension")
    if not all(isinstance(s.get("as_int"), int) for s in sizes[1:]):
        raise KernelRejected(f"{where}: the {what} has non-static feature sizes")
    return tuple(s["as_int"] for s in sizes[1:])


def _check_payload_config(archive: zipfile.ZipFile, path: str, pattern: str) -> set[str]:
    """Refuse pickled payloads; return the raw-tensor members the config points to."""
    try:
        config = json.loads(archive.read(path))["config"]
        entries = list(config.items())
    except (KeyError, ValueError, AttributeError, TypeError) as e:
        raise KernelRejected(f"{path}: unreadable payload config ({e})") from None
    raw = set()
    directory = path.rsplit("/", 1)[0]
    for fqn, entry in entries:
        if not isinstance(entry, dict):
            raise KernelRejected(f"{path}: bad entry for {fqn!r}")
        if entry.get("use_pickle") is not False:
            raise KernelRejected(f"{path}: {fqn!r} is stored as a pickle (use_pickle), refused")
        name = entry.get("path_name")
        member = f"{directory}/{name}"
        if not isinstance(name, str) or not re.fullmatch(pattern, name):
            raise KernelRejected(f"{path}: {fqn!r} has a forbidden payload name {name!r}")
        if member not in archive.namelist():
            raise KernelRejected(f"{path}: payload {member!r} of {fqn!r} is missing")
        raw.add(member)
    return raw


def inspect_artifact(artifact: bytes) -> ArtifactInfo:
    """All structural checks of a pt2 archive; returns its shapes and the devices written into its graph.

    Refuses (KernelRejected): not a zip / truncated / CRC failure; members outside the pt2
    layout; anything but exactly one program named "model"; pickled weights or constants;
    a pickle anywhere that references a global outside SAFE_PICKLE_GLOBALS; graph op targets
    other than aten ops and operator.*; shape expressions beyond plain symbolic arithmetic;
    guard code and custom objects; not exactly one tensor input and output with a dynamic batch.
    """
    archive = _open_zip(artifact, "artifact")
    names = archive.namelist()
    for name in names:
        if not _ARCHIVE_MEMBER.fullmatch(name):
            raise KernelRejected(f"artifact: unexpected member {name!r} outside the pt2 layout")
    models = [n for n in names if n.startswith("archive/models/")]
    if models != ["archive/models/model.json"]:
        raise KernelRejected(f"artifact: expected one program archive/models/model.json: {models}")
    if archive.read("archive/archive_format") != b"pt2":
        raise KernelRejected("artifact: archive_format is not pt2")

    required = (
        "archive/data/weights/model_weights_config.json",
        "archive/data/constants/model_constants_config.json",
        "archive/data/sample_inputs/model.pt",
    )
    for path in required:
        if path not in names:
            raise KernelRejected(f"artifact: missing {path}")
    raw = _check_payload_config(archive, required[0], r"weight_\d+")
    raw |= _check_payload_config(archive, required[1], r"tensor_\d+")
    _check_torch_save(archive.read(required[2]), required[2])
    for name in names:
        # Raw tensor payloads are read as bytes, never unpickled, and may start with 0x80 by
        # chance; any other member that looks like a pickle is scanned.
        content = archive.read(name)
        if name not in raw and name != required[2] and content.startswith(b"\x80"):
            scan_pickle(content, name)

    where = "archive/models/model.json"
    try:
        doc = json.loads(archive.read(where))
        graph_module = doc["graph_module"]
        graph, signature = graph_module["graph"], graph_module["signature"]
        inputs = [s["user_input"]["arg"] for s in signature["input_specs"] if "user_input" in s]
        outputs = [s["user_output"]["arg"] for s in signature["output_specs"]]
    except (KeyError, ValueError, TypeError) as e:
        raise KernelRejected(f"{where}: unreadable program ({e!r})") from None
    devices: set[str] = set()
    _walk_graph(doc, where, devices)
    if len(inputs) != 1 or len(outputs) != 1:
        raise KernelRejected(f"{where}: a kernel takes one tensor and returns one tensor")
    return ArtifactInfo(
        input_shape=_tensor_shape(graph, inputs[0], "input", where),
        output_shape=_tensor_shape(graph, outputs[0], "output", where),
        devices=frozenset(devices),
    )


def is_fault_blueprint(meta: KernelMetadata | None) -> bool:
    """True when `meta` names a registered fault blueprint."""
    cls = BLUEPRINTS.get(meta.blueprint.get("name")) if meta is not None else None
    return cls is not None and cls.is_fault


def shape_problem(
    info: ArtifactInfo | KernelMetadata, expected_shape: Sequence[int], *, check_output: bool
) -> str | None:
    """Why a kernel with `info`'s shapes cannot serve a slot of `expected_shape` (None: it can)."""
    expected = tuple(int(s) for s in expected_shape)
    if tuple(info.input_shape) != expected:
        return f"kernel takes shape {tuple(info.input_shape)}, the slot has shape {expected}"
    if check_output and tuple(info.output_shape) != expected:
        return f"kernel returns shape {tuple(info.output_shape)}, the slot needs shape {expected}"
    return None


def validate_artifact(
    artifact: bytes,
    meta: KernelMetadata | None = None,
    expected_shape: Sequence[int] | None = None,
) -> ArtifactInfo:
    """Refuse (KernelRejected) an artifact that is corrupt, unsafe or does not fit; never runs it.

    Checks the sha256 and size against `meta`, everything `inspect_artifact` checks, the
    archive's shapes against `meta`'s, and its input and output shapes against `expected_shape`
    (the slot's shape). A registered fault blueprint's output shape is not checked against the
    slot: fault_shape exists to reach the runtime fault path. Returns what it read.
    """
    if meta is not None:
        digest = hashlib.sha256(artifact).hexdigest()
        if digest != meta.sha256:
            raise KernelRejected(f"artifact sha256 {digest} does not match metadata {meta.sha256}")
        if len(artifact) != meta.size_bytes:
            raise KernelRejected(f"artifact has {len(artifact)} bytes, metadata {meta.size_bytes}")
    info = inspect_artifact(artifact)
    if meta is not None and (info.input_shape, info.output_shape) != (
        tuple(meta.input_shape),
        tuple(meta.output_shape),
    ):
        raise KernelRejected(
            f"archive shapes {info.input_shape} -> {info.output_shape} do not match metadata "
            f"{tuple(meta.input_shape)} -> {tuple(meta.output_shape)}"
        )
    if expected_shape is not None:
        problem = shape_problem(info, expected_shape, check_output=not is_fault_blueprint(meta))
        if problem is not None:
            raise KernelRejected(problem)
    return info


def load_artifact(
    artifact: bytes,
    meta: KernelMetadata | None = None,
    expected_shape: Sequence[int] | None = None,
) -> torch.export.ExportedProgram:
    """validate_artifact, then torch.export.load."""
    validate_artifact(artifact, meta, expected_shape)
    return torch.export.load(io.BytesIO(artifact))


class Kernel(nn.Module):
    """A seed's kernel: the graph loaded from an artifact, with parameters of its own.

    It pickles (and deep-copies) as its artifact bytes, metadata and live tensors; unpickling
    validates the artifact again before loading it, and puts the very same tensor objects back,
    so an optimizer pickled alongside still points at the kernel's parameters.
    Train/eval behaviour was fixed at export time (no blueprint uses dropout or batch norm):
    `.train()` only sets the flag, since the loaded graph refuses mode switches.
    """

    def __init__(
        self, graph: nn.Module, artifact: bytes | None = None, meta: KernelMetadata | None = None
    ) -> None:
        super().__init__()
        self.graph = graph
        self.artifact, self.meta = artifact, meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> Kernel:
        self.training = mode
        return self

    def __reduce__(self):
        if self.artifact is None:
            raise TypeError("a Kernel instantiated without its artifact bytes cannot be pickled")
        tensors = dict(self.graph.named_parameters(remove_duplicate=False))
        tensors.update(self.graph.named_buffers(remove_duplicate=False))
        meta = self.meta.to_json() if self.meta is not None else None
        return (_rebuild_kernel, (self.artifact, meta, tensors, self.training))


def _rebuild_kernel(artifact: bytes, meta_json: str | None, tensors: dict, training: bool):
    meta = KernelMetadata.from_json(meta_json) if meta_json is not None else None
    graph = load_artifact(artifact, meta).module()
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        setattr(graph.get_submodule(owner), leaf, tensor)
    kernel = Kernel(graph, artifact, meta)
    kernel.training = training
    return kernel


def instantiate(
    program: torch.export.ExportedProgram,
    artifact: bytes | None = None,
    meta: KernelMetadata | None = None,
) -> Kernel:
    """A fresh trainable `Kernel` from `program` that owns its parameters and buffers.

    `program.module()` returns a GraphModule whose tensors alias `program.state_dict`: training it
    in place would corrupt the cached program and every other seed made from it. So each
    parameter and buffer is replaced by a clone (aliases within the program stay aliases).
    Pass the `artifact` the program came from to make the kernel picklable.
    """
    module = program.module()
    clones: dict[int, torch.Tensor] = {}
    for name, tensor in [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]:
        if id(tensor) not in clones:
            copy = tensor.detach().clone()
            if isinstance(tensor, nn.Parameter):
                copy = nn.Parameter(copy, requires_grad=tensor.requires_grad)
            clones[id(tensor)] = copy
        owner_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner_name), leaf, clones[id(tensor)])
    return Kernel(module, artifact, meta)
