"""Tamiyo: a graph policy (PyG) and its PPO learner, readable top to bottom.

The agent sees the host network as a graph (one node per growable layer, see
esper_gym/observation.py) and answers with one flat `Discrete(A)` action laid out as in
esper_gym/actions.py: column 0 is WAIT, then node p owns the contiguous block
`1 + p * per_node .. 1 + (p + 1) * per_node` of slot-level actions. So the policy is

    graph ──► message passing (GINE, residual, LayerNorm) ──► node embeddings h_p
           └─► attentional pooling ⊕ MLP(globals) ──────────► graph context c
    logits[1 + p * per_node : ...] = node_head(h_p ⊕ c)     (the same head for every node)
    logits[0]                      = wait_head(c)
    value                          = value_head(c)

and because the node head is shared, the network does not care how many layers the host has: a
policy trained on one host runs on another with a different depth (or `max_nodes`) as long as
the slots and blueprints per node (`per_node`) match.

Contents, in reading order: `obs_to_batch` (observation -> graph batch), `GraphEncoder` (the
trunk, reused by esper_gym/agents/sb3.py), `TamiyoPolicy`, checkpoints, `PPOConfig` and `train` (CleanRL's
PPO with action masks).
"""

from __future__ import annotations

import io
import math
import os
import reprlib
import stat
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical
from torch_geometric.nn import GINEConv
from torch_geometric.nn.aggr import AttentionalAggregation

from esper_gym.actions import ADVANCE, CULL, GERMINATE, WAIT
from esper_gym.agents.baselines import layout_from_spaces

# Logit given to masked and padded actions. exp(-1e9 - logsumexp) is exactly 0.0 in float32,
# so masked actions have probability 0, and unlike -inf it keeps entropy and log-probs finite.
MASKED = -1e9
_REPR = reprlib.Repr()  # short reprs of hostile values in error messages (see _show)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 4, 4


# ---------------------------------------------------------------------------------------------
# Observation -> PyG batch
# ---------------------------------------------------------------------------------------------


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


def _head(inp: int, hidden: int, out: int, gain: float) -> nn.Sequential:
    last = nn.Linear(hidden, out)
    # CleanRL's init: a tiny policy head makes the first policy uniform over valid actions.
    nn.init.orthogonal_(last.weight, gain)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), last)


class TamiyoPolicy(nn.Module):
    """Actor-critic over the model graph: `forward(batch) -> (logits [G, A], value [G])`.

    - `batch` is what `obs_to_batch(obs)` (or `to_pyg(obs)`) returns for one or many
      observations; graphs in a batch may have different numbers of nodes. A is read from
      `batch.action_mask`, so any `max_nodes` works, with A = 1 + max_nodes * per_node_actions.
    - Node p's `per_node_actions` logits land in columns `1 + p * per_node ...`; columns of
      padded nodes and every action with `action_mask` False get `MASKED` (probability 0).
      If a mask were all False the distribution would be uniform; the env keeps WAIT valid.
    - Flat head (`gated=False`): WAIT is one logit among the others, from its own head. With
      `wait_bias=0` (no prior) every valid action is about equally likely at initialisation, so
      WAIT gets 1/(valid actions), and an agent that learns "WAIT is always safe" has to learn
      it from rewards. `wait_bias` b is the initial bias of that logit (an ordinary parameter
      after that): WAIT starts with probability e^b / (e^b + valid actions - 1).
    - Gated head (`gated=True`): the same WAIT head gives the logit w of a switch, "WAIT or
      act", and the node head chooses among the valid non-WAIT actions:
      log p(WAIT) = log sigmoid(w), log p(a) = log sigmoid(-w) + log softmax(node logits)[a].
      The output is still one categorical over the flat actions (the log-probabilities are the
      logits), so PPO, masks and checkpoints are unchanged. WAIT starts with probability
      sigmoid(wait_bias) however many actions are valid: with 28 GERMINATE actions and one
      WAIT, a flat head samples an intervention almost every step, and exploring that way is
      germinate-cull churn. When no other action is valid, WAIT has probability 1.
    - `value` is in reward units. When `train(norm_returns=True)` the value head predicts
      normalised returns and the running mean/var buffers here map it back.
    """

    def __init__(
        self,
        node_dim: int,
        global_dim: int,
        edge_dim: int,
        per_node_actions: int,
        hidden: int = 64,
        layers: int = 3,
        dropout: float = 0.1,
        wait_bias: float = 0.0,
        gated: bool = False,
    ):
        super().__init__()
        self.init_kwargs = dict(
            node_dim=node_dim,
            global_dim=global_dim,
            edge_dim=edge_dim,
            per_node_actions=per_node_actions,
            hidden=hidden,
            layers=layers,
            dropout=dropout,
            wait_bias=wait_bias,
            gated=gated,
        )
        self.per_node = per_node_actions
        self.gated = gated
        self.encoder = GraphEncoder(node_dim, global_dim, edge_dim, hidden, layers, dropout)
        self.node_head = _head(2 * hidden, hidden, per_node_actions, gain=0.01)
        self.wait_head = _head(hidden, hidden, 1, gain=0.01)
        nn.init.constant_(self.wait_head[-1].bias, wait_bias)
        self.value_head = _head(hidden, hidden, 1, gain=1.0)
        self.register_buffer("ret_mean", torch.zeros(()))
        self.register_buffer("ret_var", torch.ones(()))
        self.register_buffer("ret_count", torch.zeros(()))

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        h, ctx = self.encoder(batch)
        mask = batch.action_mask
        g, n_actions = mask.shape
        if (n_actions - 1) % self.per_node:
            raise ValueError(
                f"action space of {n_actions} does not fit blocks of {self.per_node} per node"
            )

        node_logits = self.node_head(torch.cat([h, ctx[batch.batch]], dim=1))  # [N, per_node]
        logits = node_logits.new_full((g, n_actions), MASKED)
        logits[:, 0] = self.wait_head(ctx).squeeze(1)
        cols = (
            1
            + batch.node_pos[:, None] * self.per_node
            + torch.arange(self.per_node, device=h.device)
        )
        logits[batch.batch[:, None], cols] = node_logits
        logits = logits.masked_fill(~mask, MASKED)
        if self.gated:
            wait = logits[:, 0]
            other = logits[:, 1:]
            can_act = mask[:, 1:].any(1)
            log_act = torch.where(can_act, F.logsigmoid(-wait), torch.full_like(wait, MASKED))
            log_wait = torch.where(can_act, F.logsigmoid(wait), torch.zeros_like(wait))
            choice = other.log_softmax(1) + log_act[:, None]
            logits = torch.cat([log_wait[:, None], choice], 1).masked_fill(~mask, MASKED)

        value = self.value_head(ctx).squeeze(1)
        value = value * (self.ret_var + 1e-8).sqrt() + self.ret_mean
        return logits, value

    @torch.no_grad()
    def uncertainty(self, batch, samples: int = 8) -> dict[str, torch.Tensor]:
        """MC dropout: `samples` forward passes with dropout on.

        Returns per graph `value_std` (std of the value across passes, reward units) and
        `entropy` (policy entropy averaged across passes). Leaves the module's mode unchanged.
        """
        was_training = self.training
        self.train()
        values, entropies = [], []
        for _ in range(samples):
            logits, value = self(batch)
            values.append(value)
            entropies.append(Categorical(logits=logits).entropy())
        self.train(was_training)
        return {
            "value_std": torch.stack(values).std(0, unbiased=False),
            "entropy": torch.stack(entropies).mean(0),
        }

    @torch.inference_mode()
    def act(
        self,
        obs,
        info: dict | None = None,
        *,
        greedy: bool = True,
        generator: torch.Generator | None = None,
    ) -> int:
        """One observation (the env's Dict, unbatched) -> action index. Eval mode, no dropout.

        `info` is ignored; it is there so that Tamiyo has the baselines' `act(obs, info)`.
        `greedy=False` samples the policy, drawing from `generator` (torch's global RNG when
        None); `actor` makes an `act` whose draws are reproducible from an episode seed.
        Greedy can differ a lot from sampling: when the policy spreads its growth mass over
        several germinate actions, WAIT may still be the single argmax, and a greedy agent then
        waits all episode, or germinates and never advances (seen on spirals: 8 held-out seeds
        scored 5.39 greedy, 5.70 sampled; experiments/tamiyo_vs_baselines.py reports both).
        """
        was_training = self.training
        if was_training:  # module.train()/eval() walk every submodule: only pay when needed
            self.eval()
        logits, _ = self(obs_to_batch(obs))
        if was_training:
            self.train()
        if greedy:
            return int(logits[0].argmax())
        # multinomial rather than Categorical.sample: only it takes a generator. Masked
        # actions have probability exactly 0 (MASKED), so they are never drawn.
        return int(torch.multinomial(logits[0].softmax(-1), 1, generator=generator))

    def actor(
        self,
        *,
        greedy: bool = False,
        seed: int | None = None,
        gate: float | None = None,
        gate_samples: int = 8,
        gate_kinds: Sequence[str] = (GERMINATE,),
    ) -> Callable[..., int]:
        """`act(obs, info=None) -> action` for one episode. Sampling (the default: that is the
        policy PPO trained) draws from a generator seeded with `seed`, so the same episode seed
        gives the same actions in every run and every agent comparison stays paired; `seed=None`
        draws from torch's global RNG.

        `gate` (nats): the uncertainty gate. An action of a kind in `gate_kinds` (by default
        GERMINATE: growth, not the lifecycle of seeds already growing) whose MC-dropout
        disagreement (`epistemic`, `gate_samples` passes) exceeds it becomes WAIT: the policy
        grows only where its dropout ensemble agrees. The passes are seeded from `seed` and the
        step, so a gated episode is as reproducible as an ungated one."""
        if gate is not None and (isinstance(gate, bool) or not gate >= 0):
            raise ValueError(f"uncertainty gate={gate!r}: a disagreement in nats, >= 0")
        if isinstance(gate_samples, bool) or not isinstance(gate_samples, int) or gate_samples < 2:
            raise ValueError(f"gate_samples={gate_samples!r}: an int >= 2 (MC-dropout passes)")
        generator = None
        if not greedy and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        unknown = sorted(set(gate_kinds) - {GERMINATE, ADVANCE, CULL})
        if unknown:
            raise ValueError(f"gate_kinds {unknown}; allowed: {GERMINATE}, {ADVANCE}, {CULL}")
        if gate is None:
            return lambda obs, info=None: self.act(obs, greedy=greedy, generator=generator)
        from esper_gym.agents.baselines import layout_from_shapes

        steps = iter(range(1 << 62))
        layouts: dict[tuple, object] = {}  # by observation shape: decoded once, not every step

        def gated(obs, info=None) -> int:
            action = self.act(obs, greedy=greedy, generator=generator)
            mc_seed = (0 if seed is None else int(seed)) * 1_000_003 + next(steps)
            shape = (*obs["nodes"].shape, len(obs["action_mask"]))
            layout = layouts.get(shape) or layouts.setdefault(shape, layout_from_shapes(*shape))
            gated_kind = action != 0 and layout.decode(action).kind in gate_kinds
            # WAIT is action 0; always valid in an Esper env, but never substitute an invalid one
            if (
                gated_kind
                and obs["action_mask"][0]
                and self.epistemic(obs, gate_samples, mc_seed) > gate
            ):
                return 0
            return action

        return gated

    @torch.inference_mode()
    def epistemic(self, obs, samples: int = 8, seed: int = 0) -> float:
        """MC-dropout disagreement at one observation (nats): the mutual information between
        the action and the dropout mask, H(mean_k p_k) - mean_k H(p_k) over `samples` passes
        with dropout on. 0 when every pass gives the same distribution; high where the
        policy's choice rests on a few units (epistemic, not the policy's own randomness).
        Seeded; torch's global RNG and the module's mode are left as they were."""
        batch = obs_to_batch(obs)
        was_training = self.training
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.train()
            probs = torch.stack([self(batch)[0][0].softmax(-1) for _ in range(samples)])
        self.train(was_training)

        def entropy(p: torch.Tensor) -> torch.Tensor:
            return -(p * p.clamp_min(1e-12).log()).sum(-1)

        return float((entropy(probs.mean(0)) - entropy(probs).mean()).clamp_min(0.0))

    @classmethod
    def for_space(cls, space: gym.spaces.Dict, **kw) -> TamiyoPolicy:
        """Size a policy from an observation space (the env's Dict)."""
        return cls(**space_kwargs(space), **kw)


