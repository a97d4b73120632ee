"""The static checks of a kernel artifact: what `validate_artifact` refuses before torch sees it.

An artifact is what `torch.export.save` writes: a zip ("pt2 archive") holding the graph as JSON,
the weights as raw bytes, and a pickled copy of the example inputs. `torch.export.load` is not
safe on untrusted bytes: it unpickles the sample inputs with a fallback to weights_only=False,
loads `use_pickle` weights and constants with weights_only=False, sympifies (evals) the graph's
shape expressions, compiles `guards_code` into Python, and resolves op targets by attribute
lookup under `torch`; and a graph of any `torch.ops.aten` op can write files (aten.from_file
+ copy_). So everything here is checked statically, on bytes and JSON: this module never
imports, unpickles or runs anything from an artifact, and a graph may call only the functional
ops in ALLOWED_OPS. `validated_archive` also returns a fresh archive rebuilt from exactly the
bytes the checks read, which is all the loader (`esper_gym.kernels.kernel`) ever hands torch
(torch's zip reader and Python's disagree on odd archives).

The metadata the store indexes lives here too: it is what an artifact is checked against, and
reading it (`KernelMetadata.from_json`) is a check of untrusted input like the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickletools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from esper_gym.kernels.archive import (
    MAX_ARCHIVE_BYTES,
    ArchiveRejected,
    pack_members,
    read_members,
)
from esper_gym.kernels.blueprints import BLUEPRINTS

Shape = tuple[int, ...]


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
        """Parse and type-check (the index may come from an untrusted store): KernelRejected."""
        try:
            d = json.loads(text)
            d["input_shape"] = tuple(d["input_shape"])
            d["output_shape"] = tuple(d["output_shape"])
            meta = cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise KernelRejected(f"unreadable kernel metadata ({e})") from None
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in d.items():
            want = {"str": str, "int": int, "float": float, "Shape": tuple}.get(types[name], dict)
            if not isinstance(value, want) or isinstance(value, bool):
                raise KernelRejected(f"kernel metadata field {name}={value!r} is not a {want}")
        if not all(isinstance(s, int) and s > 0 for s in (*meta.input_shape, *meta.output_shape)):
            raise KernelRejected(f"kernel metadata shapes {meta.input_shape} are not sizes")
        return meta


@dataclass(frozen=True)
class ArtifactInfo:
    """What the static inspection read from an archive's graph JSON."""

    input_shape: Shape
    output_shape: Shape


