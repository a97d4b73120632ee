"""MorphogeneticEnv: a real training run behind the Gymnasium contract."""

from __future__ import annotations

import copy
import math
import os
import pathlib
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from esper_gym import contexts as ctx
from esper_gym.actions import ADVANCE, CULL, GERMINATE, WAIT, Action, ActionLayout, action_mask
from esper_gym.data import Dataset
from esper_gym.hosts import build_host, data_flow_edges, host_macs, kernel_macs
from esper_gym.kasmina import (
    PRESENT,
    RUNNING,
    FaultRecord,
    kasmina_layers,
)
from esper_gym.kasmina.telemetry import latency_ratio, seed_latency_ms
from esper_gym.kernels import (
    BlueprintGenerator,
    KernelCache,
    KernelStore,
    ProposalContext,
    SeedOutcome,
    load_or_compile,
)
from esper_gym.observation import (
    GraphSpec,
    build_observation,
    global_row,
    measured_features,
    node_features,
    observation_space,
    rent_globals,
)
from esper_gym.options import context_option, grow_option
from esper_gym.reward import RewardComputer, RewardWeights, StepOutcome, resolve_weights
from esper_gym.seeds import SeedLog, SeedRecord, finite_or, node_context
from esper_gym.tasks import Task, get_task
from esper_gym.trainer import HostTrainer

TELEMETRY = ("off", "measured")
# How a tracked seed's life ended, by the state its event moved it to.


