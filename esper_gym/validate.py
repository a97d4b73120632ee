"""Replayable, checkable episodes: what `esper_gym.evaluate` records and how it is checked.

```bash
python -m esper_gym.validate outputs/<run>/replays.json          # replay every episode on CPU
python -m esper_gym.validate replays.json --device cuda          # GPU: within GPU_TOLERANCE
```

`evaluate` writes `replays.json` beside `episodes.csv`: for every episode its env id, the env
kwargs it was built with (Task fields, reward weights, context split), the context index, the
seed, every action taken, the reported return and test accuracy, and the torch thread count
(CPU reductions depend on it). An episode is a pure function of (env, seed, actions), so
replaying the actions must give the reported numbers back: exactly
on CPU (same floats, bit for bit), and within `GPU_TOLERANCE` on CUDA, where kernels are not
bitwise deterministic. Any policy's result can be checked this way without its code or weights:
what CompilerGym's `validate` gives a leaderboard.

The file is untrusted input. It is read with `json` only (never pickle), and every field is
checked for type and range before anything runs; env kwargs may only name Task fields of
`ALLOWED_TASK_FIELDS` (no paths, no device: the machine that replays chooses those). A malformed
or tampered file is refused with a `ReplayError` naming the episode and the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

FORMAT = "esper-gym-replays"
VERSION = 1
FILE_NAME = "replays.json"
# Task fields a replay file may set. Left out: `name` (the env id says the task), `data_dir`
# and `device` (where data lives and what runs it are the replaying machine's choice, never the
# file's), `val_size` (deprecated alias), `dataset`/`host` callables (JSON cannot hold them).
EXCLUDED_TASK_FIELDS = frozenset({"name", "data_dir", "device", "val_size"})
# Inside dataset_kwargs / host_kwargs: no key that names a place on disk or the network.
FORBIDDEN_KEY_PARTS = ("dir", "path", "root", "file", "url", "download")
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
}
MAX_EPISODES = 100_000
MAX_ACTIONS = 100_000
# Replays on CUDA: cuBLAS/cuDNN reductions are not bitwise reproducible, so a CUDA replay
# passes within these (absolute) bounds; on CPU the check is exact (tolerance 0). Not yet
# measured on a GPU: a bound chosen as one eval sample of accuracy on a 1024-sample eval set
# (~1e-3, times the accuracy weight 10 in the return).
GPU_TOLERANCE = {"return": 1e-2, "test_acc": 1e-3}


class ReplayError(ValueError):
    """A replay file that is malformed, or whose numbers the replay does not reproduce."""


def allowed_task_fields() -> frozenset[str]:
    from esper_gym.tasks import Task

    return frozenset(f.name for f in dataclasses.fields(Task)) - EXCLUDED_TASK_FIELDS


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
) -> dict[str, Any]:
    """One episode as it goes into the replay file (JSON-ready)."""
    fields = {k: _jsonable(v) for k, v in overrides.items() if k not in EXCLUDED_TASK_FIELDS}
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


def load(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The episodes of a replay file, every field checked (`ReplayError` otherwise)."""
    try:
        doc = json.loads(pathlib.Path(path).read_text(), parse_constant=_no_constants)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReplayError(f"{path}: not a readable JSON replay file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ReplayError(f'{path}: not a replay file (needs "format": {FORMAT!r})')
    if doc.get("version") != VERSION:
        raise ReplayError(f"{path}: version {doc.get('version')!r}; this reader knows {VERSION}")
    episodes = doc.get("episodes")
    if not isinstance(episodes, list) or not 0 < len(episodes) <= MAX_EPISODES:
        raise ReplayError(f'{path}: "episodes" must be a list of 1..{MAX_EPISODES} episodes')
    for i, ep in enumerate(episodes):
        check_episode(i, ep)
    return episodes


def _no_constants(name: str):
    raise ReplayError(f"{name} is not a number a replay file may hold")


def _where(i: int, ep: Any) -> str:
    if isinstance(ep, dict) and isinstance(ep.get("agent"), str) and _is_int(ep.get("seed")):
        return f"episode {i} ({ep['agent']}, {ep.get('task')}, seed {ep['seed']})"
    return f"episode {i}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_episode(i: int, ep: Any) -> None:
    """Types and ranges of one episode's fields; `ReplayError` naming the episode and field."""
    from esper_gym import ENV_IDS

    where = _where(i, ep)

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
    if ep["env_id"] not in ENV_IDS:
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
    _check_env_kwargs(where, ep["env_kwargs"])


def _check_env_kwargs(where: str, kwargs: Any) -> None:
    if not isinstance(kwargs, dict):
        raise ReplayError(f"{where}: field 'env_kwargs' must be an object")
    allowed = allowed_task_fields()
    for key, value in kwargs.items():
        field = f"env_kwargs.{key}"
        if key == "contexts":
            if value not in ("train", "test"):
                raise ReplayError(f"{where}: field {field!r} = {value!r}; allowed: train, test")
        elif key == "reward_weights":
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and _is_num(v) for k, v in value.items()
            ):
                raise ReplayError(f"{where}: field {field!r} must map names to finite numbers")
        elif key not in allowed:
            raise ReplayError(
                f"{where}: field {field!r} is not allowed; allowed: contexts, reward_weights, "
                f"{', '.join(sorted(allowed))}"
            )
        else:
            _check_plain(where, field, value)