# The member names of one exported program, exactly as torch.export.save writes them (checked
# against real archives). Left out on purpose: extra/ (free-form files), data/aotinductor/
# (compiled shared objects), custom_obj_*/opaque_obj_* constants (unpickled unconditionally),
# legacy weights/<model>.pt, and any program other than "model".
_MODEL_JSON = "archive/models/model.json"
_WEIGHTS_CONFIG = "archive/data/weights/model_weights_config.json"
_CONSTANTS_CONFIG = "archive/data/constants/model_constants_config.json"
_SAMPLE_INPUTS = "archive/data/sample_inputs/model.pt"
_ARCHIVE_MEMBER = re.compile(
    r"archive/(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/weights/(weight_\d{1,6}|model_weights_config\.json)"
    r"|data/constants/(tensor_\d{1,6}|model_constants_config\.json)|data/sample_inputs/model\.pt)"
)
# Members of the torch.save zip that holds the sample inputs.
_TORCH_SAVE_MEMBER = re.compile(
    r"([A-Za-z0-9_]+)/(data\.pkl|data/\d{1,6}|byteorder|version|\.format_version"
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

MAX_NODES = 256

# The only ops a kernel graph may call: the aten overloads the shipped blueprints export to
# (derived by compiling every template on every slot shape the hosts have; a test keeps this
# exact). Everything else is refused, however harmless: the open `torch.ops.aten.*` namespace
# holds from_file (maps a file), copy_/index_put_ (write into an input) and friends. Each entry
# is audited against its schema at import (`op_schema_problem`): nothing here mutates an
# argument. The view ops (reshape, permute, ...) return read-only aliases of their input, and
# since no listed op writes, a kernel cannot reach back into the host's activations through one.
ALLOWED_OPS = frozenset(
    f"torch.ops.aten.{op}"
    for op in (
        "_assert_async.msg",
        "abs.default",
        "add.Tensor",
        "cat.default",
        "conv2d.default",
        "flatten.using_ints",
        "gelu.default",
        "group_norm.default",
        "layer_norm.default",
        "linear.default",
        "lt.Scalar",
        "matmul.default",
        "mean.dim",
        "mul.Tensor",
        "permute.default",
        "relu.default",
        "reshape.default",
        "scaled_dot_product_attention.default",
        "sigmoid.default",
        "slice.Tensor",
        "sum.default",
        "sym_size.int",
        "tanh.default",
        "transpose.int",
        "unbind.int",
        "unsqueeze.default",
    )
)
# String arguments are how I/O ops take their paths; the two listed ops take a string that is
# only a mode or a message. (op, argument) -> allowed values (None: any short string).
_STRING_ARGS: dict[tuple[str, str], frozenset[str] | None] = {
    ("torch.ops.aten.gelu.default", "approximate"): frozenset({"none", "tanh"}),
    ("torch.ops.aten._assert_async.msg", "assert_msg"): None,
}
# Argument encodings a node may use; as_graph (subgraphs), as_operator (an op passed as a value),
# as_custom_obj, as_device and the rest are refused.
_ARG_KINDS = frozenset(
    {
        "as_none",
        "as_tensor",
        "as_tensors",
        "as_optional_tensors",
        "as_int",
        "as_ints",
        "as_float",
        "as_floats",
        "as_bool",
        "as_bools",
        "as_sym_int",
        "as_sym_ints",
        "as_scalar_type",
        "as_memory_format",
        "as_layout",
        "as_string",
    }
)
_NODE_METADATA = frozenset({"nn_module_stack", "torch_fn", "stack_trace"})
# The only shape expression torch.export writes for one dynamic batch dimension: a bare symbol.
_EXPR = re.compile(r"Symbol\('s\d{1,9}', positive=True, integer=True\)|s\d{1,9}")
_SYMBOL = re.compile(r"s\d{1,9}")
# A kernel is called as kernel(x) and returns one tensor: the pytree specs are these two strings.
_IN_SPEC = (
    '[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": '
    '"builtins.tuple", "context": "null", "children_spec": [{"type": null, "context": null, '
    '"children_spec": []}]}, {"type": "builtins.dict", "context": "[]", "children_spec": []}]}]'
)
_OUT_SPEC = '[1, {"type": null, "context": null, "children_spec": []}]'
# Serialized ScalarType -> element bytes: HALF, FLOAT, DOUBLE, BFLOAT16 (torch/_export/serde/schema.py).
_FLOAT_BYTES = {6: 2, 7: 4, 8: 8, 13: 2}


def op_schema_problem(target: str) -> str | None:
    """Why the aten overload `target` ("torch.ops.aten.<op>.<overload>") may not be allow-listed:
    it mutates or writes through an argument, or takes a str/Device/Generator/Storage argument
    other than those in _STRING_ARGS. None when its schema is functional."""
    _, _, rest = target.partition("torch.ops.aten.")
    op, _, overload = rest.partition(".")
    schema = getattr(getattr(torch.ops.aten, op), overload)._schema
    if schema.is_mutable:
        return f"{target} mutates an argument"
    for arg in schema.arguments:
        if arg.alias_info is not None and arg.alias_info.is_write:
            return f"{target} writes through argument {arg.name!r}"
        kind = str(arg.type)
        if any(t in kind for t in ("Device", "Generator", "Storage", "Stream")):
            return f"{target} takes a {kind} argument {arg.name!r}"
        if "str" in kind and (target, arg.name) not in _STRING_ARGS:
            return f"{target} takes a string argument {arg.name!r} (a path?)"
    for ret in schema.returns:
        if ret.alias_info is not None and ret.alias_info.is_write:
            return f"{target} returns a writable alias"
    return None


for _op in ALLOWED_OPS:  # the allow-list itself is checked once, at import
    if (_problem := op_schema_problem(_op)) is not None:
        raise RuntimeError(f"ALLOWED_OPS holds an op that is not functional: {_problem}")


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


def _members(data: bytes, where: str) -> dict[str, bytes]:
    try:
        return read_members(data, where)
    except ArchiveRejected as e:
        raise KernelRejected(f"not a readable zip archive in torch's layout: {e}") from None


def _check_torch_save(data: bytes, where: str) -> None:
    """Check the torch.save zip of the sample inputs (then dropped: torch never sees it)."""
    members = _members(data, where)
    roots = set()
    for name in members:
        match = _TORCH_SAVE_MEMBER.fullmatch(name)
        if match is None:
            raise KernelRejected(f"{where}: unexpected member {name!r}")
        roots.add(match.group(1))
    if len(roots) != 1 or f"{next(iter(roots))}/data.pkl" not in members:
        raise KernelRejected(f"{where}: not a torch.save archive (one root with data.pkl)")
    for name, content in members.items():
        if name.endswith(".pkl") or content.startswith(b"\x80"):
            scan_pickle(content, f"{where}:{name}")


def _check_expr(expr: Any, where: str) -> None:
    if not isinstance(expr, str) or not _EXPR.fullmatch(expr):
        raise KernelRejected(f"{where}: refusing shape expression {expr!r}")


def _check_node(node: Any, where: str) -> None:
    """One graph node: an allow-listed op, plain arguments, inert metadata."""
    if not isinstance(node, dict):
        raise KernelRejected(f"{where}: malformed graph node")
    target = node.get("target")
    if target not in ALLOWED_OPS:
        raise KernelRejected(
            f"{where}: graph calls forbidden target {target!r}; kernels may call only the "
            "functional aten ops in esper_gym.kernels.validator.ALLOWED_OPS"
        )
    for item in node.get("inputs", []):
        arg, name = item.get("arg"), item.get("name")
        if not isinstance(arg, dict) or len(arg) != 1 or next(iter(arg)) not in _ARG_KINDS:
            raise KernelRejected(f"{where}: {target} argument {name!r} has a refused encoding")
        if "as_string" in arg:
            allowed = _STRING_ARGS.get((target, name), ())
            value = arg["as_string"]
            if allowed == () or not isinstance(value, str) or len(value) > 200:
                raise KernelRejected(f"{where}: {target} takes no string argument {name!r}")
            if allowed is not None and value not in allowed:
                raise KernelRejected(f"{where}: {target} {name}={value!r} is not allowed")
    metadata = node.get("metadata", {})
    if not isinstance(metadata, dict) or not set(metadata) <= _NODE_METADATA:
        extra = sorted(set(metadata) - _NODE_METADATA) if isinstance(metadata, dict) else metadata
        raise KernelRejected(f"{where}: node metadata {extra} refused (resolved by the loader)")


def _walk(value: Any, where: str) -> None:
    """Everywhere in the document: expressions are bare symbols, no code, no custom objects."""
    if isinstance(value, list):
        for item in value:
            _walk(item, where)
        return
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        if key == "expr_str":
            _check_expr(item, where)
        elif key == "target" and item not in ALLOWED_OPS:
            raise KernelRejected(f"{where}: graph calls forbidden target {item!r}")
        elif key in ("as_custom_obj", "custom_obj_values", "guards_code", "as_graph") and item:
            raise KernelRejected(f"{where}: graph carries {key}, refused")
        else:
            _walk(item, where)


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


def _check_program(doc: Any, where: str) -> ArtifactInfo:
    try:
        graph_module = doc["graph_module"]
        graph, signature = graph_module["graph"], graph_module["signature"]
        nodes = graph["nodes"]
        inputs = [s["user_input"]["arg"] for s in signature["input_specs"] if "user_input" in s]
        outputs = [s["user_output"]["arg"] for s in signature["output_specs"]]
        call_graph = graph_module["module_call_graph"]
        ranges = doc["range_constraints"]
    except (KeyError, ValueError, TypeError) as e:
        raise KernelRejected(f"{where}: unreadable program ({e!r})") from None
    if not isinstance(nodes, list) or not isinstance(graph.get("tensor_values"), dict):
        raise KernelRejected(f"{where}: unreadable program (nodes)")
    # Loading costs time per node and per value: the shipped templates use a few dozen.
    if len(nodes) > MAX_NODES or len(graph["tensor_values"]) > 2 * MAX_NODES:
        raise KernelRejected(
            f"{where}: {len(nodes)} nodes, {len(graph['tensor_values'])} values; at most "
            f"{MAX_NODES} and {2 * MAX_NODES}"
        )
    for node in nodes:
        _check_node(node, where)
    if not isinstance(ranges, dict) or not all(
        _SYMBOL.fullmatch(str(k))
        and isinstance(v, dict)
        and all(isinstance(v.get(b), int | None) for b in ("min_val", "max_val"))
        for k, v in ranges.items()
    ):
        raise KernelRejected(f"{where}: refusing range constraints {ranges!r}"[:300])
    specs = [
        (c.get("signature") or {}).get(k)
        for c in call_graph
        if isinstance(c, dict) and c.get("signature")
        for k in ("in_spec", "out_spec")
    ]
    if specs != [_IN_SPEC, _OUT_SPEC] or graph_module.get("treespec_namedtuple_fields"):
        raise KernelRejected(f"{where}: a kernel's call signature is kernel(x) -> tensor")
    _walk(doc, where)
    if len(inputs) != 1 or len(outputs) != 1:
        raise KernelRejected(f"{where}: a kernel takes one tensor and returns one tensor")
    return ArtifactInfo(
        input_shape=_tensor_shape(graph, inputs[0], "input", where),
        output_shape=_tensor_shape(graph, outputs[0], "output", where),
    )


def _check_payload_config(members: dict[str, bytes], path: str, pattern: str) -> set[str]:
    """Refuse pickled payloads and tensors that do not fit their bytes; return the members used."""
    try:
        entries = list(json.loads(members[path])["config"].items())
    except (KeyError, ValueError, AttributeError, TypeError) as e:
        raise KernelRejected(f"{path}: unreadable payload config ({e})") from None
    used = set()
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
        if member not in members:
            raise KernelRejected(f"{path}: payload {member!r} of {fqn!r} is missing")
        _check_tensor_meta(entry.get("tensor_meta"), len(members[member]), f"{path}: {fqn!r}")
        used.add(member)
    return used


def _check_tensor_meta(meta: Any, nbytes: int, where: str) -> None:
    # torch builds the tensor from these numbers; an empty payload would become torch.zeros of
    # the declared size, so a few bytes could declare terabytes.
    try:
        dtype = meta["dtype"]
        sizes = [s["as_int"] for s in meta["sizes"]]
        strides = [s["as_int"] for s in meta["strides"]]
        offset = meta["storage_offset"]["as_int"]
        device = meta["device"]["type"]
    except (KeyError, TypeError):
        raise KernelRejected(f"{where}: unreadable tensor_meta") from None
    numbers = [*sizes, *strides, offset]
    if dtype not in _FLOAT_BYTES or device != "cpu" or len(sizes) != len(strides):
        raise KernelRejected(f"{where}: tensor_meta must describe a floating CPU tensor")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise KernelRejected(f"{where}: tensor_meta sizes, strides and offset must be ints >= 0")
    element = _FLOAT_BYTES[dtype]
    extent = 0 if 0 in sizes else offset + 1 + sum((s - 1) * st for s, st in zip(sizes, strides))
    # The dense size too: a kernel clones its tensors, so zero strides over 4 bytes would
    # otherwise become gigabytes at germination.
    dense = math.prod(sizes)
    if max(extent, dense) * element > nbytes:
        need = max(extent, dense) * element
        raise KernelRejected(f"{where}: tensor_meta needs {need} bytes, has {nbytes}")


def _inspect(artifact: bytes) -> tuple[ArtifactInfo, bytes]:
    """inspect_artifact, plus a fresh archive holding exactly the bytes that were checked."""
    try:
        return _inspect_members(_members(artifact, "artifact"))
    except KernelRejected:
        raise
    except (ValueError, RecursionError, AttributeError, TypeError, KeyError) as e:
        # Malformed JSON of any shape (deep nesting, lists where dicts belong) is refused too.
        raise KernelRejected(
            f"artifact: malformed content ({type(e).__name__}: {e})"[:300]
        ) from None


def _inspect_members(members: dict[str, bytes]) -> tuple[ArtifactInfo, bytes]:
    for name in members:
        if not _ARCHIVE_MEMBER.fullmatch(name):
            raise KernelRejected(f"artifact: unexpected member {name!r} outside the pt2 layout")
    for path in (_MODEL_JSON, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG, _SAMPLE_INPUTS):
        if path not in members:
            raise KernelRejected(f"artifact: missing {path}")
    if members.get("archive/archive_format") != b"pt2":
        raise KernelRejected("artifact: archive_format is not pt2")
    used = _check_payload_config(members, _WEIGHTS_CONFIG, r"weight_\d{1,6}")
    used |= _check_payload_config(members, _CONSTANTS_CONFIG, r"tensor_\d{1,6}")
    for name in members:
        # Payloads are read as raw bytes, never unpickled; one that no config names is refused.
        if "/data/weights/weight_" in name or "/data/constants/tensor_" in name:
            if name not in used:
                raise KernelRejected(f"artifact: payload {name!r} is not referenced by a config")
        elif name != _SAMPLE_INPUTS and members[name].startswith(b"\x80"):
            scan_pickle(members[name], name)
    _check_torch_save(members[_SAMPLE_INPUTS], _SAMPLE_INPUTS)
    # Kernels never use the example inputs, and torch unpickles them with a fallback to
    # weights_only=False; an empty member makes torch skip them, so no pickle reaches torch.
    members[_SAMPLE_INPUTS] = b""
    info = _check_program(json.loads(members[_MODEL_JSON]), _MODEL_JSON)
    return info, pack_members(members)


def inspect_artifact(artifact: bytes) -> ArtifactInfo:
    """All structural checks of a pt2 archive; returns its input and output shapes.

    Refuses (KernelRejected), reading nothing but the archive's bytes: an archive outside the
    plain layout torch writes (see `esper_gym.kernels.archive`: trailing or prepended data, two
    central directories, compressed members, names equal ignoring case, CRC failures); members
    outside the pt2 layout or payloads no config references; anything but exactly one program
    named "model"; pickled weights or constants, and tensor metadata that does not fit its
    bytes; a pickle anywhere that references a global outside SAFE_PICKLE_GLOBALS; graph ops
    outside ALLOWED_OPS, string arguments other than a mode or a message, subgraphs, op-valued
    arguments and node metadata the loader would resolve; shape expressions other than a bare
    batch symbol; guard code and custom objects; a call signature other than kernel(x) -> tensor
    with a dynamic batch.
    """
    return _inspect(artifact)[0]


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
    return validated_archive(artifact, meta, expected_shape)[0]


def validated_archive(
    artifact: bytes,
    meta: KernelMetadata | None = None,
    expected_shape: Sequence[int] | None = None,
) -> tuple[ArtifactInfo, bytes]:
    """validate_artifact, and the archive to hand to torch: rebuilt from exactly the member bytes
    the checks read, so that no reader can find anything in it that they did not see."""
    if len(artifact) > MAX_ARCHIVE_BYTES:
        raise KernelRejected(f"artifact has {len(artifact)} bytes, at most {MAX_ARCHIVE_BYTES}")
    if meta is not None:
        digest = hashlib.sha256(artifact).hexdigest()
        if digest != meta.sha256:
            raise KernelRejected(f"artifact sha256 {digest} does not match metadata {meta.sha256}")
        if len(artifact) != meta.size_bytes:
            raise KernelRejected(f"artifact has {len(artifact)} bytes, metadata {meta.size_bytes}")
    info, canonical = _inspect(artifact)
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
    return info, canonical
