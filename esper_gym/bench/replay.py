"""Replayable, checkable episodes: replaying what `esper_gym.evaluate` records (`python -m
esper_gym.validate` runs `main`).

```bash
python -m esper_gym.validate outputs/<run>/replays.json          # replay every episode on CPU
python -m esper_gym.validate replays.json --device cuda          # GPU: within GPU_TOLERANCE
```

`evaluate` writes `replays.json` beside `episodes.csv`: for every episode its env id, the env
kwargs it was built with (Task fields, reward weights, context split), the context index, the
seed, every action taken, the reported return and test accuracy, the torch thread count and
`numerics` (what CPU floats depend on: `esper_gym.numerics.current()`). An episode is a pure
function of (env, seed, actions, numerics), so replaying the actions must give the reported
numbers back: exactly on CPU (same floats, bit for bit), and within `GPU_TOLERANCE` on CUDA,
where kernels are not bitwise deterministic. Any policy's result can be checked this way without
its code or weights: what CompilerGym's `validate` gives a leaderboard. An episode recorded in
the portable mode is replayed in it (`--numerics auto` re-executes the command) and must
reproduce on any x86-64 CPU with the same torch; a native one, on the same CPU model. One
recorded with other numerics (or in format 1, which did not say) that does not reproduce is
"not comparable", with both sides' numerics, and does not fail (`--strict`: it does): that
proves nothing either way; only portable files are checkable everywhere.

The file's schema and its checks are `esper_gym.bench.records`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from esper_gym import numerics
from esper_gym.bench.jobs import make_env
from esper_gym.bench.records import (
    FILE_NAME,
    MAX_WORK,
    ReplayError,
    check_episode,
    differences,
    episode_label,
    read_episodes,
    tuples,
)

# Replays on CUDA: cuBLAS/cuDNN reductions are not bitwise reproducible, so a CUDA replay
# passes within these (absolute) bounds; on CPU the check is exact (tolerance 0). Not yet
# measured on a GPU: a bound chosen as one eval sample of accuracy on a 1024-sample eval set
# (~1e-3, times the accuracy weight 10 in the return).
GPU_TOLERANCE = {"return": 1e-2, "test_acc": 1e-3}


class NotReproduced(ReplayError):
    """The replay ran but gave other numbers; `here`: the numerics it ran with."""

    def __init__(self, message: str, here: Mapping[str, Any]):
        super().__init__(message)
        self.here = here


# ------------------------------------------------------------------------------ replaying


def replay(
    i: int, ep: Mapping[str, Any], kernel_dir: str | None = None, device: str = "cpu"
) -> dict[str, float]:
    """Play `ep`'s actions from its seed; `ReplayError` if they do not reproduce its numbers."""
    import torch

    where = episode_label(i, ep)
    numerics.apply()  # the portable mode's in-process half (oneDNN off), if its variables are set
    threads = torch.get_num_threads()
    if ep["threads"] is not None:
        torch.set_num_threads(ep["threads"])
    here = numerics.current()
    kwargs = {k: tuples(v) for k, v in ep["env_kwargs"].items()}
    try:
        env = make_env(
            ep["env_id"], disable_env_checker=True, kernel_dir=kernel_dir, device=device, **kwargs
        )
    except (TypeError, ValueError, KeyError) as e:
        torch.set_num_threads(threads)
        raise ReplayError(f"{where}: field 'env_kwargs' does not build the env: {e}") from None
    try:
        _, info = env.reset(seed=ep["seed"])
        u = env.unwrapped
        work = 3 * u.budget * u.task.batch_size * u.host_macs  # forward and backward MACs
        if work > MAX_WORK:
            raise ReplayError(
                f"{where}: field 'env_kwargs' makes an episode of {work:.2g} multiply-adds of "
                f"training; a replay runs at most {MAX_WORK:.0g}"
            )
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
            raise NotReproduced(
                f"{where}: field {name!r} = {ep[name]!r} but the replay gives {got[name]!r} "
                f"(tolerance {tol[name]} on {device})",
                here,
            )
    return got


@dataclass
class Report:
    """What `validate` found: one line per episode, and the counts."""

    lines: list[str] = dataclasses.field(default_factory=list)
    reproduced: int = 0
    custom: int = 0
    refused: int = 0
    not_comparable: int = 0  # other numbers, recorded with other numerics (numerics.incomparable)

    @property
    def ok(self) -> bool:
        return self.refused == 0 and self.reproduced + self.not_comparable > 0


