"""What a process's CPU numbers depend on, and the portable mode that pins it.

Host training on CPU goes through ATen kernels dispatched by CPU capability (default, AVX2,
AVX-512), MKL (BLAS, dispatched by CPU vendor and model) and oneDNN (its own JIT per ISA). Each
path reduces in its own order, so the same episode gives other floats on another CPU (issue 24:
15 of the 80 committed baseline episodes, recorded elsewhere, did not replay on an AMD EPYC).
The portable mode pins every dispatch to a path that any x86-64 CPU runs alike:

- `ATEN_CPU_CAPABILITY=default`: ATen's baseline kernels instead of its AVX2/AVX-512 ones;
- `MKL_CBWR=COMPATIBLE`: MKL's conditional numerical reproducibility on its CPU-independent
  branch (`MKL_CBWR=AVX2` is ignored on non-Intel CPUs, MKL's docs say: it is no fix there);
- oneDNN off (`torch.backends.mkldnn.enabled = False`, set by `apply()`): with ATen at default
  a fashion_mnist episode went through it; its JIT also picks blocking from cache sizes, so
  capping its ISA alone would not make it CPU-independent (`ONEDNN_MAX_CPU_ISA=SSE41` in case
  something still calls it);
- a fixed thread count (MKL_DYNAMIC/OMP_DYNAMIC off; records carry it, evaluate uses 1).

Measured (`experiments/bench_numerics.py`, its docstring has the table): natively ATen's
capability, MKL's branch and the thread count each change an episode's return; under the
portable mode, the AVX2 or AVX-512 knobs layered on change no bit. Cost: episodes 1.5x
(spirals) to 1.8x (fashion_mnist) slower, most of it MKL's compatible branch. The variables
must be set before torch loads MKL: `ensure()` re-executes the command with them.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any

PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    # MKL's reproducibility conditions: no run-time change of the thread count.
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    # Changing this set changes portable numbers: name the mode anew then ("portable-2").
    "ESPER_NUMERICS": "portable",  # tells apply() and child processes which mode they are in
}
MODES = ("native", "portable")


def env_is_portable(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return all(environ.get(k) == v for k, v in PORTABLE_ENV.items())


def apply() -> None:
    """The in-process half of the portable mode (no-op in native mode): oneDNN off. Every
    process that plays or replays an episode calls it before its first torch op."""
    if env_is_portable():
        import torch

        torch.backends.mkldnn.enabled = False


def tag() -> str:
    """What a kernel's drawn initial weights depend on: "portable", or "native-<capability>"."""
    if env_is_portable():
        return "portable"
    import torch

    return f"native-{torch.backends.cpu.get_cpu_capability()}"


def _cpu() -> str:
    """The CPU's model name: MKL picks its code path by vendor and model, not by capability
    alone, so native numbers are comparable only on the same model."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()[:MAX_TEXT]
    except OSError:
        pass
    return (platform.processor() or platform.machine() or "unknown")[:MAX_TEXT]


MAX_TEXT = 128  # longest text field of a record's numerics (validate checks it)


def current() -> dict[str, Any]:
    """What this process's CPU numbers depend on: mode, torch version, ATen's CPU capability,
    the CPU's architecture and model, and the torch thread count."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    portable = env_is_portable() and not torch.backends.mkldnn.enabled and capability == "DEFAULT"
    return {
        "mode": "portable" if portable else "native",
        "torch": torch.__version__,
        "capability": capability,
        "arch": platform.machine()[:MAX_TEXT] or "unknown",
        "cpu": _cpu(),
        "threads": torch.get_num_threads(),
    }


def ensure(mode: str, argv: Sequence[str] | None = None) -> None:
    """Run this command in `mode`: re-execute it with PORTABLE_ENV set ("portable") or removed
    ("native") when the process is not already so (never returns then); else return, with
    `apply()` done. The variables must be there before torch loads MKL, hence the re-exec.
    `argv`: the command's arguments (default `sys.argv[1:]`), run again as `python -m <main
    module>` or `python <script>`."""
    if mode not in MODES:
        raise ValueError(f"numerics mode {mode!r}; known: {', '.join(MODES)}")
    if env_is_portable() == (mode == "portable"):
        apply()
        return
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    if mode == "portable":
        env.update(PORTABLE_ENV)
    args = list(sys.argv[1:] if argv is None else argv)
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    command = ["-m", spec.name, *args] if spec and spec.name else [sys.argv[0], *args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *command], env)


def ensure_portable(argv: Sequence[str] | None = None) -> None:
    ensure("portable", argv)


# ------------------------------------------------------------ records (esper_gym.validate)


def _text(max_len: int):
    def check(v: Any) -> str | None:
        ok = isinstance(v, str) and 0 < len(v) <= max_len and v.isprintable()
        return None if ok else f"must be a printable string of 1..{max_len} characters"

    return check


# The fields of a record's `numerics` (a file is untrusted input), each with its check.
RECORD_FIELDS = {
    "mode": lambda v: None if v in MODES else f"allowed: {', '.join(MODES)}",
    "torch": _text(64),
    "capability": _text(32),
    "arch": _text(32),
    "cpu": _text(MAX_TEXT),
    "threads": lambda v: (
        None if type(v) is int and 1 <= v <= 1024 else "must be an integer in [1, 1024]"
    ),
}


def check_record(value: Any) -> str | None:
    """None if `value` is a record's valid `numerics` (null: unknown), else what is wrong,
    starting with the field's name."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(RECORD_FIELDS):
        got = sorted(map(str, value))[:8] if isinstance(value, dict) else repr(value)[:80]
        return f"'numerics' = {got} must be null or an object with exactly the fields " + (
            f"{sorted(RECORD_FIELDS)}"
        )
    for name, check in RECORD_FIELDS.items():
        if (why := check(value[name])) is not None:
            return f"'numerics.{name}' = {repr(value[name])[:80]} {why}"
    return None


def incomparable(recorded: Mapping[str, Any] | None, here: Mapping[str, Any]) -> str | None:
    """Why numbers recorded with `recorded` numerics need not reproduce `here` (None: they
    must). Portable numbers depend on the torch version, threads and architecture only; native
    ones also on the CPU (capability and model: MKL picks its path by vendor and model)."""
    if recorded is None:
        return f"recorded with unknown numerics (replay format 1), this machine has {_says(here)}"
    keys = ["mode", "torch", "threads", "arch"]
    if recorded["mode"] == "native":
        keys += ["capability", "cpu"]
    if all(recorded[k] == here[k] for k in keys):
        return None
    return f"recorded with {_says(recorded)}, this machine has {_says(here)}"


def _says(n: Mapping[str, Any]) -> str:
    return (
        f"{n['mode']} numerics (torch {n['torch']}, {n['arch']} {n['capability']}, {n['cpu']}, "
        f"{n['threads']} thread(s))"
    )
