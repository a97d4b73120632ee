"""Tamiyo's checkpoints: `save_checkpoint` writes one (atomically), `load_checkpoint` rebuilds
the policy from one, refusing with a one-line `CheckpointError` anything but what
`save_checkpoint` writes.

A checkpoint may come from a shared folder, so nothing in it is trusted: the checks below
(`read_checkpoint`, `zip_members`, `torch_load_checked`, `check_table`, `check_tensors`,
`check_adam_state`, `check_env_entry`) run before anything in it is built, and the SB3 agents'
loader (esper_gym.agents.sb3) uses them too.
"""

from __future__ import annotations

import io
import math
import os
import re
import reprlib
import stat
import zipfile
from dataclasses import asdict, dataclass, field

import gymnasium as gym
import torch

from esper_gym.agents.records import env_record
from esper_gym.agents.tamiyo.config import PPOConfig
from esper_gym.agents.tamiyo.policy import TamiyoPolicy, space_kwargs

_REPR = reprlib.Repr()  # short reprs of hostile values in error messages (see _show)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 4, 4


@dataclass
class Checkpoint:
    policy: TamiyoPolicy
    optimizer_state: dict | None
    global_step: int
    config: dict
    torch_rng: torch.Tensor | None
    env: dict = field(default_factory=dict)  # env_record() of the env it was trained on


def save_checkpoint(
    path: str | os.PathLike,
    policy: TamiyoPolicy,
    optimizer: torch.optim.Optimizer | None,
    global_step: int,
    config: PPOConfig | dict | None,
    env: dict | None = None,
) -> None:
    """Write everything a resumed run needs; atomic, so a crash never leaves half a file.
    `env`: the `env_record` of the env it was trained on (checked on resume and evaluation)."""
    state = {
        "policy_kwargs": policy.init_kwargs,
        "policy": policy.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "global_step": int(global_step),
        "config": asdict(config) if isinstance(config, PPOConfig) else dict(config or {}),
        "torch_rng": torch.get_rng_state(),
        "env": dict(env or {}),
    }
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | os.PathLike, map_location: str = "cpu", *, env: gym.Env | None = None
) -> Checkpoint:
    """Rebuild the policy from a checkpoint, refusing (CheckpointError, one line naming the
    file, the key and what is allowed) anything but what `save_checkpoint` writes.

    A checkpoint may come from a shared folder, so nothing in it is trusted: the file must be
    a regular file of at most MAX_CHECKPOINT_BYTES and a complete zip; torch.load runs with
    weights_only (tensors and plain values: no code); every entry is checked against
    CHECKPOINT_KEYS and every policy_kwargs value against POLICY_KWARGS *before* the policy is
    built (a checkpoint sizes the network: layers=2_000_000 would build for a minute). With
    `env` the sizes must also fit its observation and action spaces. Then the weights must
    have exactly the shapes the policy has, and the optimizer state those of its parameters.
    """
    state = torch_load_checked(path, read_checkpoint(path), map_location)
    current = env_record(env) if env is not None else {}
    _check_state(path, state, current)
    kwargs = state["policy_kwargs"]
    if env is not None:
        need = space_kwargs(env.observation_space)
        for key, value in need.items():
            if kwargs[key] != value:
                raise CheckpointError(
                    f"checkpoint {path}: policy_kwargs.{key}={kwargs[key]!r} does not fit this "
                    f"env, which needs {value} (seed_slots and the blueprint library must match "
                    "those it was trained with)"
                )
    policy = TamiyoPolicy(**kwargs)
    check_tensors(path, "policy", state["policy"], policy.state_dict())
    policy.load_state_dict(state["policy"])
    if state["optimizer"] is not None:
        check_adam_state(path, "optimizer", state["optimizer"], list(policy.parameters()))
    return Checkpoint(
        policy=policy,
        optimizer_state=state["optimizer"],
        global_step=state["global_step"],
        config=state["config"],
        torch_rng=state["torch_rng"],
        env=state.get("env") or {},
    )


# -- what a checkpoint may hold ---------------------------------------------------------------

MAX_CHECKPOINT_BYTES = 256 << 20  # a real one is under 1 MiB; generous, but read in one go
# The pickle of a torch checkpoint only describes the tensors (their bytes are separate zip
# members): 22 KB for a committed one. weights_only's unpickler is pure Python, so a
# 256 MiB pickle of tiny objects would take minutes and GBs; 1 MiB takes well under a second.
MAX_PICKLE_BYTES = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint refused before anything in it is built or run; the message is one line."""


def _show(value) -> str:
    """A short repr for an error message (never the whole of a hostile value)."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {value.dtype}"
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0][:200]


