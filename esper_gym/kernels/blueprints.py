"""Blueprint templates: small frozen specs of seed kernels, each able to build itself for a slot.

A seed slot sits on a host layer's output activation h of shape (B, *shape): shape is (D,) for a
Linear host layer ("linear") and (C, H, W) for a Conv2d host layer ("conv"). A kernel maps h to a
delta of the same shape and the KasminaLayer computes h + alpha * kernel(h). Every real template
starts as an exact zero delta (its last layer or gain is zero-initialised) so a new seed changes
nothing until it has learned something.

Fault blueprints (``is_fault``) exist to exercise the runtime fault path: they raise, return NaN,
return the wrong shape, or are slow, and survive torch.export so the fault happens after loading.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

Shape = tuple[int, ...]


def host_kind(shape: Sequence[int]) -> str | None:
    """'linear' for a slot shape (D,), 'conv' for (C, H, W), None for anything else."""
    shape = tuple(shape)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        return None
    return {1: "linear", 3: "conv"}.get(len(shape))


# A blueprint field's declared type (annotations are strings here) -> the Python type it holds.
FIELD_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
# Largest value of an integer hyper-parameter (a width, rank, head count): far above any slot a
# shipped host has (the generator scales sizes to the param budget anyway).
MAX_SIZE = 1 << 16


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _groups(channels: int) -> int:
    """GroupNorm group count: the largest of 8, 4, 2, 1 that divides `channels`."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


# Activations a template may be built with: each exports to one op of the compiler's allow-list.
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def _scale_(layer: nn.Module, scale: float) -> None:
    # The first layer's default init times `init_scale`: how strongly a new kernel reads h.
    if scale != 1.0:
        with torch.no_grad():
            for p in layer.parameters():
                p.mul_(scale)


def _zero_(*layers: nn.Module) -> None:
    # The last layer of every real kernel starts at zero so its delta is exactly zero at birth.
    for layer in layers:
        for p in layer.parameters():
            nn.init.zeros_(p)


@dataclass(frozen=True)
class Blueprint(abc.ABC):
    """A kernel template: its fields are the hyper-parameters, `build(shape)` makes the module.

    Subclasses set `name`, `host_kinds` (a subset of ("linear", "conv")), optionally `is_fault`,
    and `size_field`, the integer hyper-parameter BlueprintGenerator scales to a param budget
    (None when the template has no size knob). `param_count(shape)` is exact: it equals the sum
    of `numel()` over the built module's parameters (buffers are not parameters).
    """

    name: ClassVar[str] = ""
    host_kinds: ClassVar[tuple[str, ...]] = ()
    is_fault: ClassVar[bool] = False
    size_field: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        # Fields come from files too (store rows, Karn's history): each must be of its declared
        # type (a bool is not an int here) and every size bounded, so a row cannot name a
        # kernel that would allocate gigabytes.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = FIELD_TYPES.get(f.type)
            if kind is None:
                raise TypeError(f"{self.name}: field {f.name} has unsupported type {f.type!r}")
            if kind is float:
                ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
            else:
                ok = isinstance(value, kind) and isinstance(value, bool) is (kind is bool)
            if not ok:
                raise ValueError(
                    f"{self.name}: {f.name}={value!r} must be a {kind.__name__} ({f.type})"
                )
            if kind is int and not 1 <= value <= MAX_SIZE:
                raise ValueError(
                    f"{self.name}: {f.name} must be >= 1 and at most {MAX_SIZE}, got {value}"
                )
        # Karn (and any user) builds variants from these fields: a bad one must fail here, by
        # name, not inside torch.export.
        scale = getattr(self, "init_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < 1e3:
            raise ValueError(
                f"{self.name}: init_scale must be a number in (0, 1000), got {scale!r}"
            )
        activation = getattr(self, "activation", "gelu")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"{self.name}: activation={activation!r}; allowed: {', '.join(ACTIVATIONS)}"
            )

    def unsupported_reason(self, shape: Sequence[int]) -> str | None:
        """Why this blueprint cannot serve a slot of `shape`, or None if it can."""
        if host_kind(shape) not in self.host_kinds:
            kinds = " and ".join(self.host_kinds)
            return (
                f"{self.name} does not support slot shape {tuple(shape)}: it supports {kinds} "
                "slots (shape (D,) is linear, (C, H, W) is conv)"
            )
        return None

    def supports(self, shape: Sequence[int]) -> bool:
        return self.unsupported_reason(shape) is None

    def _checked(self, shape: Sequence[int]) -> Shape:
        reason = self.unsupported_reason(shape)
        if reason is not None:
            raise ValueError(reason)
        return tuple(shape)

    def build(self, shape: Sequence[int]) -> nn.Module:
        """The kernel module for slot `shape`; ValueError if the shape is unsupported."""
        return self._build(self._checked(shape))

    def param_count(self, shape: Sequence[int]) -> int:
        """Exact number of trainable parameters `build(shape)` has, without building it."""
        return self._param_count(self._checked(shape))

    def sizes(self, shape: Sequence[int]) -> Sequence[int]:
        """Allowed values of `size_field` for `shape`, increasing (param_count grows with them)."""
        return ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    @abc.abstractmethod
    def _build(self, shape: Shape) -> nn.Module:
        """The module for a supported `shape` (each template defines it)."""

    @abc.abstractmethod
    def _param_count(self, shape: Shape) -> int:
        """Exact parameter count for a supported `shape` (each template defines it)."""