def space_kwargs(space: gym.spaces.Dict) -> dict:
    """The TamiyoPolicy sizes an observation space implies (the action count is read from
    `action_mask`, which has one entry per action)."""
    max_nodes, node_dim = space["nodes"].shape
    n_actions = space["action_mask"].shape[0]
    return dict(
        node_dim=node_dim,
        global_dim=space["globals"].shape[0],
        edge_dim=space["edge_attr"].shape[1],
        per_node_actions=(n_actions - 1) // max_nodes,
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    policy: TamiyoPolicy
    optimizer_state: dict | None
    global_step: int
    config: dict
    torch_rng: torch.Tensor | None
    env: dict = field(default_factory=dict)  # env_record() of the env it was trained on


def env_record(env: gym.Env) -> dict:
    """What a checkpoint must agree on with an env: {"task": name, "blueprints": [...]} of an
    Esper env, {} for any other env. The blueprint library is part of the action space's
    meaning: GERMINATE action b picks `blueprints[b]`, so the same index on a reordered
    library is another blueprint. `"show_context": True` when the env appends the context's
    factors to the globals (evaluation must then show them too)."""
    task = getattr(env.unwrapped, "task", None)
    if task is None or not hasattr(task, "blueprints"):
        return {}
    record = {"task": str(task.name), "blueprints": [str(b) for b in task.blueprints]}
    if getattr(env.unwrapped, "show_context", False):
        record["show_context"] = True
    return record


def mixture_record(records: list[dict]) -> dict:
    """The `env_record` of training on several tasks: their names joined by "+" (a resumed run
    must mix the same tasks), their shared blueprint library. Tasks whose libraries differ are
    refused: the same GERMINATE index would mean another blueprint in each."""
    if len(records) == 1:
        return records[0]
    first = records[0]
    for rec in records[1:]:
        if rec.get("blueprints") != first.get("blueprints"):
            raise ValueError(
                f"task {rec.get('task')!r} has the blueprint library {rec.get('blueprints')}, "
                f"task {first.get('task')!r} has {first.get('blueprints')}: one policy's "
                "GERMINATE actions cannot mean both; give every task the same library"
            )
    names = [str(rec.get("task")) for rec in records]
    mixed = {"task": "+".join(names), "tasks": names, "blueprints": first.get("blueprints")}
    if any(rec.get("show_context") for rec in records):
        mixed["show_context"] = True
    return mixed


def check_env_record(saved: dict, current: dict, checkpoint, *, same_task: bool) -> None:
    """Refuse a checkpoint whose recorded blueprint library (and, with `same_task`, task)
    differs from `current` (an `env_record`). Nothing to check against a non-Esper env."""
    if not current:
        return
    if not isinstance(saved, dict) or not {"task", "blueprints"} <= set(saved):
        raise ValueError(
            f"checkpoint {checkpoint} records no task or blueprint library (written by an older "
            "esper-gym, or by save_checkpoint without env=), so its GERMINATE actions cannot be "
            f"matched to task {current['task']!r}'s blueprints {current['blueprints']}"
        )
    if same_task and saved["task"] != current["task"]:
        raise ValueError(
            f"checkpoint {checkpoint} is for task {saved['task']!r}; this run's task is "
            f"{current['task']!r}: resume a checkpoint of the same task"
        )
    if list(saved["blueprints"]) != list(current["blueprints"]):
        raise ValueError(
            f"checkpoint {checkpoint} was trained with the blueprint library "
            f"{list(saved['blueprints'])}, but task {current['task']!r} has "
            f"{list(current['blueprints'])}: the same GERMINATE action would pick another "
            "blueprint; use the library (names and order) it was trained with"
        )


def save_checkpoint(
    path: str | os.PathLike,
    policy: TamiyoPolicy,
    optimizer: torch.optim.Optimizer | None,
    global_step: int,
    config: PPOConfig | dict | None,
    env: dict | None = None,
) -> None:
    """Write everything a resumed run needs; atomic, so a crash never leaves half a file.
    `env`: the `env_record` of the env it was trained on (checked on resume and evaluation)."""
    state = {
        "policy_kwargs": policy.init_kwargs,
        "policy": policy.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "global_step": int(global_step),
        "config": asdict(config) if isinstance(config, PPOConfig) else dict(config or {}),
        "torch_rng": torch.get_rng_state(),
        "env": dict(env or {}),
    }
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | os.PathLike, map_location: str = "cpu", *, env: gym.Env | None = None
) -> Checkpoint:
    """Rebuild the policy from a checkpoint, refusing (CheckpointError, one line naming the
    file, the key and what is allowed) anything but what `save_checkpoint` writes.

    A checkpoint may come from a shared folder, so nothing in it is trusted: the file must be
    a regular file of at most MAX_CHECKPOINT_BYTES and a complete zip; torch.load runs with
    weights_only (tensors and plain values: no code); every entry is checked against
    CHECKPOINT_KEYS and every policy_kwargs value against POLICY_KWARGS *before* the policy is
    built (a checkpoint sizes the network: layers=2_000_000 would build for a minute). With
    `env` the sizes must also fit its observation and action spaces. Then the weights must
    have exactly the shapes the policy has, and the optimizer state those of its parameters.
    """
    state = torch_load_checked(path, read_checkpoint(path), map_location)
    current = env_record(env) if env is not None else {}
    _check_state(path, state, current)
    kwargs = state["policy_kwargs"]
    if env is not None:
        need = space_kwargs(env.observation_space)
        for key, value in need.items():
            if kwargs[key] != value:
                raise CheckpointError(
                    f"checkpoint {path}: policy_kwargs.{key}={kwargs[key]!r} does not fit this "
                    f"env, which needs {value} (seed_slots and the blueprint library must match "
                    "those it was trained with)"
                )
    policy = TamiyoPolicy(**kwargs)
    check_tensors(path, "policy", state["policy"], policy.state_dict())
    policy.load_state_dict(state["policy"])
    if state["optimizer"] is not None:
        check_adam_state(path, "optimizer", state["optimizer"], list(policy.parameters()))
    return Checkpoint(
        policy=policy,
        optimizer_state=state["optimizer"],
        global_step=state["global_step"],
        config=state["config"],
        torch_rng=state["torch_rng"],
        env=state.get("env") or {},
    )


