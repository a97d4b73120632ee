"""Schema dataclasses mirrored from the package's own dataclasses (Task, RewardWeights,
PPOConfig): each field's type made checkable by OmegaConf, its default kept, so that a default
lives in one place."""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from dataclasses import field
from typing import Any


def _conf_type(tp: Any) -> Any:
    """The closest annotation OmegaConf can check for a dataclass field's type: tuples become
    lists, mappings `dict[str, Any]`, a union keeps `str` if it has it (`str | Callable` is a
    name in a config file) or its one other member, and anything else is `Any`."""
    if tp in (int, float, str, bool):
        return tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        inner = str if str in members else _conf_type(members[0]) if len(members) == 1 else Any
        return inner | None if len(members) < len(args) else inner
    if origin in (list, tuple, collections.abc.Sequence):
        return list[_conf_type(args[0]) if args else Any]
    if origin in (dict, collections.abc.Mapping):
        return dict[str, Any]
    return Any


def _mirror(
    cls: type, name: str, *, head: list, exclude=(), all_optional=False, module=None
) -> type:
    """A schema dataclass with `head` fields, then every field of `cls` but `exclude` with its
    type made checkable (`_conf_type`) and its default; a dataclass-typed field gets its own
    mirror (`...Config` -> `...Conf`). `all_optional`: no defaults of `cls`, every field
    `... | None = None` ("keep the registered value"), except that a mapping is `Any = None`:
    OmegaConf can put a dict (`task.host_kwargs={hidden:[64,64]}`) into an `Any` None node but
    not into a None `Dict` one. `module`: where the class is a global (pickled by reference)."""
    hints = typing.get_type_hints(cls)
    out = list(head)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and not all_optional:
            sub = _mirror(hint, hint.__name__.replace("Config", "Conf"), head=[], module=module)
            out.append((f.name, sub, field(default_factory=sub)))
            continue
        tp = _conf_type(hint)
        if all_optional and tp == dict[str, Any]:
            out.append((f.name, Any, field(default=None)))
        elif all_optional:
            out.append((f.name, tp | None, field(default=None)))
        elif f.default_factory is not dataclasses.MISSING:
            out.append((f.name, tp, field(default_factory=f.default_factory)))
        else:
            out.append((f.name, tp, field(default=f.default)))
    schema = dataclasses.make_dataclass(name, out)
    if module is not None:
        schema.__module__ = module
    return schema
