"""Blueprint generators: what the env asks for a kernel, and the template-based default.

## The generator protocol
The env (`MorphogeneticEnv(generator=...)`, `gym.make(id, generator=...)`) calls:

* `fits(shape, kind, param_budget) -> bool` for every DORMANT slot and blueprint kind of the
  task's library, every step: whether GERMINATE(slot, kind) is offered (the action mask). It
  must never raise and should be cheap (cache by `(shape, kind)`).
* `propose(shape, kind, param_budget, context) -> Blueprint` on a GERMINATE of `kind` in a
  slot of `shape` (`(D,)` linear, `(C, H, W)` conv): the blueprint (a `Blueprint` dataclass of
  `esper_gym.kernels.blueprints`, any variant of its hyper-parameters) to compile, load and
  grow. Its `param_count(shape)` must be at most `param_budget` (None: no budget) and its
  `name` must be `kind`. A ValueError (or any error) is recorded as a "load" fault: the slot
  stays DORMANT and the run goes on. `context` is a `ProposalContext`: the node's health
  features at this moment, the host's parameter count, the task name, the env's kernel store
  (`context.store.outcomes(kind)`: the history of every seed grown from a store kernel, see
  `esper_gym.kernels.store.SeedOutcome`) and the env's RNG (`context.rng`, seeded by
  `reset(seed=...)`: draw from it, not from a global RNG, and an episode stays reproducible
  for a given store). `propose` is always called with `context=` (a generator must take it).
* `observe(outcome)` (optional): each `SeedOutcome` the env records in the store when a seed
  it germinated is fossilized or culled, or is still live when the episode ends.

A generator is pickled into vector-env workers (spawn): keep it plain data (no open handles;
read the store from `context`, not from an attribute).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from esper_gym.kernels.blueprints import BLUEPRINTS, Blueprint


@dataclass(frozen=True)
class ProposalContext:
    """What the env knows when a GERMINATE asks `propose` for a blueprint (see the module
    docstring). `features`: the node's HealthSignal (act_mean, act_var, dead_ratio, grad_norm,
    weight_norm, fan_in, fan_out) plus the episode's progress and val_acc; `store`: the env's
    KernelStore; `rng`: the env's `np_random`."""

    features: Mapping[str, float] = field(default_factory=dict)
    host_params: int = 1
    task: str = ""
    store: Any = None
    rng: Any = None


class BlueprintGenerator:
    """Template-based: `kind` names a template; its size hyper-parameter (`size_field`: width,
    rank, hidden, ...) is set to the largest value whose exact param_count fits the budget;
    every other hyper-parameter keeps the template's default. It ignores the context.

    `library`: the kinds it serves (None: every registered blueprint; the env only asks for
    the task's library anyway)."""

    def __init__(self, library: Sequence[str] | None = None):
        library = tuple(BLUEPRINTS) if library is None else tuple(library)
        unknown = [kind for kind in library if kind not in BLUEPRINTS]
        if unknown:
            raise ValueError(f"unknown blueprint kinds {unknown}; known: {sorted(BLUEPRINTS)}")
        self.library = library
        # (shape, kind) -> smallest param count of the kind for the shape, or None if it cannot
        # serve the shape. Bounded by shapes x kinds, so `fits` is a dict lookup after the first.
        self._smallest: dict[tuple[tuple[int, ...], str], int | None] = {}

    def _prototype(self, shape: tuple[int, ...], kind: str) -> Blueprint:
        if kind not in self.library:
            raise ValueError(f"blueprint kind {kind!r} is not in the library {self.library}")
        prototype = BLUEPRINTS[kind]()
        reason = prototype.unsupported_reason(shape)
        if reason is not None:
            raise ValueError(reason)
        return prototype

    def _with_size(self, prototype: Blueprint, size: int) -> Blueprint:
        return dataclasses.replace(prototype, **{prototype.size_field: size})

    def propose(
        self,
        shape: Sequence[int],
        kind: str,
        param_budget: int | None = None,
        context: ProposalContext | None = None,
    ) -> Blueprint:
        """The `kind` blueprint for a slot of `shape`, as large as `param_budget` allows.

        With no budget, the template's default size. ValueError if `kind` is not in the library,
        cannot serve `shape`, or even its smallest size exceeds the budget.
        """
        shape = tuple(int(s) for s in shape)
        prototype = self._prototype(shape, kind)
        if param_budget is None:
            return prototype
        blueprint = prototype
        if prototype.size_field is not None:
            sizes = self.fitting_sizes(shape, prototype, param_budget)
            if len(sizes) == 0:
                sizes = prototype.sizes(shape)[:1]  # none fits: the smallest, refused below
            if len(sizes) == 0:
                raise ValueError(f"{kind} has no valid {prototype.size_field} for shape {shape}")
            blueprint = self._with_size(prototype, sizes[-1])
        needed = blueprint.param_count(shape)
        if needed > param_budget:
            raise ValueError(
                f"{kind} for slot shape {shape} needs at least {needed} parameters; the budget "
                f"is {param_budget}"
            )
        return blueprint

    def fitting_sizes(
        self, shape: tuple[int, ...], prototype: Blueprint, param_budget: int | None
    ) -> Sequence[int]:
        """The values of `prototype.size_field` whose param_count fits `param_budget`
        (increasing; the other hyper-parameters as in `prototype`)."""
        sizes = prototype.sizes(shape)
        if param_budget is None:
            return sizes
        # param_count increases with the size, so binary-search how many sizes fit.
        lo, hi = 0, len(sizes)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._with_size(prototype, sizes[mid]).param_count(shape) <= param_budget:
                lo = mid + 1
            else:
                hi = mid
        return sizes[:lo]

    def fits(self, shape: Sequence[int], kind: str, param_budget: int | None) -> bool:
        """Whether `propose(shape, kind, param_budget)` would succeed; never raises, cached."""
        shape = tuple(int(s) for s in shape)
        key = (shape, kind)
        if key not in self._smallest:
            try:
                prototype = self._prototype(shape, kind)
            except ValueError:
                self._smallest[key] = None
            else:
                sizes = prototype.sizes(shape) if prototype.size_field is not None else None
                if sizes is None:
                    self._smallest[key] = prototype.param_count(shape)
                elif len(sizes) > 0:
                    self._smallest[key] = self._with_size(prototype, sizes[0]).param_count(shape)
                else:
                    self._smallest[key] = None
        smallest = self._smallest[key]
        return smallest is not None and (param_budget is None or smallest <= param_budget)