def default_kernel_dir() -> pathlib.Path:
    """`$ESPER_KERNEL_DIR`, else `~/.cache/esper_gym/kernels`."""
    env = os.environ.get("ESPER_KERNEL_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "esper_gym" / "kernels"


class MorphogeneticEnv(gym.Env):
    """Steer the growth of a network while it trains.

    ## Description
    An episode is one real training run of a small host network (`Task.host`) on a real
    dataset (`Task.dataset`). The host's Linear/Conv2d layers are KasminaLayers with
    `seed_slots` seed slots each. Every step the env applies the agent's decision, trains the
    host for `decision_interval` optimizer steps, evaluates it on a fixed validation subset, and
    returns the model graph. Kernels are built from blueprints, compiled with `torch.export`,
    kept in a content-addressed store (`kernel_dir`) and loaded through an LRU cache; a
    faulting kernel falls back to the host path and its circuit breaker culls it.

    ## Action space
    `Discrete(A)`, A = 1 + max_nodes * seed_slots * (len(blueprints) + 2) (layout in
    `esper_gym.actions`):

    | action                       | valid when the slot is           | effect                        |
    |------------------------------|----------------------------------|-------------------------------|
    | 0 WAIT                       | always                           | nothing                       |
    | GERMINATE(layer, slot, bp)   | DORMANT and bp fits the slot     | compile/load kernel, GERMINATED |
    | ADVANCE(layer, slot)         | GERMINATED, TRAINING, PROBATION  | next stage (BLENDING -> PROBATION is automatic) |
    | CULL(layer, slot)            | GERMINATED..PROBATION            | drop kernel, EMBARGOED, DORMANT later |

    `obs["action_mask"]` and `env.action_masks()` say which actions are valid. A masked action
    is not executed: it runs as WAIT, costs the invalid-action penalty and sets
    `info["invalid_action"] = True`.

    ## Observation space
    `Dict` of fixed shapes (see `esper_gym.observation` for every feature):
    `nodes (max_nodes, F)`, `edges (2 * max_nodes, 2)`, `edge_attr (2 * max_nodes, 2)`,
    `node_mask (max_nodes,)`, `globals (11 [+ rent] [+ context],)`, `action_mask (A,)`. Nodes
    are the host's KasminaLayers with their health signals (activation mean/variance, dead
    units, gradient and weight norms, added parameters, the output's effective rank and
    gradient mass) and per-slot seed state (state, alpha,
    age, faults, measured contribution). Edges are the host's real data flow between those
    layers, traced from its forward at reset (`esper_gym.hosts.data_flow_edges`: torch.fx,
    or the autograd graph of a dry forward where fx cannot trace): a chain for an MLP, plus a
    skip edge per residual block for the residual hosts (`Esper/FashionMNISTResNet-v0`,
    `Esper/CIFAR10-v0`). Padding edges have `edge_attr[:, 0] == 0`.
    `esper_gym.observation.to_pyg(obs)` gives a PyG batch.

    ## Contexts
    `contexts=None` (default): every episode is the registered task (only the seed changes).
    `contexts="train"` or `"test"`: each `reset` draws a context of that split from
    `self.np_random` (`esper_gym.contexts`: host width/depth, learning rate, budget, decision
    interval, parameter budget, label/input noise, class subsets), rebuilds the task, data and
    host from it, and reports it in `info["context"]` (a plain dict: the factors, `split`,
    `index` in the split, and the Task `fields` they resolved to). Train and test contexts are
    disjoint combinations of the same factor levels. `reset(options={"context": i})` plays
    context `i` of the split instead of a drawn one. The agent does not see the context unless
    `show_context=True`, which appends it to `globals` (one number in [0, 1] per factor) and so
    widens that space. Spaces are the same for every context (max_nodes fits the largest host);
    datasets are loaded once per (dataset, dataset_kwargs) and kept for later resets.
    `telemetry="measured"` appends measured features: per node its layer's and its seeds'
    forward time and its fault rate, globally the kernel cache's hit rate and the artifacts
    loaded and compiled this episode (`esper_gym.observation.MEASURED_*`, before any context
    features). It is off by default because wall-clock time breaks bit-exact
    reproducibility: the same seed and actions then give different observations on a busier
    machine.

    ## Rewards
    Weighted sum of accuracy gain, parameter and latency rent, loss spikes, kernel faults,
    invalid actions, interventions and divergence (`esper_gym.reward`); each component is in
    `info["reward_components"]`. Weights: `reward_weights=RewardWeights(...)` or a dict (none:
    the task's `reward_weights`); or replace the whole computation with `reward_fn` (a callable
    taking a `StepOutcome`, returning `(reward, components)`). As `reward_fn`,
    `RewardComputer(latency="measured")` prices latency on measured kernel time (not MACs).

    ## Starting state
    A freshly initialised host (every slot DORMANT), evaluated once before any training.
    `reset(options={"grow": "residual_mlp"})` (a name or a preference list) instead starts with
    every slot FOSSILIZED with the first blueprint that fits it: the ceiling host.
    The reset draws the context (with `contexts`) before the host init.

    ## Episode end
    Terminated when the training budget (`max_epochs` over the training split) is spent, or
    when the host's loss becomes NaN/Inf (`info["diverged"] = True`, divergence penalty).
    The last step's info has `"seeds"`: one record per GERMINATE of the episode (step, layer
    index and name, slot, blueprint, params, last measured contribution, outcome: the final
    state, or CULLED), what `esper_gym.episode` scores decision quality from.
    Truncated only by the `TimeLimit` of the registration (`max_episode_steps`). `step()` after
    termination raises RuntimeError ("episode is over ... call reset()"): it would train past
    the budget.

    ## Arguments
    `gym.make("Esper/Spirals-v0", **kwargs)`: `task` (a registered name or a `Task`), any
    `Task` field (e.g. `seed_slots=2, max_epochs=5, decision_interval=10, device="cuda"`),
    `reward_weights`, `reward_fn`, `kernel_dir` (default `$ESPER_KERNEL_DIR` or
    `~/.cache/esper_gym/kernels`), `generator` (what a GERMINATE of a kind compiles: the
    protocol is in `esper_gym.kernels.generator`; default the template `BlueprintGenerator`,
    `esper_gym.kernels.karn.KarnGenerator` learns from the store's history), `telemetry`
    ("off" or "measured"), `render_mode="ansi"`, `contexts=None|"train"|"test"`,
    `show_context=False`. With contexts, the Task fields given here are the base the
    context's scales multiply (`max_epochs=4` then `epochs_scale=0.5` trains 2 epochs).

    ## Telemetry and the seed history
    `env.telemetry_stats()` (and, with `telemetry="measured"`, `info["telemetry"]`) holds
    `cache_hits`, `cache_misses`, `cache_hit_rate` (NaN before any lookup), `kernel_loads`
    (artifacts loaded from the store), `kernel_compiles` (all this episode so far) and
    `seed_latency_ms` (`"<layer>.<slot>"` -> its kernel's measured time on the interval's
    recorded batch, for running seeds). It depends on the machine and on what the store and
    cache already held, which is why it is not in the default info: that one is reproducible.
    `esper_gym.episode.play_episode` reports it per episode (`telemetry/*`, W&B episode logs).

    When a seed germinated by the agent is fossilized or culled, or is still live at the
    episode's end, its `SeedOutcome` (blueprint and
    hyper-parameters, slot shape, node features at germination, last measured contribution,
    params) is written to the kernel store (`store.outcomes()`), counted in
    `info["outcomes_recorded"]`, and handed to `generator.observe` if it has one.

    ## Reproducibility
    `reset(seed=s)` draws the host init, the data order and every other draw from
    `self.np_random` (torch generators seeded from it; the global torch RNG is left as it
    was), so the same seed and actions give the same context, observations, rewards and
    infos. Only `info["telemetry"]` (only there with `telemetry="measured"`) is not, nor the
    observation with `telemetry="measured"` and the reward with a measured latency cost. A
    generator that learns (Karn) draws from `self.np_random` too, and its proposals depend on
    the store's history: reproducible for the same store contents.

    ## Version history
    * v0: initial release.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        task: str | Task = "spirals",
        reward_weights: RewardWeights | dict | None = None,
        reward_fn=None,
        kernel_dir: str | os.PathLike | None = None,
        render_mode: str | None = None,
        generator=None,
        telemetry: str = "off",
        contexts: str | None = None,
        show_context: bool = False,
        **task_overrides: Any,
    ) -> None:
        self.task = get_task(task, **task_overrides)
        self.base_task = self.task  # what each context is applied to
        self.contexts = None if contexts is None else ctx.check_split(contexts)
        self.context_space = None if contexts is None else ctx.context_space(self.task)
        if show_context and self.context_space is None:
            raise ValueError("show_context=True needs contexts='train' or 'test'")
        self.show_context = bool(show_context)
        self.context: dict | None = None
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; allowed: None, 'ansi'")
        self.render_mode = render_mode
        if not isinstance(reward_weights, RewardWeights):  # a dict sets some over the task's
            reward_weights = resolve_weights(self.task.reward_weights, reward_weights)
        self.reward_fn = reward_fn or RewardComputer(reward_weights)
        self.kernel_dir = pathlib.Path(kernel_dir) if kernel_dir else default_kernel_dir()
        if generator is None:
            generator = BlueprintGenerator(self.task.blueprints)
        missing = [m for m in ("propose", "fits") if not callable(getattr(generator, m, None))]
        if missing:
            raise TypeError(
                f"generator={generator!r} lacks {missing}: a generator has propose(shape, "
                "kind, param_budget, context) and fits(shape, kind, param_budget) "
                "(esper_gym.kernels.generator)"
            )
        self.generator = generator
        if telemetry not in TELEMETRY:
            raise ValueError(f"telemetry={telemetry!r}; allowed: {', '.join(TELEMETRY)}")
        self.telemetry = telemetry
        self.layout = ActionLayout(
            self.task.max_nodes, self.task.seed_slots, len(self.task.blueprints)
        )
        extra = len(self.context_space.factors) if self.show_context else 0
        extra += len(rent_globals(self.task, self.reward_fn))  # Task.show_rent
        self.spec_graph = GraphSpec(
            self.task.max_nodes, self.task.seed_slots, extra, measured=telemetry == "measured"
        )
        self.action_space = spaces.Discrete(self.layout.size)
        self.observation_space = observation_space(self.spec_graph, self.layout.size)
        self._data: Dataset | None = None
        self._datasets: dict[tuple, Dataset] = {}  # contexts: one load per (dataset, kwargs)
        self._edges: dict[tuple, list[tuple[int, int]]] = {}  # traced once per host config
        self._context_features: list[float] = []
        self.seeds = SeedLog()
        self._store: KernelStore | None = None
        self._cache: KernelCache | None = None
        self.model: torch.nn.Module | None = None
        self.trainer: HostTrainer | None = None
        self.terminated = False
        self._mask = np.zeros(self.layout.size, np.int8)
        self._cache_base = (0, 0, 0)
        self._layer_faults: dict[str, int] = {}
        self.outcomes_recorded = 0
        self.is_fork = False  # set on copies made by fork()

    # ------------------------------------------------------------------ plumbing
    @property
    def data(self) -> Dataset:
        if self._data is None:  # lazily, so that vector-env workers load their own copy
            self._data = self._load(self.task)
        return self._data

    def _load(self, task: Task) -> Dataset:
        source = task.dataset if isinstance(task.dataset, str) else id(task.dataset)
        key = (source, task.data_dir, repr(sorted(dict(task.dataset_kwargs).items())))
        if key not in self._datasets:
            self._datasets[key] = task.load_data()
        return self._datasets[key]

    def _graph_edges(self, data: Dataset) -> list[tuple[int, int]]:
        host = self.task.host if isinstance(self.task.host, str) else id(self.task.host)
        key = (host, repr(sorted(dict(self.task.host_kwargs).items())), data.input_shape,
               data.num_classes, self.task.seed_slots)  # fmt: skip
        if key not in self._edges:
            self._edges[key] = data_flow_edges(self.model, data.input_shape)
        return self._edges[key]

    @property
    def store(self) -> KernelStore:
        if self._store is None:
            self._store = KernelStore(self.kernel_dir)
            self._cache = KernelCache(self._store)
        return self._store

    @property
    def cache(self) -> KernelCache:
        _ = self.store
        return self._cache

    def __getstate__(self) -> dict:
        # Store and cache hold a database handle and loaded programs: reopened on demand.
        state = self.__dict__.copy()
        state["_store"] = state["_cache"] = None
        return state

    def share_with(self, other: MorphogeneticEnv, store=None) -> None:
        """Use `other`'s loaded datasets, traced graph edges and kernel cache (and `store`, or
        its store): the copies of a batched simulator load and compile each thing once."""
        self._store, self._cache = store or other.store, other.cache
        self._datasets, self._edges = other._datasets, other._edges

    def fork(self) -> MorphogeneticEnv:
        """An independent copy of the running episode, for lookahead ("try before you commit").

        Copied: host and seed kernels (weights, lifecycle states, alphas), optimizers, trainer
        (data order and position in it), `np_random` and the torch generators, reward and
        episode state. Shared, because nothing writes them during an episode: the datasets and
        the kernel store and cache (loaded artifacts; a germination instantiates its own
        module). Stepping the fork leaves this env's trajectory unchanged, and stepping both
        with the same actions gives the same trajectory (tests/test_env.py). A fork's seed
        outcomes are counted in its info but not written to the shared store nor shown to the
        generator: a lookahead's rollouts are hypothetical, and would otherwise enter what a
        learned generator (Karn) learns from, many times over."""
        if self.trainer is None:
            raise RuntimeError("fork() copies a running episode: call reset() first")
        memo: dict[int, object] = {id(self._store): self._store, id(self._cache): self._cache}
        for data in self._datasets.values():
            memo[id(data)] = data
            memo |= {id(v): v for v in vars(data).values() if isinstance(v, torch.Tensor)}
        # (nn.Parameter's deepcopy drops .grad: harmless, every step zeroes grads before
        # backward.) HostTrainer keys its seed param groups by kernel object, not id(), so the
        # copy's keys follow its own kernels.
        twin = copy.deepcopy(self, memo)
        twin.is_fork = True
        return twin

    # --------------------------------------------------------------------- reset
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        grow = grow_option(options, self.task.blueprints)  # before any work: a typo fails fast
        pick = context_option(options, self.context_space, self.contexts)
        super().reset(seed=seed)
        if self.context_space is not None:
            # Drawn first, so that the host init and data order below come from the same
            # stream whatever the context: same seed, same context, same episode.
            index, context = self.context_space.sample(self.contexts, self.np_random)
            if pick is not None:
                index, context = pick, self.context_space.contexts(self.contexts)[pick]
            self.task = ctx.apply_context(self.base_task, context)
            self._data = None
            self.context = ctx.describe(self.task, self.contexts, index, context)
            self._context_features = self.context_space.features(context)
        data = self.data
        torch_seed = int(self.np_random.integers(0, 2**62))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            self.model = build_host(
                self.task.host_builder(),
                data.input_shape,
                data.num_classes,
                self.task.seed_slots,
                self.task.seed_config(),
                **dict(self.task.host_kwargs),
            ).to(self.task.device)
        self.layers = kasmina_layers(self.model)
        if len(self.layers) > self.task.max_nodes:
            raise ValueError(
                f"host has {len(self.layers)} growable layers; raise max_nodes "
                f"(now {self.task.max_nodes})"
            )
        self.graph_edges = self._graph_edges(data)
        self.seeds = SeedLog()
        order = torch.Generator().manual_seed(torch_seed + 1)
        self.trainer = HostTrainer(self.model, data, self.task, order)
        self.host_params = sum(p.numel() for p in self.model.parameters())
        self.host_macs = host_macs(self.model)
        self.budget = self.task.budget_steps(len(data.x_train))
        self.episode_steps = self.budget // self.task.decision_interval
        # Cache counters are the env's lifetime's; info reports this episode's (grow included).
        self._cache_base = (0, 0, 0) if self._cache is None else self._cache_counts()
        if grow:
            self._grow_all(grow)
        self.trainer.record_untrained()
        self.val_acc, self.val_loss = self.trainer.evaluate()
        self.train_loss, self.train_acc = self.val_loss, self.val_acc
        self.best_acc, self.plateau, self.acc_delta = self.val_acc, 0, 0.0
        self.faults_total, self.steps = 0, 0
        self.terminated = False
        self._layer_faults = {layer.name: 0 for layer in self.layers}
        self.outcomes_recorded = 0
        self._update_mask()
        info = self._info(events=[], faults=[], invalid=False, action=None)
        if self.context is not None:
            info["context"] = self.context
        return self._observation(), info

    def _grow_all(self, names: tuple[str, ...]) -> None:
        """Start with every slot FOSSILIZED, holding the first blueprint of `names` that
        fits it: the host with all the capacity growth could add, trained from step 0 (the
        ceiling of the task tables)."""
        for layer in self.layers:
            name = next(
                (
                    n
                    for n in names
                    if self.generator.fits(layer.out_shape, n, self.task.param_budget)
                ),
                None,
            )
            if name is None:
                continue
            for slot in layer.slots:
                blueprint = self.generator.propose(layer.out_shape, name, self.task.param_budget)
                kernel, meta = load_or_compile(
                    blueprint, layer.out_shape, self.store, self.cache, device=self.task.device
                )
                layer.graft(slot.index, kernel, name, meta.sha256)

    # ---------------------------------------------------------------------- step
    def step(self, action):
        decision, invalid, setup_faults = self.begin_step(action)
        stats = self.trainer.run_interval()
        events, faults = self.drain_events(setup_faults)
        evaluated = None if stats.diverged else self.evaluate_interval()
        return self.end_step(decision, invalid, stats, events, faults, evaluated)

    def begin_step(self, action) -> tuple[Action, bool, list]:
        """Check and apply `action`: (the decision executed, whether the action was masked,
        faults of building its kernel). `step` is `begin_step`, the trainer's interval, then
        `end_step`; esper_gym.vector runs the middle for many copies at once."""
        if self.trainer is None:
            raise RuntimeError("call reset() before step()")
        if self.terminated:
            # Stepping on would train past the budget (or on a diverged host) and report it as
            # the same episode: an agent loop that ignores `terminated` must hear about it.
            raise RuntimeError(
                f"episode is over (terminated after step {self.steps}, "
                f"{self.trainer.steps_done}/{self.budget} optimizer steps"
                f"{', host diverged' if math.isnan(self.val_loss) else ''}); call reset()"
            )
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        index = int(action)
        invalid = not bool(self._mask[index])
        decision = Action(WAIT) if invalid else self.layout.decode(index)
        return decision, invalid, self._apply(decision)

    def drain_events(self, setup_faults: list) -> tuple[list[dict], list]:
        """The interval's events and faults (with those of building the step's kernel), counted."""
        self.steps += 1
        events, faults = [], list(setup_faults)
        for layer in self.layers:
            e, f = layer.drain()
            events += e
            faults += f
        self.faults_total += len(faults)
        for fault in faults:
            if fault.layer in self._layer_faults:
                self._layer_faults[fault.layer] += 1
        return events, faults

    def evaluate_interval(self) -> tuple[float, float]:
        """(val_acc, val_loss) after the interval; measures each live seed's contribution.
        Its kernel faults belong to the next step's info, as they are drained then."""
        val_acc, val_loss = self.trainer.evaluate()
        self.trainer.measure_contributions(val_acc)
        return val_acc, val_loss

    def end_step(self, decision, invalid, stats, events, faults, evaluated):
        """The rest of `step`: reward, outcomes, observation and info. `evaluated` is what
        `evaluate_interval` returned, None when the host diverged. (`step` is `begin_step`, the
        interval, `drain_events`, `evaluate_interval`, `end_step`: esper_gym.vector runs the interval and
        the evaluation of many copies at once.)"""
        before = self.val_acc
        if evaluated is None:
            self.val_loss = float("nan")
        else:
            self.val_acc, self.val_loss = evaluated
        self.train_loss, self.train_acc = stats.mean_loss, stats.train_acc
        self.acc_delta = self.val_acc - before
        if self.val_acc > self.best_acc:
            self.best_acc, self.plateau = self.val_acc, 0
        else:
            self.plateau += 1
        outcome = StepOutcome(
            val_acc_before=before,
            val_acc=self.val_acc,
            param_ratio=self._added_params() / self.host_params,
            macs_ratio=self._added_macs() / self.host_macs,
            loss_spikes=stats.loss_spikes,
            faults=len(faults),
            invalid_action=invalid,
            intervened=decision.kind != WAIT,
            diverged=stats.diverged,
            episode_steps=self.episode_steps,
            latency_ratio=latency_ratio(self.layers),
        )
        reward, components = self.reward_fn(outcome)
        terminated = stats.diverged or self.trainer.steps_done >= self.budget
        self.terminated = terminated
        settled = self.seeds.follow(
            events, lambda n, k: self.layers[n].slots[k], self.trainer.steps_done
        )
        self._record_outcomes(
            settled + (self.seeds.end(self.trainer.steps_done) if terminated else [])
        )
        self._update_mask()
        info = self._info(events, faults, invalid, decision, components, stats)
        if terminated and not stats.diverged:
            info["test_acc"], _ = self.trainer.evaluate(self.data.x_test, self.data.y_test)
        if terminated:
            info["seeds"] = self.seeds.info()
        return self._observation(), float(reward), bool(terminated), False, info

    def _apply(self, action: Action) -> list:
        """Execute a valid decision; a kernel that cannot be built is a fault, not a crash."""
        if action.kind == WAIT:
            return []
        layer = self.layers[action.layer]
        if action.kind == ADVANCE:
            layer.advance(action.slot)
        elif action.kind == CULL:
            layer.cull(action.slot, reason="agent")
        elif action.kind == GERMINATE:
            name = self.task.blueprints[action.blueprint]
            features = node_context(layer, self.trainer.steps_done / self.budget, self.val_acc)
            try:
                context = ProposalContext(
                    features=features,
                    host_params=self.host_params,
                    task=self.task.name,
                    store=self.store,
                    rng=self.np_random,
                )
                blueprint = self.generator.propose(
                    layer.out_shape, name, self.task.param_budget, context=context
                )
                kernel, meta = load_or_compile(
                    blueprint, layer.out_shape, self.store, self.cache, device=self.task.device
                )
            except Exception as exc:  # a broken artifact or compiler must not end the run
                return [
                    FaultRecord(
                        layer.name,
                        action.slot,
                        name,
                        "load",
                        f"{type(exc).__name__}: {exc}"[:500],
                        layer.step_count,
                    )
                ]
            layer.germinate(action.slot, kernel, name, meta.sha256)
            self.seeds.add(
                SeedRecord(
                    step=self.steps,
                    progress=self.trainer.steps_done / self.budget,
                    layer=action.layer,
                    layer_name=layer.name,
                    slot=action.slot,
                    blueprint=blueprint.to_dict(),
                    params=layer.slots[action.slot].params,
                    start=self.trainer.steps_done,
                    features=features,
                )
            )
        return []

    # ------------------------------------------------------- seed history, telemetry
    def _record_outcomes(self, settled: list[SeedRecord]) -> None:
        """Each settled seed's outcome, to the store and the generator (not from a fork)."""
        for r in settled:
            outcome = SeedOutcome(
                task=self.task.name,
                kind=r.blueprint["name"],
                blueprint=r.blueprint,
                shape=tuple(self.layers[r.layer].out_shape),
                features={k: float(finite_or(v, 0.0)) for k, v in r.features.items()},
                contribution=min(max(finite_or(r.fate_contribution, 0.0), -1.0), 1.0),
                params=int(r.params),
                host_params=int(self.host_params),
                fate=r.fate,
                age=r.age,
            )
            self.outcomes_recorded += 1
            if self.is_fork:  # a hypothetical rollout: not evidence for the store or Karn
                continue
            self.store.record_outcome(outcome)
            observe = getattr(self.generator, "observe", None)
            if callable(observe):
                observe(outcome)

    def _cache_counts(self) -> tuple[int, int, int]:
        stats = self.cache.stats
        return stats.hits, stats.misses, stats.compiles

    def telemetry_stats(self) -> dict[str, Any]:
        """This episode's kernel telemetry so far (see "Telemetry" in the class docstring)."""
        now = (0, 0, 0) if self._cache is None else self._cache_counts()
        hits, misses, compiles = (a - b for a, b in zip(now, self._cache_base))
        return {
            "cache_hits": hits,
            "cache_misses": misses,
            "cache_hit_rate": hits / (hits + misses) if hits + misses else math.nan,
            "kernel_loads": misses,
            "kernel_compiles": compiles,
            "seed_latency_ms": seed_latency_ms(self.layers),
        }

    # -------------------------------------------------------------- observation
    def _added_params(self) -> int:
        return sum(s.params for layer in self.layers for s in layer.slots)

    def _added_macs(self) -> int:
        return sum(
            kernel_macs(s.params, layer.out_shape) for layer in self.layers for s in layer.slots
        )

    def _update_mask(self) -> None:
        self._mask = action_mask(self.layout, self.layers, self._offered)

    def _offered(self, layer: Any) -> list[bool]:
        """`generator.fits` of each blueprint of the library for a DORMANT slot of `layer`.
        The default generator's answer depends only on its arguments: it is kept (per env,
        by shape, library and budget) instead of asked again every step for every slot; any
        other generator is asked every time, as the protocol says."""
        shape, names, budget = layer.out_shape, self.task.blueprints, self.task.param_budget
        if type(self.generator) is not BlueprintGenerator:
            return [self.generator.fits(shape, name, budget) for name in names]
        key = (tuple(shape), names, budget)
        cache = self.__dict__.setdefault("_fits_cache", {})
        if key not in cache:
            cache[key] = [self.generator.fits(shape, name, budget) for name in names]
        return cache[key]

    def action_masks(self) -> np.ndarray:
        """Boolean mask of valid actions (the sb3-contrib MaskablePPO protocol)."""
        return self._mask.astype(bool)

    def _observation(self) -> dict[str, np.ndarray]:
        signals = [layer.health() for layer in self.layers]
        nodes = node_features(signals, self.budget, self.task.max_faults)
        slots_total = len(self.layers) * self.task.seed_slots
        present = sum(s.state in PRESENT for layer in self.layers for s in layer.slots)
        globals_ = global_row(
            {
                "progress": self.trainer.steps_done / self.budget,
                "val_acc": self.val_acc,
                "log_val_loss": math.log1p(finite_or(self.val_loss, 1e3)),
                "log_train_loss": math.log1p(finite_or(self.train_loss, 1e3)),
                "acc_delta": self.acc_delta * 10.0,
                "best_acc": self.best_acc,
                "plateau": self.plateau / 10.0,
                "log_params_ratio": math.log10(1.0 + self._added_params() / self.host_params),
                "live_seeds": present / slots_total,
                "log_faults": math.log1p(self.faults_total),
                "train_acc": self.train_acc,
            }
        )
        if self.telemetry == "measured":
            extra, measured = measured_features(
                signals, self.layers, self._layer_faults, self.steps, self.telemetry_stats()
            )
            nodes, globals_ = np.concatenate([nodes, extra], axis=1), [*globals_, *measured]
        context = self._context_features if self.show_context else []
        globals_ += rent_globals(self.task, self.reward_fn) + context
        numels = [math.prod(self.layers[src].out_shape) for src, _ in self.graph_edges]
        return build_observation(
            self.spec_graph, nodes, self.graph_edges, numels, globals_, self._mask
        )

    def _info(self, events, faults, invalid, action, components=None, stats=None) -> dict:
        return {
            "step": self.steps,
            "optimizer_steps": self.trainer.steps_done,
            "val_acc": self.val_acc,
            "val_loss": self.val_loss,
            "train_loss": self.train_loss,
            "loss_spikes": stats.loss_spikes if stats else 0,
            "params": self.host_params + self._added_params(),
            "params_added": self._added_params(),
            "seeds_live": sum(s.state in RUNNING for layer in self.layers for s in layer.slots),
            "action": action.describe(self.task.blueprints) if action else "reset",
            "invalid_action": invalid,
            "events": events,
            "faults": len(faults),
            "fault_kinds": [f.kind for f in faults],
            "faults_total": self.faults_total,
            "reward_components": components or {},
            "outcomes_recorded": self.outcomes_recorded,
            # Wall clock and cache state: only when asked for, so that by default the same
            # seed and actions give the same infos (gymnasium's check_env compares them).
            **({"telemetry": self.telemetry_stats()} if self.telemetry == "measured" else {}),
            "diverged": bool(stats.diverged) if stats else False,
            "divergence": (
                f"host loss became NaN/Inf within optimizer steps "
                f"{self.trainer.steps_done - stats.steps}..{self.trainer.steps_done}"
                if stats and stats.diverged
                else ""
            ),
        }

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self.trainer is None:
            return None
        lines = [
            f"step {self.steps}  opt-steps {self.trainer.steps_done}/{self.budget}  "
            f"val_acc {self.val_acc:.4f}  params {self.host_params}+{self._added_params()}"
        ]
        for layer in self.layers:
            slots = "  ".join(
                f"[{s.state.name.lower()} {s.blueprint or '-'} a={s.alpha:.2f} c={s.contribution:+.3f}]"
                for s in layer.slots
            )
            lines.append(f"  {layer.name:>6} {tuple(layer.out_shape)!s:>14}  {slots}")
        return "\n".join(lines)