def _check_plain(where: str, field: str, value: Any, depth: int = 0) -> None:
    """A Task field's value: JSON scalars, lists and objects of them, no path-like keys."""
    if depth > 3:
        raise ReplayError(f"{where}: field {field!r} is nested too deeply")
    if value is None or isinstance(value, bool | str) or _is_num(value):
        return
    if isinstance(value, list):
        for j, v in enumerate(value):
            _check_plain(where, f"{field}[{j}]", v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if any(part in k.lower() for part in FORBIDDEN_KEY_PARTS):
                raise ReplayError(
                    f"{where}: field {field + '.' + k!r} names a place on disk or the network; "
                    "a replay file may not set it"
                )
            _check_plain(where, f"{field}.{k}", v, depth + 1)
        return
    raise ReplayError(f"{where}: field {field!r} = {value!r} is not a plain JSON value")


# ------------------------------------------------------------------------------ replaying


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples Task fields hold (hidden sizes, blueprint libraries)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def replay(
    i: int, ep: Mapping[str, Any], kernel_dir: str | None = None, device: str = "cpu"
) -> dict[str, float]:
    """Play `ep`'s actions from its seed; `ReplayError` if they do not reproduce its numbers."""
    import gymnasium as gym
    import torch

    where = _where(i, ep)
    threads = torch.get_num_threads()
    if ep["threads"] is not None:
        torch.set_num_threads(ep["threads"])
    kwargs = {k: _tuples(v) for k, v in ep["env_kwargs"].items()}
    try:
        env = gym.make(
            ep["env_id"], disable_env_checker=True, kernel_dir=kernel_dir, device=device, **kwargs
        )
    except (TypeError, ValueError, KeyError) as e:
        raise ReplayError(f"{where}: field 'env_kwargs' does not build the env: {e}") from None
    try:
        _, info = env.reset(seed=ep["seed"])
        index = info["context"]["index"] if info.get("context") else -1
        if index != ep["context_index"]:
            raise ReplayError(
                f"{where}: field 'context_index' = {ep['context_index']} but seed "
                f"{ep['seed']} draws context {index}"
            )
        n = env.action_space.n
        total, done, steps = 0.0, False, 0
        for j, action in enumerate(ep["actions"]):
            if done:
                raise ReplayError(
                    f"{where}: field 'actions' has {len(ep['actions'])} actions but the episode "
                    f"ended after {steps}"
                )
            if action >= n:
                raise ReplayError(
                    f"{where}: field 'actions'[{j}] = {action} is not an action of "
                    f"{ep['env_id']} (0..{n - 1})"
                )
            _, reward, terminated, truncated, info = env.step(action)
            total += reward
            steps += 1
            done = terminated or truncated
        if not done:
            raise ReplayError(
                f"{where}: field 'actions' ends after {steps} actions but the episode goes on"
            )
    finally:
        env.close()
        torch.set_num_threads(threads)
    got = {"return": total, "test_acc": float(info.get("test_acc", math.nan))}
    tol = GPU_TOLERANCE if device != "cpu" else {"return": 0.0, "test_acc": 0.0}
    for name in ("return", "test_acc"):
        if not abs(got[name] - ep[name]) <= tol[name]:
            raise ReplayError(
                f"{where}: field {name!r} = {ep[name]!r} but the replay gives {got[name]!r} "
                f"(tolerance {tol[name]} on {device})"
            )
    return got


def validate(
    path: str | os.PathLike, kernel_dir: str | None = None, device: str = "cpu", progress=None
) -> int:
    """Load and replay every episode of `path`; the number checked, or `ReplayError`."""
    episodes = load(path)
    for i, ep in enumerate(episodes):
        replay(i, ep, kernel_dir, device)
        if progress:
            progress(f"ok {_where(i, ep)}")
    return len(episodes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m esper_gym.validate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("file", help=f"a {FILE_NAME} written by esper_gym.evaluate")
    parser.add_argument("--device", default="cpu", help="cpu: exact; cuda: within tolerance")
    parser.add_argument("--kernel-dir", default=None, help="kernel store (default: the env's)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        n = validate(args.file, args.kernel_dir, args.device, None if args.quiet else print)
    except ReplayError as e:
        print(f"REFUSED: {e}", file=sys.stderr)
        return 1
    print(f"{n} episodes of {args.file} replayed: return and test accuracy reproduced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
