"""BatchedMorphogeneticEnv: N episodes of a task in one process, trained as stacked tensors.

    envs = gym.make_vec("Esper/Spirals-v0", num_envs=32, vectorization_mode="vector_entry_point")

Each copy is a whole `MorphogeneticEnv`: its own host, data order, `np_random`, KasminaLayers
(lifecycle, alpha, circuit breakers, faults), reward and observation, so that copy i behaves as
`gym.make(id).reset(seed=seed + i)` would. What is batched is the hot path of a step, the
decision interval: the host forward/backward of every copy in one pass (`torch.baddbmm` over
stacked weights), seed kernels grouped and run stacked, one fused Adam step for all copies' host
weights (and one for their seeds), and the evaluation. Everything else (actions, masks,
observation, reward, outcomes) is the copy's own code, so a feature added to the single env
flows through unchanged.

## What runs together
Copies whose hosts have the same architecture, task hyper-parameters and dataset form a batch
(all of them, without contexts). A batch's host must be an `nn.Sequential` of `nn.Flatten`,
parameter-free elementwise activations and KasminaLayers wrapping `nn.Linear` (the MLP hosts:
spirals, fashion_mnist), trained with Adam; any other copy (a CNN host, an SGD task) trains
on its own trainer in the same step: correct, not faster. A batch holds each host layer's
weights for all copies as one stacked leaf tensor per parameter (copies, out, in), which the
forward reads and the backward fills with one gradient; each copy's own parameters are views of
their rows (`param.data`), so that anything that looks at one copy (telemetry, the culprit
search after a poisoned host gradient, contributions, `env.envs[i]`, a fork) sees its real,
current module. The host Adam state is stacked alike, with a step count per copy, and steps in
one `torch._fused_adam_` over the copies' rows: what each copy's own fused Adam computes on its
own tensors; a copy whose step is skipped (non-finite gradients) is left out of that call.
Membership changes (a reset gives a copy a new host) restack, carrying the others' state.
(Pickling one copy by itself writes the whole stacked storage its parameters and its stacked
seeds' tensors view; a fork's deep copy clones only its rows of parameters, and copies a stacked
kernel buffer with its whole stack (no shipped blueprint has one). Host and seed Adam state stay
with the batch, as before: a fork of a copy starts its own Adam moments afresh.)

Seed kernels: the running seeds of one layer that share a kernel graph (one blueprint and
size: the copies load it through one shared cache), in any slot and mode (TRAINING, fitted to
the pseudo-residual; or blended at the copy's alpha), form a group: with at least `VMAP_MIN`
members the exported graph runs once under `torch.func.vmap`. A group that trains together
keeps its tensors stacked (`_SeedStack`, rebuilt when the set of running seeds or their modes
change): one leaf per kernel parameter, which vmap reads as it is and the backward fills with
one gradient, each kernel's own tensors being views of their rows (as the host's), with the
seeds' Adam state stacked alike and carried over a rebuild (each seed its own step count; a
seed that did not run, faulted, or was culled in the step is not stepped). Smaller groups, the
raising fault kernel and a group output of the wrong shape, dtype or device run one guarded
call per copy, exactly as the single env makes it. vmap runs a copy of a graph in which the ops
it has no batching rule for are rewritten (`_batchable`: attention's `sym_size.int` and its CPU
flash attention, which would run one copy at a time, become `Tensor.size` and the math form of
scaled dot-product attention: equal up to rounding); the per-copy path runs the validated graph
itself. A graph of linear layers and elementwise ops only (residual_mlp, low_rank,
squeeze_excite) does not go through vmap at all: `_stacked_program` runs it on the stacked
tensors, one `baddbmm` per linear, bit for bit each kernel's own call (vmap's batched linear is
a matmul plus a bias add, ~1.5x slower with its backward). Deltas are added per slot index in
slot order (one `index_add` each). Faults stay per copy: a non-finite output is found per copy
(one sync per group) and recorded for that copy alone, whose delta is dropped (the rest of its
group runs again without it, so that its kernel gets no backward); a group's wall time is shared
out among its copies for the latency budget. Non-finite gradients are checked with one fused
check over all copies (the kernel HostTrainer uses); when it fires, each copy runs the single
env's own check
(`HostTrainer.check_grads`) on its rows of the stacked gradients, so a copy's skipped step,
quarantined seed or faulted seed gradient is that copy's alone.

## Equivalence with single envs
Same seeds and actions give copy i the trajectory of `gym.make(id, **kwargs)` reset with
`seed + i`, and seeded batched runs are bit-identical to each other (tests/test_vector.py).
Masks, events, seed states and fault records are exactly those of the single env. Host
weights, accuracies and rewards are bit-identical as long as the kernels batch exactly
(residual_mlp and low_rank, as stacked programs, do)
(`baddbmm` computes each copy's product as `F.linear` does, forward and backward, and fused
Adam updates each tensor alone); what may differ in the last bits: reported losses (a batched
mean or sum reduces in another order than `cross_entropy`'s own), activation statistics, a
blended delta `h + alpha * k(h)` (multiplied, then added), graphs that vmap with another
reduction order (`norm`: ~1e-7) and attention's math form (vs CPU flash attention: ~1e-7
relative). Those differences can grow through training; the tests bound
them over whole short episodes.

## Autoreset and infos
`metadata["autoreset_mode"]` is `AutoresetMode.SAME_STEP` (what Tamiyo's PPO expects): a
copy that terminates or is truncated (`max_episode_steps`, the registration's TimeLimit) is
reset within the same `step`; its last observation and info are in `info["final_obs"]` and
`info["final_info"]`, with the same layout as `gymnasium.vector.SyncVectorEnv`'s.

## Shared between copies
Datasets, traced data-flow edges, the kernel store and the kernel cache (with
`telemetry="measured"`, cache counters are those of the shared cache). Seed outcomes are
written to the store in one transaction once `FLUSH_OUTCOMES` are pending, and at `reset`
and `close`, rather than one commit each: a generator that reads the store's history (Karn)
sees them that much later (a copy's own `generator.observe` is called at once, as before).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import nn
from torch.nn import functional as F

from esper_gym.env import MorphogeneticEnv
from esper_gym.kasmina import KasminaLayer, SeedState
from esper_gym.kasmina.recovery import check_output, form_fault, guarded_call
from esper_gym.kasmina.seed import seed_delta, seed_mode
from esper_gym.kasmina.telemetry import out_grad_norm, recorded_stats
from esper_gym.trainer import (
    EVAL_CHUNK,
    FiniteCheck,
    IntervalStats,
    adam_step,
    set_contribution,
)

# Parameter-free elementwise modules: applied to [N, B, ...] they compute what each copy would.
_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity)
# Seed outcomes are written to the store once this many are pending (and at reset and close):
# a SQLite commit here costs ~10 ms, a whole step of 32 copies ~50 ms.
FLUSH_OUTCOMES = 64


class BatchedMorphogeneticEnv(VectorEnv):
    """`num_envs` copies of `MorphogeneticEnv(**env_kwargs)`, stepped together.

    Args:
        num_envs: copies.
        max_episode_steps: truncation after this many steps of an episode (the TimeLimit of
            the registration; `gym.make_vec` passes it), None for none.
        batched: False trains every copy on its own trainer (the reference the batched path
            is tested against; no speed-up); so does a single copy.
        **env_kwargs: what `gym.make(id, ...)` takes (task, Task fields, reward_weights,
            kernel_dir, contexts, ...), given to every copy.

    Spaces are `batch_space` of the single env's. `reset(seed=s)` seeds copy i with s + i
    (a list gives one seed per copy), as `SyncVectorEnv` does; `options` go to every copy
    (`reset_mask` resets only some).
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 1,
        max_episode_steps: int | None = None,
        batched: bool = True,
        **env_kwargs: Any,
    ) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r} must be an integer >= 1")
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        # One copy gains nothing from stacking (~0.7x of its own trainer's speed): it trains on
        # its own trainer. (Otherwise a copy's host joins a batch, or its own trainer, at reset
        # and stays there for the episode: its Adam state never moves between optimizers.)
        self.batched = bool(batched) and num_envs > 1
        self.envs = [MorphogeneticEnv(**env_kwargs) for _ in range(num_envs)]
        first = self.envs[0]
        self.store = _BufferedStore(first.store)
        for env in self.envs:
            env._store, env._cache = self.store, first.cache
            env._datasets, env._edges = first._datasets, first._edges
        self.single_observation_space = first.observation_space
        self.single_action_space = first.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.render_mode = None
        self._elapsed = np.zeros(num_envs, dtype=np.int64)
        self._started = False
        self._keys: list[tuple] = [(None, None)] * num_envs  # (trainer, batch key) per copy
        self._batches: dict[tuple, _Batch] = {}

    # ------------------------------------------------------------------- reset
    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        if seed is None:
            seeds = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"{len(seeds)} seeds given for num_envs={self.num_envs}")
        options = dict(options) if options is not None else None
        mask = np.ones(self.num_envs, dtype=bool)
        if options is not None and "reset_mask" in options:
            mask = np.asarray(options.pop("reset_mask"))
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_ or not mask.any():
                raise ValueError(
                    f"options['reset_mask'] must be a bool array of shape ({self.num_envs},) "
                    "with at least one True"
                )
            if not self._started and not mask.all():
                raise ValueError("the first reset resets every copy: reset_mask must be all True")
            options = options or None
        if not self._started:
            self._obs: list[dict[str, np.ndarray]] = [None] * self.num_envs
        infos: dict[str, Any] = {}
        for i in np.flatnonzero(mask):
            self._obs[i], info = self.envs[i].reset(seed=seeds[i], options=options)
            self._elapsed[i] = 0
            infos = self._add_info(infos, info, i)
        self._started = True
        self.store.flush()
        return self._stacked(), infos

    # -------------------------------------------------------------------- step
    def step(self, actions):
        if not self._started:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions)
        if not self.action_space.contains(actions.astype(self.action_space.dtype)):
            raise ValueError(f"actions {actions!r} are not in {self.action_space}")
        begun = [env._begin_step(a) for env, a in zip(self.envs, actions)]
        stats = self._train()
        drained = [env._drain(setup) for env, (_, _, setup) in zip(self.envs, begun)]
        evaluated = self._evaluate(stats)
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {}
        lent = self._lend_weight_norms()
        for i, env in enumerate(self.envs):
            decision, invalid, _ = begun[i]
            obs, reward, term, trunc, info = env._end_step(
                decision, invalid, stats[i], *drained[i], evaluated[i]
            )
            for layer in lent[i]:
                layer.set_weight_norm(None)
            self._elapsed[i] += 1
            if self.max_episode_steps is not None and self._elapsed[i] >= self.max_episode_steps:
                trunc = True  # as gymnasium's TimeLimit: truncated even when also terminated
            rewards[i], terminated[i], truncated[i] = reward, term, trunc
            if term or trunc:
                infos = self._add_info(infos, {"final_obs": obs, "final_info": info}, i)
                obs, info = env.reset()
                self._elapsed[i] = 0
            self._obs[i] = obs
            infos = self._add_info(infos, info, i)
        if len(self.store.pending) >= FLUSH_OUTCOMES:
            self.store.flush()
        return self._stacked(), rewards, terminated, truncated, infos

    def _train(self) -> list[IntervalStats]:
        """Run every copy's decision interval: batches together, the rest one by one."""
        self._steps_plan = self._plan()
        stats: list[IntervalStats | None] = [None] * self.num_envs
        for members, batch in self._steps_plan:
            if batch is None:
                for i in members:
                    stats[i] = self.envs[i].trainer.run_interval()
            else:
                for i, s in zip(members, batch.run_interval()):
                    stats[i] = s
        return stats

    def _lend_weight_norms(self) -> list[list[KasminaLayer]]:
        """Give every batched copy's layers their host weight norm (what `health` reads), one
        norm call per batch, for the copy's `_end_step` only (the weights do not change in
        it). Returns the layers lent one, per copy."""
        lent: list[list[KasminaLayer]] = [[] for _ in range(self.num_envs)]
        for members, batch in self._steps_plan:
            if batch is None:
                continue
            for k, stack in batch.host.items():
                norms = torch.stack(torch._foreach_norm(stack.param_rows[0])).tolist()
                for i, layer, norm in zip(members, batch.columns[k], norms):
                    layer.set_weight_norm(norm)
                    lent[i].append(layer)
        return lent

    def _evaluate(self, stats: list[IntervalStats]) -> list[tuple[float, float] | None]:
        """MorphogeneticEnv._evaluate of every copy whose host did not diverge (None for
        those): a batch's copies evaluate and measure contributions together."""
        evaluated: list[tuple[float, float] | None] = [None] * self.num_envs
        for members, batch in self._steps_plan:
            alive = [j for j, i in enumerate(members) if not stats[i].diverged]
            if batch is None:
                for j in alive:
                    evaluated[members[j]] = self.envs[members[j]]._evaluate()
            elif alive:
                for j, result in zip(alive, batch.evaluate(alive)):
                    evaluated[members[j]] = result
                batch.measure_contributions(alive)
        return evaluated

    def _plan(self) -> list[tuple[list[int], _Batch | None]]:
        """Copies grouped into batches (by `_batch_key`), and the copies that run alone."""
        groups: dict[tuple | None, list[int]] = {}
        for i, env in enumerate(self.envs):
            trainer, key = self._keys[i]
            if trainer is not env.trainer:  # reset since the last step: a new host
                key = _batch_key(env) if self.batched else None
                self._keys[i] = (env.trainer, key)
            groups.setdefault(key, []).append(i)
        plan = [(groups.pop(None), None)] if None in groups else []
        for key in [k for k in self._batches if k not in groups]:
            del self._batches[key]  # no copy has that host any more: drop its Adam state
        for key, members in groups.items():
            batch = self._batches.get(key)
            if batch is None:
                batch = self._batches[key] = _Batch(self.envs[members[0]].task)
            batch.set_members([self.envs[i] for i in members])
            plan.append((members, batch))
        return plan

    # ------------------------------------------------------------------ helpers
    def _stacked(self) -> dict[str, np.ndarray]:
        return {k: np.stack([obs[k] for obs in self._obs]) for k in self._obs[0]}

    def action_masks(self) -> np.ndarray:
        """(num_envs, A) boolean masks of the valid actions now."""
        return np.stack([env.action_masks() for env in self.envs])

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call (or read, if not callable) `name` on every copy, as SyncVectorEnv.call."""
        results = []
        for env in self.envs:
            attr = getattr(env, name)
            results.append(attr(*args, **kwargs) if callable(attr) else attr)
        return tuple(results)

    def get_attr(self, name: str) -> tuple[Any, ...]:
        return tuple(getattr(env, name) for env in self.envs)

    def close_extras(self, **kwargs: Any) -> None:
        self.store.flush()
        for env in self.envs:
            env.close()


def _batch_key(env: MorphogeneticEnv) -> tuple | None:
    """What copies must share to train as one batch; None when the host cannot be batched
    (see the module docstring)."""
    task, model = env.task, env.model
    if task.optimizer != "adam" or not isinstance(model, nn.Sequential) or env.trainer.modal:
        return None
    parts: list[Any] = []
    for module in model:
        if isinstance(module, KasminaLayer):
            if type(module.host) is not nn.Linear:
                return None
            parts.append((tuple(module.host.weight.shape), module.host.bias is not None))
        elif type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
            parts.append("flatten")
        elif type(module) in _ELEMENTWISE and not any(True for _ in module.parameters()):
            parts.append(repr(module))
        else:
            return None
    config = _kasmina_config(model)
    return (
        id(env.data),  # the copies' data objects are shared (one load per dataset and kwargs)
        tuple(parts),
        config,
        task.lr,
        task.weight_decay,
        task.batch_size,
        task.decision_interval,
        task.eval_size,
        str(task.device),
    )


def _kasmina_config(model: nn.Module):
    configs = {layer.config for layer in model.modules() if isinstance(layer, KasminaLayer)}
    return next(iter(configs)) if len(configs) == 1 else tuple(sorted(map(repr, configs)))


class _Batch:
    """Copies with one host architecture, trained as stacked tensors by one fused Adam.

    Host weights and their Adam state are stacked per layer (`_HostStack`, one row per copy,
    each copy's own step count). The seeds' Adam holds the copies' running seeds (one group
    per seed learning rate); its state is keyed by parameter, so it is each copy's own,
    created and dropped as the copy's seeds come and go, exactly as the copy's own trainer
    would."""

    def __init__(self, task) -> None:
        self.task = task
        self.envs: list[MorphogeneticEnv] = []
        self.trainers: list = []
        # The running seeds' Adam: (lr, params) per seed learning rate, and per parameter its
        # (exp_avg, exp_avg_sq, step), as torch.optim.Adam(fused=True) keeps them.
        self._seed_groups: list[tuple[float, list[torch.Tensor]]] = []
        self._seed_state: dict[torch.Tensor, tuple[torch.Tensor, ...]] = {}
        self._opt_key: tuple = ()
        self._live: set[nn.Module] = set()  # the kernels of the running seeds, as last synced
        self._untried: set = set()
        self._stale = False  # a seed was culled since the last `_sync_optimizer`
        self._seed_keys: list[tuple] = []
        # Groups of at least VMAP_MIN running seeds of one layer sharing a kernel graph, their
        # tensors stacked (_SeedStack); stacks[k] maps a graph to its stack for column k.
        self.stacks: dict[int, dict[Any, _SeedStack]] = {}
        self._stack_list: list[_SeedStack] = []  # the same stacks, flat
        self.host: dict[int, _HostStack] = {}  # column index -> that layer's stacked weights
        self._finite = FiniteCheck(torch.device(task.device))  # HostTrainer's gradient check

    def set_members(self, envs: list[MorphogeneticEnv]) -> None:
        self.envs = envs
        trainers = [env.trainer for env in envs]
        # columns[k][j]: module k of copy j's Sequential
        self.columns = list(zip(*(list(env.model) for env in envs)))
        self._column_of = {
            layer: k
            for k, column in enumerate(self.columns)
            for layer in column
            if isinstance(layer, KasminaLayer)
        }
        if len(trainers) != len(self.trainers) or any(
            a is not b for a, b in zip(trainers, self.trainers)
        ):
            self._restack(trainers)
        self.trainers = trainers

    def _restack(self, trainers: list) -> None:
        """Stack the members' host weights into one leaf per (layer, weight or bias), and point
        each copy's own parameters at their rows. Adam state moves along with a copy that was
        a member before (or comes from its own trainer's optimizer: empty after a reset)."""
        old_rows = {t: j for j, t in enumerate(self.trainers)}
        host = {}
        for k, column in enumerate(self.columns):
            if isinstance(column[0], KasminaLayer):
                names = ["weight"] + (["bias"] if column[0].host.bias is not None else [])
                host[k] = _HostStack(
                    [[getattr(layer.host, name) for layer in column] for name in names],
                    self.host.get(k),
                    [old_rows.get(t) for t in trainers],
                    trainers,
                )
        self.host = host
        self._host_params = [t for stack in host.values() for t in stack.tensors]
        self._step_tensors = [step for stack in host.values() for step in stack.steps_of]
        self._adam_lists = [
            [row for stack in host.values() for rows in getattr(stack, name) for row in rows]
            for name in ("param_rows", "exp_avg_rows", "exp_avg_sq_rows", "step_rows")
        ]

    # ----------------------------------------------------------------- training
    def run_interval(self) -> list[IntervalStats]:
        """HostTrainer.run_interval for every copy at once."""
        trainers = self.trainers
        steps = self.task.decision_interval
        first = trainers[0]
        device = first.device
        layers = [layer for t in trainers for layer in t.layers]
        # (steps, copies, batch): each copy's batches, drawn from its own data order
        indices = torch.stack([t.interval_indices(steps) for t in trainers], 1)
        idle = dict.fromkeys(layers, 0)  # optimizer steps a layer had nothing to step
        losses, hits = [], []
        for step in range(steps):
            record = step == steps - 1
            # Before the forward: a stacked seed must run from its stack to get its gradient.
            # Within an interval the running seeds change only by a cull (`_drop_culled`).
            if step == 0 or self._stale or any(g in _VMAPPABLE for g in self._untried):
                self._sync_optimizer()
            x, y = first.x_train[indices[step]].to(device), first.y_train[indices[step]].to(device)
            logits = self.forward(x, record)
            hits.append((logits.detach().argmax(2) == y).sum(1))
            # The batch mean per copy, bit for bit F.cross_entropy(logits_i, y_i) and its
            # gradient; classes on dim 1 (the K-dim form) runs ~7x faster than (N*B, C) rows.
            loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
            for tensor in self._host_params:
                tensor.grad = None
            for _, params in self._seed_groups:
                for p in params:
                    p.grad = None
            for stack in self._stack_list:
                for leaf in stack.leaves:
                    leaf.grad = None
            loss.sum().backward()
            skipped = self._check_grads(loss, x, y)
            if record:
                self._capture_grads(skipped)
            self._drop_culled()
            self._host_step(skipped)
            self._seed_step()
            for layer in layers:
                if layer.busy:
                    layer.step_seeds()
                else:  # step_seeds would only count the step; a layer cannot turn busy now
                    idle[layer] += 1
            losses.append(loss.detach())
        for layer, count in idle.items():
            if count:
                layer.count_idle_steps(count)
        # One transfer: (copies, steps) losses, then each copy's hit count.
        values = torch.cat([torch.stack(losses).float(), torch.stack(hits).sum(0)[None].float()])
        values = values.cpu().t().tolist()
        seen = steps * indices.shape[2]
        return [t.interval_stats(v[:-1], v[-1], seen) for t, v in zip(trainers, values)]

    def _check_grads(self, loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> set[int]:
        """HostTrainer's gradient check for every copy: one reduction and one sync over all
        copies' losses and checked gradients; only when that is not finite, each copy's own
        check (which skips that copy's step, or faults its seeds, by clearing their grads).
        Returns the copies whose step is skipped."""
        grads, coupled = [], False
        for t in self.trainers:
            t.sync_seeds()
            coupled = coupled or any(layer.coupled for layer in t.layers)
            grads += [p.grad for _, _, params in t.seeds for p in params if p.grad is not None]
        seed_stacks = self._stack_list
        grads += [
            leaf.grad for stack in seed_stacks for leaf in stack.leaves if leaf.grad is not None
        ]
        if coupled:  # every copy's host gradients: a superset of the coupled copies' own
            grads += [p.grad for p in self._host_params if p.grad is not None]
        # One fused check (as HostTrainer's) and one sync over every copy's loss and gradients.
        if not self._finite.any_nonfinite([loss.detach(), *grads]):
            return set()
        # Each copy's own check reads (and may clear) its own parameters' gradients: lend it
        # its rows of the stacked gradients (host and seeds); a copy whose host gradients it
        # cleared skips its step, a seed whose gradients it cleared is not stepped.
        for stack in seed_stacks:
            stack.lend_grads()
        stacks = list(self.host.values())
        skipped = set()
        for i, t in enumerate(self.trainers):
            params = [p for stack in stacks for p in stack.params[i]]
            for stack in stacks:
                for p, tensor in zip(stack.params[i], stack.tensors):
                    p.grad = None if tensor.grad is None else tensor.grad[i]
            t.check_grads(loss[i], x[i], y[i])
            if any(p.grad is None for p in params):
                skipped.add(i)
            for p in params:
                p.grad = None
        for stack in seed_stacks:
            stack.take_back_grads()
        return skipped

    def _host_step(self, skipped: set[int]) -> None:
        """The copies' host Adam step: one fused call over every copy's rows, which is what
        each copy's own fused Adam computes on its own tensors (elementwise, with the copy's
        own step count); a skipped copy's rows are left out."""
        params, exp_avgs, exp_avg_sqs, steps = self._adam_lists
        grads = [
            row
            for stack in self.host.values()
            for tensor in stack.tensors
            for row in tensor.grad.unbind(0)
        ]
        if skipped:
            n = len(self.trainers)
            keep = [k for k in range(len(params)) if k % n not in skipped]
            params, grads, exp_avgs, exp_avg_sqs, steps = (
                [rows[k] for k in keep] for rows in (params, grads, exp_avgs, exp_avg_sqs, steps)
            )
            torch._foreach_add_(steps, 1)
        else:
            torch._foreach_add_(self._step_tensors, 1)
        if not params:
            return
        adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, self.task.lr, self.task.weight_decay)

    @torch.no_grad()
    def _capture_grads(self, skipped: set[int]) -> None:
        """KasminaLayer.capture_grad of every copy's layers (not the skipped copies': their
        gradients were cleared), from per-row norms of the stacked gradients."""
        for k, stack in self.host.items():
            if any(tensor.grad is None for tensor in stack.tensors):
                continue
            rows = [row for tensor in stack.tensors for row in tensor.grad.unbind(0)]
            n = len(self.trainers)
            norms = torch.stack(torch._foreach_norm(rows)).view(len(stack.tensors), n)
            per_copy = torch.linalg.vector_norm(norms.t().contiguous(), dim=1)
            for j, layer in enumerate(self.columns[k]):
                if j not in skipped:
                    layer.set_grad_norm(per_copy[j])

    def _sync_optimizer(self) -> None:
        """Make the seeds' Adam hold exactly the copies' running seeds, state carried over for
        those that ran before: the seeds of one layer sharing a vmappable kernel graph, at least
        VMAP_MIN of them, in a `_SeedStack` (their tensors stacked); the others one parameter
        at a time (one list per learning rate). The host weights step in `_host_step`."""
        for t in self.trainers:
            t.sync_seeds()
        # Which seeds run, and which of them are TRAINING: a stack's members are in the order
        # the training forward runs them (_seed_deltas), so that it reads the stack as it is.
        key = tuple(
            (t, t.seed_key, tuple(slot.state == SeedState.TRAINING for _, slot, _ in t.seeds))
            for t in self.trainers
        )
        self._stale = False
        self._seed_keys = [t.seed_key for t in self.trainers]
        if key == self._opt_key and not any(g in _VMAPPABLE for g in self._untried):
            return
        self._opt_key = key
        # Every seed parameter's Adam state, wherever it was kept: (exp_avg, exp_avg_sq, step).
        state = dict(self._seed_state)
        for stack in self._stack_list:
            state.update(stack.adam_state())
        groups: dict[tuple, list[tuple[KasminaLayer, nn.Module, list[torch.Tensor]]]] = {}
        order: dict[nn.Module, tuple[bool, int]] = {}
        for t in self.trainers:
            for layer, slot, params in t.seeds:
                kernel = layer.kernels[str(slot.index)]
                order[kernel] = (slot.state != SeedState.TRAINING, slot.index)
                groups.setdefault((self._column_of[layer], kernel.graph), []).append(
                    (layer, kernel, params)
                )
        self.stacks, seeds = {}, {}
        # Graphs not run under vmap yet: their groups are stacked once vmap has run them.
        self._untried = set()
        for (k, graph), members in groups.items():
            known = graph in _VMAPPABLE or graph in _NOT_VMAPPABLE
            if len(members) >= VMAP_MIN and not known:
                self._untried.add(graph)
            if len(members) >= VMAP_MIN and graph in _VMAPPABLE:
                members.sort(key=lambda member: order[member[1]])  # stable: copies in order
                stack = _SeedStack([kernel for _, kernel, _ in members], members[0][0].config.lr)
                stack.load_adam_state(state)
                self.stacks.setdefault(k, {})[graph] = stack
            else:
                for layer, kernel, params in members:
                    seeds.setdefault(layer.config.lr, []).extend(params)
                    _own_tensors(kernel, state)
        self._stack_list = [stack for stacks in self.stacks.values() for stack in stacks.values()]
        self._live = {kernel for members in groups.values() for _, kernel, _ in members}
        self._seed_groups = list(seeds.items())
        self._seed_state = {}
        for _, params in self._seed_groups:
            for p in params:
                self._seed_state[p] = state.get(p) or (
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                    torch.tensor(0.0, dtype=torch.float32, device=p.device),
                )

    def _drop_culled(self) -> None:
        """After the gradient check: a seed culled during this optimizer step (its breaker
        tripped, or it was quarantined) is not stepped, as the single env drops its param group
        before stepping. The stacks are rebuilt before the next forward."""
        # A trainer replaces its `seed_key` tuple only when its running seeds change.
        if all(t.seed_key is key for t, key in zip(self.trainers, self._seed_keys)):
            return
        self._stale = True
        live = {kernel for t in self.trainers for kernel in t.seed_key}
        for kernel in self._live - live:
            for p in kernel.parameters():
                p.grad = None
            for stack in self._stack_list:
                if kernel in stack.rows:
                    stack.used[stack.rows[kernel]] = False

    @torch.no_grad()
    def _seed_step(self) -> None:
        """The seeds' Adam step: what torch.optim.Adam(fused=True) does with these groups (no
        weight decay), without its per-step bookkeeping; a parameter without a gradient (a
        faulted seed's, a skipped copy's, a stacked seed that did not run) keeps its state and
        step count. One fused call per learning rate, over single parameters and stack rows."""
        lists: dict[float, tuple[list, list, list, list, list]] = {}
        for lr, group in self._seed_groups:
            params = [p for p in group if p.grad is not None]
            if params:
                states = [self._seed_state[p] for p in params]
                rows = lists.setdefault(lr, ([], [], [], [], []))
                rows[0].extend(params)
                rows[1].extend(p.grad for p in params)
                rows[2].extend(state[0] for state in states)
                rows[3].extend(state[1] for state in states)
                rows[4].extend(state[2] for state in states)
        for rows in lists.values():  # the single parameters' step counts (stacks do their own)
            torch._foreach_add_(rows[4], 1)
        for stack in self._stack_list:
            stack.adam_rows(lists.setdefault(stack.lr, ([], [], [], [], [])))
        for lr, (params, grads, exp_avgs, exp_avg_sqs, steps) in lists.items():
            if not params:
                continue
            adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, 0.0)

    # --------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, members: list[int]) -> list[tuple[float, float]]:
        """HostTrainer.evaluate() (the validation subset) of copies `members` (indices into
        this batch); keeps each copy's per-sample hits for its contributions."""
        first = self.trainers[members[0]]
        x, y = first.x_val, first.y_val
        m = len(members)
        loss_sum = [0.0] * m
        hits = []
        for start in range(0, len(x), EVAL_CHUNK):
            xb, yb = x[start : start + EVAL_CHUNK], y[start : start + EVAL_CHUNK]
            logits = self.forward(xb.unsqueeze(0).expand(m, *xb.shape), False, members)
            loss = F.cross_entropy(logits.transpose(1, 2), yb.expand(m, -1), reduction="none")
            loss_sum = [a + b for a, b in zip(loss_sum, loss.sum(1).tolist())]
            hits.append(logits.argmax(2) == yb)
        hits = torch.cat(hits, 1)
        counts = hits.sum(1).tolist()
        results = []
        for j, i in enumerate(members):
            self.trainers[i].val_hits = hits[j]
            results.append((int(counts[j]) / len(x), loss_sum[j] / len(x)))
        return results

    @torch.no_grad()
    def measure_contributions(self, members: list[int]) -> None:
        """HostTrainer.measure_contributions of copies `members` (after `evaluate`): pass k
        overrides each copy's k-th running seed (found as the copy's own loop finds it, so a
        seed its breaker culled in an earlier pass is skipped) in one stacked forward."""
        trainers = self.trainers
        first = trainers[members[0]]
        n = first.contribution_samples()
        x, y = first.x_val[:n], first.y_val[:n]
        pending = {j: trainers[j].contribution_passes() for j in members}
        current: dict[int, float] = {}
        while True:
            passes = []  # (copy, layer, slot, whether it is TRAINING)
            for j in members:
                next_pass = next(pending[j], None)
                if next_pass is not None:
                    passes.append((j, *next_pass))
            if not passes:
                return
            for j, *_ in passes:
                if j not in current:
                    current[j] = trainers[j].val_accuracy(n)
            copies = [j for j, *_ in passes]
            with contextlib.ExitStack() as stack:
                for _, layer, slot, training in passes:
                    stack.enter_context(layer.seed_override(slot.index, 1.0 if training else 0.0))
                logits = self.forward(x.unsqueeze(0).expand(len(copies), *x.shape), False, copies)
                hits = (logits.argmax(2) == y).sum(1).tolist()
            for (j, _, slot, training), h in zip(passes, hits):
                set_contribution(slot, int(h) / n, current[j], training)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, record: bool, members: list[int] | None = None):
        """The copies' models on x of shape (copies, B, ...): one stacked pass per layer."""
        columns, rows = self.columns, None
        if members is not None and len(members) < len(self.trainers):
            columns = [[column[i] for i in members] for column in columns]
            rows = torch.tensor(members, device=x.device)
        for k, column in enumerate(columns):
            module = column[0]
            if isinstance(module, KasminaLayer):
                tensors = self.host[k].tensors
                if rows is not None:
                    tensors = [tensor.index_select(0, rows) for tensor in tensors]
                x = _layer_forward(column, x, record, self.stacks.get(k), *tensors)
            elif isinstance(module, nn.Flatten):
                x = x.flatten(2)
            else:
                x = module(x)  # elementwise and parameter-free (see _batch_key)
        return x


