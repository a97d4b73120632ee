"""Host networks whose growable layers are KasminaLayers.

Hosts are deliberately small (capacity-limited) so that growth can pay; the README's task
table measures each against its ceiling (the same host with every slot grown from the start).
A host builder has the signature `builder(input_shape, num_classes, slots, config, **kwargs)`
and returns an `nn.Module` whose KasminaLayers, in registration order, follow the data flow.
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
) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear, every Linear a KasminaLayer."""
    widths = [math.prod(input_shape), *hidden, num_classes]
    modules: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        modules.append(KasminaLayer(nn.Linear(a, b), slots, f"fc{i}", config))
        if i < len(widths) - 2:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    slots: int,
    config: SeedConfig,
    channels: Sequence[int] = (8, 16),
) -> nn.Sequential:
    """[Conv3x3 -> ReLU -> MaxPool2] * len(channels) -> Flatten -> Linear."""
    c, h, w = input_shape
    modules: list[nn.Module] = []
    for i, out in enumerate(channels):
        modules += [
            KasminaLayer(nn.Conv2d(c, out, 3, padding=1), slots, f"conv{i}", config),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        c, h, w = out, h // 2, w // 2
    modules += [
        nn.Flatten(),
        KasminaLayer(nn.Linear(c * h * w, num_classes), slots, "fc", config),
    ]
    return nn.Sequential(*modules)


HOSTS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn}


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
    layers = kasmina_layers(model)
    if not layers:
        raise ValueError(f"host {name!r} has no KasminaLayer: nothing could grow")
    for layer in layers:
        layer.record = True  # the slow path records out_shape; the fast path skips all bookkeeping
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for layer in layers:
        layer.record = False
    return model


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
