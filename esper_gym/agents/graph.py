"""The graph side shared by every agent that reads the observation as a graph: Tamiyo
(esper_gym.agents.tamiyo) and the SB3 agents (esper_gym.agents.sb3).

`obs_to_batch` turns observations into a `GraphBatch` (the fields of
`esper_gym.observation.to_pyg`'s PyG batch, without its per-graph loop); `GraphEncoder` is the
message-passing trunk over it. They live here, not in Tamiyo's package, so that SB3 gets the
encoder without importing the PPO learner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GINEConv
from torch_geometric.nn.aggr import AttentionalAggregation


@dataclass
class GraphBatch:
    """The fields of the PyG `Batch` that `esper_gym.observation.to_pyg` makes, and no more."""

    x: torch.Tensor  # [N, node_dim] real nodes of every graph, graph after graph
    edge_index: torch.Tensor  # [2, E] into x
    edge_attr: torch.Tensor  # [E, edge_dim]
    u: torch.Tensor  # [G, global_dim]
    node_pos: torch.Tensor  # [N] a node's index inside its graph = its action block
    action_mask: torch.Tensor  # [G, A] bool
    batch: torch.Tensor  # [N] graph of each node
    num_graphs: int

    def to(self, device: str | torch.device) -> GraphBatch:
        moved = {k: v.to(device) for k, v in vars(self).items() if torch.is_tensor(v)}
        return GraphBatch(**moved, num_graphs=self.num_graphs)


def obs_to_batch(obs, device: str | torch.device = "cpu") -> GraphBatch:
    """`esper_gym.observation.to_pyg` without the per-graph loop: same fields, same values.

    Takes one observation or a batch (leading dim), as numpy arrays or tensors of any dtype
    (SB3 hands over float32 for every key). Like to_pyg it relies on the observation contract:
    real nodes are a prefix (`node_mask`), an edge is real when `edge_attr[..., 0] > 0.5`.
    It exists for speed: to_pyg builds one `Data` per graph and then a `Batch`, ~1.7 ms for
    one observation (a third of the 5 ms decision budget) and ~18 ms for a 64-graph minibatch;
    this is a handful of tensor ops (~0.1 ms). tests/test_tamiyo.py checks both agree.
    """

    def t(key: str) -> torch.Tensor:
        return torch.as_tensor(obs[key])

    nodes, edges, edge_attr = t("nodes"), t("edges"), t("edge_attr")
    node_mask, globals_, action_mask = t("node_mask"), t("globals"), t("action_mask")
    if nodes.dim() == 2:
        nodes, edges, edge_attr = nodes[None], edges[None], edge_attr[None]
        node_mask, globals_, action_mask = node_mask[None], globals_[None], action_mask[None]
    n_graphs, max_nodes = node_mask.shape
    node_mask = node_mask > 0.5
    counts = node_mask.sum(1)
    first = torch.cumsum(counts, 0) - counts  # index of each graph's first node in x
    real_edge = edge_attr[..., 0] > 0.5
    edge_index = (edges.round().long() + first[:, None, None])[real_edge].t().contiguous()
    batch = GraphBatch(
        x=nodes[node_mask].float(),
        edge_index=edge_index,
        edge_attr=edge_attr[real_edge].float(),
        u=globals_.float(),
        node_pos=torch.arange(max_nodes).expand(n_graphs, max_nodes)[node_mask],
        action_mask=action_mask > 0.5,
        batch=torch.repeat_interleave(torch.arange(n_graphs), counts),
        num_graphs=n_graphs,
    )
    return batch if torch.device(device).type == "cpu" else batch.to(device)


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class GraphEncoder(nn.Module):
    """Message-passing trunk: PyG batch -> (node embeddings [N, hidden], graph context [G, hidden]).

    The batch needs `x`, `edge_index`, `edge_attr`, `batch`, `u` (globals, one row per graph)
    as made by `esper_gym.observation.to_pyg`. Edges follow data flow in the observation;
    here each edge is also used backwards (with a direction feature), so a layer hears about
    the layers after it as well as before it.
    """

    def __init__(
        self,
        node_dim: int,
        global_dim: int,
        edge_dim: int,
        hidden: int = 64,
        layers: int = 3,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.hidden = hidden
        self.node_in = nn.Linear(node_dim, hidden)
        self.convs = nn.ModuleList(
            GINEConv(
                nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden)),
                train_eps=True,
                edge_dim=edge_dim + 1,  # + direction: +1 along data flow, -1 against it
            )
            for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.node_out = nn.LayerNorm(hidden)
        self.pool = AttentionalAggregation(
            gate_nn=nn.Linear(hidden, 1), nn=nn.Linear(hidden, hidden)
        )
        self.globals_in = nn.Sequential(
            nn.Linear(global_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden)
        )
        self.context = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.LayerNorm(hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        ei, ea = batch.edge_index, batch.edge_attr
        ones = ea.new_ones(ea.shape[0], 1)
        edge_index = torch.cat([ei, ei.flip(0)], dim=1)
        edge_attr = torch.cat([torch.cat([ea, ones], 1), torch.cat([ea, -ones], 1)], dim=0)

        h = self.node_in(batch.x)
        for conv, norm in zip(self.convs, self.norms):
            # Pre-norm residual block: depth can grow without the embeddings blowing up.
            h = h + self.drop(F.relu(conv(norm(h), edge_index, edge_attr)))
        h = self.node_out(h)

        pooled = self.pool(h, index=batch.batch, dim_size=batch.num_graphs)
        ctx = self.context(torch.cat([pooled, self.globals_in(batch.u)], dim=1))
        return h, self.drop(ctx)


def index_obs(obs: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    """Rows `idx` of a batched observation (every key indexed alike)."""
    return {k: v[idx] for k, v in obs.items()}
