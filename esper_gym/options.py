"""What `MorphogeneticEnv.reset(options=...)` accepts: `grow` (start with every slot grown, the
ceiling of the task tables) and `context` (play context i of the env's split). Checked before
any work, so that a typo fails fast with the value and what is allowed."""

from __future__ import annotations

import numpy as np

RESET_OPTIONS = ("grow", "context")


def context_option(options, space, split) -> int | None:
    """The context index of `reset(options={"context": i})`, None without it."""
    if not isinstance(options, dict) or options.get("context") is None:
        return None
    index = options["context"]
    if space is None:
        raise ValueError("reset option context needs an env made with contexts='train'/'test'")
    n = len(space.contexts(split))
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise ValueError(f"reset option context={index!r} must be an int in [0, {n - 1}]")
    return int(index)


def grow_option(options, blueprints: tuple[str, ...]) -> tuple[str, ...]:
    """The blueprint names of `reset(options={"grow": ...})` (a name or a list of names), ()
    without it; anything else is refused with the value and what is allowed."""
    if options is None:
        return ()
    if not isinstance(options, dict):
        raise TypeError(f"reset options={options!r} must be a dict or None")
    unknown = sorted(set(options) - set(RESET_OPTIONS))
    if unknown:
        raise ValueError(f"unknown reset option(s) {unknown}; allowed: {list(RESET_OPTIONS)}")
    grow = options.get("grow")
    if grow is None:
        return ()
    names = (grow,) if isinstance(grow, str) else grow
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"reset option grow={grow!r} must be a blueprint name or a list of names, "
            f"from {list(blueprints)}"
        )
    unknown = [n for n in names if n not in blueprints]
    if unknown:
        raise ValueError(f"grow={unknown}: not in this task's blueprints {list(blueprints)}")
    return tuple(names)