def _layer_forward(
    layers: list[KasminaLayer],
    x: torch.Tensor,
    record: bool,
    stacks: dict[Any, _SeedStack] | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """KasminaLayer.forward of each copy's layer on its slice of x (copies, B, in), with the
    copies' host weights stacked: weight (copies, out, in), bias (copies, out); `stacks`: this
    layer's seed stacks by kernel graph."""
    if record:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
    if bias is not None:
        # bit for bit F.linear per copy, both ways
        h = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    else:
        h = torch.bmm(x, weight.transpose(1, 2))
    if any(layer.running for layer in layers):
        out = _seed_deltas(layers, h, record, stacks or {})
    else:
        out = h
    if record:
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        share = (time.perf_counter() - start) / len(layers)
        for layer, row in zip(layers, recorded_stats(out, copies=True).unbind(0)):
            layer.set_recorded(row, share)
        if out.requires_grad:  # the backward of this batch leaves each copy's output gradient
            out.register_hook(functools.partial(_keep_out_grads, layers))
    return out


def _keep_out_grads(layers: list[KasminaLayer], g: torch.Tensor) -> None:
    """KasminaLayer's output-gradient hook, per copy."""
    for layer, norm in zip(layers, out_grad_norm(g, copies=True)):
        layer.set_out_grad(norm)


def _seed_deltas(
    layers: list[KasminaLayer], h: torch.Tensor, record: bool, stacks: dict[Any, _SeedStack]
) -> torch.Tensor:
    """h plus every running seed's delta, per copy, by kasmina.seed's rule (`seed_mode`,
    `seed_delta`) as KasminaLayer applies it: the deltas are added in slot order, one
    `index_add` per slot index (a copy appears once in each: no two adds to one row race, on
    any device)."""
    grad = torch.is_grad_enabled()
    groups: dict[int, list[_Member]] = {}  # by kernel graph: every slot and mode together
    for j, layer in enumerate(layers):
        for slot in layer.running:
            mode = seed_mode(slot, grad)
            if mode is None:
                continue
            kernel = layer.kernels[str(slot.index)]
            member = _Member(j, layer, slot, kernel, *mode)
            groups.setdefault(id(kernel.graph), []).append(member)
    if not groups:
        return h
    # Rows as views: stacking a group's rows backpropagates to them without the full-size
    # zero fill an index_select's backward does per group.
    rows, detached = h.unbind(0), h.detach().unbind(0)
    by_slot: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for members in groups.values():
        members.sort(key=lambda m: (not m.training, m.slot.index))  # runs of (mode, slot)
        inputs = [detached[m.j] if m.detach else rows[m.j] for m in members]
        kept, y = _group_outputs(members, inputs, record, stacks.get(members[0].kernel.graph))
        start = 0
        while start < len(kept):
            first = kept[start]
            end = start + 1
            while (
                end < len(kept)
                and kept[end].training == first.training
                and kept[end].slot.index == first.slot.index
            ):
                end += 1
            run = kept[start:end]
            part, _ = seed_delta(  # a stack's weight is 1: its alphas are applied in `part`
                y[start:end],
                [m.alpha for m in run],
                first.training,
                first.layer.config.fit_step,
                [m.slot.fit_loss for m in run],
            )
            copies, deltas = by_slot.setdefault(first.slot.index, ([], []))
            copies += [m.j for m in run]
            deltas.append(part)
            start = end
    out = None
    for index in sorted(by_slot):
        copies, deltas = by_slot[index]
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
        rows = torch.tensor(copies, device=h.device)
        # The first add makes a new tensor (h's rows feed the kernels); the next ones add into
        # it in place (index_add's backward saves neither its input nor its output).
        out = h.index_add(0, rows, delta) if out is None else out.index_add_(0, rows, delta)
    return h if out is None else out


@dataclass(slots=True)
class _Member:
    """One running seed of one copy (row j of the batch) in a kernel group."""

    j: int
    layer: KasminaLayer
    slot: Any
    kernel: nn.Module
    alpha: float
    training: bool  # fitted to the pseudo-residual (value 0), else blended at alpha
    detach: bool  # reads the detached h


# Graphs vmap could not run (no batching rule); they go per copy from then on.
_NOT_VMAPPABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Graphs vmap has run with a well-formed output: their groups may be stacked (_SeedStack).
_VMAPPABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Below this many copies a group runs one call per copy: vmap's fixed cost (~0.1 ms of pytree
# and batching-rule setup) is more than a few small direct calls on a CPU.
VMAP_MIN = 4


def _group_outputs(
    members: list[_Member], inputs: list[torch.Tensor], record: bool, stack: _SeedStack | None
):
    """Run one group's kernels on their inputs, stacked under vmap or one guarded call per
    copy; record each copy's faults as guarded_call would. Members held in `stack` (all of
    them, or the stack is not used) run from its tensors, so that their gradients reach it; a
    member that runs with grad enabled is marked as used there. Returns the members whose
    output is used and those outputs stacked (members' order)."""
    config = members[0].layer.config
    budget = None if config.latency_budget_ms is None else config.latency_budget_ms / 1e3
    graph = members[0].kernel.graph
    if stack is not None and not all(m.kernel in stack.rows for m in members):
        stack = None
    kept, y = _run_group(members, inputs, record, budget, graph, stack)
    if stack is not None and torch.is_grad_enabled():
        for m in kept:
            stack.used[stack.rows[m.kernel]] = True
    return kept, y


def _states(members: list[_Member], stack: _SeedStack | None) -> list[torch.Tensor]:
    """The group's kernel tensors stacked in members' order: the stack's own (or its rows),
    else stacked from each kernel's tensors."""
    if stack is not None:
        return stack.select([stack.rows[m.kernel] for m in members])
    return [torch.stack(tensors) for tensors in zip(*(m.kernel.flat_state() for m in members))]


def _run_group(members, inputs, record, budget, graph, stack):
    """_group_outputs' work: (kept members, their outputs stacked)."""
    result = None
    if stack is not None or (len(members) >= VMAP_MIN and graph not in _NOT_VMAPPABLE):
        x = torch.stack(inputs)
        result = _vmapped_call(graph, _states(members, stack), x)
    if result is not None:
        y, elapsed = result
        share = elapsed / len(members)
        # guarded_call's checks, on the whole group at once (one sync when every copy is fine)
        checks = check_output(y, x, share, budget, copies=True)
        kept = []
        for k, (m, (keep, fault, msg)) in enumerate(zip(members, checks)):
            if record:
                m.slot.latency_ms = share * 1e3
            if fault is not None:
                m.layer.record_fault(m.slot, fault, msg)
            if keep:
                m.slot.calls += 1
                kept.append(k)
        if len(kept) == len(members):
            return members, y
        # Run the healthy ones again without the faulted: a dropped row's backward would still
        # reach its kernel (0 * NaN), which the single env never runs backward.
        sub = [members[k] for k in kept]
        if sub and (stack is not None or len(sub) >= VMAP_MIN):
            again = _vmapped_call(graph, _states(sub, stack), x[kept])
            if again is not None:
                return sub, again[0]
        # One guarded call each (their latency was counted already): a kernel that ran under
        # vmap on the whole group but fails on its own is a fault, not a crash.
        ran, outs = [], []
        for k, m in zip(kept, sub):
            y_m, fault, msg = guarded_call(_kernel_call(m, stack), inputs[k], None)
            if fault is not None:
                m.layer.record_fault(m.slot, fault, msg)
            if y_m is not None:
                ran.append(m)
                outs.append(y_m)
        return ran, torch.stack(outs) if outs else y[:0]
    kept, outs = [], []
    for m, x in zip(members, inputs):
        y_m = m.layer.run_seed(m.slot, x, _kernel_call(m, stack), record)
        if y_m is not None:
            kept.append(m)
            outs.append(y_m)
    if not outs:
        return [], None
    return kept, outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)


