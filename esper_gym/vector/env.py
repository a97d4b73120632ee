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

The package: `env` (this API: reset, step, autoreset, infos), `batch` (the batched trainer:
one decision interval of a batch of copies, its stacked forward, evaluation and
contributions), `stacks` (host and seed tensors stacked across copies, with their Adam
state), `programs` (a seed graph run once for many copies: stacked programs, vmap). Every
rule (the seed forward and fit, fault checks, telemetry, the gradient check, Adam's
constants) is imported from `kasmina` and `trainer`, never copied.

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

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import nn

from esper_gym.env import MorphogeneticEnv
from esper_gym.kasmina import KasminaLayer
from esper_gym.kasmina.telemetry import weight_norm
from esper_gym.trainer import IntervalStats
from esper_gym.vector.batch import _Batch

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
            env.share_with(first, store=self.store)
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
        begun = [env.begin_step(a) for env, a in zip(self.envs, actions)]
        stats = self._train()
        drained = [env.drain_events(setup) for env, (_, _, setup) in zip(self.envs, begun)]
        evaluated = self._evaluate(stats)
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {}
        lent = self._lend_weight_norms()
        for i, env in enumerate(self.envs):
            decision, invalid, _ = begun[i]
            obs, reward, term, trunc, info = env.end_step(
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
        norm call per batch, for the copy's `end_step` only (the weights do not change in
        it). Returns the layers lent one, per copy."""
        lent: list[list[KasminaLayer]] = [[] for _ in range(self.num_envs)]
        for members, batch in self._steps_plan:
            if batch is None:
                continue
            for k, stack in batch.host.items():
                norms = weight_norm(stack.param_rows[0], copies=True)
                for i, layer, norm in zip(members, batch.columns[k], norms):
                    layer.set_weight_norm(norm)
                    lent[i].append(layer)
        return lent

    def _evaluate(self, stats: list[IntervalStats]) -> list[tuple[float, float] | None]:
        """MorphogeneticEnv.evaluate_interval of every copy whose host did not diverge (None for
        those): a batch's copies evaluate and measure contributions together."""
        evaluated: list[tuple[float, float] | None] = [None] * self.num_envs
        for members, batch in self._steps_plan:
            alive = [j for j, i in enumerate(members) if not stats[i].diverged]
            if batch is None:
                for j in alive:
                    evaluated[members[j]] = self.envs[members[j]].evaluate_interval()
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
    (see vector.batch)."""
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
