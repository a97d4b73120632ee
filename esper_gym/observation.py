"""The model graph as a fixed-shape Dict observation, and its conversion to a PyG batch.

Nodes are the host's KasminaLayers in data-flow order (padded to `max_nodes`); edges are the
host's real data flow between them, traced from its forward (`esper_gym.hosts.data_flow_edges`):
a chain gives (i, i + 1), a residual block adds the edge that skips it. Every feature is computed
from the live training run.

| key         | shape               | dtype   | content                                            |
|-------------|---------------------|---------|----------------------------------------------------|
| nodes       | (max_nodes, F)      | float32 | NODE_FEATURES, then SLOT_FEATURES for each slot   |
| edges       | (2 * max_nodes, 2)  | int64   | (source, target) node indices; padding is (0, 0)  |
| edge_attr   | (2 * max_nodes, 2)  | float32 | [1 for a real edge / 0 for padding, log1p(numel)/10 of the tensor] |
| node_mask   | (max_nodes,)        | int8    | 1 for a real layer                                 |
| globals     | (G,)                | float32 | GLOBAL_FEATURES, then RENT_FEATURES (Task.show_rent), then the context (show_context) |
| action_mask | (A,)                | int8    | 1 where the action is valid now (see actions.py)   |

F = len(NODE_FEATURES) + slots * len(SLOT_FEATURES). Wall-clock measurements are not part of
the observation by default, so that a seeded episode is exactly reproducible; with
`telemetry="measured"` (`GraphSpec.measured`) each node row ends with MEASURED_NODE_FEATURES and
the globals with MEASURED_GLOBAL_FEATURES (after every other feature, so indices of the
others do not move). A task with `show_rent` (spirals_budget) appends RENT_FEATURES after
those: the reward's parameter rent, the user's preference, which the agent may see.

This module owns the contract, both ways: the feature tables and their order (the env builds
the globals by name with `global_row`), and the reading of an observation back (`ObsView`:
named features, seed states, the action layout), so no agent keeps its own index map.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from gymnasium import spaces

from esper_gym.actions import ActionLayout
from esper_gym.kasmina.lifecycle import SeedState
from esper_gym.kasmina.telemetry import HealthSignal

NODE_FEATURES = (
    "is_linear",
    "is_conv",
    "depth",  # position in the graph, 0 (first) .. 1 (last)
    "log_fan_in",
    "log_fan_out",
    "act_mean",
    "log_act_var",
    "dead_ratio",
    "log_grad_norm",
    "log_weight_norm",
    "log_added_params",  # kernel parameters on this layer, log1p / 10
    "eff_rank",  # effective rank of the output on the recorded batch / width, in [0, 1]
    "log_out_grad",  # log1p(RMS per-sample norm of dLoss/d(output)) on the recorded batch
)
SLOT_FEATURES = (
    *(f"state_{s.name.lower()}" for s in SeedState),
    "alpha",
    "age",  # optimizer steps since germination / training budget
    "fault_ratio",  # faults / breaker limit
    "contribution",  # validation accuracy with the seed on minus off, in points / 10
    "log_params",
)
GLOBAL_FEATURES = (
    "progress",  # optimizer steps done / budget
    "val_acc",
    "log_val_loss",
    "log_train_loss",
    "acc_delta",  # change of val_acc over the last step, in points / 10
    "best_acc",
    "plateau",  # steps since val_acc last improved, / 10
    # log10(1 + added / host parameters): 0 with no kernels, 1 for nine times the host's
    # parameters (a plain ratio reached 21 on spirals while every other feature stays near ±1).
    "log_params_ratio",
    "live_seeds",  # seeds in a live or fossil state / slots
    "log_faults",  # log1p(faults so far)
    # Running accuracy over the last interval's training batches (each batch's forward before
    # its update); at reset, before any training, the validation accuracy.
    "train_acc",
)
# telemetry="measured" only: wall-clock and cache counters (not reproducible bit for bit).
MEASURED_NODE_FEATURES = (
    "log_latency_ms",  # the layer's forward (host + seeds) on the recorded batch, log1p(ms)
    "log_seed_latency_ms",  # its seeds' kernel calls on that batch, log1p(ms)
    "fault_rate",  # its faults this episode / env steps
)
MEASURED_GLOBAL_FEATURES = (
    "cache_hit_rate",  # kernel cache hits / lookups this episode (0 before any)
    "log_kernel_loads",  # log1p(artifacts loaded from the store this episode)
    "log_kernel_compiles",  # log1p(blueprints compiled this episode)
)
# Task.show_rent only: the reward's param_cost weight (rent per doubling of the host, all episode).
RENT_FEATURES = ("param_cost",)
NODE_INDEX = {name: i for i, name in enumerate(NODE_FEATURES)}
SLOT_INDEX = {name: i for i, name in enumerate(SLOT_FEATURES)}
GLOBAL_INDEX = {name: i for i, name in enumerate(GLOBAL_FEATURES)}
EDGE_FEATURES = 2
# Features are logs, ratios and clipped values; the bound only guards against a diverging host.
BOUND = np.float32(1e3)


@dataclass(frozen=True)
class GraphSpec:
    max_nodes: int
    slots: int
    extra_globals: int = 0  # context features appended to globals (show_context)
    measured: bool = False  # telemetry="measured": the MEASURED_* features are appended

    @property
    def node_dim(self) -> int:
        extra = len(MEASURED_NODE_FEATURES) if self.measured else 0
        return len(NODE_FEATURES) + self.slots * len(SLOT_FEATURES) + extra

    @property
    def max_edges(self) -> int:
        # A chain needs max_nodes - 1; the rest is room for skip edges (a residual block adds
        # one): the residual hosts of 8 layers have 8 edges, of 11 layers (two blocks) 16.
        return 2 * self.max_nodes

    @property
    def global_dim(self) -> int:
        measured = len(MEASURED_GLOBAL_FEATURES) if self.measured else 0
        return len(GLOBAL_FEATURES) + measured + self.extra_globals


def observation_space(spec: GraphSpec, n_actions: int) -> spaces.Dict:
    n, e = spec.max_nodes, spec.max_edges
    return spaces.Dict(
        {
            "nodes": spaces.Box(-BOUND, BOUND, (n, spec.node_dim), np.float32),
            "edges": spaces.Box(0, n - 1, (e, 2), np.int64),
            "edge_attr": spaces.Box(-BOUND, BOUND, (e, EDGE_FEATURES), np.float32),
            "node_mask": spaces.Box(0, 1, (n,), np.int8),
            "globals": spaces.Box(-BOUND, BOUND, (spec.global_dim,), np.float32),
            "action_mask": spaces.Box(0, 1, (n_actions,), np.int8),
        }
    )


def global_row(values: Mapping[str, float], names: Sequence[str] = GLOBAL_FEATURES) -> list:
    """`values` (feature name -> value) in the order of `names` (GLOBAL_FEATURES, or
    MEASURED_GLOBAL_FEATURES); a missing or unknown name is an error, so the builder and the
    table cannot drift apart."""
    if set(values) != set(names):
        missing, unknown = sorted(set(names) - set(values)), sorted(set(values) - set(names))
        raise ValueError(f"global features: missing {missing}, unknown {unknown}")
    return [values[name] for name in names]


def rent_globals(task, reward_fn) -> list[float]:
    """RENT_FEATURES of `task`'s observation: [] unless `task.show_rent`; else the `param_cost`
    of `reward_fn`'s weights (NaN, written as 0, for a reward without `weights`)."""
    if not getattr(task, "show_rent", False):
        return []
    weights = getattr(reward_fn, "weights", None)
    return [float(getattr(weights, "param_cost", math.nan))]