# --- real templates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidualMLP(Blueprint):
    """Linear(D, hidden) -> activation -> Linear(hidden, D), the last one zero-initialised;
    the first one's default init is scaled by `init_scale`."""

    name: ClassVar[str] = "residual_mlp"
    host_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    size_field: ClassVar[str | None] = "hidden"
    hidden: int = 64
    activation: str = "gelu"
    init_scale: float = 1.0

    def sizes(self, shape):
        return range(1, 4 * shape[0] + 1)

    def _build(self, shape):
        (d,) = shape
        # `out` is made first, as before these hyper-parameters existed: the same seed then
        # draws the same initial weights for the default variant.
        out = nn.Linear(self.hidden, d)
        _zero_(out)
        first = nn.Linear(d, self.hidden)
        _scale_(first, self.init_scale)
        return nn.Sequential(first, ACTIVATIONS[self.activation](), out)

    def _param_count(self, shape):
        (d,) = shape
        return 2 * d * self.hidden + self.hidden + d


@dataclass(frozen=True)
class LowRank(Blueprint):
    """Adapter B(A(h)) of rank `rank`, no biases, B zero-initialised, A's init scaled by
    `init_scale`; 1x1 convs on conv slots."""

    name: ClassVar[str] = "low_rank"
    host_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")
    size_field: ClassVar[str | None] = "rank"
    rank: int = 4
    init_scale: float = 1.0

    def sizes(self, shape):
        return range(1, shape[0] + 1)

    def _build(self, shape):
        c = shape[0]
        if len(shape) == 1:
            down, up = nn.Linear(c, self.rank, bias=False), nn.Linear(self.rank, c, bias=False)
        else:
            down = nn.Conv2d(c, self.rank, 1, bias=False)
            up = nn.Conv2d(self.rank, c, 1, bias=False)
        _scale_(down, self.init_scale)
        _zero_(up)
        return nn.Sequential(down, up)

    def _param_count(self, shape):
        return 2 * shape[0] * self.rank


@dataclass(frozen=True)
class Conv3x3(Blueprint):
    """conv3x3(C, width) -> GroupNorm? -> activation -> conv3x3(width, C), the last
    zero-initialised, the first's init scaled by `init_scale`."""

    name: ClassVar[str] = "conv3x3"
    host_kinds: ClassVar[tuple[str, ...]] = ("conv",)
    size_field: ClassVar[str | None] = "width"
    width: int = 16
    norm: bool = True
    activation: str = "relu"
    init_scale: float = 1.0

    def sizes(self, shape):
        return range(1, 4 * shape[0] + 1)

    def _build(self, shape):
        c, w = shape[0], self.width
        first = nn.Conv2d(c, w, 3, padding=1, bias=not self.norm)
        _scale_(first, self.init_scale)
        layers: list[nn.Module] = [first]
        if self.norm:
            layers.append(nn.GroupNorm(_groups(w), w))
        out = nn.Conv2d(w, c, 3, padding=1)
        _zero_(out)
        return nn.Sequential(*layers, ACTIVATIONS[self.activation](), out)

    def _param_count(self, shape):
        c, w = shape[0], self.width
        first = 9 * c * w + (2 * w if self.norm else w)  # GroupNorm affine replaces the bias
        return first + 9 * w * c + c


