"""Tamiyo's policy: an actor-critic over the model graph (PyG), sized by the observation space.

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
the slots and blueprints per node (`per_node`) match. The trunk (`GraphEncoder`) and the
observation -> graph conversion (`obs_to_batch`) are esper_gym/agents/graph.py, shared with SB3.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical

from esper_gym.agents.graph import GraphEncoder, obs_to_batch

# Logit given to masked and padded actions. exp(-1e9 - logsumexp) is exactly 0.0 in float32,
# so masked actions have probability 0, and unlike -inf it keeps entropy and log-probs finite.
MASKED = -1e9


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

    def actor(self, *, greedy: bool = False, seed: int | None = None) -> Callable[..., int]:
        """`act(obs, info=None) -> action` for one episode. Sampling (the default: that is the
        policy PPO trained) draws from a generator seeded with `seed`, so the same episode seed
        gives the same actions in every run and every agent comparison stays paired; `seed=None`
        draws from torch's global RNG. (The MC-dropout uncertainty gate that was here is gone:
        docs/agents.md.)"""
        generator = None
        if not greedy and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        return lambda obs, info=None: self.act(obs, greedy=greedy, generator=generator)

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
