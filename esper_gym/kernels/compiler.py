"""Blueprint -> torch.export artifact bytes + KernelMetadata, and the static checks before loading.

An artifact is what `torch.export.save` writes: a zip ("pt2 archive") holding the graph as JSON,
the weights as raw bytes, and a pickled copy of the example inputs. `torch.export.load` is not
safe on untrusted bytes: it unpickles the sample inputs with a fallback to weights_only=False,
loads `use_pickle` weights and constants with weights_only=False, sympifies (evals) the graph's
shape expressions, compiles `guards_code` into Python, and resolves op targets by attribute
lookup under `torch`; and a graph of any `torch.ops.aten` op can write files (aten.from_file
+ copy_). So `validate_artifact` checks all of that statically first — it never imports,
unpickles or runs anything from the artifact, and a graph may call only the functional ops in
ALLOWED_OPS — and `load_artifact` hands torch a fresh archive rebuilt from exactly the bytes the
checks read, never the original (torch's zip reader and Python's disagree on odd archives).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import pickletools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from esper_gym.kernels.archive import (
    MAX_ARCHIVE_BYTES,
    ArchiveRejected,
    pack_members,
    read_members,
)
from esper_gym.kernels.blueprints import BLUEPRINTS, Blueprint, blueprint_from_dict

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
# A kernel's intermediates for one sample may not exceed this (checked on the meta device
# before a kernel first runs): allowed ops can still allocate without bound (cat of x with
# itself, doubled 30 times).
MAX_BYTES_PER_SAMPLE = 4 * 2**20

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
            "functional aten ops in esper_gym.kernels.compiler.ALLOWED_OPS"
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


def load_artifact(
    artifact: bytes,
    meta: KernelMetadata | None = None,
    expected_shape: Sequence[int] | None = None,
) -> torch.export.ExportedProgram:
    """validate_artifact, then torch.export.load of the rebuilt archive (never of `artifact`),
    then a dry run of the graph on shapes (`KernelTemplate.from_program`) before anyone runs it,
    and with `meta`, its cost against its blueprint's (`check_cost`)."""
    _, canonical = validated_archive(artifact, meta, expected_shape)
    name = meta.sha256 if meta is not None else hashlib.sha256(artifact).hexdigest()
    program = load_program(canonical, name)
    template = KernelTemplate.from_program(program)
    if meta is not None:
        check_cost(template.cost, meta.blueprint, meta.input_shape, name)
    return program


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
    _, canonical = validated_archive(artifact, meta)
    name = meta.sha256 if meta is not None else hashlib.sha256(artifact).hexdigest()
    template = KernelTemplate.from_program(load_program(canonical, name))
    if meta is not None:
        check_cost(template.cost, meta.blueprint, meta.input_shape, name)
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
        cost = _dry_run(program.graph_module, tensors, user[0].arg.name)
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
def _template_cost(blueprint_json: str, shape: Shape, batch: int = 256) -> KernelCost:
    # The blueprint's own module, built and run on the meta device: no weights, no arithmetic.
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
        ref = _template_cost(json.dumps(blueprint, sort_keys=True), shape)
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


def _dry_run(
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
            for value in torch.utils._pytree.tree_leaves(out):
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