def _kernel_call(m: _Member, stack: _SeedStack | None):
    """A member's kernel as one call: from its stack's row (so that its gradient reaches the
    stack), or the kernel itself."""
    if stack is None:
        return m.kernel
    return functools.partial(_row_forward, m.kernel.graph, stack.states, stack.rows[m.kernel])


def _row_forward(graph, states: list[torch.Tensor], row: int, x: torch.Tensor) -> torch.Tensor:
    return graph.forward(*(state[row] for state in states), x)[0]


def _vmapped_call(graph, states: list[torch.Tensor], x: torch.Tensor):
    """(the stacked output, wall seconds) of the group's graph over its stacked tensors
    `states` (under vmap, or as a `_stacked_program`), or None when vmap cannot run it or its
    output is not x's shape, dtype and device (the per-copy path then names each copy's fault
    as the single env would)."""
    program = _stacked_program(graph) if x.dim() == 3 else None
    batchable = _batchable(graph) if program is None else None
    start = time.perf_counter()
    try:
        if program is not None:
            y = program(states, x)
        else:
            y = torch.func.vmap(lambda state, xi: batchable.forward(*state, xi)[0])(states, x)
    except Exception:
        _NOT_VMAPPABLE[graph] = True
        return None
    elapsed = time.perf_counter() - start
    if form_fault(y, x) is not None:
        return None
    _VMAPPABLE[graph] = True
    return y, elapsed


