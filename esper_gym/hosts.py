"""Host networks whose growable layers are KasminaLayers.

Hosts are deliberately small (capacity-limited) so that growth can pay; the README's task
table measures each against its ceiling (the same host with every slot grown from the start).
A host builder has the signature `builder(input_shape, num_classes, slots, config, **kwargs)`
and returns an `nn.Module` whose KasminaLayers, in registration order, follow the data flow.
Your own network needs no Kasmina code: `wrap(MyNet(), slots, config)` makes it growable.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from esper_gym.kasmina import KasminaLayer, SeedConfig, kasmina_layers


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    slots: int,
    config: SeedConfig,
    hidden: Sequence[int] = (16, 16),
    activation: str = "relu",
) -> nn.Sequential:
    """Flatten -> [Linear -> act] * len(hidden) -> Linear, every Linear a KasminaLayer.

    `activation="none"` gives a linear host (a rank-limited linear classifier): all its
    nonlinearity must come from growth.
    """
    acts = {"relu": nn.ReLU, "none": None}
    if activation not in acts:
        raise ValueError(f"activation={activation!r}; allowed: {', '.join(acts)}")
    widths = [math.prod(input_shape), *hidden, num_classes]
    modules: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        modules.append(KasminaLayer(nn.Linear(a, b), slots, f"fc{i}", config))
        if i < len(widths) - 2 and acts[activation] is not None:
            modules.append(acts[activation]())
    return nn.Sequential(*modules)


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    slots: int,
    config: SeedConfig,
    channels: Sequence[int] = (8, 16),
    downsample: str = "stride",
) -> nn.Sequential:
    """[Conv3x3 -> ReLU, halving the resolution] * len(channels) -> Flatten -> Linear.

    `downsample="stride"` (stride-2 convolutions) puts every slot at the reduced resolution,
    so conv kernels cost 4x less than after a full-resolution conv + `"pool"` (MaxPool2).
    """
    if downsample not in ("stride", "pool"):
        raise ValueError(f"downsample={downsample!r}; allowed: stride, pool")
    c, h, w = input_shape
    modules: list[nn.Module] = []
    for i, out in enumerate(channels):
        stride = 2 if downsample == "stride" else 1
        conv = nn.Conv2d(c, out, 3, stride=stride, padding=1)
        modules += [KasminaLayer(conv, slots, f"conv{i}", config), nn.ReLU()]
        if downsample == "pool":
            modules.append(nn.MaxPool2d(2))
        c, h, w = out, (h + 1) // 2, (w + 1) // 2
    modules += [
        nn.Flatten(),
        KasminaLayer(nn.Linear(c * h * w, num_classes), slots, "fc", config),
    ]
    return nn.Sequential(*modules)


HOSTS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn}

GROWABLE = (nn.Linear, nn.Conv2d)  # the host layers a KasminaLayer can wrap


def wrap(
    model: nn.Module,
    slots: int,
    config: SeedConfig,
    targets: Sequence[type[nn.Module] | str] = GROWABLE,
) -> nn.Module:
    """Make a plain network growable: replace its target layers by KasminaLayers, in place.

    As PEFT injects adapters, a target is a module type (`nn.Linear`, `nn.Conv2d` or a
    subclass: every such module matches) or a name: a module's qualified name (`"head.fc"`)
    or its end (`"fc"` matches `"head.fc"` and `"fc"`). Each match becomes
    `KasminaLayer(module, slots, <qualified name>, config)` at the same place, keeping its
    parameters; layers already wrapped are left alone. Returns `model` (a matching `model`
    itself comes back wrapped). A host builder can therefore be
    `lambda input_shape, num_classes, slots, config: wrap(MyNet(), slots, config)`.

    The final classifier layer is wrapped too when it matches, as in the shipped hosts (their
    output Linear is a KasminaLayer): a seed there adds capacity right where the logits form.
    To keep it plain, name the targets (`targets=("conv1", "conv2", "fc1")`).

    The env reads the wrapped layers in registration order as the chain of the observation
    graph, so define them in the order data flows through them (`build_host` checks it with
    a dry forward). A forward that reads a target's attributes (`self.fc.weight`) must read
    them from the host (`self.fc.host.weight`).
    """
    types = tuple(t for t in targets if isinstance(t, type))
    names = [t for t in targets if isinstance(t, str)]
    bad = [t for t in targets if not isinstance(t, (type, str))]
    bad += [t for t in types if not issubclass(t, GROWABLE)]
    if bad or not targets:
        raise ValueError(
            f"targets={tuple(targets)!r}: each must be nn.Linear, nn.Conv2d (or a subclass) or "
            "a module name"
        )
    wrapped = [
        f"{n}." if n else "" for n, m in model.named_modules() if isinstance(m, KasminaLayer)
    ]
    matched, used_names = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(w) for w in wrapped):  # the host inside a KasminaLayer
            continue
        hits = [n for n in names if name == n or name.endswith(f".{n}")]
        if isinstance(module, KasminaLayer):  # already growable: wrapping again is a no-op
            used_names.update(hits)
            continue
        if hits and not isinstance(module, GROWABLE):
            raise ValueError(
                f"target {hits[0]!r} names {name!r}, a {type(module).__name__}: only nn.Linear "
                "and nn.Conv2d layers can grow"
            )
        used_names.update(hits)
        if hits or isinstance(module, types):
            matched.append(name)
    unused = [n for n in names if n not in used_names]
    if unused or not (matched or wrapped):
        layers = [n for n, m in model.named_modules() if isinstance(m, GROWABLE)]
        raise ValueError(
            f"targets {unused or list(targets)} match no layer of {type(model).__name__}; its "
            f"Linear/Conv2d layers: {layers or 'none'}"
        )
    for name in matched:
        if not name:
            return KasminaLayer(model, slots, type(model).__name__.lower(), config)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, KasminaLayer(getattr(parent, attr), slots, name, config))
    return model


def build_host(
    name: str | Callable[..., nn.Module],
    input_shape: Sequence[int],
    num_classes: int,
    slots: int,
    config: SeedConfig,
    **kwargs,
) -> nn.Module:
    """Build a host by name (or from a callable) and fix every layer's slot shape.

    A dry forward on one zero sample records each KasminaLayer's output shape, which is the
    shape its kernels are compiled for.
    """
    if callable(name):
        builder = name
    elif name in HOSTS:
        builder = HOSTS[name]
    else:
        raise ValueError(f"unknown host {name!r}; allowed: {', '.join(HOSTS)} or a callable")
    model = builder(tuple(input_shape), num_classes, slots, config, **kwargs)
    label = getattr(builder, "__qualname__", repr(builder)) if callable(name) else repr(name)
    if not isinstance(model, nn.Module):
        raise TypeError(f"host {label} returned {type(model).__name__}, not an nn.Module")
    layers = kasmina_layers(model)
    if not layers:
        raise ValueError(
            f"host {label} has no KasminaLayer: nothing could grow (esper_gym.hosts.wrap makes "
            "a plain network growable)"
        )
    called: list[nn.Module] = []
    hooks = [layer.register_forward_pre_hook(lambda m, _: called.append(m)) for layer in layers]
    for layer in layers:
        layer.record = True  # the slow path records out_shape; the fast path skips all bookkeeping
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for layer, hook in zip(layers, hooks):
            layer.record = False
            hook.remove()
    if called != layers:
        # The observation's edges and the action layout follow registration order.
        raise ValueError(
            f"host {label}: its growable layers run in the order {[m.name for m in called]} but "
            f"are registered in the order {[m.name for m in layers]}; define each in the order "
            "data flows through them, and call each once per forward"
        )
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every KasminaLayer replaced by its host layer: the same network, never
    grown, with no Kasmina code in its forward (the baseline of the overhead benchmarks)."""
    import copy

    plain = copy.deepcopy(model)
    for parent in plain.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, KasminaLayer):
                setattr(parent, name, child.host)
    return plain


def edge_numels(model: nn.Module) -> list[int]:
    """Numel (per sample) of the tensor that flows from each KasminaLayer to the next."""
    return [math.prod(layer.out_shape) for layer in kasmina_layers(model)[:-1]]


def host_macs(model: nn.Module) -> int:
    """Multiply-accumulates per sample of the host layers (the latency cost model's unit)."""
    total = 0
    for layer in kasmina_layers(model):
        weight = layer.host.weight
        spatial = math.prod(layer.out_shape[1:]) if layer.kind == "conv" else 1
        total += weight.numel() * spatial
    return total


def kernel_macs(params: int, shape: Sequence[int]) -> int:
    """Cost model of a kernel on a slot of `shape`: each parameter is used once per position.

    Exact for linear and 1x1/3x3 convolutional kernels up to biases; attention's token mixing
    is not counted. Deterministic on purpose: rewards must not depend on wall-clock noise.
    """
    spatial = math.prod(shape[1:]) if len(shape) == 3 else 1
    return params * spatial
