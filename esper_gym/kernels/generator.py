"""BlueprintGenerator: picks a template for a slot and sizes it to a parameter budget.

The env only calls `propose(shape, kind, param_budget)` and `fits(shape, kind, param_budget)`,
so any object with those two methods can replace this template-based generator (a learned or
search-based one, say).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from esper_gym.kernels.blueprints import BLUEPRINTS, DEFAULT_LIBRARY, Blueprint


class BlueprintGenerator:
    """Template-based: `kind` names a template; its size hyper-parameter (`size_field`: width,
    rank, hidden, ...) is set to the largest value whose exact param_count fits the budget."""

    def __init__(self, library: Sequence[str] = DEFAULT_LIBRARY):
        unknown = [kind for kind in library if kind not in BLUEPRINTS]
        if unknown:
            raise ValueError(f"unknown blueprint kinds {unknown}; known: {sorted(BLUEPRINTS)}")
        self.library = tuple(library)
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
        self, shape: Sequence[int], kind: str, param_budget: int | None = None
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
            sizes = prototype.sizes(shape)
            if len(sizes) == 0:
                raise ValueError(f"{kind} has no valid {prototype.size_field} for shape {shape}")
            # param_count increases with the size, so binary-search how many sizes fit.
            lo, hi = 0, len(sizes)
            while lo < hi:
                mid = (lo + hi) // 2
                if self._with_size(prototype, sizes[mid]).param_count(shape) <= param_budget:
                    lo = mid + 1
                else:
                    hi = mid
            blueprint = self._with_size(prototype, sizes[max(lo - 1, 0)])
        needed = blueprint.param_count(shape)
        if needed > param_budget:
            raise ValueError(
                f"{kind} for slot shape {shape} needs at least {needed} parameters; the budget "
                f"is {param_budget}"
            )
        return blueprint

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
