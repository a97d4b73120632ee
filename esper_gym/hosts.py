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


class ResidualCNN(nn.Module):
    """Stages of [strided Conv3x3 -> ReLU, then `blocks` residual blocks], then a Linear.

    A residual block is `relu(x + conv_b(relu(conv_a(x))))` with an identity shortcut, so the
    tensor entering a block also reaches the layer after it: the observation graph has a skip
    edge from each stage's strided conv (or the previous block's output, itself a sum) to the
    next growable layer. Every conv and the output Linear are KasminaLayers, registered in the
    order they run.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        slots: int,
        config: SeedConfig,
        channels: Sequence[int] = (8, 16),
        blocks: int = 1,
    ) -> None:
        super().__init__()
        if not channels or blocks < 0:
            raise ValueError(
                f"channels={tuple(channels)!r} must be non-empty, blocks={blocks} >= 0"
            )
        c, h, w = input_shape
        self.stages = nn.ModuleList()
        for i, out in enumerate(channels):
            stage = nn.ModuleDict(
                {"down": KasminaLayer(nn.Conv2d(c, out, 3, 2, 1), slots, f"down{i}", config)}
            )
            for b in range(blocks):
                for part in ("a", "b"):
                    name = f"res{i}{part}" if blocks == 1 else f"res{i}_{b}{part}"
                    conv = nn.Conv2d(out, out, 3, 1, 1)
                    stage[f"{b}{part}"] = KasminaLayer(conv, slots, name, config)
            self.stages.append(stage)
            c, h, w = out, (h + 1) // 2, (w + 1) // 2
        self.blocks = blocks
        self.fc = KasminaLayer(nn.Linear(c * h * w, num_classes), slots, "fc", config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = torch.relu(stage["down"](x))
            for b in range(self.blocks):
                x = torch.relu(x + stage[f"{b}b"](torch.relu(stage[f"{b}a"](x))))
        return self.fc(torch.flatten(x, 1))


def resnet(
    input_shape: Sequence[int],
    num_classes: int,
    slots: int,
    config: SeedConfig,
    channels: Sequence[int] = (8, 16),
    blocks: int = 1,
) -> ResidualCNN:
    """A small residual CNN (`ResidualCNN`): len(channels) * (1 + 2 * blocks) + 1 layers."""
    return ResidualCNN(input_shape, num_classes, slots, config, channels, blocks)


HOSTS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "resnet": resnet}

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

    The env reads the wrapped layers in registration order as the nodes of the observation
    graph (and the action layout), so define them in the order data flows through them
    (`build_host` checks it with a dry forward); the edges are traced from the forward
    (`data_flow_edges`), skip connections included. A forward that reads a target's attributes (`self.fc.weight`) must read
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
        # The observation's nodes and the action layout follow registration order.
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


class _LeafKasmina(torch.fx.Tracer):
    # A KasminaLayer is one node of the data-flow graph: trace around it, not into it (its
    # forward branches on seed state, which fx cannot follow and which is not data flow).
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, KasminaLayer) or super().is_leaf_module(m, qualname)


def data_flow_edges(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[int, int]]:
    """The real data-flow edges between the model's KasminaLayers, as (source, target) indices
    into `kasmina_layers(model)`, sorted.

    (i, j) is an edge when layer j's input is computed from layer i's output without passing
    through another growable layer: a chain gives (i, i + 1), a residual block adds an edge
    that skips the block. Found with `torch.fx` (KasminaLayers as leaves); a forward fx cannot
    trace (data-dependent control flow, non-tensor tricks) falls back to `_autograd_edges`,
    which reads the same relation off the autograd graph of one dry forward.
    """
    try:
        return _fx_edges(model)
    except Exception:  # fx refuses many real forwards (control flow on values, etc.)
        return _autograd_edges(model, input_shape)


def _fx_edges(model: nn.Module) -> list[tuple[int, int]]:
    layers = kasmina_layers(model)
    index = {id(layer): i for i, layer in enumerate(layers)}
    graph = _LeafKasmina().trace(model)
    node_layer: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if id(module) in index:
                node_layer[node] = index[id(module)]
    if sorted(node_layer.values()) != list(range(len(layers))):
        raise ValueError("fx graph does not call every KasminaLayer exactly once")
    edges = set()
    sources: dict[torch.fx.Node, frozenset[int]] = {}  # nearest growable layers upstream
    for node in graph.nodes:  # topological order
        upstream = frozenset().union(*(sources[n] for n in node.all_input_nodes))
        if node in node_layer:
            edges |= {(i, node_layer[node]) for i in upstream}
            sources[node] = frozenset({node_layer[node]})
        else:
            sources[node] = upstream
    return sorted(edges)


def _autograd_edges(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[int, int]]:
    """Edges from one dry forward: each layer's input autograd node is walked back until it
    meets the output node of another KasminaLayer (the nearest growable ancestors)."""
    layers = kasmina_layers(model)
    outputs: dict[object, int] = {}  # grad_fn of a layer's output -> layer index
    inputs: dict[int, object] = {}  # layer index -> grad_fn of its input

    def pre(i):
        def hook(_m, args):
            inputs[i] = args[0].grad_fn

        return hook

    def post(i):
        def hook(_m, _args, out):
            outputs[out.grad_fn] = i

        return hook

    hooks = [layer.register_forward_pre_hook(pre(i)) for i, layer in enumerate(layers)]
    hooks += [layer.register_forward_hook(post(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            x = torch.zeros(1, *input_shape, requires_grad=True)
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    edges = set()
    for j, start in inputs.items():
        stack, seen = [start], set()
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if fn in outputs and outputs[fn] != j:
                edges.add((outputs[fn], j))
                continue
            stack += [nxt for nxt, _ in fn.next_functions]
    return sorted(edges)


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
