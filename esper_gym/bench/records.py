"""The replay file (`replays.json`): what `esper_gym.evaluate` records of every episode, and
how a file is read and checked before anything is replayed (`esper_gym.bench.replay`).

The file is untrusted input: data, never code.
- It is read only when it is a regular file of at most `MAX_FILE_BYTES` (no FIFO, device or
  symlink to one), with `json` only (never pickle).
- Every field is checked for type and range before anything runs. `env_kwargs` may set only
  the Task fields of `TASK_FIELDS`, each typed and bounded; `dataset` and `host` must be
  registered names (never an import path), and their kwargs pass per-loader allow-lists
  (`DATASET_KWARGS`, `HOST_KWARGS`). No path, no device: the replaying machine chooses those.
- An episode must be its env id's registered task: the same task label, no Task override, the
  registered reward weights. Anything else is a custom task and is replayed only with
  `--custom`, then reported as such ("CUSTOM"), so a relabelled easier task cannot pass.
- Replays compile kernels into a throwaway store (removed afterwards) unless `--kernel-dir` is
  given: a file's actions never write to the store Karn learns from.
- Every episode is checked and reported; a malformed or tampered one is refused with a
  `ReplayError` naming the episode and the field, any other failure with one line naming the
  episode and the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import stat
from collections.abc import Mapping, Sequence
from typing import Any

from esper_gym import numerics

FORMAT = "esper-gym-replays"
VERSION = 2
READ_VERSIONS = (1, 2)  # format 1 has no `numerics`: read as unknown (None)
FILE_NAME = "replays.json"
# Largest replay file read: the committed ones are ~200 KB; 100,000 long episodes fit.
MAX_FILE_BYTES = 256 << 20


def _count(lo: int, hi: int):
    def check(v: Any) -> str | None:
        return None if _is_int(v) and lo <= v <= hi else f"must be an integer in [{lo}, {hi}]"

    return check


def _amount(lo: float, hi: float, *, open_lo: bool = False):
    def check(v: Any) -> str | None:
        ok = _is_num(v) and (lo < v if open_lo else lo <= v) and v <= hi
        return None if ok else f"must be a number in {'(' if open_lo else '['}{lo}, {hi}]"

    return check


def _choice(*allowed: str):
    def check(v: Any) -> str | None:
        return None if isinstance(v, str) and v in allowed else f"allowed: {', '.join(allowed)}"

    return check


def _sizes(hi: int, max_len: int):
    def check(v: Any) -> str | None:
        ok = isinstance(v, list) and 1 <= len(v) <= max_len
        if ok and all(_is_int(x) and 1 <= x <= hi for x in v):
            return None
        return f"must be a list of 1..{max_len} integers in [1, {hi}]"

    return check


def _optional(check):
    return lambda v: None if v is None else check(v)


def _blueprint_names(v: Any) -> str | None:
    from esper_gym.kernels.blueprints import BLUEPRINTS

    names = isinstance(v, list) and 1 <= len(v) <= 32
    if names and all(isinstance(b, str) and b in BLUEPRINTS for b in v):
        return None
    return f"must be a list of 1..32 registered blueprints ({', '.join(BLUEPRINTS)})"


# Keyword arguments each registered dataset loader / host builder may get from a file. Sizes
# are bounded so that no value allocates gigabytes; `download` and paths are never allowed.
# Every dataset also takes the shift of esper_gym.data.SHIFT_KWARGS (`SHIFT`).
SHIFT = {
    "classes": _count(2, 100),
    "label_noise": _amount(0, 1),
    "input_noise": _amount(0, 10),
    "shift_seed": _count(0, 2**31 - 1),
}
DATASET_KWARGS = {
    "spirals": {
        "n_train": _count(1, 100_000),
        "n_val": _count(0, 100_000),
        "n_test": _count(0, 100_000),
        "arms": _count(2, 64),
        "noise": _amount(0, 10),
        "turns": _amount(0, 100, open_lo=True),
        "seed": _count(0, 2**31 - 1),
        **SHIFT,
    },
    "fashion_mnist": {"val_size": _count(0, 59_999), **SHIFT},
    "cifar10": {"val_size": _count(0, 49_999), **SHIFT},
}
HOST_KWARGS = {
    "mlp": {"hidden": _sizes(1024, 4), "activation": _choice("relu", "none")},
    "cnn": {"channels": _sizes(256, 4), "downsample": _choice("stride", "pool")},
    "resnet": {"channels": _sizes(128, 4), "blocks": _count(1, 4)},
}
# The Task fields a replay file may set, each with its check. Left out: `name` (the env id
# says the task), `data_dir` and `device` (the replaying machine's choice, never the file's).
# `dataset`/`host` name registered entries only: an import
# path in a file would be code the file chooses to run.
TASK_FIELDS = {
    "dataset": _choice(*DATASET_KWARGS),
    "dataset_kwargs": None,  # checked against the episode's dataset (DATASET_KWARGS)
    "host": _choice(*HOST_KWARGS),
    "host_kwargs": None,  # checked against the episode's host (HOST_KWARGS)
    "optimizer": _choice("adam", "sgd"),
    "lr": _amount(0, 10, open_lo=True),
    "weight_decay": _amount(0, 1),
    "batch_size": _count(1, 4096),
    "decision_interval": _count(1, 10_000),
    "max_epochs": _amount(0, 100, open_lo=True),
    "eval_size": _count(1, 100_000),
    "contribution_size": _count(1, 100_000),
    "seed_slots": _count(1, 8),
    "param_budget": _count(1, 1_000_000),
    "blueprints": _blueprint_names,
    "max_nodes": _count(1, 64),
    "seed_lr": _amount(0, 10, open_lo=True),
    "blend_steps": _count(1, 100_000),
    "blend_schedule": _choice("linear", "cosine"),
    "embargo_steps": _count(1, 100_000),
    "max_faults": _count(1, 1000),
    "latency_budget_ms": _optional(_amount(0, 100_000, open_lo=True)),
}
MAX_REWARD_WEIGHT = 1e4
# Training work of one replayed episode (optimizer steps x batch x host multiply-adds x 3 for
# forward and backward): the registered CIFAR-10 task needs ~1e12; ten times that is allowed.
MAX_WORK = 1e13
EPISODE_FIELDS = {  # field -> what it must be
    "agent": "a string",
    "task": "a string",
    "env_id": "a registered Esper/* env id",
    "env_kwargs": "an object of Task fields, reward_weights and contexts",
    "context_index": "an integer >= -1",
    "seed": "an integer in [0, 2**63)",
    "actions": "a list of integers",
    "return": "a finite number",
    "test_acc": "a number in [0, 1]",
    "threads": "null or an integer in [1, 1024]",
    "numerics": "null (unknown) or an object {mode, torch, capability, arch, cpu, threads}",
}
MAX_EPISODES = 100_000
MAX_ACTIONS = 100_000


class ReplayError(ValueError):
    """A replay file that is malformed, or whose numbers the replay does not reproduce."""


# Task fields a record leaves out: where data lives and what runs it are the replaying machine's.
_NOT_RECORDED = frozenset({"name", "data_dir", "device"})


# ------------------------------------------------------------------------------ writing


def env_id_of(base_task: str) -> str | None:
    """The registered env id of a registered task name (None if it has none)."""
    from esper_gym import ENV_IDS

    return next((i for i, (task, _) in ENV_IDS.items() if task == base_task), None)


def record(
    *,
    agent: str,
    task: str,
    base_task: str,
    overrides: Mapping[str, Any],
    reward_weights: Mapping[str, float] | None,
    contexts: str | None,
    context_index: int,
    seed: int,
    actions: Sequence[int],
    episode_return: float,
    test_acc: float,
    threads: int | None,
    numerics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One episode as it goes into the replay file (JSON-ready); `numerics`: `numerics.current()`
    of the process that played it."""
    fields = {k: _jsonable(v) for k, v in overrides.items() if k not in _NOT_RECORDED}
    kwargs: dict[str, Any] = dict(fields)
    if reward_weights:
        kwargs["reward_weights"] = {k: float(v) for k, v in reward_weights.items()}
    if contexts is not None:
        kwargs["contexts"] = contexts
    return {
        "agent": agent,
        "task": task,
        "env_id": env_id_of(base_task),
        "env_kwargs": kwargs,
        "context_index": int(context_index),
        "seed": int(seed),
        "actions": [int(a) for a in actions],
        "return": float(episode_return),
        "test_acc": float(test_acc),
        # CPU float reductions depend on the thread count: the replay runs with the same.
        "threads": threads,
        "numerics": dict(numerics) if numerics is not None else None,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def write(path: str | os.PathLike, episodes: Sequence[Mapping[str, Any]]) -> pathlib.Path:
    p = pathlib.Path(path)
    doc = {"format": FORMAT, "version": VERSION, "episodes": list(episodes)}
    # allow_nan=False: a NaN return would not be valid JSON and could never be checked.
    p.write_text(json.dumps(doc, allow_nan=False, indent=1))
    return p


# ------------------------------------------------------------------------------ reading


def read_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes` (`ReplayError`
    otherwise). O_NONBLOCK: opening a FIFO must not wait for a writer; the type and size are
    read from the open file, so a symlink to /dev/zero is refused, not read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ReplayError(f"{path}: cannot open ({e.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ReplayError(f"{path}: not a regular file")
        raise ReplayError(f"{path}: {info.st_size} bytes; a replay file is at most {max_bytes}")
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ReplayError(f"{path}: grew past {max_bytes} bytes while read")
    return data


def load(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The episodes of a replay file, every field checked (`ReplayError` otherwise)."""
    episodes = read_episodes(path)
    for i, ep in enumerate(episodes):
        check_episode(i, ep)
    return episodes


def read_episodes(path: str | os.PathLike) -> list:
    """The file's episode list, its envelope checked (episodes are checked one by one)."""
    data = read_file(path)
    try:
        doc = json.loads(data.decode(), parse_constant=_no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ReplayError(f"{path}: not a readable JSON replay file ({reason})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ReplayError(f'{path}: not a replay file (needs "format": {FORMAT!r})')
    version = doc.get("version")
    if not _is_int(version) or version not in READ_VERSIONS:
        raise ReplayError(f"{path}: version {repr(version)[:9]}; this reader knows {READ_VERSIONS}")
    episodes = doc.get("episodes")
    if not isinstance(episodes, list) or not 0 < len(episodes) <= MAX_EPISODES:
        raise ReplayError(f'{path}: "episodes" must be a list of 1..{MAX_EPISODES} episodes')
    for ep in (e for e in episodes if version == 1 and isinstance(e, dict)):
        ep.setdefault("numerics", None)  # format 1 predates `numerics`: unknown
    return episodes


def _no_constants(name: str):
    raise ReplayError(f"{name} is not a number a replay file may hold")


def episode_label(i: int, ep: Any) -> str:
    if isinstance(ep, dict) and isinstance(ep.get("agent"), str) and _is_int(ep.get("seed")):
        return f"episode {i} ({ep['agent'][:40]}, {str(ep.get('task'))[:40]}, seed {ep['seed']})"
    return f"episode {i}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_episode(i: int, ep: Any) -> None:
    """Types and ranges of one episode's fields; `ReplayError` naming the episode and field."""
    from esper_gym import ENV_IDS

    where = episode_label(i, ep)

    def bad(name: str, why: str = "") -> ReplayError:
        got = repr(ep.get(name))[:80] if isinstance(ep, dict) else "?"
        return ReplayError(
            f"{where}: field {name!r} = {got} {why or 'must be ' + EPISODE_FIELDS[name]}"
        )

    if not isinstance(ep, dict):
        raise ReplayError(f"{where}: must be an object with fields {sorted(EPISODE_FIELDS)}")
    missing = sorted(set(EPISODE_FIELDS) - set(ep))
    extra = sorted(set(ep) - set(EPISODE_FIELDS))
    if missing or extra:
        raise ReplayError(f"{where}: missing fields {missing}, unknown fields {extra}")
    for name in ("agent", "task"):
        if not isinstance(ep[name], str):
            raise bad(name)
    if not isinstance(ep["env_id"], str) or ep["env_id"] not in ENV_IDS:
        raise bad("env_id", f"is not a registered env id; known: {', '.join(ENV_IDS)}")
    if not _is_int(ep["context_index"]) or ep["context_index"] < -1:
        raise bad("context_index")
    if not _is_int(ep["seed"]) or not 0 <= ep["seed"] < 2**63:
        raise bad("seed")
    actions = ep["actions"]
    if not isinstance(actions, list) or not 0 < len(actions) <= MAX_ACTIONS:
        raise bad("actions", f"must be a list of 1..{MAX_ACTIONS} integers")
    for j, a in enumerate(actions):
        if not _is_int(a) or a < 0:
            raise ReplayError(f"{where}: field 'actions'[{j}] = {a!r} must be an integer >= 0")
    if not _is_num(ep["return"]):
        raise bad("return")
    if not _is_num(ep["test_acc"]) or not 0 <= ep["test_acc"] <= 1:
        raise bad("test_acc")
    if ep["threads"] is not None and (not _is_int(ep["threads"]) or not 1 <= ep["threads"] <= 1024):
        raise bad("threads")
    if (why := numerics.check_record(ep["numerics"])) is not None:
        raise ReplayError(f"{where}: field {why}")
    _check_env_kwargs(where, ep["env_kwargs"], ep["env_id"])


def _check_env_kwargs(where: str, kwargs: Any, env_id: str) -> None:
    from esper_gym import ENV_IDS
    from esper_gym.reward import RewardWeights
    from esper_gym.tasks import TASKS

    if not isinstance(kwargs, dict):
        raise ReplayError(f"{where}: field 'env_kwargs' must be an object")

    def bad(field: str, value: Any, why: str) -> ReplayError:
        return ReplayError(f"{where}: field {field!r} = {repr(value)[:80]} {why}")

    for key, value in kwargs.items():
        field = f"env_kwargs.{key}"
        if key == "contexts":
            if value not in ("train", "test"):
                raise bad(field, value, "is not allowed; allowed: train, test")
        elif key == "reward_weights":
            weights = {f.name for f in dataclasses.fields(RewardWeights)}
            if not isinstance(value, dict):
                raise bad(field, value, "must map reward weight names to numbers")
            for name, w in value.items():
                if name not in weights:
                    raise bad(f"{field}.{name}", w, f"is not a weight; allowed: {sorted(weights)}")
                if not _is_num(w) or not 0 <= w <= MAX_REWARD_WEIGHT:
                    raise bad(f"{field}.{name}", w, f"must be a number in [0, {MAX_REWARD_WEIGHT}]")
        elif key not in TASK_FIELDS:
            raise ReplayError(
                f"{where}: field {field!r} is not allowed; allowed: contexts, reward_weights, "
                f"{', '.join(TASK_FIELDS)}"
            )
        elif TASK_FIELDS[key] is not None and (why := TASK_FIELDS[key](value)) is not None:
            raise bad(field, value, why)
    for key, table, chosen in (
        ("dataset_kwargs", DATASET_KWARGS, "dataset"),
        ("host_kwargs", HOST_KWARGS, "host"),
    ):
        if key not in kwargs:
            continue
        value = kwargs[key]
        name = kwargs.get(chosen, getattr(TASKS[ENV_IDS[env_id][0]], chosen))
        allowed = table.get(name, {}) if isinstance(name, str) else {}
        if not isinstance(value, dict):
            raise bad(f"env_kwargs.{key}", value, "must be an object")
        for k, v in value.items():
            if k not in allowed:
                raise ReplayError(
                    f"{where}: field 'env_kwargs.{key}.{str(k)[:40]}' is not allowed for "
                    f"{chosen} {name!r}; allowed: {', '.join(allowed) or 'none'}"
                )
            if (why := allowed[k](v)) is not None:
                raise bad(f"env_kwargs.{key}.{k}", v, why)


def differences(ep: Mapping[str, Any]) -> list[str]:
    """How `ep` differs from its env id's registered task: its label, Task overrides and reward
    weights, as "name=value (registered value)" strings. Empty for a registered-task episode."""
    from esper_gym import ENV_IDS
    from esper_gym.reward import resolve_weights
    from esper_gym.tasks import TASKS

    name = ENV_IDS[ep["env_id"]][0]
    task = TASKS[name]
    diffs = [] if ep["task"] == name else [f"task label {ep['task']!r} ({name!r})"]
    for key, value in ep["env_kwargs"].items():
        if key == "reward_weights":
            registered = dataclasses.asdict(resolve_weights(task.reward_weights))
            diffs += [
                f"reward_weights.{k}={w!r} ({registered[k]!r})"
                for k, w in value.items()
                if w != registered[k]
            ]
        elif key != "contexts" and tuples(value) != getattr(task, key):
            diffs.append(f"{key}={value!r} ({_jsonable(getattr(task, key))!r})")
    return diffs


def tuples(value: Any) -> Any:
    """JSON lists back to the tuples Task fields hold (hidden sizes, blueprint libraries)."""
    if isinstance(value, list):
        return tuple(tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: tuples(v) for k, v in value.items()}
    return value