def read_checkpoint(path: str | os.PathLike) -> bytes:
    """The bytes of the checkpoint file at `path`, read once: a regular file (not a directory,
    FIFO or device, which could block or never end) of at most MAX_CHECKPOINT_BYTES."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot open it ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(
                f"checkpoint {path}: not a regular file (a directory, FIFO, device or socket); "
                "a checkpoint is a file"
            )
        if info.st_size > MAX_CHECKPOINT_BYTES:
            raise CheckpointError(
                f"checkpoint {path}: {info.st_size} bytes; at most {MAX_CHECKPOINT_BYTES} allowed"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_CHECKPOINT_BYTES + 1)  # the file may have grown since fstat
    finally:
        os.close(fd)
    if len(raw) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"checkpoint {path}: more than {MAX_CHECKPOINT_BYTES} bytes")
    return raw


def zip_members(path, raw: bytes) -> list[str]:
    """The member names of the zip archive `raw` (both checkpoint kinds are zips), refusing a
    truncated or non-zip file and members that would unpack to more than the file cap."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: not a complete zip archive (truncated, or not a checkpoint): "
            f"{_first_line(exc)}"
        ) from None
    if infos and min(i.header_offset for i in infos) != 0:
        # zipfile accepts bytes before an archive; here they mean a truncated file whose tail
        # is a zip stored inside it (an SB3 archive holds torch zips), or a disguised one
        raise CheckpointError(
            f"checkpoint {path}: not a complete zip archive (truncated, or data before it)"
        )
    if sum(i.file_size for i in infos) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            f"checkpoint {path}: its members unpack to more than {MAX_CHECKPOINT_BYTES} bytes"
        )
    big = [i for i in infos if i.filename.endswith("/data.pkl") and i.file_size > MAX_PICKLE_BYTES]
    if big:
        raise CheckpointError(
            f"checkpoint {path}: {big[0].filename} is {big[0].file_size} bytes; a checkpoint's "
            f"pickle is at most {MAX_PICKLE_BYTES}"
        )
    return [i.filename for i in infos]


SB3_MEMBERS = {"data", "policy.pth"}  # what tells an SB3 archive (checkpoint.zip) apart


def torch_load_checked(path, raw: bytes, map_location="cpu"):
    """torch.load(weights_only=True) of `raw`, a torch.save zip; every failure is one line."""
    names = zip_members(path, raw)
    if set(names) >= SB3_MEMBERS:
        raise CheckpointError(
            f"checkpoint {path} is an SB3 model (checkpoint.zip of agent=sb3_ppo or "
            "maskable_ppo), not a Tamiyo checkpoint (checkpoint.pt): load it with "
            "esper_gym.agents.sb3.load_model (train resume= with that agent)"
        )
    if not any(n.endswith("/data.pkl") for n in names):
        raise CheckpointError(f"checkpoint {path}: a zip, but not one torch.save wrote")
    try:
        return torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt bytes, a refused pickle: never a traceback wall
        raise CheckpointError(
            f"checkpoint {path}: torch.load (weights_only) refused it: {_first_line(exc)}"
        ) from None


# Checks are (predicate, what is allowed) pairs: the second half goes into the refusal.
def int_in(lo: int, hi: int):
    return (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
        f"an int in [{lo}, {hi}]",
    )