# -- what a checkpoint may hold ---------------------------------------------------------------

MAX_CHECKPOINT_BYTES = 256 << 20  # a real one is under 1 MiB; generous, but read in one go
# The pickle of a torch checkpoint only describes the tensors (their bytes are separate zip
# members): 22 KB for a committed one. weights_only's unpickler is pure Python, so a
# 256 MiB pickle of tiny objects would take minutes and GBs; 1 MiB takes well under a second.
MAX_PICKLE_BYTES = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint refused before anything in it is built or run; the message is one line."""


def _show(value) -> str:
    """A short repr for an error message (never the whole of a hostile value)."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {value.dtype}"
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0][:200]


def read_checkpoint(path: str | os.PathLike) -> bytes:
    """The bytes of the checkpoint file at `path`, read once: a regular file (not a directory,
    FIFO or device, which could block or never end) of at most MAX_CHECKPOINT_BYTES."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot open it ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(
                f"checkpoint {path}: not a regular file (a directory, FIFO, device or socket); "
                "a checkpoint is a file"
            )
        if info.st_size > MAX_CHECKPOINT_BYTES:
            raise CheckpointError(
                f"checkpoint {path}: {info.st_size} bytes; at most {MAX_CHECKPOINT_BYTES} allowed"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_CHECKPOINT_BYTES + 1)  # the file may have grown since fstat
    finally:
        os.close(fd)
    if len(raw) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"checkpoint {path}: more than {MAX_CHECKPOINT_BYTES} bytes")
    return raw


def zip_members(path, raw: bytes) -> list[str]:
    """The member names of the zip archive `raw` (both checkpoint kinds are zips), refusing a
    truncated or non-zip file and members that would unpack to more than the file cap."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: not a complete zip archive (truncated, or not a checkpoint): "
            f"{_first_line(exc)}"
        ) from None
    if infos and min(i.header_offset for i in infos) != 0:
        # zipfile accepts bytes before an archive; here they mean a truncated file whose tail
        # is a zip stored inside it (an SB3 archive holds torch zips), or a disguised one
        raise CheckpointError(
            f"checkpoint {path}: not a complete zip archive (truncated, or data before it)"
        )
    if sum(i.file_size for i in infos) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            f"checkpoint {path}: its members unpack to more than {MAX_CHECKPOINT_BYTES} bytes"
        )
    big = [i for i in infos if i.filename.endswith("/data.pkl") and i.file_size > MAX_PICKLE_BYTES]
    if big:
        raise CheckpointError(
            f"checkpoint {path}: {big[0].filename} is {big[0].file_size} bytes; a checkpoint's "
            f"pickle is at most {MAX_PICKLE_BYTES}"
        )
    return [i.filename for i in infos]


SB3_MEMBERS = {"data", "policy.pth"}  # what tells an SB3 archive (checkpoint.zip) apart


def torch_load_checked(path, raw: bytes, map_location="cpu"):
    """torch.load(weights_only=True) of `raw`, a torch.save zip; every failure is one line."""
    names = zip_members(path, raw)
    if set(names) >= SB3_MEMBERS:
        raise CheckpointError(
            f"checkpoint {path} is an SB3 model (checkpoint.zip of agent=sb3_ppo or "
            "maskable_ppo), not a Tamiyo checkpoint (checkpoint.pt): load it with "
            "esper_gym.agents.sb3.load_model (train resume= with that agent)"
        )
    if not any(n.endswith("/data.pkl") for n in names):
        raise CheckpointError(f"checkpoint {path}: a zip, but not one torch.save wrote")
    try:
        return torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt bytes, a refused pickle: never a traceback wall
        raise CheckpointError(
            f"checkpoint {path}: torch.load (weights_only) refused it: {_first_line(exc)}"
        ) from None


# Checks are (predicate, what is allowed) pairs: the second half goes into the refusal.
def int_in(lo: int, hi: int):
    return (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
        f"an int in [{lo}, {hi}]",
    )