# Elementwise ops a stacked program applies as they are (they act on (copies, B, D) as on (B, D)).
_UNARY = frozenset(
    {
        torch.ops.aten.gelu.default,
        torch.ops.aten.relu.default,
        torch.ops.aten.sigmoid.default,
        torch.ops.aten.tanh.default,
        torch.ops.aten.silu.default,
    }
)
# Elementwise ops of two activations of the same shape (not of a parameter, whose shape lacks
# the batch dimension): applied as they are.
_BINARY = frozenset(
    {torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor}
)
_STACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stacked_program(graph: torch.fx.GraphModule):
    """For a graph made only of linear layers of its parameters and parameter-free elementwise
    ops (residual_mlp, low_rank, squeeze_excite): a function (states, x) -> y running it on the
    stacked tensors directly, each linear one `baddbmm` (what `F.linear` computes per copy,
    forward and backward, as the stacked host layers do). vmap's batched `linear` is a matmul
    plus a separate bias add with a slower backward (~1.5x for residual_mlp at 32 copies). None
    for any other graph: vmap runs it."""
    cached = _STACKED.get(graph)
    if cached is not None:
        return cached or None
    nodes = list(graph.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    params = set(placeholders[:-1])  # the state inputs; the last one is the activation
    # The program as plain data (value indices), not nodes: a node holds its graph, and the
    # cache must not keep its key alive. ("linear", a, w, bias or None) or (op, a[, b]).
    index = {node: i for i, node in enumerate(placeholders)}
    ops: list[tuple] = []
    result, ok = None, bool(placeholders)
    for node in nodes[len(placeholders) :]:
        if node.op == "output":
            out = node.args[0]
            ok = ok and isinstance(out, (tuple, list)) and len(out) == 1
            ok = ok and isinstance(out[0], torch.fx.Node) and out[0] not in params
            result = index.get(out[0]) if ok else None
            break
        if node.op != "call_function" or node.kwargs:
            ok = False
        elif node.target is torch.ops.aten.linear.default:
            a, w, *bias = node.args
            bias = [b for b in bias if b is not None]
            ok = a in index and a not in params and w in params and len(bias) <= 1
            ok = ok and all(b in params for b in bias)
            if ok:
                ops.append(("linear", index[a], index[w], index[bias[0]] if bias else None))
        elif node.target in _UNARY or node.target in _BINARY:
            arity = 1 if node.target in _UNARY else 2
            ok = len(node.args) == arity and all(
                arg in index and arg not in params for arg in node.args
            )
            if ok:
                ops.append((node.target, *(index[arg] for arg in node.args)))
        else:
            ok = False
        if not ok:
            break
        index[node] = len(index)
    ok = ok and result is not None
    program = functools.partial(_run_stacked, tuple(ops), result) if ok else False
    _STACKED[graph] = program
    return program or None


def _run_stacked(ops: tuple, result: int, states: list[torch.Tensor], x: torch.Tensor):
    """Run a `_stacked_program` on states (copies, ...) and x (copies, B, D)."""
    values = [*states, x]
    for op in ops:
        if isinstance(op[0], str):  # "linear"
            _, a, w, b = op
            weight = values[w].transpose(1, 2)
            if b is None:
                values.append(torch.bmm(values[a], weight))
            else:
                values.append(torch.baddbmm(values[b].unsqueeze(1), values[a], weight))
        else:
            values.append(op[0](*(values[i] for i in op[1:])))
    return values[result]


def _own_tensors(kernel: nn.Module, state: dict) -> None:
    """A seed that left a stack gets tensors (and Adam state in `state`) of its own, rather
    than views that keep the old stack's storage alive."""
    for t in kernel.flat_state():
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():  # a row of a stack
            t.data = t.data.clone()
            if t in state:
                state[t] = tuple(s.clone() for s in state[t])


def _size(x: torch.Tensor, dim: int) -> int:
    return x.size(dim)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v) (no mask, no dropout, not causal), as its math
    backend computes it."""
    scale = 1.0 / math.sqrt(q.size(-1))
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v


# Ops vmap has no batching rule for, and what the batchable copy of a graph calls instead:
# sym_size.int of a batched input raises; CPU flash attention would run one copy at a time.
_REWRITES = {
    torch.ops.aten.sym_size.int: _size,
    torch.ops.aten.scaled_dot_product_attention.default: _attention,
}
_BATCHABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batchable(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph vmap runs: the validated graph itself, or (attention) a copy of it in which
    each op of `_REWRITES` calls its replacement, same inputs, same result up to rounding. Built
    once per graph from its nodes (nothing is loaded or evaluated but the graph's own ops);
    the per-copy path still runs the validated graph as the single env does."""
    batchable = _BATCHABLE.get(graph)
    if batchable is not None:
        return batchable or graph  # False: nothing to rewrite (no strong reference to the key)
    new: torch.fx.Graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    rewritten = False
    for node in graph.graph.nodes:
        target = _REWRITES.get(node.target) if node.op == "call_function" else None
        # sdpa with anything beyond (q, k, v) (a mask, dropout, causal) is left to vmap
        if target is _attention and (len(node.args) != 3 or node.kwargs):
            target = None
        if target is None:
            env[node] = new.node_copy(node, lambda n: env[n])
        else:
            args = torch.fx.map_arg(node.args, lambda n: env[n])
            env[node] = new.call_function(target, args)
            env[node].meta = dict(node.meta)
            rewritten = True
    batchable = torch.fx.GraphModule(graph, new) if rewritten else False
    _BATCHABLE[graph] = batchable
    return batchable or graph