def number_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    def ok(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if isinstance(v, float) and not math.isfinite(v):  # (an int of 400 digits is no float)
            return False
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return ok, f"a finite number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def one_of(*allowed):
    return (
        lambda v: any(v is a or (type(v) is type(a) and v == a) for a in allowed),
        f"one of {', '.join(map(repr, allowed))}",
    )


BOOL = (lambda v: isinstance(v, bool), "True or False")

# TamiyoPolicy's arguments. Ranges are generous (every committed checkpoint: hidden 64,
# layers 3, 39/11/2 features, 20 actions per node) and bound the network: at the limits it has
# 46M parameters (185 MB), built in half a second.
POLICY_KWARGS = {
    "node_dim": int_in(1, 1024),
    "global_dim": int_in(1, 1024),
    "edge_dim": int_in(0, 64),
    "per_node_actions": int_in(1, 1024),
    "hidden": int_in(1, 1024),
    "layers": int_in(0, 16),
    "dropout": number_in(0.0, 1.0, hi_open=True),
    "wait_bias": number_in(-50.0, 50.0),
    "gated": BOOL,
}
# The entries of a checkpoint; "env" is absent from those written before env records existed.
CHECKPOINT_KEYS = ("policy_kwargs", "policy", "optimizer", "global_step", "config", "torch_rng")
OPTIONAL_KEYS = ("env",)
MAX_GLOBAL_STEP = 10**12


def check_table(path, where: str, values, table: dict, *, required=True) -> None:
    """Every key of `values` in `table` (and, with `required`, every key of `table` in it),
    each value passing its check."""
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint {path}: {where}={_show(values)}; a dict")
    unknown = [k for k in values if k not in table]
    missing = [k for k in table if k not in values] if required else []
    if unknown or missing:
        raise CheckpointError(
            f"checkpoint {path}: {where} has unknown keys {_show(unknown)}, missing "
            f"{_show(missing)}; allowed: {', '.join(table)}"
        )
    for key, value in values.items():
        ok, allowed = table[key]
        if not ok(value):
            raise CheckpointError(f"checkpoint {path}: {where}.{key}={_show(value)}; {allowed}")


def _check_state(path, state, current: dict) -> None:
    """Everything in a loaded checkpoint except the tensors' shapes (which need the policy)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds {_show(state)}, not a checkpoint dict")
    unknown = [k for k in state if k not in CHECKPOINT_KEYS + OPTIONAL_KEYS]
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if unknown or missing:
        raise CheckpointError(
            f"checkpoint {path}: unknown entries {_show(unknown)}, missing {_show(missing)}; "
            f"a Tamiyo checkpoint holds {', '.join(CHECKPOINT_KEYS + OPTIONAL_KEYS)}"
        )
    check_table(path, "policy_kwargs", state["policy_kwargs"], POLICY_KWARGS)
    step = state["global_step"]
    if not int_in(0, MAX_GLOBAL_STEP)[0](step):
        raise CheckpointError(
            f"checkpoint {path}: global_step={_show(step)}; an int in [0, {MAX_GLOBAL_STEP}]"
        )
    if not isinstance(state["config"], dict) or not _plain(state["config"], [0], 0):
        raise CheckpointError(
            f"checkpoint {path}: config={_show(state['config'])}; a dict of plain values "
            "(None, bool, int, float, str, and lists and dicts of them: at most "
            f"{MAX_PLAIN_ITEMS} in all, {MAX_PLAIN_DEPTH} deep)"
        )
    rng, size = state["torch_rng"], torch.get_rng_state().shape
    if rng is not None and not (
        isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == size
    ):
        raise CheckpointError(
            f"checkpoint {path}: torch_rng={_show(rng)}; None or a uint8 tensor of shape "
            f"{tuple(size)} (torch.get_rng_state())"
        )
    check_env_entry(path, state.get("env", {}), current)


MAX_PLAIN_ITEMS = 10_000
MAX_PLAIN_DEPTH = 4


def _plain(value, count: list[int], depth: int) -> bool:
    """Whether `value` is a plain value (a config): bounded in size and depth, so that a
    pickle of shared references cannot make this walk (or its repr) exponential."""
    count[0] += 1
    if count[0] > MAX_PLAIN_ITEMS or depth > MAX_PLAIN_DEPTH:
        return False
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return len(value) <= 10_000
    if isinstance(value, (list, tuple)):
        return all(_plain(v, count, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, count, depth + 1) for k, v in value.items())
    return False


def check_env_entry(path, env, current: dict | None = None) -> None:
    """A checkpoint's env record: {} or {"task", "blueprints"[, "tasks", "show_context", "gate",
    "gate_plans"]} whose task is a registered task (or "+"-joined mixture of them, or the task of `current`,
    this run's own record) and whose blueprints are registered blueprints: a name, never an
    import path."""
    from esper_gym.agents.gate import GATES
    from esper_gym.kernels.blueprints import BLUEPRINTS
    from esper_gym.tasks import TASKS

    if not isinstance(env, dict):
        raise CheckpointError(f"checkpoint {path}: env={_show(env)}; a dict (an env record)")
    if not env:
        return
    own = [t for t in str((current or {}).get("task", "")).split("+") if t and t not in TASKS]
    tasks = [*TASKS, *own]  # this run's own task may be a custom one (gym.register)

    def is_mixture(v) -> bool:
        return isinstance(v, str) and len(v) <= 1000 and all(t in tasks for t in v.split("+"))

    def are_blueprints(v) -> bool:
        return isinstance(v, list) and 1 <= len(v) <= 64 and all(b in BLUEPRINTS for b in v)

    table = {
        "task": (is_mixture, f"a registered task or tasks joined by '+': {', '.join(tasks)}"),
        "blueprints": (are_blueprints, f"a list of registered blueprints: {', '.join(BLUEPRINTS)}"),
        "tasks": (
            lambda v: isinstance(v, list) and v == str(env.get("task")).split("+"),
            "the list of the tasks in env.task",
        ),
        "show_context": BOOL,
        "gate": (lambda v: v in GATES, f"one of {', '.join(GATES)}"),
        "gate_plans": (
            lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
            "a sha256 hex digest (64 of 0-9a-f)",
        ),
    }
    check_table(path, "env", env, table, required=False)
    if "task" not in env or "blueprints" not in env:
        raise CheckpointError(f"checkpoint {path}: env={_show(env)}; needs task and blueprints")


def check_tensors(path, where: str, tensors, expected: dict[str, torch.Tensor]) -> None:
    """`tensors` has exactly the names, shapes and dtypes of `expected` (a state dict)."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"checkpoint {path}: {where}={_show(tensors)}; a state dict")
    unknown = [k for k in tensors if k not in expected]
    missing = [k for k in expected if k not in tensors]
    if unknown or missing:
        raise CheckpointError(
            f"checkpoint {path}: {where} has unknown tensors {_show(unknown)}, missing "
            f"{_show(missing)} for the network its kwargs describe"
        )
    for name, want in expected.items():
        got = tensors[name]
        if not (
            isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype
        ):
            raise CheckpointError(
                f"checkpoint {path}: {where}.{name} is {_show(got)}; the network its kwargs "
                f"describe has {_show(want)}"
            )


# torch.optim.Adam's param_group entries (as torch 2.x writes them; older ones write fewer).
# `maximize`, `capturable`, `differentiable` and `fused` change what a step does (ascent,
# CUDA-only code paths): a resumed run takes them as Adam(...) was built, off.
ADAM_GROUP = {
    "lr": number_in(0.0, 1.0),
    "betas": (
        lambda v: (
            isinstance(v, (tuple, list))
            and len(v) == 2
            and all(number_in(0.0, 1.0, hi_open=True)[0](b) for b in v)
        ),
        "two finite numbers in [0, 1)",
    ),
    "eps": number_in(0.0, 1.0, lo_open=True),
    "weight_decay": number_in(0.0, 1.0),
    "amsgrad": BOOL,
    "maximize": one_of(False),
    "foreach": one_of(None, False, True),
    "capturable": one_of(False),
    "differentiable": one_of(False),
    "fused": one_of(None, False),
    "decoupled_weight_decay": BOOL,
    "initial_lr": number_in(0.0, 1.0),  # written when an LR scheduler wrapped the optimizer
    "params": (lambda v: isinstance(v, list), "the list of parameter indices"),
}
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_adam_state(path, where: str, state, params: list[torch.Tensor]) -> None:
    """An Adam `state_dict()` for exactly `params` (one param group): plain settings in range,
    and moments of the parameters' shapes. Adam's own load_state_dict checks only counts."""
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        raise CheckpointError(
            f"checkpoint {path}: {where}={_show(state)}; an Adam state_dict "
            "{'state': ..., 'param_groups': [...]}"
        )
    groups = state["param_groups"]
    if not isinstance(groups, list) or len(groups) != 1:
        raise CheckpointError(
            f"checkpoint {path}: {where}.param_groups={_show(groups)}; a list of one group"
        )
    check_table(path, f"{where}.param_groups[0]", groups[0], ADAM_GROUP, required=False)
    if groups[0].get("params") != list(range(len(params))):
        raise CheckpointError(
            f"checkpoint {path}: {where}.param_groups[0].params="
            f"{_show(groups[0].get('params'))}; [0, ..., {len(params) - 1}], one per parameter"
        )
    moments = state["state"]
    if not isinstance(moments, dict):
        raise CheckpointError(f"checkpoint {path}: {where}.state={_show(moments)}; a dict")
    for index, entry in moments.items():
        at = f"{where}.state[{_show(index)}]"
        if not (isinstance(index, int) and 0 <= index < len(params)) or not isinstance(entry, dict):
            raise CheckpointError(
                f"checkpoint {path}: {at}={_show(entry)}; a parameter index in "
                f"[0, {len(params) - 1}] with a dict of {', '.join(ADAM_STATE)}"
            )
        for key, value in entry.items():
            if key not in ADAM_STATE:
                raise CheckpointError(
                    f"checkpoint {path}: {at} has {key!r}; allowed: {', '.join(ADAM_STATE)}"
                )
            if key == "step":  # a float tensor of one value (a number in older torch)
                step = (
                    value.item()
                    if isinstance(value, torch.Tensor) and value.numel() == 1
                    else value
                )
                if not number_in(0, 1e15)[0](step):
                    raise CheckpointError(
                        f"checkpoint {path}: {at}.step={_show(value)}; a count in [0, 1e15]"
                    )
            elif not (
                isinstance(value, torch.Tensor)
                and value.shape == params[index].shape
                and value.dtype == params[index].dtype
            ):
                raise CheckpointError(
                    f"checkpoint {path}: {at}.{key} is {_show(value)}; its parameter is "
                    f"{_show(params[index])}"
                )