def number_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    def ok(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if isinstance(v, float) and not math.isfinite(v):  # (an int of 400 digits is no float)
            return False
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return ok, f"a finite number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def one_of(*allowed):
    return (
        lambda v: any(v is a or (type(v) is type(a) and v == a) for a in allowed),
        f"one of {', '.join(map(repr, allowed))}",
    )


BOOL = (lambda v: isinstance(v, bool), "True or False")

# TamiyoPolicy's arguments. Ranges are generous (every committed checkpoint: hidden 64,
# layers 3, 39/11/2 features, 20 actions per node) and bound the network: at the limits it has
# 46M parameters (185 MB), built in half a second.
POLICY_KWARGS = {
    "node_dim": int_in(1, 1024),
    "global_dim": int_in(1, 1024),
    "edge_dim": int_in(0, 64),
    "per_node_actions": int_in(1, 1024),
    "hidden": int_in(1, 1024),
    "layers": int_in(0, 16),
    "dropout": number_in(0.0, 1.0, hi_open=True),
    "wait_bias": number_in(-50.0, 50.0),
    "gated": BOOL,
}
# The entries of a checkpoint; "env" is absent from those written before env records existed.
CHECKPOINT_KEYS = ("policy_kwargs", "policy", "optimizer", "global_step", "config", "torch_rng")
OPTIONAL_KEYS = ("env",)
MAX_GLOBAL_STEP = 10**12


def check_table(path, where: str, values, table: dict, *, required=True) -> None:
    """Every key of `values` in `table` (and, with `required`, every key of `table` in it),
    each value passing its check."""
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint {path}: {where}={_show(values)}; a dict")
    unknown = [k for k in values if k not in table]
    missing = [k for k in table if k not in values] if required else []
    if unknown or missing:
        raise CheckpointError(
            f"checkpoint {path}: {where} has unknown keys {_show(unknown)}, missing "
            f"{_show(missing)}; allowed: {', '.join(table)}"
        )
    for key, value in values.items():
        ok, allowed = table[key]
        if not ok(value):
            raise CheckpointError(f"checkpoint {path}: {where}.{key}={_show(value)}; {allowed}")


def _check_state(path, state, current: dict) -> None:
    """Everything in a loaded checkpoint except the tensors' shapes (which need the policy)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds {_show(state)}, not a checkpoint dict")
    unknown = [k for k in state if k not in CHECKPOINT_KEYS + OPTIONAL_KEYS]
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if unknown or missing:
        raise CheckpointError(
            f"checkpoint {path}: unknown entries {_show(unknown)}, missing {_show(missing)}; "
            f"a Tamiyo checkpoint holds {', '.join(CHECKPOINT_KEYS + OPTIONAL_KEYS)}"
        )
    check_table(path, "policy_kwargs", state["policy_kwargs"], POLICY_KWARGS)
    step = state["global_step"]
    if not int_in(0, MAX_GLOBAL_STEP)[0](step):
        raise CheckpointError(
            f"checkpoint {path}: global_step={_show(step)}; an int in [0, {MAX_GLOBAL_STEP}]"
        )
    if not isinstance(state["config"], dict) or not _plain(state["config"], [0], 0):
        raise CheckpointError(
            f"checkpoint {path}: config={_show(state['config'])}; a dict of plain values "
            "(None, bool, int, float, str, and lists and dicts of them: at most "
            f"{MAX_PLAIN_ITEMS} in all, {MAX_PLAIN_DEPTH} deep)"
        )
    rng, size = state["torch_rng"], torch.get_rng_state().shape
    if rng is not None and not (
        isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == size
    ):
        raise CheckpointError(
            f"checkpoint {path}: torch_rng={_show(rng)}; None or a uint8 tensor of shape "
            f"{tuple(size)} (torch.get_rng_state())"
        )
    check_env_entry(path, state.get("env", {}), current)


MAX_PLAIN_ITEMS = 10_000
MAX_PLAIN_DEPTH = 4


def _plain(value, count: list[int], depth: int) -> bool:
    """Whether `value` is a plain value (a config): bounded in size and depth, so that a
    pickle of shared references cannot make this walk (or its repr) exponential."""
    count[0] += 1
    if count[0] > MAX_PLAIN_ITEMS or depth > MAX_PLAIN_DEPTH:
        return False
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return len(value) <= 10_000
    if isinstance(value, (list, tuple)):
        return all(_plain(v, count, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, count, depth + 1) for k, v in value.items())
    return False


def check_env_entry(path, env, current: dict | None = None) -> None:
    """A checkpoint's env record: {} or {"task", "blueprints"[, "tasks", "show_context"]}
    whose task is a registered task (or "+"-joined mixture of them, or the task of `current`,
    this run's own record) and whose blueprints are registered blueprints: a name, never an
    import path."""
    from esper_gym.kernels.blueprints import BLUEPRINTS
    from esper_gym.tasks import TASKS

    if not isinstance(env, dict):
        raise CheckpointError(f"checkpoint {path}: env={_show(env)}; a dict (an env record)")
    if not env:
        return
    own = [t for t in str((current or {}).get("task", "")).split("+") if t and t not in TASKS]
    tasks = [*TASKS, *own]  # this run's own task may be a custom one (gym.register)

    def is_mixture(v) -> bool:
        return isinstance(v, str) and len(v) <= 1000 and all(t in tasks for t in v.split("+"))

    def are_blueprints(v) -> bool:
        return isinstance(v, list) and 1 <= len(v) <= 64 and all(b in BLUEPRINTS for b in v)

    table = {
        "task": (is_mixture, f"a registered task or tasks joined by '+': {', '.join(tasks)}"),
        "blueprints": (are_blueprints, f"a list of registered blueprints: {', '.join(BLUEPRINTS)}"),
        "tasks": (
            lambda v: isinstance(v, list) and v == str(env.get("task")).split("+"),
            "the list of the tasks in env.task",
        ),
        "show_context": BOOL,
    }
    check_table(path, "env", env, table, required=False)
    if "task" not in env or "blueprints" not in env:
        raise CheckpointError(f"checkpoint {path}: env={_show(env)}; needs task and blueprints")


def check_tensors(path, where: str, tensors, expected: dict[str, torch.Tensor]) -> None:
    """`tensors` has exactly the names, shapes and dtypes of `expected` (a state dict)."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"checkpoint {path}: {where}={_show(tensors)}; a state dict")
    unknown = [k for k in tensors if k not in expected]
    missing = [k for k in expected if k not in tensors]
    if unknown or missing:
        raise CheckpointError(
            f"checkpoint {path}: {where} has unknown tensors {_show(unknown)}, missing "
            f"{_show(missing)} for the network its kwargs describe"
        )
    for name, want in expected.items():
        got = tensors[name]
        if not (
            isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype
        ):
            raise CheckpointError(
                f"checkpoint {path}: {where}.{name} is {_show(got)}; the network its kwargs "
                f"describe has {_show(want)}"
            )


# torch.optim.Adam's param_group entries (as torch 2.x writes them; older ones write fewer).
# `maximize`, `capturable`, `differentiable` and `fused` change what a step does (ascent,
# CUDA-only code paths): a resumed run takes them as Adam(...) was built, off.
ADAM_GROUP = {
    "lr": number_in(0.0, 1.0),
    "betas": (
        lambda v: (
            isinstance(v, (tuple, list))
            and len(v) == 2
            and all(number_in(0.0, 1.0, hi_open=True)[0](b) for b in v)
        ),
        "two finite numbers in [0, 1)",
    ),
    "eps": number_in(0.0, 1.0, lo_open=True),
    "weight_decay": number_in(0.0, 1.0),
    "amsgrad": BOOL,
    "maximize": one_of(False),
    "foreach": one_of(None, False, True),
    "capturable": one_of(False),
    "differentiable": one_of(False),
    "fused": one_of(None, False),
    "decoupled_weight_decay": BOOL,
    "initial_lr": number_in(0.0, 1.0),  # written when an LR scheduler wrapped the optimizer
    "params": (lambda v: isinstance(v, list), "the list of parameter indices"),
}
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_adam_state(path, where: str, state, params: list[torch.Tensor]) -> None:
    """An Adam `state_dict()` for exactly `params` (one param group): plain settings in range,
    and moments of the parameters' shapes. Adam's own load_state_dict checks only counts."""
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        raise CheckpointError(
            f"checkpoint {path}: {where}={_show(state)}; an Adam state_dict "
            "{'state': ..., 'param_groups': [...]}"
        )
    groups = state["param_groups"]
    if not isinstance(groups, list) or len(groups) != 1:
        raise CheckpointError(
            f"checkpoint {path}: {where}.param_groups={_show(groups)}; a list of one group"
        )
    check_table(path, f"{where}.param_groups[0]", groups[0], ADAM_GROUP, required=False)
    if groups[0].get("params") != list(range(len(params))):
        raise CheckpointError(
            f"checkpoint {path}: {where}.param_groups[0].params="
            f"{_show(groups[0].get('params'))}; [0, ..., {len(params) - 1}], one per parameter"
        )
    moments = state["state"]
    if not isinstance(moments, dict):
        raise CheckpointError(f"checkpoint {path}: {where}.state={_show(moments)}; a dict")
    for index, entry in moments.items():
        at = f"{where}.state[{_show(index)}]"
        if not (isinstance(index, int) and 0 <= index < len(params)) or not isinstance(entry, dict):
            raise CheckpointError(
                f"checkpoint {path}: {at}={_show(entry)}; a parameter index in "
                f"[0, {len(params) - 1}] with a dict of {', '.join(ADAM_STATE)}"
            )
        for key, value in entry.items():
            if key not in ADAM_STATE:
                raise CheckpointError(
                    f"checkpoint {path}: {at} has {key!r}; allowed: {', '.join(ADAM_STATE)}"
                )
            if key == "step":  # a float tensor of one value (a number in older torch)
                step = (
                    value.item()
                    if isinstance(value, torch.Tensor) and value.numel() == 1
                    else value
                )
                if not number_in(0, 1e15)[0](step):
                    raise CheckpointError(
                        f"checkpoint {path}: {at}.step={_show(value)}; a count in [0, 1e15]"
                    )
            elif not (
                isinstance(value, torch.Tensor)
                and value.shape == params[index].shape
                and value.dtype == params[index].dtype
            ):
                raise CheckpointError(
                    f"checkpoint {path}: {at}.{key} is {_show(value)}; its parameter is "
                    f"{_show(params[index])}"
                )


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------


@dataclass
class GuardConfig:
    """Failure modes PPO slides into without an error, checked after every update.

    Each guard watches one logged metric; when its condition holds for `patience` consecutive
    updates the run stops with `TrainingCollapse`, whose message names the metric, its recent
    values, the threshold's config key and what to try (a checkpoint is written first, when
    the run has a checkpoint path). A threshold of None turns that guard off, `enabled=False`
    all of them. A NaN metric (e.g. no episode state where growth was valid) counts as healthy.

    - WAIT collapse: `diagnostics/wait_share` (WAIT among the rollout's actions taken while a
      GERMINATE was valid) above `wait_share_max`: the policy has learned that doing nothing
      is safe and stopped trying growth.
    - entropy collapse: `diagnostics/entropy` (mean entropy of the acting policy over the
      rollout, nats) below `entropy_min`: it no longer explores, whatever it settled on.
    - a critic that predicts nothing: `losses/explained_variance` at or below
      `explained_variance_min`: advantages are then noise and the policy gradient with them.
    """

    enabled: bool = True
    patience: int = 5  # consecutive updates
    wait_share_max: float | None = 0.95
    entropy_min: float | None = 0.05
    explained_variance_min: float | None = 0.0


class TrainingCollapse(RuntimeError):
    """A guard of `GuardConfig` fired: the run stopped rather than train a degenerate policy."""


# (name, metric, config field, fires when, what to try)
GUARDS = (
    (
        "WAIT collapse",
        "diagnostics/wait_share",
        "wait_share_max",
        lambda value, threshold: value > threshold,
        "the policy waits although growth is valid; raise ent_coef, lower wait_bias, or check "
        "that growth can pay under the reward weights",
    ),
    (
        "entropy collapse",
        "diagnostics/entropy",
        "entropy_min",
        lambda value, threshold: value < threshold,
        "the policy stopped exploring; raise ent_coef or set ent_floor, or lower lr",
    ),
    (
        "critic failure",
        "losses/explained_variance",
        "explained_variance_min",
        lambda value, threshold: value <= threshold,
        "the value function explains none of the returns; check norm_returns, lower gamma or "
        "lr, raise vf_coef",
    ),
)


def check_guards(
    metrics: dict, guards: GuardConfig, history: dict[str, list[float]], global_step: int
) -> None:
    """Append this update's guarded metrics to `history` (metric -> values of the current run of
    bad updates, emptied by a healthy one) and raise `TrainingCollapse` when a guard's run
    reaches `guards.patience`."""
    if not guards.enabled:
        return
    for name, metric, key, bad, advice in GUARDS:
        threshold = getattr(guards, key)
        value = metrics.get(metric, math.nan)
        if threshold is None or not math.isfinite(value) or not bad(value, threshold):
            history[metric] = []
            continue
        history.setdefault(metric, []).append(float(value))
        if len(history[metric]) >= guards.patience:
            recent = ", ".join(f"{v:.3g}" for v in history[metric])
            raise TrainingCollapse(
                f"{name} at global step {global_step}: {metric} was [{recent}] for "
                f"{len(history[metric])} consecutive updates (threshold guards.{key}="
                f"{threshold}). {advice[0].upper()}{advice[1:]}. To train on regardless: "
                f"guards.{key}=null (agent.ppo.guards.{key}=null on the esper_gym.train command "
                "line), or guards.enabled=false for every guard."
            )


def _guards(value) -> GuardConfig:
    if isinstance(value, GuardConfig):
        return value
    return GuardConfig(**dict(value or {}))


@dataclass
class PPOConfig:
    total_steps: int = 20_000  # env steps over all envs
    num_envs: int = 4
    rollout_steps: int = 64  # per env per update
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    # Entropy floor (nats): below it a hinge term `ent_floor_coef * (floor - entropy)` pushes
    # the policy back towards exploring. 0 turns it off; entropy is logged either way.
    ent_floor: float = 0.0
    ent_floor_coef: float = 0.1
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    lr: float = 3e-4
    update_epochs: int = 4
    minibatches: int = 4
    target_kl: float | None = None
    anneal_lr: bool = True  # linearly from lr (first update) to lr_final (after the last)
    lr_final: float = 0.0
    norm_adv: bool = True
    # Value targets normalised by running return statistics: rewards of any scale then give a
    # value loss of order 1, which keeps explained variance from sitting at or below 0.
    norm_returns: bool = True
    seed: int = 0
    hidden: int = 64
    layers: int = 3
    dropout: float = 0.1
    async_envs: bool = False  # AsyncVectorEnv (spawn) instead of SyncVectorEnv
    checkpoint_every: int = 10  # updates; only when a checkpoint_path is given
    uncertainty_samples: int = 8  # MC-dropout passes on the last observations (0: skip)
    # Initial bias of the WAIT logit (0: WAIT is as likely as any one valid action). A prior
    # towards WAIT makes the untrained policy germinate and cull less often (churn).
    wait_bias: float = 0.0
    # The "WAIT or act" switch head (TamiyoPolicy, gated=True); wait_bias is then the switch's
    # initial logit: WAIT starts with probability sigmoid(wait_bias).
    gated: bool = False
    # Imitation warm start: before PPO, `imitation_episodes` episodes of the baseline `teacher`
    # (a name of esper_gym.agents.baselines.AGENTS, never a privileged one) are played on the
    # training envs and the policy is fitted to its actions (cross-entropy) and the critic to
    # its discounted returns for `imitation_epochs` epochs; PPO then starts from that policy.
    # None: no warm start (PPO from a random policy).
    teacher: str | None = None
    imitation_episodes: int = 64
    imitation_epochs: int = 10
    guards: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        self.guards = _guards(self.guards)  # a mapping from a config file or a checkpoint
        if self.imitation_episodes < 1 or self.imitation_epochs < 1:
            raise ValueError(
                f"imitation_episodes={self.imitation_episodes} and imitation_epochs="
                f"{self.imitation_epochs}: both must be >= 1 (teacher=null turns imitation off)"
            )


def make_vector_env(make_env: Callable[[], gym.Env], num_envs: int, use_async: bool = False):
    """num_envs copies, autoreset in the same step (the final obs comes back in info). A
    make_env with a `vector(num_envs)` method builds its own: env.vectorization=batched gives
    the batched simulator (esper_gym.vector), whose autoreset is the same."""
    mode = gym.vector.AutoresetMode.SAME_STEP
    if callable(getattr(make_env, "vector", None)) and not use_async:
        envs = make_env.vector(num_envs)
        if envs.metadata.get("autoreset_mode") != mode:
            raise ValueError(f"{make_env!r}.vector() must autoreset in the same step ({mode})")
        return envs
    if use_async:
        # Spawn, not fork: torch and fork do not mix. Graph obs are small; no shared memory.
        # make_env must be picklable (a module-level function or functools.partial).
        return gym.vector.AsyncVectorEnv(
            [make_env] * num_envs, context="spawn", shared_memory=False, autoreset_mode=mode
        )
    return gym.vector.SyncVectorEnv([make_env] * num_envs, autoreset_mode=mode)


def _index(obs: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in obs.items()}


def _final_obs(info: dict, i: int) -> dict[str, np.ndarray]:
    """Env i's last observation before a same-step autoreset. Gymnasium's vector envs give
    `final_obs` as a per-env object array of dicts for Dict spaces (a dict of arrays is
    accepted too)."""
    final = info["final_obs"]
    obs = final[i] if not isinstance(final, dict) else {k: v[i] for k, v in final.items()}
    return {k: np.asarray(v) for k, v in obs.items()}


def explained_variance(pred: np.ndarray, target: np.ndarray) -> float:
    var = np.var(target)
    return float("nan") if var == 0 else float(1 - np.var(target - pred) / var)


def train(
    config: PPOConfig,
    make_env: Callable[[], gym.Env] | Sequence[Callable[[], gym.Env]],
    log: Callable[[dict, int], None] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
) -> TamiyoPolicy:
    """PPO (CleanRL's ppo.py, with action masks and graph observations) -> trained policy.

    Every update calls `log(metrics, global_step)` with: losses/{policy,value,entropy,
    approx_kl,clip_frac,ratio_start,explained_variance}, actions/{wait,germinate,advance,cull}
    (counts in the rollout), charts/{steps_per_s,lr,episodes,episodic_return,episodic_length}
    (the two last only when an episode ended in the rollout; with several tasks also
    charts/episodic_return/<task> for each), uncertainty/{value_std,entropy},
    diagnostics/wait_share (WAIT among the actions taken while some GERMINATE was valid; NaN if
    none was), diagnostics/entropy (mean entropy of the acting policy over the rollout) and
    diagnostics/churn (CULL actions per episode ended in the rollout: a seed is only culled after
    it was germinated, so each is a germinate -> cull cycle; only when an episode ended). Then
    `config.guards` checks them (`check_guards`): a collapse stops the run with TrainingCollapse.

    With `checkpoint_path` the run is saved every `config.checkpoint_every` updates and at the
    end. `resume_from` continues that run: weights, optimizer, global_step, return statistics
    and torch RNG come back; episodes in flight at the save are lost (envs are reset, with
    seeds offset by global_step so that they are new episodes). Dropout is off both while
    acting and during updates (the policy updated is the one that acted: the first ratio of
    each update is exactly 1, logged as losses/ratio_start); MC dropout is a separate pass.

    Several tasks at once: `make_env` a sequence of env constructors (one per task, with the
    same observation and action spaces and blueprint library) trains one policy on
    `config.num_envs` copies of each (esper_gym.multitask.ConcatVectorEnv); each copy's teacher
    is the teacher of its own task (its tuned schedule).
    """
    # One env per task in this process describes them (an Esper env loads no data until reset),
    # and a checkpoint of another task or blueprint library is refused before any worker starts.
    makers = list(make_env) if isinstance(make_env, Sequence) else [make_env]
    records, teachers, probes = [], [], []
    for make in makers:
        probe = make()
        probes.append(probe)  # closed below; its spaces and task still describe the run
        records.append(env_record(probe))
        if config.teacher is not None and resume_from is None:
            teachers += [make_teacher(config.teacher, probe) for _ in range(config.num_envs)]
        probe.close()
    record = mixture_record(records)
    ckpt = None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, env=probes[0])  # sizes checked before building
        check_env_record(ckpt.env, record, resume_from, same_task=True)
    torch.manual_seed(config.seed)
    if len(makers) == 1:
        envs = make_vector_env(makers[0], config.num_envs, config.async_envs)
    else:
        from esper_gym.multitask import ConcatVectorEnv

        envs = ConcatVectorEnv(
            [make_vector_env(m, config.num_envs, config.async_envs) for m in makers]
        )
    space = envs.single_observation_space
    layout = layout_from_spaces(space, envs.single_action_space)  # for the action histogram
    kind_of = np.array([layout.decode(a).kind for a in range(layout.size)])
    is_germinate = kind_of == GERMINATE
    n_envs, n_steps = envs.num_envs, config.rollout_steps
    env_task = [str(rec.get("task")) for rec in records for _ in range(config.num_envs)]
    batch_size = n_envs * n_steps
    minibatch_size = max(batch_size // config.minibatches, 1)
    num_updates = math.ceil(config.total_steps / batch_size)

    policy = TamiyoPolicy.for_space(
        space,
        hidden=config.hidden,
        layers=config.layers,
        dropout=config.dropout,
        wait_bias=config.wait_bias,
        gated=config.gated,
    )
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr, eps=1e-5)
    global_step = 0
    if ckpt is not None:
        policy = ckpt.policy
        optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr, eps=1e-5)
        if ckpt.optimizer_state is not None:
            optimizer.load_state_dict(ckpt.optimizer_state)
        global_step = ckpt.global_step
        if ckpt.torch_rng is not None:
            torch.set_rng_state(ckpt.torch_rng)

    # Rollout storage: observations stay numpy (obs_to_batch batches them per minibatch).
    obs_buf = {k: np.zeros((n_steps, n_envs, *s.shape), s.dtype) for k, s in space.items()}
    actions = torch.zeros(n_steps, n_envs, dtype=torch.long)
    logprobs = torch.zeros(n_steps, n_envs)
    rewards = torch.zeros(n_steps, n_envs)
    dones = torch.zeros(n_steps, n_envs)
    values = torch.zeros(n_steps, n_envs)

    next_obs, _ = envs.reset(seed=config.seed + global_step)
    next_done = torch.zeros(n_envs)
    ep_return, ep_length = np.zeros(n_envs), np.zeros(n_envs, dtype=int)
    ep_culls = np.zeros(n_envs, dtype=int)
    guard_history: dict[str, list[float]] = {}

    if teachers:
        # The teacher's env steps count in the budget: PPO starts at the update they reach.
        _, global_step, metrics = imitate(policy, optimizer, envs, teachers, next_obs, config)
        if log is not None:
            log(metrics, global_step)
        if checkpoint_path is not None:  # the warm start alone is a policy to evaluate
            save_checkpoint(checkpoint_path, policy, optimizer, global_step, config, record)
        next_obs, _ = envs.reset(seed=config.seed + global_step)  # whole episodes for PPO

    first_update = -(-global_step // batch_size) + 1  # ceil: an update starts after the teacher
    for update in range(first_update, num_updates + 1):
        if config.anneal_lr:
            frac = (update - 1) / num_updates
            optimizer.param_groups[0]["lr"] = config.lr + frac * (config.lr_final - config.lr)
        start = time.perf_counter()
        finished_returns, finished_lengths, finished_culls = [], [], []
        finished_tasks = []
        entropies = torch.zeros(n_steps, n_envs)

        # --- rollout: act with dropout off --------------------------------------------------
        policy.eval()
        for step in range(n_steps):
            global_step += n_envs
            for k in obs_buf:
                obs_buf[k][step] = next_obs[k]
            dones[step] = next_done
            with torch.no_grad():
                logits, value = policy(obs_to_batch(next_obs))
                dist = Categorical(logits=logits)
                action = dist.sample()
                entropies[step] = dist.entropy()
            actions[step], logprobs[step], values[step] = action, dist.log_prob(action), value

            next_obs, reward, terminated, truncated, info = envs.step(action.numpy())
            done = np.logical_or(terminated, truncated)
            ep_return += reward
            ep_length += 1
            ep_culls += kind_of[action.numpy()] == CULL
            reward = torch.as_tensor(reward, dtype=torch.float32)
            for i in np.flatnonzero(done):
                finished_returns.append(ep_return[i])
                finished_tasks.append(env_task[i])
                finished_lengths.append(ep_length[i])
                finished_culls.append(ep_culls[i])
                ep_return[i], ep_length[i], ep_culls[i] = 0.0, 0, 0
                if truncated[i] and not terminated[i]:
                    # Cut by a time limit, not ended: bootstrap from the real final state.
                    with torch.no_grad():
                        reward[i] += config.gamma * policy(obs_to_batch(_final_obs(info, i)))[1][0]
            rewards[step] = reward
            next_done = torch.as_tensor(done, dtype=torch.float32)

        # --- GAE ----------------------------------------------------------------------------
        with torch.no_grad():
            next_value = policy(obs_to_batch(next_obs))[1]
        advantages = torch.zeros_like(rewards)
        last_gae = torch.zeros(n_envs)
        for t in reversed(range(n_steps)):
            if t == n_steps - 1:
                next_nonterminal, next_values = 1.0 - next_done, next_value
            else:
                next_nonterminal, next_values = 1.0 - dones[t + 1], values[t + 1]
            delta = rewards[t] + config.gamma * next_values * next_nonterminal - values[t]
            last_gae = delta + config.gamma * config.gae_lambda * next_nonterminal * last_gae
            advantages[t] = last_gae
        returns = advantages + values

        if config.norm_returns:
            _update_return_stats(policy, returns.flatten())
        value_scale = (policy.ret_var + 1e-8).sqrt() if config.norm_returns else torch.ones(())

        # --- update: the policy that acted (dropout off), so the first ratio is exactly 1 ----
        b_obs = {k: v.reshape(batch_size, *v.shape[2:]) for k, v in obs_buf.items()}
        b_actions, b_logprobs = actions.flatten(), logprobs.flatten()
        b_adv, b_returns, b_values = advantages.flatten(), returns.flatten(), values.flatten()
        policy.eval()  # MC-dropout uncertainty is a separate pass (policy.uncertainty)
        clip_fracs, approx_kl = [], torch.zeros(())
        ratio_start = None
        for _epoch in range(config.update_epochs):
            perm = torch.randperm(batch_size)
            for lo in range(0, batch_size, minibatch_size):
                mb = perm[lo : lo + minibatch_size]
                logits, new_value = policy(obs_to_batch(_index(b_obs, mb.numpy())))
                dist = Categorical(logits=logits)
                new_logprob = dist.log_prob(b_actions[mb])
                entropy = dist.entropy().mean()
                log_ratio = new_logprob - b_logprobs[mb]
                ratio = log_ratio.exp()
                if ratio_start is None:  # before any step: must be 1 (acting == updating)
                    ratio_start = (ratio.detach() - 1).abs().max().item()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()
                    clip_fracs.append(((ratio - 1.0).abs() > config.clip_coef).float().mean())

                adv = b_adv[mb]
                if config.norm_adv and len(mb) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(
                    -adv * ratio, -adv * ratio.clamp(1 - config.clip_coef, 1 + config.clip_coef)
                ).mean()

                # Value loss in normalised units (value_scale is 1 without norm_returns).
                v_new = new_value / value_scale
                v_target = b_returns[mb] / value_scale
                if config.clip_vloss:
                    v_old = b_values[mb] / value_scale
                    v_clipped = v_old + (v_new - v_old).clamp(-config.clip_coef, config.clip_coef)
                    v_loss = 0.5 * torch.max((v_new - v_target) ** 2, (v_clipped - v_target) ** 2)
                    v_loss = v_loss.mean()
                else:
                    v_loss = 0.5 * ((v_new - v_target) ** 2).mean()

                loss = pg_loss - config.ent_coef * entropy + config.vf_coef * v_loss
                if config.ent_floor > 0:
                    loss = loss + config.ent_floor_coef * F.relu(config.ent_floor - entropy)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
                optimizer.step()
            if config.target_kl is not None and approx_kl > config.target_kl:
                break

        # --- log ----------------------------------------------------------------------------
        kinds = kind_of[b_actions.numpy()].tolist()
        growth_valid = b_obs["action_mask"][:, is_germinate].any(1)
        waited = kind_of[b_actions.numpy()] == WAIT
        metrics = {
            "losses/policy": pg_loss.item(),
            "losses/value": v_loss.item(),
            "losses/entropy": entropy.item(),
            "losses/approx_kl": approx_kl.item(),
            "losses/clip_frac": torch.stack(clip_fracs).mean().item(),
            "losses/ratio_start": ratio_start,
            "losses/explained_variance": explained_variance(b_values.numpy(), b_returns.numpy()),
            **{f"actions/{k}": kinds.count(k) for k in (WAIT, GERMINATE, ADVANCE, CULL)},
            "charts/steps_per_s": batch_size / (time.perf_counter() - start),
            "charts/lr": optimizer.param_groups[0]["lr"],
            "charts/episodes": len(finished_returns),
            "diagnostics/wait_share": (
                float(waited[growth_valid].mean()) if growth_valid.any() else math.nan
            ),
            "diagnostics/entropy": entropies.mean().item(),
        }
        if finished_returns:
            metrics["charts/episodic_return"] = float(np.mean(finished_returns))
            if len(records) > 1:  # several tasks: their returns are on different scales
                for task in dict.fromkeys(finished_tasks):
                    mine = [r for r, t in zip(finished_returns, finished_tasks) if t == task]
                    metrics[f"charts/episodic_return/{task}"] = float(np.mean(mine))
            metrics["charts/episodic_length"] = float(np.mean(finished_lengths))
            metrics["diagnostics/churn"] = float(np.mean(finished_culls))
        if config.uncertainty_samples > 0:
            unc = policy.uncertainty(obs_to_batch(next_obs), config.uncertainty_samples)
            metrics["uncertainty/value_std"] = unc["value_std"].mean().item()
            metrics["uncertainty/entropy"] = unc["entropy"].mean().item()
        if log is not None:
            log(metrics, global_step)
        if checkpoint_path is not None and (
            update % config.checkpoint_every == 0 or update == num_updates
        ):
            save_checkpoint(checkpoint_path, policy, optimizer, global_step, config, record)
        try:
            check_guards(metrics, config.guards, guard_history, global_step)
        except TrainingCollapse:
            envs.close()
            if checkpoint_path is not None:  # the collapsed policy, for a post-mortem
                save_checkpoint(checkpoint_path, policy, optimizer, global_step, config, record)
            raise

    envs.close()
    policy.eval()
    return policy


def make_teacher(name: str, env: gym.Env):
    """A baseline to imitate (esper_gym.agents.baselines.make_agent with its tuned settings).
    Privileged agents are refused: a controller trained to copy one would use, through its
    teacher, access that no deployed controller has."""
    from esper_gym.agents.baselines import AGENTS, PRIVILEGED, make_agent

    allowed = sorted(set(AGENTS) - PRIVILEGED)
    if name not in allowed:
        raise ValueError(f"teacher={name!r} cannot be imitated; allowed: {', '.join(allowed)}")
    try:
        return make_agent(name, env)
    except ValueError as err:  # e.g. no tuned schedule for this task
        raise ValueError(f"{err}. Or train without a warm start: agent.ppo.teacher=null") from err


def imitate(policy, optimizer, envs, teachers, obs, config: PPOConfig):
    """Warm start: play `teachers` (one per env of `envs`, starting from observations `obs`)
    until `config.imitation_episodes` episodes have ended and every copy has ended at least one
    (with several tasks, a task of long episodes is not left out), then fit `policy` for
    `config.imitation_epochs` epochs: cross-entropy to the teacher's action plus `vf_coef` times
    the value loss to its discounted return (in the return statistics' units, which these
    returns set). Dropout is off, as in PPO. Steps of episodes still in flight when the last one
    ends train nothing (their returns are unknown) but are counted.

    Returns (the envs' observations after the last step, env steps played, metrics): imitation/{steps,
    episodes, teacher_return (mean undiscounted), loss, agreement (share of the teacher's actions
    that are the policy's most likely action after the fit)}."""
    n_envs = len(teachers)
    for teacher in teachers:
        if hasattr(teacher, "reset"):
            teacher.reset()
    paths = [{"obs": [], "actions": [], "rewards": []} for _ in range(n_envs)]
    data = {"obs": [], "actions": [], "returns": []}
    ended: list[float] = []
    copy_ended = np.zeros(n_envs, bool)
    steps = 0
    while len(ended) < config.imitation_episodes or not copy_ended.all():
        acts = np.array([t.act(_index(obs, i)) for i, t in enumerate(teachers)])
        for i, path in enumerate(paths):
            path["obs"].append(_index(obs, i))
            path["actions"].append(int(acts[i]))
        obs, reward, terminated, truncated, _ = envs.step(acts)
        steps += n_envs
        for i, path in enumerate(paths):
            path["rewards"].append(float(reward[i]))
            if not (terminated[i] or truncated[i]):
                continue
            # A time-limit cut has no critic to bootstrap from yet: its return is the rewards'.
            ret, returns = 0.0, []
            for r in reversed(path["rewards"]):
                ret = r + config.gamma * ret
                returns.append(ret)
            data["obs"] += path["obs"]
            data["actions"] += path["actions"]
            data["returns"] += returns[::-1]
            ended.append(float(sum(path["rewards"])))
            copy_ended[i] = True
            paths[i] = {"obs": [], "actions": [], "rewards": []}
            if hasattr(teachers[i], "reset"):
                teachers[i].reset()

    b_obs = {k: np.stack([o[k] for o in data["obs"]]) for k in data["obs"][0]}
    b_actions = torch.as_tensor(data["actions"])
    b_returns = torch.as_tensor(data["returns"], dtype=torch.float32)
    if config.norm_returns:
        _update_return_stats(policy, b_returns)
    scale = (policy.ret_var + 1e-8).sqrt() if config.norm_returns else torch.ones(())
    size = len(b_actions)
    minibatch = max(n_envs * config.rollout_steps // config.minibatches, 1)  # PPO's
    policy.eval()
    for _epoch in range(config.imitation_epochs):
        perm = torch.randperm(size)
        for lo in range(0, size, minibatch):
            mb = perm[lo : lo + minibatch]
            logits, value = policy(obs_to_batch(_index(b_obs, mb.numpy())))
            ce = F.cross_entropy(logits, b_actions[mb])
            v_loss = 0.5 * (((value - b_returns[mb]) / scale) ** 2).mean()
            loss = ce + config.vf_coef * v_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
    with torch.no_grad():
        agree, total_loss = 0, 0.0
        for lo in range(0, size, 1024):
            idx = np.arange(lo, min(lo + 1024, size))
            logits, value = policy(obs_to_batch(_index(b_obs, idx)))
            agree += int((logits.argmax(1) == b_actions[idx]).sum())
            total_loss += float(F.cross_entropy(logits, b_actions[idx], reduction="sum"))
    metrics = {
        "imitation/steps": steps,
        "imitation/episodes": len(ended),
        "imitation/teacher_return": float(np.mean(ended)),
        "imitation/loss": total_loss / size,
        "imitation/agreement": agree / size,
    }
    return obs, steps, metrics


@torch.no_grad()
def _update_return_stats(policy: TamiyoPolicy, x: torch.Tensor) -> None:
    """Running mean/var of returns (parallel Welford), kept as buffers so they checkpoint.

    The value head's last layer is rescaled with them (PopArt's "preserving outputs"): the
    value in return units, `head * std + mean`, is the same before and after, so the values
    stored during the rollout stay comparable to the new predictions (else the first update's
    clipped value loss sees every sample shifted and has no gradient)."""
    old_mean, old_std = policy.ret_mean.clone(), (policy.ret_var + 1e-8).sqrt()
    _welford(policy, x)
    new_std = (policy.ret_var + 1e-8).sqrt()
    last = policy.value_head[-1]
    last.weight.mul_(old_std / new_std)
    last.bias.mul_(old_std).add_(old_mean - policy.ret_mean).div_(new_std)


@torch.no_grad()
def _welford(policy: TamiyoPolicy, x: torch.Tensor) -> None:
    count, mean, var = policy.ret_count, policy.ret_mean, policy.ret_var
    b_count, b_mean, b_var = x.numel(), x.mean(), x.var(unbiased=False)
    if count == 0:
        policy.ret_mean.copy_(b_mean)
        policy.ret_var.copy_(b_var.clamp_min(1e-4))
        policy.ret_count.fill_(b_count)
        return
    total = count + b_count
    delta = b_mean - mean
    policy.ret_mean.copy_(mean + delta * b_count / total)
    m2 = var * count + b_var * b_count + delta**2 * count * b_count / total
    policy.ret_var.copy_((m2 / total).clamp_min(1e-4))
    policy.ret_count.copy_(total)