def slot_column(slot: int, feature: str) -> int:
    """The column of `nodes` that holds seed slot `slot`'s `feature` (a SLOT_FEATURES name)."""
    return len(NODE_FEATURES) + slot * len(SLOT_FEATURES) + SLOT_INDEX[feature]


def layout_from_shapes(max_nodes: int, node_dim: int, n_actions: int) -> ActionLayout:
    """The action layout of an observation's shapes: `nodes` (max_nodes, node_dim) and an
    `action_mask` of n_actions."""
    rest = node_dim - len(NODE_FEATURES)
    if rest % len(SLOT_FEATURES) == len(MEASURED_NODE_FEATURES):  # telemetry="measured"
        rest -= len(MEASURED_NODE_FEATURES)
    slots = rest // len(SLOT_FEATURES)
    per_node = (n_actions - 1) // max_nodes
    return ActionLayout(max_nodes, slots, per_node // slots - 2)


def layout_from_spaces(
    observation_space: spaces.Dict, action_space: spaces.Discrete
) -> ActionLayout:
    """The action layout of an env's spaces (so one agent works on every task)."""
    max_nodes, node_dim = observation_space["nodes"].shape
    return layout_from_shapes(max_nodes, node_dim, int(action_space.n))


class ObsView:
    """Named reads of one observation, or of a batch of them (every key with the same leading
    batch dimensions): each read keeps those dimensions in front and works on numpy arrays and
    torch tensors alike. Nothing is copied or converted, so a read is the stored value."""

    def __init__(self, obs: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        self.obs = obs

    @cached_property
    def layout(self) -> ActionLayout:
        max_nodes, node_dim = self.obs["nodes"].shape[-2:]
        return layout_from_shapes(max_nodes, node_dim, self.obs["action_mask"].shape[-1])

    @property
    def n_nodes(self):
        """Real host layers (the rows before the padding): an int for one observation."""
        n = self.obs["node_mask"].sum(-1)
        return int(n) if n.ndim == 0 else n

    def glob(self, name: str):
        """Global feature `name` (a GLOBAL_FEATURES name): a scalar for one observation."""
        g, i = self.obs["globals"], GLOBAL_INDEX[name]
        return g[i] if g.ndim == 1 else g[..., i]  # g[..., i] of one row is a 0-d array

    def node(self, name: str):
        """Node feature `name` (a NODE_FEATURES name) of every node: (..., max_nodes)."""
        return self.obs["nodes"][..., NODE_INDEX[name]]

    def slot(self, slot: int, name: str):
        """Seed slot `slot`'s feature `name` (a SLOT_FEATURES name) on every node."""
        return self.obs["nodes"][..., slot_column(slot, name)]

    @cached_property
    def states(self):
        """Every slot's SeedState value (the argmax of its one-hot state features):
        (..., max_nodes, slots); padding nodes read DORMANT."""
        slots, start = self.layout.slots, len(NODE_FEATURES)
        block = self.obs["nodes"][..., start : start + slots * len(SLOT_FEATURES)]
        block = block.reshape(*block.shape[:-1], slots, len(SLOT_FEATURES))
        return block[..., : len(SeedState)].argmax(-1)

    def state(self, layer: int, slot: int) -> SeedState:
        """The state of `slot` on node `layer`, of one observation."""
        return SeedState(int(self.states[layer, slot]))


def _log(x: float) -> float:
    return math.log1p(max(x, 0.0)) / 10.0


def node_features(
    signals: Sequence[HealthSignal], budget_steps: int, max_faults: int
) -> np.ndarray:
    rows = []
    last = max(len(signals) - 1, 1)
    for i, sig in enumerate(signals):
        host_params = sig.params - sum(s.params for s in sig.slots)
        row = [
            float(sig.kind == "linear"),
            float(sig.kind == "conv"),
            i / last,
            _log(sig.fan_in),
            _log(sig.fan_out),
            math.tanh(sig.act_mean),
            math.log1p(sig.act_var),
            sig.dead_ratio,
            math.log1p(sig.grad_norm),
            math.log1p(sig.weight_norm),
            _log(sig.params - host_params),
            sig.eff_rank,
            math.log1p(max(sig.out_grad, 0.0)),
        ]
        for slot in sig.slots:
            onehot = [0.0] * len(SeedState)
            onehot[slot.state] = 1.0
            row += [
                *onehot,
                slot.alpha,
                slot.age / max(budget_steps, 1),
                slot.faults / max_faults,
                max(min(slot.contribution * 10.0, 5.0), -5.0),
                _log(slot.params),
            ]
        rows.append(row)
    return np.asarray(rows, dtype=np.float32)


def build_observation(
    spec: GraphSpec,
    nodes: np.ndarray,
    edge_list: Sequence[tuple[int, int]],
    edge_numel: Sequence[int],
    globals_: Sequence[float],
    action_mask: np.ndarray,
) -> dict[str, np.ndarray]:
    """Pad the live graph to the fixed shapes of `observation_space(spec, ...)`.

    `edge_list` holds (source, target) node indices, `edge_numel` the per-sample size of the
    tensor each edge carries."""
    n = nodes.shape[0]
    if n > spec.max_nodes:
        raise ValueError(f"host has {n} growable layers; max_nodes={spec.max_nodes}")
    padded = np.zeros((spec.max_nodes, spec.node_dim), np.float32)
    padded[:n] = np.clip(np.nan_to_num(nodes, posinf=BOUND, neginf=-BOUND), -BOUND, BOUND)
    if len(edge_list) > spec.max_edges:
        raise ValueError(
            f"host graph has {len(edge_list)} edges; the observation holds {spec.max_edges} "
            f"(2 * max_nodes): raise max_nodes (now {spec.max_nodes})"
        )
    if len(edge_numel) != len(edge_list):
        raise ValueError(f"{len(edge_list)} edges but {len(edge_numel)} edge sizes")
    edges = np.zeros((spec.max_edges, 2), np.int64)
    edge_attr = np.zeros((spec.max_edges, EDGE_FEATURES), np.float32)
    for i, ((src, dst), numel) in enumerate(zip(edge_list, edge_numel)):
        if not (0 <= src < n and 0 <= dst < n):
            raise ValueError(f"edge ({src}, {dst}) names a node outside 0..{n - 1}")
        edges[i] = (src, dst)
        edge_attr[i] = (1.0, _log(numel))
    mask = np.zeros(spec.max_nodes, np.int8)
    mask[:n] = 1
    return {
        "nodes": padded,
        "edges": edges,
        "edge_attr": edge_attr,
        "node_mask": mask,
        "globals": np.clip(np.nan_to_num(np.asarray(globals_, np.float32)), -BOUND, BOUND),
        "action_mask": action_mask.astype(np.int8),
    }


def to_pyg(obs: Mapping[str, np.ndarray | torch.Tensor], device: str | torch.device = "cpu"):
    """A single observation (unbatched arrays) or a batch (leading batch dim) -> PyG `Batch`.

    The batch carries `x`, `edge_index`, `edge_attr`, `batch`, `u` (globals, one row per graph),
    `node_pos` (a node's index inside its own graph, i.e. its action block), `action_mask`
    (one row per graph) and `num_graphs`. Padded nodes and edges are dropped.
    """
    from torch_geometric.data import Batch, Data

    def t(key: str) -> torch.Tensor:
        return torch.as_tensor(np.asarray(obs[key]) if not torch.is_tensor(obs[key]) else obs[key])

    nodes, edges, edge_attr = t("nodes"), t("edges"), t("edge_attr")
    node_mask, globals_, amask = t("node_mask"), t("globals"), t("action_mask")
    if nodes.dim() == 2:
        nodes, edges, edge_attr = nodes[None], edges[None], edge_attr[None]
        node_mask, globals_, amask = node_mask[None], globals_[None], amask[None]
    graphs = []
    for g in range(nodes.shape[0]):
        n = int(node_mask[g].sum())
        real = edge_attr[g, :, 0] > 0.5
        data = Data(
            x=nodes[g, :n].float(),
            edge_index=edges[g][real].long().t().contiguous(),
            edge_attr=edge_attr[g][real].float(),
            u=globals_[g].float()[None],
            node_pos=torch.arange(n),
            action_mask=amask[g].bool()[None],
        )
        graphs.append(data)
    return Batch.from_data_list(graphs).to(device)


def measured_features(
    signals: Sequence[HealthSignal],
    layers,
    layer_faults: Mapping[str, int],
    steps: int,
    telemetry: Mapping[str, float],
) -> tuple[np.ndarray, list[float]]:
    """`telemetry="measured"`'s extra node columns (MEASURED_NODE_FEATURES) and globals
    (MEASURED_GLOBAL_FEATURES) from the layers' health, fault counts and the episode's kernel
    telemetry (`MorphogeneticEnv.telemetry_stats`)."""
    from esper_gym.kasmina.lifecycle import RUNNING

    extra = np.zeros((len(signals), len(MEASURED_NODE_FEATURES)), np.float32)
    for i, (sig, layer) in enumerate(zip(signals, layers)):
        seeds = sum(s.latency_ms for s in layer.slots if s.state in RUNNING)
        extra[i] = (
            math.log1p(max(sig.latency_ms, 0.0)),
            math.log1p(seeds),
            layer_faults.get(layer.name, 0) / max(steps, 1),
        )
    rate = telemetry["cache_hit_rate"]
    measured = {
        "cache_hit_rate": 0.0 if math.isnan(rate) else rate,
        "log_kernel_loads": math.log1p(telemetry["kernel_loads"]),
        "log_kernel_compiles": math.log1p(telemetry["kernel_compiles"]),
    }
    return extra, global_row(measured, MEASURED_GLOBAL_FEATURES)