def check(
    path: str | os.PathLike,
    kernel_dir: str | None = None,
    device: str = "cpu",
    *,
    custom: bool = False,
    progress=None,
) -> Report:
    """Check and replay every episode of `path` and report each one; a bad episode does not stop
    the others. `custom`: also replay episodes of custom tasks (marked CUSTOM), else refuse
    them. Without `kernel_dir`, kernels go to a throwaway store."""
    episodes = read_episodes(path)
    report = Report()

    def say(line: str) -> None:
        report.lines.append(line)
        if progress:
            progress(line)

    with tempfile.TemporaryDirectory(prefix="esper-replay-") as scratch:
        for i, ep in enumerate(episodes):
            where = episode_label(i, ep)
            try:
                check_episode(i, ep)
                diffs = differences(ep)
                if diffs and not custom:
                    raise ReplayError(
                        f"{where}: not the registered task of {ep['env_id']}: "
                        f"{'; '.join(diffs)[:400]} (registered values in brackets); "
                        "replay it as a custom task with --custom"
                    )
                replay(i, ep, kernel_dir or scratch, device)
            except NotReproduced as e:
                if (why := numerics.incomparable(ep["numerics"], e.here)) is None:
                    report.refused += 1
                    say(f"REFUSED: {e}")
                else:
                    report.not_comparable += 1
                    say(f"not comparable: {e}: {why}")
            except ReplayError as e:
                report.refused += 1
                say(f"REFUSED: {e}")
            except Exception as e:  # a crafted file must end in a line, never a traceback
                report.refused += 1
                first = (str(e).splitlines() or [""])[0][:300]
                say(f"REFUSED: {where}: cannot be replayed: {type(e).__name__}: {first}")
            else:
                report.reproduced += 1
                if diffs:
                    report.custom += 1
                    say(f"ok (CUSTOM task: {'; '.join(diffs)[:300]}) {where}")
                else:
                    say(f"ok {where}")
    return report


def validate(
    path: str | os.PathLike,
    kernel_dir: str | None = None,
    device: str = "cpu",
    progress=None,
    *,
    custom: bool = False,
) -> int:
    """Check and replay every episode of `path`; the number reproduced, or a `ReplayError`
    listing every refused episode."""
    report = check(path, kernel_dir, device, custom=custom, progress=progress)
    if report.refused:
        refused = [line.removeprefix("REFUSED: ") for line in report.lines if "REFUSED" in line]
        raise ReplayError("\n".join(refused))
    return report.reproduced


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m esper_gym.validate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("file", help=f"a {FILE_NAME} written by esper_gym.evaluate")
    parser.add_argument("--device", default="cpu", help="cpu: exact; cuda: within tolerance")
    parser.add_argument(
        "--kernel-dir", default=None, help="kernel store (default: a throwaway one)"
    )
    parser.add_argument(
        "--custom",
        action="store_true",
        help="also replay episodes of tasks that differ from their registered definition",
    )
    parser.add_argument(
        "--numerics",
        choices=("auto", "native", "portable"),
        default="auto",
        help="replay in this mode (re-executes); auto: portable if the file has portable episodes",
    )
    parser.add_argument(
        "--strict", action="store_true", help="an episode that is not comparable fails too"
    )
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    quiet = args.quiet
    mode = args.numerics
    if mode == "auto":
        mode = "portable" if _recorded_portable(args.file) else None
    # Only the command re-executes itself; main() called as a function replays as it is.
    if mode is not None and argv is None:
        numerics.ensure(mode)

    def show(line: str) -> None:
        if line.startswith("REFUSED"):
            print(line, file=sys.stderr)
        elif not quiet or line.startswith("not comparable"):
            print(line)

    try:
        report = check(args.file, args.kernel_dir, args.device, custom=args.custom, progress=show)
    except ReplayError as e:
        print(f"REFUSED: {e}", file=sys.stderr)
        return 1
    custom = f" ({report.custom} of them custom tasks)" if report.custom else ""
    others = f", {report.not_comparable} not comparable (recorded with other numerics)"
    if report.refused or (args.strict and report.not_comparable):
        print(
            f"{args.file}: {report.refused} episode(s) refused, {report.reproduced} "
            f"reproduced{custom}{others}",
            file=sys.stderr,
        )
        return 1
    print(
        f"{report.reproduced} episodes of {args.file} replayed: return and test accuracy "
        f"reproduced{custom}{others}"
    )
    return 0


def _recorded_portable(path: str) -> bool:
    """Whether an episode of the file was recorded in the portable mode (a file that cannot be
    read is reported by `check`)."""
    try:
        episodes = read_episodes(path)
    except ReplayError:
        return False
    numbers = [ep.get("numerics") for ep in episodes if isinstance(ep, dict)]
    return any(isinstance(n, dict) and n.get("mode") == "portable" for n in numbers)


if __name__ == "__main__":
    sys.exit(main())