@dataclass(frozen=True)
class DepthwiseSeparable(Blueprint):
    """Depthwise conv3x3 (C -> C*multiplier, groups=C) -> ReLU -> 1x1 conv to C, zero-init."""

    name: ClassVar[str] = "depthwise_separable"
    host_kinds: ClassVar[tuple[str, ...]] = ("conv",)
    size_field: ClassVar[str | None] = "multiplier"
    multiplier: int = 1

    def sizes(self, shape):
        return range(1, 9)

    def _build(self, shape):
        c, m = shape[0], self.multiplier
        out = nn.Conv2d(c * m, c, 1)
        _zero_(out)
        return nn.Sequential(nn.Conv2d(c, c * m, 3, padding=1, groups=c), nn.ReLU(), out)

    def _param_count(self, shape):
        c, m = shape[0], self.multiplier
        return 9 * c * m + c * m + c * m * c + c


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, hidden: int, spatial: bool):
        super().__init__()
        self.spatial = spatial
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        _zero_(self.fc2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s = h.mean(dim=(2, 3)) if self.spatial else h
        # tanh(0) == 0 exactly, so the zero-initialised fc2 gives an exact zero delta; the gain
        # 1 + tanh(.) spans (0, 2) like the 2 * sigmoid(.) of classic SE.
        gate = torch.tanh(self.fc2(F.relu(self.fc1(s))))
        if self.spatial:
            gate = gate[:, :, None, None]
        return h * gate


@dataclass(frozen=True)
class SqueezeExcite(Blueprint):
    """Squeeze-excite gating: delta = h * tanh(fc2(relu(fc1(squeeze(h))))), fc2 zero-initialised.

    On conv slots squeeze is the spatial mean (one gate per channel); on linear slots the gate is
    computed from the feature vector itself (one gate per feature).
    """

    name: ClassVar[str] = "squeeze_excite"
    host_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")
    size_field: ClassVar[str | None] = "hidden"
    hidden: int = 8

    def sizes(self, shape):
        return range(1, shape[0] + 1)

    def _build(self, shape):
        return _SqueezeExcite(shape[0], self.hidden, spatial=len(shape) == 3)

    def _param_count(self, shape):
        c = shape[0]
        return 2 * c * self.hidden + self.hidden + c


@dataclass(frozen=True)
class Norm(Blueprint):
    """delta = gamma * norm(h) + beta (LayerNorm over D, GroupNorm over C), gamma = beta = 0."""

    name: ClassVar[str] = "norm"
    host_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")

    def _build(self, shape):
        c = shape[0]
        norm = nn.LayerNorm(c) if len(shape) == 1 else nn.GroupNorm(_groups(c), c)
        _zero_(norm)
        return norm

    def _param_count(self, shape):
        return 2 * shape[0]


@dataclass(frozen=True)
class Bottleneck(Blueprint):
    """1x1 reduce to width -> GN -> ReLU -> 3x3 -> GN -> ReLU -> 1x1 expand, zero-initialised."""

    name: ClassVar[str] = "bottleneck"
    host_kinds: ClassVar[tuple[str, ...]] = ("conv",)
    size_field: ClassVar[str | None] = "width"
    width: int = 8

    def sizes(self, shape):
        return range(1, 2 * shape[0] + 1)

    def _build(self, shape):
        c, w = shape[0], self.width
        out = nn.Conv2d(w, c, 1)
        _zero_(out)
        return nn.Sequential(
            nn.Conv2d(c, w, 1, bias=False),
            nn.GroupNorm(_groups(w), w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(w), w),
            nn.ReLU(),
            out,
        )

    def _param_count(self, shape):
        c, w = shape[0], self.width
        return c * w + 2 * w + 9 * w * w + 2 * w + w * c + c


class _Attention(nn.Module):
    def __init__(self, token_dim: int, heads: int, dim: int, spatial: bool):
        super().__init__()
        self.token_dim, self.heads, self.dim, self.spatial = token_dim, heads, dim, spatial
        self.qkv = nn.Linear(token_dim, 3 * dim)
        self.out = nn.Linear(dim, token_dim)
        _zero_(self.out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b = h.shape[0]
        # Tokens: the H*W positions (C features each) on conv slots, D/t chunks of t on linear.
        x = h.flatten(2).transpose(1, 2) if self.spatial else h.reshape(b, -1, self.token_dim)
        n = x.shape[1]
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, self.dim)
        y = self.out(a)
        return y.transpose(1, 2).reshape(h.shape) if self.spatial else y.reshape(h.shape)


@dataclass(frozen=True)
class Attention(Blueprint):
    """Multi-head self-attention over tokens, output projection zero-initialised.

    Conv slots: the H*W positions are the tokens (C features each). Linear slots: D is split into
    D/token tokens of `token` features (`token` must divide D). `dim` is the attention width
    (a multiple of `heads`).
    """

    name: ClassVar[str] = "attention"
    host_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")
    size_field: ClassVar[str | None] = "dim"
    heads: int = 2
    dim: int = 16
    token: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.dim % self.heads:
            raise ValueError(f"attention: dim {self.dim} must be a multiple of heads {self.heads}")

    def unsupported_reason(self, shape):
        reason = super().unsupported_reason(shape)
        if reason is None and len(shape) == 1 and shape[0] % self.token:
            return (
                f"attention does not support slot shape {tuple(shape)}: its token size "
                f"{self.token} must divide D={shape[0]}"
            )
        return reason

    def _token_dim(self, shape: Shape) -> int:
        return shape[0] if len(shape) == 3 else self.token

    def sizes(self, shape):
        return range(self.heads, 4 * self._token_dim(tuple(shape)) + 1, self.heads)

    def _build(self, shape):
        return _Attention(self._token_dim(shape), self.heads, self.dim, spatial=len(shape) == 3)

    def _param_count(self, shape):
        e = self._token_dim(shape)
        return 3 * e * self.dim + 3 * self.dim + self.dim * e + e


class _LearnedActivation(nn.Module):
    def __init__(self, channels: int, spatial: bool, init_scale: float):
        super().__init__()
        shape = (channels, 1, 1) if spatial else (channels,)
        self.slope = nn.Parameter(torch.full(shape, float(init_scale)))
        self.shift = nn.Parameter(torch.zeros(shape))
        self.gain = nn.Parameter(torch.zeros(shape))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Per channel: gain * h * sigmoid(slope * h + shift), a learnable swish/gate (slope 0:
        # linear, large: ReLU-like, shift: a threshold). gain = 0 makes the delta exactly 0 at
        # birth while its gradient, silu-shaped, is not.
        return self.gain * h * torch.sigmoid(self.slope * h + self.shift)


@dataclass(frozen=True)
class Activation(Blueprint):
    """A learnable per-channel activation: delta = gain * h * sigmoid(slope * h + shift), with
    gain, slope, shift one per feature (linear) or channel (conv); gain starts at 0, slope at
    `init_scale`, shift at 0. 3 * C parameters: the cheapest nonlinearity a linear host can grow.
    """

    name: ClassVar[str] = "activation"
    host_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")
    init_scale: float = 1.0

    def _build(self, shape):
        return _LearnedActivation(shape[0], len(shape) == 3, self.init_scale)

    def _param_count(self, shape):
        return 3 * shape[0]


# --- fault injectors ---------------------------------------------------------------------------


class _FaultRaise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # |x|.sum() < 0 never holds (NaN compares False too), so every call raises. An assert op
        # in the graph, unlike a Python `raise`, survives torch.export.
        torch._assert_async(x.abs().sum() < 0, "injected kernel fault")
        return x * 0


class _FaultNaN(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("nan", torch.tensor(float("nan")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.nan


class _FaultShape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One extra feature/channel; built from x itself so the graph hard-codes no device.
        return torch.cat([x, x[:, :1]], dim=1) * 0


class _FaultSlow(nn.Module):
    def __init__(self, rows: int, width: int, depth: int):
        super().__init__()
        self.depth = depth
        self.register_buffer("v", torch.randn(rows, width))
        self.register_buffer("w", torch.randn(width, width) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, rows, width) @ (width, width), `depth` times: B * rows * width^2 * depth MACs of
        # real work whose result is multiplied by zero, so the delta is finite, zero, right-shaped.
        z = x.flatten(1).mean(dim=1)[:, None, None] + self.v
        for _ in range(self.depth):
            z = torch.tanh(z @ self.w)
        return x * (z.mean(dim=(1, 2)) * 0).reshape((-1,) + (1,) * (x.dim() - 1))


@dataclass(frozen=True)
class FaultRaise(Blueprint):
    """Raises RuntimeError("injected kernel fault") on every call, after export and load."""

    name: ClassVar[str] = "fault_raise"
    host_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")
    is_fault: ClassVar[bool] = True

    def _build(self, shape):
        return _FaultRaise()

    def _param_count(self, shape):
        return 0


@dataclass(frozen=True)
class FaultNaN(Blueprint):
    """Returns an all-NaN delta (x times a NaN buffer)."""

    name: ClassVar[str] = "fault_nan"
    host_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")
    is_fault: ClassVar[bool] = True

    def _build(self, shape):
        return _FaultNaN()

    def _param_count(self, shape):
        return 0


@dataclass(frozen=True)
class FaultShape(Blueprint):
    """Returns a delta with one extra feature/channel: (B, D+1) or (B, C+1, H, W)."""

    name: ClassVar[str] = "fault_shape"
    host_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")
    is_fault: ClassVar[bool] = True

    def _build(self, shape):
        return _FaultShape()

    def _param_count(self, shape):
        return 0


@dataclass(frozen=True)
class FaultSlow(Blueprint):
    """Correct zero delta after B * rows * width^2 * depth multiply-adds (~10 ms at B=128 on one
    core: twice the 5 ms a test asks of it, so that a fast, idle machine still finds it slow)."""

    name: ClassVar[str] = "fault_slow"
    host_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")
    is_fault: ClassVar[bool] = True
    rows: int = 32
    width: int = 128
    depth: int = 6

    def _build(self, shape):
        return _FaultSlow(self.rows, self.width, self.depth)

    def _param_count(self, shape):
        return 0


BLUEPRINTS: dict[str, type[Blueprint]] = {
    cls.name: cls
    for cls in (
        ResidualMLP,
        LowRank,
        Conv3x3,
        DepthwiseSeparable,
        SqueezeExcite,
        Norm,
        Bottleneck,
        Attention,
        Activation,
        FaultRaise,
        FaultNaN,
        FaultShape,
        FaultSlow,
    )
}

# Order matters: it is the blueprint order of the GERMINATE actions.
DEFAULT_LIBRARY: tuple[str, ...] = (
    "residual_mlp",
    "low_rank",
    "conv3x3",
    "depthwise_separable",
    "squeeze_excite",
    "norm",
    "bottleneck",
    "attention",
)
# Not in DEFAULT_LIBRARY, whose order is the action layout of every shipped task and checkpoint:
# `blueprints=with_activation` (or `gym.make(..., blueprints=(*DEFAULT_LIBRARY, "activation"))`)
# appends it.
EXTRA_LIBRARY: tuple[str, ...] = ("activation",)
FAULT_LIBRARY: tuple[str, ...] = ("fault_raise", "fault_nan", "fault_shape", "fault_slow")


def blueprint_from_dict(d: dict[str, Any]) -> Blueprint:
    """Inverse of `Blueprint.to_dict`; ValueError for an unknown name or bad fields."""
    if not isinstance(d, dict):
        raise ValueError(f"a blueprint is an object with a name, got {type(d).__name__}")
    fields = dict(d)
    name = fields.pop("name", None)
    if not isinstance(name, str) or name not in BLUEPRINTS:
        raise ValueError(
            f"unknown blueprint {str(name)[:80]!r}; known blueprints: {sorted(BLUEPRINTS)}"
        )
    try:
        return BLUEPRINTS[name](**fields)
    except TypeError as e:
        raise ValueError(f"bad fields for blueprint {name!r}: {e}") from None