class _SeedStack:
    """The running seeds of one layer, across the copies of a batch, that share a kernel graph,
    with their tensors stacked: one leaf (members, ...) per parameter of the graph (and one
    tensor per buffer), which vmap reads as it is and the backward fills with one gradient
    (instead of a stack of every kernel's tensors each forward, and a gradient per tensor). Each
    kernel's own tensors are views of their rows (`tensor.data`), so that anything reading one
    seed (a per-copy check, the culprit search, a fork) sees its current weights. With its Adam
    state, stacked alike (each member's own step count), and which members ran with gradients
    in this optimizer step: only those are stepped, as torch's Adam skips a parameter without a
    gradient. Built by `_Batch._sync_optimizer` whenever the set of running seeds changes."""

    def __init__(self, kernels: list[nn.Module], lr: float) -> None:
        self.kernels, self.lr = kernels, lr
        self.rows = {kernel: g for g, kernel in enumerate(kernels)}
        self.used = [False] * len(kernels)
        self._lent: list[tuple[int, torch.Tensor]] = []
        self.states: list[torch.Tensor] = []  # the graph's state inputs, stacked, in its order
        self.leaves: list[torch.Tensor] = []  # the trainable ones
        self.params: list[tuple[torch.Tensor, ...]] = []  # params[i][g]: member g's leaf i
        for tensors in zip(*(kernel.flat_state() for kernel in kernels)):
            with torch.no_grad():
                stacked = torch.stack([t.detach() for t in tensors])
            if isinstance(tensors[0], nn.Parameter) and tensors[0].requires_grad:
                stacked.requires_grad_(True)
                self.leaves.append(stacked)
                self.params.append(tensors)
            for g, t in enumerate(tensors):
                t.data = stacked.detach()[g]
                t.grad = None  # one from before the stack (its gradient is the leaf's now)
            self.states.append(stacked)
        self.exp_avgs = [torch.zeros_like(leaf) for leaf in self.leaves]
        self.exp_avg_sqs = [torch.zeros_like(leaf) for leaf in self.leaves]
        self.steps = [
            torch.zeros(len(kernels), dtype=torch.float32, device=leaf.device)
            for leaf in self.leaves
        ]
        self.param_rows = [leaf.detach().unbind(0) for leaf in self.leaves]
        self.exp_avg_rows = [m.unbind(0) for m in self.exp_avgs]
        self.exp_avg_sq_rows = [v.unbind(0) for v in self.exp_avg_sqs]
        self.step_rows = [step.unbind(0) for step in self.steps]

    def select(self, rows: list[int]) -> list[torch.Tensor]:
        """The stacked tensors of members `rows`, in that order (the leaves themselves when
        that is every member in order)."""
        if rows == list(range(len(self.kernels))):
            return self.states
        index = torch.tensor(rows, device=self.states[0].device)
        return [state.index_select(0, index) for state in self.states]

    def adam_state(self) -> dict[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Each member parameter's (exp_avg, exp_avg_sq, step), as views of this stack's rows."""
        return {
            p: (self.exp_avg_rows[i][g], self.exp_avg_sq_rows[i][g], self.step_rows[i][g])
            for i, params in enumerate(self.params)
            for g, p in enumerate(params)
        }

    @torch.no_grad()
    def load_adam_state(self, state: dict[torch.Tensor, tuple[torch.Tensor, ...]]) -> None:
        """Take each member parameter's Adam state from `state` (from `adam_state` of the stack
        it was in, or the batch's per-parameter state); a new seed starts from zeros."""
        for i, params in enumerate(self.params):
            for g, p in enumerate(params):
                if p in state:
                    m, v, step = state[p]
                    self.exp_avg_rows[i][g].copy_(m)
                    self.exp_avg_sq_rows[i][g].copy_(v)
                    self.step_rows[i][g].copy_(step)

    def adam_rows(self, lists: tuple[list, list, list, list, list]) -> None:
        """Append the members that ran with gradients this step to `lists` (params, grads,
        exp_avgs, exp_avg_sqs, steps: one row each), their step counts already advanced, and
        clear `used` for the next step."""
        used = [g for g, u in enumerate(self.used) if u]
        self.used = [False] * len(self.kernels)
        if not used:
            return
        every = len(used) == len(self.kernels)
        for i, leaf in enumerate(self.leaves):
            if leaf.grad is None:
                continue
            grads = leaf.grad.unbind(0)
            for out, rows in zip(
                lists[:4],
                (self.param_rows[i], grads, self.exp_avg_rows[i], self.exp_avg_sq_rows[i]),
            ):
                out.extend(rows if every else [rows[g] for g in used])
            if every:  # one add on the step vector, not one per row
                self.steps[i].add_(1)
            else:
                torch._foreach_add_([self.step_rows[i][g] for g in used], 1)
            lists[4].extend(self.step_rows[i] if every else [self.step_rows[i][g] for g in used])

    def lend_grads(self) -> None:
        """Give each member parameter its row of the stacked gradient (None for a member that
        did not run, or a parameter without a gradient), for a per-copy check that may clear
        it."""
        self._lent = []
        for leaf, params in zip(self.leaves, self.params):
            for g, p in enumerate(params):
                p.grad = leaf.grad[g] if leaf.grad is not None and self.used[g] else None
                if p.grad is not None:
                    self._lent.append((g, p))

    def take_back_grads(self) -> None:
        """After `lend_grads` and the checks: a member a lent gradient of which was cleared (a
        faulted seed, a skipped copy) is not stepped; the lent gradients are dropped."""
        for g, p in self._lent:
            if p.grad is None:
                self.used[g] = False
        for params in self.params:
            for p in params:
                p.grad = None
        self._lent = []


class _HostStack:
    """One host layer's weights for all the copies of a batch: one leaf tensor (copies, ...)
    per parameter (weight, bias), which the batched forward reads and the backward fills in
    one gradient; each copy's own parameter is a view of its row (`param.data`), so that
    anything reading a copy's module (telemetry, the culprit search, forks) sees its current
    weights. With its Adam state, stacked alike, and each copy's own step count."""

    def __init__(self, params: list[list[nn.Parameter]], old, old_rows, trainers) -> None:
        self.params = list(zip(*params))  # params[j]: copy j's (weight, bias)
        self.tensors, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p, column in enumerate(params):
            with torch.no_grad():
                tensor = torch.stack([param.detach() for param in column])
            m, v = torch.zeros_like(tensor), torch.zeros_like(tensor)
            step = torch.zeros(len(column), dtype=torch.float32, device=tensor.device)
            for j, (param, row, t) in enumerate(zip(column, old_rows, trainers)):
                if row is not None and old is not None:
                    m[j], v[j] = old.exp_avgs[p][row], old.exp_avg_sqs[p][row]
                    step[j] = old.steps_of[p][row]
                elif param in t.optimizer.state:  # a copy's own trainer stepped it before
                    state = t.optimizer.state[param]
                    m[j], v[j], step[j] = state["exp_avg"], state["exp_avg_sq"], state["step"]
            tensor.requires_grad_(True)
            for j, param in enumerate(column):
                param.data = tensor.detach()[j]
            self.tensors.append(tensor)
            exp_avgs.append(m)
            exp_avg_sqs.append(v)
            steps.append(step)
        self.exp_avgs, self.exp_avg_sqs, self.steps_of = exp_avgs, exp_avg_sqs, steps
        self.param_rows = [tensor.detach().unbind(0) for tensor in self.tensors]
        self.exp_avg_rows = [m.unbind(0) for m in exp_avgs]
        self.exp_avg_sq_rows = [v.unbind(0) for v in exp_avg_sqs]
        self.step_rows = [step.unbind(0) for step in steps]


class _BufferedStore:
    """The copies' shared KernelStore, with seed outcomes held back and written in one
    transaction by `flush` (a commit costs milliseconds; the env flushes once a step)."""

    def __init__(self, store) -> None:
        self._store = store
        self.pending: list = []  # outcomes not written yet

    def record_outcome(self, outcome) -> None:
        self.pending.append(outcome)

    def flush(self) -> None:
        if self.pending:
            pending, self.pending = self.pending, []
            self._store.record_outcomes(pending)

    def __getattr__(self, name: str):
        return getattr(self._store, name)
